"""Member processes on one store, for the workloads that measure several flows at once.

The failover and groups workloads run each flow in a process of its own
(`benchmarks._member_child`), as replicas of a service would run, and drive
them through their stdin and stdout: `open_members` starts them and ends
them, `Member` says what each one last said, and `read_log` and
`check_handled` read and check what every member's handler logged. The
store, read directly (`stored_cursors`), is the ground truth for cursors.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import attrs
import trio

from trioflow.stores import Store

from ._harness import ROOT, BenchmarkFailed
from ._member_child import STORE_URL_VARIABLE
from ._stores import StoreKind
from .latency import SHARED_FAMILIES, check_cursors

#: One handled event as a member logged it: (seq, key or "-", monotonic_ns).
Handled = tuple[int, str, int]
T = TypeVar("T")


def shared_kinds(stores: Sequence[StoreKind], workload: str) -> list[StoreKind]:
    """The kinds of ``stores`` that several processes can open at once.

    Raises:
        ValueError: None of them can (a usage error: the command line names the stores).
    """
    kinds = [kind for kind in stores if kind.family in SHARED_FAMILIES]
    if not kinds:
        raise ValueError(
            f"{workload} runs processes on a shared store: give --store postgres (or another "
            "PostgreSQL or SQLite kind)"
        )
    return kinds


def run_within(timeout: float, what: str, run: Callable[[], Awaitable[T]]) -> T:
    """``trio.run(run)``, failed after ``timeout`` seconds (`open_members` kills the members).

    Raises:
        BenchmarkFailed: It timed out.
    """

    async def main() -> tuple[T] | None:
        with trio.move_on_after(timeout):
            return (await run(),)
        return None

    done = trio.run(main)
    if done is None:
        raise BenchmarkFailed(f"{what} timed out after {timeout:g}s; its members were killed")
    return done[0]


@attrs.define(eq=False)
class Member:
    """One member process, and what it last said on stdout."""

    name: str
    process: trio.Process
    log: Path
    stderr: Path
    #: The consumers (or partitions) it owns, as it last said; None before it said.
    owns: tuple[str, ...] | None = None
    #: Whether it has handled an event.
    handling: bool = False
    #: The monotonic_ns time it said ``done`` with, once it has.
    done_ns: int | None = None
    #: Whether its exit is expected (it was told to stop, or killed).
    leaving: bool = False

    async def say(self, command: str) -> None:
        """Send ``command`` (``go N``, ``finish``, ``stop``) to the member."""
        assert self.process.stdin is not None
        if command in ("finish", "stop"):
            self.leaving = True
        await self.process.stdin.send_all(f"{command}\n".encode())

    def kill(self) -> None:
        """SIGKILL the member: it ends at once, releasing nothing."""
        self.leaving = True
        self.process.send_signal(signal.SIGKILL)

    def stderr_tail(self) -> str:
        """The last lines the member wrote on stderr."""
        text = self.stderr.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.strip().splitlines()[-20:])

    async def wait_exit(self, *, status: int = 0) -> None:
        """Wait until the member exits (after ``stop``, say) with ``status``.

        Raises:
            BenchmarkFailed: It exited with another status.
        """
        self.leaving = True
        code = await self.process.wait()
        if code != status:
            raise BenchmarkFailed(
                f"member {self.name} exited with status {code}, not {status}: {self.stderr_tail()}"
            )


@attrs.define(eq=False)
class Members:
    """The member processes of one run, all on one store; see `open_members`."""

    url: str
    directory: Path
    consumer: str
    nursery: trio.Nursery
    partitions: int | None = None
    lease_ttl: float = 6.0
    handler_ms: float = 0.0
    gated: bool = False
    timeout: float = 600.0
    members: list[Member] = attrs.Factory(list)
    _changed: trio.Event = attrs.Factory(trio.Event)

    async def start(self, name: str) -> Member:
        """Start a member named ``name`` (its log is ``name.log``)."""
        log, stderr = self.directory / f"{name}.log", self.directory / f"{name}.stderr"
        command = [sys.executable, "-m", "benchmarks._member_child"]
        command += [f"--consumer={self.consumer}", f"--log={log}"]
        command += [f"--lease-ttl={self.lease_ttl}", f"--handler-ms={self.handler_ms}"]
        command += [f"--timeout={self.timeout}"]
        if self.partitions is not None:
            command.append(f"--partitions={self.partitions}")
        if self.gated:
            command.append("--gated")
        with stderr.open("wb") as errors:
            process = await trio.lowlevel.open_process(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                cwd=ROOT,
                env={**os.environ, STORE_URL_VARIABLE: self.url},
            )
        member = Member(name=name, process=process, log=log, stderr=stderr)
        self.members.append(member)
        self.nursery.start_soon(self._listen, member)
        return member

    async def _listen(self, member: Member) -> None:
        assert member.process.stdout is not None
        buffer = b""
        while chunk := await member.process.stdout.receive_some():
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                word, _, rest = line.decode().strip().partition(" ")
                if word == "owns":
                    member.owns = tuple(rest.split(",")) if rest else ()
                elif word == "handling":
                    member.handling = True
                elif word == "done":
                    member.done_ns = int(rest)
            self._signal()
        # Its output ended: it exited, or is about to.
        await member.process.wait()
        self._signal()

    def _signal(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        """Wait until ``condition()`` holds, as the members' lines tell.

        Raises:
            BenchmarkFailed: A member exited that was not told to (its stderr says why).
        """
        while not condition():
            for member in self.members:
                code = member.process.returncode
                if code is not None and not member.leaving:
                    raise BenchmarkFailed(
                        f"member {member.name} exited with status {code} while waiting for "
                        f"{what}: {member.stderr_tail()}"
                    )
            await self._changed.wait()


@contextlib.asynccontextmanager
async def open_members(
    url: str,
    directory: Path,
    *,
    consumer: str,
    partitions: int | None = None,
    lease_ttl: float = 6.0,
    handler_ms: float = 0.0,
    gated: bool = False,
    child_timeout: float = 600.0,
) -> AsyncIterator[Members]:
    """Start members with `Members.start`; on exit, kill whichever still run.

    A run that ends well has stopped them all (``stop`` or ``finish``, then
    `Member.wait_exit`); one that failed or timed out leaves none behind.
    `BenchmarkFailed` comes out as itself, not in an exception group.
    ``child_timeout`` bounds each member's life, should this process die
    without killing them.
    """
    started: list[Member] = []
    try:
        async with trio.open_nursery() as nursery:
            members = Members(
                url=url,
                directory=directory,
                consumer=consumer,
                nursery=nursery,
                partitions=partitions,
                lease_ttl=lease_ttl,
                handler_ms=handler_ms,
                gated=gated,
                timeout=child_timeout,
                members=started,
            )
            try:
                yield members
            finally:
                with trio.CancelScope(shield=True):
                    for member in started:
                        if member.process.returncode is None:
                            member.kill()
                        await member.process.wait()
                # The listeners are done with the pipes.
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], BenchmarkFailed):
            raise group.exceptions[0] from None
        raise
    finally:
        with trio.CancelScope(shield=True):
            for member in started:
                for pipe in (member.process.stdin, member.process.stdout):
                    if pipe is not None:
                        await pipe.aclose()


def read_log(path: Path) -> list[Handled]:
    """The events a member's handler logged, in the order it handled them."""
    handled = []
    for line in path.read_text(encoding="utf-8").splitlines():
        seq, key, at = line.split()
        handled.append((int(seq), key, int(at)))
    return handled


