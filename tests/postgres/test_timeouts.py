"""A statement that runs past command_timeout says which operation, how long, and why.

The server is up throughout: another transaction holds a lock the store's
statement waits for, as a long migration or a forgotten ``BEGIN`` in psql
does. The error must not send anyone looking for a server that cannot be
reached.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio

from trioflow import OutcomeUnknownError, StoreError, StoreUnavailableError
from trioflow.stores.postgres import PostgresStore
from trioflow.stores.postgres._driver import Driver
from trioflow.testing._store_contract import make_events, make_letter

#: The store's command_timeout in these tests, in seconds.
LIMIT = 0.5


@asynccontextmanager
async def holding(admin: Driver, *statements: str) -> AsyncIterator[None]:
    """Run ``statements`` in a transaction of another connection, open for the block."""
    async with admin.transaction() as tx:
        for statement in statements:
            await tx.execute(statement)
        yield


def assert_says_what_timed_out(error: BaseException, operation: str) -> None:
    text = str(error)
    assert operation in text, text
    assert f"within {LIMIT:g}s (the store's command_timeout)" in text, text
    assert "pg_stat_activity" in text, text
    assert "pg_locks" in text, text
    assert "lock" in text, text
    # The server was reachable all along.
    assert "did not answer" not in text, text
    assert "reach" not in text, text
    assert "lost the connection" not in text, text


@pytest.fixture
async def timed_store(make_url: Callable[..., str], schema: str) -> AsyncIterator[PostgresStore]:
    store = PostgresStore.from_url(make_url(schema=schema, command_timeout=LIMIT))
    async with store.open():
        yield store


async def test_a_read_blocked_by_a_lock(timed_store: PostgresStore, admin: Driver) -> None:
    await timed_store.append(make_events(3))
    events = f'"{timed_store.schema}".events'
    async with holding(admin, f"LOCK TABLE {events} IN ACCESS EXCLUSIVE MODE"):
        with trio.fail_after(10), pytest.raises(StoreError) as info:
            await timed_store.read(1, 10)
    assert_says_what_timed_out(info.value, "reading events after seq 1")
    assert len(await timed_store.read(1, 10)) == 2


async def test_a_cursor_commit_blocked_by_a_row_lock(
    timed_store: PostgresStore, admin: Driver
) -> None:
    await timed_store.append(make_events(7))
    await timed_store.commit_cursors({"billing": 1})
    cursors = f'"{timed_store.schema}".cursors'
    async with holding(admin, f"SELECT * FROM {cursors} WHERE consumer = 'billing' FOR UPDATE"):
        with trio.fail_after(10), pytest.raises(StoreError) as info:
            await timed_store.commit_cursors({"billing": 5, "shipping": 2})
    assert_says_what_timed_out(info.value, "committing the cursors of 2 consumer(s)")
    await timed_store.commit_cursors({"billing": 7})
    assert await timed_store.load_cursors() == {"billing": 7}


async def test_dead_letter_calls_blocked_by_a_lock_say_which(
    timed_store: PostgresStore, admin: Driver
) -> None:
    await timed_store.record_dead_letter(make_letter("billing", 1), cursor=1)
    letters = f'"{timed_store.schema}".dead_letters'
    store = timed_store
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "recording the dead letter of consumer 'billing' at seq 2": lambda: (
            store.record_dead_letter(make_letter("billing", 2), cursor=2)
        ),
        "listing the dead letters": lambda: store.dead_letters(),
        "listing the dead letters of consumer 'billing'": lambda: store.dead_letters("billing"),
        "requeueing dead letters of consumer 'billing'": lambda: store.requeue_dead_letters(
            "billing", [1]
        ),
        "looking for due dead letters of consumer 'billing'": lambda: store.due_dead_letters(
            "billing"
        ),
        "discarding dead letters of consumer 'billing'": lambda: store.discard_dead_letters(
            "billing", [1]
        ),
        "forgetting consumer 'billing'": lambda: store.forget_consumer("billing"),
    }
    async with holding(admin, f"LOCK TABLE {letters} IN ACCESS EXCLUSIVE MODE"):
        for operation, call in calls.items():
            with trio.fail_after(10), pytest.raises(StoreError) as info:
                await call()
            assert_says_what_timed_out(info.value, operation)
    # None of them happened: not the letter's cursor either.
    assert await timed_store.load_cursors() == {"billing": 1}
    assert [letter.seq for letter in await timed_store.dead_letters()] == [1]


async def test_an_append_blocked_by_a_lock_is_checked_and_said_not_committed(
    timed_store: PostgresStore, admin: Driver
) -> None:
    await timed_store.append(make_events(2))
    events = f'"{timed_store.schema}".events'
    # SHARE mode stops inserts, not reads: the store can check what happened.
    async with holding(admin, f"LOCK TABLE {events} IN SHARE MODE"):
        with trio.fail_after(10), pytest.raises(StoreUnavailableError) as info:
            await timed_store.append(make_events(3))
    assert not isinstance(info.value, OutcomeUnknownError)
    assert_says_what_timed_out(info.value, "appending 3 event(s)")
    assert "not committed, nothing was persisted, and retrying is safe" in str(info.value)
    assert await timed_store.head() == 2
    # Its numbers are a hole now; the next append goes on after it.
    assert (await timed_store.append(make_events(1))).after == 2


async def test_an_append_that_cannot_be_checked_says_its_outcome_is_unknown(
    make_url: Callable[..., str], schema: str, admin: Driver
) -> None:
    store = PostgresStore.from_url(
        make_url(schema=schema, command_timeout=LIMIT, connect_timeout=2 * LIMIT)
    )
    async with store.open():
        events = f'"{store.schema}".events'
        # ACCESS EXCLUSIVE stops the check's read too, until connect_timeout.
        async with holding(admin, f"LOCK TABLE {events} IN ACCESS EXCLUSIVE MODE"):
            with trio.fail_after(10), pytest.raises(OutcomeUnknownError) as info:
                await store.append(make_events(3))
        assert_says_what_timed_out(info.value, "appending 3 event(s)")
        assert "ran past command_timeout" in str(info.value)
        assert "look for event id" in str(info.value)
        assert await store.head() == 0


async def test_lease_calls_blocked_by_a_lock_say_which(
    timed_store: PostgresStore, admin: Driver
) -> None:
    (lease,) = await timed_store.claim_leases("web-1", ["billing"], 3600.0)
    leases = f'"{timed_store.schema}".leases'
    store = timed_store
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "claiming the leases of 2 consumer(s) for holder 'web-2'": lambda: store.claim_leases(
            "web-2", ["billing", "audit"], 60.0
        ),
        "releasing the leases of 1 consumer(s) of holder 'web-1'": lambda: store.release_leases(
            "web-1", ["billing"]
        ),
        "committing the cursors of 1 consumer(s)": lambda: store.commit_cursors(
            {"billing": 3}, fences={"billing": lease.token}
        ),
    }
    # A row lock, as a claim in flight holds: claims, releases and fenced
    # writes all wait for it.
    async with holding(admin, f"SELECT * FROM {leases} WHERE key = 'billing' FOR UPDATE"):
        for operation, call in calls.items():
            with trio.fail_after(10), pytest.raises(StoreError) as info:
                await call()
            assert_says_what_timed_out(info.value, operation)
    # None of them happened.
    assert await timed_store.leases() == [lease]
    assert await timed_store.load_cursors() == {}
