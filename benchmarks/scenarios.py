"""The scenarios workload: property-based benchmarks of trioflow under varied, realistic load.

Hypothesis draws ``--scenarios`` scenarios from ``--seed`` (see
`benchmarks._scenario_plans`): 1 to 16 consumers, each with its slowdown
(none, a constant or jittery awaited sleep per event, or occasional long
pauses), a failure rate (its handler raises the first time it gets some
events), a delivery policy (``Retry`` attempts, ``on_exhausted``
``"retry-forever"``, ``"dead-letter"`` or ``"halt"``, a ``timeout``), poison
events for the consumers that give up (they raise on every attempt), a type
filter, a buffer bound and ``commit_every``; events of tens of bytes to tens of KB, published in
batches of 1 to 1,000 with or without pauses; as many events as fit about a
second on the memory store. Every scenario runs for real, on the real clock.

Cases (``--case`` selects by id; ``raw`` always runs, the ratio needs it):

``raw`` (the reference)
    Every scenario through raw trio memory channels: one task sends each
    publish call's pre-built events, filtered by type, to one unbounded
    channel per consumer; each consumer task calls a handler with the same
    per-event sleeps. No store, no cursors, no failures: what the scenario
    costs without trioflow.
``trioflow`` (once per ``--store``)
    Every scenario through trioflow on a fresh store: ``publish`` or
    ``publish_many`` per call, consumers registered with the scenario's
    ``types``, ``buffer``, ``commit_every`` and policy, handlers that sleep
    and raise as planned, until ``flow.wait_idle()``; a consumer that halts
    has its event healed and is resumed at once.
``batch`` (once per ``--store``)
    As ``trioflow``, with batch consumers (``batch=100``): each handler call
    takes up to 100 events and runs the per-event handler on each, in order;
    at the first that raises it raises ``trioflow.BatchError(index, error)``,
    so the events before are done and the policy applies to that one, as for
    a single event (the same check holds). A ``timeout`` is per call, so per
    batch: the plan's, times 100.

Per scenario: delivered ev/s is the events handled (each consumer counting
the events of its types) over the time from the first publish until all were
handled and committed; latency is, per consumer and event, the time from the
start of the publish call until its handler returned. A case's figures are
the spread of those over its scenarios: min, median, p90 and max of delivered
ev/s and of the p99 latency, with the failures injected and the redeliveries;
every scenario's own figures are in the JSON file, as ``sNN.<figure>``, and its
parameters under the case's ``params``.

Every scenario is checked (`check_log`, `GivenUp`): each consumer handled
every event of its types exactly once in sequence order, one at a time, or
gave up on it as planned; an event was given again only right after its
handler raised on it (a retry in place, or a halted consumer resumed at it);
only if trioflow logged a store error may a restart go back further, to at
most ``commit_every`` events (the durable cursor). Its dead letters are
exactly the events its plan gives up on, each after its ``attempts``; it
halted at exactly those, with its cursor before each; every cursor ends at
the head. Any breach fails the benchmark, naming the scenario and the
command that runs it alone.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import itertools
import logging
import math
import shlex
import statistics
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from time import perf_counter
from typing import TypeVar

import attrs
import trio

import trioflow
from trioflow.stores import Store

from ._harness import BenchmarkFailed, Case, Options, Workload, positive_int
from ._report import Metric
from ._scenario_plans import (
    BACKOFF_INITIAL_S,
    BACKOFF_MAXIMUM_S,
    BUDGET_S,
    HALT_WATCH_S,
    MAX_CONSUMERS,
    MAX_EVENTS,
    ConsumerPlan,
    Prepared,
    Scenario,
    generate,
    limit,
    prepare,
)
from ._stores import StoreKind

#: One run's figures, by metric key.
Figures = Mapping[str, float]
T = TypeVar("T")

#: How a consumer is restarted after a store error (see `benchmarks._scenario_plans`).
#: The batch case's consumers' ``batch``.
SCENARIO_BATCH = 100
RESTART = trioflow.RestartPolicy(initial=BACKOFF_INITIAL_S, maximum=BACKOFF_MAXIMUM_S)
#: The defaults of ``--scenarios`` and ``--seed``.
DEFAULT_SCENARIOS = 20
DEFAULT_SEED = 1


class InjectedFailure(Exception):
    """What a handler raises on an event its scenario planned a failure for."""


class Recorder:
    """One consumer's handler: sleeps and raises as planned, and logs what it handled.

    ``entries`` holds one int per finished call, in order: the event's seq
    if the handler returned, minus the seq if it raised. ``done_at`` holds the
    `perf_counter` time of each return.
    """

    __slots__ = (
        "busy",
        "done_at",
        "entries",
        "failing",
        "overlaps",
        "planned",
        "poison",
        "raised_on",
        "sleeps",
    )

    def __init__(
        self,
        sleeps: Sequence[float],
        failing: frozenset[int],
        poison: frozenset[int] = frozenset(),
        attempts: int = 1,
    ) -> None:
        self.sleeps = sleeps
        #: Event indexes whose first handling still has to raise.
        self.failing = set(failing)
        #: Event indexes that raise on every attempt until healed.
        self.poison = set(poison)
        #: Raises planned: poison events raise on every attempt its consumer makes.
        self.planned = len(failing) + attempts * len(poison)
        self.raised_on: int | None = None
        self.entries: list[int] = []
        self.done_at: list[float] = []
        self.busy = False
        #: Calls that started while another was still running.
        self.overlaps = 0

    async def handle(self, event: trioflow.Event) -> None:
        """Sleep as planned for ``event``, then raise (first time, if planned) or log it."""
        if self.busy:
            self.overlaps += 1
        self.busy = True
        try:
            index: int = event.data["i"]
            delay = self.sleeps[index]
            if delay:
                await trio.sleep(delay)
            if index in self.failing or index in self.poison:
                self.failing.discard(index)
                self.raised_on = index
                self.entries.append(-event.seq)
                raise InjectedFailure(f"planned failure on seq {event.seq}")
            self.entries.append(event.seq)
            self.done_at.append(perf_counter())
        finally:
            self.busy = False

    def heal(self) -> None:
        """The event it last raised on succeeds from now on (before a halted consumer resumes)."""
        if self.raised_on is not None:
            self.poison.discard(self.raised_on)


# --- the check ----------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class LogCheck:
    """What `check_log` found in one consumer's log.

    Attributes:
        handled: Events it handled successfully (redeliveries included).
        failures: Calls that raised.
        redeliveries: Calls on an event it had been given before.
        rewound: Events it had handled successfully and was given again
            after a restart (a restart from a cursor behind the failed event).
        problem: What broke the delivery guarantees, or None.
        dead_lettered: Events it went past after they failed: its dead letters.
    """

    handled: int
    failures: int
    redeliveries: int
    rewound: int
    problem: str | None
    dead_lettered: int = 0


def check_log(
    entries: Sequence[int],
    expected: Sequence[int],
    *,
    max_rewind: int,
    lettered: frozenset[int] = frozenset(),
) -> LogCheck:
    """Check a consumer's log (see `Recorder`) against the seqs it should handle, in order.

    The log must be the expected seqs in order, handled one after the other,
    except that after a call that raised, the next call is on the failed
    event again (a retry in place, or a halted consumer resumed), on the
    event after it if it is one of its dead letters (``lettered``), or, after
    a store error, at most ``max_rewind`` of its events before it (a restart
    from its cursor). It must end having handled the last expected event, or
    given up on it.
    """
    index_of = {seq: index for index, seq in enumerate(expected)}
    position = 0  # events of `expected` handled, in the current incarnation's view
    given = 0  # events of `expected` given to the handler at least once
    restarting = False
    failures = redeliveries = rewound = handled = dead_lettered = 0

    def result(problem: str | None) -> LogCheck:
        return LogCheck(
            handled=handled,
            failures=failures,
            redeliveries=redeliveries,
            rewound=rewound,
            problem=problem,
            dead_lettered=dead_lettered,
        )

    def next_seq() -> str:
        return f"seq {expected[position]}" if position < len(expected) else "nothing more"

    for call, entry in enumerate(entries, start=1):
        seq = abs(entry)
        index = index_of.get(seq)
        if index is None:
            return result(f"call {call} was given seq {seq}, not one of its events")
        if restarting and index == position + 1 and expected[position] in lettered:
            # It gave up on the failed event, a dead letter, and went on.
            restarting = False
            position += 1
            dead_lettered += 1
        elif restarting:
            failed = expected[position]
            if index > position:
                return result(
                    f"after failing on seq {failed} it resumed at seq {seq} (call {call}), "
                    f"skipping {index - position} of its events"
                )
            if position - index > max_rewind:
                return result(
                    f"after failing on seq {failed} it resumed at seq {seq} (call {call}), "
                    f"{position - index} of its handled events back; its cursor allows "
                    f"{max_rewind}"
                )
            rewound += position - index
            position = index
            restarting = False
        elif index != position:
            return result(
                f"call {call} was given seq {seq} where {next_seq()} was due"
                + ("" if index > position else ", without a failure before it")
            )
        if index < given:
            redeliveries += 1
        given = max(given, index + 1)
        if entry > 0:
            handled += 1
            position += 1
        else:
            failures += 1
            restarting = True
    if restarting and expected[position] in lettered:
        position += 1  # it gave up on its last event, a dead letter
        dead_lettered += 1
    if position < len(expected):
        return result(
            f"handled {position:,} of its {len(expected):,} events; {next_seq()} "
            f"and {len(expected) - position - 1:,} more never came"
        )
    return result(None)


@attrs.frozen(kw_only=True)
class GivenUp:
    """The events a consumer's plan gives up on, and what it gave up on in a run.

    Attributes:
        planned: The seqs its plan gives up on (`Prepared.given_up`), in order.
        letters: Its dead letters after the run: seq -> attempts.
        halts: (seq, cursor) each time it halted, as `statistics` showed it.
    """

    planned: Sequence[int] = ()
    letters: Mapping[int, int] = attrs.Factory(dict)
    halts: Sequence[tuple[int, int]] = ()

    def problems(self, plan: ConsumerPlan) -> list[str]:
        """How the run broke ``plan``'s policy: letters or halts not as planned."""
        found = []
        letters, halts = sorted(self.letters), [seq for seq, _ in self.halts]
        for kind, seqs in (("dead-letter", letters), ("halt", halts)):
            wanted = list(self.planned) if plan.on_exhausted == kind else []
            if seqs != wanted:
                found.append(f"{kind} at seqs {seqs[:10]}, planned {wanted[:10]}")
        found.extend(
            f"dead letter {seq} after {attempts} attempts, not {plan.attempts}"
            for seq, attempts in self.letters.items()
            if attempts != plan.attempts
        )
        found.extend(
            f"halted at seq {seq} with its cursor at {cursor}, not before it"
            for seq, cursor in self.halts
            if cursor >= seq
        )
        return found


