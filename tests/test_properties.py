"""Property tests: order and no loss under random load, slowdowns and failures.

Each example runs a whole scenario on the in-memory store under
`trio.testing.MockClock(autojump_threshold=0)`, so slowdowns and restart
backoffs cost no real time and runs are deterministic for a given example.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import attrs
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trioflow
from trioflow.stores import Store
from trioflow.stores.memory import MemoryStore

TYPES = ("a", "b", "c")


@attrs.frozen
class ConsumerPlan:
    buffer: int | None
    commit_every: int
    types: frozenset[str] | None
    #: Virtual seconds its handler sleeps, cycled over the events it handles.
    delays: tuple[float, ...]
    #: seq -> how many times its handler raises before it succeeds.
    failures: Mapping[int, int]


@attrs.frozen
class Scenario:
    #: Batches of event types to publish, with a pause (virtual s) after each.
    batches: tuple[tuple[tuple[str, ...], float], ...]
    consumers: tuple[ConsumerPlan, ...]
    #: Indexes of batches after which the flow is stopped and reopened.
    reopen_after: frozenset[int]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    batches = tuple(
        draw(
            st.lists(
                st.tuples(
                    st.lists(st.sampled_from(TYPES), min_size=1, max_size=12).map(tuple),
                    st.sampled_from([0.0, 0.0, 0.1, 1.0, 5.0]),
                ),
                min_size=1,
                max_size=12,
            )
        )
    )
    total = sum(len(types) for types, _ in batches)
    consumers = tuple(
        ConsumerPlan(
            buffer=draw(st.none() | st.integers(1, 15)),
            commit_every=draw(st.integers(1, 10)),
            types=draw(st.none() | st.frozensets(st.sampled_from(TYPES), min_size=1)),
            delays=tuple(
                draw(st.lists(st.sampled_from([0.0, 0.0, 0.01, 0.5, 3.0]), min_size=1, max_size=5))
            ),
            failures=draw(
                st.dictionaries(st.integers(1, total), st.integers(1, 2), max_size=min(total, 4))
            ),
        )
        for _ in range(draw(st.integers(1, 4)))
    )
    reopen = draw(st.frozensets(st.integers(0, len(batches) - 1), max_size=2))
    return Scenario(batches=batches, consumers=consumers, reopen_after=reopen)


def run_scenario(
    scenario: Scenario,
    store: Store | None = None,
    *,
    time_scale: float = 1.0,
    mock_clock: bool = True,
) -> tuple[list[str], dict[int, list[tuple[str, int]]], int]:
    """Run it; return the published types in seq order and each consumer's log.

    Delays and pauses are multiplied by ``time_scale``; with ``mock_clock``
    they cost no real time. Stores doing real I/O need the real clock.
    """
    store = MemoryStore() if store is None else store
    logs: dict[int, list[tuple[str, int]]] = {i: [] for i in range(len(scenario.consumers))}
    published: list[str] = []
    failed_so_far: dict[int, dict[int, int]] = {i: {} for i in range(len(scenario.consumers))}
    most_over_buffer = 0

    def build_app() -> trioflow.App:
        app = trioflow.App(
            store,
            page_size=4,
            restart=trioflow.RestartPolicy(initial=0.5 * time_scale, maximum=4.0 * time_scale),
        )
        for index, plan in enumerate(scenario.consumers):
            log = logs[index]
            failed = failed_so_far[index]

            async def handle(
                event: trioflow.Event,
                plan: ConsumerPlan = plan,
                log: list[tuple[str, int]] = log,
                failed: dict[int, int] = failed,
            ) -> None:
                log.append(("start", event.seq))
                await trio.sleep(plan.delays[len(log) % len(plan.delays)] * time_scale)
                if failed.get(event.seq, 0) < plan.failures.get(event.seq, 0):
                    failed[event.seq] = failed.get(event.seq, 0) + 1
                    log.append(("fail", event.seq))
                    raise RuntimeError(f"planned failure at {event.seq}")
                log.append(("end", event.seq))

            app.consumer(
                f"c{index}",
                types=plan.types,
                buffer=plan.buffer,
                commit_every=plan.commit_every,
            )(handle)
        return app

    async def main() -> None:
        nonlocal most_over_buffer
        batches = list(enumerate(scenario.batches))
        while batches:
            async with trioflow.open_flow(build_app()) as flow:
                while batches:
                    index, (types, pause) = batches.pop(0)
                    if len(types) == 1:
                        await flow.publish(types[0], {"i": index})
                    else:
                        await flow.publish_many([(t, {"i": index}) for t in types])
                    published.extend(types)
                    for plan, stats in zip(
                        scenario.consumers, flow.statistics().consumers.values(), strict=True
                    ):
                        if plan.buffer is not None:
                            most_over_buffer = max(most_over_buffer, stats.buffered - plan.buffer)
                    await trio.sleep(pause * time_scale)
                    if index in scenario.reopen_after:
                        break
                if not batches:
                    with trio.fail_after(10_000 if mock_clock else 120):
                        await flow.wait_idle()

    clock = trio.testing.MockClock(autojump_threshold=0) if mock_clock else None
    trio.run(main, clock=clock)
    return published, logs, most_over_buffer


def check_scenario(
    scenario: Scenario,
    published: list[str],
    logs: dict[int, list[tuple[str, int]]],
    most_over_buffer: int,
) -> None:
    """Assert order, no loss, no overlap and exact redelivery for every consumer."""
    assert most_over_buffer <= 0, "a bounded consumer buffered more than its buffer"
    for index, plan in enumerate(scenario.consumers):
        log = logs[index]
        expected = [
            seq
            for seq, event_type in enumerate(published, start=1)
            if plan.types is None or event_type in plan.types
        ]
        finished = [seq for what, seq in log if what == "end"]
        # Failures redeliver only the failed event, and graceful reopening
        # redelivers nothing: the finished events are exactly the expected.
        assert finished == expected, f"consumer c{index}"
        # Never two at once: every start is closed by its end or failure
        # before the next start.
        for (what, seq), (next_what, next_seq) in zip(log[::2], log[1::2], strict=True):
            assert (what, next_seq) == ("start", seq), f"consumer c{index}: {log}"
            assert next_what in ("end", "fail")
        # After a failure the same event comes first again.
        for (what, seq), (_, next_seq) in itertools.pairwise(log):
            if what == "fail":
                assert next_seq == seq, f"consumer c{index}: {log}"
        assert [seq for what, seq in log if what == "fail"] == [
            seq
            for seq in sorted(plan.failures)
            if seq in expected
            for _ in range(plan.failures[seq])
        ]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenarios())
def test_every_consumer_handles_every_event_once_in_order(scenario: Scenario) -> None:
    check_scenario(scenario, *run_scenario(scenario))
