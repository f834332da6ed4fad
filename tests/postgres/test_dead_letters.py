"""Dead letters on PostgreSQL beyond the contract: durability modes, the clock, a server crash.

A dead letter and the cursor past it must survive together whatever
``cursor_durability`` says: the letter's cursor goes to the logged table, and
the statement commits with the server's ``synchronous_commit``. Due times come
from the database's clock.
"""

from __future__ import annotations

import datetime
import types
import uuid
from collections.abc import Callable

import pytest

from tests.postgres._cluster import Cluster
from trioflow.stores.postgres import PostgresStore, _store
from trioflow.stores.postgres._driver import Driver
from trioflow.testing._store_contract import make_events, make_letter


async def cursors_in(admin: Driver, schema: str, table: str) -> dict[str, int]:
    rows = await admin.fetch(f'SELECT consumer, seq FROM "{schema}".{table}')
    return {row[0]: row[1] for row in rows}


@pytest.mark.parametrize("durability", ["sync", "async", "unlogged"])
async def test_a_dead_letters_cursor_goes_to_the_logged_table(
    make_url: Callable[..., str], schema: str, admin: Driver, durability: str
) -> None:
    # No checkpoint due after the first commit: unlogged commits stay unlogged.
    url = make_url(schema=schema, cursor_durability=durability, cursor_checkpoint_interval=3600)
    store = PostgresStore.from_url(url)
    async with store.open():
        await store.append(make_events(9))
        await store.commit_cursors({"a": 2})
        await store.commit_cursors({"a": 4})
        await store.record_dead_letter(make_letter("a", 6), cursor=6)
        assert (await cursors_in(admin, schema, "cursors"))["a"] == 6
        # What a server crash does to the unlogged table: the letter keeps its cursor.
        await admin.execute(f'TRUNCATE "{schema}".cursors_unlogged')
        assert await store.load_cursors() == {"a": 6}
        assert [letter.seq for letter in await store.dead_letters()] == [6]
        await store.commit_cursors({"a": 8})
        assert await store.load_cursors() == {"a": 8}
        # A requeued letter that failed again leaves the cursor where it is.
        logged = await cursors_in(admin, schema, "cursors")
        await store.record_dead_letter(make_letter("a", 6), cursor=None)
        assert await cursors_in(admin, schema, "cursors") == logged
        assert await store.load_cursors() == {"a": 8}


async def test_forget_consumer_deletes_both_copies_of_an_unlogged_cursor(
    make_url: Callable[..., str], schema: str, admin: Driver
) -> None:
    url = make_url(schema=schema, cursor_durability="unlogged", cursor_checkpoint_interval=3600)
    store = PostgresStore.from_url(url)
    async with store.open():
        await store.append(make_events(9))
        await store.commit_cursors({"a": 5, "b": 5})  # the logged checkpoints
        await store.commit_cursors({"a": 7})  # unlogged only
        await store.record_dead_letter(make_letter("a", 8), cursor=8)
        await store.forget_consumer("a")
        for table in ("cursors", "cursors_unlogged"):
            assert await cursors_in(admin, schema, table) == {"b": 5}, table
        assert await store.dead_letters() == []
        # Back again, its first commit is a logged checkpoint, below the old cursor.
        await store.commit_cursors({"a": 1})
        assert (await cursors_in(admin, schema, "cursors"))["a"] == 1
        await admin.execute(f'TRUNCATE "{schema}".cursors_unlogged')
        assert await store.load_cursors() == {"a": 1, "b": 5}


class _TenYearsBehind(datetime.datetime):
    """This process's clock, gone ten years wrong."""

    @classmethod
    def now(cls, tz: datetime.tzinfo | None = None) -> _TenYearsBehind:
        return super().now(tz) - datetime.timedelta(days=3652)


async def test_due_times_come_from_the_database_clock(
    store: PostgresStore, admin: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = types.SimpleNamespace(**vars(datetime))
    clock.datetime = _TenYearsBehind
    monkeypatch.setattr(_store, "datetime", clock)
    for seq in (1, 2):
        await store.record_dead_letter(make_letter("a", seq), cursor=seq)
    before = await admin.fetchval("SELECT now()")
    assert await store.requeue_dead_letters("a", [1]) == [1]
    assert await store.requeue_dead_letters("a", [2], after=3600) == [2]
    until = await admin.fetchval("SELECT now()")
    first, second = await store.dead_letters("a")
    hour = datetime.timedelta(hours=1)
    assert first.due_at is not None and before <= first.due_at <= until
    assert second.due_at is not None and before + hour <= second.due_at <= until + hour
    assert [letter.seq for letter in await store.due_dead_letters("a")] == [1]


@pytest.mark.slow
async def test_dead_letters_and_their_cursors_survive_a_server_crash(cluster: Cluster) -> None:
    stores = [
        PostgresStore.from_url(
            cluster.url(
                schema=f"tf_dead_{durability}_{uuid.uuid4().hex[:12]}",
                cursor_durability=durability,
                cursor_checkpoint_interval=3600,
                connect_timeout=5,
                pool_max_size=2,
            )
        )
        for durability in ("async", "unlogged")
    ]
    async with stores[0].open(), stores[1].open():
        for store in stores:
            await store.append(make_events(60))
            await store.commit_cursors({"a": 1})
            for seq in range(2, 51):
                # Cursor commits that a crash may lose, between letters it may not.
                await store.commit_cursors({"a": seq - 1})
                await store.record_dead_letter(make_letter("a", seq), cursor=seq)
        # At once: an asynchronous commit would still be in the WAL buffers.
        await cluster.stop("immediate")
    await cluster.start()
    for store in stores:
        async with store.open():
            where = f"cursor_durability={store.cursor_durability}"
            letters = [letter.seq for letter in await store.dead_letters("a")]
            assert letters == list(range(2, 51)), where
            assert await store.load_cursors() == {"a": 50}, where