def check_consumers(
    scenario: Scenario,
    expected: Sequence[Sequence[int]],
    recorders: Sequence[Recorder],
    *,
    max_rewinds: Sequence[int],
    what: str,
    reproduce: str,
    given_up: Sequence[GivenUp] | None = None,
) -> list[LogCheck]:
    """Check every consumer's log (`check_log`); no overlapping calls; failures as planned;
    dead letters and halts as planned (``given_up``: none if None), each halt with
    the cursor before the event.

    Raises:
        BenchmarkFailed: A consumer's log breaks the guarantees; the message
            names the scenario in full and the command running it alone.
    """
    checks = []
    problems: list[str] = []
    outcomes = given_up or [GivenUp()] * len(scenario.consumers)
    for number, (plan, seqs, recorder, max_rewind, outcome) in enumerate(
        zip(scenario.consumers, expected, recorders, max_rewinds, outcomes, strict=True), start=1
    ):
        lettered = frozenset(outcome.letters)
        check = check_log(recorder.entries, seqs, max_rewind=max_rewind, lettered=lettered)
        checks.append(check)
        found = [] if check.problem is None else [check.problem]
        if recorder.overlaps:
            found.append(f"{recorder.overlaps} calls started before the previous one returned")
        if check.problem is None and check.failures != recorder.planned:
            found.append(f"its handler raised {check.failures} times, {recorder.planned} planned")
        found.extend(outcome.problems(plan))
        problems.extend(
            f"  consumer {consumer_name(number)} ({plan.describe()}): {problem}"
            for problem in found
        )
    if problems:
        raise BenchmarkFailed(
            f"{what}: scenario {scenario.number} broke the delivery guarantees:\n"
            + "\n".join(problems)
            + f"\n  scenario: {scenario!r}\n  run it alone: {reproduce}"
        )
    return checks


