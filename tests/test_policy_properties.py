"""Property test: random failures, timeouts and poison events under every policy.

Each consumer draws a policy (``retry-forever``, ``dead-letter``, ``halt``;
attempts, a timeout, a bounded buffer that catches up or blocks) and events
that fail a few times, time out a few times, or always fail (poison). Flows
are stopped and reopened, a consumer is removed and added again, halted
consumers are resumed and dead letters requeued. At the end the poison is
healed, every halted consumer resumed and every dead letter requeued; then:

* every consumer handled every event of its types exactly once;
* in sequence order, except events handled again from a requeue, which come
  after later ones by nature;
* never two at once;
* a halted consumer's cursor stayed below the event it halted at;
* a ``retry-forever`` consumer never recorded a dead letter.

On the memory store under an autojump MockClock: backoffs and timeouts cost
no virtual time that matters, and runs are exact.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import attrs
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trioflow
from tests import _mending as mending
from trioflow._policies import ON_EXHAUSTED, OVERFLOWS
from trioflow.stores.memory import MemoryStore

TYPES = ("a", "b")


@attrs.frozen
class ConsumerPlan:
    on_exhausted: trioflow.OnExhausted
    attempts: int
    timeout: float | None
    buffer: int | None
    overflow: trioflow.Overflow
    types: frozenset[str] | None
    #: seq -> failed attempts before it succeeds; "poison" ones fail until healed.
    flaky: dict[int, int]
    slow: dict[int, int]
    poison: frozenset[int]


@attrs.frozen
class Scenario:
    batches: tuple[tuple[str, ...], ...]
    consumers: tuple[ConsumerPlan, ...]
    reopen_after: frozenset[int]
    #: After these batches: resume halted consumers and requeue dead letters.
    mend_after: frozenset[int]
    #: After this batch the last consumer is removed, and added again after the next.
    remove_after: int | None


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    batches = tuple(
        tuple(draw(st.lists(st.sampled_from(TYPES), min_size=1, max_size=6)))
        for _ in range(draw(st.integers(1, 8)))
    )
    total = sum(map(len, batches))
    seqs = st.integers(1, total)

    def plan() -> ConsumerPlan:
        buffer = draw(st.none() | st.integers(1, 6))
        return ConsumerPlan(
            on_exhausted=draw(st.sampled_from(ON_EXHAUSTED)),
            attempts=draw(st.integers(1, 3)),
            timeout=draw(st.none() | st.just(1.0)),
            buffer=buffer,
            overflow="catch-up" if buffer is None else draw(st.sampled_from(OVERFLOWS)),
            types=draw(st.none() | st.frozensets(st.sampled_from(TYPES), min_size=1)),
            flaky=draw(st.dictionaries(seqs, st.integers(1, 3), max_size=3)),
            slow=draw(st.dictionaries(seqs, st.integers(1, 2), max_size=2)),
            poison=draw(st.frozensets(seqs, max_size=2)),
        )

    consumers = tuple(plan() for _ in range(draw(st.integers(1, 3))))
    indexes = st.integers(0, len(batches) - 1)
    return Scenario(
        batches=batches,
        consumers=consumers,
        reopen_after=draw(st.frozensets(indexes, max_size=2)),
        mend_after=draw(st.frozensets(indexes, max_size=2)),
        remove_after=draw(st.none() | indexes),
    )


@attrs.define
class Run:
    #: consumer -> [(what, seq)], what in start/end/fail/cancel.
    logs: dict[str, list[tuple[str, int]]]
    #: consumer -> seqs handed back by a requeue.
    requeued: dict[str, set[int]]
    #: consumer -> (seq halted at, cursor then), as statistics reported them.
    halts: dict[str, list[tuple[int, int]]]
    dead_lettered: dict[str, int]
    published: list[str]


def run_scenario(scenario: Scenario) -> Run:
    store = MemoryStore()
    names = [f"c{i}" for i in range(len(scenario.consumers))]
    run = Run(
        logs={name: [] for name in names},
        requeued={name: set() for name in names},
        halts={name: [] for name in names},
        dead_lettered=dict.fromkeys(names, 0),
        published=[],
    )
    healed = False
    calls: dict[tuple[str, int], int] = {}

    def handler_for(name: str, plan: ConsumerPlan) -> Callable[[trioflow.Event], Awaitable[None]]:
        log = run.logs[name]

        async def handle(event: trioflow.Event) -> None:
            seq = event.seq
            attempt = calls[name, seq] = calls.get((name, seq), 0) + 1
            log.append(("start", seq))
            try:
                if attempt <= plan.slow.get(seq, 0):
                    await trio.sleep(5)  # past any timeout
                else:
                    await trio.sleep(0.1)
            except trio.Cancelled:
                log.append(("cancel", seq))
                raise
            if (seq in plan.poison and not healed) or attempt <= plan.flaky.get(seq, 0):
                log.append(("fail", seq))
                raise RuntimeError(f"planned failure of {seq}")
            log.append(("end", seq))

        return handle

    def options(plan: ConsumerPlan) -> trioflow.ConsumerOptions:
        return {
            "on_exhausted": plan.on_exhausted,
            "retry": trioflow.Retry(attempts=plan.attempts, initial=0.5, maximum=2.0),
            "timeout": plan.timeout,
            "buffer": plan.buffer,
            "overflow": plan.overflow,
            "types": plan.types,
        }

    def build_app() -> trioflow.App:
        app = trioflow.App(store, page_size=4)
        for name, plan in zip(names, scenario.consumers, strict=True):
            app.consumer(name, **options(plan))(handler_for(name, plan))
        return app

    async def note_halts(flow: trioflow.Flow) -> None:
        for name, stats in flow.statistics().consumers.items():
            if stats.halted and stats.stall is not None:
                run.halts[name].append((stats.stall.seq, stats.cursor))
            run.dead_lettered[name] = max(run.dead_lettered[name], stats.dead_lettered)

    async def mend(flow: trioflow.Flow) -> None:
        await note_halts(flow)
        await mending.mend(flow, run.requeued.__getitem__)

    async def main() -> None:
        nonlocal healed
        removed: str | None = None
        batches = list(enumerate(scenario.batches))
        while batches:
            async with trioflow.open_flow(build_app()) as flow:
                if removed is not None:
                    await flow.remove_consumer(removed)
                while batches:
                    index, types = batches.pop(0)
                    # A consumer with overflow="block" held up at an event
                    # holds publishers back as long (by design): give up then.
                    with trio.move_on_after(60):
                        await flow.publish_many([(t, {"i": index}) for t in types])
                    await trio.sleep(3)
                    await note_halts(flow)
                    if index in scenario.mend_after:
                        await mend(flow)
                    if index == scenario.remove_after and removed is None and names:
                        removed = names[-1]
                        await flow.remove_consumer(removed)
                    elif removed is not None:
                        plan = scenario.consumers[names.index(removed)]
                        await flow.add_consumer(
                            removed, handler_for(removed, plan), **options(plan)
                        )
                        removed = None
                    if index in scenario.reopen_after:
                        break
        healed = True
        async with trioflow.open_flow(build_app()) as flow:
            await mending.settle(flow, mend)
            await note_halts(flow)
        # What was published: a publish given up on may or may not have been.
        async with store.open():
            while page := await store.read(len(run.published), 100):
                run.published.extend(event.type for event in page)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return run


def check(scenario: Scenario, run: Run) -> None:
    for index, plan in enumerate(scenario.consumers):
        name = f"c{index}"
        log = run.logs[name]
        expected = [
            seq
            for seq, event_type in enumerate(run.published, start=1)
            if plan.types is None or event_type in plan.types
        ]
        ends = [seq for what, seq in log if what == "end"]
        assert sorted(ends) == expected, f"{name}: not every event handled once: {log}"
        # In order, but for events handled from a requeue (they come later).
        in_stream = [seq for seq in ends if seq not in run.requeued[name]]
        assert in_stream == sorted(in_stream), f"{name}: out of order: {log}"
        # Never two at once.
        for (what, seq), (next_what, next_seq) in zip(log[::2], log[1::2], strict=True):
            assert (what, next_seq) == ("start", seq), f"{name}: {log}"
            assert next_what in ("end", "fail", "cancel"), f"{name}: {log}"
        for seq, cursor in run.halts[name]:
            assert cursor < seq, f"{name} halted at {seq} with its cursor at {cursor}"
        if plan.on_exhausted == "retry-forever":
            assert run.dead_lettered[name] == 0
            assert not run.requeued[name]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenarios())
def test_every_policy_handles_every_event_once_in_order_or_dead_letters_it(
    scenario: Scenario,
) -> None:
    check(scenario, run_scenario(scenario))
