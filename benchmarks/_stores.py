"""The stores a case can run on, by the name ``--store`` takes.

Each `StoreKind` hands out a fresh, empty store per run and removes it
afterwards, so no run reads what an earlier one wrote. A new backend is one
more entry in `STORES`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs

from trioflow.stores import Store, store_from_url


@attrs.frozen(kw_only=True)
class StoreKind:
    """A kind of store the benchmarks can run on.

    Attributes:
        name: The name ``--store`` takes.
        summary: What it is, for ``--help`` and the docs.
        fresh: Returns a context manager giving a new, empty store (not
            opened: the flow opens it), and deleting it on exit.
        unavailable: Returns why this store cannot be used here, or None.
    """

    name: str
    summary: str
    fresh: Callable[[], contextlib.AbstractContextManager[Store]]
    unavailable: Callable[[], str | None] = attrs.field(default=lambda: None)


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


STORES: dict[str, StoreKind] = {
    kind.name: kind
    for kind in (
        StoreKind(
            name="memory",
            summary="memory://, the in-process store: trioflow's own overhead, no I/O",
            fresh=_fresh_memory,
        ),
        StoreKind(
            name="sqlite",
            summary="sqlite:/// in a temporary directory, synchronous=full (the default)",
            fresh=_fresh_sqlite("full"),
            unavailable=_sqlite_unavailable,
        ),
        StoreKind(
            name="sqlite-normal",
            summary="sqlite:/// in a temporary directory, synchronous=normal",
            fresh=_fresh_sqlite("normal"),
            unavailable=_sqlite_unavailable,
        ),
    )
}