def consumer_name(number: int) -> str:
    """The name of a scenario's consumer ``number`` (from 1): ``c01``."""
    return f"c{number:02d}"


# --- one scenario -------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ScenarioFigures:
    """What one scenario measured (recorded as ``sNN.<attribute>``).

    Attributes:
        delivered_per_s: Events handled (per consumer, of its types) per second,
            from the first publish until all were handled and committed.
        publish_per_s: Events published per second, until the last publish returned.
        elapsed_s: Seconds from the first publish until all were handled.
        p50_ms: Median latency, publish call to handler return, in ms.
        p99_ms: 99th percentile of that latency, in ms.
        deliveries: Events handled, counting each consumer's once.
        failures: Handler calls that raised (as planned).
        redeliveries: Handler calls on an event given to it before.
        rewound: Events handled again that had been handled successfully.
        store_errors: Warnings and errors trioflow logged besides planned failures.
        dead_letters: Events given up on as dead letters (as planned).
        halts: Times a consumer halted at an event (as planned).
    """

    delivered_per_s: float
    publish_per_s: float
    elapsed_s: float
    p50_ms: float
    p99_ms: float
    deliveries: int
    failures: int
    redeliveries: int
    rewound: int
    store_errors: int
    dead_letters: int = 0
    halts: int = 0

    def keyed(self, number: int) -> dict[str, float]:
        """These figures under ``s<number>.`` keys."""
        return {f"s{number:02d}.{key}": float(value) for key, value in attrs.asdict(self).items()}


