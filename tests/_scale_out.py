"""Scale-out tests with real processes: members of one service, killed, frozen and cut off.

`run_scale_out` starts member processes (``tests/_children/member_child.py``:
a plain consumer ``solo`` and a group ``g`` of `PARTITIONS` partitions) and
publisher processes that publish keyed events for a while. Meanwhile it
SIGKILLs members at random moments and restarts them, freezes one with
SIGSTOP for longer than its lease and resumes it with SIGCONT (once well past
the lease, once just past it), and, when the
test gives it a way to (`Cut`), cuts one member off from the store and lets
it back. Then it waits until the members settle and checks (`check_logs`,
`check_settled`) what they logged against the store, read directly:

(a) every event was handled by ``solo`` and by its own partition of ``g``
    (`partition_of`), and by no other partition;
(b) each consumer (a partition too) handles its events one at a time in seq
    order, so per key as well: no event was first started before the one
    before it was done; an event was handled again only after the process
    that had done it was killed, frozen or cut off, or said it lost the
    lease, and at most ``commit_every`` of them per takeover;
(c) no two processes' calls of one consumer overlap in time, except, for
    each freeze or cut and consumer, the one call the frozen or cut-off
    process had in flight then (docs/deploying.md: "An old owner that was
    paused may also finish the one handler call it was in");
(d) every cursor write the store accepted was fenced, with a token the
    writer had claimed, and no other process started a call of that
    consumer between the claim and the write: a frozen or cut-off owner's
    writes after another took over were all refused;
(e) no process started a call more than ``lease_ttl`` after it sent the last
    claim that renewed the consumer's lease (the lease lapsed by then);
(f) once settled, every consumer and partition has one live lease held by a
    live member, as that member's statistics say, the members' partition
    counts differ by at most one, and every cursor is at the head.

(e), (c) and (d) are checked before (b), so that a failure names its cause
(a call started once the lease had lapsed) rather than its consequence (an
event handled again). All times are ``time.monotonic_ns()``: one clock for every process of the
host. The children's logs are described in ``member_child.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from tests._children.member_child import COMMIT_EVERY, PARTITIONS
from tests._procs import Child, running
from trioflow._groups import partition_of
from trioflow.stores import Store, store_from_url
from trioflow.testing._store_contract import read_all

#: Every consumer key the members run.
KEYS = ("solo", *(f"g/{p}" for p in range(PARTITIONS)))
LEASE_TTL = 1.5
#: Seconds a freeze or cut is held past its least, waiting for a takeover:
#: well under the SQLite store's busy_timeout (30 s), which other writers wait
#: out when the frozen member holds the write lock.
HOLD_MORE = 10.0
#: Seconds each handler call takes; in the member that is frozen.
PAUSE = 0.002
FROZEN_PAUSE = 0.03
PUBLISHERS = ("p1", "p2")
#: Events each publisher publishes at most (it stops when the faults are
#: over), with how many distinct keys, and the mean pause after each publish
#: call: about 60 events a second each.
PER_PUBLISHER = 5000
EVENT_KEYS = 24
PACE = 0.4


@attrs.frozen(kw_only=True)
class Fault:
    """What the test did to one process: ``kill``, ``stop`` (to ``until``) or ``cut``."""

    kind: str
    pid: int
    member: str
    at: int
    until: int
    #: For a stop or a cut: whether another member took its consumers over
    #: before it ended (None: not watched).
    taken_over: bool | None = None


@attrs.frozen(kw_only=True)
class Cut:
    """How to cut one member (``member``, by its URL) off from the store, and back."""

    member: str
    url: str
    cut: Callable[[], None]
    heal: Callable[[], None]


@attrs.define(eq=False)
class Call:
    """One handler call, from its ``start`` and ``end`` lines."""

    pid: int
    consumer: str
    seq: int
    start: int
    #: When it ended; a call of a killed process without an end line ends
    #: at the kill; None: it never ended.
    end: int | None = None
    ok: bool = False

    def describe(self) -> str:
        return f"pid {self.pid} {self.consumer} seq {self.seq} [{self.start}, {self.end}]"


@attrs.define(eq=False)
class Logs:
    """Everything the members logged, parsed."""

    calls: list[Call]
    #: pid -> its claims: (sent, returned, {key: token held}).
    claims: dict[int, list[tuple[int, int, dict[str, int]]]]
    #: (pid, sent, written (key, token, cursor), refused (key, token)) of every
    #: cursor write that returned.
    commits: list[tuple[int, int, list[tuple[str, int | None, int]], list[tuple[str, int | None]]]]
    #: (pid, time, message) of every warning.
    warnings: list[tuple[int, int, str]]
    dead_letters: list[dict[str, object]]


def read_logs(paths: Iterable[Path], faults: Sequence[Fault]) -> Logs:
    calls: list[Call] = []
    open_calls: dict[tuple[int, str, int], Call] = {}
    logs = Logs(calls=calls, claims={}, commits=[], warnings=[], dead_letters=[])
    for path in paths:
        for text in path.read_text().splitlines():
            line = json.loads(text)
            kind, pid, t = line["kind"], line["pid"], line["t"]
            if kind == "start":
                call = Call(pid=pid, consumer=line["c"], seq=line["seq"], start=t)
                calls.append(call)
                open_calls[pid, call.consumer, call.seq] = call
            elif kind == "end":
                call = open_calls.pop((pid, line["c"], line["seq"]))
                call.end, call.ok = t, line["ok"]
            elif kind == "claim":
                logs.claims.setdefault(pid, []).append((line["t0"], t, line["held"]))
            elif kind == "commit":
                if "failed" not in line:
                    written = [(str(key), token, seq) for key, token, seq in line["ok"]]
                    refused = [(str(key), token) for key, token in line["refused"]]
                    logs.commits.append((pid, line["t0"], written, refused))
            elif kind == "warn":
                logs.warnings.append((pid, t, line["message"]))
            elif kind == "dead-letter":
                logs.dead_letters.append(line)
    killed = {fault.pid: fault.at for fault in faults if fault.kind == "kill"}
    for (pid, _, _), call in open_calls.items():
        call.end = killed.get(pid)
    calls.sort(key=lambda call: call.start)
    return logs


def _exempt(call: Call, faults: Sequence[Fault]) -> Fault | None:
    """The freeze or cut during which ``call`` was in flight, if any."""
    for fault in faults:
        if (
            fault.kind != "kill"
            and fault.pid == call.pid
            and call.start <= fault.until
            and (call.end is None or call.end >= fault.at)
        ):
            return fault
    return None


def check_logs(
    logs: Logs,
    events: Sequence[tuple[int, str | None]],
    faults: Sequence[Fault],
    lease_ttl: float,
    context: str,
) -> list[Call]:
    """Checks (a) to (e) of the module docstring; return the calls (c) let overlap."""
    by_consumer: dict[str, list[Call]] = {key: [] for key in KEYS}
    for call in logs.calls:
        assert call.consumer in by_consumer, f"a call of an unknown consumer: {call}; {context}"
        by_consumer[call.consumer].append(call)
    assert not logs.dead_letters, f"dead letters recorded: {logs.dead_letters[:3]}; {context}"

    # (a) Every event handled, by its own partition only.
    expected: dict[str, list[int]] = {key: [] for key in KEYS}
    for seq, key in events:
        expected["solo"].append(seq)
        expected[f"g/{partition_of(key, seq, PARTITIONS)}"].append(seq)
    for consumer, seqs in expected.items():
        done = {call.seq for call in by_consumer[consumer] if call.ok}
        started = {call.seq for call in by_consumer[consumer]}
        missed = sorted(set(seqs) - done)
        assert not missed, f"{consumer} never handled {missed[:10]}; {context}"
        stray = sorted(started - set(seqs))
        assert not stray, f"{consumer} handled events not its own: {stray[:10]}; {context}"

    # (e) Nobody started a call once its lease had lapsed.
    ttl = int(lease_ttl * 1e9)
    for call in logs.calls:
        renewals = [
            sent
            for sent, returned, held in logs.claims.get(call.pid, [])
            if call.consumer in held and returned <= call.start
        ]
        assert renewals, f"{call.describe()} started, never having held the lease; {context}"
        assert call.start - max(renewals) <= ttl, (
            f"{call.describe()} started {(call.start - max(renewals)) / 1e9:.3f}s after its "
            f"last renewal was sent, past the lease's {lease_ttl}s; {context}"
        )

    # (c) No overlapping calls, but the one in flight at each freeze or cut.
    exempt: dict[tuple[Fault, str], Call] = {}
    for consumer, calls in by_consumer.items():
        for index, call in enumerate(calls):
            end = call.end if call.end is not None else 2**63
            for other in calls[index + 1 :]:
                if other.start >= end:
                    break
                if other.pid == call.pid:
                    continue
                for party in (call, other):
                    during = _exempt(party, faults)
                    if during is not None and exempt.setdefault((during, consumer), party) is party:
                        break
                else:
                    pytest.fail(
                        f"{consumer}: calls of two processes overlap: {call.describe()} and "
                        f"{other.describe()}; {context}"
                    )
    exempted = list(exempt.values())

    # (d) Accepted writes were fenced, and nobody else started in between.
    ids = {id(call) for call in exempted}
    for pid, sent, written, _ in logs.commits:
        for key, token, _ in written:
            assert token is not None, (
                f"pid {pid} wrote the cursor of {key} without a fence at {sent}; {context}"
            )
            got = [
                returned for _, returned, held in logs.claims.get(pid, []) if held.get(key) == token
            ]
            assert got, f"pid {pid} wrote {key} with token {token} it never got; {context}"
            intruders = [
                call
                for call in by_consumer[key]
                if call.pid != pid and min(got) < call.start < sent and id(call) not in ids
            ]
            assert not intruders, (
                f"the store accepted pid {pid}'s write of {key} (token {token}, sent at {sent}) "
                f"though {intruders[0].describe()} started after it took the lease; {context}"
            )

    # (b) In seq order; again only after a disruption, at most commit_every per takeover.
    disruptions: dict[int, list[tuple[int, int, str | None]]] = {}
    for fault in faults:
        disruptions.setdefault(fault.pid, []).append((fault.at, fault.until, None))
    for pid, t, message in logs.warnings:
        if "stops handling" in message:
            disruptions.setdefault(pid, []).append((t, t, message))
    for pid, sent, _, refused in logs.commits:
        for key, _ in refused:
            disruptions.setdefault(pid, []).append((sent, sent, f"consumer {key!r}"))

    def disrupted(pid: int, consumer: str, after: int, before: int) -> bool:
        return any(
            start <= before
            and until >= after
            and (message is None or f"consumer {consumer!r}" in message)
            for start, until, message in disruptions.get(pid, [])
        )

    for consumer, calls in by_consumer.items():
        first_start: dict[int, int] = {}
        first_done: dict[int, int] = {}
        for call in calls:
            first_start.setdefault(call.seq, call.start)
            if call.ok and call.end is not None:
                first_done[call.seq] = min(first_done.get(call.seq, call.end), call.end)
        for before, after in itertools.pairwise(expected[consumer]):
            assert first_start[after] > first_done[before], (
                f"{consumer} started seq {after} before seq {before} was done; {context}"
            )
        last_done: dict[int, Call] = {}
        segment_pid, again = None, 0
        for call in calls:
            if call.pid != segment_pid:
                segment_pid, again = call.pid, 0
            previous = last_done.get(call.seq)
            if previous is not None and previous.end is not None and previous.end < call.start:
                assert previous.pid != call.pid, (
                    f"{consumer}: one process handled seq {call.seq} twice: "
                    f"{previous.describe()}, {call.describe()}; {context}"
                )
                assert disrupted(previous.pid, consumer, previous.end, call.start), (
                    f"{consumer}: seq {call.seq} handled again ({call.describe()}) though the "
                    f"process that had handled it ({previous.describe()}) was neither killed, "
                    f"frozen nor cut off, nor lost the lease; {context}"
                )
                again += 1
                assert again <= COMMIT_EVERY, (
                    f"{consumer}: pid {call.pid} handled {again} events again after a "
                    f"takeover, more than commit_every={COMMIT_EVERY}; {context}"
                )
            if call.ok:
                last_done[call.seq] = call

    return exempted


async def settled_problems(store: Store, members: dict[str, dict[str, object]]) -> list[str]:
    """(f): what keeps the store and the live ``members`` (name -> statistics) from
    being settled."""
    problems: list[str] = []
    events = await read_all(store)
    head = events[-1].seq if events else 0
    cursors = await store.load_cursors()
    behind = {key: cursors.get(key) for key in KEYS if cursors.get(key) != head}
    if behind:
        problems.append(f"cursors not at the head {head}: {behind}")
    leases = {lease.key: lease.holder for lease in await store.leases()}
    holders = {str(stats["holder"]): name for name, stats in members.items()}
    for key in KEYS:
        if leases.get(key) not in holders:
            problems.append(f"{key} leased to {leases.get(key)}, not a live member")
    counts = {
        name: sum(1 for key in KEYS[1:] if leases.get(key) == stats["holder"])
        for name, stats in members.items()
    }
    if max(counts.values()) - min(counts.values()) > 1:
        problems.append(f"partitions per member not balanced: {counts}")
    for name, stats in members.items():
        if f"g#member:{stats['holder']}" not in leases:
            problems.append(f"{name} holds no membership lease")
        owned = sorted(key for key in KEYS if leases.get(key) == stats["holder"])
        if owned != stats["owned"]:
            problems.append(f"{name} says it owns {stats['owned']}, the store says {owned}")
    return problems


@attrs.define(eq=False)
class _Member:
    name: str
    url: str
    child: Child | None = None


async def run_scale_out(
    store_url: str,
    tmp_path: Path,
    *,
    seed: int,
    members: int = 4,
    kills: int = 4,
    cut: Cut | None = None,
    member_url: Callable[[str, int], str] | None = None,
    settle: Callable[[str, int], Awaitable[None]] | None = None,
) -> None:
    """Run the scenario of the module docstring, then check it.

    ``member_url(name, run)`` is the store URL of run ``run`` of member
    ``name`` (default ``store_url``); ``cut`` names a member to cut off once
    (its URL replaces that); ``settle(name, run)`` waits, after a kill, until
    the killed process's last statement is over.
    """
    rng = random.Random(seed)
    logs_dir = tmp_path / "logs"
    logs_dir.mkdir()
    context = f"seed {seed} (rerun: TRIOFLOW_SCALE_SEED={seed}); logs in {tmp_path}"
    faults: list[Fault] = []
    runs: dict[str, int] = {}
    names = [f"m{i}" for i in range(members)]
    team = {name: _Member(name, store_url) for name in names}
    if cut is not None:
        team[cut.member].url = cut.url
    frozen = next(name for name in names if cut is None or name != cut.member)

    async with contextlib.AsyncExitStack() as stack:

        async def start(member: _Member) -> None:
            run = runs[member.name] = runs.get(member.name, -1) + 1
            url = member.url
            if member_url is not None and (cut is None or member.name != cut.member):
                url = member_url(member.name, run)
            member.child = await stack.enter_async_context(
                running(
                    "member_child.py",
                    url,
                    logs_dir / f"{member.name}.log",
                    LEASE_TTL,
                    # The member to freeze is slow, so that it is mostly frozen mid-call.
                    FROZEN_PAUSE if member.name == frozen else PAUSE,
                    stdin=True,
                    stderr=tmp_path / f"{member.name}.{run}.stderr",
                )
            )
            await member.child.expect_line("ready", limit=30)

        async def wait_owning(member: _Member) -> None:
            """Until ``member`` owns a consumer: a fault that hits it then tests a takeover."""
            assert member.child is not None
            with trio.move_on_after(20):
                while True:
                    await member.child.send_line("stats")
                    line = await member.child.read_line(limit=10, what="statistics")
                    if json.loads(line)["owned"]:
                        return
                    await trio.sleep(0.1)
            pytest.fail(f"{member.name} owned nothing for 20s; {context}")

        def logged(kind: str) -> list[dict[str, Any]]:
            """The lines of ``kind`` logged so far by every member."""
            lines = []
            for path in logs_dir.glob("*.log"):
                for text in path.read_text().splitlines():
                    try:
                        line = json.loads(text)
                    except ValueError:
                        continue  # a line being written
                    if line["kind"] == kind:
                        lines.append(line)
            return lines

        async def hold_until_taken_over(member: _Member, at: int, least: float) -> bool:
            """Wait ``least`` seconds, then until another process holds (by its claims)
            a consumer ``member`` handled before ``at``, for at most `HOLD_MORE` seconds
            more: on a loaded machine the others may need longer than the lease to take
            over. Return whether they did.

            (A member of a SQLite store frozen inside a write transaction holds the
            file's only write lock: nobody can claim anything until it resumes, and
            the wait stays well under the writers' busy_timeout.)"""
            assert member.child is not None
            pid = member.child.process.pid
            await trio.sleep(least)
            with trio.move_on_after(HOLD_MORE):
                while True:
                    claims = logged("claim")
                    mine = held_before(
                        [(c["t0"], c["t"], c["held"]) for c in claims if c["pid"] == pid], at
                    )
                    if any(
                        claim["pid"] != pid and claim["t"] > at and mine & set(claim["held"])
                        for claim in claims
                    ):
                        return True
                    await trio.sleep(0.1)
            return False

        def note(
            kind: str, member: _Member, at: int, until: int, taken_over: bool | None = None
        ) -> None:
            assert member.child is not None
            pid = member.child.process.pid
            faults.append(
                Fault(
                    kind=kind,
                    pid=pid,
                    member=member.name,
                    at=at,
                    until=until,
                    taken_over=taken_over,
                )
            )

        for member in team.values():
            await start(member)
        go, stop = tmp_path / "go", tmp_path / "stop"
        publishers = [
            await stack.enter_async_context(
                running(
                    "publisher_child.py",
                    store_url,
                    name,
                    PER_PUBLISHER,
                    rng.randrange(2**32),
                    go,
                    EVENT_KEYS,
                    PACE,
                    stop,
                    stderr=tmp_path / f"{name}.stderr",
                )
            )
            for name in PUBLISHERS
        ]
        for publisher in publishers:
            await publisher.expect_line("ready", limit=30)
        go.touch()

        actions = ["kill"] * kills + ["stop", "pause"] + (["cut"] if cut is not None else [])
        rng.shuffle(actions)
        for action in actions:
            await trio.sleep(rng.uniform(0.5, 1.5))
            if action == "kill":
                member = team[rng.choice(names)]
                assert member.child is not None
                at = time.monotonic_ns()
                await member.child.kill(limit=30)
                # Until it is gone: it may still log (a call's end) after `at`.
                note("kill", member, at, time.monotonic_ns())
                if settle is not None and (cut is None or member.name != cut.member):
                    await settle(member.name, runs[member.name])
                await trio.sleep(rng.uniform(0.0, LEASE_TTL))
                await start(member)
            elif action in ("stop", "pause"):
                member = team[frozen]
                assert member.child is not None
                await wait_owning(member)
                at = time.monotonic_ns()
                member.child.process.send_signal(signal.SIGSTOP)
                # A stop lasts well past the lease: the others take its
                # consumers over meanwhile. A pause lasts just past it: the
                # member wakes about when they may, and must know its lease
                # lapsed (SAFETY < 1).
                taken_over = None
                if action == "stop":
                    taken_over = await hold_until_taken_over(member, at, 2.5 * LEASE_TTL)
                else:
                    await trio.sleep(1.1 * LEASE_TTL)
                until = time.monotonic_ns()
                member.child.process.send_signal(signal.SIGCONT)
                note("stop", member, at, until, taken_over)
            else:
                assert cut is not None
                member = team[cut.member]
                await wait_owning(member)
                at = time.monotonic_ns()
                cut.cut()
                taken_over = await hold_until_taken_over(member, at, 2.5 * LEASE_TTL)
                until = time.monotonic_ns()
                cut.heal()
                note("cut", member, at, until, taken_over)
        stop.touch()
        for publisher in publishers:
            await publisher.finish(limit=60)

        store = store_from_url(store_url)
        async with store.open():
            problems: list[str] = []
            with trio.move_on_after(45):
                while True:
                    stats = {}
                    for member in team.values():
                        assert member.child is not None
                        await member.child.send_line("stats")
                        line = await member.child.read_line(limit=10, what="statistics")
                        stats[member.name] = json.loads(line)
                    problems = await settled_problems(store, stats)
                    if not problems:
                        break
                    await trio.sleep(0.2)
            assert not problems, f"not settled after 45s: {problems}; {context}"
            stored = await read_all(store)
        for name in PUBLISHERS:
            counters = [event.data["n"] for event in stored if event.data["pub"] == name]
            assert counters == list(range(len(counters))), f"{name}'s events; {context}"
        events = [(event.seq, event.key) for event in stored]
        for member in team.values():
            assert member.child is not None
            await member.child.send_line("stop")
            await member.child.finish(limit=30)

    logs = read_logs(sorted(logs_dir.glob("*.log")), faults)
    exempted = check_logs(logs, events, faults, LEASE_TTL, f"faults {faults}; {context}")
    check_exercised(logs, faults, context, sqlite=store_url.startswith("sqlite:"))
    # For the curious: what the faults did.
    print("calls in flight at a freeze or cut, overlapped:", [c.describe() for c in exempted])


def held_before(claims: Sequence[tuple[int, int, Mapping[str, int]]], at: int) -> set[str]:
    """The consumer keys (not memberships) a process held by its last claim before ``at``."""
    before = [held for _, returned, held in claims if returned < at]
    return {key for key in before[-1] if key in KEYS} if before else set()


def check_exercised(
    logs: Logs, faults: Sequence[Fault], context: str, *, sqlite: bool = False
) -> None:
    """The faults hit the members while they worked: a test of what it says it tests."""
    assert any(
        call.pid == fault.pid and call.start < fault.at
        for fault in faults
        if fault.kind == "kill"
        for call in logs.calls
    ), f"every kill hit a process that had handled nothing; {context}"
    long_faults = [
        fault
        for fault in faults
        if fault.kind != "kill" and fault.until - fault.at >= 2 * LEASE_TTL * 1e9
    ]
    # Every freeze or cut was taken over, but on SQLite a member frozen inside a
    # write transaction: it holds the file's only write lock, and nobody can
    # claim its consumers until it resumes (see `run_scale_out`).
    for fault in long_faults:
        if fault.taken_over is False and fault.kind == "stop" and sqlite:
            continue
        # The others took its consumers over (claimed them) while it was frozen
        # or cut off; whether they had events to handle then is up to the publishers.
        consumers = held_before(logs.claims.get(fault.pid, []), fault.at)
        taken = [
            (pid, returned)
            for pid, claims in logs.claims.items()
            if pid != fault.pid
            for _, returned, held in claims
            if fault.at < returned < fault.until and consumers & set(held)
        ]
        assert taken, f"nobody took over from {fault} while it lasted; {context}"


def scale_seeds(default: Sequence[int]) -> list[int]:
    """``TRIOFLOW_SCALE_SEED=<n>`` reruns the scale-out tests with one seed only."""
    if "TRIOFLOW_SCALE_SEED" in os.environ:
        return [int(os.environ["TRIOFLOW_SCALE_SEED"])]
    return list(default)
