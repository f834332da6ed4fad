"""Fixtures for the PostgreSQL store's tests: a server, and a fresh schema per test.

The server is the one named by $TRIOFLOW_TEST_POSTGRES_URL (default
``postgresql://postgres@127.0.0.1:5432/test``); the role needs to create and
drop schemas (and, for one test, roles). When the server cannot be reached the
tests that need it are skipped, or fail when $CI is ``true``.

Tests that stop and start the server use a throwaway cluster of their own
(`pg_cluster`, see ``_cluster.py``), made from the machine's PostgreSQL
binaries; without them those tests are skipped, or fail when $CI is ``true``.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from tests._servers import server_missing
from tests.postgres._cluster import Cluster, ClusterUnavailable
from tests.postgres._server import drop_schemas, open_admin, require_server, with_options
from trioflow.stores.postgres import PostgresStore
from trioflow.stores.postgres._driver import Driver


@pytest.fixture(scope="session")
def pg_url() -> str:
    """The test server's URL; skips (fails under CI=true) when it is unreachable."""
    return require_server()


@pytest.fixture
def new_schema(pg_url: str) -> Iterator[Callable[[], str]]:
    """A factory of unique schema names; every schema it named is dropped afterwards."""
    prefix = f"tf_test_{uuid.uuid4().hex[:12]}"
    counter = itertools.count()
    made: list[str] = []

    def make() -> str:
        schema = f"{prefix}_{next(counter)}"
        made.append(schema)
        return schema

    yield make
    drop_schemas(pg_url, made)


@pytest.fixture
def schema(new_schema: Callable[[], str]) -> str:
    """One fresh schema name (the schema itself is created by the store)."""
    return new_schema()


@pytest.fixture
def make_url(pg_url: str) -> Callable[..., str]:
    """A function giving the test server's URL with store options added."""

    def make(**options: object) -> str:
        return with_options(pg_url, **options)

    return make


@pytest.fixture
def store_url(make_url: Callable[..., str], schema: str) -> str:
    """A store URL on a fresh schema, with quick fallback polling."""
    return make_url(schema=schema, poll_interval=0.2)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[PostgresStore]:
    """An open store on a fresh schema."""
    opened = PostgresStore.from_url(store_url)
    async with opened.open():
        yield opened


@pytest.fixture
async def admin(pg_url: str) -> AsyncIterator[Driver]:
    """A plain driver on the test database."""
    async with open_admin(pg_url) as driver:
        yield driver


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """A throwaway PostgreSQL cluster for the whole session, started; deleted at the end.

    Skips (fails under CI=true) when the machine has no PostgreSQL server
    binaries or no unprivileged user to run them as.
    """
    try:
        cluster = Cluster.create()
    except ClusterUnavailable as exc:
        server_missing(f"cannot make a throwaway PostgreSQL cluster: {exc}")
    try:
        cluster.start_blocking()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def cluster(pg_cluster: Cluster) -> Cluster:
    """The throwaway cluster, running (a test before may have left it stopped)."""
    if not pg_cluster.running:
        pg_cluster.start_blocking()
    return pg_cluster


def pytest_collection_modifyitems(items: list[Any]) -> None:
    """Mark every test in this directory ``postgres``, to select or deselect them."""
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here + os.sep):
            item.add_marker(pytest.mark.postgres)
