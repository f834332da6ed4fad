"""Retention: planning and running prunes, the App's periodic retention, refusals."""

from __future__ import annotations

import datetime
import logging
import pathlib
from collections.abc import Mapping

import pytest
import trio
import trio.testing

import trioflow
from tests.test_flow import recorder
from tests.test_store_sqlite import write_raw
from trioflow._retention import shown_duration
from trioflow.cli._maintenance import Duration
from trioflow.stores import LogBounds
from trioflow.stores.memory import MemoryStore
from trioflow.stores.sqlite import SQLiteStore
from trioflow.testing import FaultyStore
from trioflow.testing._store_contract import make_events, make_letter, read_all

HOUR = datetime.timedelta(hours=1)


# -- the option value ---------------------------------------------------------------


def test_retention_takes_a_timedelta_or_seconds() -> None:
    week = datetime.timedelta(days=7)
    assert trioflow.Retention.of(week) == trioflow.Retention(max_age=week)
    assert trioflow.Retention.of(90).max_age == datetime.timedelta(seconds=90)
    # The check interval defaults to 10 minutes, or the max age if shorter.
    assert trioflow.Retention(max_age=week).interval == datetime.timedelta(minutes=10)
    assert trioflow.Retention(max_age=60).interval == datetime.timedelta(seconds=60)
    given = trioflow.Retention(max_age=week, interval=30, batch_size=10)
    assert trioflow.Retention.of(given) is given
    assert trioflow.App(MemoryStore(), retention=week).retention == trioflow.Retention(max_age=week)
    assert trioflow.App(MemoryStore()).retention is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_age": 0}, "max_age must be longer than 0"),
        ({"max_age": -HOUR}, "max_age must be longer than 0"),
        ({"max_age": float("inf")}, "finite number of seconds"),
        ({"max_age": "7d"}, "finite number of seconds"),
        ({"max_age": HOUR, "interval": 0}, "interval must be longer than 0"),
        ({"max_age": HOUR, "batch_size": 0}, "batch_size must be an int >= 1"),
        ({"max_age": HOUR, "batch_size": 1.5}, "batch_size must be an int >= 1"),
    ],
)
def test_invalid_retention_is_refused(options: Mapping[str, object], message: str) -> None:
    with pytest.raises(trioflow.ConfigurationError, match=message):
        trioflow.Retention(**options)  # type: ignore[arg-type]


# -- planning and running -----------------------------------------------------------


async def test_a_plan_names_the_consumers_a_bound_would_pass_and_changes_nothing() -> None:
    store = MemoryStore()
    async with store.open():
        await store.append(make_events(20))
        await store.commit_cursors({"fast": 20, "slow": 5, "stopped": 8})
        plan = await trioflow.plan_prune(store, before=11)
        assert plan.through == 10
        assert plan.events == 10
        assert dict(plan.behind) == {"slow": 5, "stopped": 8}
        assert plan.safe_through == 5
        assert plan.bounds == LogBounds(first=1, head=20, pruned_through=0)
        # A dry run: nothing went.
        assert await store.log_bounds() == plan.bounds
        # A bound past the head is the head.
        assert (await trioflow.plan_prune(store, before=1000)).through == 20


async def test_a_prune_that_would_pass_cursors_is_refused_naming_every_one() -> None:
    store = MemoryStore()
    async with store.open():
        await store.append(make_events(20))
        await store.commit_cursors({"fast": 20, "slow": 5, "stopped": 8})
        plan = await trioflow.plan_prune(store, before=11)
        with pytest.raises(trioflow.PrunedLogError) as refused:
            await trioflow.run_prune(store, plan)
        message = str(refused.value)
        assert "'slow' (at 5)" in message and "'stopped' (at 8)" in message
        assert "fast" not in message
        assert "trioflow consumers remove" in message
        assert refused.value.consumers == {"slow": 5, "stopped": 8}
        assert await store.log_bounds() == plan.bounds


async def test_only_passed_prunes_what_every_cursor_passed_in_batches() -> None:
    store = MemoryStore()
    async with store.open():
        await store.append(make_events(20))
        await store.commit_cursors({"fast": 20, "slow": 7})
        plan = await trioflow.plan_prune(store, before=16)
        seen: list[trioflow.PruneProgress] = []
        result = await trioflow.run_prune(
            store, plan, only_passed=True, batch_size=3, progress=seen.append
        )
        assert result.deleted == 7
        assert [(p.deleted, p.expected) for p in seen] == [(3, 15), (6, 15), (7, 15)]
        assert result.bounds == LogBounds(first=8, head=20, pruned_through=7)
        # Once the slow consumer is removed, the rest of the plan goes.
        await store.forget_consumer("slow")
        plan = await trioflow.plan_prune(store, before=16)
        assert plan.behind == {}
        assert plan.events == 8
        result = await trioflow.run_prune(store, plan, batch_size=100)
        assert result.deleted == 8
        assert [event.seq for event in await read_all(store)] == [16, 17, 18, 19, 20]


