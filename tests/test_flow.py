"""The runtime's guarantees, on the in-memory store, with deterministic time."""

from __future__ import annotations

import gc
import itertools
import logging
import math
import pathlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import pytest
import trio
import trio.testing

import trioflow
from trioflow.stores import Store, store_from_url
from trioflow.stores.memory import MemoryStore
from trioflow.testing._faults import FaultyStore
from trioflow.testing._store_contract import nested


def make_app(store: Store | None = None, **options: object) -> trioflow.App:
    return trioflow.App(MemoryStore() if store is None else store, **options)  # type: ignore[arg-type]


def recorder(app: trioflow.App, name: str, **options: object) -> list[int]:
    seen: list[int] = []

    @app.consumer(name, **options)  # type: ignore[call-overload, untyped-decorator]
    async def handle(event: trioflow.Event) -> None:
        seen.append(event.seq)

    return seen


async def test_every_consumer_sees_every_event_in_order() -> None:
    app = make_app()
    seen = [recorder(app, f"c{i}") for i in range(3)]
    async with trioflow.open_flow(app) as flow:
        first = await flow.publish("a", {"n": 0})
        rest = await flow.publish_many([("a", {"n": i}) for i in range(1, 50)])
        await flow.wait_idle()
    assert [first, *rest] == list(range(1, 51))
    for consumer_seen in seen:
        assert consumer_seen == list(range(1, 51))


async def test_event_fields_live_equal_replay() -> None:
    store = MemoryStore()
    live: list[trioflow.Event] = []
    app = make_app(store)

    @app.consumer("live")
    async def on_live(event: trioflow.Event) -> None:
        live.append(event)

    async with trioflow.open_flow(app) as flow:
        await flow.publish("order.created", {"id": 1, "items": (1, 2), "name": "é"}, key="c-7")
        await flow.wait_idle()
    replayed = list(await store.read(0, 10))
    assert live == replayed
    (event,) = live
    assert event.data == {"id": 1, "items": [1, 2], "name": "é"}
    assert event.key == "c-7"
    assert event.type == "order.created"
    assert event.created_at.utcoffset() is not None


async def test_type_filter_delivers_only_its_types_and_moves_the_cursor() -> None:
    app = make_app()
    only_paid = recorder(app, "paid", types={"order.paid"})
    async with trioflow.open_flow(app) as flow:
        await flow.publish_many(
            [("order.created", 1), ("order.paid", 2), ("order.created", 3), ("order.paid", 4)]
        )
        await flow.publish("order.created", 5)
        await flow.wait_idle()
        assert flow.statistics().consumers["paid"].cursor == 5
    assert only_paid == [2, 4]


async def test_new_consumer_replays_history_or_starts_at_latest() -> None:
    store = MemoryStore()
    first = make_app(store)
    async with trioflow.open_flow(first) as flow:
        await flow.publish_many([("a", i) for i in range(5)])

    second = make_app(store)
    earliest = recorder(second, "earliest")
    latest = recorder(second, "latest", start="latest")
    async with trioflow.open_flow(second) as flow:
        await flow.publish("a", 5)
        await flow.wait_idle()
    assert earliest == [1, 2, 3, 4, 5, 6]
    assert latest == [6]


async def test_consumers_resume_from_their_cursors_without_duplicates() -> None:
    store = MemoryStore()
    seen: list[int] = []
    for round_ in range(3):
        app = make_app(store)

        @app.consumer("c")
        async def handle(event: trioflow.Event) -> None:
            seen.append(event.seq)

        async with trioflow.open_flow(app) as flow:
            await flow.publish_many([("a", round_)] * 10)
            await flow.wait_idle()
    assert seen == list(range(1, 31))


async def test_a_failing_handler_is_retried_in_place(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()
    other = recorder(app, "other")
    attempts: list[int] = []

    @app.consumer("flaky")
    async def flaky(event: trioflow.Event) -> None:
        attempts.append(event.seq)
        if event.seq == 3 and attempts.count(3) < 3:
            raise RuntimeError("boom")

    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", i) for i in range(5)])
        await flow.wait_idle()
        stats = flow.statistics().consumers["flaky"]
    assert attempts == [1, 2, 3, 3, 3, 4, 5]
    assert other == [1, 2, 3, 4, 5]
    # Retried in the same incarnation: no restart, nothing read again.
    assert (stats.failures, stats.restarts, stats.processed, stats.cursor) == (2, 0, 5, 5)
    assert stats.stall is None
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in failures] == [
        "consumer 'flaky' failed on seq=3 (type 'a'), attempt 1: RuntimeError: boom; "
        "retrying in 0.10s",
        "consumer 'flaky' failed on seq=3 (type 'a'), attempt 2: RuntimeError: boom; "
        "retrying in 0.20s",
    ]
    # The traceback once, then a line per attempt.
    assert failures[0].exc_info is not None
    assert "boom" in str(failures[0].exc_info[1])
    assert failures[1].exc_info is None


