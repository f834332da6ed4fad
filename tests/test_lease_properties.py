"""Flows competing for the same consumers and group, with faults: one owner at a time.

Several flows share a `MemoryStore` and run the same consumer names; each
publishes, stops gracefully and opens again at random, and claims of some of
them fail or hang at random (as for a process cut off from the store). Under
MockClock the lease times are exact. Checked:

* never two handler calls of one consumer (or one partition of a group) at
  once, across all flows;
* every event handled, and the consumer's stored cursor at the head at the end;
* each owner's run handles events in strictly increasing order;
* an event is handled again only by a run that took the consumer over, and
  only if it came after that consumer's last durable cursor: at most
  ``commit_every`` of them per takeover.
"""

from __future__ import annotations

import itertools
import random

import attrs
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trioflow
from trioflow._groups import partition_of
from trioflow.stores.memory import MemoryStore
from trioflow.testing import FaultyStore

TTL = 3.0
COMMIT_EVERY = 3
NAMES = ("c0", "c1")
GROUP_PARTITIONS = 3


@attrs.frozen
class FlowPlan:
    #: Events published per step; after each step the flow may stop and reopen.
    publishes: tuple[int, ...]
    reopen_after: frozenset[int]
    #: Probability that a claim of this flow fails or hangs.
    claim_faults: float
    delays: tuple[float, ...]


@st.composite
def flow_plans(draw: st.DrawFn) -> FlowPlan:
    steps = draw(st.lists(st.integers(1, 5), min_size=1, max_size=6))
    return FlowPlan(
        publishes=tuple(steps),
        reopen_after=frozenset(draw(st.sets(st.integers(0, len(steps) - 1)))),
        claim_faults=draw(st.sampled_from([0.0, 0.0, 0.3, 0.8])),
        delays=tuple(draw(st.lists(st.sampled_from([0.0, 0.1, 1.0, 4.0]), min_size=1))),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans=st.lists(flow_plans(), min_size=2, max_size=3), seed=st.integers(0, 2**16))
def test_competing_flows_keep_one_owner_and_lose_nothing(plans: list[FlowPlan], seed: int) -> None:
    rng = random.Random(seed)
    store = MemoryStore()
    #: (time, what, consumer, seq, run): "start", "end" or "cancel" of a call.
    log: list[tuple[float, str, str, int, int]] = []
    runs = itertools.count()

    def build(plan: FlowPlan, faulty: FaultyStore) -> tuple[trioflow.App, list[int]]:
        app = trioflow.App(faulty, lease_ttl=TTL, commit_every=COMMIT_EVERY)
        life = [next(runs)]
        calls = itertools.count()
        for name in NAMES:

            async def handle(event: trioflow.Event, name: str = name) -> None:
                log.append((trio.current_time(), "start", name, event.seq, life[0]))
                try:
                    await trio.sleep(plan.delays[next(calls) % len(plan.delays)])
                except trio.Cancelled:
                    log.append((trio.current_time(), "cancel", name, event.seq, life[0]))
                    raise
                log.append((trio.current_time(), "end", name, event.seq, life[0]))

            app.consumer(name)(handle)
        calls_g = itertools.count()

        # A group: its partitions are what must not run twice at once.
        @app.consumer("g", partitions=GROUP_PARTITIONS)
        async def handle_g(event: trioflow.Event) -> None:
            name = f"g/{partition_of(event.key, event.seq, GROUP_PARTITIONS)}"
            log.append((trio.current_time(), "start", name, event.seq, life[0]))
            try:
                await trio.sleep(plan.delays[next(calls_g) % len(plan.delays)])
            except trio.Cancelled:
                log.append((trio.current_time(), "cancel", name, event.seq, life[0]))
                raise
            log.append((trio.current_time(), "end", name, event.seq, life[0]))

        return app, life

    async def run_flow(plan: FlowPlan) -> None:
        faulty = FaultyStore(store)
        if plan.claim_faults:
            faulty.fail_randomly(
                plan.claim_faults,
                rng=random.Random(rng.random()),
                methods=["claim_leases"],
                kinds=["fail", "hang"],
                max_delay=2 * TTL,
            )
        pending = list(enumerate(plan.publishes))
        while pending:
            app, life = build(plan, faulty)
            async with trioflow.open_flow(app) as flow:
                while pending:
                    index, size = pending.pop(0)
                    await flow.publish_many([("x", i, f"k{rng.randrange(5)}") for i in range(size)])
                    await trio.sleep(rng.choice([0.0, 1.0, TTL]))
                    if index in plan.reopen_after:
                        break
            # The next flow of this plan is a new process: a new run.
            life[0] = next(runs)

    async def main() -> None:
        with trio.fail_after(100_000):
            async with trio.open_nursery() as nursery:
                for plan in plans:
                    nursery.start_soon(run_flow, plan)
            app, _ = build(plans[0], FaultyStore(store))
            async with trioflow.open_flow(app) as flow:
                await flow.wait_idle()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    head = len(store._events)
    cursors = trio.run(store.load_cursors)
    keys = {event.seq: event.key for event in store._events}
    partitions = [f"g/{p}" for p in range(GROUP_PARTITIONS)]
    for p, name in enumerate(partitions):
        assert cursors[name] == head, name
        handled = {seq for _, what, n, seq, _ in log if n == name and what == "end"}
        assert handled == {s for s, k in keys.items() if partition_of(k, s, GROUP_PARTITIONS) == p}
    for name in [*NAMES, *partitions]:
        calls = [(t, what, seq, run) for t, what, n, seq, run in log if n == name]
        # Never two calls at once.
        running = None
        for _, what, seq, run in calls:
            if what == "start":
                assert running is None, f"{name}: {(seq, run)} started while {running} ran"
                running = (seq, run)
            else:
                assert running == (seq, run), f"{name}: {what} of {(seq, run)}"
                running = None
        ends = [(seq, run) for _, what, seq, run in calls if what == "end"]
        if name in NAMES:
            assert sorted({seq for seq, _ in ends}) == list(range(1, head + 1)), f"{name}: lost"
            assert cursors[name] == head
        # Per run, strictly increasing (a run that loses the consumer and
        # takes it back never goes back). Repeats only after a takeover (where
        # the handling run changes), at most COMMIT_EVERY each time.
        seen: set[int] = set()
        last_of_run: dict[int, int] = {}
        previous_run = None
        repeats = 0
        for seq, run in ends:
            assert seq > last_of_run.get(run, 0), f"{name}: run {run} went back to {seq}"
            last_of_run[run] = seq
            if run != previous_run:
                previous_run, repeats = run, 0
            if seq in seen:
                repeats += 1
                assert repeats <= COMMIT_EVERY, f"{name}: run {run} redelivered {repeats}"
            seen.add(seq)
