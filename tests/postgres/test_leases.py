"""Leases on PostgreSQL: the database's clock, and fenced writes that no claim slips between.

The contract suite races fenced writes against claims; these tests take the
race apart instead. Another connection holds one side's transaction open at
the point that matters (a claim that gave the key a new token, or a fenced
write that checked the token and wrote), and the test watches the other side
wait for it in ``pg_locks``: the fenced write is then refused, or the claim
comes after it, never the other way round.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Literal

import pytest
import trio

from trioflow._errors import LeaseLostError
from trioflow.stores.postgres import PostgresStore
from trioflow.stores.postgres._driver import Driver, Transaction
from trioflow.stores.postgres._sql import LETTER_COLUMNS
from trioflow.testing._store_contract import make_events, make_letter

#: The writes a lease fences: cursor commits in each durability (unlogged
#: with its logged checkpoint) and dead letters.
Write = Literal["sync", "async", "unlogged", "dead letter"]
WRITES: list[Write] = ["sync", "async", "unlogged", "dead letter"]


@asynccontextmanager
async def open_stores(
    make_url: Callable[..., str], schema: str, write: Write
) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """A store and a peer on one schema; every unlogged commit writes its checkpoint too."""
    durability = "sync" if write == "dead letter" else write
    url = make_url(schema=schema, cursor_durability=durability, cursor_checkpoint_interval=1e-9)
    store, peer = PostgresStore.from_url(url), PostgresStore.from_url(url)
    async with store.open(), peer.open():
        yield store, peer


@asynccontextmanager
async def holding(admin: Driver) -> AsyncIterator[tuple[Transaction, int]]:
    """A transaction of another connection, open for the block, and its server process id."""
    async with admin.transaction() as tx:
        yield tx, await tx.fetchval("SELECT pg_backend_pid()")


async def wait_blocked_by(admin: Driver, pid: int) -> None:
    """Return once a statement of another session waits for a lock that ``pid`` holds."""
    query = "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid)))"
    with trio.fail_after(10):
        while True:
            if await admin.fetchval(query, pid):
                return
            await trio.sleep(0.01)


async def write_fenced(store: PostgresStore, write: Write, seq: int, token: int) -> bool:
    """Make the fenced write ``write`` for consumer ``a``; whether it landed."""
    if write == "dead letter":
        try:
            await store.record_dead_letter(make_letter("a", seq), cursor=seq, fence=token)
        except LeaseLostError as exc:
            assert exc.keys == {"a"}
            return False
        return True
    return "a" not in await store.commit_cursors({"a": seq}, fences={"a": token})


async def write_fenced_in(
    tx: Transaction, store: PostgresStore, write: Write, seq: int, token: int
) -> bool:
    """`write_fenced`, by the store's own statement in ``tx``; whether it held."""
    if write == "dead letter":
        letter = make_letter("a", seq)
        args = [getattr(letter, column) for column in LETTER_COLUMNS]
        held: bool = await tx.fetchval(
            store._sql.record_dead_letter(fenced=True), *args, seq, token
        )
        return held
    checkpoint = write == "unlogged"
    due = [["a"], [seq]] if checkpoint else []
    statement = store._sql.commit_cursors(write, checkpoint=checkpoint, fenced=True)
    return not await tx.fetch(statement, ["a"], [seq], *due, ["a"], [token])


async def lapsed_lease(store: PostgresStore) -> int:
    """A lease on ``a`` that holder ``old`` took, wrote under and released; its token.

    The log gets five events first, for the dead letters' sake.
    """
    await store.append(make_events(5))
    (lease,) = await store.claim_leases("old", ["a"], 3600.0)
    assert await write_fenced(store, "sync", 1, lease.token)
    await store.release_leases("old", ["a"])
    assert await store.leases() == []
    return lease.token


@pytest.mark.parametrize("write", WRITES)
async def test_a_fenced_write_waits_for_a_claim_in_flight_and_is_refused(
    make_url: Callable[..., str], schema: str, admin: Driver, write: Write
) -> None:
    async with open_stores(make_url, schema, write) as (store, peer):
        token = await lapsed_lease(store)
        # The lease lapsed, but nobody has claimed it: the old token still holds.
        landed: list[bool] = []

        async def write_old() -> None:
            landed.append(await write_fenced(store, write, 5, token))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery, holding(admin) as (claim, pid):
                (row,) = await claim.fetch(
                    f'SELECT * FROM "{schema}".claim_leases($1, $2, $3)', "new", ["a"], 3600.0
                )
                assert (row[1], row[2]) == ("new", token + 1)
                nursery.start_soon(write_old)
                # Checked now, the old token would still hold: the write
                # waits on the lease row instead, until the claim commits.
                await wait_blocked_by(admin, pid)
                assert landed == []
        assert landed == [False]
        assert await peer.load_cursors() == {"a": 1}
        assert await peer.dead_letters() == []
        assert [(x.holder, x.token) for x in await peer.leases()] == [("new", token + 1)]


@pytest.mark.parametrize("write", WRITES)
async def test_a_claim_waits_for_a_fenced_write_in_flight(
    make_url: Callable[..., str], schema: str, admin: Driver, write: Write
) -> None:
    async with open_stores(make_url, schema, write) as (store, peer):
        token = await lapsed_lease(store)
        claimed: list[tuple[str, int]] = []

        async def claim() -> None:
            (lease,) = await peer.claim_leases("new", ["a"], 3600.0)
            claimed.append((lease.holder, lease.token))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery, holding(admin) as (tx, pid):
                # The store's own fenced statement, in a transaction held
                # open between its check (and its write) and its commit.
                assert await write_fenced_in(tx, store, write, 5, token)
                nursery.start_soon(claim)
                await wait_blocked_by(admin, pid)
                assert claimed == []
        # The write committed first: the new holder's first load shows it.
        assert claimed == [("new", token + 1)]
        assert (await peer.load_cursors())["a"] == 5
        assert [x.seq for x in await peer.dead_letters()] == ([5] if write == "dead letter" else [])
        assert not await write_fenced(store, write, 6, token)


async def test_lease_times_come_from_the_database_clock(
    store: PostgresStore, admin: Driver
) -> None:
    before = await admin.fetchval("SELECT now()")
    (lease,) = await store.claim_leases("h1", ["a"], 60.0)
    after = await admin.fetchval("SELECT now()")
    minute = datetime.timedelta(minutes=1)
    assert before + minute <= lease.expires_at <= after + minute
    # Lapsed by the database's clock, whatever this host's says.
    await admin.execute(
        f"UPDATE \"{store.schema}\".leases SET expires_at = now() - interval '1 second'"
    )
    assert await store.leases() == []
    (taken,) = await store.claim_leases("h2", ["a"], 60.0)
    assert (taken.holder, taken.token) == ("h2", lease.token + 1)


async def test_forgetting_a_consumer_keeps_its_lease(store: PostgresStore) -> None:
    (lease,) = await store.claim_leases("h1", ["a"], 3600.0)
    await store.commit_cursors({"a": 3}, fences={"a": lease.token})
    await store.forget_consumer("a")
    assert await store.leases() == [lease]
    await store.release_leases("h1", ["a"])
    (again,) = await store.claim_leases("h2", ["a"], 3600.0)
    assert again.token == lease.token + 1
