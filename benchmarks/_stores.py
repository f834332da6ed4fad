"""The stores a case can run on, by the name ``--store`` takes.

Each `StoreKind` hands out a fresh, empty store per run and removes it
afterwards, so no run reads what an earlier one wrote. A new backend is one
more entry in `STORES`.

The PostgreSQL kinds use the server named by $TRIOFLOW_BENCH_POSTGRES_URL
(default `DEFAULT_POSTGRES_URL`), a plain libpq URL without trioflow's
options: every run gets a new, uniquely named schema there, dropped
afterwards. The role must be allowed to create schemas.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import tempfile
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import trio

from trioflow.stores import Store, store_from_url

if TYPE_CHECKING:
    # Imported where used: a trioflow without the PostgreSQL store still runs
    # the other stores' benchmarks.
    from trioflow.stores.postgres._driver import DriverConfig

#: The environment variable naming the PostgreSQL server to measure, and its
#: default (the hand-written program, which must not import trio, has its own copy).
POSTGRES_URL_VARIABLE = "TRIOFLOW_BENCH_POSTGRES_URL"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
#: Seconds the availability probe waits for the server.
_PROBE_TIMEOUT = 10.0


@attrs.frozen(kw_only=True)
class StoreKind:
    """A kind of store the benchmarks can run on.

    Attributes:
        name: The name ``--store`` takes.
        summary: What it is, for ``--help`` and the docs.
        fresh: Returns a context manager giving a new, empty store (not
            opened: the flow opens it), and deleting it on exit.
        unavailable: Returns why this store cannot be used here, or None.
        family: The backend (``memory``, ``sqlite``, ``postgres``): what
            decides which baselines run next to it.
        options: The store URL's options this kind sets (for example
            ``cursor_durability``), recorded with the results.
        server: Whether it needs a server. An unavailable server is skipped
            with a line saying so; any other unavailable store is an error.
    """

    name: str
    summary: str
    fresh: Callable[[], contextlib.AbstractContextManager[Store]]
    unavailable: Callable[[], str | None] = attrs.field(default=lambda: None)
    family: str = ""
    options: Mapping[str, str] = attrs.field(factory=dict)
    server: bool = False


@contextlib.contextmanager
def _fresh_memory() -> Iterator[Store]:
    yield store_from_url("memory://")


def _fresh_sqlite(synchronous: str) -> Callable[[], contextlib.AbstractContextManager[Store]]:
    @contextlib.contextmanager
    def fresh() -> Iterator[Store]:
        # tempfile honours $TMPDIR: point it at the disk to be measured.
        with tempfile.TemporaryDirectory(prefix="trioflow-bench-") as directory:
            path = urllib.parse.quote(str(Path(directory, "events.db")))
            # An absolute path gives the four-slash form, sqlite:////absolute/path.db
            yield store_from_url(f"sqlite:///{path}?synchronous={synchronous}")

    return fresh


def _sqlite_unavailable() -> str | None:
    if importlib.util.find_spec("trioflow.stores.sqlite") is None:
        return "this version of trioflow has no SQLite store (trioflow.stores.sqlite)"
    return None


def postgres_url() -> str:
    """The PostgreSQL server to measure: $TRIOFLOW_BENCH_POSTGRES_URL, or the default."""
    return os.environ.get(POSTGRES_URL_VARIABLE) or DEFAULT_POSTGRES_URL


def with_options(url: str, **options: str) -> str:
    """Return ``url`` with query options added (or replaced)."""
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    query.update(options)
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def _masked(url: str) -> str:
    from trioflow.stores._masking import mask_dsn

    return mask_dsn(url)


def _admin_config(url: str) -> DriverConfig:
    from trioflow.stores.postgres._driver import DriverConfig

    return DriverConfig(
        dsn=url, display=_masked(url), min_size=1, max_size=1, connect_timeout=_PROBE_TIMEOUT
    )


async def _probe_postgres(url: str) -> tuple[str | None, str | None]:
    from trioflow import StoreError
    from trioflow.stores.postgres._driver import open_driver

    config = _admin_config(url)
    try:
        with trio.fail_after(2 * _PROBE_TIMEOUT):
            async with open_driver(config) as driver:
                version: str = await driver.fetchval("SHOW server_version")
    except StoreError as exc:
        return str(exc), None
    except trio.TooSlowError:
        return f"PostgreSQL at {config.display} did not answer within {2 * _PROBE_TIMEOUT:g}s", None
    return None, version


@functools.cache
def _postgres_probe(url: str) -> tuple[str | None, str | None]:
    """Why the server at ``url`` cannot be used (or None), and its version; asked once."""
    if importlib.util.find_spec("trioflow.stores.postgres") is None:
        return "this version of trioflow has no PostgreSQL store (trioflow.stores.postgres)", None
    problem, version = trio.run(_probe_postgres, url)
    if problem is None:
        return None, version
    return (
        f"{problem} (the benchmarks use ${POSTGRES_URL_VARIABLE}, default "
        f"{DEFAULT_POSTGRES_URL}; its role must be allowed to create schemas)"
    ), None


def _postgres_unavailable() -> str | None:
    return _postgres_probe(postgres_url())[0]


def postgres_server_version() -> str | None:
    """The benchmark server's PostgreSQL version, if it was reached."""
    return _postgres_probe(postgres_url())[1]


