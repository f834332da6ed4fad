"""The latency workload: how long an event takes from ``publish`` to a consumer's handler.

A paced publisher publishes at a fixed rate (``--rate``, events/s; default
1,000 and 10,000) to K consumers (``--consumers``) whose no-op handlers note
each event's latency: the time the handler was called minus the time taken
just before ``flow.publish`` was called for that event, carried in the
event's data. Both times come from ``time.monotonic_ns()``, Linux's
CLOCK_MONOTONIC, which is one clock for the whole machine: a child process
can subtract the parent's timestamp from its own.

Cases (``--case`` selects by id; the ``raw`` cases always run, the ratios
need them; ``@R`` is the target rate in events/s):

``raw@R`` (the reference at rate R)
    The in-process floor: one task sends pre-built events at rate R, one
    ``await send.send(event)`` per event and consumer, into K unbounded trio
    memory channels; K tasks receive them and call the same handler the
    trioflow consumers use.
``in-process@R``
    trioflow: the publisher and the K consumers in one flow, in this process.
``cross-process@R``
    trioflow across processes: this process publishes on a flow with no
    consumers; a child process (``python -m benchmarks._latency_child``)
    opens the same store URL and runs the K consumers. Built only for stores
    that processes can share (the SQLite and PostgreSQL kinds); not for
    ``memory``, which lives in one process. The child is started, and says
    it is ready (its consumers started), before the first publish; it exits
    once every consumer handled N events and writes each consumer's samples
    and its checks to a JSON file, which this process reads. A run that
    times out kills the child.
``asyncpg@R`` (the PostgreSQL store kinds)
    What the machine allows: the hand-written asyncio+asyncpg program
    (`benchmarks.asyncpg_latency`, in a subprocess) paced at rate R. Its
    writer group-commits on one connection as trioflow's dispatcher does
    (what queued during a commit goes in the next one; an advisory lock, the
    INSERT and ``pg_notify`` in one statement); its K readers, each on its
    own connection and woken by one LISTEN connection, read the new rows,
    decode them and note each event's latency. It writes its samples as the
    cross-process child does, and this process ranks and checks them with
    the same code. Its readers are on other connections than its writer:
    it takes the way trioflow takes across processes (commit, notification,
    read), less trioflow's read of the head; in process, trioflow's own
    appends wake its consumers with no notification and no read, so the
    program does one round trip more than trioflow needs there, and its
    commit wait and commit (``--stages``) are the tighter floor.

The publisher: one task paces the schedule by absolute deadlines
(``trio.sleep_until(start + i / R)``), so pacing errors do not accumulate.
With ``--publish spawn`` (the default) it starts each event's ``publish`` in
a task of its own at its deadline, so a publish waiting for its commit never
holds back the schedule (an open loop: concurrent publishes share group
commits); with ``--publish await`` it awaits each ``publish`` before
sleeping until the next deadline (a closed loop: a store slower than the
schedule lowers the achieved rate instead of queueing). The raw cases send
inline. The event loop's timers wake about once a millisecond, so at rates
above 1,000 events/s the events of one millisecond go out together.

Each run publishes ``min(--events, R * --seconds)`` events, so a run lasts
about that many events / R seconds. Figures per run: p50, p99, p99.9 and max
latency in milliseconds, over every consumer's samples (all of them, except
the first ``--warmup`` events of each consumer when asked); the achieved
rate; ``late_max_ms``, the most the pacing task woke after a deadline; and
``p99_vs_raw``, the run's p99 over that of the ``raw`` run at the same rate
just before it (1.0 for the raw runs): the table's ratio column shows its
median. On PostgreSQL the trioflow cases' p99 and p99.9 are also divided by
those of ``asyncpg@R`` on the same store kind, which runs just before them
in every round (ratios of the medians over the runs: the ``p99 vs
asyncpg`` and ``p99.9 vs asyncpg`` columns, ``comparisons`` in the JSON
file). Every run checks that each consumer handled exactly sequence numbers
1..N, each once and in order, and that the committed cursors are at N;
otherwise the benchmark fails.

With ``--stages``, the trioflow cases also split every delivery's latency
into stages (`benchmarks._stages`): the wait for the group commit, the
store's append, the fan-out and wake-up and, across processes, the
notification and the read; ``asyncpg@R`` the wait for the commit in flight,
the commit, and the notification with the read and the decoding (named as
trioflow's in-process stages: ``queue``, ``append``, ``deliver``). The JSON
file gets each stage's median and its mean in the slowest 1%, and how many
of those slow deliveries overlapped a garbage collection.

With ``--gc-freeze``, each trioflow case gets a twin, ``in-process+gc-freeze@R``
and ``cross-process+gc-freeze@R``, run right after it in every round: the
same, with ``gc.freeze()`` called in each of its trioflow processes once the
flow has opened (`steady`), so that what start-up allocated leaves the
collector's scans. Their p99 and p99.9 are also divided by their twin's (the
``p99 vs unfrozen`` and ``p99.9 vs unfrozen`` columns).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio

import trioflow
from trioflow.stores import Store, store_from_url

from ._data import DATA_BYTES, EVENT_TYPE, Data, make_data
from ._gc import GCTimer
from ._harness import (
    ROOT,
    BenchmarkFailed,
    Case,
    Options,
    Workload,
    positive_float,
    run_program,
)
from ._report import Comparison, Metric
from ._samples import STAMP as STAMP
from ._samples import child_report as child_report
from ._samples import now_ns as now_ns
from ._stages import TimedStore, breakdown
from ._stores import POSTGRES_URL_VARIABLE, StoreKind, fresh_postgres_schema, with_options
from .fanout import Figures, Tally, _receive_each, _run_within, check_tallies, make_events

#: The target rates, events/s, when no ``--rate`` is given.
DEFAULT_RATES = (1000.0, 10000.0)
#: The environment variable giving the cross-process child its store URL
#: (not its command line, where a password in the URL would show).
STORE_URL_VARIABLE = "TRIOFLOW_BENCH_LATENCY_STORE_URL"
#: The line the child prints on stdout once its consumers have started.
READY = "ready"
#: The store families whose stores several processes can open at once.
SHARED_FAMILIES = ("sqlite", "postgres")

_NS_PER_MS = 1_000_000
T = TypeVar("T")


class LatencyTally(Tally):
    """A no-op handler that notes each event's latency, and checks the order as `Tally` does."""

    __slots__ = ("samples",)

    def __init__(self) -> None:
        super().__init__()
        #: Nanoseconds from just before ``publish`` to this handler's call, per event.
        self.samples: list[int] = []

    async def handle(self, event: trioflow.Event) -> None:
        """Note the latency of ``event`` (first thing), then count it and check its seq."""
        self.samples.append(now_ns() - event.data[STAMP])
        await super().handle(event)