@attrs.frozen(kw_only=True, eq=False)
class _Timed:
    """What one run of a scenario observed, before checking."""

    seqs: Sequence[int]
    sent_at: Sequence[float]
    started: float
    published: float
    delivered: float


@attrs.frozen(kw_only=True)
class _Settings:
    """The command-line settings a run needs to say how to reproduce a scenario."""

    seed: int
    count: int
    max_events: int
    max_consumers: int
    timeout: float

    def reproduce(self, store: str | None, number: int, case: str = "trioflow") -> str:
        """The command running scenario ``number`` alone on ``store`` (its ``case``)."""
        command = ["python", "-m", "benchmarks", "run", "scenarios"]
        command += ["--store", store or "memory", "--case", "raw" if store is None else case]
        command += ["--seed", str(self.seed), "--scenarios", str(self.count)]
        if self.max_events != MAX_EVENTS:
            command += ["--events", str(self.max_events)]
        if self.max_consumers != MAX_CONSUMERS:
            command += ["--consumers", str(self.max_consumers)]
        return shlex.join([*command, "--only", str(number)])


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``values``, interpolated; 0.0 if there are none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _latencies_ms(prepared: Prepared, recorders: Sequence[Recorder], timed: _Timed) -> list[float]:
    sent_at = [0.0] * len(timed.seqs)
    for batch, at in zip(prepared.batches, timed.sent_at, strict=True):
        for index in batch:
            sent_at[index] = at
    sent_by_seq = dict(zip(timed.seqs, sent_at, strict=True))
    return [
        (done - sent_by_seq[seq]) * 1000.0
        for recorder in recorders
        for seq, done in zip((e for e in recorder.entries if e > 0), recorder.done_at, strict=True)
    ]


def _evaluate(
    scenario: Scenario,
    prepared: Prepared,
    recorders: Sequence[Recorder],
    timed: _Timed,
    *,
    max_rewinds: Sequence[int],
    store_errors: int,
    what: str,
    reproduce: str,
    given_up: Sequence[GivenUp] | None = None,
) -> ScenarioFigures:
    """Check the run (raising `BenchmarkFailed`) and compute its figures.

    ``given_up``: each consumer's dead letters and halts (None: it has no
    policy to check, as in the raw reference).
    """
    seqs = timed.seqs
    if len(seqs) != scenario.events or any(b <= a for a, b in itertools.pairwise(seqs)):
        raise BenchmarkFailed(
            f"{what}: scenario {scenario.number}: publishing {scenario.events:,} events "
            f"returned {len(seqs):,} seqs, not strictly increasing: {list(seqs)[:20]}...\n"
            f"  scenario: {scenario!r}\n  run it alone: {reproduce}"
        )
    expected = [[seqs[index] for index in prepared.expected(plan)] for plan in scenario.consumers]
    if given_up is not None:
        given_up = [
            attrs.evolve(
                outcome, planned=[seqs[index] for index in prepared.given_up(number, plan)]
            )
            for number, (plan, outcome) in enumerate(zip(scenario.consumers, given_up, strict=True))
        ]
    checks = check_consumers(
        scenario,
        expected,
        recorders,
        max_rewinds=max_rewinds,
        what=what,
        reproduce=reproduce,
        given_up=given_up,
    )
    deliveries = sum(map(len, expected))
    elapsed = timed.delivered - timed.started
    latencies = _latencies_ms(prepared, recorders, timed)
    return ScenarioFigures(
        delivered_per_s=deliveries / elapsed if elapsed > 0 else 0.0,
        publish_per_s=len(seqs) / max(timed.published - timed.started, 1e-9),
        elapsed_s=elapsed,
        p50_ms=percentile(latencies, 0.5),
        p99_ms=percentile(latencies, 0.99),
        deliveries=deliveries,
        failures=sum(check.failures for check in checks),
        redeliveries=sum(check.redeliveries for check in checks),
        rewound=sum(check.rewound for check in checks),
        store_errors=store_errors,
        dead_letters=sum(check.dead_lettered for check in checks),
        halts=sum(len(outcome.halts) for outcome in given_up or ()),
    )


