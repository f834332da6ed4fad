"""Property test: several flows share one store whose every call may fail.

Each flow stands for a process: it has its own consumers and its own
`FaultyStore` around the shared store, and publishes its own events. Every
store call of every flow may fail, lose its answer (an append committed, a
cursor written, the caller told it failed) or hang, at random, also while
flows start; flows are stopped and reopened mid-run. Then the faults stop,
every flow reopens and waits until idle, and the run is checked:

* no hang: the whole run ends;
* publishes that raised a plain `StoreError` are not in the log; publishes in
  doubt (`OutcomeUnknownError`) are in it whole or not at all; the others are
  in it with the sequence numbers they returned;
* every consumer handled every logged event of its types, in sequence order,
  never two at once;
* within a flow's life a consumer never handles an event again (store faults
  delay, they do not rewind); across a reopen it handles again at most
  ``commit_every`` events;
* the cursors each flow writes to the store never move backwards.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trioflow
from trioflow.stores import Store
from trioflow.stores.memory import MemoryStore
from trioflow.stores.sqlite import SQLiteStore
from trioflow.testing import FaultyStore
from trioflow.testing._faults import FAULT_KINDS, FaultKind

TYPES = ("a", "b")


@attrs.frozen
class ConsumerPlan:
    buffer: int | None
    #: Events here are about 20 bytes each.
    buffer_bytes: int | None
    commit_every: int
    types: frozenset[str] | None
    #: Virtual seconds its handler sleeps, cycled over its calls.
    delays: tuple[float, ...]
    #: Every this-many-th handler call raises (0: never).
    fail_every: int


@attrs.frozen
class FlowPlan:
    consumers: tuple[ConsumerPlan, ...]
    #: Sizes of the publish calls it makes (1: publish, more: publish_many).
    publishes: tuple[int, ...]
    #: Indexes of publishes after which it is stopped and reopened.
    reopen_after: frozenset[int]


@attrs.frozen
class FaultScenario:
    flows: tuple[FlowPlan, ...]
    probability: float
    kinds: tuple[FaultKind, ...]
    seed: int
    page_bytes: int


@st.composite
def fault_scenarios(draw: st.DrawFn) -> FaultScenario:
    def consumer() -> ConsumerPlan:
        return ConsumerPlan(
            buffer=draw(st.none() | st.integers(1, 8)),
            buffer_bytes=draw(st.none() | st.integers(1, 150)),
            commit_every=draw(st.integers(1, 6)),
            types=draw(st.none() | st.frozensets(st.sampled_from(TYPES), min_size=1)),
            delays=tuple(draw(st.lists(st.sampled_from([0.0, 0.01, 0.3]), min_size=1, max_size=3))),
            fail_every=draw(st.sampled_from([0, 0, 3, 7])),
        )

    flows = []
    for _ in range(draw(st.integers(1, 3))):
        publishes = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=10)))
        flows.append(
            FlowPlan(
                consumers=tuple(consumer() for _ in range(draw(st.integers(0, 2)))),
                publishes=publishes,
                reopen_after=draw(st.frozensets(st.integers(0, len(publishes) - 1), max_size=2)),
            )
        )
    return FaultScenario(
        flows=tuple(flows),
        probability=draw(st.sampled_from([0.05, 0.15, 0.3])),
        kinds=tuple(
            draw(st.lists(st.sampled_from(FAULT_KINDS), min_size=1, max_size=4, unique=True))
        ),
        seed=draw(st.integers(0, 2**32)),
        page_bytes=draw(st.sampled_from([1, 50, 8 * 1024 * 1024])),
    )


@attrs.define
class Record:
    """What a run saw, for the checks."""

    #: (tag, size, outcome, seqs): outcome is "ok", "failed" or "unknown".
    publishes: list[tuple[int, int, str, Sequence[int]]] = attrs.Factory(list)
    #: consumer -> [(what, seq, life)], what in start/end/fail/cancel.
    handled: dict[str, list[tuple[str, int, int]]] = attrs.Factory(dict)
    #: consumer -> the cursors written for it, in the order they landed.
    cursors: dict[str, list[int]] = attrs.Factory(dict)


#: Makes a store handle (not opened) on the shared store, for one flow, a
#: "process", to open and close as it runs; or, at the end, to read the log.
NewHandle = Callable[[], Store]


def run_fault_scenario(
    scenario: FaultScenario,
    new_handle: NewHandle,
    *,
    time_scale: float = 1.0,
    mock_clock: bool = True,
) -> tuple[Record, list[trioflow.Event]]:
    """Run it; return what happened and the final log of the store."""
    record = Record()
    rng = random.Random(scenario.seed)
    lives = iter(range(1, 1_000_000))
    tags = iter(range(1_000_000))

    def build_app(flow_index: int, store: FaultyStore) -> tuple[trioflow.App, list[int]]:
        app = trioflow.App(
            store,
            page_size=4,
            page_bytes=scenario.page_bytes,
            commit_interval=1.0 * time_scale,
            shutdown_grace=5.0 * time_scale,
            restart=trioflow.RestartPolicy(initial=0.2 * time_scale, maximum=2.0 * time_scale),
            # A flow reopened after a stop whose release failed waits for the lapse.
            lease_ttl=30.0 * time_scale,
        )
        life = [next(lives)]
        for index, plan in enumerate(scenario.flows[flow_index].consumers):
            name = f"f{flow_index}c{index}"
            log = record.handled.setdefault(name, [])
            calls = [0]

            async def handle(
                event: trioflow.Event,
                plan: ConsumerPlan = plan,
                log: list[tuple[str, int, int]] = log,
                calls: list[int] = calls,
            ) -> None:
                log.append(("start", event.seq, life[0]))
                calls[0] += 1
                try:
                    await trio.sleep(plan.delays[calls[0] % len(plan.delays)] * time_scale)
                except trio.Cancelled:
                    # Past the grace period of a stop: not handled.
                    log.append(("cancel", event.seq, life[0]))
                    raise
                if plan.fail_every and calls[0] % plan.fail_every == 0:
                    log.append(("fail", event.seq, life[0]))
                    raise RuntimeError(f"planned failure at {event.seq}")
                log.append(("end", event.seq, life[0]))

            app.consumer(
                name,
                types=plan.types,
                buffer=plan.buffer,
                buffer_bytes=plan.buffer_bytes,
                commit_every=plan.commit_every,
            )(handle)
        return app, life

    async def publish(flow: trioflow.Flow, size: int) -> None:
        tag = next(tags)
        items = [(TYPES[(tag + i) % len(TYPES)], {"tag": tag, "i": i}) for i in range(size)]
        try:
            if size == 1:
                seqs: Sequence[int] = [await flow.publish(*items[0])]
            else:
                seqs = await flow.publish_many(items)
        except trioflow.OutcomeUnknownError:
            record.publishes.append((tag, size, "unknown", ()))
        except trioflow.StoreError:
            record.publishes.append((tag, size, "failed", ()))
        else:
            record.publishes.append((tag, size, "ok", seqs))

    async def run_flow(flow_index: int, faulty: FaultyStore) -> None:
        plan = scenario.flows[flow_index]
        pending = list(enumerate(plan.publishes))
        while pending:
            app, life = build_app(flow_index, faulty)
            async with trioflow.open_flow(app) as flow:
                life[0] = next(lives)
                while pending:
                    index, size = pending.pop(0)
                    await publish(flow, size)
                    await trio.sleep(rng.choice([0.0, 0.1, 1.0]) * time_scale)
                    if index in plan.reopen_after:
                        break

    async def settle(flow_index: int, faulty: FaultyStore) -> None:
        app, _ = build_app(flow_index, faulty)
        async with trioflow.open_flow(app) as flow:
            await flow.wait_idle()

    async def main() -> list[trioflow.Event]:
        faulties = []
        for _ in scenario.flows:
            faulty = FaultyStore(new_handle())
            faulty.fail_randomly(
                scenario.probability,
                rng=rng,
                kinds=scenario.kinds,
                max_delay=2.0 * time_scale,
            )
            faulties.append(faulty)
        with trio.fail_after(100_000 if mock_clock else 300):
            async with trio.open_nursery() as nursery:
                for index, faulty in enumerate(faulties):
                    nursery.start_soon(run_flow, index, faulty)
            for faulty in faulties:
                faulty.fail_randomly(0, rng=rng)
            # Every flow's consumers idle at the end of the log, one by one:
            # a flow's wait_idle also waits for events other flows appended.
            for index, faulty in enumerate(faulties):
                await settle(index, faulty)
        for faulty in faulties:
            for commit in faulty.cursor_commits:
                for name, seq in commit.items():
                    record.cursors.setdefault(name, []).append(seq)
        log: list[trioflow.Event] = []
        store = new_handle()
        async with store.open():
            while page := await store.read(log[-1].seq if log else 0, 1000):
                log.extend(page)
        return log

    clock = trio.testing.MockClock(autojump_threshold=0) if mock_clock else None
    log = trio.run(main, clock=clock)
    return record, log


def check_fault_scenario(
    scenario: FaultScenario, record: Record, log: list[trioflow.Event]
) -> None:
    """Assert the properties the module docstring lists."""
    by_tag: dict[int, list[trioflow.Event]] = {}
    for event in log:
        by_tag.setdefault(event.data["tag"], []).append(event)
    assert [e.seq for e in log] == sorted({e.seq for e in log}), "repeated or unordered seqs"
    for tag, size, outcome, seqs in record.publishes:
        found = by_tag.get(tag, [])
        if outcome == "failed":
            assert found == [], f"publish {tag} raised StoreError but is in the log"
        elif outcome == "unknown":
            assert len(found) in (0, size), f"publish {tag} in doubt is in the log in part"
        else:
            assert [e.seq for e in found] == list(seqs), f"publish {tag}: seqs differ"
            assert [e.data["i"] for e in found] == list(range(size))
    for flow_index, flow in enumerate(scenario.flows):
        for index, plan in enumerate(flow.consumers):
            name = f"f{flow_index}c{index}"
            events = record.handled.get(name, [])
            expected = [e.seq for e in log if plan.types is None or e.type in plan.types]
            ends = [(seq, life) for what, seq, life in events if what == "end"]
            # Never two at once: every start is closed before the next start.
            for (what, seq, _), (next_what, next_seq, _) in zip(
                events[::2], events[1::2], strict=True
            ):
                assert what == "start" and next_seq == seq, f"{name}: {events}"
                assert next_what in ("end", "fail", "cancel"), f"{name}: {events}"
            # Every expected event handled, in order, with bounded redelivery.
            assert sorted({seq for seq, _ in ends}) == expected, f"{name}: lost events"
            previous_seq, previous_life = 0, 0
            for seq, life in ends:
                if life == previous_life:
                    assert seq > previous_seq, f"{name}: {seq} handled again in one life"
                elif seq <= previous_seq:
                    again = [s for s in expected if seq <= s <= previous_seq]
                    assert len(again) <= plan.commit_every, (
                        f"{name}: {len(again)} events handled again after a reopen, "
                        f"more than commit_every={plan.commit_every}"
                    )
                previous_seq, previous_life = seq, life
            cursors = record.cursors.get(name, [])
            assert cursors == sorted(cursors), f"{name}: a cursor moved backwards: {cursors}"


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(fault_scenarios())
def test_store_faults_delay_delivery_but_never_lose_or_reorder(scenario: FaultScenario) -> None:
    # Flows sharing one MemoryStore stand for processes sharing a database.
    shared = MemoryStore()
    record, log = run_fault_scenario(scenario, lambda: shared)
    check_fault_scenario(scenario, record, log)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(scenario=fault_scenarios())
def test_store_faults_on_sqlite(
    scenario: FaultScenario, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("faults") / "events.db"
    # One handle per flow: each flow stands for a process of its own.
    record, log = run_fault_scenario(
        scenario,
        lambda: SQLiteStore(path, poll_interval=0.02),
        time_scale=0.01,
        mock_clock=False,
    )
    check_fault_scenario(scenario, record, log)
