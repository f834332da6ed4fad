"""The groups workload: what a consumer group's partitions buy, in one process and across several.

Each run fills a fresh store shared by processes (the SQLite and PostgreSQL
kinds) with N events (``--events``; this
workload's default is 20,000) of the fan-out workload's 200-byte data, the
i-th with key ``key-{i mod --keys}``, untimed. Then M member processes
(`benchmarks._member_child`) start on it, each running the same consumer,
whose handler sleeps ``--handler-ms`` milliseconds (``await
trio.sleep(...)``: an API call, say) before it logs the event. Handlers wait
at a gate meanwhile, so nothing is handled until the members have shared
the partitions evenly; then every member is told to go, and how many events
its partitions hold.

Cases (``--case`` selects by id; ``plain`` always runs, the ratios need it):

``plain`` (the reference)
    The same handler as a plain consumer (not a group) in one process: one
    event at a time.
``group-M``
    The consumer as a group of ``--partitions`` partitions, run by M member
    processes (``--members``, default 1, 2 and 4): each runs its partitions
    concurrently, and the members share them.

The figure: drained ev/s is N over the seconds from the first event handled
(the earliest time any member logged) until every cursor was at the head
(the earliest time a member's ``flow.wait_idle()`` returned, called once it
had handled its share: it returns only when every partition's stored cursor
is at the head). ``vs plain`` divides by the plain consumer's, ``vs 1
member`` by the one-member group's: the scaling across processes. Beside
it, ``cpu ceiling``: after each run of ``group-M`` (M > 1), a pure-Python
loop spins for a second in one process, then in M at once; their total
iterations over the one's is the most M CPU-bound members could gain on this
machine, as loaded now. Every run checks that every event was handled
exactly once, in order per key (across the members, by handling time), and
that the store holds every partition's cursor at N.
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

import trioflow
from trioflow._groups import partition_key, partition_of

from ._data import EVENT_TYPE, make_data
from ._harness import (
    BenchmarkFailed,
    Case,
    Options,
    Workload,
    positive_float,
    positive_int,
    positive_ints,
)
from ._members import (
    Member,
    check_handled,
    check_stored_cursors,
    open_members,
    read_log,
    run_within,
    shared_kinds,
)
from ._report import Metric
from ._stores import StoreKind
from .latency import shared_store_url

#: The consumer every member runs.
CONSUMER = "groups"
#: Events per publish_many call when filling the store.
FILL_BATCH = 1000
#: Seconds each process of `cpu_ceiling` spins.
SPIN_SECONDS = 1.0
#: What a process of `cpu_ceiling` runs: a pure-Python loop for SPIN_SECONDS; it
#: prints its iterations.
_SPIN = """
import time
end, n = time.perf_counter() + {seconds}, 0
while time.perf_counter() < end:
    for _ in range(10_000):
        n += 1