async def _drop_schema(url: str, schema: str) -> None:
    from trioflow.stores.postgres._driver import open_driver

    async with open_driver(_admin_config(url)) as driver:
        await driver.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@contextlib.contextmanager
def fresh_postgres_schema() -> Iterator[tuple[str, str]]:
    """A new schema name on the benchmark server, and the server's URL.

    Nothing is created here (the store, or the hand-written program, creates
    the schema); whatever exists under that name is dropped on exit.
    """
    url = postgres_url()
    schema = f"tf_bench_{uuid.uuid4().hex[:16]}"
    try:
        yield url, schema
    finally:
        trio.run(_drop_schema, url, schema)


def _fresh_postgres(
    cursor_durability: str,
) -> Callable[[], contextlib.AbstractContextManager[Store]]:
    @contextlib.contextmanager
    def fresh() -> Iterator[Store]:
        with fresh_postgres_schema() as (url, schema):
            yield store_from_url(
                with_options(url, schema=schema, cursor_durability=cursor_durability)
            )

    return fresh


STORES: dict[str, StoreKind] = {
    kind.name: kind
    for kind in (
        StoreKind(
            name="memory",
            summary="memory://, the in-process store: trioflow's own overhead, no I/O",
            fresh=_fresh_memory,
            family="memory",
        ),
        StoreKind(
            name="sqlite",
            summary="sqlite:/// in a temporary directory, synchronous=full (the default)",
            fresh=_fresh_sqlite("full"),
            unavailable=_sqlite_unavailable,
            family="sqlite",
            options={"synchronous": "full"},
        ),
        StoreKind(
            name="sqlite-normal",
            summary="sqlite:/// in a temporary directory, synchronous=normal",
            fresh=_fresh_sqlite("normal"),
            unavailable=_sqlite_unavailable,
            family="sqlite",
            options={"synchronous": "normal"},
        ),
        *(
            StoreKind(
                name=name,
                summary=f"postgresql:// (${POSTGRES_URL_VARIABLE}), new schema per run, {summary}",
                fresh=_fresh_postgres(durability),
                unavailable=_postgres_unavailable,
                family="postgres",
                options={"cursor_durability": durability},
                server=True,
            )
            for name, durability, summary in (
                ("postgres", "sync", "cursor_durability=sync (the default)"),
                ("postgres-async", "async", "cursor_durability=async"),
                ("postgres-unlogged", "unlogged", "cursor_durability=unlogged"),
            )
        ),
    )
}