def percentile(ordered: Sequence[int], fraction: float) -> int:
    """The nearest-rank percentile of the sorted, non-empty ``ordered`` (``fraction`` in (0, 1])."""
    return ordered[max(math.ceil(fraction * len(ordered)), 1) - 1]


@attrs.frozen(kw_only=True)
class Pacing:
    """How the paced publisher kept to its schedule in one run.

    Attributes:
        events: Events published.
        rate: The target rate, events/s.
        seconds: From the first publish call until the last publish returned.
        late: The most the pacing task woke after a deadline, in seconds.
    """

    events: int
    rate: float
    seconds: float
    late: float

    @property
    def achieved(self) -> float:
        """Events/s as the schedule ran: ``events`` over ``seconds`` plus one period.

        The extra period makes a publisher exactly on time, whose publishes
        return at once, show the target rate.
        """
        return self.events / (self.seconds + 1 / self.rate)


def summarize(
    tallies: Sequence[LatencyTally], pacing: Pacing, *, warmup: int, what: str
) -> dict[str, float]:
    """Check that every consumer handled seqs 1..N in order, then pool and rank its samples.

    The first ``warmup`` samples of each consumer are left out of the
    percentiles (they are still checked).

    Raises:
        BenchmarkFailed: A consumer missed, repeated or reordered an event.
    """
    check_tallies(tallies, pacing.events, what=what)
    ordered = sorted(sample for tally in tallies for sample in tally.samples[warmup:])
    return {
        "p50_ms": percentile(ordered, 0.5) / _NS_PER_MS,
        "p99_ms": percentile(ordered, 0.99) / _NS_PER_MS,
        "p999_ms": percentile(ordered, 0.999) / _NS_PER_MS,
        "max_ms": ordered[-1] / _NS_PER_MS,
        "samples": len(ordered),
        "achieved_per_s": pacing.achieved,
        "publish_s": pacing.seconds,
        "late_max_ms": pacing.late * 1000,
    }


