"""Gap-free order with many producers: a tailing reader never skips an event.

Each producer is a store of its own (its own pool, so its own connections),
standing for a process of its own. The ``_before_commit`` hook holds a batch
between its insert and its commit, which is where a plain sequence-numbered
insert lets a later batch become visible first.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trioflow import StoreError
from trioflow._events import Event, NewEvent
from trioflow.stores.postgres import PostgresStore
from trioflow.stores.postgres._driver import Driver
from trioflow.testing._store_contract import make_events, read_all


async def test_control_plain_sequence_inserts_can_be_skipped(admin: Driver, schema: str) -> None:
    """Why the store needs its lock: without it a tailing reader skips an event forever."""
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    table = f'"{schema}".plain'
    await admin.execute(f"CREATE TABLE {table} (seq bigserial PRIMARY KEY, n int)")
    async with admin.transaction() as slow:
        await slow.execute(f"INSERT INTO {table} (n) VALUES (1)")  # takes seq 1, not committed
        await admin.execute(f"INSERT INTO {table} (n) VALUES (2)")  # seq 2, committed
        seen = [row[0] for row in await admin.fetch(f"SELECT seq FROM {table} WHERE seq > 0")]
        assert seen == [2]
        cursor = seen[-1]
    # seq 1 is committed now, below the reader's cursor: it will never be read.
    assert await admin.fetch(f"SELECT seq FROM {table} WHERE seq > $1", cursor) == []
    assert await admin.fetchval(f"SELECT count(*) FROM {table}") == 2


async def test_an_uncommitted_batch_holds_back_later_batches(
    make_url: Callable[..., str], schema: str
) -> None:
    url = make_url(schema=schema)
    slow, fast, reader = (PostgresStore.from_url(url) for _ in range(3))
    inserted, release = trio.Event(), trio.Event()

    async def hold() -> None:
        inserted.set()
        await release.wait()

    slow._before_commit = hold
    slow_batch, fast_batch = make_events(3), make_events(2)
    fast_done = trio.Event()

    async def append_fast() -> None:
        await fast.append(fast_batch)
        fast_done.set()

    async with slow.open(), fast.open(), reader.open():
        await reader.append(make_events(1))
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow.append, slow_batch)
                await inserted.wait()
                nursery.start_soon(append_fast)
                await trio.sleep(0.3)
                # The later batch waits for the earlier one to commit, and
                # readers see neither yet.
                assert not fast_done.is_set()
                assert await reader.head() == 1
                assert list(await reader.read(1, 100)) == []
                release.set()
        events = await reader.read(1, 100)
    assert [event.id for event in events] == [new.id for new in slow_batch + fast_batch]
    assert [event.seq for event in events] == [2, 3, 4, 5, 6]


async def test_a_rolled_back_append_leaves_a_hole_nobody_waits_for(
    store: PostgresStore,
) -> None:
    first = await store.append(make_events(2))

    async def fail() -> None:
        raise RuntimeError("rolled back on purpose")

    store._before_commit = fail
    with pytest.raises(RuntimeError, match="on purpose"):
        await store.append(make_events(3))
    store._before_commit = None
    assert await store.head() == 2
    second = await store.append(make_events(2))
    assert second.after == 2
    assert list(second.seqs) == [6, 7]  # 3, 4 and 5 went to the rolled-back batch
    assert [event.seq for event in await read_all(store)] == [*first.seqs, 6, 7]
    with trio.fail_after(5):
        await store.wait_for_append(2)


async def test_a_cancelled_append_releases_the_order_lock(
    make_url: Callable[..., str], schema: str
) -> None:
    url = make_url(schema=schema)
    stuck, other = PostgresStore.from_url(url), PostgresStore.from_url(url)

    async def forever() -> None:
        await trio.sleep_forever()

    stuck._before_commit = forever
    async with stuck.open(), other.open():
        with trio.move_on_after(0.3) as scope:
            await stuck.append(make_events(4))
        assert scope.cancelled_caught
        with trio.fail_after(5):
            appended = await other.append(make_events(1))
        assert [event.seq for event in await read_all(other)] == list(appended.seqs)


@st.composite
def producer_plans(draw: st.DrawFn) -> list[list[tuple[int, float, bool]]]:
    """Per producer: batches of (size, delay before commit, roll back instead)."""
    batch = st.tuples(
        st.integers(min_value=1, max_value=30),
        st.sampled_from([0.0, 0.0, 0.001, 0.005, 0.02]),
        st.integers(min_value=0, max_value=9).map(lambda n: n == 0),  # 1 in 10 rolls back
    )
    producers = draw(st.integers(min_value=2, max_value=5))
    return [draw(st.lists(batch, min_size=1, max_size=6)) for _ in range(producers)]


@settings(
    max_examples=30,
    deadline=None,
    # Fixtures only hand out URLs and schema names: a fresh schema per example.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    plans=producer_plans(),
    hooked=st.lists(st.booleans(), min_size=5, max_size=5),
    read_limits=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=4),
    seed=st.integers(0, 2**32),
)
async def test_concurrent_producers_never_make_a_tail_skip(
    make_url: Callable[..., str],
    new_schema: Callable[[], str],
    plans: list[list[tuple[int, float, bool]]],
    hooked: list[bool],
    read_limits: list[int],
    seed: int,
) -> None:
    rng = random.Random(seed)
    url = make_url(schema=new_schema(), pool_max_size=2, poll_interval=0.05)
    reader = PostgresStore.from_url(url)
    producers = [PostgresStore.from_url(url) for _ in plans]
    committed: list[list[tuple[list[int], list[NewEvent]]]] = [[] for _ in plans]
    rolled_back: list[NewEvent] = []
    tailed: list[Event] = []
    done = trio.Event()

    async def produce(index: int) -> None:
        store = producers[index]
        for size, delay, roll_back in plans[index]:
            batch = make_events(size, f"p{index}")

            async def before_commit(delay: float = delay, roll_back: bool = roll_back) -> None:
                await trio.sleep(delay)
                if roll_back:
                    raise StoreError("rolled back by the test")

            # Some producers commit in one statement (the production path),
            # others through the hook's explicit transaction.
            store._before_commit = before_commit if hooked[index] or roll_back else None
            await trio.sleep(rng.random() * 0.003)
            try:
                appended = await store.append(batch)
            except StoreError:
                assert roll_back
                rolled_back.extend(batch)
            else:
                assert not roll_back
                committed[index].append((list(appended.seqs), batch))

    async def tail() -> None:
        position = 0
        turn = 0
        while True:
            limit = read_limits[turn % len(read_limits)]
            turn += 1
            events = await reader.read(position, limit)
            if events:
                tailed.extend(events)
                position = events[-1].seq
                continue
            if done.is_set() and position >= await reader.head():
                return
            with trio.move_on_after(0.02):
                await reader.wait_for_append(position)

    async with contextlib.AsyncExitStack() as stack:
        for store in (reader, *producers):
            await stack.enter_async_context(store.open())
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tail)
                async with trio.open_nursery() as writers:
                    for index in range(len(plans)):
                        writers.start_soon(produce, index)
                done.set()
        log = await read_all(reader)

    seqs = [event.seq for event in tailed]
    assert seqs == sorted(set(seqs)), "the tail saw seqs out of order or twice"
    assert tailed == log, "the tail missed events that are in the log"
    expected_ids = {new.id for batches in committed for _, batch in batches for new in batch}
    assert {event.id for event in tailed} == expected_ids
    assert not {new.id for new in rolled_back} & expected_ids
    for batches in committed:
        own = [seq for batch_seqs, _ in batches for seq in batch_seqs]
        assert own == sorted(own)
    by_seq = {event.seq: event.id for event in log}
    for batches in committed:
        for batch_seqs, batch in batches:
            assert [by_seq[seq] for seq in batch_seqs] == [new.id for new in batch]