def _run_for(seconds: float, run: Callable[[], Awaitable[T]]) -> T | None:
    """``trio.run(run)``, or None if it took longer than ``seconds``.

    Without a deadline, a flow that lost an event would wait for it forever.
    """

    async def main() -> T | None:
        with trio.move_on_after(max(seconds, 0.0)):
            return await run()
        return None

    return trio.run(main)


def _timed_out(
    scenario: Scenario,
    recorders: Sequence[Recorder],
    seconds: float,
    what: str,
    reproduce: str,
) -> BenchmarkFailed:
    progress = ", ".join(
        f"{consumer_name(number)} {sum(1 for e in recorder.entries if e > 0):,}"
        for number, recorder in enumerate(recorders, start=1)
    )
    return BenchmarkFailed(
        f"{what}: scenario {scenario.number} did not finish within {seconds:.1f}s "
        f"(events handled so far: {progress})\n"
        f"  scenario: {scenario!r}\n  run it alone: {reproduce}"
    )


# --- trioflow -------------------------------------------------------------------------------


async def _resume_halted(
    flow: trioflow.Flow, recorders: Sequence[Recorder], halts: Sequence[list[tuple[int, int]]]
) -> None:
    """Note each halt's (seq, cursor), heal its event and resume the consumer; until cancelled."""
    names = [consumer_name(number) for number in range(1, len(recorders) + 1)]
    while True:
        await trio.sleep(HALT_WATCH_S)
        for name, recorder, noted in zip(names, recorders, halts, strict=True):
            stats = flow.statistics().consumers[name]
            if stats.halted and stats.stall is not None:
                noted.append((stats.stall.seq, stats.cursor))
                recorder.heal()
                # Its task runs again (and is no longer halted) in trio's
                # next batch of tasks, long before this looks again.
                await flow.resume(name)


def _batch_handler(
    recorder: Recorder,
) -> Callable[[Sequence[trioflow.Event]], Awaitable[None]]:
    """A batch consumer's handler: ``recorder``'s on each event, saying how far it got."""

    async def handle(events: Sequence[trioflow.Event]) -> None:
        for index, event in enumerate(events):
            try:
                await recorder.handle(event)
            except InjectedFailure as exc:
                raise trioflow.BatchError(index, exc) from exc

    return handle


async def _flow_run(
    store: Store,
    scenario: Scenario,
    prepared: Prepared,
    recorders: Sequence[Recorder],
    batch: int | None = None,
) -> tuple[_Timed, trioflow.FlowStatistics, list[GivenUp]]:
    # Stopping is not measured; a short grace keeps a run quick should
    # stopping wait out its grace period.
    app = trioflow.App(store, shutdown_grace=1.0, restart=RESTART)
    for number, (plan, recorder) in enumerate(
        zip(scenario.consumers, recorders, strict=True), start=1
    ):
        retry = trioflow.Retry(
            attempts=plan.attempts, initial=BACKOFF_INITIAL_S, maximum=BACKOFF_MAXIMUM_S
        )
        options: trioflow.ConsumerOptions = {
            "types": plan.types,
            "buffer": plan.buffer,
            "retry": retry,
            "on_exhausted": plan.on_exhausted,
        }
        name = consumer_name(number)
        if batch is None:
            options["commit_every"] = plan.commit_every
            options["timeout"] = plan.timeout
            app.consumer(name, **options)(recorder.handle)
        else:
            # commit_every counts batches: 1 (the default) is the closest to
            # a bound of commit_every events; the timeout is per call.
            if plan.timeout is not None:
                options["timeout"] = plan.timeout * batch
            app.consumer(name, batch=batch, **options)(_batch_handler(recorder))
    calls = [
        [(prepared.types[index], prepared.data[index]) for index in batch]
        for batch in prepared.batches
    ]
    interval = scenario.publish_interval_s
    seqs: list[int] = []
    sent_at: list[float] = []
    halts: list[list[tuple[int, int]]] = [[] for _ in recorders]
    async with trioflow.open_flow(app) as flow:
        async with trio.open_nursery() as nursery:
            if any(plan.on_exhausted == "halt" for plan in scenario.consumers):
                nursery.start_soon(_resume_halted, flow, recorders, halts)
            started = perf_counter()
            for number, call in enumerate(calls, start=1):
                sent_at.append(perf_counter())
                if len(call) == 1:
                    seqs.append(await flow.publish(*call[0]))
                else:
                    seqs.extend(await flow.publish_many(call))
                if interval and number < len(calls):
                    await trio.sleep(interval)
            published = perf_counter()
            await flow.wait_idle()
            delivered = perf_counter()
            nursery.cancel_scope.cancel()
        flow_statistics = flow.statistics()
        letters = await flow.dead_letters()
    timed = _Timed(
        seqs=seqs, sent_at=sent_at, started=started, published=published, delivered=delivered
    )
    given_up = [
        GivenUp(
            letters={letter.seq: letter.attempts for letter in letters if letter.consumer == name},
            halts=noted,
        )
        for name, noted in zip(flow_statistics.consumers, halts, strict=True)
    ]
    return timed, flow_statistics, given_up