def check_cursors(cursors: Mapping[str, int], events: int, *, what: str) -> None:
    """Raise `BenchmarkFailed` unless every committed cursor is at ``events``."""
    wrong = {name: cursor for name, cursor in cursors.items() if cursor != events}
    if wrong:
        raise BenchmarkFailed(f"{what}: committed cursors {wrong}, expected {events:,} each")


def read_child_report(
    text: str,
) -> tuple[list[LatencyTally], dict[str, int], dict[str, Any] | None]:
    """The consumers' tallies, committed cursors and stage timings from a `child_report`."""
    report = json.loads(text)
    tallies = []
    for entry in report["consumers"]:
        tally = LatencyTally()
        tally.count, tally.last = entry["count"], entry["last"]
        tally.out_of_order, tally.samples = entry["out_of_order"], entry["samples_ns"]
        tallies.append(tally)
    cursors = {str(name): int(cursor) for name, cursor in report["cursors"].items()}
    return tallies, cursors, report.get("stages")


# --- the paced publisher --------------------------------------------------------------


async def pace(
    rate: float,
    items: Sequence[T],
    publish: Callable[[T], Awaitable[object]],
    *,
    spawn: bool,
) -> Pacing:
    """Call ``publish(item)`` for the i-th item at ``start + i / rate``.

    With ``spawn`` each call runs in a task of its own (the schedule never
    waits for a publish); otherwise each is awaited before the next deadline.
    Returns once every call has returned.
    """
    period = 1 / rate
    late = 0.0
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        for index, item in enumerate(items):
            # Absolute deadlines: a late wake-up shortens the next sleep
            # rather than delaying every later event.
            deadline = start + index * period
            await trio.sleep_until(deadline)
            late = max(late, trio.current_time() - deadline)
            if spawn:
                nursery.start_soon(publish, item)
            else:
                await publish(item)
    return Pacing(events=len(items), rate=rate, seconds=trio.current_time() - start, late=late)


def _stamped_publish(
    flow: trioflow.Flow, stamps: dict[int, int]
) -> Callable[[Data], Awaitable[None]]:
    """Publish an item stamped with the time; note the stamp in ``stamps`` by seq."""

    async def publish(item: Data) -> None:
        # Each event has its own dict and consumers get a decoded copy of it,
        # so stamping in place is safe, and no copy is made after the stamp.
        item[STAMP] = stamp = now_ns()
        stamps[await flow.publish(EVENT_TYPE, item)] = stamp

    return publish


@attrs.frozen(kw_only=True, eq=False)
class _Plan:
    """One case's schedule: its rate, the data it publishes, how it publishes.

    Built once, before any run, so that building the data is not timed.
    """

    rate: float
    data: Sequence[Data]
    spawn: bool
    #: Whether the trioflow runs time their stages (`benchmarks._stages`).
    stages: bool = False
    #: Whether the trioflow runs freeze the collector once their flow has opened (`steady`).
    gc_freeze: bool = False

    @property
    def events(self) -> int:
        return len(self.data)


@contextlib.contextmanager
def steady(freeze: bool = False) -> Iterator[None]:
    """Collect garbage once; with ``freeze``, also move every object the collector
    tracks to its permanent generation (`gc.freeze`) for the block, and back into
    the oldest generation after.

    Entered once the flow has opened. The collection is the one a fresh
    process makes on its own about a hundred young collections in: its
    first full one, over everything start-up imported and allocated (12 to 14 ms
    in the consumers' process), which would otherwise land inside the
    measurement, as the harness's own `gc.collect()` before each run keeps the
    previous run's out of it. With ``freeze`` what start-up allocated (modules,
    functions, classes, the store's connections) is then never scanned again,
    so each full collection scans only what the run allocated.
    """
    gc.collect()
    if not freeze:
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# --- the raw-channel reference ---------------------------------------------------------