async def test_retry_backoff_is_exponential_and_capped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = make_app(retry=trioflow.Retry(initial=1.0, maximum=4.0, multiplier=2.0))
    times: list[float] = []

    @app.consumer("c")
    async def failing(event: trioflow.Event) -> None:
        times.append(trio.current_time())
        if len(times) < 6:
            raise RuntimeError("not yet")

    async with trioflow.open_flow(app) as flow:
        start = trio.current_time()
        await flow.publish("a")
        await flow.wait_idle()
    gaps = [round(b - a, 6) for a, b in zip([start, *times], times, strict=False)][1:]
    assert gaps == [1.0, 2.0, 4.0, 4.0, 4.0]


async def test_backoff_resets_after_success(autojump_clock: trio.testing.MockClock) -> None:
    app = make_app(retry=trioflow.Retry(initial=1.0, maximum=100.0))
    times: dict[int, list[float]] = {}

    @app.consumer("c")
    async def handle(event: trioflow.Event) -> None:
        tries = times.setdefault(event.seq, [])
        tries.append(trio.current_time())
        if len(tries) < 3:
            raise RuntimeError("fail twice per event")

    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", 1), ("a", 2)])
        await flow.wait_idle()
    for tries in times.values():
        assert [round(b - a, 6) for a, b in itertools.pairwise(tries)] == [1.0, 2.0]


async def test_slow_consumer_does_not_hold_back_a_fast_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = make_app()
    fast = recorder(app, "fast")
    slow: list[int] = []

    @app.consumer("slow")
    async def handle_slow(event: trioflow.Event) -> None:
        await trio.sleep(10)
        slow.append(event.seq)

    async with trioflow.open_flow(app) as flow:
        for i in range(20):
            await flow.publish("a", i)
        await trio.testing.wait_all_tasks_blocked()
        # Publishing took no (virtual) time: the publisher never waited for "slow".
        assert trio.current_time() < 10
        assert fast == list(range(1, 21))
        assert len(slow) == 0
        stats = flow.statistics().consumers
        assert stats["slow"].lag == 20
        assert stats["slow"].buffered == 19  # one is in its handler
        await flow.wait_idle()
    assert slow == list(range(1, 21))


@pytest.mark.parametrize("batch", [None, 2])
async def test_handlers_that_never_wait_let_other_tasks_run_between_events(
    autojump_clock: trio.testing.MockClock, batch: int | None
) -> None:
    # Each call spends 0.4 ms of (virtual) CPU time and never checkpoints.
    # However many events one batch holds, the consumer lets the flow's
    # other tasks (the lease keeper, the dispatcher, other consumers) run at
    # least every TIME_SLICE of such handling: between two calls.
    from trioflow._consumer._state import TIME_SLICE

    app = make_app()
    handled: list[int] = []

    if batch is None:

        @app.consumer("busy", commit_every=1000)
        async def busy(event: trioflow.Event) -> None:
            autojump_clock.jump(0.0004)
            handled.append(event.seq)

    else:

        @app.consumer("busy", batch=batch, commit_every=1000)
        async def busy_batches(events: Sequence[trioflow.Event]) -> None:
            autojump_clock.jump(0.0004 * len(events))
            handled.extend(event.seq for event in events)

    seen_while_handling: list[int] = []
    async with trioflow.open_flow(app) as flow:

        async def watch() -> None:
            while len(handled) < 100:
                seen_while_handling.append(len(handled))
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await flow.publish_many([("a", i) for i in range(100)])
        await flow.wait_idle()
    assert handled == list(range(1, 101))
    # The whole batch (40 ms of handling) was not handled in one step: the
    # watcher saw it go by a slice (3 events) at a time. trio runs the tasks
    # ready in each round in either order, so it may miss every other slice.
    per_slice = math.ceil(TIME_SLICE / 0.0004) + (batch or 1) - 1
    steps = sorted(set(seen_while_handling) - {0})
    assert len(steps) >= 100 // (2 * per_slice)
    assert all(b - a <= 2 * per_slice for a, b in itertools.pairwise([0, *steps, 100]))


