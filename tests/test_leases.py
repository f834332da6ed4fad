"""One owner per consumer across flows: leases, standby, failover and fencing.

Flows share a `MemoryStore` (as processes share a database); the memory
store's lease clock follows trio's, so MockClock makes lease times exact.
Multi-process tests (SIGKILL, SIGSTOP) live in tests/test_scale_out.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import trio
import trio.testing

import trioflow
from trioflow.stores import Store
from trioflow.stores.memory import MemoryStore
from trioflow.testing import FaultyStore

TTL = 6.0


def tracking_app(
    store: Store, log: list[tuple[str, int, str]], tag: str, **options: object
) -> trioflow.App:
    """An App whose consumer "c" logs (what, seq, tag) at the start and end of each call."""
    app = trioflow.App(store, lease_ttl=TTL, **options)  # type: ignore[arg-type]

    @app.consumer("c")
    async def handle(event: trioflow.Event) -> None:
        log.append(("start", event.seq, tag))
        try:
            await trio.sleep(event.data or 0)
        except trio.Cancelled:
            log.append(("cancel", event.seq, tag))
            raise
        log.append(("end", event.seq, tag))

    return app


async def until(condition: Callable[[], bool]) -> None:
    """Wait until ``condition()`` holds, looking every 10 ms (statistics have no event)."""
    while not condition():  # noqa: ASYNC110
        await trio.sleep(0.01)


def ended(log: list[tuple[str, int, str]]) -> list[int]:
    """The seqs whose calls returned, in order."""
    return [seq for what, seq, _ in log if what == "end"]


def assert_never_two_at_once(log: list[tuple[str, int, str]]) -> None:
    """Calls never overlap: each start is followed by its own end or cancellation."""
    running: tuple[int, str] | None = None
    for what, seq, tag in log:
        if what == "start":
            assert running is None, f"{tag} started {seq} while {running} ran: {log}"
            running = (seq, tag)
        else:
            assert running == (seq, tag), log
            running = None


async def test_one_flow_owns_a_consumer_the_other_stands_by(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    log: list[tuple[str, int, str]] = []
    a, b = tracking_app(store, log, "a"), tracking_app(store, log, "b")
    async with trioflow.open_flow(a) as flow_a, trioflow.open_flow(b) as flow_b:
        for i in range(20):
            await (flow_a if i % 2 else flow_b).publish("x")
        await flow_a.wait_idle()
        await flow_b.wait_idle()
        await trio.sleep(3 * TTL)
        stats_a, stats_b = flow_a.statistics(), flow_b.statistics()
        assert stats_a.consumers["c"].owned
        assert stats_a.consumers["c"].owner == stats_a.holder
        assert not stats_b.consumers["c"].owned
        assert stats_b.consumers["c"].owner == stats_a.holder
        assert stats_a.holder != stats_b.holder
        assert stats_b.consumers["c"].buffered == 0
    assert ended(log) == list(range(1, 21))
    assert {tag for _, _, tag in log} == {"a"}


async def test_a_graceful_stop_hands_the_consumer_over_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    log: list[tuple[str, int, str]] = []
    a, b = tracking_app(store, log, "a"), tracking_app(store, log, "b")
    async with trioflow.open_flow(b) as flow_b:
        async with trioflow.open_flow(a) as flow_a:
            assert not flow_a.statistics().consumers["c"].owned
            await flow_a.publish("x")
            await flow_a.wait_idle()
        stopped_at = trio.current_time()
        await flow_b.publish("x")
        await flow_b.wait_idle()
        # b owned it throughout: a's stop changed nothing for it.
        assert trio.current_time() - stopped_at < 1
    stop_a, a_stopped = trio.Event(), trio.Event()

    async def run_a(*, task_status: trio.TaskStatus[trioflow.Flow]) -> None:
        async with trioflow.open_flow(a) as flow:
            task_status.started(flow)
            await stop_a.wait()
        a_stopped.set()

    async with trio.open_nursery() as nursery:
        flow_a = await nursery.start(run_a)
        async with trioflow.open_flow(b) as flow_b:
            assert flow_a.statistics().consumers["c"].owned
            stop_a.set()
            await a_stopped.wait()
            # a owned it and stopped gracefully: b takes over within one
            # claim interval, not a lease's time.
            stopped_at = trio.current_time()
            await flow_b.publish("x")
            await flow_b.wait_idle()
            assert trio.current_time() - stopped_at <= TTL / 3 + 0.1
            assert flow_b.statistics().consumers["c"].owned
    assert ended(log) == [1, 2, 3]
    assert [tag for what, _, tag in log if what == "end"] == ["b", "b", "b"]


async def test_removing_a_consumer_hands_it_over_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    log: list[tuple[str, int, str]] = []
    a, b = tracking_app(store, log, "a"), tracking_app(store, log, "b")
    async with trioflow.open_flow(a) as flow_a, trioflow.open_flow(b) as flow_b:
        await flow_b.publish("x")
        await flow_b.wait_idle()
        assert flow_a.statistics().consumers["c"].owned
        await flow_a.remove_consumer("c")
        removed_at = trio.current_time()
        await flow_b.publish("x")
        await flow_b.wait_idle()
        assert trio.current_time() - removed_at <= TTL / 3 + 0.1
        assert flow_b.statistics().consumers["c"].owned
    assert ended(log) == [1, 2]
    assert [tag for what, _, tag in log if what == "end"] == ["a", "b"]


async def test_a_standby_takes_over_when_the_owner_stops_renewing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    log: list[tuple[str, int, str]] = []
    faulty = FaultyStore(store)
    a, b = tracking_app(faulty, log, "a"), tracking_app(store, log, "b")
    async with trioflow.open_flow(a) as flow_a, trioflow.open_flow(b) as flow_b:
        await flow_b.publish("x", 0)
        await flow_b.wait_idle()
        # a's store stops answering its claims, as for a process cut off.
        faulty.fail_next("claim_leases", times=10**6)
        cut_at = trio.current_time()
        await flow_b.publish("x", 100)
        with trio.fail_after(3 * TTL):
            await until(lambda: flow_b.statistics().consumers["c"].owned)
        taken_over = trio.current_time() - cut_at
        assert not flow_a.statistics().consumers["c"].owned
        await flow_b.publish("x", 0)
        await flow_b.wait_idle()
    # Within the lease's time and one claim interval of the last renewal.
    assert taken_over <= TTL + TTL / 3 + 0.1
    # a stopped handling (its call of 2 was cancelled) before b started.
    assert_never_two_at_once(log)
    assert ("cancel", 2, "a") in log
    assert ended(log) == [1, 2, 3]
    assert [tag for what, _, tag in log if what == "end"] == ["a", "b", "b"]


async def test_an_owner_whose_lease_was_taken_never_moves_the_cursor_again(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryStore()
    log: list[tuple[str, int, str]] = []
    a = tracking_app(store, log, "a")
    async with trioflow.open_flow(a) as flow:
        await flow.publish("x", 0)
        await flow.wait_idle()
        assert await store.load_cursors() == {"c": 1}
        # Another flow takes the lease over behind a's back (as if a had
        # been paused past its lease, and had not noticed yet).
        holder = flow.statistics().holder
        await store.release_leases(holder, ["c"])
        (lease,) = await store.claim_leases("intruder", ["c"], 3600.0)
        assert lease.holder == "intruder"
        for _ in range(3):
            await flow.publish("x", 0)
        # Before a's next claim: its cursor write is refused, and that is
        # how it learns it lost the lease.
        with trio.move_on_after(0.5):
            await flow.wait_idle()
        assert trio.current_time() < TTL / 3
        assert await store.load_cursors() == {"c": 1}
        assert not flow.statistics().consumers["c"].owned
        assert "refused a write" in caplog.text
        await trio.sleep(TTL)
        assert flow.statistics().consumers["c"].owner == "intruder"
    assert await store.load_cursors() == {"c": 1}
    assert "took its lease over" in caplog.text


async def test_a_handler_in_flight_is_cancelled_when_the_lease_is_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    log: list[tuple[str, int, str]] = []
    a = tracking_app(store, log, "a")
    async with trioflow.open_flow(a) as flow:
        await flow.publish("x", 1000)
        await trio.sleep(1)
        assert log == [("start", 1, "a")]
        await store.release_leases(flow.statistics().holder, ["c"])
        await store.claim_leases("intruder", ["c"], 3600.0)
        # Learned at the next renewal, within a third of the lease's time.
        await trio.sleep(TTL / 3 + 0.1)
        assert not flow.statistics().consumers["c"].owned
        # At once, not at the flow's stop.
        assert log == [("start", 1, "a"), ("cancel", 1, "a")]
    assert log == [("start", 1, "a"), ("cancel", 1, "a")]
    assert await store.load_cursors() == {"c": 0}


async def test_a_flow_takes_a_consumer_back_and_restarts_from_the_stored_cursor(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    log: list[tuple[str, int, str]] = []
    a = tracking_app(store, log, "a")
    async with trioflow.open_flow(a) as flow:
        await flow.publish("x", 0)
        await flow.wait_idle()
        await store.release_leases(flow.statistics().holder, ["c"])
        await store.claim_leases("intruder", ["c"], TTL)
        await trio.sleep(TTL / 3 + 0.1)
        assert not flow.statistics().consumers["c"].owned
        for _ in range(4):
            await flow.publish("x", 0)
        # The intruder handled 2 and 3, committed, and died.
        assert await store.commit_cursors({"c": 3}, fences={"c": 2}) == set()
        with trio.fail_after(3 * TTL):
            await until(lambda: flow.statistics().consumers["c"].owned)
        await flow.wait_idle()
    # 2 and 3 were the intruder's; a resumed from its cursor.
    assert ended(log) == [1, 4, 5]


async def test_open_flow_does_not_wait_for_consumers_another_flow_owns(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    await store.claim_leases("elsewhere", ["c"], 3600.0)
    log: list[tuple[str, int, str]] = []
    async with trioflow.open_flow(tracking_app(store, log, "a")) as flow:
        stats = flow.statistics().consumers["c"]
        assert (stats.owned, stats.owner) == (False, "elsewhere")
        assert stats.attached is False
    assert log == []


async def test_wait_idle_waits_for_the_owners_stored_cursor(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    await store.claim_leases("elsewhere", ["c"], 3600.0)
    log: list[tuple[str, int, str]] = []
    async with trioflow.open_flow(tracking_app(store, log, "a")) as flow:
        await flow.publish("x")
        with trio.move_on_after(10) as waited:
            await flow.wait_idle()
        assert waited.cancelled_caught
        await store.commit_cursors({"c": 1})
        with trio.fail_after(1):
            await flow.wait_idle()
    assert log == []


async def test_a_consumer_whose_owner_died_is_taken_over_by_wait_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    # A flow that died without releasing its lease.
    await store.claim_leases("dead", ["c"], TTL)
    log: list[tuple[str, int, str]] = []
    async with trioflow.open_flow(tracking_app(store, log, "a")) as flow:
        await flow.publish("x")
        with trio.fail_after(2 * TTL):
            await flow.wait_idle()
        assert flow.statistics().consumers["c"].owned
    assert ended(log) == [1]


async def test_dead_letters_of_a_consumer_this_flow_lost_are_not_recorded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    app = trioflow.App(store, lease_ttl=TTL)
    took_over = trio.Event()

    @app.consumer("c", retry=trioflow.Retry(attempts=2, initial=10.0), on_exhausted="dead-letter")
    async def fail(event: trioflow.Event) -> None:
        if event.seq == 1 and not took_over.is_set():
            took_over.set()
            await store.release_leases(holder[0], ["c"])
            await store.claim_leases("intruder", ["c"], 3600.0)
        raise RuntimeError("poison")

    holder: list[str] = []
    async with trioflow.open_flow(app) as flow:
        holder.append(flow.statistics().holder)
        await flow.publish("x")
        await trio.sleep(3 * TTL)
        assert not flow.statistics().consumers["c"].owned
    assert await store.dead_letters() == []
    assert await store.load_cursors() == {"c": 0}


async def test_a_start_up_whose_claims_keep_failing_can_be_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    faulty = FaultyStore(MemoryStore())
    faulty.fail_next("claim_leases", times=10**6)
    log: list[tuple[str, int, str]] = []
    with trio.move_on_after(30) as scope:
        async with trioflow.open_flow(tracking_app(faulty, log, "a")):
            pytest.fail("a flow whose claims all fail cannot have started")
    assert scope.cancelled_caught
    assert faulty.calls["claim_leases"] > 3


async def test_claims_that_fail_are_logged_and_an_owner_gives_up_in_time(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    faulty = FaultyStore(MemoryStore())
    log: list[tuple[str, int, str]] = []
    async with trioflow.open_flow(tracking_app(faulty, log, "a")) as flow:
        assert flow.statistics().consumers["c"].owned
        # Claims hang (a store that stopped answering) rather than fail.
        faulty.delay_next("claim_leases", 10 * TTL, times=10**6)
        start = trio.current_time()
        with trio.fail_after(2 * TTL):
            await until(lambda: not flow.statistics().consumers["c"].owned)
        # Never later than a lease's time after the last renewal was sent.
        assert trio.current_time() - start <= TTL
    with caplog.at_level(logging.WARNING):
        assert "could not renew its lease" in caplog.text


def test_lease_ttl_is_checked() -> None:
    for bad in (0, -1, float("inf"), float("nan"), "6", True, None):
        with pytest.raises(trioflow.ConfigurationError, match="lease_ttl"):
            trioflow.App("memory://", lease_ttl=bad)  # type: ignore[arg-type]
    assert trioflow.App("memory://").lease_ttl == 6.0


async def test_a_claim_under_way_at_a_graceful_stop_does_not_take_the_lease_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    faulty = FaultyStore(store)
    log: list[tuple[str, int, str]] = []
    async with trioflow.open_flow(tracking_app(faulty, log, "a")) as flow:
        assert flow.statistics().consumers["c"].owned
        # The next renewal is slow to land; the flow stops meanwhile.
        faulty.delay_next("claim_leases", 1.0, land_late=True)
        await trio.sleep(TTL / 3 + 0.01)
    assert await store.leases() == []