async def test_a_plan_by_age_counts_back_from_now_by_commit_times() -> None:
    store = MemoryStore()
    async with store.open():
        await store.append(make_events(3))
        await trio.sleep(0.01)
        await store.append(make_events(2))
        events = await read_all(store)
        first_batch = events[0].created_at
        assert events[3].created_at > first_batch
        plan = await trioflow.plan_prune(store, older_than=HOUR, now=events[3].created_at + HOUR)
        assert plan.through == 3
        plan = await trioflow.plan_prune(store, older_than=3600, now=first_batch + HOUR)
        assert plan.through == 0 and plan.events == 0
        result = await trioflow.run_prune(store, plan)
        assert result.deleted == 0


@pytest.mark.parametrize(
    "bounds",
    [{}, {"before": 3, "older_than": HOUR}, {"before": 0}, {"older_than": -HOUR}],
)
async def test_a_plan_needs_one_valid_bound(bounds: Mapping[str, object]) -> None:
    store = MemoryStore()
    async with store.open():
        with pytest.raises(trioflow.ConfigurationError):
            await trioflow.plan_prune(store, **bounds)  # type: ignore[arg-type]


async def test_a_prune_keeps_the_events_dead_letters_refer_to() -> None:
    store = MemoryStore()
    async with store.open():
        await store.append(make_events(10))
        await store.record_dead_letter(make_letter("a", 4), cursor=10)
        result = await trioflow.run_prune(store, await trioflow.plan_prune(store, before=11))
        assert result.deleted == 9
        assert [event.seq for event in await read_all(store)] == [4]
        assert result.bounds == LogBounds(first=4, head=10, pruned_through=10)


# -- the flow -------------------------------------------------------------------------