async def _raw_run(
    plan: _Plan, events: Sequence[trioflow.Event], tallies: Sequence[LatencyTally], warmup: int
) -> Figures:
    finished: list[float] = []
    sends: list[trio.MemorySendChannel[trioflow.Event]] = []

    async def send(event: trioflow.Event) -> None:
        event.data[STAMP] = now_ns()
        for channel in sends:
            await channel.send(event)

    async with trio.open_nursery() as nursery:
        for tally in tallies:
            channel, receive = trio.open_memory_channel[trioflow.Event](math.inf)
            sends.append(channel)
            await nursery.start(_receive_each, receive, tally, len(events), finished)
        # Sent inline whatever --publish says: a send never waits.
        pacing = await pace(plan.rate, events, send, spawn=False)
    return summarize(tallies, pacing, warmup=warmup, what="raw channels")


# --- trioflow, in one process -----------------------------------------------------------


async def _in_process_run(
    store: Store, plan: _Plan, tallies: Sequence[LatencyTally], warmup: int, what: str
) -> Figures:
    timed = TimedStore(store) if plan.stages else None
    # Stopping is not measured; a short grace keeps a run quick should it be needed.
    app = trioflow.App(timed or store, shutdown_grace=1.0)
    for index, tally in enumerate(tallies):
        app.consumer(f"consumer-{index}")(tally.handle)
    stamps: dict[int, int] = {}
    with GCTimer(keep_pauses=True) as collecting:
        async with trioflow.open_flow(app) as flow:
            with steady(plan.gc_freeze):
                pacing = await pace(
                    plan.rate, plan.data, _stamped_publish(flow, stamps), spawn=plan.spawn
                )
                await flow.wait_idle()
            statistics = flow.statistics()
    figures = summarize(tallies, pacing, warmup=warmup, what=what)
    if statistics.published != plan.events:
        raise BenchmarkFailed(f"{what}: published {statistics.published:,} of {plan.events:,}")
    check_cursors({n: c.cursor for n, c in statistics.consumers.items()}, plan.events, what=what)
    if timed is not None:
        figures |= breakdown(
            stamps=stamps,
            samples=[tally.samples for tally in tallies],
            warmup=warmup,
            appends=timed.appends,
            pauses=collecting.pauses,
        )
    return figures


# --- trioflow, consumers in a child process -------------------------------------------


@contextlib.contextmanager
def shared_store_url(kind: StoreKind) -> Iterator[str]:
    """A URL of a fresh, empty store of ``kind`` that other processes can open too."""
    if kind.family == "sqlite":
        with tempfile.TemporaryDirectory(prefix="trioflow-bench-") as directory:
            path = urllib.parse.quote(str(Path(directory, "events.db")))
            yield f"sqlite:///{path}?{urllib.parse.urlencode(kind.options)}"
    elif kind.family == "postgres":
        with fresh_postgres_schema() as (url, schema):
            yield with_options(url, schema=schema, **kind.options)
    else:
        raise ValueError(f"store {kind.name!r} cannot be shared by processes")


async def _read_line(stream: trio.abc.ReceiveStream) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = await stream.receive_some()
        if not chunk:
            break
        line += chunk
    return line.strip()


@attrs.define(eq=False)
class _ChildRun:
    """What became of one cross-process run, filled in as it goes."""

    process: trio.Process | None = None
    #: The child's first line on stdout: `READY`, unless it failed to start.
    said: bytes = b""
    pacing: Pacing | None = None
    completed: subprocess.CompletedProcess[bytes] | None = None
    #: Each event's publish timestamp, by seq.
    stamps: dict[int, int] = attrs.Factory(dict)
    #: With stages: the publisher's store, timed.
    timed: TimedStore | None = None

    def failure(self, what: str) -> str | None:
        """Why the run failed (the child did not get ready, or did not exit 0), or None."""
        completed = self.completed
        if completed is None:
            return f"{what}: the child process said {self.said!r}, not {READY!r}, and was killed"
        stderr = "\n".join(completed.stderr.decode(errors="replace").strip().splitlines()[-20:])
        if self.pacing is None:
            return (
                f"{what}: the child process said {self.said!r}, not {READY!r}, and exited with "
                f"status {completed.returncode}: {stderr}"
            )
        if completed.returncode != 0:
            return f"{what}: the child process exited with status {completed.returncode}: {stderr}"
        return None


