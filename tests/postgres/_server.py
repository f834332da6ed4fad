"""The PostgreSQL test server: its URL, whether it answers, and schemas made on it.

The server is the one named by $TRIOFLOW_TEST_POSTGRES_URL (default
``postgresql://postgres@127.0.0.1:5432/test``); the role needs to create and
drop schemas. Tests outside this directory that need the server (the docs'
programs) use these too, so that every such test skips, or fails under
``CI=true``, in the same way.
"""

from __future__ import annotations

import contextlib
import functools
import os
import urllib.parse
from collections.abc import AsyncIterator, Iterable

import trio

from tests._servers import server_missing
from trioflow import StoreError
from trioflow.stores.postgres._driver import Driver, DriverConfig, open_driver

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"

HOW_TO_RUN = (
    "to run the PostgreSQL tests, start a server and point TRIOFLOW_TEST_POSTGRES_URL at a "
    "database the role may create schemas in (default " + DEFAULT_URL + "), for example: "
    "createdb test && TRIOFLOW_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/test "
    "pytest tests/postgres"
)


def server_url() -> str:
    """The test server's URL, from the environment or the default."""
    return os.environ.get("TRIOFLOW_TEST_POSTGRES_URL") or DEFAULT_URL


def with_options(url: str, **options: object) -> str:
    """Return ``url`` with query options added (or replaced)."""
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    query.update({name: str(value) for name, value in options.items()})
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


@contextlib.asynccontextmanager
async def open_admin(url: str) -> AsyncIterator[Driver]:
    """A plain driver on the test database, for set-up and inspection."""
    config = DriverConfig(dsn=url, display=url, min_size=1, max_size=4, connect_timeout=5.0)
    async with open_driver(config) as driver:
        yield driver


async def _probe(url: str) -> str | None:
    try:
        with trio.fail_after(15):
            async with open_admin(url) as driver:
                await driver.fetchval("SELECT 1")
    except StoreError as exc:
        return str(exc)
    except trio.TooSlowError:
        return "no answer within 15 s"
    return None


@functools.cache
def _problem(url: str) -> str | None:
    # Asked once per URL and test run: a missing server costs one timeout, not one per test.
    return trio.run(_probe, url)


def require_server() -> str:
    """The test server's URL; skips the calling test (fails it under CI=true) if unreachable."""
    url = server_url()
    problem = _problem(url)
    if problem is not None:
        server_missing(f"PostgreSQL test server unavailable: {problem}; {HOW_TO_RUN}")
    return url


async def wait_sessions_gone(admin: Driver, tag: str) -> None:
    """Wait until the server has no session of ``tag`` left (its last statement is over).

    PostgreSQL finishes a statement whose client was killed: tag a child's
    sessions with ``application_name`` and wait for them before reading.
    """
    with trio.fail_after(30):
        # Polling the server's view: there is nothing to wait on locally.
        while await admin.fetchval(  # noqa: ASYNC110
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", tag
        ):
            await trio.sleep(0.02)


async def _drop_schemas(url: str, schemas: Iterable[str]) -> None:
    async with open_admin(url) as driver:
        for schema in schemas:
            await driver.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def drop_schemas(url: str, schemas: Iterable[str]) -> None:
    """Drop ``schemas`` (those that exist) and everything in them."""
    trio.run(_drop_schemas, url, schemas)