async def test_bounded_consumer_holds_at_most_its_buffer_and_misses_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = make_app(page_size=7)
    fast = recorder(app, "fast")
    slow: list[int] = []
    most_buffered = 0
    detached_seen = False

    @app.consumer("slow", buffer=10)
    async def handle_slow(event: trioflow.Event) -> None:
        await trio.sleep(1)
        slow.append(event.seq)

    async with trioflow.open_flow(app) as flow:
        for i in range(300):
            await flow.publish_many([("a", 0)] * (1 + i % 3))
            stats = flow.statistics().consumers["slow"]
            most_buffered = max(most_buffered, stats.buffered)
            detached_seen = detached_seen or not stats.attached
            if i % 10 == 0:
                await trio.sleep(1)
        await flow.wait_idle()
        await trio.testing.wait_all_tasks_blocked()
        total = flow.statistics().head
        assert flow.statistics().consumers["slow"].attached
    assert detached_seen
    assert most_buffered <= 10
    assert fast == list(range(1, total + 1))
    assert slow == list(range(1, total + 1))


async def test_a_consumer_bounded_in_bytes_holds_at_most_its_buffer_bytes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = make_app()
    slow: list[int] = []
    most_bytes = 0
    detached_seen = False

    @app.consumer("slow", buffer_bytes=1000)
    async def handle_slow(event: trioflow.Event) -> None:
        await trio.sleep(1)
        slow.append(event.seq)

    # 100 bytes each: a 98-character JSON string.
    async with trioflow.open_flow(app) as flow:
        for i in range(100):
            await flow.publish_many([("a", "x" * 98)] * (1 + i % 3))
            stats = flow.statistics().consumers["slow"]
            most_bytes = max(most_bytes, stats.buffered_bytes)
            detached_seen = detached_seen or not stats.attached
        await flow.wait_idle()
        total = flow.statistics().head
    assert detached_seen
    assert 700 <= most_bytes <= 1000
    assert slow == list(range(1, total + 1))


def test_a_bounded_consumer_is_bounded_in_bytes_by_default() -> None:
    app = make_app()
    app.consumer("counted", buffer=10)(recorder_handler)
    app.consumer("sized", buffer_bytes=5000)(recorder_handler)
    app.consumer("both", buffer=10, buffer_bytes=5000)(recorder_handler)
    app.consumer("unbounded")(recorder_handler)
    specs = app.consumers
    assert specs["counted"].buffer_bytes == 64 * 1024 * 1024
    assert (specs["sized"].buffer, specs["sized"].buffer_bytes) == (None, 5000)
    assert (specs["both"].buffer, specs["both"].buffer_bytes) == (10, 5000)
    assert (specs["unbounded"].buffer, specs["unbounded"].buffer_bytes) == (None, None)
    with pytest.raises(trioflow.ConfigurationError, match="buffer_bytes"):
        app.consumer("bad", buffer_bytes=0)(recorder_handler)


async def recorder_handler(event: trioflow.Event) -> None:
    pass


async def test_idle_bounded_consumer_catches_up_after_a_batch_larger_than_its_buffer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = trioflow.App("memory://")
    seen: list[int] = []

    @app.consumer("bounded", buffer=4)
    async def handle(event: trioflow.Event) -> None:
        seen.append(event.seq)

    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("x", i) for i in range(5)])
        # Virtual time: the consumer needs none, 60 s means it is stuck.
        with trio.fail_after(60):
            await flow.wait_idle()
    assert seen == [1, 2, 3, 4, 5]