async def test_app_retention_prunes_what_every_consumer_passed_and_names_who_holds_it(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryStore()
    async with store.open():
        # A consumer that ran once and stopped: its cursor holds the log back.
        await store.commit_cursors({"stopped": 0})
    app = trioflow.App(
        store, retention=trioflow.Retention(max_age=HOUR, interval=datetime.timedelta(minutes=5))
    )
    seen = recorder(app, "audit")
    caplog.set_level(logging.INFO, logger="trioflow")
    async with trioflow.open_flow(app) as flow:
        # Published a minute in: no check falls on the moment they turn an hour old.
        await trio.sleep(60)
        await flow.publish_many([("a", {"n": n}) for n in range(10)])
        await flow.wait_idle()
        await trio.sleep(2 * 3600)
        assert (await store.log_bounds()).pruned_through == 0
        warnings = [r.getMessage() for r in caplog.records if "have not passed" in r.getMessage()]
        # Once per check (every 5 minutes) since the events are an hour old: at 65,
        # 70... 120 minutes.
        assert len(warnings) == 12
        assert all("'stopped' (at 0)" in warning for warning in warnings)
        assert all("are older than 1h," in warning for warning in warnings)
        # Removed, it no longer holds anything back.
        await store.forget_consumer("stopped")
        await trio.sleep(6 * 60)
        assert await store.log_bounds() == LogBounds(first=11, head=10, pruned_through=10)
        # New events are kept until they are old enough, and delivered.
        await flow.publish("b", {})
        await flow.wait_idle()
        await trio.sleep(30 * 60)
        assert [event.seq for event in await read_all(store)] == [11]
        await trio.sleep(40 * 60)
        assert await read_all(store) == []
    assert seen == list(range(1, 12))
    assert any("deleted 10 event(s)" in r.getMessage() for r in caplog.records)


async def test_app_retention_never_prunes_what_a_running_consumer_still_needs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    app = trioflow.App(store, retention=trioflow.Retention(max_age=60, interval=60))
    release = trio.Event()
    seen: list[int] = []

    @app.consumer("slow")
    async def slow(event: trioflow.Event) -> None:
        await release.wait()
        seen.append(event.seq)

    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", {"n": n}) for n in range(5)])
        await trio.sleep(3600)
        # The slow consumer has handled nothing: everything is kept.
        assert len(await read_all(store)) == 5
        release.set()
        await flow.wait_idle()
        await trio.sleep(120)
        assert await read_all(store) == []
    assert seen == [1, 2, 3, 4, 5]


async def test_a_new_earliest_consumer_starts_with_the_oldest_event_kept() -> None:
    store = MemoryStore()
    async with store.open():
        await store.append(make_events(10))
        await store.prune(6, limit=100)
    app = trioflow.App(store)
    early = recorder(app, "early")
    late = recorder(app, "late", start="latest")
    async with trioflow.open_flow(app) as flow:
        await flow.publish("more", {})
        await flow.wait_idle()
    assert early == [7, 8, 9, 10, 11]
    assert late == [11]
    assert await store.load_cursors() == {"early": 11, "late": 11}


class _PruneBeforeFirstCommit(MemoryStore):
    """Prunes every event just before the first cursor commit lands: a prune that was
    under way while a new consumer read the log's bounds."""

    pruned = False

    async def commit_cursors(
        self, cursors: Mapping[str, int], *, fences: Mapping[str, int] | None = None
    ) -> frozenset[str]:
        if not self.pruned:
            self.pruned = True
            assert await self.prune(await self.head(), limit=1000) == 8
        return await super().commit_cursors(cursors, fences=fences)


async def test_a_new_consumer_passed_by_a_prune_as_it_starts_goes_on_from_the_pruned_log() -> None:
    store = _PruneBeforeFirstCommit()
    async with store.open():
        await store.append(make_events(8))
    app = trioflow.App(store)
    seen = recorder(app, "new")
    async with trioflow.open_flow(app) as flow:
        await flow.wait_idle()
    assert store.pruned
    assert seen == []
    # Moved up to the pruned log, not left at 0 behind it: it starts again.
    assert await store.load_cursors() == {"new": 8}
    async with trioflow.open_flow(app) as flow:
        await flow.publish("after", {})
        await flow.wait_idle()
    assert seen == [9]


async def rewound_behind_the_pruned_log(
    tmp_path: pathlib.Path, cursors: dict[str, int], rewound: str
) -> SQLiteStore:
    """A store of 10 events pruned through 6, the cursor of ``rewound`` then set to 2."""
    path = tmp_path / "events.db"
    store = SQLiteStore(path)
    async with store.open():
        await store.append(make_events(10))
        await store.commit_cursors(cursors)
        assert await store.prune(10, limit=100) == 6
    # Forced: an old cursor written back by hand (from a backup, say).
    write_raw(path, f"UPDATE trioflow_cursors SET seq = 2 WHERE consumer = '{rewound}'")
    return store


async def test_a_consumer_whose_cursor_is_behind_the_pruned_log_refuses_to_start(
    tmp_path: pathlib.Path,
) -> None:
    store = await rewound_behind_the_pruned_log(tmp_path, {"audit": 6}, "audit")
    app = trioflow.App(store)
    seen = recorder(app, "audit")
    with pytest.raises(
        trioflow.PrunedLogError,
        match=r"'audit' has cursor 2, but the events up to 6 were pruned.*"
        r"`trioflow consumers reset audit --to earliest`, or store.set_cursor"
        r".*trioflow consumers remove audit",
    ) as refused:
        async with trioflow.open_flow(app):
            pass  # pragma: no cover
    assert refused.value.consumers == {"audit": 2}
    assert seen == []
    # The fix it names works: set the cursor to the pruned log, and it starts.
    async with store.open():
        assert await store.set_cursor("audit", 6) == 2
    async with trioflow.open_flow(app) as flow:
        await flow.wait_idle()
    assert seen == [7, 8, 9, 10]


async def test_a_partition_behind_the_pruned_log_is_told_what_the_command_can_do(
    tmp_path: pathlib.Path,
) -> None:
    # `trioflow consumers` takes a group's name, never a partition's: the
    # message must not name a command that refuses what it is given.
    cursors = {"billing/0": 10, "billing/1": 6}
    store = await rewound_behind_the_pruned_log(tmp_path, cursors, "billing/1")
    app = trioflow.App(store)

    @app.consumer("billing", partitions=2)
    async def billing(event: trioflow.Event) -> None:
        pass  # pragma: no cover

    with pytest.raises(trioflow.PrunedLogError) as refused:
        async with trioflow.open_flow(app):
            pass  # pragma: no cover
    message = str(refused.value)
    assert "'billing/1' has cursor 2" in message
    assert "store.set_cursor('billing/1', 6)" in message
    assert "the whole group: `trioflow consumers remove billing`" in message
    assert "consumers reset" not in message
    assert "remove billing/1" not in message


async def test_app_retention_goes_on_after_a_store_failure(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = FaultyStore()
    app = trioflow.App(store, retention=trioflow.Retention(max_age=60, interval=60, batch_size=2))
    seen = recorder(app, "audit")
    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", {"n": n}) for n in range(6)])
        await flow.wait_idle()
        await trio.sleep(1)  # the first check, at the start, has found nothing to do
        # At 60 s a read fails; at 120 s the first batch is deleted, but its
        # answer is lost. Each is logged, and the check after goes on.
        store.fail_next("prune", lose_answer=True)
        store.fail_next("seq_before")
        await trio.sleep(150)
        assert len(await read_all(store)) == 4
        assert (await store.log_bounds()).pruned_through == 2
        assert [r.getMessage() for r in caplog.records if "pruning failed" in r.getMessage()]
        await trio.sleep(60)
        assert await read_all(store) == []
    assert seen == [1, 2, 3, 4, 5, 6]
    assert ("prune", "lose") in store.injected and ("seq_before", "fail") in store.injected


@pytest.mark.parametrize(
    ("age", "shown"),
    [
        (datetime.timedelta(days=7), "7d"),
        (datetime.timedelta(hours=1, minutes=30), "1h30m"),
        (datetime.timedelta(seconds=90), "1m30s"),
        (datetime.timedelta(seconds=0.5), "0.5s"),
        (datetime.timedelta(0), "0s"),
    ],
)
def test_ages_are_shown_as_trioflow_prune_takes_them(age: datetime.timedelta, shown: str) -> None:
    assert shown_duration(age) == shown
    assert Duration().convert(shown, None, None) == age