class _LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _trioflow_log() -> Iterator[list[logging.LogRecord]]:
    """Collect what trioflow logs (a traceback per planned failure) instead of printing it."""
    logger = logging.getLogger("trioflow")
    capture = _LogCapture()
    propagate = logger.propagate
    logger.addHandler(capture)
    logger.propagate = False
    try:
        yield capture.records
    finally:
        logger.removeHandler(capture)
        logger.propagate = propagate


def _unplanned(records: Sequence[logging.LogRecord]) -> list[logging.LogRecord]:
    """The records not about a planned failure: store errors and the like."""
    return [
        record
        for record in records
        if not (record.exc_info and isinstance(record.exc_info[1], InjectedFailure))
        # Attempts after the first, and giving up, are one line each.
        and f"{InjectedFailure.__name__}: planned failure" not in record.getMessage()
    ]


def _flow_scenario(
    kind: StoreKind,
    scenario: Scenario,
    prepared: Prepared,
    seconds: float,
    settings: _Settings,
    *,
    batch: int | None = None,
) -> ScenarioFigures:
    what = f"trioflow on {kind.name}" if batch is None else f"batch consumers on {kind.name}"
    reproduce = settings.reproduce(
        kind.name, scenario.number, "trioflow" if batch is None else "batch"
    )
    recorders = [
        Recorder(sleeps, failing, poison, plan.attempts)
        for sleeps, failing, poison, plan in zip(
            prepared.sleeps, prepared.failing, prepared.poison, scenario.consumers, strict=True
        )
    ]
    with kind.fresh() as store, _trioflow_log() as records:
        outcome = _run_for(
            seconds, functools.partial(_flow_run, store, scenario, prepared, recorders, batch)
        )
    if outcome is None:
        raise _timed_out(scenario, recorders, seconds, what, reproduce)
    timed, flow_statistics, given_up = outcome
    unplanned = _unplanned(records)
    # The documented redelivery after a handler failure is the failed event
    # alone, in place (a halted consumer resumes at it: its position is
    # committed before it halts). Only after a store error (trioflow logs it)
    # may a consumer restart from an older cursor, at most commit_every events back.
    max_rewinds = [plan.commit_every if unplanned else 0 for plan in scenario.consumers]
    figures = _evaluate(
        scenario,
        prepared,
        recorders,
        timed,
        max_rewinds=max_rewinds,
        store_errors=len(unplanned),
        what=what,
        reproduce=reproduce,
        given_up=given_up,
    )
    head = timed.seqs[-1]
    cursors = {name: c.cursor for name, c in flow_statistics.consumers.items()}
    if flow_statistics.published != scenario.events or any(c != head for c in cursors.values()):
        raise BenchmarkFailed(
            f"{what}: scenario {scenario.number}: published {flow_statistics.published:,} of "
            f"{scenario.events:,} events; committed cursors {cursors}, expected {head:,} each\n"
            f"  scenario: {scenario!r}\n  run it alone: {reproduce}"
        )
    return figures


# --- the raw-channel reference ------------------------------------------------------------


def _raw_events(prepared: Prepared) -> list[trioflow.Event]:
    """The events as trioflow would deliver them: seqs 1..N."""
    now = datetime.datetime.now(datetime.UTC)
    return [
        trioflow.Event(
            seq=index + 1,
            id=uuid.UUID(int=index + 1),
            type=event_type,
            data=data,
            key=None,
            created_at=now,
        )
        for index, (event_type, data) in enumerate(zip(prepared.types, prepared.data, strict=True))
    ]


async def _raw_consume(
    receive: trio.MemoryReceiveChannel[Sequence[trioflow.Event]],
    recorder: Recorder,
    finished: list[float],
) -> None:
    handle = recorder.handle
    async with receive:
        async for batch in receive:
            for event in batch:
                await handle(event)
    finished.append(perf_counter())