async def _run_child(
    command: Sequence[str],
    env: Mapping[str, str],
    record: _ChildRun,
    *,
    task_status: trio.TaskStatus[trio.Process],
) -> None:
    # Cancelled (the run timed out), run_process kills the child.
    record.completed = await trio.run_process(
        command,
        stdout=subprocess.PIPE,
        capture_stderr=True,
        check=False,
        cwd=ROOT,
        env=env,
        task_status=task_status,
    )


async def _publish_to_child(
    url: str, plan: _Plan, command: Sequence[str], record: _ChildRun
) -> None:
    """Start the child, wait until it is ready, publish; return once it exited."""
    if plan.stages:
        record.timed = TimedStore(store_from_url(url))
    app = trioflow.App(record.timed or url, shutdown_grace=1.0)
    # The flow opens first: it creates the store's schema before the child opens it.
    async with trioflow.open_flow(app) as flow, trio.open_nursery() as nursery:
        env = {**os.environ, STORE_URL_VARIABLE: url}
        record.process = child = await nursery.start(_run_child, command, env, record)
        assert child.stdout is not None
        record.said = await _read_line(child.stdout)
        # The child prints nothing else: its pipe can close now.
        await child.stdout.aclose()
        if record.said == READY.encode():
            with steady(plan.gc_freeze):
                record.pacing = await pace(
                    plan.rate, plan.data, _stamped_publish(flow, record.stamps), spawn=plan.spawn
                )
        elif record.said:
            nursery.cancel_scope.cancel()
        # Otherwise the child ended before it was ready: let it exit, for its stderr.


def _cross_process_run(
    kind: StoreKind,
    plan: _Plan,
    *,
    consumers: int,
    timeout: float,
    warmup: int,
    poll_interval: float | None,
    what: str,
) -> Figures:
    record = _ChildRun()

    async def main() -> bool:
        with trio.move_on_after(timeout) as deadline:
            await _publish_to_child(url, plan, command, record)
        return deadline.cancelled_caught

    with shared_store_url(kind) as url, tempfile.TemporaryDirectory() as directory:
        out = Path(directory, "samples.json")
        command = [
            sys.executable,
            "-m",
            "benchmarks._latency_child",
            f"--consumers={consumers}",
            f"--events={plan.events}",
            f"--out={out}",
            f"--timeout={timeout}",
        ]
        if poll_interval is not None:
            command.append(f"--poll-interval={poll_interval}")
        if plan.stages:
            command.append("--stages")
        if plan.gc_freeze:
            command.append("--gc-freeze")
        with GCTimer(keep_pauses=True) as collecting:
            timed_out = trio.run(main)
        if timed_out:
            pid = "" if record.process is None else f" {record.process.pid}"
            raise BenchmarkFailed(f"{what} timed out after {timeout:g}s; child process{pid} killed")
        problem = record.failure(what)
        if problem is not None:
            raise BenchmarkFailed(problem)
        assert record.pacing is not None
        tallies, cursors, stages = read_child_report(out.read_text(encoding="utf-8"))
    if len(tallies) != consumers:
        raise BenchmarkFailed(f"{what}: the child reported {len(tallies)} of {consumers} consumers")
    figures = summarize(tallies, record.pacing, warmup=warmup, what=what)
    check_cursors(cursors, plan.events, what=what)
    if record.timed is not None and stages is not None:
        figures |= breakdown(
            stamps=record.stamps,
            samples=[tally.samples for tally in tallies],
            warmup=warmup,
            appends=record.timed.appends,
            reads=[tuple(span) for span in stages["reads"]],
            wakes=[tuple(wake) for wake in stages["wakes"]],
            pauses=collecting.pauses + [tuple(pause) for pause in stages["pauses"]],
        )
    return figures


# --- the hand-written asyncpg program, on PostgreSQL --------------------------------