def check_handled(
    logs: Mapping[str, Sequence[Handled]], events: int, *, once: bool, what: str
) -> None:
    """Check the members' logs: every seq 1..``events`` handled, in order by key.

    In each log the seqs of every key must increase (an event without a key,
    ``-``, counts as one key: a plain consumer handles them all in order).
    With ``once``, no event may be handled twice, and the order by key holds
    across the logs too (by handling time: one host, one monotonic clock).
    Without it an event may be handled again, as after a failover from a
    killed owner.

    Raises:
        BenchmarkFailed: An event was lost, repeated (with ``once``) or reordered.
    """
    problems = []
    counts = collections.Counter(seq for log in logs.values() for seq, _, _ in log)
    missing = [seq for seq in range(1, events + 1) if seq not in counts]
    if missing:
        problems.append(f"{len(missing):,} events never handled (first: {missing[:5]})")
    stray = sorted(seq for seq in counts if not 1 <= seq <= events)
    if stray:
        problems.append(f"events outside 1..{events:,} handled: {stray[:5]}")
    if once:
        twice = sorted(seq for seq, count in counts.items() if count > 1)
        if twice:
            problems.append(f"{len(twice):,} events handled more than once (first: {twice[:5]})")
    orders = dict(logs)
    if once:
        orders["all members"] = sorted(
            (entry for log in logs.values() for entry in log), key=lambda entry: entry[2]
        )
    for name, log in orders.items():
        last: dict[str, int] = {}
        for seq, key, _ in log:
            if seq <= last.get(key, 0):
                problems.append(f"{name}: key {key!r} handled seq {seq} after {last[key]}")
                break
            last[key] = seq
    if problems:
        raise BenchmarkFailed(f"{what}: " + "; ".join(problems))


async def check_stored_cursors(
    store: Store, names: Iterable[str], events: int, *, what: str
) -> None:
    """Check that the store holds every cursor of ``names`` at ``events``.

    Raises:
        BenchmarkFailed: A cursor is missing or elsewhere.
    """
    stored = await store.load_cursors()
    check_cursors({name: stored.get(name, 0) for name in names}, events, what=what)
