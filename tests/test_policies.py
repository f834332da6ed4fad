"""Delivery policies: retries in place, timeouts, dead letters, halt, requeue, overflow.

On the memory store under an autojump MockClock: backoffs and timeouts cost
no real time and are exact.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

import trioflow
from trioflow.stores.memory import MemoryStore
from trioflow.testing import FaultyStore


def failing_on(
    app: trioflow.App,
    name: str,
    poison: Callable[[trioflow.Event, int], BaseException | None],
    **options: object,
) -> list[tuple[int, str]]:
    """A consumer whose handler raises ``poison(event, attempt)`` when not None."""
    log: list[tuple[int, str]] = []
    attempts: dict[int, int] = {}

    @app.consumer(name, **options)  # type: ignore[call-overload, untyped-decorator]
    async def handle(event: trioflow.Event) -> None:
        attempts[event.seq] = attempts.get(event.seq, 0) + 1
        error = poison(event, attempts[event.seq])
        if error is not None:
            log.append((event.seq, "fail"))
            raise error
        log.append((event.seq, "ok"))

    return log


def poison_seq(seq: int, times: int = 10**9) -> Callable[[trioflow.Event, int], Exception | None]:
    def poison(event: trioflow.Event, attempt: int) -> Exception | None:
        if event.seq == seq and attempt <= times:
            return RuntimeError(f"cannot handle {event.seq}")
        return None

    return poison


# -- retries in place ------------------------------------------------------------------


async def test_a_failed_event_is_retried_in_place_before_any_later_event(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = trioflow.App(MemoryStore())
    log = failing_on(
        app,
        "c",
        poison_seq(2, times=2),
        retry=trioflow.Retry(attempts=3, initial=1.0, multiplier=3.0),
        on_exhausted="dead-letter",
    )
    async with trioflow.open_flow(app) as flow:
        start = trio.current_time()
        await flow.publish_many([("a", i) for i in range(3)])
        await trio.sleep(0.5)
        stall = flow.statistics().consumers["c"].stall
        assert stall is not None
        assert (stall.seq, stall.type, stall.attempts) == (2, "a", 1)
        assert stall.last_error == "RuntimeError: cannot handle 2"
        assert stall.next_attempt_at is not None
        await flow.wait_idle()
        # Waits of 1 s, then 3 s.
        assert trio.current_time() - start == pytest.approx(4.0)
        stats = flow.statistics().consumers["c"]
    assert log == [(1, "ok"), (2, "fail"), (2, "fail"), (2, "ok"), (3, "ok")]
    assert (stats.failures, stats.restarts, stats.dead_lettered, stats.stall) == (2, 0, 0, None)


async def test_jitter_moves_each_wait_within_its_fraction() -> None:
    retry = trioflow.Retry(initial=10.0, maximum=10.0, jitter=0.1)
    waits = {retry.delay(1, functools.partial(float, u)) for u in (0.0, 0.5, 1.0)}
    assert waits == {9.0, 10.0, 11.0}
    await trio.lowlevel.checkpoint()


async def test_retry_forever_never_gives_up_and_reports_the_stall(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    app = trioflow.App(MemoryStore(), retry=trioflow.Retry(initial=1.0, maximum=4.0))
    log = failing_on(app, "c", poison_seq(1))
    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", 1), ("a", 2)])
        await trio.sleep(60)
        stats = flow.statistics().consumers["c"]
    # 1 + 2 + 4 + 4 + ... seconds apart: 16 attempts in 60 s, never skipped.
    assert 15 <= len(log) <= 17
    assert set(log) == {(1, "fail")}
    assert stats.stall is not None
    assert stats.stall.seq == 1
    assert stats.stall.attempts == len(log)
    assert (stats.cursor, stats.dead_lettered, stats.halted) == (0, 0, False)
    lines = [r.getMessage() for r in caplog.records if "failed on seq=1" in r.getMessage()]
    assert len(lines) == len(log)
    assert lines[-1].endswith("retrying in 4.00s")


# -- dead letters ------------------------------------------------------------------------


async def test_an_exhausted_event_becomes_a_dead_letter_and_the_consumer_goes_on(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryStore()
    app = trioflow.App(store)
    log = failing_on(
        app,
        "c",
        poison_seq(2),
        retry=trioflow.Retry(attempts=3, initial=1.0),
        on_exhausted="dead-letter",
    )
    async with trioflow.open_flow(app) as flow:
        seqs = await flow.publish_many([("a", 1), ("order.created", 2), ("a", 3)])
        await flow.wait_idle()
        stats = flow.statistics().consumers["c"]
        (letter,) = await flow.dead_letters("c")
    assert log == [(1, "ok"), (2, "fail"), (2, "fail"), (2, "fail"), (3, "ok")]
    assert (stats.dead_lettered, stats.cursor, stats.processed) == (1, 3, 2)
    event = (await store.read(1, 1))[0]
    assert (letter.consumer, letter.seq, letter.event_id, letter.type) == (
        "c",
        seqs[1],
        event.id,
        "order.created",
    )
    assert (letter.attempts, letter.reason, letter.due_at) == (3, "exhausted", None)
    assert letter.error_type == "builtins.RuntimeError"
    assert letter.message == "cannot handle 2"
    assert "RuntimeError: cannot handle 2" in letter.traceback
    assert letter.first_failed_at < letter.last_failed_at
    assert "gave up on seq=2" in caplog.text
    # It survives the flow, and the consumer does not handle it again.
    async with trioflow.open_flow(app) as flow:
        assert await flow.dead_letters() == [letter]
        await flow.wait_idle()
    assert log[-1] == (3, "ok")


async def test_an_error_not_in_retry_on_is_not_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = trioflow.App(MemoryStore())

    def poison(event: trioflow.Event, attempt: int) -> Exception | None:
        return KeyError("gone") if event.seq == 1 else None

    log = failing_on(app, "c", poison, retry_on=(TimeoutError,), on_exhausted="dead-letter")
    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", 1), ("a", 2)])
        await flow.wait_idle()
        (letter,) = await flow.dead_letters("c")
    assert log == [(1, "fail"), (2, "ok")]
    assert (letter.attempts, letter.reason, letter.error_type) == (
        1,
        "not-retried",
        "builtins.KeyError",
    )


@pytest.mark.parametrize(
    ("on_exhausted", "dead", "halted"),
    [("dead-letter", True, False), ("halt", False, True), ("retry-forever", False, True)],
)
async def test_reject_skips_the_remaining_attempts(
    autojump_clock: trio.testing.MockClock, on_exhausted: str, dead: bool, halted: bool
) -> None:
    app = trioflow.App(MemoryStore())

    def poison(event: trioflow.Event, attempt: int) -> Exception | None:
        return trioflow.Reject("malformed order") if event.seq == 1 else None

    log = failing_on(app, "c", poison, on_exhausted=on_exhausted)
    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", 1), ("a", 2)])
        with trio.move_on_after(60):
            await flow.wait_idle()
        stats = flow.statistics().consumers["c"]
        letters = await flow.dead_letters("c")
    assert log[0] == (1, "fail")
    assert log.count((1, "fail")) == 1
    assert stats.halted is halted
    if dead:
        assert [(letter.reason, letter.message) for letter in letters] == [
            ("rejected", "malformed order")
        ]
        assert log == [(1, "fail"), (2, "ok")]
    else:
        assert letters == []
        assert stats.cursor == 0


async def test_a_dead_letter_is_recorded_with_the_cursor_or_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FaultyStore()
    app = trioflow.App(store)
    log = failing_on(
        app, "c", poison_seq(1), retry=trioflow.Retry(attempts=2), on_exhausted="dead-letter"
    )
    store.fail_next("record_dead_letter", times=2)
    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", 1), ("a", 2)])
        await flow.wait_idle()
        stats = flow.statistics().consumers["c"]
        letters = await flow.dead_letters("c")
    # Recording failed twice: a store error restarts the consumer from its
    # cursor, and the event's attempts begin again; never skipped unrecorded.
    assert stats.restarts == 2
    assert [letter.seq for letter in letters] == [1]
    assert log.count((1, "fail")) == 6
    assert log[-1] == (2, "ok")


# -- timeouts ---------------------------------------------------------------------------------


async def test_a_handler_past_its_timeout_is_cancelled_and_the_attempt_fails(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = trioflow.App(MemoryStore())
    calls: list[float] = []

    @app.consumer("slow", timeout=2.0, retry=trioflow.Retry(attempts=2), on_exhausted="dead-letter")
    async def slow(event: trioflow.Event) -> None:
        calls.append(trio.current_time())
        if event.seq == 1:
            await trio.sleep(10)

    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", 1), ("a", 2)])
        await flow.wait_idle()
        (letter,) = await flow.dead_letters("slow")
    assert len(calls) == 3
    assert letter.error_type == "trioflow.HandlerTimeoutError"
    assert letter.message.startswith(
        "the handler of consumer 'slow' did not return within its timeout of 2s on seq=1 "
        "(type 'a'); it was cancelled after 2"
    )


async def test_a_handler_that_ignores_its_timeout_is_named(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trioflow")
    app = trioflow.App(MemoryStore())

    @app.consumer("stubborn", timeout=1.0)
    async def stubborn(event: trioflow.Event) -> None:
        with trio.CancelScope(shield=True):
            await trio.sleep(5)

    async with trioflow.open_flow(app) as flow:
        await flow.publish("a", 1)
        await trio.sleep(6)
    messages = [r.getMessage() for r in caplog.records]
    assert (
        "the handler of consumer 'stubborn' on seq=1 is still running 2.0s after it started, "
        "though it was cancelled at its timeout of 1s: it ignores cancellation (a blocking "
        "call, or code that catches trio.Cancelled)"
    ) in messages
    assert "the handler of consumer 'stubborn' on seq=1 returned 5.0s after it started" in (
        messages
    )


# -- halt ---------------------------------------------------------------------------------------


async def test_a_halted_consumer_holds_its_cursor_until_resumed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    app = trioflow.App(store)
    healed = False

    def poison(event: trioflow.Event, attempt: int) -> Exception | None:
        return None if healed or event.seq != 2 else RuntimeError("not yet")

    log = failing_on(app, "c", poison, retry=trioflow.Retry(attempts=2), on_exhausted="halt")
    other = failing_on(app, "other", lambda event, attempt: None)
    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", i) for i in range(3)])
        await trio.sleep(10)
        stats = flow.statistics().consumers["c"]
        assert (stats.halted, stats.cursor, stats.position) == (True, 1, 1)
        assert stats.stall is not None
        assert (stats.stall.seq, stats.stall.attempts, stats.stall.next_attempt_at) == (2, 2, None)
        # Others go on, and publishing goes on.
        await flow.publish("a", 3)
        await trio.sleep(1)
        assert [seq for seq, _ in other] == [1, 2, 3, 4]
        with pytest.raises(trioflow.ConsumerStateError, match="not halted"):
            await flow.resume("other")
        with pytest.raises(trioflow.UnknownConsumerError, match="no consumer named 'nope'"):
            await flow.resume("nope")
        healed = True
        await flow.resume("c")
        await flow.wait_idle()
        stats = flow.statistics().consumers["c"]
    assert log == [(1, "ok"), (2, "fail"), (2, "fail"), (2, "ok"), (3, "ok"), (4, "ok")]
    assert (stats.halted, stats.stall, stats.cursor) == (False, None, 4)


async def test_a_new_flow_starts_a_halted_consumer_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    app = trioflow.App(store)
    log = failing_on(
        app, "c", poison_seq(1, times=1), retry=trioflow.Retry(attempts=1), on_exhausted="halt"
    )
    async with trioflow.open_flow(app) as flow:
        await flow.publish("a", 1)
        await trio.sleep(1)
        assert flow.statistics().consumers["c"].halted
    async with trioflow.open_flow(app) as flow:
        await flow.wait_idle()
    assert log == [(1, "fail"), (1, "ok")]


# -- requeue and discard ----------------------------------------------------------------------


async def test_requeued_dead_letters_are_handled_again_and_removed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    app = trioflow.App(store)
    broken = {2, 3}

    def poison(event: trioflow.Event, attempt: int) -> Exception | None:
        return RuntimeError("down") if event.seq in broken else None

    log = failing_on(app, "c", poison, retry=trioflow.Retry(attempts=1), on_exhausted="dead-letter")
    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", i) for i in range(4)])
        await flow.wait_idle()
        assert [letter.seq for letter in await flow.dead_letters("c")] == [2, 3]
        broken.clear()
        await flow.requeue("c", [3])
        await trio.sleep(1)
        assert [letter.seq for letter in await flow.dead_letters("c")] == [2]
        await flow.requeue("c", [2], after=30)
        await trio.sleep(29)
        assert [letter.seq for letter in await flow.dead_letters("c")] == [2]
        await trio.sleep(2)
        assert await flow.dead_letters("c") == []
        await flow.publish("a", 4)
        await flow.wait_idle()
    # Requeued events come after later ones: out of stream order by nature.
    assert [seq for seq, what in log if what == "ok"] == [1, 4, 3, 2, 5]


class _LetterReadsCounted(MemoryStore):
    """Counts how many letters the flow read through `dead_letters`."""

    def __init__(self) -> None:
        super().__init__()
        self.letters_read = 0

    async def dead_letters(self, consumer: str | None = None) -> list[trioflow.DeadLetter]:
        letters = await super().dead_letters(consumer)
        self.letters_read += len(letters)
        return letters


async def test_waiting_for_a_requeued_letter_reads_none_of_the_parked_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = _LetterReadsCounted()
    app = trioflow.App(store)
    broken = set(range(1, 201))

    def poison(event: trioflow.Event, attempt: int) -> Exception | None:
        return RuntimeError("down") if event.seq in broken else None

    log = failing_on(app, "c", poison, retry=trioflow.Retry(attempts=1), on_exhausted="dead-letter")
    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", i) for i in range(200)])
        await flow.wait_idle()
        broken.clear()
        # Counted from here: 200 parked letters, one requeued for later.
        await flow.requeue("c", [7], after=60)
        store.letters_read = 0
        await trio.sleep(61)
        await flow.wait_idle()
        assert store.letters_read == 0
    assert [seq for seq, what in log if what == "ok"] == [7]


async def test_a_requeued_letter_is_handled_though_looking_up_when_it_is_due_fails(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FaultyStore(MemoryStore())
    app = trioflow.App(store)
    broken = {2}

    def poison(event: trioflow.Event, attempt: int) -> Exception | None:
        return RuntimeError("down") if event.seq in broken else None

    log = failing_on(app, "c", poison, retry=trioflow.Retry(attempts=1), on_exhausted="dead-letter")
    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", i) for i in range(3)])
        await flow.wait_idle()
        broken.clear()
        store.fail_next("earliest_due_at", times=3)
        await flow.requeue("c", [2], after=30)
        await trio.sleep(60)
        await flow.wait_idle()
        assert await flow.dead_letters("c") == []
    assert [method for method, _ in store.injected] == ["earliest_due_at"] * 3
    assert [seq for seq, what in log if what == "ok"] == [1, 3, 2]


async def test_letters_requeued_by_another_process_are_handled_without_a_restart(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The `trioflow dead-letters requeue` command (or another process's flow)
    # requeues through the store: the flow running the consumer is not told.
    store = MemoryStore()
    app = trioflow.App(store)
    broken = {2}

    def poison(event: trioflow.Event, attempt: int) -> Exception | None:
        return RuntimeError("down") if event.seq in broken else None

    log = failing_on(app, "c", poison, retry=trioflow.Retry(attempts=1), on_exhausted="dead-letter")
    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", i) for i in range(3)])
        await flow.wait_idle()
        assert [letter.seq for letter in await flow.dead_letters("c")] == [2]
        broken.clear()
        # Long idle first: the consumer has looked, found nothing, and waits.
        await trio.sleep(60)
        assert await store.requeue_dead_letters("c", [2]) == [2]
        await trio.sleep(10)
        assert await flow.dead_letters("c") == []
    assert [seq for seq, what in log if what == "ok"] == [1, 3, 2]


async def test_a_requeued_event_that_fails_again_is_a_dead_letter_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = trioflow.App(MemoryStore())
    failing_on(
        app, "c", poison_seq(1), retry=trioflow.Retry(attempts=2), on_exhausted="dead-letter"
    )
    async with trioflow.open_flow(app) as flow:
        await flow.publish("a", 1)
        await flow.wait_idle()
        await flow.requeue("c", [1])
        await trio.sleep(5)
        (letter,) = await flow.dead_letters("c")
        stats = flow.statistics().consumers["c"]
    assert (letter.attempts, letter.due_at) == (2, None)
    assert (stats.dead_lettered, stats.cursor) == (2, 1)


async def test_requeue_and_discard_refuse_what_is_no_dead_letter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = trioflow.App(MemoryStore())
    failing_on(
        app, "c", poison_seq(1), retry=trioflow.Retry(attempts=1), on_exhausted="dead-letter"
    )
    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", 1), ("a", 2)])
        await flow.wait_idle()
        for call in (flow.requeue, flow.discard):
            with pytest.raises(trioflow.UnknownDeadLetterError, match="no dead letter at seq 2"):
                await call("c", [1, 2])
            with pytest.raises(trioflow.UnknownDeadLetterError, match="no dead letter at seq 1"):
                await call("other", [1])
            bads: list[Any] = [[], "1", [1.5], None, [True]]
            for bad in bads:
                with pytest.raises(trioflow.ConfigurationError, match="seqs"):
                    await call("c", bad)
            with pytest.raises(trioflow.ConfigurationError, match="invalid consumer name"):
                await call("", [1])
        with pytest.raises(trioflow.ConfigurationError, match="after must be"):
            await flow.requeue("c", [1], after=-1)
        # Nothing changed.
        (letter,) = await flow.dead_letters("c")
        assert letter.due_at is None
        await flow.discard("c", [1])
        assert await flow.dead_letters() == []


# -- overflow="block" ---------------------------------------------------------------------------


async def test_a_blocking_consumer_makes_publishers_wait_and_loses_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = trioflow.App(MemoryStore())
    seen: list[int] = []
    most = 0

    @app.consumer("careful", buffer=3, overflow="block")
    async def careful(event: trioflow.Event) -> None:
        await trio.sleep(1)
        seen.append(event.seq)

    async with trioflow.open_flow(app) as flow:
        start = trio.current_time()
        for i in range(12):
            await flow.publish("a", i)
            most = max(most, flow.statistics().consumers["careful"].buffered)
        # The publisher was held back by the consumer: 12 events at 1 s each,
        # the last few still in its buffer.
        assert trio.current_time() - start >= 12 - 3 - 1
        await flow.wait_idle()
    assert most <= 3
    assert seen == list(range(1, 13))


async def test_a_handler_publishing_into_its_own_full_blocking_consumer_gets_an_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = trioflow.App(MemoryStore())
    flows: list[trioflow.Flow] = []
    outcomes: list[str] = []

    @app.consumer("loop", buffer=1, overflow="block")
    async def loop(event: trioflow.Event) -> None:
        if event.data == "first":
            await trio.sleep(1)  # meanwhile "second" fills the buffer
            try:
                await flows[0].publish("a", "from the handler")
            except trioflow.BackpressureError as exc:
                outcomes.append(str(exc))
            else:
                outcomes.append("published")

    async with trioflow.open_flow(app) as flow:
        flows.append(flow)
        await flow.publish("a", "first")
        await flow.publish("a", "second")
        with trio.fail_after(60):
            await flow.wait_idle()
        head = flow.statistics().head
    assert len(outcomes) == 1
    assert (
        "a handler of consumer 'loop' published while that consumer holds its buffer"
        in (outcomes[0])
    )
    assert head == 2


# -- consumers that come and go ------------------------------------------------------------------


async def test_a_consumer_added_to_a_running_flow_recovers_like_any_other(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    app = trioflow.App(store)
    seen: list[int] = []

    async def late(event: trioflow.Event) -> None:
        seen.append(event.seq)

    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", 1), ("b", 2)])
        await flow.add_consumer("late", late, types={"a"})
        await flow.publish("a", 3)
        await flow.wait_idle()
        assert set(flow.statistics().consumers) == {"late"}
        with pytest.raises(trioflow.ConfigurationError, match="already runs a consumer"):
            await flow.add_consumer("late", late)
        with pytest.raises(trioflow.ConfigurationError, match="must be 'earliest'"):
            await flow.add_consumer("other", late, start="middle")  # type: ignore[arg-type]
        assert set(flow.statistics().consumers) == {"late"}
    assert seen == [1, 3]
    assert await store.load_cursors() == {"late": 3}


async def test_a_removed_consumer_stops_gracefully_and_may_be_forgotten(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    app = trioflow.App(store)
    seen: list[int] = []
    poison = poison_seq(1)
    failing_on(app, "dlq", poison, retry=trioflow.Retry(attempts=1), on_exhausted="dead-letter")

    @app.consumer("c", commit_every=100)
    async def handle(event: trioflow.Event) -> None:
        await trio.sleep(1)
        seen.append(event.seq)

    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", i) for i in range(3)])
        await trio.sleep(1.5)
        await flow.remove_consumer("c")
        # Its handler in flight finished; its position was committed.
        assert seen == [1, 2]
        assert (await store.load_cursors())["c"] == 2
        assert "c" not in flow.statistics().consumers
        await flow.publish("a", 4)
        await flow.wait_idle()
        assert [letter.seq for letter in await flow.dead_letters("dlq")] == [1]
        await flow.remove_consumer("dlq", forget=True)
        with pytest.raises(trioflow.UnknownConsumerError):
            await flow.remove_consumer("dlq")
    assert seen == [1, 2]
    assert await store.load_cursors() == {"c": 2}
    assert await store.dead_letters() == []


async def test_a_graceful_stop_does_not_wait_out_a_retry_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = trioflow.App(MemoryStore(), retry=trioflow.Retry(initial=1000.0, maximum=1000.0))
    log = failing_on(app, "c", poison_seq(1))
    async with trioflow.open_flow(app) as flow:
        await flow.publish("a", 1)
        await trio.sleep(1)
        stopped_at = trio.current_time()
    assert trio.current_time() - stopped_at < 1
    assert log == [(1, "fail")]


# -- bad options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"on_exhausted": "skip"}, "on_exhausted must be one of"),
        ({"overflow": "drop"}, "overflow must be one of"),
        ({"overflow": "block"}, "give it a buffer"),
        ({"timeout": -1}, "timeout must be"),
        ({"timeout": 0}, "timeout must be"),
        ({"timeout": float("inf")}, "timeout must be"),
        ({"retry": 5}, "retry must be a trioflow.Retry"),
        ({"retry_on": ValueError}, "never gives up"),
        ({"retry_on": (ValueError, "x"), "on_exhausted": "halt"}, "retry_on must be"),
        ({"retry_on": KeyboardInterrupt, "on_exhausted": "halt"}, "retry_on must be"),
    ],
)
def test_bad_policy_options_are_refused(options: dict[str, object], match: str) -> None:
    app = trioflow.App(MemoryStore())

    async def handle(event: trioflow.Event) -> None:
        pass

    with pytest.raises(trioflow.ConfigurationError, match=match):
        app.consumer("c", **options)(handle)  # type: ignore[call-overload]
    assert app.consumers == {}


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"attempts": 0}, "attempts must be an int >= 1"),
        ({"attempts": 1.5}, "attempts must be an int >= 1"),
        ({"initial": -1}, "initial must be a finite number >= 0"),
        ({"maximum": float("nan")}, "maximum must be a finite number >= 0"),
        ({"multiplier": 0.5}, "multiplier must be a finite number >= 1"),
        ({"jitter": 2}, "jitter must be a number from 0 to 1"),
    ],
)
def test_bad_retry_values_are_refused(options: dict[str, object], match: str) -> None:
    with pytest.raises(trioflow.ConfigurationError, match=match):
        trioflow.Retry(**options)  # type: ignore[arg-type]
