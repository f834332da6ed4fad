"""`Store.schema_status` of the SQLite and memory stores: read, never write."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from trioflow import StoreUnavailableError
from trioflow.stores import SchemaStatus
from trioflow.stores.memory import MemoryStore
from trioflow.stores.sqlite import SQLiteStore
from trioflow.stores.sqlite._schema import SCHEMA_VERSION


async def test_sqlite_schema_status_reads_the_file_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    store = SQLiteStore(path)
    assert await store.schema_status() == SchemaStatus(stored=None, current=SCHEMA_VERSION)
    assert not path.exists()
    async with store.open():
        status = await store.schema_status()
        assert (status.stored, status.pending) == (SCHEMA_VERSION, False)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE trioflow_schema SET version = 2")
    assert (await store.schema_status()).pending
    with sqlite3.connect(path) as db:
        db.execute("UPDATE trioflow_schema SET version = 99")
    newer = await store.schema_status()
    assert (newer.stored, newer.pending) == (99, False)


async def test_sqlite_schema_status_of_a_file_without_trioflow_tables(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (x)")
    status = await SQLiteStore(path).schema_status()
    assert (status.stored, status.pending) == (None, True)


async def test_sqlite_schema_status_of_a_file_that_is_no_database(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(StoreUnavailableError, match="reading the schema version"):
        await SQLiteStore(path).schema_status()


async def test_a_memory_store_keeps_no_schema() -> None:
    assert await MemoryStore().schema_status() is None
