"""The shared store contract, run on PostgreSQL (one fresh schema per store)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import pytest

from trioflow.stores import Store
from trioflow.stores.postgres import PostgresStore
from trioflow.testing import StoreContract


class TestPostgresStore(StoreContract):
    # Sequence numbers may have holes: a rolled-back append consumes them.
    seqs_without_holes = False

    @pytest.fixture(autouse=True)
    def _server(self, make_url: Callable[..., str], new_schema: Callable[[], str]) -> None:
        self.make_url = make_url
        self.new_schema = new_schema

    def _store(self, schema: str) -> PostgresStore:
        # Small pools: the property test opens a store per example.
        url = self.make_url(schema=schema, poll_interval=0.2, pool_max_size=4)
        return PostgresStore.from_url(url)

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
