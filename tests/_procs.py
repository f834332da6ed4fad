"""Helpers for tests that run flows in real processes and check what they logged.

The children (``tests/_children``) are started with ``sys.executable``. Their
consumers log one line per handled event, written with a single ``os.write``
on an ``O_APPEND`` descriptor, so a SIGKILL can end a log but never tear a
line. Two formats:

* crash logs (`read_runs`): ``"<seq>"`` per event, and a ``restart`` line
  whenever the child starts, so a log splits into the runs of the child;
* row logs (`read_rows`): ``"<seq> <publisher> <counter>"`` per event;
* batch logs (`read_batch_runs`): ``"<seq> <seq> ..."`` per batch a batch
  consumer did, with ``restart`` lines as in crash logs.

The store, read directly, is the ground truth the logs are checked against.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tests._children.batch_crash_child import BATCH_CONSUMERS
from trioflow.stores import Store, store_from_url
from trioflow.testing._store_contract import make_events, read_all

CHILDREN = Path(__file__).parent / "_children"


def sqlite_url(db: Path, **options: object) -> str:
    """The store URL of the SQLite file ``db``, with query options."""
    query = "&".join(f"{name}={value}" for name, value in options.items())
    return f"sqlite:///{urllib.parse.quote(str(db))}" + (f"?{query}" if query else "")


#: (seq, publisher, counter): one event of a row log, or of the store.
Row = tuple[int, str, int]


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

    async def read_line(self, *, limit: float, what: str = "line") -> str:
        """Read stdout up to the next line and return it (fail after ``limit`` seconds)."""
        assert self.process.stdout is not None
        with trio.move_on_after(limit):
            while b"\n" not in self._buffer:
                chunk = await self.process.stdout.receive_some()
                if not chunk:
                    break
                self._buffer += chunk
        line, newline, self._buffer = self._buffer.partition(b"\n")
        if not newline:
            pytest.fail(f"no {what} within {limit}s (got {line!r}); " + self.describe())
        return line.decode()

    async def expect_line(self, expected: str, *, limit: float) -> None:
        """Read stdout up to the next line and check that it is ``expected``."""
        line = await self.read_line(limit=limit, what=f"{expected!r} line")
        assert line == expected, self.describe()

    async def send_line(self, line: str) -> None:
        """Write ``line`` to the child's stdin (started with ``stdin=True``)."""
        assert self.process.stdin is not None
        await self.process.stdin.send_all(line.encode() + b"\n")

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


