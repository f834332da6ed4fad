"""Batch consumers (``batch=``): registration, hand-over, failures, transactions, bounds."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
import trio.testing

import trioflow
from tests._procs import sqlite_url
from tests.test_flow import SlowCursorStore
from trioflow.stores.memory import MemoryStore

Events = Sequence[trioflow.Event]


def seqs(events: Events) -> list[int]:
    return [event.seq for event in events]


def recorder(app: trioflow.App, name: str = "loader", **options: object) -> list[list[int]]:
    calls: list[list[int]] = []

    @app.consumer(name, **options)  # type: ignore[call-overload, untyped-decorator]
    async def load(events: Events) -> None:
        calls.append(seqs(events))

    return calls


# Registration


def test_batch_and_max_wait_are_checked() -> None:
    app = trioflow.App(MemoryStore())

    async def load(events: Events) -> None: ...

    for bad in (0, -1, True, 1.5, "10"):
        with pytest.raises(trioflow.ConfigurationError, match="batch must be an int >= 1"):
            app.consumer("a", batch=bad)(load)  # type: ignore[arg-type]
    for wait in (0, -1.0, float("inf"), "1"):
        with pytest.raises(trioflow.ConfigurationError, match="max_wait must be"):
            app.consumer("a", batch=10, max_wait=wait)(load)  # type: ignore[arg-type]
    with pytest.raises(trioflow.ConfigurationError, match="give it batch= too"):
        app.consumer("a", max_wait=1.0)(load)  # type: ignore[call-overload]
    assert not app.consumers
    app.consumer("a", batch=10, max_wait=0.5)(load)
    spec = app.consumers["a"]
    assert (spec.batch, spec.max_wait, spec.commit_every) == (10, 0.5, 1)
    app.consumer("b", batch=10, commit_every=3)(load)
    assert app.consumers["b"].commit_every == 3


def test_a_handlers_annotation_must_match_batch() -> None:
    app = trioflow.App(MemoryStore())

    async def one(event: trioflow.Event) -> None: ...

    async def many(events: Sequence[trioflow.Event]) -> None: ...

    async def listed(events: list[trioflow.Event]) -> None: ...

    async def two(events: Events, other: int) -> None: ...

    with pytest.raises(trioflow.ConfigurationError, match="annotated to take one Event"):
        app.consumer("a", batch=10)(one)  # type: ignore[type-var]
    with pytest.raises(trioflow.ConfigurationError, match="give its consumer batch="):
        app.consumer("a")(many)  # type: ignore[type-var]
    # A handler annotated to take a list passes the check (mypy asks for Sequence).
    with pytest.raises(trioflow.ConfigurationError, match="must take the sequence of events"):
        app.consumer("a", batch=10)(two)  # type: ignore[type-var]
    app.consumer("b", batch=10)(listed)  # type: ignore[type-var]
    assert app.consumers["b"].batch == 10


def test_a_transactional_batch_consumer_takes_events_and_tx_without_commit_every(
    tmp_path: Path,
) -> None:
    app = trioflow.App(sqlite_url(tmp_path / "events.db"))

    async def project(events: Events, tx: trioflow.Transaction) -> None: ...

    async def alone(events: Events) -> None: ...

    with pytest.raises(trioflow.ConfigurationError, match="commit_every does not apply"):
        app.consumer("a", batch=10, transactional=True, commit_every=5)(project)
    with pytest.raises(trioflow.ConfigurationError, match="take the sequence of events and"):
        app.consumer("a", batch=10, transactional=True)(alone)
    app.consumer("a", batch=10, transactional=True)(project)


def test_batch_error_checks_its_arguments() -> None:
    cause = ValueError("bad row")
    error = trioflow.BatchError(3, cause)
    assert (error.index, error.cause) == (3, cause)
    assert "did 3 event(s)" in str(error) and "ValueError: bad row" in str(error)
    with pytest.raises(TypeError):
        trioflow.BatchError(-1, cause)
    with pytest.raises(TypeError):
        trioflow.BatchError(1, KeyboardInterrupt())  # type: ignore[arg-type]


# Hand-over


async def test_batches_hold_what_is_available_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = trioflow.App(MemoryStore())
    calls = recorder(app, batch=4)
    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", i) for i in range(10)])
        await flow.wait_idle()
        await flow.publish("a", 10)
        await flow.wait_idle()
        stats = flow.statistics().consumers["loader"]
    assert calls == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10], [11]]
    assert (stats.processed, stats.cursor) == (11, 11)


async def test_a_handler_may_keep_or_change_its_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = trioflow.App(MemoryStore())
    kept: list[Events] = []

    @app.consumer("clearing", batch=10)
    async def clear(events: Events) -> None:
        kept.append(events)
        events.clear()  # type: ignore[attr-defined]

    calls = recorder(app, batch=10)
    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", None)] * 25)
        await flow.wait_idle()
    assert calls == [list(range(1, 11)), list(range(11, 21)), list(range(21, 26))]
    assert [list(batch) for batch in kept] == [[], [], []]


async def test_events_waiting_in_the_feed_are_joined_into_one_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = trioflow.App(MemoryStore())
    calls: list[list[int]] = []
    gate = trio.Event()

    @app.consumer("loader", batch=100)
    async def load(events: Events) -> None:
        calls.append(seqs(events))
        await gate.wait()

    async with trioflow.open_flow(app) as flow:
        await flow.publish("a")
        await trio.testing.wait_all_tasks_blocked()
        # Three separate fan-outs wait while the handler holds the first.
        for i in range(3):
            await flow.publish_many([("a", i)] * 2)
        gate.set()
        await flow.wait_idle()
    assert calls == [[1], [2, 3, 4, 5, 6, 7]]


async def test_max_wait_waits_to_fill_a_batch_and_no_longer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = trioflow.App(MemoryStore())
    waiting = recorder(app, "waiting", batch=3, max_wait=1.0)
    eager = recorder(app, "eager", batch=3)
    async with trioflow.open_flow(app) as flow:
        for _ in range(4):
            await flow.publish("a")
            await trio.sleep(0.4)
        await trio.sleep(2)
        await flow.publish("a")
        await flow.wait_idle()
    # Filled within 1 s of the first; then as much as came in 1 s; then alone.
    assert waiting == [[1, 2, 3], [4], [5]]
    assert eager == [[1], [2], [3], [4], [5]]


async def test_filters_and_replay_feed_batches_and_the_cursor_passes_skipped_events(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    async with trioflow.open_flow(trioflow.App(store)) as flow:
        await flow.publish_many([("a" if i % 3 else "b", i) for i in range(1, 31)])
    app = trioflow.App(store, page_size=8)
    calls = recorder(app, types={"a"}, batch=5)
    async with trioflow.open_flow(app) as flow:
        await flow.wait_idle()
        stats = flow.statistics().consumers["loader"]
    handed = [seq for call in calls for seq in call]
    assert handed == [seq for seq in range(1, 31) if seq % 3]
    assert all(1 <= len(call) <= 5 for call in calls)
    assert (stats.processed, stats.cursor) == (20, 30)


async def test_a_group_of_batch_consumers_splits_by_key(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = trioflow.App(MemoryStore())
    calls = recorder(app, partitions=3, batch=4)
    keys = [f"k{i % 5}" for i in range(40)]
    async with trioflow.open_flow(app) as flow:
        for key in keys:
            await flow.publish("a", key=key)
        await flow.wait_idle()
    handed = [seq for call in calls for seq in call]
    assert sorted(handed) == list(range(1, 41))
    assert all(len(call) <= 4 for call in calls)
    for key in set(keys):
        mine = [seq for seq, k in enumerate(keys, start=1) if k == key]
        assert [seq for seq in handed if seq in mine] == mine


async def test_a_bounded_batch_consumer_that_falls_behind_catches_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = trioflow.App(MemoryStore(), page_size=16)
    calls: list[list[int]] = []

    @app.consumer("loader", batch=10, buffer=5)
    async def load(events: Events) -> None:
        calls.append(seqs(events))
        await trio.sleep(1)

    async with trioflow.open_flow(app) as flow:
        for _ in range(10):
            await flow.publish_many([("a", None)] * 7)
        await flow.wait_idle()
    handed = [seq for call in calls for seq in call]
    assert handed == list(range(1, 71))
    assert max(map(len, calls)) == 10


# Failures


async def test_a_batch_error_moves_past_the_events_done_and_retries_the_rest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = trioflow.App(MemoryStore())
    calls: list[list[int]] = []
    to_fail = {3, 4}

    @app.consumer("loader", batch=5, retry=trioflow.Retry(initial=1.0))
    async def load(events: Events) -> None:
        calls.append(seqs(events))
        for index, event in enumerate(events):
            if event.seq in to_fail:
                to_fail.remove(event.seq)
                raise trioflow.BatchError(index, OSError(f"lost {event.seq}"))

    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", None)] * 7)
        await flow.wait_idle()
        stats = flow.statistics().consumers["loader"]
    assert calls == [[1, 2, 3, 4, 5], [3, 4, 5], [4, 5], [6, 7]]
    assert (stats.processed, stats.failures) == (7, 2)


async def test_exhaustion_narrows_a_batch_down_to_the_failing_event(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = trioflow.App(MemoryStore())
    calls: list[list[int]] = []
    healed = False

    @app.consumer(
        "loader",
        batch=10,
        retry=trioflow.Retry(attempts=2, initial=0.5),
        on_exhausted="dead-letter",
    )
    async def load(events: Events) -> None:
        calls.append(seqs(events))
        if 4 in seqs(events) and not healed:
            raise RuntimeError("4 is poison")  # no index: the batch as a whole failed

    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", None)] * 6)
        await flow.wait_idle()
        letters = await flow.dead_letters("loader")
        stats = flow.statistics().consumers["loader"]
        # A requeued letter comes back as a batch of one.
        healed = True
        await flow.requeue("loader", [4])
        await flow.wait_idle()
        assert flow.statistics().consumers["loader"].processed == 6
        assert not await flow.dead_letters("loader")
    assert calls[:2] == [[1, 2, 3, 4, 5, 6]] * 2
    # Then one at a time, 4 with its own attempts.
    assert calls[2:] == [[1], [2], [3], [4], [4], [5], [6], [4]]
    assert [(letter.seq, letter.attempts, letter.error_type) for letter in letters] == [
        (4, 2, "builtins.RuntimeError")
    ]
    assert (stats.processed, stats.dead_lettered, stats.cursor) == (5, 1, 6)


async def test_a_named_event_is_given_up_alone_after_its_attempts_and_batches_go_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = trioflow.App(MemoryStore())
    calls: list[list[int]] = []

    @app.consumer(
        "loader",
        batch=10,
        retry=trioflow.Retry(attempts=3, initial=0.5),
        on_exhausted="dead-letter",
    )
    async def load(events: Events) -> None:
        calls.append(seqs(events))
        for index, event in enumerate(events):
            if event.seq == 3:
                raise trioflow.BatchError(index, KeyError(event.seq))

    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", None)] * 6)
        await flow.wait_idle()
        letters = await flow.dead_letters("loader")
        stats = flow.statistics().consumers["loader"]
    assert calls == [[1, 2, 3, 4, 5, 6], [3, 4, 5, 6], [3, 4, 5, 6], [4, 5, 6]]
    assert [(letter.seq, letter.attempts, letter.error_type) for letter in letters] == [
        (3, 3, "builtins.KeyError")
    ]
    assert (stats.processed, stats.dead_lettered, stats.failures, stats.cursor) == (5, 1, 3, 6)


async def test_a_rejected_event_in_a_batch_halts_there_and_resumes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = trioflow.App(MemoryStore())
    calls: list[list[int]] = []
    healed = False

    @app.consumer("loader", batch=10, on_exhausted="halt")
    async def load(events: Events) -> None:
        calls.append(seqs(events))
        for index, event in enumerate(events):
            if event.seq == 3 and not healed:
                raise trioflow.BatchError(index, trioflow.Reject("bad"))

    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", None)] * 5)
        await trio.sleep(10)
        stats = flow.statistics().consumers["loader"]
        assert stats.halted and stats.stall is not None and stats.stall.seq == 3
        assert (stats.cursor, stats.processed) == (2, 2)
        healed = True
        await flow.resume("loader")
        await flow.wait_idle()
    # Named by the BatchError, 3 halted at once, without a retry alone.
    assert calls == [[1, 2, 3, 4, 5], [3, 4, 5]]


async def test_the_timeout_is_per_batch(autojump_clock: trio.testing.MockClock) -> None:
    app = trioflow.App(MemoryStore())
    calls: list[tuple[list[int], float]] = []

    @app.consumer(
        "loader",
        batch=4,
        timeout=2.0,
        retry=trioflow.Retry(attempts=2, initial=0.1),
        on_exhausted="dead-letter",
    )
    async def load(events: Events) -> None:
        calls.append((seqs(events), trio.current_time()))
        for event in events:
            # Each event takes 0.6 s; event 2 takes 10 s, past any timeout.
            await trio.sleep(10 if event.seq == 2 else 0.6)

    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", None)] * 4)
        await flow.wait_idle()
        letters = await flow.dead_letters("loader")
    # Four events of 0.6 s fit in no 2 s timeout with event 2 among them.
    assert [call for call, _ in calls] == [[1, 2, 3, 4], [1, 2, 3, 4], [1], [2], [2], [3], [4]]
    assert [(letter.seq, letter.error_type) for letter in letters] == [
        (2, "trioflow.HandlerTimeoutError")
    ]


async def test_a_batch_error_past_its_batch_counts_nothing_as_done(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    app = trioflow.App(MemoryStore())
    calls: list[list[int]] = []

    @app.consumer("loader", batch=3)
    async def load(events: Events) -> None:
        calls.append(seqs(events))
        if len(calls) == 1:
            raise trioflow.BatchError(3, RuntimeError("confused"))

    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", None)] * 3)
        await flow.wait_idle()
    assert calls == [[1, 2, 3], [1, 2, 3]]
    assert "none of the batch counts as done" in caplog.text


# The redelivery bound, in batches


@pytest.mark.parametrize("commit_every", [1, 2, 3])
async def test_the_cursor_never_lags_more_than_commit_every_batches(
    commit_every: int, autojump_clock: trio.testing.MockClock
) -> None:
    store = SlowCursorStore()
    app = trioflow.App(store)
    ends: list[int] = []
    lags: list[int] = []

    @app.consumer("loader", batch=7, commit_every=commit_every)
    async def load(events: Events) -> None:
        durable = store._cursors["loader"]
        # Batches handled and not durable, counting this one: what a crash
        # now would hand over a second time.
        lags.append(1 + sum(end > durable for end in ends))
        ends.append(events[-1].seq)

    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", None)] * 200)
        await flow.wait_idle()
    assert ends[-1] == 200
    # Slow writes push the consumer right up to the bound, not past it.
    assert max(lags) == commit_every


# Transactions


async def test_a_transactional_batch_runs_in_one_transaction_and_narrows_on_failure(
    tmp_path: Path,
) -> None:
    app = trioflow.App(sqlite_url(tmp_path / "events.db"))
    calls: list[list[int]] = []
    schema = "CREATE TABLE IF NOT EXISTS effects (seq INTEGER PRIMARY KEY)"

    @app.consumer(
        "projection",
        batch=4,
        transactional=True,
        retry=trioflow.Retry(attempts=1),
        on_exhausted="dead-letter",
    )
    async def project(events: Events, tx: trioflow.Transaction) -> None:
        calls.append(seqs(events))
        await tx.execute(schema)
        for event in events:
            await tx.execute("INSERT INTO effects (seq) VALUES (?)", event.seq)
            if event.seq == 6:
                raise RuntimeError("6 fails after its insert")

    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", None)] * 10)
        await flow.wait_idle()
        async with flow.transaction() as tx:
            await tx.execute(schema)
            rows = await tx.fetch("SELECT seq FROM effects ORDER BY seq")
        letters = await flow.dead_letters("projection")
        stats = flow.statistics().consumers["projection"]
    # The failed batch rolled back whole, then went one event per transaction.
    assert calls[:2] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert [5] in calls and [6] in calls
    assert [row["seq"] for row in rows] == [1, 2, 3, 4, 5, 7, 8, 9, 10]
    assert [letter.seq for letter in letters] == [6]
    assert (stats.cursor, stats.processed) == (10, 9)


async def test_a_running_flow_adds_a_batch_consumer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = trioflow.App(MemoryStore())
    calls: list[list[int]] = []

    async def load(events: Events) -> None:
        calls.append(seqs(events))

    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", None)] * 5)
        await flow.add_consumer("loader", load, batch=3, max_wait=0.5)
        await flow.wait_idle()
        with pytest.raises(trioflow.ConfigurationError, match="give it batch= too"):
            await flow.add_consumer("other", load, max_wait=0.5)
    assert calls == [[1, 2, 3], [4, 5]]


async def test_stopping_cuts_a_max_wait_short_and_redelivers_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    app = trioflow.App(store)
    calls = recorder(app, batch=10, max_wait=1_000.0)
    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", None)] * 3)
        await trio.sleep(1)
        started = trio.current_time()
    # It stopped at once, without waiting to fill the batch or handling it.
    assert trio.current_time() - started < 1_000
    assert calls == []
    app = trioflow.App(store)
    calls = recorder(app, batch=10)
    async with trioflow.open_flow(app) as flow:
        await flow.wait_idle()
    assert calls == [[1, 2, 3]]
