"""The shared store contract, run on PostgreSQL (one fresh schema per store)."""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import AsyncIterator, Callable

import pytest

from tests.postgres._server import server_url
from trioflow.stores import Store, StoreTransaction
from trioflow.stores.postgres import PostgresStore
from trioflow.testing import StoreContract

_SERVER = urllib.parse.urlsplit(server_url())
_USER = _SERVER.username or "postgres"
_HOST_AND_PORT = _SERVER.netloc.rpartition("@")[2]
# A database the test server does not have: its own error, with the login done.
_MISSING = f"{_HOST_AND_PORT}/trioflow_test_no_such_database?connect_timeout=5"


class _OwnTablesStore(PostgresStore):
    """A store whose transactions make their tables in the store's own schema.

    The contract's transactions make an unqualified table, as if every store
    had a database of its own; on PostgreSQL they would all share the
    database's ``public`` schema (and its leftovers). ``SET LOCAL`` lasts
    until the commit, so the session is left as it was.
    """

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[StoreTransaction]:
        async with super().transaction() as tx:
            await tx.execute(f'SET LOCAL search_path TO "{self.schema}"')
            yield tx


class TestPostgresStore(StoreContract):
    # Sequence numbers may have holes: a rolled-back append consumes them.
    seqs_without_holes = False
    transactions = True
    # The secret s3cret wherever a URL carries one; none of these opens (so
    # that no schema is left behind), each fails its own way.
    store_urls = (
        # Nothing listens on port 1: the connection is refused at once.
        "postgresql://trioflow:s3cret@127.0.0.1:1/test?connect_timeout=1",
        "postgresql://trioflow@127.0.0.1:1/test?password=s3cret&connect_timeout=1&schema=orders",
        "postgres://trioflow@127.0.0.1:1/test?sslpassword=s3cret&sslmode=require"
        "&sslkey=client.key&connect_timeout=1&cursor_durability=unlogged",
        # The test server, which logs in (or refuses the password) and finds
        # no such database.
        f"postgresql://{_USER}:s3cret@{_MISSING}",
        f"postgresql://{_USER}@{_MISSING}&password=s3cret&sslpassword=s3cret&sslmode=disable",
    )

    @pytest.fixture(autouse=True)
    def _server(self, make_url: Callable[..., str], new_schema: Callable[[], str]) -> None:
        self.make_url = make_url
        self.new_schema = new_schema

    def _store(self, schema: str) -> PostgresStore:
        # Small pools: the property test opens a store per example.
        url = self.make_url(schema=schema, poll_interval=0.2, pool_max_size=4)
        return _OwnTablesStore.from_url(url)

    @contextlib.asynccontextmanager
    async def open_store(self) -> AsyncIterator[Store]:
        store = self._store(self.new_schema())
        async with store.open():
            yield store

    @contextlib.asynccontextmanager
    async def open_peer(self, store: Store) -> AsyncIterator[Store]:
        assert isinstance(store, PostgresStore)
        peer = self._store(store.schema)
        async with peer.open():
            yield peer