def child_environment() -> dict[str, str]:
    """This process's environment, with the repository on PYTHONPATH: children
    import their shared helpers as ``tests._children...`` whether or not
    trioflow was installed in editable mode."""
    env = dict(os.environ)
    root = str(CHILDREN.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


@contextlib.asynccontextmanager
async def running(
    script: str, *args: object, stderr: Path, stdin: bool = False
) -> AsyncIterator[Child]:
    """Run a child script with ``sys.executable``; kill it if still running on exit.

    With ``stdin`` its stdin is a pipe (`Child.send_line`), else it is inherited.
    """
    argv = [sys.executable, str(CHILDREN / script), *map(str, args)]
    async with running_argv(argv, stderr=stderr, stdin=stdin) as child:
        yield child


@contextlib.asynccontextmanager
async def running_argv(
    argv: Sequence[str],
    *,
    stderr: Path,
    stdin: bool = False,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[Child]:
    """Run ``argv`` with stdout piped and stderr appended to a file; kill it if
    still running on exit. ``env`` defaults to `child_environment`."""
    fd = os.open(stderr, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        process = await trio.lowlevel.open_process(
            list(argv),
            stdin=subprocess.PIPE if stdin else None,
            stdout=subprocess.PIPE,
            stderr=fd,
            cwd=cwd,
            env=child_environment() if env is None else dict(env),
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
            if process.stdin is not None:
                await process.stdin.aclose()


async def run_together(
    tmp_path: Path, children: Mapping[str, tuple[str, *tuple[object, ...]]]
) -> None:
    """Run children that start together, and wait until each has exited 0.

    ``children`` maps a name (of its stderr file, ``<name>.stderr`` in
    ``tmp_path``) to the script and its arguments, which the path of a file
    to wait for follows: the children start once all of them printed
    ``ready``, so that their writes contend.
    """
    go = tmp_path / "go"
    async with contextlib.AsyncExitStack() as stack:
        started = [
            await stack.enter_async_context(
                running(script, *args, go, stderr=tmp_path / f"{name}.stderr")
            )
            for name, (script, *args) in children.items()
        ]
        for child in started:
            await child.expect_line("ready", limit=30)
        go.touch()
        for child in started:
            await child.finish(limit=60)


def read_runs(path: Path) -> list[list[int]]:
    """Split a crash log into the seqs each run of the child handled."""
    return [[seq for batch in run for seq in batch] for run in read_batch_runs(path)]


def read_batch_runs(path: Path) -> list[list[list[int]]]:
    """Split a crash or batch log into the batches (lines of seqs) each run of the child did."""
    runs: list[list[list[int]]] = []
    for line in path.read_text().splitlines():
        if line == "restart":
            runs.append([])
        else:
            assert runs, f"{path}: an event logged before the first restart marker"
            runs[-1].append([int(seq) for seq in line.split()])
    return runs


def split_runs(handled: Iterable[int]) -> list[list[int]]:
    """Split one process's handled seqs into runs, wherever a seq is not above the last.

    A consumer restarted inside a running flow goes back to its cursor; a
    restart that goes on right after its last event leaves no trace, and
    needs none: the run simply continues.
    """
    runs: list[list[int]] = []
    for seq in handled:
        if not runs or seq <= runs[-1][-1]:
            runs.append([])
        runs[-1].append(seq)
    return runs


def check_counters(
    events: Sequence[tuple[int, str, int]],
    published_log: Path,
    context: str,
    *,
    holes: bool = False,
) -> None:
    """Every counter in the store once, in publish order; every returned publish stored.

    With ``holes`` the sequence numbers need only increase (PostgreSQL: a
    rolled-back append leaves a hole); otherwise they are 1, 2, 3, ...
    """
    seqs = [seq for seq, _, _ in events]
    counters = [n for _, _, n in events]
    if holes:
        assert all(a < b for a, b in itertools.pairwise(seqs)), f"seqs not increasing; {context}"
    else:
        assert seqs == list(range(1, len(seqs) + 1)), f"holes in the seqs; {context}"
    assert counters == list(range(len(counters))), (
        f"counters missing, duplicated or out of order in the store: "
        f"{[(s, n) for i, (s, n) in enumerate(zip(seqs, counters, strict=True)) if i != n][:20]}"
        f"; {context}"
    )
    returned = [tuple(map(int, line.split())) for line in published_log.read_text().splitlines()]
    assert len({seq for seq, _ in returned}) == len(returned), f"a seq returned twice; {context}"
    stored = {seq: n for seq, _, n in events}
    lost = [(seq, n) for seq, n in returned if stored.get(seq) != n]
    assert not lost, f"publish returned (seq, counter) {lost[:20]} but the store differs; {context}"


def check_runs(
    runs: Sequence[Sequence[int]], expected: Sequence[int], where: str
) -> list[list[int]]:
    """Check a consumer's runs against the seqs of its types in the store.

    Within a run the consumer handles the next events of its types in order,
    without gaps, and a run starts no later than right after the last event
    handled before.

    Returns:
        For each run, the seqs it handled that an earlier run had handled.
    """
    index = {seq: i for i, seq in enumerate(expected)}
    handled: set[int] = set()
    again_by_run: list[list[int]] = []
    top = -1  # the index in `expected` of the highest seq handled so far
    for number, run in enumerate(runs):
        unknown = [seq for seq in run if seq not in index]
        assert not unknown, (
            f"run {number} handled {unknown[:10]}: not in the store or not its type; {where}"
        )
        for before, after in itertools.pairwise(run):
            assert after > before, f"run {number} went back from {before} to {after}; {where}"
        positions = [index[seq] for seq in run]
        if positions:
            gap = positions != list(range(positions[0], positions[0] + len(positions)))
            assert not gap, f"run {number} skipped events: {run}; {where}"
            assert positions[0] <= top + 1, (
                f"run {number} started at {run[0]}, skipping {expected[top + 1]}; {where}"
            )
        again_by_run.append([seq for seq in run if seq in handled])
        handled.update(run)
        top = max([top, *positions])
    return again_by_run


def check_consumer_log(
    runs: Sequence[Sequence[int]],
    expected: Sequence[int],
    cursor: int,
    commit_every: int,
    where: str,
) -> None:
    """`check_runs`, plus the redelivery bound of a consumer with ``commit_every``.

    Each run re-handles at most ``commit_every`` events already handled; at
    most ``commit_every`` handled events lie past the durable cursor, while
    every event up to it was handled.
    """
    for number, again in enumerate(check_runs(runs, expected, where)):
        assert len(again) <= commit_every, (
            f"after restart {number} {len(again)} events were handled again "
            f"({again[0]}..{again[-1]}); {where}"
        )
    handled = {seq for run in runs for seq in run}
    past_cursor = sorted(seq for seq in handled if seq > cursor)
    assert len(past_cursor) <= commit_every, (
        f"{len(past_cursor)} handled events lie past the durable cursor {cursor}; {where}"
    )
    missed = [seq for seq in expected if seq <= cursor and seq not in handled]
    assert not missed, f"cursor {cursor} is past unhandled events {missed[:10]}; {where}"


#: The consumers of the crash children: name -> (commit_every, types or None).
CRASH_CONSUMERS: dict[str, tuple[int, frozenset[str] | None]] = {
    "every": (1, None),
    "default": (100, None),
    "filtered": (7, frozenset({"t.a"})),
}


def check_crash_state(
    events: Sequence[tuple[int, str, int]],
    cursors: dict[str, int],
    logs: Path,
    context: str,
    *,
    total: int | None = None,
    holes: bool = False,
) -> None:
    """Check a crash test's store and logs: the publishers' and every consumer's.

    ``events`` are the store's (seq, type, counter) in seq order and
    ``cursors`` its durable cursors; ``logs`` holds ``published.log`` and one
    log per consumer of `CRASH_CONSUMERS`. With ``total`` (after a final run
    that ended with ``wait_idle``) every event must also be stored, handled
    and committed.
    """
    check_counters(events, logs / "published.log", context, holes=holes)
    head = events[-1][0] if events else 0
    for name, (commit_every, types) in CRASH_CONSUMERS.items():
        expected = [seq for seq, event_type, _ in events if types is None or event_type in types]
        runs = read_runs(logs / f"{name}.log")
        cursor = cursors.get(name, 0)
        assert cursor <= head, f"consumer {name!r}: cursor {cursor} past the head {head}; {context}"
        where = f"consumer {name!r} (commit_every={commit_every}); {context}"
        check_consumer_log(runs, expected, cursor, commit_every, where)
        if total is not None:
            handled = {seq for run in runs for seq in run}
            assert handled == set(expected), (
                f"consumer {name!r} never handled {sorted(set(expected) - handled)[:20]}; {context}"
            )
    if total is not None:
        assert len(events) == total, f"{len(events)} events in the store, not {total}; {context}"
        assert cursors == dict.fromkeys(CRASH_CONSUMERS, head), (
            f"cursors {cursors} after wait_idle, head {head}; {context}"
        )


def read_rows(path: Path) -> list[Row]:
    """A row log: (seq, publisher, counter) per handled event."""
    rows: list[Row] = []
    for line in path.read_text().splitlines():
        seq, publisher, n = line.split()
        rows.append((int(seq), publisher, int(n)))
    return rows


def first_difference(seen: Sequence[Row], expected: Sequence[Row]) -> int:
    for index, (a, b) in enumerate(zip(seen, expected, strict=False)):
        if a != b:
            return index
    return min(len(seen), len(expected))


def check_consumer_rows(
    logs: Path, consumers: Iterable[str], events: Sequence[Row], context: str
) -> None:
    """Each consumer's row log is exactly the store's events: each once, in seq order."""
    events = list(events)
    for name in consumers:
        seen = read_rows(logs / f"{name}.log")
        if seen != events:
            at = first_difference(seen, events)
            seqs = [seq for seq, _, _ in seen]
            pytest.fail(
                f"consumer {name!r} saw {len(seen)} events, the store holds {len(events)}; "
                f"first difference at index {at}: saw {seen[at : at + 3]}, "
                f"stored {events[at : at + 3]}; went back: "
                f"{[(a, b) for a, b in itertools.pairwise(seqs) if b <= a][:10]}; {context}"
            )


async def sigkill_while_recording_dead_letters(
    store_url: str,
    child_url: Callable[[int], str],
    tmp_path: Path,
    *,
    seed: int,
    kills: int = 6,
    settle: Callable[[int], Awaitable[None]] | None = None,
) -> None:
    """SIGKILL ``dead_letter_child.py`` as it records dead letters; check the store each time.

    The store at ``store_url`` gets events to give up on first. Run ``n`` of the
    child opens ``child_url(n)``, is killed at a random moment, and then
    ``settle(n)`` waits, if need be, until its last statement is over; the
    store is then checked with `check_dead_letters`.
    """
    rng = random.Random(seed)
    log = tmp_path / "recorded.log"
    store = store_from_url(store_url)
    async with store.open():
        for _ in range(10):
            await store.append(make_events(1000))
    for run in range(kills):
        stderr = tmp_path / f"run{run}.stderr"
        async with running(
            "dead_letter_child.py", child_url(run), log, rng.randrange(2**32), stderr=stderr
        ) as child:
            await child.expect_line("ready", limit=30)
            await trio.sleep(rng.uniform(0.05, 0.4))
            await child.kill(limit=30)
        if settle is not None:
            await settle(run)
        async with store.open():
            recorded = await check_dead_letters(store, log, f"after kill {run}; in {tmp_path}")
    # Each run recorded some: the kills fell among the writes, not before them.
    assert recorded >= 3 * kills, f"only {recorded} dead letters recorded in {kills} runs"


async def check_dead_letters(store: Store, log: Path, context: str) -> int:
    """Each consumer's letters are exactly the events up to its cursor; return how many.

    For every letter written, either its cursor moved past it and the letter
    is there, or neither: a cursor past an event without its letter lost the
    event, a letter past the cursor was kept without its cursor. Each letter
    names its event, and every ``record_dead_letter`` that returned (a line
    ``"<consumer> <seq>"`` of ``log``) is at or below its consumer's cursor.
    """
    events = {event.seq: event.id for event in await read_all(store)}
    letters = await store.dead_letters()
    cursors = await store.load_cursors()
    returned: dict[str, int] = {}
    for line in (await trio.Path(log).read_text()).splitlines():
        consumer, seq = line.split()
        returned[consumer] = max(returned.get(consumer, 0), int(seq))
    for consumer in {*cursors, *returned, *(letter.consumer for letter in letters)}:
        cursor = cursors.get(consumer, 0)
        mine = {letter.seq: letter.event_id for letter in letters if letter.consumer == consumer}
        below = {seq for seq in events if seq <= cursor}
        where = f"consumer {consumer!r} at cursor {cursor}; {context}"
        lost = sorted(below - set(mine))
        assert not lost, f"the cursor is past events without their letters: {lost[:10]}; {where}"
        loose = sorted(set(mine) - below)
        assert not loose, f"letters past the cursor, which never moved: {loose[:10]}; {where}"
        wrong = sorted(seq for seq, event_id in mine.items() if events[seq] != event_id)
        assert not wrong, f"letters naming another event: {wrong[:10]}; {where}"
        assert returned.get(consumer, 0) <= cursor, (
            f"record_dead_letter returned for seq {returned[consumer]}, lost since; {where}"
        )
    return len(letters)


#: The consumers of ``crash_child.py --poison``: name -> commit_every. Each
#: gives up on a poison event after this many attempts, as a dead letter.
POISON_CONSUMERS = {"each": 1, "batched": 10}
POISON_ATTEMPTS = 2


async def kill_at_random(child: Child, rng: random.Random, *, ready: bool) -> None:
    """SIGKILL ``child`` at a random moment after it printed ``ready`` (always with
    ``ready``, else half the time), or else maybe while it starts up."""
    if ready or rng.random() < 0.5:
        await child.expect_line("ready", limit=30)
        await trio.sleep(rng.uniform(0.0, 1.0))
    else:
        # Maybe while it starts up, opens the store or replays.
        await trio.sleep(rng.uniform(0.0, 1.5))
    await child.kill(limit=30)


async def finish_or_kill(
    script: str,
    args: Sequence[object],
    stderr: Path,
    rng: random.Random,
    context: str,
    *,
    final: bool,
    ready: bool = True,
    stop: bool = False,
) -> None:
    """Run one run of a storm's child ``script``: with ``final`` (adding ``--finish``)
    until it printed ``ready`` and ``idle`` and exited 0; else `kill_at_random`
    (with ``ready``), or with ``stop`` `stop_then_kill`."""
    async with running(script, *args, *(["--finish"] if final else []), stderr=stderr) as child:
        if final:
            output = await child.finish(limit=120)
            assert output.split() == ["ready", "idle"], context
        elif stop:
            await stop_then_kill(child, rng)
        else:
            await kill_at_random(child, rng, ready=ready)


async def sigkill_while_dead_lettering(
    store_url: str,
    child_url: Callable[[int], str],
    tmp_path: Path,
    *,
    seed: int,
    total: int,
    holes: bool = False,
    kills: int = 6,
    pace: float = 0.02,
    settle: Callable[[int], Awaitable[None]] | None = None,
) -> None:
    """SIGKILL ``crash_child.py --poison`` at random moments ``kills`` times, then let it finish.

    Run ``n`` of the child opens ``child_url(n)``; after each run ``settle(n)``
    waits, if need be, until its last statement is over, and the store at
    ``store_url`` and the logs are checked with `check_poison_state`. The
    last run publishes the rest of the ``total`` events and waits until its
    consumers are idle. ``holes``: sequence numbers may skip (PostgreSQL).
    """
    rng = random.Random(seed)
    logs = tmp_path / "logs"
    logs.mkdir()
    context = f"seed {seed} (rerun: TRIOFLOW_CRASH_SEED={seed}); logs in {tmp_path}"
    store = store_from_url(store_url)
    lettered: list[int] = []

    def grown() -> int:
        """How many runs ended with more dead letters than the run before."""
        return sum(1 for before, after in itertools.pairwise([0, *lettered]) if after > before)

    # Kills that all fell before the first letters (a slow start-up on a busy
    # machine) would test nothing: up to 2 * kills more runs, each killed
    # after it is ready, until the kills fell among the letters.
    run = 0
    while True:
        final = run >= kills and (grown() >= 2 or run >= 3 * kills)
        args = [child_url(run), logs, total, rng.randrange(2**32), pace, "--poison"]
        stderr = tmp_path / f"run{run}.stderr"
        ready = run == 0 or run >= kills
        await finish_or_kill("crash_child.py", args, stderr, rng, context, final=final, ready=ready)
        if settle is not None:
            await settle(run)
        async with store.open():
            letters = await check_poison_state(
                store,
                logs,
                f"after {'the final run' if final else f'kill {run}'}; {context}",
                holes=holes,
                total=total if final else None,
            )
        if final:
            break
        lettered.append(letters)
        run += 1
    # The kills fell among the dead letters, not all before them.
    assert grown() >= 2, f"dead letters recorded after each kill: {lettered}; {context}"


async def check_poison_state(
    store: Store, logs: Path, context: str, *, holes: bool, total: int | None = None
) -> int:
    """Check the store and logs of ``crash_child.py --poison``; return the dead letters.

    The events that are not poison are checked as in any crash test
    (`check_consumer_log`: in order in each run, none skipped, redelivered
    within ``commit_every``). The poison events are the dead letters: each
    consumer has one letter, given up after `POISON_ATTEMPTS` attempts, for
    every poison event up to its cursor, none past it, and none missing
    before an event it handled (it records the letter before it goes on).
    With ``total`` (after a run that ended with ``wait_idle``) every event is
    handled or lettered, and every cursor is at the head.
    """
    events = await read_all(store)
    cursors = await store.load_cursors()
    letters = await store.dead_letters()
    check_counters(
        [(event.seq, event.type, event.data["n"]) for event in events],
        logs / "published.log",
        context,
        holes=holes,
    )
    head = events[-1].seq if events else 0
    poison = {event.seq: event.id for event in events if event.data["poison"]}
    expected = [event.seq for event in events if not event.data["poison"]]
    for name, commit_every in POISON_CONSUMERS.items():
        runs = read_runs(logs / f"{name}.log")
        cursor = cursors.get(name, 0)
        where = f"consumer {name!r} (commit_every={commit_every}) at cursor {cursor}; {context}"
        assert cursor <= head, f"cursor past the head {head}; {where}"
        check_consumer_log(runs, expected, cursor, commit_every, where)
        mine = [letter for letter in letters if letter.consumer == name]
        seqs = [letter.seq for letter in mine]
        assert len(seqs) == len(set(seqs)), f"dead letters recorded twice: {seqs}; {where}"
        wrong = [
            letter
            for letter in mine
            if poison.get(letter.seq) != letter.event_id
            or (letter.reason, letter.attempts) != ("exhausted", POISON_ATTEMPTS)
        ]
        assert not wrong, f"dead letters of the wrong events or attempts: {wrong[:3]}; {where}"
        owed = {seq for seq in poison if seq <= cursor}
        lost = sorted(owed - set(seqs))
        assert not lost, f"the cursor is past poison events with no dead letter: {lost}; {where}"
        loose = sorted(set(seqs) - owed)
        assert not loose, f"dead letters past the cursor, which never moved: {loose}; {where}"
        furthest = max((seq for run in runs for seq in run), default=0)
        unrecorded = sorted(seq for seq in poison if cursor < seq < furthest)
        assert not unrecorded, (
            f"it handled {furthest}, past poison events {unrecorded} whose dead letters were "
            f"not recorded first; {where}"
        )
        if total is not None:
            handled = {seq for run in runs for seq in run}
            assert handled == set(expected), (
                f"never handled {sorted(set(expected) - handled)[:20]}; {where}"
            )
            assert cursor == head, f"cursor not at the head {head} after wait_idle; {where}"
    if total is not None:
        assert len(events) == total, f"{len(events)} events in the store, not {total}; {context}"
        assert poison, f"no poison event among {total}; {context}"
    return len(letters)


async def stop_then_kill(child: Child, rng: random.Random) -> None:
    """SIGSTOP ``child`` at a random moment after it printed ``ready``, SIGCONT it
    after a while (at times longer than its leases last), then SIGKILL it."""
    await child.expect_line("ready", limit=30)
    await trio.sleep(rng.uniform(0.0, 0.5))
    child.process.send_signal(signal.SIGSTOP)
    await trio.sleep(rng.uniform(0.3, 1.5))
    child.process.send_signal(signal.SIGCONT)
    await trio.sleep(rng.uniform(0.0, 0.5))
    await child.kill(limit=30)


async def sigkill_batch_consumers(
    store_url: str,
    child_url: Callable[[int], str],
    tmp_path: Path,
    *,
    seed: int,
    events_per_run: int = 500,
    holes: bool = False,
    kills: int = 6,
    pace: float = 0.02,
    settle: Callable[[int], Awaitable[None]] | None = None,
) -> None:
    """SIGKILL ``batch_crash_child.py`` at random moments ``kills`` times, then let it finish.

    Run ``n`` of the child opens ``child_url(n)`` and publishes up to
    ``events_per_run`` events, so that each run has some to handle; run 1 is
    stopped (SIGSTOP) for a while first. After each run ``settle(n)`` waits,
    if need be, until its last statement is over, and the store at
    ``store_url`` and the logs are checked with `check_batch_state`. The last
    run publishes its events at once and waits until its consumers are idle.
    ``holes``: sequence numbers may skip (PostgreSQL).
    """
    rng = random.Random(seed)
    logs = tmp_path / "logs"
    logs.mkdir()
    context = f"seed {seed} (rerun: TRIOFLOW_CRASH_SEED={seed}); logs in {tmp_path}"
    store = store_from_url(store_url)
    killed_at: list[Mapping[str, int]] = []
    pending: list[int] = []

    # Kills that all fell where no batch was done past a durable cursor (a slow
    # start-up on a busy machine) would not test the bound: up to 2 * kills
    # more runs, each killed after it is ready, until enough fell among them.
    run = stored = 0
    while True:
        landed = sum(1 for batches in pending if batches)
        final = run >= kills and (landed >= kills // 2 or run >= 3 * kills)
        # Written here, before the child starts, so a kill at any moment splits the runs.
        for name in BATCH_CONSUMERS:
            with (logs / f"{name}.log").open("a") as log:
                log.write("restart\n")
        total = stored + events_per_run
        args = [child_url(run), logs, total, rng.randrange(2**32), pace]
        await finish_or_kill(
            "batch_crash_child.py",
            args,
            tmp_path / f"run{run}.stderr",
            rng,
            context,
            final=final,
            ready=run == 0 or run >= kills,
            stop=run == 1,
        )
        if settle is not None:
            await settle(run)
        async with store.open():
            events = [(event.seq, event.type, event.data["n"]) for event in await read_all(store)]
            cursors = await store.load_cursors()
        stored = len(events)
        where = f"after {'the final run' if final else f'kill {run}'}; {context}"
        if final:
            check_batch_state(events, cursors, killed_at, logs, where, holes=holes, total=total)
            break
        killed_at.append(cursors)
        pending.append(check_batch_state(events, cursors, killed_at, logs, where, holes=holes))
        run += 1
    # The kills fell among the batches: they left batches done past the cursors.
    assert landed >= kills // 2, (
        f"batches done past the durable cursors at each kill: {pending}; {context}"
    )


def split_batches(batches: Sequence[Sequence[int]]) -> list[list[Sequence[int]]]:
    """Split one process's batches into runs, wherever a batch does not go on past
    the last (a consumer restarted inside the process, back at its cursor)."""
    runs: list[list[Sequence[int]]] = []
    for batch in batches:
        if not runs or batch[0] <= runs[-1][-1][-1]:
            runs.append([])
        runs[-1].append(batch)
    return runs


def check_batch_state(
    events: Sequence[tuple[int, str, int]],
    cursors: Mapping[str, int],
    killed_at: Sequence[Mapping[str, int]],
    logs: Path,
    context: str,
    *,
    holes: bool,
    total: int | None = None,
) -> int:
    """Check the store and logs of ``batch_crash_child.py``; return how many batches
    were done past the cursors at the last kill.

    ``killed_at`` holds the stored cursors after each kill, one per killed run.
    For each consumer: every batch is of its types, of at most ``batch``
    events; within a run (and after a restart inside it) the events come in
    order without gaps (`check_runs`), and a run handles again at most
    ``commit_every * batch`` events. A killed run did at most ``commit_every``
    batches past the cursor stored at its kill, and the next run starts right
    after that cursor. Every event up to the cursor was handled. With
    ``total`` (after a run that ended with ``wait_idle``) every event is
    stored and handled, every cursor at the head, and every consumer with
    ``batch`` above 1 handled a batch of more than one event.
    """
    check_counters(events, logs / "published.log", context, holes=holes)
    head = events[-1][0] if events else 0
    past = 0
    for name, (size, options) in BATCH_CONSUMERS.items():
        commit_every, types = options["commit_every"] or 1, options.get("types")
        expected = [seq for seq, kind, _ in events if types is None or kind in types]
        runs = read_batch_runs(logs / f"{name}.log")
        cursor = cursors.get(name, 0)
        where = f"consumer {name!r} (batch={size}, commit_every={commit_every}); {context}"
        assert len(runs) == len(killed_at) + (total is not None), f"runs {len(runs)}; {where}"
        wrong = [batch for run in runs for batch in run if not 0 < len(batch) <= size]
        assert not wrong, f"batches of the wrong size: {wrong[:3]}; {where}"
        for number, run in enumerate(runs):
            if number and run:
                stored = killed_at[number - 1].get(name, 0)
                after = bisect.bisect_right(expected, stored)
                assert after < len(expected) and run[0][0] == expected[after], (
                    f"run {number} started with {run[0]}, not right after the cursor {stored} "
                    f"stored at the kill before; {where}"
                )
            if number < len(killed_at):
                stored = killed_at[number].get(name, 0)
                done = [[b for b in part if b[-1] > stored] for part in split_batches(run)]
                assert all(len(batches) <= commit_every for batches in done), (
                    f"run {number} did the batches of seqs "
                    f"{[[f'{b[0]}..{b[-1]}' for b in batches] for batches in done]} past the "
                    f"cursor {stored} stored at its kill; {where}"
                )
                if number == len(killed_at) - 1 and total is None:
                    past += len(done[-1]) if done else 0
        parts = [part for run in runs for part in split_batches(run)]
        flat = [[seq for batch in part for seq in batch] for part in parts]
        for number, again in enumerate(check_runs(flat, expected, where)):
            assert len(again) <= commit_every * size, (
                f"run {number} (or restart) handled {len(again)} events again: {again}; {where}"
            )
        assert cursor <= head, f"cursor {cursor} past the head {head}; {where}"
        handled = {seq for run in flat for seq in run}
        missed = [seq for seq in expected if seq <= cursor and seq not in handled]
        assert not missed, f"cursor {cursor} is past unhandled events {missed[:10]}; {where}"
        if total is not None:
            assert handled == set(expected), (
                f"never handled {sorted(set(expected) - handled)[:20]}; {where}"
            )
            assert cursor == head, f"cursor {cursor} not at the head {head} after idle; {where}"
            if size > 1:
                assert max(len(batch) for run in runs for batch in run) > 1, (
                    f"never handled more than one event at once; {where}"
                )
    if total is not None:
        assert len(events) == total, f"{len(events)} events in the store, not {total}; {context}"
    return past


#: The event types ``projection_child.py``'s projection applies.
PROJECTED = frozenset({"pay", "order.created"})


@attrs.frozen(kw_only=True)
class ProjectionState:
    """What ``projection_child.py`` left in the store, read directly from it."""

    #: Every event as (seq, type, data), in seq order.
    events: Sequence[tuple[int, str, dict[str, Any]]]
    #: The projection's durable cursor (0 before its first commit).
    cursor: int
    #: The rows of ``effects``: (seq, amount), in the order they were applied.
    effects: Sequence[tuple[int, int]]
    #: The one row of ``totals``: (total, handled).
    totals: tuple[int, int]
    #: The rows of ``orders``: id -> amount.
    orders: Mapping[int, int]


async def sigkill_projection(
    child_url: Callable[[int], str],
    read_state: Callable[[], Awaitable[ProjectionState]],
    tmp_path: Path,
    *,
    seed: int,
    commit_every: int,
    kills: int = 8,
    tables: str = "",
    settle: Callable[[int], Awaitable[None]] | None = None,
) -> None:
    """SIGKILL ``projection_child.py`` at random moments ``kills`` times, then let it finish.

    Run ``n`` of the child opens ``child_url(n)``, its projection taking
    ``commit_every`` events per transaction; after each run ``settle(n)``
    waits, if need be, until its last statement is over, and what
    ``read_state()`` reads from the store is checked with
    `check_projection_state`.
    """
    rng = random.Random(seed)
    logs = tmp_path / "logs"
    logs.mkdir()
    context = f"commit_every={commit_every}, seed {seed}; logs in {tmp_path}"
    applied: list[int] = []
    for run in range(kills + 1):
        final = run == kills
        flags = [f"--tables={tables}"] if tables else []
        args = [child_url(run), logs, commit_every, rng.randrange(2**32), 0.02, *flags]
        stderr = tmp_path / f"run{run}.stderr"
        await finish_or_kill("projection_child.py", args, stderr, rng, context, final=final)
        if settle is not None:
            await settle(run)
        state = await read_state()
        where = f"after {'the final run' if final else f'kill {run}'}; {context}"
        check_projection_state(state, logs, where, final=final)
        applied.append(len(state.effects))
    # The kills fell among the projection's transactions, not all before them.
    grew = sum(1 for before, after in itertools.pairwise([0, *applied[:-1]]) if after > before)
    assert grew >= kills // 2, f"effects after each kill: {applied[:-1]}; {context}"


def check_projection_state(
    state: ProjectionState, logs: Path, context: str, *, final: bool = False
) -> None:
    """Check what ``projection_child.py`` left: each effect once, with its cursor; the
    outbox's rows and events together or not at all.

    The projection's effects are exactly one row per projected event up to its
    cursor (a second row: applied twice; a missing one: its cursor moved
    without its effect; one past the cursor: its effect committed without
    its cursor), each with its event's amount, and ``totals`` adds them up.
    Every order row has exactly one ``order.created`` event and each such
    event its row; the orders the child saw commit are there, those it rolled
    back are not; every publish that returned is stored. With ``final`` (the
    child waited until idle) the cursor is at the head.
    """
    seqs = [seq for seq, _, _ in state.events]
    assert all(a < b for a, b in itertools.pairwise(seqs)), f"seqs not increasing; {context}"
    returned = {int(line) for line in (logs / "published.log").read_text().split()}
    lost = sorted(returned - set(seqs))
    assert not lost, f"publish returned seqs {lost[:20]} that the store lacks; {context}"

    head = seqs[-1] if seqs else 0
    cursor = state.cursor
    assert cursor <= head, f"the cursor {cursor} is past the head {head}; {context}"
    if final:
        assert cursor == head, f"the cursor {cursor} is not at the head {head}; {context}"
    amounts = {seq: data["amount"] for seq, kind, data in state.events if kind in PROJECTED}
    applied = collections.Counter(seq for seq, _ in state.effects)
    order = [seq for seq, _ in state.effects]
    back = [(a, b) for a, b in itertools.pairwise(order) if b <= a]
    assert not back, f"effects applied out of seq order: {back[:10]}; {context}"
    twice = sorted(seq for seq, count in applied.items() if count > 1)
    assert not twice, f"events applied more than once: {twice[:20]}; {context}"
    owed = {seq for seq in amounts if seq <= cursor}
    missing = sorted(owed - set(applied))
    assert not missing, (
        f"the cursor {cursor} is past events never applied: {missing[:20]}; {context}"
    )
    loose = sorted(set(applied) - owed)
    assert not loose, (
        f"effects of events past the cursor {cursor}, or of none projected: {loose[:20]}; {context}"
    )
    wrong = [(seq, amount) for seq, amount in state.effects if amounts[seq] != amount]
    assert not wrong, f"effects with another amount than their event's: {wrong[:10]}; {context}"
    expected_totals = (sum(amount for _, amount in state.effects), len(state.effects))
    assert state.totals == expected_totals, (
        f"totals (total, handled) {state.totals}, the effects add up to {expected_totals}; "
        f"{context}"
    )

    announced = collections.Counter(
        (data["order"], data["amount"]) for _, kind, data in state.events if kind == "order.created"
    )
    repeated = sorted(order for order, count in announced.items() if count > 1)
    assert not repeated, f"orders with more than one event: {repeated[:10]}; {context}"
    rows = set(state.orders.items())
    unannounced = sorted(rows - set(announced))
    assert not unannounced, f"order rows without their event: {unannounced[:10]}; {context}"
    rowless = sorted(set(announced) - rows)
    assert not rowless, f"order events without their row: {rowless[:10]}; {context}"
    committed = {int(line) for line in (logs / "orders.log").read_text().split()}
    vanished = sorted(committed - set(state.orders))
    assert not vanished, f"orders that committed are gone: {vanished[:10]}; {context}"
    rolled_back = {int(line) for line in (logs / "rolledback.log").read_text().split()}
    kept = sorted(rolled_back & set(state.orders))
    assert not kept, f"orders rolled back are in the store: {kept[:10]}; {context}"
    if final:
        assert committed and rolled_back, f"no order committed, or none rolled back; {context}"


#: The plans of ``outbox_child.py`` processes: per process, its blocks, each
#: ``{"sleeps": [...], "roll_back": bool}`` (one event per sleep but the last).
OutboxPlans = list[list[dict[str, Any]]]


#: Hypothesis settings for tests whose examples start processes: few examples,
#: no deadline.
PROCESS_EXAMPLES = settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def outbox_plans(processes: int = 3) -> st.SearchStrategy[OutboxPlans]:
    """Plans for ``processes`` outbox publishers: random sleeps, some blocks rolled
    back, some empty; at least one event committed, for the consumer to wait for."""
    block = st.fixed_dictionaries(
        {
            "sleeps": st.lists(st.sampled_from([0.0, 0.002, 0.01, 0.03]), min_size=1, max_size=5),
            "roll_back": st.booleans(),
        }
    )
    plans = st.lists(
        st.lists(block, min_size=1, max_size=6), min_size=processes, max_size=processes
    )
    return plans.filter(lambda plans: committed_outbox_events(plans) > 0)


def committed_outbox_events(plans: OutboxPlans) -> int:
    """How many events the blocks of ``plans`` that commit publish."""
    return sum(
        len(block["sleeps"]) - 1 for plan in plans for block in plan if not block["roll_back"]
    )


async def run_outbox_publishers(
    url: str,
    consumer_url: str,
    plans: OutboxPlans,
    tmp_path: Path,
    read_events: Callable[[], Awaitable[list[Row]]],
) -> None:
    """Run an ``outbox_child.py`` process per plan, all at once, and a
    ``consumer_child.py`` process; check what the store holds and what the
    consumers saw with `check_outbox_events`."""
    logs = tmp_path / "logs"
    logs.mkdir()
    context = f"plans {plans}; logs in {tmp_path}"
    async with running(
        "consumer_child.py",
        consumer_url,
        logs,
        committed_outbox_events(plans),
        stderr=tmp_path / "consumer.stderr",
    ) as consumer:
        # The consumer process creates the store; the publishers open it after.
        await consumer.expect_line("ready", limit=30)
        await run_together(
            tmp_path,
            {
                f"p{number}": ("outbox_child.py", url, f"p{number}", json.dumps(plan))
                for number, plan in enumerate(plans)
            },
        )
        await consumer.finish(limit=60)
    check_outbox_events(plans, await read_events(), logs, context)


def check_outbox_events(
    plans: OutboxPlans, events: Sequence[Row], logs: Path, context: str
) -> None:
    """The store holds the events of every block that committed, each block's in
    order and together, and none of a block rolled back; each consumer saw
    exactly the store's events in seq order, so none appeared below one it had
    already seen (a gap filled late), and none rolled back."""
    seqs = [seq for seq, _, _ in events]
    assert all(a < b for a, b in itertools.pairwise(seqs)), f"seqs not increasing; {context}"
    blocks = [(pub, n) for _, pub, n in events]
    expected = {
        f"p{number}.{index}": len(block["sleeps"]) - 1
        for number, plan in enumerate(plans)
        for index, block in enumerate(plan)
        if not block["roll_back"] and len(block["sleeps"]) > 1
    }
    runs = [(pub, [n for _, n in run]) for pub, run in itertools.groupby(blocks, lambda b: b[0])]
    found = {pub: ns for pub, ns in runs}
    assert len(found) == len(runs), f"a block's events not together: {runs}; {context}"
    wrong = {pub: ns for pub, ns in found.items() if ns != list(range(expected.get(pub, -1)))}
    assert not wrong, (
        f"blocks rolled back, or their events out of order or incomplete: {wrong}; {context}"
    )
    missing = sorted(set(expected) - set(found))
    assert not missing, f"committed blocks with no event in the store: {missing}; {context}"
    check_consumer_rows(logs, ("plain", "bounded"), events, context)
