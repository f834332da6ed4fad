"""The runtime under store faults: each a fault that once lost, rewound, hung or crashed.

Every store call can fail, hang or lose its answer at any point; a fault may
delay delivery, never skip or reorder it. These are the deterministic cases
(MockClock), one per way it once went wrong; tests/test_fault_properties.py
draws them at random.
"""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from collections.abc import Sequence

import pytest
import trio
import trio.testing

import trioflow
from tests.test_flow import recorder
from trioflow._cursors import CursorProgress, CursorWriter
from trioflow._ownership import LeaseKeeper
from trioflow.stores.memory import MemoryStore
from trioflow.testing import FaultyStore

# -- no skipped events --------------------------------------------------------------


async def test_a_failed_read_of_another_flows_events_never_skips_them() -> None:
    shared = MemoryStore()
    faulty = FaultyStore(shared)
    app_a, app_b = trioflow.App(faulty), trioflow.App(shared)
    seen = recorder(app_a, "c")
    async with trioflow.open_flow(app_a) as flow_a, trioflow.open_flow(app_b) as flow_b:
        await flow_b.publish("x", {"i": 1})
        # Flow A's append finds an event it has not seen before its own; the
        # read of it fails: the consumer must still get event 1 before 2.
        faulty.fail_next("read")
        assert await flow_a.publish("x", {"i": 2}) == 2
        await flow_a.wait_idle()
    assert seen == [1, 2]
    assert await shared.load_cursors() == {"c": 2}


async def test_an_append_whose_answer_was_lost_is_delivered_once_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shared = MemoryStore()
    faulty = FaultyStore(shared)
    app_a, app_b = trioflow.App(faulty), trioflow.App(shared)
    seen = recorder(app_a, "c")
    async with trioflow.open_flow(app_a) as flow_a, trioflow.open_flow(app_b) as flow_b:
        await flow_b.publish("x", {"i": 1})
        faulty.fail_next("append", lose_answer=True)
        faulty.fail_next("read", times=3)
        with pytest.raises(trioflow.OutcomeUnknownError):
            await flow_a.publish("x", {"i": 2})
        assert await flow_a.publish("x", {"i": 3}) == 3
        await flow_a.wait_idle()
    assert seen == [1, 2, 3]


# -- start-up ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "start"),
    [
        ("load_cursors", "earliest"),
        ("head", "latest"),
        ("commit_cursors", "latest"),
        ("head", "earliest"),
    ],
)
async def test_a_store_failure_while_a_consumer_starts_is_retried(
    autojump_clock: trio.testing.MockClock, method: str, start: str
) -> None:
    store = FaultyStore()
    app = trioflow.App(store)
    seen = recorder(app, "c", start=start)
    store.fail_next(method, times=2)
    with trio.move_on_after(3) as timeout:
        async with trioflow.open_flow(app) as flow:
            await flow.publish("a", 1)
            await flow.wait_idle()
    assert not timeout.cancelled_caught
    assert seen == [1]
    assert store.calls[method] >= 3