@pytest.fixture
def collector_off() -> Iterator[None]:
    """The garbage collector stopped: what is alive then is held, or left in cycles."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.usefixtures("collector_off")
async def test_handled_events_are_freed_at_once_not_kept_or_left_in_cycles(
    tmp_path: pathlib.Path,
) -> None:
    # A store that keeps no Event objects itself (the memory store does).
    app = make_app(store_from_url(f"sqlite:///{tmp_path}/events.db"))
    decoded = 0
    for index in range(4):

        @app.consumer(f"c{index}")
        async def handle(event: trioflow.Event) -> None:
            nonlocal decoded
            decoded += len(event.data["items"])

    def alive() -> int:
        return sum(isinstance(o, trioflow.Event) for o in gc.get_objects())

    async with trioflow.open_flow(app) as flow:
        async with trio.open_nursery() as nursery:
            for n in range(299):
                # Concurrent publishes: group commits fan out batches of several.
                nursery.start_soon(flow.publish, "t", {"n": n, "items": [{"sku": n}]})
                if n % 10 == 9:
                    await trio.lowlevel.checkpoint()
        # Last, one event alone: the batch each consumer's loop may still refer to.
        await flow.publish("t", {"n": 299, "items": [{"sku": 299}]})
        await flow.wait_idle()
        assert decoded == 4 * 300
        # Every other event was freed by reference counting as soon as every
        # consumer had handled it: neither held by the flow nor left in
        # reference cycles for the collector.
        assert alive() <= 1


async def test_the_memory_store_keeps_only_the_latest_events_decoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # It keeps every event the flow fans out, the same objects: past the
    # latest few, their JSON text and not the data a consumer decoded.
    monkeypatch.setattr("trioflow.stores.memory.DECODED_KEPT", 10)
    store = MemoryStore()
    app = make_app(store)

    @app.consumer("reads")
    async def handle(event: trioflow.Event) -> None:
        assert event.data["n"] == event.seq

    async with trioflow.open_flow(app) as flow:
        for n in range(1, 31):
            await flow.publish("t", {"n": n})
        await flow.wait_idle()
    stored = await store.read(0, 30)
    # A kept value is the same object every time; a forgotten one is decoded anew.
    assert [event.data is event.data for event in stored] == [False] * 20 + [True] * 10
    assert [event.data for event in stored] == [{"n": n} for n in range(1, 31)]


async def test_concurrent_publishes_are_group_committed() -> None:
    store = FaultyStore()
    app = make_app(store)
    seqs: list[int] = []

    async def publish_one(flow: trioflow.Flow, i: int) -> None:
        seqs.append(await flow.publish("a", i))

    async with trioflow.open_flow(app) as flow, trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(publish_one, flow, i)
    assert sorted(seqs) == list(range(1, 201))
    assert store.calls["append"] <= 4


async def test_max_batch_bounds_one_transaction() -> None:
    store = FaultyStore()
    app = make_app(store, max_batch=10)

    async with trioflow.open_flow(app) as flow, trio.open_nursery() as nursery:
        for i in range(100):
            nursery.start_soon(flow.publish, "a", i)
    assert store.calls["append"] >= 10


class SlowCursorStore(MemoryStore):
    """Cursor writes take a (virtual) second: consumers run ahead of them."""

    async def commit_cursors(
        self, cursors: Mapping[str, int], *, fences: Mapping[str, int] | None = None
    ) -> frozenset[str]:
        await trio.sleep(1)
        return await super().commit_cursors(cursors, fences=fences)


@pytest.mark.parametrize("commit_every", [1, 2, 5, 100])
@pytest.mark.parametrize("store_class", [MemoryStore, SlowCursorStore])
async def test_cursor_never_lags_more_than_commit_every(
    commit_every: int, store_class: type[MemoryStore], autojump_clock: trio.testing.MockClock
) -> None:
    store = store_class()
    app = make_app(store, commit_every=commit_every)
    lags: list[int] = []

    @app.consumer("c")
    async def handle(event: trioflow.Event) -> None:
        durable = store._cursors["c"]
        # Handled but not yet durable, counting this event: what a crash now
        # would make this consumer handle a second time.
        lags.append(event.seq - durable)

    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", 0)] * 300)
        await flow.wait_idle()
    assert len(lags) == 300
    assert max(lags) <= commit_every
    if store_class is SlowCursorStore:
        # Slow writes push the consumer right up to the bound, not past it.
        assert max(lags) == commit_every


async def test_wait_idle_waits_for_durable_cursors(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    app = make_app(store, commit_every=1000)

    @app.consumer("c")
    async def handle(event: trioflow.Event) -> None:
        await trio.sleep(1)

    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", 0)] * 5)
        await flow.wait_idle()
        assert (await store.load_cursors()) == {"c": 5}
        assert trio.current_time() >= 5


class CursorWriteLog(MemoryStore):
    """Notes the time and the cursors of every cursor write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[float, dict[str, int]]] = []

    async def commit_cursors(
        self, cursors: Mapping[str, int], *, fences: Mapping[str, int] | None = None
    ) -> frozenset[str]:
        self.writes.append((trio.current_time(), dict(cursors)))
        return await super().commit_cursors(cursors, fences=fences)


