"""`PostgresStore.schema_status`: the schema's version read without changing anything."""

from __future__ import annotations

import pytest

from tests.postgres._server import with_options
from trioflow import StoreUnavailableError
from trioflow.stores import SchemaStatus
from trioflow.stores.postgres import SCHEMA_VERSION, PostgresStore
from trioflow.stores.postgres._driver import Driver


async def test_schema_status_reads_the_version_and_creates_nothing(
    store_url: str, schema: str, admin: Driver
) -> None:
    store = PostgresStore.from_url(store_url)
    before = await store.schema_status()
    assert before == SchemaStatus(stored=None, current=SCHEMA_VERSION)
    assert before.pending
    exists = "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = $1)"
    assert not await admin.fetchval(exists, schema)
    async with store.open():
        # Also while the store is open: on a connection of its own.
        assert await store.schema_status() == SchemaStatus(
            stored=SCHEMA_VERSION, current=SCHEMA_VERSION
        )
    await admin.execute(f'UPDATE "{schema}".schema_version SET version = {SCHEMA_VERSION - 1}')
    older = await store.schema_status()
    assert (older.stored, older.pending) == (SCHEMA_VERSION - 1, True)
    await admin.execute(f'UPDATE "{schema}".schema_version SET version = 99')
    newer = await store.schema_status()
    assert (newer.stored, newer.pending) == (99, False)


async def test_schema_status_of_an_unreachable_server_is_unavailable(pg_url: str) -> None:
    store = PostgresStore.from_url(with_options(pg_url.replace(":5432", ":1"), connect_timeout=2))
    with pytest.raises(StoreUnavailableError):
        await store.schema_status()