async def test_a_start_up_that_keeps_failing_can_be_cancelled(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = FaultyStore()
    app = trioflow.App(store)
    recorder(app, "c")
    store.fail_next("load_cursors", times=10**6)
    with trio.move_on_after(30) as timeout:
        async with trioflow.open_flow(app):
            pytest.fail("the flow started though its consumer cannot load its cursor")
    assert timeout.cancelled_caught
    # It backed off between attempts rather than spinning.
    assert 3 <= store.calls["load_cursors"] <= 15
    assert "consumer 'c' stopped on a store error" in caplog.text
    # The App can run a flow again.
    async with trioflow.open_flow(trioflow.App(MemoryStore())):
        pass


# -- cursors never move backwards, restarts redeliver only the failed event ----------


async def test_failed_cursor_writes_never_rewind_a_cursor_or_redeliver(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FaultyStore()
    app = trioflow.App(
        store,
        commit_every=6,
        commit_interval=1000.0,
        restart=trioflow.RestartPolicy(initial=0.5, maximum=0.5),
    )
    seen: list[int] = []

    @app.consumer("c")
    async def handle(event: trioflow.Event) -> None:
        seen.append(event.seq)
        await trio.sleep(0.3)
        if event.seq == 6 and seen.count(6) == 1:
            raise RuntimeError("boom")

    # Every cursor write takes 2 s, and the second one fails: the handler
    # then fails while a later write is still under way.
    store.delay_next("commit_cursors", 2.0)
    store.fail_next("commit_cursors")
    store.delay_next("commit_cursors", 2.0, times=100)
    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", i) for i in range(20)])
        await flow.wait_idle()
    written = [commit["c"] for commit in store.cursor_commits]
    assert written == sorted(written), written
    # Only the failed event is handled twice.
    assert seen == [*range(1, 7), *range(6, 21)]


async def test_no_cursor_write_follows_the_final_flush_with_an_older_position(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FaultyStore()
    leases = LeaseKeeper(store=store, holder="h", ttl=3600.0, retry_delay=lambda _: 1.0)
    writer = CursorWriter(store=store, leases=leases)
    progress = CursorProgress("c")
    leases.ownership("c")
    async with store.open(), trio.open_nursery() as nursery:
        await nursery.start(leases.run)
        nursery.start_soon(writer.run)
        # The write of 2 lands a second late; meanwhile 4 is requested (and
        # queued behind it); then the final flush writes 5, and gets the
        # write lock before the queued request is taken.
        store.delay_next("commit_cursors", 1.0, land_late=True)
        writer.request(progress, 2, 2)
        await trio.testing.wait_all_tasks_blocked()
        writer.request(progress, 4, 4)
        await writer.flush([(progress, 5, 5)])
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert [commit["c"] for commit in store.cursor_commits] == [2, 5]
    assert progress.committed == 5


async def test_restarts_back_off_while_cursor_writes_keep_failing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FaultyStore()
    app = trioflow.App(
        store,
        commit_every=5,
        restart=trioflow.RestartPolicy(initial=0.1, maximum=4.0, multiplier=2.0),
    )
    calls: list[int] = []

    @app.consumer("c")
    async def handle(event: trioflow.Event) -> None:
        calls.append(event.seq)

    async with trioflow.open_flow(app) as flow:
        await trio.sleep(1)
        store.fail_next("commit_cursors", times=10**6)
        await flow.publish_many([("a", i) for i in range(100)])
        await trio.sleep(60)
        restarts = flow.statistics().consumers["c"].restarts
        store.fail_next("commit_cursors", times=0)
    # No durable progress: each restart waited longer, up to the 4 s cap
    # (0.1 + 0.2 + ... + 3.2 = 6.3 s for 6, then 4 s each: about 19 in 60 s;
    # without backoff, 0.1 s each, it would be hundreds).
    assert 15 <= restarts <= 21, restarts
    # It never handled an event twice: its position survives the restarts,
    # and it cannot run more than commit_every events ahead of its cursor.
    assert calls == list(range(1, len(calls) + 1))
    assert len(calls) <= 5


# -- slow store calls, and stores that break the contract -----------------------------


async def test_a_store_call_that_waits_long_is_logged_with_its_name(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trioflow")
    store = FaultyStore()
    app = trioflow.App(store, store_wait_warning=5.0)
    recorder(app, "mailer")
    async with trioflow.open_flow(app) as flow:
        store.delay_next("append", 12.0)
        await flow.publish("a", 1)
        store.delay_next("commit_cursors", 7.0)
        await flow.wait_idle()
    waits = [r.getMessage() for r in caplog.records if "store call" in r.getMessage()]
    assert waits == [
        "store call append (1 events) has waited 5.0s and goes on waiting: the store may be "
        "blocked (a lock held by a long transaction, a busy disk, a network that stopped "
        "answering)",
        "store call append (1 events) has waited 10.0s and goes on waiting: the store may be "
        "blocked (a lock held by a long transaction, a busy disk, a network that stopped "
        "answering)",
        "store call append (1 events) finished after 12.0s",
        "store call commit_cursors (mailer) has waited 5.0s and goes on waiting: the store may "
        "be blocked (a lock held by a long transaction, a busy disk, a network that stopped "
        "answering)",
        "store call commit_cursors (mailer) finished after 7.0s",
    ]


async def test_no_slow_call_warning_when_turned_off(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = FaultyStore()
    app = trioflow.App(store, store_wait_warning=None)
    async with trioflow.open_flow(app) as flow:
        store.delay_next("append", 12.0)
        await flow.publish("a", 1)
    assert "store call" not in caplog.text


class UndecodableEvent(MemoryStore):
    """Fails to decode one stored event with a bare error, as a store with a bug would."""

    def __init__(self, bad_seq: int) -> None:
        super().__init__()
        self.bad_seq = bad_seq

    async def read(
        self, after: int, limit: int, *, max_bytes: int | None = None
    ) -> Sequence[trioflow.Event]:
        page = await super().read(after, limit, max_bytes=max_bytes)
        if any(event.seq == self.bad_seq for event in page):
            raise RecursionError("maximum recursion depth exceeded while decoding a JSON array")
        return page


async def test_an_event_the_store_cannot_decode_stalls_its_readers_never_the_flow(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = UndecodableEvent(bad_seq=2)
    async with trioflow.open_flow(trioflow.App(store)) as flow:
        await flow.publish_many([("a", 1), ("b", 2), ("a", 3)])
    app = trioflow.App(store)
    reads_b = recorder(app, "reads-b", types={"b"})
    skips_b = recorder(app, "skips-b", types={"a"})
    async with trioflow.open_flow(app) as flow:
        with trio.move_on_after(30):
            await flow.wait_idle()
        stats = flow.statistics().consumers
        # Both replay through event 2, so both are held up at it, restarting
        # with backoff; the flow, and publishing, carry on.
        assert stats["reads-b"].restarts >= 3
        assert await flow.publish("a", 4) == 4
        store.bad_seq = -1
        await flow.wait_idle()
    assert reads_b == [2]
    assert skips_b == [1, 3, 4]
    assert "unexpected RecursionError" in caplog.text


# -- what a store says about itself ---------------------------------------------------


async def test_a_cursor_past_the_end_of_the_log_is_reported_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryStore()
    async with store.open():
        await store.commit_cursors({"c": 10})
    app = trioflow.App(store)
    seen = recorder(app, "c")
    async with trioflow.open_flow(app) as flow:
        await flow.wait_idle()
    assert seen == []
    assert "consumer 'c' has cursor 10, past the last event in the store (0)" in caplog.text


def test_a_handler_that_cannot_take_an_event_is_refused_at_registration() -> None:
    app = trioflow.App(MemoryStore())

    async def no_argument() -> None:
        pass

    async def two_arguments(event: trioflow.Event, other: int) -> None:
        pass

    async def keyword_only(*, event: trioflow.Event) -> None:
        pass

    for handler in (no_argument, two_arguments, keyword_only):
        with pytest.raises(trioflow.ConfigurationError, match="must take the event"):
            app.consumer(handler)  # type: ignore[type-var]
    assert app.consumers == {}

    async def optional_extra(event: trioflow.Event, retries: int = 3) -> None:
        pass

    async def variadic(*args: object) -> None:
        pass

    app.consumer(optional_extra)
    app.consumer(variadic)
    assert list(app.consumers) == ["optional_extra", "variadic"]


async def test_math_inf_store_wait_warning_is_refused() -> None:
    with pytest.raises(trioflow.ConfigurationError, match="store_wait_warning"):
        trioflow.App(MemoryStore(), store_wait_warning=math.inf)
    await trio.lowlevel.checkpoint()


# A flow cancelled from outside just as its tasks report "started". Run in a
# child process: the bug this guards against hangs beyond any cancellation.
_CANCELLED_WHILE_STARTING = """
import contextlib, trio, trioflow
from trioflow.stores.memory import MemoryStore

class CancelsAsItOpens(MemoryStore):
    scope = None

    @contextlib.asynccontextmanager
    async def open(self):
        async with super().open():
            # No checkpoint from here until the flow's first task starts.
            self.scope.cancel()
            yield

async def main():
    store = CancelsAsItOpens()
    app = trioflow.App(store)

    @app.consumer("c")
    async def handle(event):
        pass

    with trio.CancelScope() as scope:
        store.scope = scope
        async with trioflow.open_flow(app):
            raise AssertionError("the flow started though it was cancelled")
    assert scope.cancelled_caught
    print("ended")

trio.run(main)
"""


def test_a_flow_cancelled_as_its_tasks_start_ends() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _CANCELLED_WHILE_STARTING],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ended"
