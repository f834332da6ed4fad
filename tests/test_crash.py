"""Crash recovery and graceful stop, with real processes on a SQLite store.

The children (``tests/_children``) run flows whose consumers log every event
they handle (see ``tests/_procs.py``). The store, read directly with sqlite3,
is the ground truth the logs are checked against.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import trioflow
from tests._procs import (
    CRASH_CONSUMERS,
    ProjectionState,
    check_crash_state,
    kill_at_random,
    read_runs,
    running,
    sigkill_batch_consumers,
    sigkill_projection,
    sigkill_while_dead_lettering,
    sigkill_while_recording_dead_letters,
    sqlite_url,
)

pytestmark = pytest.mark.slow

#: ``TRIOFLOW_CRASH_SEED=<n>`` reruns the crash test with one seed only.
SEEDS = (
    [int(os.environ["TRIOFLOW_CRASH_SEED"])] if "TRIOFLOW_CRASH_SEED" in os.environ else [1, 2, 3]
)
TOTAL = 3000
KILLS = 8
#: Mean seconds between a child's publish calls, so a run publishes a part only.
PACE = 0.02
#: Events the dead-lettering flow publishes over all its runs.
POISON_TOTAL = 1200


def read_store(db: Path) -> tuple[list[tuple[int, str, int]], dict[str, int]]:
    """Return every event as (seq, type, counter), in seq order, and the cursors."""
    with contextlib.closing(sqlite3.connect(db)) as connection:
        events = [
            (seq, event_type, json.loads(data)["n"])
            for seq, event_type, data in connection.execute(
                "SELECT seq, type, data FROM trioflow_events ORDER BY seq"
            )
        ]
        cursors = dict(connection.execute("SELECT consumer, seq FROM trioflow_cursors"))
    return events, cursors


def check_state(db: Path, logs: Path, context: str, *, total: int | None = None) -> None:
    events, cursors = read_store(db)
    check_crash_state(events, cursors, logs, context, total=total)


@pytest.mark.parametrize("seed", SEEDS)
async def test_sigkill_loses_nothing_and_redelivers_at_most_commit_every(
    tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    db = tmp_path / "events.db"
    logs = tmp_path / "logs"
    logs.mkdir()
    context = f"seed {seed} (rerun: TRIOFLOW_CRASH_SEED={seed}); logs and store in {tmp_path}"
    for run in range(KILLS):
        child_seed = rng.randrange(2**32)
        stderr = tmp_path / f"run{run}.stderr"
        async with running(
            "crash_child.py", sqlite_url(db), logs, TOTAL, child_seed, PACE, stderr=stderr
        ) as child:
            await kill_at_random(child, rng, ready=run == 0)
        check_state(db, logs, f"after kill {run}; {context}")
    async with running(
        "crash_child.py",
        sqlite_url(db),
        logs,
        TOTAL,
        rng.randrange(2**32),
        PACE,
        "--finish",
        stderr=tmp_path / "final.stderr",
    ) as child:
        output = await child.finish(limit=120)
    assert output.split() == ["ready", "idle"], context
    check_state(db, logs, f"after the final run; {context}", total=TOTAL)


async def test_sigkill_while_recording_dead_letters_keeps_each_with_its_cursor(
    tmp_path: Path,
) -> None:
    url = sqlite_url(tmp_path / "events.db")
    await sigkill_while_recording_dead_letters(url, lambda run: url, tmp_path, seed=1)


@pytest.mark.parametrize("seed", SEEDS[:2])
async def test_sigkill_while_a_flow_dead_letters_poison_events_loses_none(
    tmp_path: Path, seed: int
) -> None:
    url = sqlite_url(tmp_path / "events.db")
    await sigkill_while_dead_lettering(
        url, lambda run: url, tmp_path, seed=seed, total=POISON_TOTAL, kills=KILLS
    )


@pytest.mark.parametrize("seed", SEEDS[:2])
async def test_sigkill_among_batches_loses_nothing_and_redoes_at_most_commit_every_batches(
    tmp_path: Path, seed: int
) -> None:
    url = sqlite_url(tmp_path / "events.db")
    await sigkill_batch_consumers(url, lambda run: url, tmp_path, seed=seed)


def read_projection(db: Path) -> ProjectionState:
    """What ``projection_child.py`` left in the SQLite file ``db``."""
    with contextlib.closing(sqlite3.connect(db)) as connection:
        events = [
            (seq, event_type, json.loads(data))
            for seq, event_type, data in connection.execute(
                "SELECT seq, type, data FROM trioflow_events ORDER BY seq"
            )
        ]
        cursor = connection.execute(
            "SELECT coalesce(max(seq), 0) FROM trioflow_cursors WHERE consumer = 'projection'"
        ).fetchone()[0]
        return ProjectionState(
            events=events,
            cursor=cursor,
            effects=connection.execute(
                "SELECT seq, amount FROM effects ORDER BY applied"
            ).fetchall(),
            totals=connection.execute("SELECT total, handled FROM totals").fetchone(),
            orders=dict(connection.execute("SELECT id, amount FROM orders")),
        )


@pytest.mark.parametrize("commit_every", [1, 10])
async def test_sigkill_storm_on_a_transactional_projection_applies_each_event_once(
    tmp_path: Path, commit_every: int
) -> None:
    db = tmp_path / "events.db"

    async def read_state() -> ProjectionState:
        return await trio.to_thread.run_sync(read_projection, db)

    await sigkill_projection(
        lambda run: sqlite_url(db),
        read_state,
        tmp_path,
        seed=SEEDS[0],
        commit_every=commit_every,
        kills=KILLS,
    )


async def test_graceful_stop_mid_stream_flushes_cursors_and_redelivers_nothing(
    tmp_path: Path,
) -> None:
    total = 200
    db = tmp_path / "events.db"
    logs = tmp_path / "logs"
    logs.mkdir()
    context = f"logs and store in {tmp_path}"

    async with running(
        "graceful_child.py", db, logs, total, 7, "stop", stderr=tmp_path / "stop.stderr"
    ) as child:
        stats: dict[str, dict[str, Any]] = json.loads(await child.finish(limit=60))
    events, cursors = read_store(db)
    head = events[-1][0] if events else 0
    for name, (_, types) in CRASH_CONSUMERS.items():
        expected = [seq for seq, event_type, _ in events if types is None or event_type in types]
        (handled,) = read_runs(logs / f"{name}.log")
        cursor = cursors.get(name, 0)
        where = f"consumer {name!r} after the graceful stop; {context}"
        assert handled == expected[: len(handled)], f"handled {handled}; {where}"
        # The flushed cursor covers exactly what was handled.
        assert handled == [seq for seq in expected if seq <= cursor], (
            f"cursor {cursor}, handled up to {handled[-1:]}; {where}"
        )
        if types is None:
            assert cursor == (handled[-1] if handled else 0), where
        assert cursor <= head, where
        assert stats[name]["cursor"] == cursor, (stats[name], where)
        assert stats[name]["failures"] == stats[name]["restarts"] == 0, (stats[name], where)
    every = read_runs(logs / "every.log")[0]
    assert len(every) >= 10, f"the stop came before 'every' handled 10 events; {context}"

    async with running(
        "graceful_child.py", db, logs, total, 8, "finish", stderr=tmp_path / "finish.stderr"
    ) as child:
        await child.finish(limit=60)
    events, cursors = read_store(db)
    assert [n for _, _, n in events] == list(range(total)), context
    head = events[-1][0]
    assert cursors == dict.fromkeys(CRASH_CONSUMERS, head), context
    for name, (_, types) in CRASH_CONSUMERS.items():
        expected = [seq for seq, event_type, _ in events if types is None or event_type in types]
        handled = [seq for run in read_runs(logs / f"{name}.log") for seq in run]
        assert handled == expected, (
            f"consumer {name!r}: handled twice: "
            f"{sorted({s for s in handled if handled.count(s) > 1})[:20]}, "
            f"never: {sorted(set(expected) - set(handled))[:20]}; {context}"
        )


async def test_graceful_stop_neither_restarts_consumers_nor_waits_out_the_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = trioflow.App("memory://", shutdown_grace=10.0)

    @app.consumer("idle")
    async def handle(event: trioflow.Event) -> None:
        await trio.lowlevel.checkpoint()

    async with trioflow.open_flow(app) as flow:
        await flow.publish("a")
        await flow.wait_idle()
        stop_began = trio.current_time()
    stopped_after = trio.current_time() - stop_began
    assert flow.statistics().consumers["idle"].restarts == 0
    # Virtual time: nothing is in flight, so stopping need not wait at all.
    assert stopped_after < 1.0