def _asyncpg_run(
    kind: StoreKind, plan: _Plan, *, consumers: int, timeout: float, warmup: int, what: str
) -> Figures:
    """The hand-written program (`benchmarks.asyncpg_latency`) at ``plan``'s rate, in a
    subprocess; its samples ranked and checked as the trioflow cases' are."""
    durability = kind.options.get("cursor_durability", "sync")
    with fresh_postgres_schema() as (url, schema), tempfile.TemporaryDirectory() as directory:
        out = Path(directory, "samples.json")
        command = [
            sys.executable,
            "-m",
            "benchmarks.asyncpg_latency",
            f"--schema={schema}",
            f"--events={plan.events}",
            f"--readers={consumers}",
            f"--rate={plan.rate!r}",
            f"--cursor-durability={durability}",
            f"--out={out}",
        ]
        # Exit status 1: its own check failed, and its stderr says how.
        ran = run_program(
            command, what=what, timeout=timeout, env={POSTGRES_URL_VARIABLE: url}, check_status=1
        )
        tallies, cursors, stages = read_child_report(out.read_text(encoding="utf-8"))
    if len(tallies) != consumers:
        raise BenchmarkFailed(f"{what}: the program reported {len(tallies)} of {consumers} readers")
    pacing = Pacing(
        events=plan.events, rate=plan.rate, seconds=ran["publish_s"], late=ran["late_max_ms"] / 1000
    )
    figures = {"gc_s": ran["gc_s"], **summarize(tallies, pacing, warmup=warmup, what=what)}
    check_cursors(cursors, plan.events, what=what)
    if plan.stages and stages is not None:
        figures |= breakdown(
            stamps=dict(enumerate(stages["stamps"], start=1)),
            samples=[tally.samples for tally in tallies],
            warmup=warmup,
            appends=[tuple(span) for span in stages["appends"]],
            pauses=[tuple(pause) for pause in stages["pauses"]],
        )
    return figures


# --- the cases --------------------------------------------------------------------------


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rate",
        action="append",
        type=positive_float,
        metavar="R",
        help="target publish rate, events/s (repeatable; default: 1000 and 10000)",
    )
    parser.add_argument(
        "--seconds",
        type=positive_float,
        default=5.0,
        metavar="S",
        help="a run publishes at most R*S of the N events, so it lasts about S seconds "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--publish",
        choices=("spawn", "await"),
        default="spawn",
        help="spawn: each publish in its own task, started at its deadline (open loop); "
        "await: the pacing task awaits each publish (closed loop) (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=0,
        metavar="W",
        help="leave each consumer's first W events out of the percentiles; they are still "
        "published and checked (default: %(default)s)",
    )
    parser.add_argument(
        "--poll-interval",
        type=positive_float,
        metavar="SECONDS",
        help="cross-process: the child's App(poll_interval=...), how often it looks for "
        "events another process appended (default: the store's own; SQLite 0.1, "
        "PostgreSQL 1.0 as a fallback to its notifications)",
    )
    parser.add_argument(
        "--stages",
        action="store_true",
        help="also time each delivery's stages (group commit wait, append, notification, "
        "read, fan-out and wake-up) and the garbage collector's pauses; in the JSON file",
    )
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="also run each trioflow case with gc.freeze() called in its processes once the "
        "flow has opened (cases in-process+gc-freeze@R, cross-process+gc-freeze@R), each "
        "right after its twin, and compare their p99 and p99.9 with the twin's",
    )


def _versus_raw(figures: Figures, floors: Mapping[float, float], rate: float) -> Figures:
    # The raw run at the same rate ran just before, in the same round of runs.
    return {**figures, "p99_vs_raw": figures["p99_ms"] / max(floors[rate], 1e-9)}


