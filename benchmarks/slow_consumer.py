"""The slow-consumer workload: do fast consumers keep their pace, and at what memory cost?

K consumers (``--consumers``, at least 2) get the same N events; K-1 of them
are fast and one is ``--slowdown`` times slower. A publisher publishes all N
events as fast as it can, in ``--batch-size`` batches, so the slow consumer
falls behind at once and stays behind: whatever it has not handled is held
in memory (unbounded mode) or left in the store (bounded mode).

The handlers, the same in every case:

- a fast consumer spends ``--handler-us`` microseconds of CPU per event (a
  busy loop, with no checkpoint: work a handler does in Python), then notes
  the event as the fan-out workload's ``Tally`` does;
- the slow consumer *waits* ``--slowdown`` times as long per event
  (``await trio.sleep``), then notes the event: it stands for a consumer
  held up by a slow service, not by computing. A consumer that burned that
  CPU would slow every task of its trio thread alike, trioflow or not, and
  the run would measure the CPU, not the fan-out. Nor do the fast consumers
  sleep: a ``trio.sleep`` of a few microseconds lasts as long as the
  scheduler's next turn (up to the millisecond the kernel's poll is rounded
  to), so a sleeping fast consumer would measure the timer.

Cases (``--case`` selects by id; ``raw`` always runs, the ratios need it):

``raw`` (the reference)
    Plain trio memory channels, unbounded: one task builds an event object
    for each of the N items as it sends them, ``--batch-size`` to a list,
    and sends each list to K unbounded channels; K tasks receive the lists
    and call the same handlers.
``unbounded``
    trioflow, every consumer with the default ``buffer=None``: the slow
    consumer's channel holds every event it has not handled yet.
``bounded``
    trioflow, every consumer with ``buffer=--buffer``: a consumer holding
    that many events is detached and catches up from the store, one page
    (1,000 events) at a time.

Each run is a fresh Python process (`benchmarks._rss_child`), so that the
process's peak resident set size is that run's own; it builds the N items'
data (the fan-out workload's 200-byte JSON objects), opens the store and the
flow (or the channels), and only then starts the clock.

Figures: fast ev/s is (K-1)*N over the time from the first publish (send)
until every fast consumer had handled all N events and, for trioflow, had
its committed cursor at N; the slow consumer need not finish, and the run
stops there (slow handled is how far it got). Peak MiB is the process's
peak resident set size; growth MiB is that peak minus the resident set size
after set-up, just before the first publish: what holding the published
events cost. Every run then checks that each fast consumer handled exactly
seqs 1..N in order, that the slow one handled exactly 1..m in order with no
gap (m being how many it handled), and, for trioflow, that N events were
published, every fast consumer's cursor is N and the slow one's is not past
m; otherwise the benchmark fails.

The JSON file adds, per run: ``fast_s`` and ``publish_s`` (the seconds behind
fast ev/s, and until the last publish returned), ``handled_s`` (until the
fast handlers were done) and ``commit_lag_s`` (from then until their cursors
were committed: an idle consumer requests its last commit within the App's
``commit_interval``, at once when N is a multiple of ``commit_every // 2``,
as with the defaults), ``setup_rss_mib``,
``ru_maxrss_mib`` (see `benchmarks._rss_child` for why it is not the peak
shown), ``gc_s`` (the collector's seconds in the child) and, for trioflow,
``slow_buffered`` (events waiting in the slow consumer's channel when the
fast ones were done) and ``stop_s`` (leaving ``open_flow``).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from time import perf_counter
from typing import Any

import attrs
import trio

import trioflow
from trioflow.stores import Store

from ._data import EVENT_TYPE, Data, make_data
from ._gc import GCTimer
from ._harness import (
    BenchmarkFailed,
    Case,
    Options,
    Workload,
    positive_float,
    positive_int,
)
from ._report import Metric
from ._rss_child import current_rss_mib, measure_in_child
from ._stores import STORES
from .fanout import Figures, Tally, _chunks, _receive_batches, _run_within, check_tallies

#: Seconds between looks at the fast consumers' committed cursors, once
#: their handlers have seen every event (only the last commit is waited for).
_COMMIT_POLL = 0.001


class BusyTally(Tally):
    """A fast consumer's handler: ``seconds`` of CPU work per event, then the tally.

    Calls ``on_done`` once it has handled ``target`` events.
    """

    __slots__ = ("on_done", "seconds", "target")

    def __init__(self, *, seconds: float, target: int) -> None:
        super().__init__()
        self.seconds = seconds
        self.target = target
        self.on_done: Callable[[], None] = _nothing

    async def handle(self, event: trioflow.Event) -> None:
        """Spin for `seconds`, then count ``event`` and check its order."""
        until = perf_counter() + self.seconds
        while perf_counter() < until:
            pass
        await super().handle(event)
        if self.count == self.target:
            self.on_done()


class SleepyTally(Tally):
    """The slow consumer's handler: waits ``seconds`` per event, then the tally."""

    __slots__ = ("seconds",)

    def __init__(self, *, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    async def handle(self, event: trioflow.Event) -> None:
        """Sleep for `seconds`, then count ``event`` and check its order."""
        await trio.sleep(self.seconds)
        await super().handle(event)


def _nothing() -> None:
    """The default ``on_done``."""


def check_prefix(tally: Tally, *, what: str) -> None:
    """Raise `BenchmarkFailed` unless ``tally`` saw exactly seqs 1..m in order (m: its count)."""
    # A tally counts every seq that does not follow the previous one, so
    # none out of order means 1, 2, ..., count.
    if tally.out_of_order or tally.last != tally.count:
        raise BenchmarkFailed(
            f"{what}: expected the slow consumer to handle seqs 1..m in order with no gap, "
            f"but it handled {tally.count:,} events ending at seq {tally.last:,} "
            f"with {tally.out_of_order:,} out of order"
        )


class _Finish:
    """Wakes the timing task once every fast consumer has handled every event."""

    def __init__(self, tallies: Sequence[BusyTally]) -> None:
        self.left = len(tallies)
        self.event = trio.Event()
        #: perf_counter() when the last fast consumer handled its last event.
        self.at = 0.0
        for tally in tallies:
            tally.on_done = self._one_done

    def _one_done(self) -> None:
        self.left -= 1
        if not self.left:
            self.at = perf_counter()
            self.event.set()


@attrs.frozen(kw_only=True)
class RunSpec:
    """One run's settings, as sent to its subprocess (JSON).

    Attributes:
        case: ``raw``, ``unbounded`` or ``bounded``.
        store: The store kind's name (`benchmarks._stores.STORES`), None for raw.
        events: Events published (N).
        consumers: Consumers (K), the last of them the slow one.
        handler_us: A fast handler's CPU time per event, in microseconds.
        slowdown: How many times longer the slow handler waits per event.
        buffer: The consumers' ``buffer`` (None: unbounded).
        batch_size: Events per ``publish_many`` call, and per list sent in raw.
        commit_every: The consumers' ``commit_every``.
        timeout: Seconds the run may take before it counts as failed.
    """

    case: str
    store: str | None
    events: int
    consumers: int
    handler_us: float
    slowdown: float
    buffer: int | None
    batch_size: int
    commit_every: int
    timeout: float

    @property
    def what(self) -> str:
        """The run, as failure messages name it."""
        where = "raw channels" if self.store is None else f"trioflow on {self.store}"
        return f"slow-consumer {self.case} ({where})"

    def tallies(self) -> tuple[list[BusyTally], SleepyTally]:
        """Fresh handlers: the fast consumers' and the slow one's."""
        seconds = self.handler_us / 1e6
        fast = [BusyTally(seconds=seconds, target=self.events) for _ in range(self.consumers - 1)]
        return fast, SleepyTally(seconds=seconds * self.slowdown)


def run_measured(params: Mapping[str, Any]) -> dict[str, float]:
    """One run, in this (fresh) process: set up, measure, check; return its figures.

    Called by `benchmarks._rss_child`, which adds the peak resident set size.

    Raises:
        BenchmarkFailed: The run's correctness check failed, or it timed out.
    """
    spec = RunSpec(**params)
    data = make_data(spec.events)
    batches = _chunks([(EVENT_TYPE, item) for item in data], spec.batch_size)
    # The inputs live through the run: keep them out of the collector's way,
    # as the harness does for in-process cases.
    gc.collect()
    gc.freeze()
    fast, slow = spec.tallies()
    with GCTimer() as collecting:
        if spec.store is None:
            run = functools.partial(_raw_run, spec, data, fast, slow)
            figures = _run_within(spec.timeout, fast, spec.events, spec.what, run)
        else:
            with STORES[spec.store].fresh() as store:
                run = functools.partial(_flow_run, spec, store, batches, fast, slow)
                figures = _run_within(spec.timeout, fast, spec.events, spec.what, run)
    return {**figures, "gc_s": collecting.seconds}


def _envelopes(data: Sequence[Data], start: int, size: int) -> list[trioflow.Event]:
    """Event objects for ``data[start:start + size]``, built as a publisher sends them."""
    now = datetime.datetime.now(datetime.UTC)
    return [
        trioflow.Event(
            seq=seq, id=uuid.UUID(int=seq), type=EVENT_TYPE, data=item, key=None, created_at=now
        )
        for seq, item in enumerate(data[start : start + size], start=start + 1)
    ]


async def _raw_run(
    spec: RunSpec, data: Sequence[Data], fast: Sequence[BusyTally], slow: SleepyTally
) -> Figures:
    events = len(data)
    finish = _Finish(fast)
    finished: list[float] = []
    sends: list[trio.MemorySendChannel[Sequence[trioflow.Event]]] = []
    async with trio.open_nursery() as nursery:
        for tally in [*fast, slow]:
            send, receive = trio.open_memory_channel[Sequence[trioflow.Event]](math.inf)
            sends.append(send)
            await nursery.start(_receive_batches, receive, tally, events, finished)
        setup_rss = current_rss_mib()
        started = perf_counter()
        for start in range(0, events, spec.batch_size):
            batch = _envelopes(data, start, spec.batch_size)
            for send in sends:
                await send.send(batch)
        published = perf_counter()
        await finish.event.wait()
        done = perf_counter()
        # The slow receiver need not finish.
        nursery.cancel_scope.cancel()
    check_tallies(fast, events, what=spec.what)
    check_prefix(slow, what=spec.what)
    return _figures(spec, slow, setup_rss, started, published, finish.at, done)


async def _flow_run(
    spec: RunSpec,
    store: Store,
    batches: Sequence[Sequence[tuple[str, Data]]],
    fast: Sequence[BusyTally],
    slow: SleepyTally,
) -> Figures:
    events = spec.events
    finish = _Finish(fast)
    # Stopping is not measured (only recorded as stop_s); a short grace keeps a
    # run quick should stopping wait out its grace period.
    app = trioflow.App(store, commit_every=spec.commit_every, shutdown_grace=1.0)
    names = [f"fast-{index}" for index in range(len(fast))]
    for name, tally in zip(names, fast, strict=True):
        app.consumer(name, buffer=spec.buffer)(tally.handle)
    app.consumer("slow", buffer=spec.buffer)(slow.handle)
    async with trioflow.open_flow(app) as flow:
        setup_rss = current_rss_mib()
        started = perf_counter()
        for batch in batches:
            await flow.publish_many(batch)
        published = perf_counter()
        await finish.event.wait()
        # Only the fast consumers' last commits are left. A flow offers no event
        # for one consumer's commit (wait_idle waits for the slow one too): poll.
        while any(flow.statistics().consumers[name].cursor < events for name in names):  # noqa: ASYNC110
            await trio.sleep(_COMMIT_POLL)
        done = perf_counter()
        slow_buffered = flow.statistics().consumers["slow"].buffered
    stopped = perf_counter()
    check_tallies(fast, events, what=spec.what)
    check_prefix(slow, what=spec.what)
    statistics = flow.statistics()
    cursors = {name: statistics.consumers[name].cursor for name in names}
    slow_cursor = statistics.consumers["slow"].cursor
    if statistics.published != events or any(c != events for c in cursors.values()):
        raise BenchmarkFailed(
            f"{spec.what}: published {statistics.published:,} of {events:,} events; "
            f"fast consumers' committed cursors {cursors}, expected {events:,} each"
        )
    if slow_cursor > slow.last:
        raise BenchmarkFailed(
            f"{spec.what}: the slow consumer's cursor was committed at {slow_cursor:,}, past "
            f"the {slow.last:,} events it handled"
        )
    return {
        **_figures(spec, slow, setup_rss, started, published, finish.at, done),
        "slow_buffered": slow_buffered,
        "stop_s": stopped - done,
    }


def _figures(
    spec: RunSpec,
    slow: SleepyTally,
    setup_rss: float,
    started: float,
    published: float,
    handled: float,
    done: float,
) -> Figures:
    return {
        "fast_per_s": (spec.consumers - 1) * spec.events / (done - started),
        "fast_s": done - started,
        "handled_s": handled - started,
        "commit_lag_s": done - handled,
        "publish_s": published - started,
        "slow_handled": slow.count,
        "setup_rss_mib": setup_rss,
    }


# --- the cases --------------------------------------------------------------------------


#: This workload's own options: flag, type, metavar, default, help.
_OPTIONS: tuple[tuple[str, Callable[[str], object], str, object, str], ...] = (
    (
        "--handler-us",
        positive_float,
        "US",
        10.0,
        "CPU microseconds a fast handler spends per event",
    ),
    ("--slowdown", positive_float, "X", 100.0, "the slow consumer waits X times --handler-us"),
    ("--buffer", positive_int, "B", 10_000, "every consumer's buffer in the bounded case"),
    ("--batch-size", positive_int, "S", 1000, "events per publish_many call, and per raw list"),
    ("--commit-every", positive_int, "C", 100, "the consumers' commit_every"),
)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, kind, metavar, default, text in _OPTIONS:
        parser.add_argument(
            flag, type=kind, metavar=metavar, default=default, help=f"{text} (default: %(default)s)"
        )


def _cases(options: Options, args: argparse.Namespace) -> list[Case]:
    k = options.consumers
    if k < 2:
        raise ValueError("slow-consumer needs --consumers 2 or more: one slow, the others fast")
    shared: dict[str, Any] = {
        "events": options.events,
        "consumers": k,
        "handler_us": args.handler_us,
        "slowdown": args.slowdown,
        "batch_size": args.batch_size,
        "commit_every": args.commit_every,
        "timeout": options.timeout,
    }
    handlers = (
        f"{k - 1} fast consumers spending {args.handler_us:g} us of CPU per event, "
        f"one waiting {args.handler_us * args.slowdown:g} us per event"
    )
    cases = [
        _case(
            RunSpec(case="raw", store=None, buffer=None, **shared),
            f"unbounded trio memory channels fed lists of {args.batch_size:,} events; {handlers}",
            reference=True,
        )
    ]
    for kind in options.stores:
        for case_id, buffer in (("unbounded", None), ("bounded", args.buffer)):
            spec = RunSpec(case=case_id, store=kind.name, buffer=buffer, **shared)
            mode = "buffer=None" if buffer is None else f"buffer={buffer:,}"
            cases.append(
                _case(
                    spec,
                    f"trioflow, publish_many of {args.batch_size:,} events; every consumer "
                    f"{mode}, commit_every={args.commit_every}; {handlers}",
                )
            )
    return cases


def _case(spec: RunSpec, description: str, *, reference: bool = False) -> Case:
    params = attrs.asdict(spec)

    def run() -> Figures:
        return measure_in_child(__name__, params, timeout=spec.timeout, what=spec.what)

    return Case(
        id=spec.case,
        description=description,
        store=spec.store,
        consumers=spec.consumers,
        events=spec.events,
        params={key: value for key, value in params.items() if key not in ("case", "store")},
        reference=reference,
        run=run,
    )


WORKLOAD = Workload(
    name="slow-consumer",
    summary=(
        "K-1 fast consumers and one slow one: the fast ones' throughput and the process's "
        "peak memory, unbounded and bounded, compared with raw trio channels"
    ),
    metrics=(
        Metric(key="fast_per_s", label="fast ev/s", unit="events/s"),
        Metric(key="peak_rss_mib", label="peak MiB", unit="MiB", decimals=1),
        Metric(key="rss_growth_mib", label="growth MiB", unit="MiB", decimals=1),
        Metric(key="slow_handled", label="slow handled", unit="events"),
    ),
    ratio_metric="fast_per_s",
    ratio_label="fast vs raw",
    cases=_cases,
    add_arguments=_add_arguments,
)