async def _raw_run(scenario: Scenario, prepared: Prepared, recorders: Sequence[Recorder]) -> _Timed:
    events = _raw_events(prepared)
    calls = [events[batch.start : batch.stop] for batch in prepared.batches]
    filters = [plan.types for plan in scenario.consumers]
    interval = scenario.publish_interval_s
    finished: list[float] = []
    sent_at: list[float] = []
    sends: list[trio.MemorySendChannel[Sequence[trioflow.Event]]] = []
    async with trio.open_nursery() as nursery:
        for recorder in recorders:
            send, receive = trio.open_memory_channel[Sequence[trioflow.Event]](math.inf)
            sends.append(send)
            nursery.start_soon(_raw_consume, receive, recorder, finished)
        started = perf_counter()
        for number, call in enumerate(calls, start=1):
            sent_at.append(perf_counter())
            for types, send in zip(filters, sends, strict=True):
                mine = call if types is None else [event for event in call if event.type in types]
                if mine:
                    await send.send(mine)
            if interval and number < len(calls):
                await trio.sleep(interval)
        published = perf_counter()
        for send in sends:
            send.close()
    return _Timed(
        seqs=[event.seq for event in events],
        sent_at=sent_at,
        started=started,
        published=published,
        delivered=max(finished, default=published),
    )


def _raw_scenario(
    scenario: Scenario, prepared: Prepared, seconds: float, settings: _Settings
) -> ScenarioFigures:
    what = "raw channels"
    reproduce = settings.reproduce(None, scenario.number)
    recorders = [Recorder(sleeps, frozenset()) for sleeps in prepared.sleeps]
    timed = _run_for(seconds, functools.partial(_raw_run, scenario, prepared, recorders))
    if timed is None:
        raise _timed_out(scenario, recorders, seconds, what, reproduce)
    return _evaluate(
        scenario,
        prepared,
        recorders,
        timed,
        max_rewinds=[0] * len(scenario.consumers),
        store_errors=0,
        what=what,
        reproduce=reproduce,
    )


# --- all scenarios, one case run ----------------------------------------------------------


#: Runs one scenario: (scenario, its inputs, seconds left, settings) -> its figures.
ScenarioRunner = Callable[[Scenario, Prepared, float, _Settings], ScenarioFigures]


def spread(per_scenario: Sequence[ScenarioFigures]) -> dict[str, float]:
    """The figures of a case: the spread of delivered ev/s and p99 latency, and totals."""
    figures: dict[str, float] = {"scenarios": float(len(per_scenario))}
    for name in ("delivered_per_s", "p99_ms"):
        values = [getattr(one, name) for one in per_scenario]
        figures[f"{name}_min"] = min(values, default=0.0)
        figures[f"{name}_median"] = float(statistics.median(values)) if values else 0.0
        figures[f"{name}_p90"] = percentile(values, 0.9)
        figures[f"{name}_max"] = max(values, default=0.0)
    totals = ("deliveries", "failures", "redeliveries", "rewound", "store_errors", "dead_letters")
    for name in (*totals, "halts"):
        figures[name] = float(sum(getattr(one, name) for one in per_scenario))
    return figures


def run_scenarios(
    scenarios: Sequence[Scenario],
    runner: ScenarioRunner,
    settings: _Settings,
    *,
    label: str,
    progress: Callable[[str], None],
) -> dict[str, float]:
    """Run every scenario with ``runner``, one progress line each; the case's figures.

    The whole run shares ``settings.timeout``.

    Raises:
        BenchmarkFailed: A scenario broke the delivery guarantees or timed out.
    """
    deadline = perf_counter() + settings.timeout
    measured: list[ScenarioFigures] = []
    figures: dict[str, float] = {}
    for done, scenario in enumerate(scenarios, start=1):
        prepared = prepare(scenario)
        # The previous scenario's garbage is not this one's cost.
        gc.collect()
        one = runner(scenario, prepared, deadline - perf_counter(), settings)
        measured.append(one)
        figures.update(one.keyed(scenario.number))
        progress(
            f"  {label} scenario {scenario.number} ({done}/{len(scenarios)}), "
            f"{scenario.describe()}: {one.delivered_per_s:,.0f} ev/s, "
            f"p50 {one.p50_ms:,.1f} ms, p99 {one.p99_ms:,.1f} ms, {one.failures} failures, "
            f"{one.redeliveries} redelivered, {one.dead_letters} dead letters, {one.halts} halts"
        )
    return {**spread(measured), **figures}


# --- the cases ----------------------------------------------------------------------------


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scenarios",
        type=positive_int,
        default=DEFAULT_SCENARIOS,
        metavar="M",
        help="scenarios to generate and run (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        metavar="S",
        help="Hypothesis seed: the same seed and M give the same scenarios (default: %(default)s)",
    )
    parser.add_argument(
        "--only",
        type=positive_int,
        action="append",
        metavar="I",
        help="run only scenario I of the M generated (repeatable): to reproduce one",
    )