print(n)
"""

Figures = Mapping[str, float]


@attrs.frozen(kw_only=True, eq=False)
class Plan:
    """What every run publishes and how the members handle it.

    Attributes:
        items: The ``(type, data, key)`` items published, in order (seqs 1..N).
        partitions: The group's partition count, or None for a plain consumer.
        members: Member processes.
        handler_ms: Milliseconds each handler call sleeps.
        lease_ttl: The members' ``App(lease_ttl=...)``.
    """

    items: Sequence[tuple[str, Any, str]]
    partitions: int | None
    members: int
    handler_ms: float
    lease_ttl: float

    @property
    def events(self) -> int:
        """N: events per run."""
        return len(self.items)

    def names(self) -> list[str]:
        """The consumer's cursor names: one per partition, or the plain consumer's."""
        if self.partitions is None:
            return [CONSUMER]
        return [partition_key(CONSUMER, p) for p in range(self.partitions)]

    def counts(self) -> dict[str, int]:
        """Events per cursor name."""
        counts = dict.fromkeys(self.names(), 0)
        for seq, (_, _, key) in enumerate(self.items, start=1):
            if self.partitions is None:
                counts[CONSUMER] += 1
            else:
                counts[partition_key(CONSUMER, partition_of(key, seq, self.partitions))] += 1
        return counts


def _balanced(members: Sequence[Member], names: Sequence[str]) -> bool:
    owns = [member.owns for member in members]
    if any(owned is None for owned in owns):
        return False
    sizes = [len(owned or ()) for owned in owns]
    held = sorted(name for owned in owns for name in owned or ())
    return held == sorted(names) and max(sizes) - min(sizes) <= 1


async def _drain(url: str, directory: Path, plan: Plan, *, child_timeout: float, what: str) -> int:
    """One run on ``url``: returns when every cursor was at the head (monotonic_ns)."""
    # Encoding a batch of the fill blocks this flow for a while; it is not timed.
    app = trioflow.App(url, shutdown_grace=1.0, blocking_warning=None)
    names, counts = plan.names(), plan.counts()
    async with trioflow.open_flow(app) as flow:
        seqs: list[int] = []
        for start in range(0, plan.events, FILL_BATCH):
            seqs += await flow.publish_many(plan.items[start : start + FILL_BATCH])
        if seqs != list(range(1, plan.events + 1)):
            raise BenchmarkFailed(f"{what}: the store gave seqs other than 1..{plan.events:,}")
        async with open_members(
            url,
            directory,
            consumer=CONSUMER,
            partitions=plan.partitions,
            lease_ttl=plan.lease_ttl,
            handler_ms=plan.handler_ms,
            gated=True,
            child_timeout=child_timeout,
        ) as group:
            members = [await group.start(f"member-{index}") for index in range(plan.members)]
            await group.wait_until(
                lambda: _balanced(members, names), "the members to share the partitions"
            )
            for member in members:
                await member.say(f"go {sum(counts[name] for name in member.owns or ())}")
            await group.wait_until(
                lambda: all(member.done_ns is not None for member in members),
                "every member to finish",
            )
            for member in members:
                await member.say("stop")
            for member in members:
                await member.wait_exit()
        await check_stored_cursors(app.store, names, plan.events, what=what)
    return min(member.done_ns or 0 for member in members)


def cpu_ceiling(processes: int, *, seconds: float = SPIN_SECONDS) -> float:
    """How much more pure-Python work ``processes`` processes get done than one, now.

    Each spins for ``seconds``, one alone, then ``processes`` at once: the
    ratio of their total iterations is what this machine (its cores, and
    whatever else runs on them) allows M members at best.
    """

    def spin(count: int) -> int:
        code = _SPIN.format(seconds=seconds)
        spinning = [
            subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
            for _ in range(count)
        ]
        return sum(int(process.communicate()[0]) for process in spinning)

    return spin(processes) / spin(1)


def drain_run(kind: StoreKind, plan: Plan, *, timeout: float, what: str) -> Figures:
    """One run of ``plan`` on a fresh store of ``kind``; its figures.

    Raises:
        BenchmarkFailed: An event was lost, repeated or reordered, a cursor
            is not at the head, a member failed, or the run timed out.
    """
    with shared_store_url(kind) as url, tempfile.TemporaryDirectory() as name:
        directory = Path(name)

        idle_ns = run_within(
            timeout,
            what,
            functools.partial(_drain, url, directory, plan, child_timeout=timeout, what=what),
        )
        logs = {path.stem: read_log(path) for path in sorted(directory.glob("*.log"))}
    check_handled(logs, plan.events, once=True, what=what)
    first = min(at for log in logs.values() for _, _, at in log[:1])
    last = max(at for log in logs.values() for _, _, at in log)
    seconds = (idle_ns - first) / 1e9
    return {
        "drained_per_s": plan.events / seconds,
        "drain_s": seconds,
        "handling_s": (last - first) / 1e9,
        "cpu_ceiling": 1.0 if plan.members == 1 else cpu_ceiling(plan.members),
    }


# --- the cases --------------------------------------------------------------------------


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--members",
        type=positive_ints,
        default=[1, 2, 4],
        metavar="M[,M...]",
        help="member processes of the group, one case each (default: 1,2,4)",
    )
    parser.add_argument(
        "--partitions",
        type=positive_int,
        default=16,
        metavar="P",
        help="the group's partitions (default: %(default)s)",
    )
    parser.add_argument(
        "--keys",
        type=positive_int,
        default=1000,
        metavar="KEYS",
        help="distinct event keys (default: %(default)s)",
    )
    parser.add_argument(
        "--handler-ms",
        type=float,
        default=1.0,
        metavar="MS",
        help="milliseconds every handler call sleeps (default: %(default)s)",
    )
    parser.add_argument(
        "--lease-ttl",
        type=positive_float,
        default=6.0,
        metavar="SECONDS",
        help="the members' App(lease_ttl=...) (default: %(default)s)",
    )


def _cases(options: Options, args: argparse.Namespace) -> list[Case]:
    kinds = shared_kinds(options.stores, "groups")
    data = make_data(options.events)
    items = [(EVENT_TYPE, item, f"key-{seq % args.keys}") for seq, item in enumerate(data, start=1)]
    common = {"keys": args.keys, "handler_ms": args.handler_ms, "lease_ttl": args.lease_ttl}
    plain = Plan(
        items=items,
        partitions=None,
        members=1,
        handler_ms=args.handler_ms,
        lease_ttl=args.lease_ttl,
    )
    cases = []
    for kind in kinds:
        cases.append(
            Case(
                id="plain",
                description=(
                    f"one process, a plain consumer whose handler sleeps {args.handler_ms:g} ms: "
                    "one event at a time"
                ),
                store=kind.name,
                consumers=1,
                events=options.events,
                params={**common, "partitions": None, "members": 1},
                reference=True,
                run=functools.partial(
                    drain_run, kind, plain, timeout=options.timeout, what=f"plain on {kind.name}"
                ),
            )
        )
        for members in dict.fromkeys(args.members):
            plan = attrs.evolve(plain, partitions=args.partitions, members=members)
            cases.append(
                Case(
                    id=f"group-{members}",
                    description=(
                        f"a group of {args.partitions} partitions run by {members} member "
                        f"process(es), the same handler"
                    ),
                    store=kind.name,
                    consumers=1,
                    events=options.events,
                    params={**common, "partitions": args.partitions, "members": members},
                    baseline="group-1" if 1 in args.members else None,
                    run=functools.partial(
                        drain_run,
                        kind,
                        plan,
                        timeout=options.timeout,
                        what=f"group-{members} on {kind.name}",
                    ),
                )
            )
    return cases


WORKLOAD = Workload(
    name="groups",
    summary=(
        "events/s a consumer group drains with a 1 ms handler, run by 1, 2 and 4 member "
        "processes; compared with a plain consumer in one process"
    ),
    metrics=(
        Metric(key="drained_per_s", label="drained ev/s", unit="events/s"),
        Metric(key="drain_s", label="seconds", unit="s", decimals=2),
        Metric(key="cpu_ceiling", label="cpu ceiling", unit="ratio", decimals=2),
    ),
    ratio_metric="drained_per_s",
    ratio_label="vs plain",
    baseline_label="vs 1 member",
    cases=_cases,
    add_arguments=_add_arguments,
    defaults={"events": 20_000, "consumers": 1},
    option_help={"consumers": "not used: one consumer (--members sets the processes)"},
)
