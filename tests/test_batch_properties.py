"""Property test: batch consumers under random load, failures, slowdowns and policies.

Each consumer draws a batch size, a ``max_wait``, a policy (``retry-forever``,
``dead-letter``, ``halt``; attempts, a timeout), a bounded buffer that
catches up or blocks, a type filter, a ``commit_every`` (in batches) and
events that fail a few times, are slow past the timeout a few times, or
always fail (poison). Its handler goes through a batch in order and, at the
first event that fails, either says how far it got (`trioflow.BatchError`)
or fails the batch as a whole; an event counts as done only when the handler
says so (it returned, or raised a BatchError past it). Flows are stopped and
reopened, halted consumers resumed and dead letters requeued; at the end the
poison is healed and everything mended. Then, for every consumer:

* every event of its types was done exactly once (graceful stops and
  failures redeliver nothing done);
* in sequence order, but for events done from a requeue, which come later;
* batches held at most ``batch`` events, in order, and never two at once;
* a retry (or the narrowing after a batch was given up) starts at the first
  event not done;
* only events planned to fail became dead letters or halted the consumer
  (a batch given up on is narrowed down to its failing events), and its
  cursor stayed below the event it halted at;
* the redelivery bound, in batches: whenever a batch of the stream starts
  (not a requeued letter), the durable
  cursor is at or past the end of the batch ``commit_every`` done-batches
  back, so a crash then would redeliver at most ``commit_every`` batches.

On the memory store under an autojump MockClock: exact, and fast.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

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
    batch: int
    max_wait: float | None
    commit_every: int
    on_exhausted: trioflow.OnExhausted
    attempts: int
    timeout: float | None
    buffer: int | None
    overflow: trioflow.Overflow
    types: frozenset[str] | None
    #: Whether its handler says how far it got (BatchError) or fails whole batches.
    says_index: bool
    #: Virtual seconds per event, cycled.
    delays: tuple[float, ...]
    #: seq -> failed attempts before it succeeds; "poison" ones fail until healed.
    flaky: dict[int, int]
    slow: dict[int, int]
    poison: frozenset[int]

    @property
    def failing(self) -> frozenset[int]:
        return frozenset(self.flaky) | frozenset(self.slow) | self.poison


@attrs.frozen
class Scenario:
    publishes: tuple[tuple[tuple[str, ...], float], ...]
    consumers: tuple[ConsumerPlan, ...]
    reopen_after: frozenset[int]
    mend_after: frozenset[int]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    publishes = tuple(
        (
            tuple(draw(st.lists(st.sampled_from(TYPES), min_size=1, max_size=9))),
            draw(st.sampled_from([0.0, 0.0, 0.3, 3.0])),
        )
        for _ in range(draw(st.integers(1, 8)))
    )
    total = sum(len(types) for types, _ in publishes)
    seqs = st.integers(1, total)

    def plan() -> ConsumerPlan:
        buffer = draw(st.none() | st.integers(1, 8))
        return ConsumerPlan(
            batch=draw(st.integers(1, 6)),
            max_wait=draw(st.none() | st.sampled_from([0.2, 1.0])),
            commit_every=draw(st.integers(1, 3)),
            on_exhausted=draw(st.sampled_from(ON_EXHAUSTED)),
            attempts=draw(st.integers(1, 3)),
            timeout=draw(st.none() | st.just(2.0)),
            buffer=buffer,
            overflow="catch-up" if buffer is None else draw(st.sampled_from(OVERFLOWS)),
            types=draw(st.none() | st.frozensets(st.sampled_from(TYPES), min_size=1)),
            says_index=draw(st.booleans()),
            delays=tuple(draw(st.lists(st.sampled_from([0.0, 0.01, 0.1]), min_size=1, max_size=4))),
            flaky=draw(st.dictionaries(seqs, st.integers(1, 3), max_size=3)),
            slow=draw(st.dictionaries(seqs, st.integers(1, 2), max_size=2)),
            poison=draw(st.frozensets(seqs, max_size=2)),
        )

    indexes = st.integers(0, len(publishes) - 1)
    return Scenario(
        publishes=publishes,
        consumers=tuple(plan() for _ in range(draw(st.integers(1, 3)))),
        reopen_after=draw(st.frozensets(indexes, max_size=2)),
        mend_after=draw(st.frozensets(indexes, max_size=2)),
    )


@attrs.define
class Log:
    #: Every call: the seqs handed over, in order.
    calls: list[list[int]] = attrs.Factory(list)
    #: Per call: how many of its events it did.
    did: list[int] = attrs.Factory(list)
    #: Events done, in the order they were.
    done: list[int] = attrs.Factory(list)
    #: Whether a call is running (never two at once).
    running: bool = False
    overlapped: bool = False
    #: Per call: its first seq, the durable cursor and the done-batch ends so
    #: far, as it started.
    starts: list[tuple[int, int, tuple[int, ...]]] = attrs.Factory(list)
    #: The position after each call that did events (its done-batch ends).
    ends: list[int] = attrs.Factory(list)
    requeued: set[int] = attrs.Factory(set)
    halts: list[tuple[int, int]] = attrs.Factory(list)
    dead_lettered: int = 0


def run_scenario(scenario: Scenario) -> tuple[list[str], dict[str, Log]]:
    store = MemoryStore()
    names = [f"c{i}" for i in range(len(scenario.consumers))]
    logs = {name: Log() for name in names}
    published: list[str] = []
    healed = False
    attempts: dict[tuple[str, int], int] = {}

    def handler_for(
        name: str, plan: ConsumerPlan
    ) -> Callable[[Sequence[trioflow.Event]], Awaitable[None]]:
        log = logs[name]

        async def handle(events: Sequence[trioflow.Event]) -> None:
            if log.running:
                log.overlapped = True
            log.running = True
            seqs = [event.seq for event in events]
            log.calls.append(seqs)
            log.did.append(0)
            log.starts.append((seqs[0], store._cursors.get(name, 0), tuple(log.ends)))
            try:
                for index, event in enumerate(events):
                    seq = event.seq
                    attempt = attempts[name, seq] = attempts.get((name, seq), 0) + 1
                    if attempt <= plan.slow.get(seq, 0):
                        await trio.sleep(50)  # past the timeout, if any
                    await trio.sleep(plan.delays[seq % len(plan.delays)])
                    if (seq in plan.poison and not healed) or attempt <= plan.flaky.get(seq, 0):
                        error = RuntimeError(f"planned failure of {seq}")
                        if plan.says_index:
                            if index:
                                log.did[-1] = index
                                log.done.extend(seqs[:index])
                                log.ends.append(seqs[index - 1])
                            raise trioflow.BatchError(index, error)
                        raise error
                    # Not failing now: its next attempt starts afresh.
                    attempts[name, seq] = 0
                log.did[-1] = len(seqs)
                log.done.extend(seqs)
                log.ends.append(seqs[-1])
            finally:
                log.running = False

        return handle

    def build_app() -> trioflow.App:
        app = trioflow.App(store, page_size=5)
        for name, plan in zip(names, scenario.consumers, strict=True):
            app.consumer(
                name,
                batch=plan.batch,
                max_wait=plan.max_wait,
                commit_every=plan.commit_every,
                on_exhausted=plan.on_exhausted,
                retry=trioflow.Retry(attempts=plan.attempts, initial=0.5, maximum=2.0),
                timeout=plan.timeout,
                buffer=plan.buffer,
                overflow=plan.overflow,
                types=plan.types,
            )(handler_for(name, plan))
        return app

    async def note(flow: trioflow.Flow) -> None:
        for name, stats in flow.statistics().consumers.items():
            if stats.halted and stats.stall is not None:
                logs[name].halts.append((stats.stall.seq, stats.cursor))
            logs[name].dead_lettered = max(logs[name].dead_lettered, stats.dead_lettered)

    async def mend(flow: trioflow.Flow) -> None:
        await note(flow)
        await mending.mend(flow, lambda name: logs[name].requeued)

    async def main() -> None:
        nonlocal healed
        publishes = list(enumerate(scenario.publishes))
        while publishes:
            async with trioflow.open_flow(build_app()) as flow:
                while publishes:
                    index, (types, pause) = publishes.pop(0)
                    # A blocking consumer held up at an event holds publishers
                    # back as long (by design): give up then.
                    with trio.move_on_after(60):
                        await flow.publish_many([(t, {"i": index}) for t in types])
                    await trio.sleep(pause)
                    await note(flow)
                    if index in scenario.mend_after:
                        await mend(flow)
                    if index in scenario.reopen_after:
                        break
        healed = True
        async with trioflow.open_flow(build_app()) as flow:
            await mending.settle(flow, mend)
            await note(flow)
        async with store.open():
            while page := await store.read(len(published), 100):
                published.extend(event.type for event in page)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return published, logs


def check(scenario: Scenario, published: list[str], logs: dict[str, Log]) -> None:
    for index, plan in enumerate(scenario.consumers):
        name = f"c{index}"
        log = logs[name]
        expected = [
            seq
            for seq, event_type in enumerate(published, start=1)
            if plan.types is None or event_type in plan.types
        ]
        assert sorted(log.done) == expected, f"{name}: not every event done once: {log.calls}"
        in_stream = [seq for seq in log.done if seq not in log.requeued]
        assert in_stream == sorted(in_stream), f"{name}: out of order: {log.calls}"
        assert not log.overlapped, f"{name}: two calls at once"
        for call in log.calls:
            assert 1 <= len(call) <= plan.batch, f"{name}: batch of {len(call)}: {call}"
            assert call == sorted(call), f"{name}: a batch out of order: {call}"
        # Every call starts at the first event of its types not done (nor
        # given up on), but for requeued letters (handed back later, alone).
        done: set[int] = set()
        position = 0
        for call, did in zip(log.calls, log.did, strict=True):
            if call[0] <= position:
                assert call == [call[0]] and call[0] in log.requeued, f"{name}: {log.calls}"
            else:
                # Those it passed were given up on (dead letters, requeued later).
                passed = {seq for seq in expected if position < seq < call[0]} - done
                assert passed <= log.requeued, f"{name}: {log.calls}"
            if did:
                position = max(position, call[did - 1])
                done.update(call[:did])
        # Only failing events were given up on.
        assert log.requeued <= plan.failing, f"{name}: gave up on {log.requeued - plan.failing}"
        for seq, cursor in log.halts:
            assert seq in plan.failing, f"{name} halted at {seq}, which never failed"
            assert cursor < seq, f"{name} halted at {seq} with its cursor at {cursor}"
        if plan.on_exhausted == "retry-forever":
            assert log.dead_lettered == 0 and not log.requeued
        # The redelivery bound, in batches (a requeued letter, behind the
        # cursor, is redelivered until it is removed, whatever the bound).
        for first, durable, ends in log.starts:
            if first > durable and len(ends) >= plan.commit_every:
                bound = ends[-plan.commit_every]
                assert durable >= bound, (
                    f"{name}: a batch started with its cursor at {durable}, behind {bound}, "
                    f"the end of the batch commit_every={plan.commit_every} back: {ends}"
                )


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenarios())
def test_batch_consumers_do_every_event_once_in_order_within_the_bound(
    scenario: Scenario,
) -> None:
    check(scenario, *run_scenario(scenario))
