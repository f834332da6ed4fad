"""The store contract, run on the built-in stores that need no server."""

from __future__ import annotations

import contextlib
import itertools
import pathlib
from collections.abc import AsyncIterator
from typing import ClassVar

import pytest

from trioflow.stores import Store
from trioflow.stores.memory import MemoryStore
from trioflow.stores.sqlite import SQLiteStore
from trioflow.testing import StoreContract


class TestMemoryStore(StoreContract):
    persistent = False
    seqs_without_holes = True
    store_urls = ("memory://",)
    #: The class of the stores opened (tests/_mutant_stores.py runs broken ones).
    store_class: ClassVar[type[MemoryStore]] = MemoryStore

    @contextlib.asynccontextmanager
    async def open_store(self) -> AsyncIterator[Store]:
        store = self.store_class()
        async with store.open():
            yield store

    @contextlib.asynccontextmanager
    async def open_peer(self, store: Store) -> AsyncIterator[Store]:
        # Flows sharing one MemoryStore instance stand for processes sharing a database.
        async with store.open():
            yield store


class TestSQLiteStore(StoreContract):
    seqs_without_holes = True
    transactions = True
    store_urls = (
        "sqlite:///events.db",
        "sqlite:////var/lib/app/events.db?synchronous=normal&poll_interval=0.05",
        "sqlite:///dir%20with%20space/e.db?busy_timeout=2",
    )

    @pytest.fixture(autouse=True)
    def _directory(self, tmp_path: pathlib.Path) -> None:
        self.directory = tmp_path
        self.files = itertools.count()

    @contextlib.asynccontextmanager
    async def open_store(self) -> AsyncIterator[Store]:
        # A short poll interval keeps the waiting tests quick.
        store = SQLiteStore(self.directory / f"store-{next(self.files)}.db", poll_interval=0.02)
        async with store.open():
            yield store

    @contextlib.asynccontextmanager
    async def open_peer(self, store: Store) -> AsyncIterator[Store]:
        assert isinstance(store, SQLiteStore)
        peer = SQLiteStore(store.path, poll_interval=0.02)
        async with peer.open():
            yield peer
