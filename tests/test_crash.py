"""Crash recovery and graceful stop, with real processes on a SQLite store.

The children (``tests/_children``) run flows whose consumers log every event
they handle, one line per event written with a single ``os.write`` on an
``O_APPEND`` descriptor, so a SIGKILL can end a log but never tear a line.
The store, read directly with sqlite3, is the ground truth the logs are
checked against.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import trioflow

pytestmark = pytest.mark.slow

CHILDREN = Path(__file__).parent / "_children"

#: Consumer name -> (commit_every, types or None), as both children register them.
CONSUMERS: dict[str, tuple[int, frozenset[str] | None]] = {
    "every": (1, None),
    "default": (100, None),
    "filtered": (7, frozenset({"t.a"})),
}

#: ``TRIOFLOW_CRASH_SEED=<n>`` reruns the crash test with one seed only.
SEEDS = (
    [int(os.environ["TRIOFLOW_CRASH_SEED"])] if "TRIOFLOW_CRASH_SEED" in os.environ else [1, 2, 3]
)
TOTAL = 3000
KILLS = 8
#: Mean seconds between a child's publish calls, so a run publishes a part only.
PACE = 0.02


class Child:
    """A child process with its stdout piped and its stderr in a file."""

    def __init__(self, process: trio.Process, stderr: Path) -> None:
        self.process = process
        self.stderr = stderr
        self._buffer = b""

    def describe(self) -> str:
        stderr = self.stderr.read_text(errors="replace")[-4000:]
        return (
            f"child {self.process.args!r} exit status {self.process.returncode}, stderr:\n{stderr}"
        )

    async def expect_line(self, expected: str, *, limit: float) -> None:
        """Read stdout up to the next line and check that it is ``expected``."""
        assert self.process.stdout is not None
        with trio.move_on_after(limit):
            while b"\n" not in self._buffer:
                chunk = await self.process.stdout.receive_some()
                if not chunk:
                    break
                self._buffer += chunk
        line, newline, self._buffer = self._buffer.partition(b"\n")
        if not newline:
            pytest.fail(f"no {expected!r} line within {limit}s (got {line!r}); " + self.describe())
        assert line.decode() == expected, self.describe()

    async def finish(self, *, limit: float) -> str:
        """Wait for the child to exit 0; return what it printed."""
        assert self.process.stdout is not None
        with trio.move_on_after(limit):
            while chunk := await self.process.stdout.receive_some():
                self._buffer += chunk
            await self.process.wait()
        if self.process.returncode != 0:
            pytest.fail(f"child did not exit 0 within {limit}s; " + self.describe())
        return self._buffer.decode()

    async def kill(self, *, limit: float) -> None:
        """SIGKILL the child, which must still be running, and reap it."""
        if self.process.poll() is not None:
            pytest.fail("child exited before it was killed; " + self.describe())
        self.process.kill()
        with trio.move_on_after(limit):
            await self.process.wait()
        assert self.process.returncode == -signal.SIGKILL, self.describe()


@contextlib.asynccontextmanager
async def running(script: str, *args: object, stderr: Path) -> AsyncIterator[Child]:
    """Run a child script with ``sys.executable``; kill it if still running on exit."""
    fd = os.open(stderr, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        process = await trio.lowlevel.open_process(
            [sys.executable, str(CHILDREN / script), *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=fd,
        )
    finally:
        os.close(fd)
    try:
        yield Child(process, stderr)
    finally:
        with trio.CancelScope(shield=True):
            if process.poll() is None:
                process.kill()
            await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


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


def read_log(path: Path) -> list[list[int]]:
    """Split a consumer log into the seqs each run of the child handled."""
    runs: list[list[int]] = []
    for line in path.read_text().splitlines():
        if line == "restart":
            runs.append([])
        else:
            assert runs, f"{path}: an event logged before the first restart marker"
            runs[-1].append(int(line))
    return runs


def check_counters(
    events: Sequence[tuple[int, str, int]], published_log: Path, context: str
) -> None:
    """Every counter in the store once, in publish order; every returned publish stored."""
    seqs = [seq for seq, _, _ in events]
    counters = [n for _, _, n in events]
    assert seqs == list(range(1, len(seqs) + 1)), f"holes in the seqs; {context}"
    assert counters == list(range(len(counters))), (
        f"counters missing, duplicated or out of order in the store: "
        f"{[(s, n) for s, n in zip(seqs, counters, strict=True) if s - 1 != n][:20]}; {context}"
    )
    returned = [tuple(map(int, line.split())) for line in published_log.read_text().splitlines()]
    assert len({seq for seq, _ in returned}) == len(returned), f"a seq returned twice; {context}"
    stored = {seq: n for seq, _, n in events}
    lost = [(seq, n) for seq, n in returned if stored.get(seq) != n]
    assert not lost, f"publish returned (seq, counter) {lost[:20]} but the store differs; {context}"


def check_consumer_log(
    name: str,
    runs: Sequence[Sequence[int]],
    expected: Sequence[int],
    cursor: int,
    context: str,
) -> None:
    """Check one consumer's log against the seqs of its types in the store.

    Within a run the consumer handles the next events of its types in order,
    without gaps; a run starts no later than right after the last event
    handled before; it re-handles at most ``commit_every`` events already
    handled; and at most ``commit_every`` handled events lie past the durable
    cursor, while every event up to it was handled.
    """
    commit_every = CONSUMERS[name][0]
    where = f"consumer {name!r} (commit_every={commit_every}); {context}"
    index = {seq: i for i, seq in enumerate(expected)}
    handled: set[int] = set()
    top = -1  # the index in `expected` of the highest seq handled so far
    for number, run in enumerate(runs):
        unknown = [seq for seq in run if seq not in index]
        assert not unknown, (
            f"run {number} handled {unknown[:10]}: not in the store or not its type; {where}"
        )
        for before, after in pairwise(run):
            assert after > before, f"run {number} went back from {before} to {after}; {where}"
        positions = [index[seq] for seq in run]
        if positions:
            gap = positions != list(range(positions[0], positions[0] + len(positions)))
            assert not gap, f"run {number} skipped events: {run}; {where}"
            assert positions[0] <= top + 1, (
                f"run {number} started at {run[0]}, skipping {expected[top + 1]}; {where}"
            )
        again = [seq for seq in run if seq in handled]
        assert len(again) <= commit_every, (
            f"after restart {number} {len(again)} events were handled again "
            f"({again[0]}..{again[-1]}); {where}"
        )
        handled.update(run)
        top = max([top, *positions])
    past_cursor = sorted(seq for seq in handled if seq > cursor)
    assert len(past_cursor) <= commit_every, (
        f"{len(past_cursor)} handled events lie past the durable cursor {cursor}; {where}"
    )
    missed = [seq for seq in expected if seq <= cursor and seq not in handled]
    assert not missed, f"cursor {cursor} is past unhandled events {missed[:10]}; {where}"


def check_state(db: Path, logs: Path, context: str, *, total: int | None = None) -> None:
    events, cursors = read_store(db)
    check_counters(events, logs / "published.log", context)
    head = events[-1][0] if events else 0
    for name, (_, types) in CONSUMERS.items():
        expected = [seq for seq, event_type, _ in events if types is None or event_type in types]
        runs = read_log(logs / f"{name}.log")
        cursor = cursors.get(name, 0)
        assert cursor <= head, f"consumer {name!r}: cursor {cursor} past the head {head}; {context}"
        check_consumer_log(name, runs, expected, cursor, context)
        if total is not None:
            handled = {seq for run in runs for seq in run}
            assert handled == set(expected), (
                f"consumer {name!r} never handled {sorted(set(expected) - handled)[:20]}; {context}"
            )
    if total is not None:
        assert len(events) == total, f"{len(events)} events in the store, not {total}; {context}"
        assert cursors == dict.fromkeys(CONSUMERS, head), (
            f"cursors {cursors} after wait_idle, head {head}; {context}"
        )


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
            "crash_child.py", db, logs, TOTAL, child_seed, PACE, stderr=stderr
        ) as child:
            if run == 0 or rng.random() < 0.5:
                await child.expect_line("ready", limit=30)
                await trio.sleep(rng.uniform(0.0, 1.0))
            else:
                # Maybe while it starts up, opens the store or replays.
                await trio.sleep(rng.uniform(0.0, 1.5))
            await child.kill(limit=30)
        check_state(db, logs, f"after kill {run}; {context}")
    async with running(
        "crash_child.py",
        db,
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
    for name, (_, types) in CONSUMERS.items():
        expected = [seq for seq, event_type, _ in events if types is None or event_type in types]
        (handled,) = read_log(logs / f"{name}.log")
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
    every = read_log(logs / "every.log")[0]
    assert len(every) >= 10, f"the stop came before 'every' handled 10 events; {context}"

    async with running(
        "graceful_child.py", db, logs, total, 8, "finish", stderr=tmp_path / "finish.stderr"
    ) as child:
        await child.finish(limit=60)
    events, cursors = read_store(db)
    assert [n for _, _, n in events] == list(range(total)), context
    head = events[-1][0]
    assert cursors == dict.fromkeys(CONSUMERS, head), context
    for name, (_, types) in CONSUMERS.items():
        expected = [seq for seq, event_type, _ in events if types is None or event_type in types]
        handled = [seq for run in read_log(logs / f"{name}.log") for seq in run]
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