def _cases(options: Options, args: argparse.Namespace) -> list[Case]:
    rates: list[float] = list(dict.fromkeys(args.rate or DEFAULT_RATES))
    warmup: int = args.warmup
    spawn = args.publish == "spawn"
    poll_interval: float | None = args.poll_interval
    k, timeout = options.consumers, options.timeout
    per_rate = {rate: min(options.events, max(math.ceil(rate * args.seconds), 1)) for rate in rates}
    if not 0 <= warmup < min(per_rate.values()):
        raise ValueError(
            f"--warmup must be at least 0 and less than the events per run "
            f"({min(per_rate.values()):,}), got {warmup}"
        )
    data = make_data(max(per_rate.values()))
    for item in data:
        # In place from the start, so that every run's events are the same size.
        item[STAMP] = 0
    plans = {
        rate: _Plan(rate=rate, data=data[: per_rate[rate]], spawn=spawn, stages=args.stages)
        for rate in rates
    }
    floors: dict[float, float] = {}
    common = {"data_bytes": DATA_BYTES, "timestamp": STAMP, "warmup": warmup}
    if args.stages:
        common["stages"] = True

    def raw_run(plan: _Plan) -> Callable[[], Figures]:
        events = make_events(plan.data)

        def run() -> Figures:
            tallies = [LatencyTally() for _ in range(k)]
            figures = _run_within(
                timeout,
                tallies,
                plan.events,
                "raw channels",
                partial(_raw_run, plan, events, tallies, warmup),
            )
            floors[plan.rate] = figures["p99_ms"]
            return {**figures, "p99_vs_raw": 1.0}

        return run

    def in_process_run(kind: StoreKind, plan: _Plan) -> Callable[[], Figures]:
        what = f"trioflow {_case_id('in-process', plan)} on {kind.name}"

        def run() -> Figures:
            tallies = [LatencyTally() for _ in range(k)]
            with kind.fresh() as store:
                figures = _run_within(
                    timeout,
                    tallies,
                    plan.events,
                    what,
                    partial(_in_process_run, store, plan, tallies, warmup, what),
                )
            return _versus_raw(figures, floors, plan.rate)

        return run

    def cross_process_run(kind: StoreKind, plan: _Plan) -> Callable[[], Figures]:
        what = f"trioflow {_case_id('cross-process', plan)} on {kind.name}"

        def run() -> Figures:
            figures = _cross_process_run(
                kind,
                plan,
                consumers=k,
                timeout=timeout,
                warmup=warmup,
                poll_interval=poll_interval,
                what=what,
            )
            return _versus_raw(figures, floors, plan.rate)

        return run

    def asyncpg_run(kind: StoreKind, plan: _Plan) -> Callable[[], Figures]:
        what = f"hand-written asyncpg program (asyncpg@{plan.rate:g}) on {kind.name}"

        def run() -> Figures:
            figures = _asyncpg_run(
                kind, plan, consumers=k, timeout=timeout, warmup=warmup, what=what
            )
            return _versus_raw(figures, floors, plan.rate)

        return run

    # Every raw case is a reference (the one at its rate), so each always runs;
    # the table's ratios divide by the first, whose p99_vs_raw is 1.0 like theirs.
    cases = [
        Case(
            id=f"raw@{rate:g}",
            description=(
                f"one task sends pre-built events at {rate:g} events/s to {k} unbounded trio "
                f"memory channels (await send.send per event and channel); {k} tasks receive them"
            ),
            store=None,
            consumers=k,
            events=plan.events,
            params={**common, "rate": rate, "publish": "inline"},
            reference=True,
            run=raw_run(plan),
        )
        for rate, plan in plans.items()
    ]
    for kind in options.stores:
        for rate, plan in plans.items():
            params = {**common, "rate": rate, "publish": args.publish}
            compared: dict[str, str] = {}
            if kind.family == "postgres":
                # Just before the trioflow cases compared with it, so that all of
                # them see the machine in the same state.
                cases.append(_asyncpg_case(kind, plan, k, common, asyncpg_run(kind, plan)))
                compared = {key: f"asyncpg@{rate:g}" for key in ("asyncpg", "asyncpg_p999")}
            twins = [plan, attrs.evolve(plan, gc_freeze=True)] if args.gc_freeze else [plan]
            for twin in twins:
                freeze = {"gc_freeze": True} if twin.gc_freeze else {}
                cases.append(
                    Case(
                        id=_case_id("in-process", twin),
                        description=(
                            f"trioflow: publish at {rate:g} events/s ({args.publish}) to {k} no-op "
                            "consumers in the same process"
                            + (", gc.freeze() once the flow opened" if twin.gc_freeze else "")
                        ),
                        store=kind.name,
                        consumers=k,
                        events=plan.events,
                        params={**params, **freeze, "process": "same"},
                        run=in_process_run(kind, twin),
                        compared=_versus(compared, "in-process", twin),
                    )
                )
                if kind.family in SHARED_FAMILIES:
                    cases.append(
                        Case(
                            id=_case_id("cross-process", twin),
                            description=(
                                f"trioflow: publish at {rate:g} events/s ({args.publish}); {k} "
                                "no-op consumers in a child process on the same store"
                                + (
                                    ", gc.freeze() in both processes once their flows opened"
                                    if twin.gc_freeze
                                    else ""
                                )
                            ),
                            store=kind.name,
                            consumers=k,
                            events=plan.events,
                            params={
                                **params,
                                **freeze,
                                "process": "child",
                                "poll_interval": poll_interval,
                            },
                            run=cross_process_run(kind, twin),
                            baseline=_case_id("in-process", twin),
                            compared=_versus(compared, "cross-process", twin),
                        )
                    )
    return cases


