"""The property of pruning: for any cursors, dead letters and retention settings, no
event a cursor needs or a letter refers to is deleted, and replay after pruning loses
nothing.

Each example builds a log in batches, stores cursors and parked dead letters,
plans a prune by sequence number or by age, runs it (or checks its refusal),
then opens a flow on the pruned store: every consumer with a cursor must
replay exactly the events after it, and a new ``start="earliest"`` consumer
exactly the events after the pruned log. The same cases run on PostgreSQL in
tests/postgres/test_retention_properties.py.
"""

from __future__ import annotations

import datetime
import pathlib
from collections.abc import Awaitable, Callable

import attrs
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trioflow
from trioflow.stores import Store
from trioflow.stores.memory import MemoryStore
from trioflow.stores.sqlite import SQLiteStore
from trioflow.testing._store_contract import make_events, make_letter, read_all

_HOUR = datetime.timedelta(hours=1)
_TICK = datetime.timedelta(microseconds=1)
_CONSUMERS = ("c0", "c1", "c2")


@attrs.frozen
class Case:
    """One example: the log, its cursors and letters, and the prune asked for.

    Positions are fractions of the log, resolved to sequence numbers once it
    is written (stores may number with holes).
    """

    batches: tuple[int, ...]
    cursors: dict[str, float]
    letters: tuple[tuple[str, float], ...]
    #: ("before", fraction of the log) or ("age", event fraction, -1/0/+1 µs).
    bound: tuple[str, float, int]
    batch_size: int
    only_passed: bool


_fractions = st.floats(0.0, 1.0)
cases = st.builds(
    Case,
    batches=st.lists(st.integers(1, 6), min_size=1, max_size=6).map(tuple),
    cursors=st.dictionaries(st.sampled_from(_CONSUMERS), _fractions, max_size=3),
    letters=st.lists(st.tuples(st.sampled_from(_CONSUMERS), _fractions), max_size=4).map(tuple),
    bound=st.one_of(
        st.tuples(st.just("before"), st.floats(0.0, 1.2), st.just(0)),
        st.tuples(st.just("age"), _fractions, st.integers(-1, 1)),
    ),
    batch_size=st.integers(1, 8),
    only_passed=st.booleans(),
)


def _pick(seqs: list[int], fraction: float) -> int:
    """The seq at ``fraction`` of ``seqs`` (0 before the first)."""
    index = round(fraction * len(seqs))
    return 0 if index == 0 else seqs[min(index, len(seqs)) - 1]


def check_case(case: Case, handle: Callable[[], Store]) -> None:
    """Run ``case`` on a fresh log; ``handle()`` gives an unopened handle on it."""
    trio.run(_check_case, case, handle)


async def _check_case(case: Case, handle: Callable[[], Store]) -> None:
    store = handle()
    async with store.open():
        for size in case.batches:
            await store.append(make_events(size))
        events = await read_all(store)
        seqs = [event.seq for event in events]
        cursors = {name: _pick(seqs, fraction) for name, fraction in case.cursors.items()}
        await store.commit_cursors(cursors)
        lettered = {(name, _pick(seqs, fraction)) for name, fraction in case.letters}
        lettered = {(name, seq) for name, seq in lettered if seq}
        for name, seq in sorted(lettered):
            await store.record_dead_letter(make_letter(name, seq), cursor=None)
        kind, fraction, ticks = case.bound
        if kind == "before":
            before = max(1, round(fraction * (seqs[-1] + 1)))
            plan = await trioflow.plan_prune(store, before=before)
            through = min(before - 1, seqs[-1])
        else:
            moment = events[min(round(fraction * len(events)), len(events) - 1)].created_at
            moment += ticks * _TICK
            plan = await trioflow.plan_prune(store, older_than=_HOUR, now=moment + _HOUR)
            through = max((e.seq for e in events if e.created_at < moment), default=0)
        assert plan.through == through
        behind = {name: seq for name, seq in cursors.items() if seq < through}
        assert dict(plan.behind) == behind
        if behind and not case.only_passed:
            with pytest.raises(trioflow.PrunedLogError) as refused:
                await trioflow.run_prune(store, plan, batch_size=case.batch_size)
            assert refused.value.consumers == behind
            assert await read_all(store) == events
            bound = 0
        else:
            result = await trioflow.run_prune(
                store, plan, only_passed=case.only_passed, batch_size=case.batch_size
            )
            bound = min([through, *cursors.values()])
            assert result.deleted == len(
                [seq for seq in seqs if seq <= bound and seq not in {s for _, s in lettered}]
            )
        needed = {seq for _, seq in lettered}
        kept = [event for event in events if event.seq > bound or event.seq in needed]
        # Every event a cursor needs or a letter refers to is still there, and
        # nothing else up to the bound.
        assert await read_all(store) == kept
        gone = [seq for seq in seqs if seq <= bound and seq not in needed]
        bounds = await store.log_bounds()
        assert bounds.pruned_through == max(gone, default=0)
        assert bounds.head == seqs[-1]
        for name, seq in lettered:
            assert [event.seq for event in await store.read(seq - 1, 1)] == [seq], name
    # Replay after pruning loses nothing: every consumer with a cursor gets
    # exactly the events after it; a new one, those after the pruned log.
    app = trioflow.App(handle(), blocking_warning=None)
    seen: dict[str, list[int]] = {name: [] for name in [*cursors, "newcomer"]}
    for name in seen:
        app.consumer(name)(_record_into(seen[name]))
    async with trioflow.open_flow(app) as flow:
        await flow.wait_idle()
    for name, cursor in cursors.items():
        assert seen[name] == [seq for seq in seqs if seq > cursor], name
    assert seen["newcomer"] == [seq for seq in seqs if seq > bounds.pruned_through]


def _record_into(seen: list[int]) -> Callable[[trioflow.Event], Awaitable[None]]:
    async def handle(event: trioflow.Event) -> None:
        seen.append(event.seq)

    return handle


_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_SETTINGS
@given(case=cases)
def test_pruning_keeps_what_cursors_and_letters_need_on_the_memory_store(case: Case) -> None:
    store = MemoryStore()
    check_case(case, lambda: store)


@_SETTINGS
@given(case=cases)
def test_pruning_keeps_what_cursors_and_letters_need_on_sqlite(
    case: Case, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path: pathlib.Path = tmp_path_factory.mktemp("retention") / "events.db"
    check_case(case, lambda: SQLiteStore(path, poll_interval=0.02))