async def test_an_idle_consumer_commits_within_commit_interval_not_per_event(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = CursorWriteLog()
    app = make_app(store, commit_every=100, commit_interval=1.0)
    seen = recorder(app, "c")

    async with trioflow.open_flow(app) as flow:
        await trio.sleep(5)
        start = trio.current_time()
        store.writes.clear()
        # One event every 0.1 s: the consumer is idle between any two.
        for index in range(25):
            await flow.publish("a", index)
            await trio.sleep(0.1)
        await trio.sleep(1.5)
        assert seen == list(range(1, 26))
        # About one write per commit_interval, not one per event; the last
        # position made durable within commit_interval of going idle.
        assert 2 <= len(store.writes) <= 4, store.writes
        times = [at - start for at, _ in store.writes]
        assert all(later - earlier >= 1.0 for earlier, later in itertools.pairwise(times))
        assert store.writes[-1][1] == {"c": 25}
        assert (await store.load_cursors()) == {"c": 25}


async def test_wait_idle_does_not_wait_out_the_commit_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    app = make_app(store, commit_interval=1000.0)
    recorder(app, "c")
    async with trioflow.open_flow(app) as flow:
        await trio.sleep(1)
        start = trio.current_time()
        await flow.publish("a", 1)
        await trio.testing.wait_all_tasks_blocked()
        await flow.wait_idle()
        assert (await store.load_cursors()) == {"c": 1}
        assert trio.current_time() - start < 1


async def test_two_flows_sharing_a_store_see_each_others_events() -> None:
    store = MemoryStore()
    publisher, reader = make_app(store), make_app(store)
    seen = recorder(reader, "c")
    async with trioflow.open_flow(reader) as reading, trioflow.open_flow(publisher) as writing:
        for i in range(10):
            await writing.publish_many([("a", 0)] * (i + 1))
        await reading.wait_idle()
    assert seen == list(range(1, 56))


class ReadCountingStore(MemoryStore):
    """Counts its reads, and those that found nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = self.empty_reads = 0

    async def read(
        self, after: int, limit: int, *, max_bytes: int | None = None
    ) -> Sequence[trioflow.Event]:
        page = await super().read(after, limit, max_bytes=max_bytes)
        self.reads += 1
        self.empty_reads += not page
        return page


async def test_events_from_another_flow_cost_one_read_per_wake_up() -> None:
    # The watcher asks the dispatcher to read up to the head the store named:
    # the new events, and no read after them that finds nothing.
    store = ReadCountingStore()
    publisher, reader = make_app(store), make_app(store)
    seen = recorder(reader, "c")
    async with trioflow.open_flow(reader) as reading, trioflow.open_flow(publisher) as writing:
        await trio.testing.wait_all_tasks_blocked()
        before = store.reads
        for i in range(10):
            await writing.publish_many([("a", 0)] * (i + 1))
            await trio.testing.wait_all_tasks_blocked()
        reads = store.reads - before
        await reading.wait_idle()
    assert seen == list(range(1, 56))
    assert (reads, store.empty_reads) == (10, 0)


async def test_events_from_elsewhere_interleave_in_order() -> None:
    store = MemoryStore()
    a, b = make_app(store), make_app(store)
    # Consumers of different names: one name runs in one flow at a time.
    seen_a, seen_b = recorder(a, "ca"), recorder(b, "cb")
    async with trioflow.open_flow(a) as flow_a, trioflow.open_flow(b) as flow_b:
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(flow_a.publish, "a", i)
                nursery.start_soon(flow_b.publish, "b", i)
        await flow_a.wait_idle()
        await flow_b.wait_idle()
    assert seen_a == seen_b == list(range(1, 101))


async def test_leaving_the_block_lets_in_flight_handlers_finish(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    app = make_app(store, shutdown_grace=10, commit_every=1000)
    started = trio.Event()
    finished: list[int] = []

    @app.consumer("c")
    async def handle(event: trioflow.Event) -> None:
        started.set()
        await trio.sleep(5)
        finished.append(event.seq)

    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", 0)] * 3)
        await started.wait()
    assert finished == [1]
    assert (await store.load_cursors()) == {"c": 1}


async def test_grace_period_bounds_a_stuck_handler(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    app = make_app(store, shutdown_grace=3)
    started = trio.Event()

    @app.consumer("c")
    async def handle(event: trioflow.Event) -> None:
        if event.seq == 2:
            started.set()
            await trio.sleep_forever()

    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", 1), ("a", 2)])
        await started.wait()
        begin = trio.current_time()
    assert 3 <= trio.current_time() - begin < 10
    assert (await store.load_cursors()) == {"c": 1}


async def test_outside_cancellation_stops_gracefully(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    app = make_app(store, commit_every=1000)
    finished: list[int] = []

    @app.consumer("c")
    async def handle(event: trioflow.Event) -> None:
        await trio.sleep(2)
        finished.append(event.seq)

    with trio.move_on_after(5):
        async with trioflow.open_flow(app) as flow:
            await flow.publish_many([("a", 0)] * 10)
            await trio.sleep_forever()
    assert finished == [1, 2, 3]
    assert (await store.load_cursors()) == {"c": 3}


async def test_serve_hands_back_the_flow_and_stops_on_cancel() -> None:
    store = MemoryStore()
    app = make_app(store)
    seen = recorder(app, "c")
    async with trio.open_nursery() as nursery:
        flow = await nursery.start(trioflow.serve, app)
        await flow.publish("a")
        await flow.wait_idle()
        nursery.cancel_scope.cancel()
    assert seen == [1]
    with pytest.raises(trioflow.FlowClosedError):
        await flow.publish("a")


async def test_publishing_on_a_closed_flow_fails_and_persists_nothing() -> None:
    store = MemoryStore()
    app = make_app(store)
    async with trioflow.open_flow(app) as flow:
        pass
    with pytest.raises(trioflow.FlowClosedError, match="closed"):
        await flow.publish("a")
    with pytest.raises(trioflow.FlowClosedError):
        await flow.publish_many([("a", 1)])
    assert await store.head() == 0


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"when": object()}, "not JSON-serialisable"),
        ({"x": math.nan}, "not JSON-serialisable"),
        ({1: "int key"}, "keys that are not str"),
        ({"nested": [{2: "x"}]}, "keys that are not str"),
        (b"bytes", "not JSON-serialisable"),
        ({"text": "nul \x00 inside"}, "NUL"),
        (["ok", {"nul\x00key": 1}], "NUL"),
        ({"text": "lone \ud800 surrogate"}, "lone surrogate"),
        (nested(trioflow.MAX_DEPTH + 1), f"more than {trioflow.MAX_DEPTH} levels"),
        (nested(990), f"more than {trioflow.MAX_DEPTH} levels"),
        (nested(5000), f"more than {trioflow.MAX_DEPTH} levels"),
        ("x" * (trioflow.MAX_DATA_BYTES - 1), "over the limit"),
        ("é" * (trioflow.MAX_DATA_BYTES // 2), "over the limit"),
    ],
)
async def test_bad_data_is_refused_and_nothing_persisted(data: object, match: str) -> None:
    store = MemoryStore()
    app = make_app(store)
    async with trioflow.open_flow(app) as flow:
        with pytest.raises(trioflow.InvalidEventError, match=match):
            await flow.publish("a", data)
        with pytest.raises(trioflow.InvalidEventError, match=match):
            await flow.publish_many([("a", 1), ("a", data), ("a", 3)])
    assert await store.head() == 0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda f: f.publish("", 1), "event type"),
        (lambda f: f.publish(7, 1), "event type"),
        (lambda f: f.publish("a", 1, key=5), "event key"),
        (lambda f: f.publish("a\x00", 1), "event type"),
        (lambda f: f.publish("a", 1, key="k\x00"), "event key"),
        (lambda f: f.publish("a\udc00", 1), "event type"),
        (lambda f: f.publish("a", 1, key="\ud800"), "event key"),
        (lambda f: f.publish_many(["a"]), r"\(type, data\)"),
        (lambda f: f.publish_many(["abc"]), r"item 0 .* got 'abc'"),
        (lambda f: f.publish_many([("a", 1), {"type": "a"}]), r"item 1 .* got \{'type': 'a'\}"),
        (lambda f: f.publish_many([("a", 1, "k", "extra")]), r"\(type, data\)"),
        (lambda f: f.publish_many(None), "takes an iterable"),
        (lambda f: f.publish_many(7), "takes an iterable"),
        (lambda f: f.publish_many("ab"), "takes an iterable"),
    ],
)
async def test_bad_type_key_or_item_is_refused(
    call: Callable[[trioflow.Flow], object], match: str
) -> None:
    store = MemoryStore()
    async with trioflow.open_flow(make_app(store)) as flow:
        with pytest.raises(trioflow.InvalidEventError, match=match):
            await call(flow)  # type: ignore[misc]
    assert await store.head() == 0


async def test_data_at_the_limits_is_delivered_live_and_on_replay() -> None:
    store = MemoryStore()
    app = make_app(store)
    live = recorder_of_data(app, "c")
    deepest = nested(trioflow.MAX_DEPTH)
    async with trioflow.open_flow(app) as flow:
        await flow.publish("a", deepest)
        await flow.publish("a", "x" * (trioflow.MAX_DATA_BYTES - 2))
        await flow.wait_idle()
    assert live[0] == deepest
    assert live[1] == "x" * (trioflow.MAX_DATA_BYTES - 2)


def recorder_of_data(app: trioflow.App, name: str) -> list[object]:
    seen: list[object] = []

    @app.consumer(name)
    async def handle(event: trioflow.Event) -> None:
        seen.append(event.data)

    return seen


async def test_a_literal_backslash_u0000_is_plain_text() -> None:
    async with trioflow.open_flow(make_app()) as flow:
        assert await flow.publish("a", "\\u0000 is six characters") == 1


async def test_publish_many_of_nothing_returns_nothing() -> None:
    async with trioflow.open_flow(make_app()) as flow:
        assert await flow.publish_many([]) == []


async def test_a_store_failure_fails_the_publish_and_the_flow_carries_on() -> None:
    store = FaultyStore()
    app = make_app(store)
    seen = recorder(app, "c")
    async with trioflow.open_flow(app) as flow:
        store.fail_next("append")
        with pytest.raises(trioflow.StoreUnavailableError):
            await flow.publish("a", "lost?")
        assert await flow.publish("a", "kept") == 1
        await flow.wait_idle()
    assert seen == [1]


async def test_a_consumer_survives_store_read_failures(
    autojump_clock: trio.testing.MockClock,
) -> None:
    inner = MemoryStore()
    async with inner.open():
        first = make_app(inner)
        async with trioflow.open_flow(first) as flow:
            await flow.publish_many([("a", 0)] * 10)
    store = FaultyStore(inner)
    store.fail_next("read", times=3)
    app = make_app(store)
    seen = recorder(app, "c")
    async with trioflow.open_flow(app) as flow:
        await flow.wait_idle()
        assert flow.statistics().consumers["c"].restarts == 3
    assert seen == list(range(1, 11))


async def test_an_app_runs_one_flow_at_a_time() -> None:
    app = make_app()
    async with trioflow.open_flow(app):
        with pytest.raises(trioflow.ConfigurationError, match="already runs"):
            async with trioflow.open_flow(app):
                pass  # pragma: no cover
    async with trioflow.open_flow(app):
        pass


async def test_a_long_replay_reports_its_progress(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trioflow")
    store = MemoryStore()
    async with trioflow.open_flow(make_app(store)) as flow:
        await flow.publish_many([("a", 0)] * 2000)
    app = make_app(store, page_size=10)

    @app.consumer("late")
    async def handle(event: trioflow.Event) -> None:
        await trio.sleep(0.01)

    async with trioflow.open_flow(app) as flow:
        await flow.wait_idle()
    messages = [r.getMessage() for r in caplog.records if "'late'" in r.getMessage()]
    assert messages[0] == "consumer 'late' replaying from 0 (head 2000)"
    progress = [m for m in messages if "replaying: at" in m]
    # 20 virtual seconds of replay, a report every 5.
    assert 3 <= len(progress) <= 4, messages
    assert "of 2000" in progress[0]


class LaggingStore(MemoryStore):
    """Its first reads see nothing, as a lagging replica would."""

    def __init__(self, blind_reads: int) -> None:
        super().__init__()
        self.blind_reads = blind_reads

    async def read(
        self, after: int, limit: int, *, max_bytes: int | None = None
    ) -> Sequence[trioflow.Event]:
        if self.blind_reads > 0 and after < len(self._events):
            self.blind_reads -= 1
            await trio.lowlevel.checkpoint()
            return []
        return await super().read(after, limit, max_bytes=max_bytes)


async def test_a_store_that_hides_committed_events_is_retried_never_skipped(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = LaggingStore(blind_reads=0)
    async with trioflow.open_flow(make_app(store)) as flow:
        await flow.publish_many([("a", 0)] * 10)
    store.blind_reads = 3
    app = make_app(store)
    seen = recorder(app, "c")
    async with trioflow.open_flow(app) as flow:
        await flow.publish("a", 1)
        await flow.wait_idle()
        assert flow.statistics().consumers["c"].restarts == 3
    assert seen == list(range(1, 12))
    assert "returned no events after 0" in caplog.text


class ReadLog(MemoryStore):
    """Notes the (after, limit) of every read."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[int, int]] = []

    async def read(
        self, after: int, limit: int, *, max_bytes: int | None = None
    ) -> Sequence[trioflow.Event]:
        self.reads.append((after, limit))
        return await super().read(after, limit, max_bytes=max_bytes)


async def test_a_replay_reads_small_pages_first_and_doubles_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = ReadLog()
    async with trioflow.open_flow(make_app(store)) as flow:
        await flow.publish_many([("a", i) for i in range(600)])
    app = make_app(store, page_size=100)
    failed: list[int] = []

    @app.consumer("flaky")
    async def flaky(event: trioflow.Event) -> None:
        if event.seq == 40 and not failed:
            failed.append(event.seq)
            raise RuntimeError("boom")

    store.reads.clear()
    async with trioflow.open_flow(app) as flow:
        await flow.wait_idle()
        assert flow.statistics().consumers["flaky"].cursor == 600
    # Start-up replay: 32, 64, then full pages. It fails at seq 40, in the
    # second page; the restart (from its cursor, 39) is served from that page,
    # which is still at hand, and the store never reads an event twice.
    assert store.reads[:3] == [(0, 32), (32, 64), (96, 100)]
    assert all(limit == 100 for _, limit in store.reads[2:])
    afters = [after for after, _ in store.reads]
    assert afters == sorted(set(afters))


class LateCursorWrite(MemoryStore):
    """Its first cursor write after ``hold`` is set lands a second late, whatever happens.

    As a PostgreSQL statement already sent: cancelling the caller does not
    stop it, and another connection's later write may commit before it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hold = False

    async def commit_cursors(
        self, cursors: Mapping[str, int], *, fences: Mapping[str, int] | None = None
    ) -> frozenset[str]:
        if self.hold:
            self.hold = False
            with trio.CancelScope(shield=True):
                await trio.sleep(1)
                return await super().commit_cursors(cursors, fences=fences)
        return await super().commit_cursors(cursors, fences=fences)


async def test_the_final_flush_never_lands_under_an_older_cursor_write(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = LateCursorWrite()
    app = make_app(store, commit_every=4, commit_interval=1000.0)
    seen: list[int] = []
    third = trio.Event()

    @app.consumer("c")
    async def handle(event: trioflow.Event) -> None:
        seen.append(event.seq)
        if event.seq == 3:
            third.set()

    async with trioflow.open_flow(app) as flow:
        await trio.sleep(1)
        store.hold = True
        # Two handled events request a commit of 2, which the store holds;
        # the third stays uncommitted until the flow stops and flushes 3,
        # while the write of 2 is still under way.
        await flow.publish_many([("a", 1), ("a", 2), ("a", 3)])
        await third.wait()
    assert seen == [1, 2, 3]
    assert (await store.load_cursors()) == {"c": 3}

    # Reopened, the consumer has nothing to handle again.
    async with trioflow.open_flow(app) as flow:
        await flow.wait_idle()
    assert seen == [1, 2, 3]


async def test_a_handler_may_publish_while_the_flow_stops(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A chain of handlers each publishing the next step survives graceful stops.

    The handler at work when the flow stops still publishes its next step
    (within the grace period), returns normally, and nothing is handled twice.
    """
    store = MemoryStore()
    handled: list[int] = []
    flows: list[trioflow.Flow] = []
    app = make_app(store)
    last = trio.Event()

    @app.consumer("chain")
    async def step(event: trioflow.Event) -> None:
        handled.append(event.data)
        if event.data == 10:
            last.set()
        await trio.sleep(1)
        if event.data < 10:
            await flows[-1].publish("step", event.data + 1)

    for round in range(4):
        async with trioflow.open_flow(app) as flow:
            flows.append(flow)
            if round == 0:
                await flow.publish("step", 0)
            # Leave the block while a handler is in the middle of a step.
            await trio.sleep(2.5)
            assert flow.statistics().consumers["chain"].failures == 0
    async with trioflow.open_flow(app) as flow:
        flows.append(flow)
        await last.wait()
        await flow.wait_idle()
    assert handled == list(range(11))
    assert "failed" not in caplog.text


async def test_only_handlers_may_publish_while_the_flow_stops(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = make_app()
    refused: list[str] = []
    in_handler = trio.Event()

    @app.consumer("slow")
    async def slow(event: trioflow.Event) -> None:
        in_handler.set()
        await trio.sleep(5)

    async def outsider(flow: trioflow.Flow) -> None:
        await trio.sleep(1)
        try:
            await flow.publish("a", "from outside")
        except trioflow.FlowClosedError as exc:
            refused.append(str(exc))

    async with trio.open_nursery() as nursery, trioflow.open_flow(app) as flow:
        await flow.publish("a", 1)
        await in_handler.wait()
        nursery.start_soon(outsider, flow)
        # The flow stopped while the handler slept: the outsider was refused.
    assert len(refused) == 1


async def test_a_large_publish_many_lets_other_tasks_run_while_it_encodes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import trioflow._events as events_module

    order: list[str] = []
    encode = events_module.encode

    def noting_encode(*args: object) -> object:
        order.append("encode")
        return encode(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(events_module, "encode", noting_encode)
    count = 3 * events_module.ENCODE_CHUNK + 1

    async def ticker() -> None:
        while True:
            order.append("tick")
            await trio.lowlevel.checkpoint()

    async with trioflow.open_flow(make_app()) as flow, trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()
        order.clear()
        assert len(await flow.publish_many([("a", 1)] * count)) == count
        nursery.cancel_scope.cancel()
    encoding = order[order.index("encode") : len(order) - order[::-1].index("encode")]
    # Other tasks ran between the chunks of the batch (trio may run the
    # ticker after the last chunk rather than before it: 4 chunks, >= 2 ticks).
    assert encoding.count("encode") == count
    assert encoding.count("tick") >= 2


async def test_group_commits_of_large_events_stay_within_max_batch_bytes() -> None:
    store = FaultyStore()
    app = make_app(store)
    seen = recorder(app, "c")
    six_mib = "x" * (6 * 1024 * 1024 - 2)
    async with trioflow.open_flow(app) as flow:
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(flow.publish, "a", six_mib)
        await flow.wait_idle()
    # At most two 6 MiB events fit in 16 MiB: three transactions, not one.
    assert store.calls["append"] == 3
    assert seen == [1, 2, 3, 4, 5]
