"""Processes sharing one SQLite file: publishers in some, consumers in another.

The children (``tests/_children``) are started with ``sys.executable``. The
consumer process learns of the others' events only by polling the file; its
consumers log ``"<seq> <publisher> <counter>"`` per event, checked against the
store read directly with sqlite3.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

pytestmark = pytest.mark.slow

CHILDREN = Path(__file__).parent / "_children"
#: The consumers of consumer_child.py.
CONSUMERS = ("plain", "bounded")

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

    async def finish(self, *, limit: float) -> None:
        """Wait for the child to exit 0."""
        with trio.move_on_after(limit):
            await self.process.wait()
        if self.process.returncode != 0:
            pytest.fail(f"child did not exit 0 within {limit}s; " + self.describe())


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


def read_events(db: Path) -> list[Row]:
    """Every event in the store as (seq, publisher, counter), in seq order."""
    with contextlib.closing(sqlite3.connect(db)) as connection:
        rows = connection.execute("SELECT seq, data FROM trioflow_events ORDER BY seq")
        return [(seq, json.loads(data)["pub"], json.loads(data)["n"]) for seq, data in rows]


def read_log(path: Path) -> list[Row]:
    rows: list[Row] = []
    for line in path.read_text().splitlines():
        seq, publisher, n = line.split()
        rows.append((int(seq), publisher, int(n)))
    return rows


def first_difference(seen: list[Row], expected: list[Row]) -> int:
    for index, (a, b) in enumerate(zip(seen, expected, strict=False)):
        if a != b:
            return index
    return min(len(seen), len(expected))


def check_consumers(logs: Path, events: list[Row], context: str) -> None:
    for name in CONSUMERS:
        seen = read_log(logs / f"{name}.log")
        if seen != events:
            at = first_difference(seen, events)
            seqs = [seq for seq, _, _ in seen]
            pytest.fail(
                f"consumer {name!r} saw {len(seen)} events, the store holds {len(events)}; "
                f"first difference at index {at}: saw {seen[at : at + 3]}, "
                f"stored {events[at : at + 3]}; went back: "
                f"{[(a, b) for a, b in itertools.pairwise(seqs) if b <= a][:10]}; {context}"
            )


async def test_consumer_process_sees_what_a_publisher_process_appends(tmp_path: Path) -> None:
    count = 2000
    db = tmp_path / "events.db"
    logs = tmp_path / "logs"
    logs.mkdir()
    context = f"logs and store in {tmp_path}"
    async with running(
        "consumer_child.py", db, logs, count, stderr=tmp_path / "consumer.stderr"
    ) as b:
        # The consumer process creates the file; the publisher opens it after.
        await b.expect_line("ready", limit=30)
        async with running(
            "publisher_child.py", db, "a", count, 1, stderr=tmp_path / "publisher.stderr"
        ) as a:
            await a.finish(limit=60)
        await b.finish(limit=60)
    events = read_events(db)
    assert [seq for seq, _, _ in events] == list(range(1, count + 1)), context
    assert [n for _, _, n in events] == list(range(count)), context
    check_consumers(logs, events, context)


async def test_two_publisher_processes_and_a_consumer_process(tmp_path: Path) -> None:
    count = 1000
    db = tmp_path / "events.db"
    logs = tmp_path / "logs"
    logs.mkdir()
    context = f"logs and store in {tmp_path}"
    async with running(
        "consumer_child.py", db, logs, 2 * count, stderr=tmp_path / "consumer.stderr"
    ) as consumer:
        await consumer.expect_line("ready", limit=30)
        async with (
            running("publisher_child.py", db, "p1", count, 1, stderr=tmp_path / "p1.stderr") as p1,
            running("publisher_child.py", db, "p2", count, 2, stderr=tmp_path / "p2.stderr") as p2,
        ):
            await p1.finish(limit=60)
            await p2.finish(limit=60)
        await consumer.finish(limit=60)
    events = read_events(db)
    assert [seq for seq, _, _ in events] == list(range(1, 2 * count + 1)), context
    for publisher in ("p1", "p2"):
        counters = [n for _, pub, n in events if pub == publisher]
        assert counters == list(range(count)), f"{publisher}'s events out of order; {context}"
    check_consumers(logs, events, context)