def _cases(options: Options, args: argparse.Namespace) -> list[Case]:
    count: int = args.scenarios
    only: list[int] | None = args.only
    settings = _Settings(
        seed=args.seed,
        count=count,
        max_events=options.events,
        max_consumers=options.consumers,
        timeout=options.timeout,
    )
    if only is not None and max(only) > count:
        raise ValueError(f"--only {max(only)}: there are only {count} scenarios (--scenarios)")
    try:
        generated = generate(settings.seed, count)
    except ImportError as exc:
        raise ValueError(
            f"the scenarios workload needs Hypothesis (trioflow's test extras): {exc}"
        ) from None
    scenarios = [
        limit(scenario, max_events=options.events, max_consumers=options.consumers)
        for scenario in generated
        if only is None or scenario.number in only
    ]
    consumers = max(len(scenario.consumers) for scenario in scenarios)
    events = sum(scenario.events for scenario in scenarios)
    params: dict[str, object] = {
        "seed": settings.seed,
        "scenarios": count,
        "only": only,
        "budget_s": BUDGET_S,
        "restart": attrs.asdict(RESTART),
        "scenario_params": [scenario.to_json() for scenario in scenarios],
    }

    def raw() -> Figures:
        return run_scenarios(
            scenarios, _raw_scenario, settings, label="raw", progress=options.progress
        )

    cases = [
        Case(
            id="raw",
            description=(
                "every scenario through raw trio memory channels: the same batches, type "
                "filters and handler sleeps; no store, no cursors, no failures"
            ),
            store=None,
            consumers=consumers,
            events=events,
            params=params,
            reference=True,
            run=raw,
        )
    ]
    for kind in options.stores:

        def run(kind: StoreKind = kind, batch: int | None = None) -> Figures:
            runner = functools.partial(_flow_scenario, kind, batch=batch)
            label = "trioflow" if batch is None else "batch"
            return run_scenarios(
                scenarios,
                runner,
                settings,
                label=f"{label} on {kind.name}",
                progress=options.progress,
            )

        cases.append(
            Case(
                id="trioflow",
                description=(
                    "every scenario through trioflow on a fresh store: publish/publish_many "
                    "per batch, consumers with the scenario's types, buffer and commit_every, "
                    "handlers sleeping and raising as planned, until wait_idle"
                ),
                store=kind.name,
                consumers=consumers,
                events=events,
                params=params,
                run=run,
            )
        )
        cases.append(
            Case(
                id="batch",
                description=(
                    f"as trioflow, with batch consumers (batch={SCENARIO_BATCH}) whose handler "
                    "runs the per-event one on each event and raises BatchError(index, error) "
                    "at the first that fails; timeout per batch (the plan's, times the batch)"
                ),
                store=kind.name,
                consumers=consumers,
                events=events,
                params={**params, "consumer_batch": SCENARIO_BATCH},
                run=functools.partial(run, kind, SCENARIO_BATCH),
            )
        )
    return cases


WORKLOAD = Workload(
    name="scenarios",
    summary=(
        "Hypothesis-generated scenarios (slow and failing consumers, filters, bounds, sizes), "
        "checked for order and no loss; the spread of throughput and p99 latency"
    ),
    metrics=(
        Metric(key="delivered_per_s_min", label="ev/s min", unit="events/s"),
        Metric(key="delivered_per_s_median", label="ev/s median", unit="events/s"),
        Metric(key="delivered_per_s_p90", label="ev/s p90", unit="events/s"),
        Metric(key="delivered_per_s_max", label="ev/s max", unit="events/s"),
        Metric(key="p99_ms_min", label="p99 ms min", unit="ms", decimals=1),
        Metric(key="p99_ms_median", label="p99 ms median", unit="ms", decimals=1),
        Metric(key="p99_ms_p90", label="p99 ms p90", unit="ms", decimals=1),
        Metric(key="p99_ms_max", label="p99 ms max", unit="ms", decimals=1),
        Metric(key="scenarios", label="scenarios", unit="scenarios"),
        Metric(key="failures", label="failures", unit="handler calls"),
        Metric(key="redeliveries", label="redelivered", unit="handler calls"),
    ),
    ratio_metric="delivered_per_s_median",
    ratio_label="median vs raw",
    cases=_cases,
    # Here --events and --consumers cap every scenario's own (drawn) counts,
    # and one run is already M scenarios: the spread, not repeats, is the figure.
    defaults={"events": MAX_EVENTS, "consumers": MAX_CONSUMERS, "repeat": 1},
    option_help={
        "events": "at most N events per scenario",
        "consumers": "at most the first K consumers of each scenario",
        "repeat": "runs of each case: one run is already M scenarios",
    },
    add_arguments=_add_arguments,
)