def _case_id(trioflow_case: str, plan: _Plan, *, gc_freeze: bool | None = None) -> str:
    """``in-process@R``, or its twin ``in-process+gc-freeze@R`` (likewise ``cross-process``)."""
    freeze = plan.gc_freeze if gc_freeze is None else gc_freeze
    return f"{trioflow_case}{'+gc-freeze' if freeze else ''}@{plan.rate:g}"


def _versus(compared: Mapping[str, str], trioflow_case: str, plan: _Plan) -> dict[str, str]:
    """The cases a trioflow case is compared with: a frozen one with its unfrozen twin too."""
    if not plan.gc_freeze:
        return dict(compared)
    unfrozen = _case_id(trioflow_case, plan, gc_freeze=False)
    return {**compared, "unfrozen": unfrozen, "unfrozen_p999": unfrozen}


def _asyncpg_case(
    kind: StoreKind,
    plan: _Plan,
    k: int,
    common: Mapping[str, object],
    run: Callable[[], Figures],
) -> Case:
    """The hand-written program's case at ``plan``'s rate on ``kind``'s server."""
    durability = kind.options.get("cursor_durability", "sync")
    return Case(
        id=f"asyncpg@{plan.rate:g}",
        description=(
            f"hand-written asyncio+asyncpg program in a subprocess: paced at {plan.rate:g} "
            "events/s, one writer group-committing what queued during the previous commit "
            "(advisory lock, INSERT, pg_notify in one statement); one LISTEN connection wakes "
            f"{k} readers, each on its own connection paging by seq, json.loads and a no-op "
            f"handler per event, cursor upsert every 100 (cursor_durability={durability})"
        ),
        store=kind.name,
        consumers=k,
        events=plan.events,
        params={
            **common,
            "rate": plan.rate,
            "program": "benchmarks.asyncpg_latency",
            "publish": "group-commit",
            "process": "child",
            "readers": k,
            "cursor_durability": durability,
        },
        run=run,
    )


WORKLOAD = Workload(
    name="latency",
    summary=(
        "publish-to-handled latency percentiles at fixed rates, consumers in the same "
        "process or in another; compared with raw trio channels at the same rate and, on "
        "PostgreSQL, a hand-written asyncpg program"
    ),
    metrics=(
        Metric(key="p50_ms", label="p50 ms", unit="ms", decimals=3),
        Metric(key="p99_ms", label="p99 ms", unit="ms", decimals=3),
        Metric(key="p999_ms", label="p99.9 ms", unit="ms", decimals=3),
        Metric(key="max_ms", label="max ms", unit="ms", decimals=3),
        Metric(key="achieved_per_s", label="achieved ev/s", unit="events/s"),
    ),
    ratio_metric="p99_vs_raw",
    ratio_label="p99 vs raw",
    baseline_label="vs in-process",
    comparisons=(
        Comparison(key="asyncpg", label="p99 vs asyncpg", metric="p99_ms"),
        Comparison(key="asyncpg_p999", label="p99.9 vs asyncpg", metric="p999_ms"),
        Comparison(key="unfrozen", label="p99 vs unfrozen", metric="p99_ms"),
        Comparison(key="unfrozen_p999", label="p99.9 vs unfrozen", metric="p999_ms"),
    ),
    cases=_cases,
    add_arguments=_add_arguments,
)
