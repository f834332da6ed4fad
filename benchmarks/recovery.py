"""The recovery workload: how fast a restarted flow replays a backlog from its store.

Each run fills a fresh store with a backlog of N events (``--events``; this
workload's default is 1,000,000) while K consumer cursors (``--consumers``)
stand at 0: a flow with no consumers publishes the backlog with
``publish_many``, ``--fill-batch`` events a call, and is closed. Filling is
not timed; it reports its progress on stderr every 10%. The backlog's data
are the fan-out workload's 200-byte JSON objects, the first ``--fill-batch``
of them, published again in every call. Then the store is opened again, as a
restarted process would: a memory store is the same ``MemoryStore`` object
(it lives in this process only); a SQLite or PostgreSQL store is a new store
object for the same URL. What runs on it is timed.

Cases (``--case`` selects by id; the memory ``store-read`` always runs, the
ratios need it):

``store-read`` (on memory: the reference; on every other store: the
``vs store read`` baseline)
    No flow: the store's own API. K tasks each load their cursor, read the
    backlog with ``Store.read``, ``--page-size`` events a call, call the
    fan-out workload's no-op handler on every event, and commit their
    cursor once, at the end.
``replay``
    A new flow (a new ``App`` on the reopened store) with K consumers running
    the same handler, ``commit_every=--commit-every``,
    ``page_size=--page-size``: each consumer loads its cursor and replays
    the backlog from the store, committing its cursor as it goes.
``batch``
    As ``replay``, with batch consumers (``batch=--page-size``, default
    ``commit_every``: one batch): each handler call takes up to a page of
    events and runs the same handler on each.

Figures: seconds runs from opening the store (entering ``open_flow``, or
``store.open()``) until every consumer had handled all N events and its
cursor was committed at N (``flow.wait_idle()`` returned, or every reader
committed); replay ev/s is N over those seconds (each consumer's own rate),
delivered ev/s is K*N over them. The JSON file adds ``open_s`` (the part
spent opening the store, and for ``replay`` starting the flow, whose
consumers may have begun replaying by then), ``fill_s`` (the untimed fill)
and, for ``replay``, ``stop_s`` (leaving ``open_flow``). Every run then
checks that each consumer handled exactly seqs 1..N (the whole backlog), in
order, and that every committed cursor is N; otherwise the benchmark fails.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator, Sequence
from time import perf_counter

import attrs
import trio

import trioflow
from trioflow.stores import Store, store_from_url

from ._data import DATA_BYTES, EVENT_TYPE, Data, make_data
from ._harness import BenchmarkFailed, Case, Options, Workload, positive_int
from ._report import Metric
from ._stores import STORES, StoreKind, fresh_postgres_schema, with_options
from .fanout import Figures, Tally, _run_within, check_tallies

#: The default backlog (N) of this workload, in place of the common 100,000.
DEFAULT_BACKLOG = 1_000_000

#: Opens the store a run filled, as a restarted process would.
Reopen = Callable[[], Store]
#: Times one catch-up: (reopen, tallies, N, what) -> figures.
Measure = Callable[[Reopen, Sequence[Tally], int, str], Awaitable[Figures]]


@attrs.frozen(kw_only=True, eq=False)
class Backlog:
    """What every run fills its store with.

    Attributes:
        events: Events in the backlog (N).
        consumers: Consumers whose cursors stand at 0 (K).
        items: The ``(type, data)`` items of one ``publish_many`` call; the
            last call takes as many of them as are left.
        progress: Prints a line of progress on stderr.
    """

    events: int
    consumers: int
    items: Sequence[tuple[str, Data]]
    progress: Callable[[str], None]

    @property
    def names(self) -> list[str]:
        """The consumers' durable names."""
        return [f"consumer-{index}" for index in range(self.consumers)]


@contextlib.contextmanager
def restartable(kind: StoreKind) -> Iterator[Reopen]:
    """A fresh, empty store of ``kind``, as a function opening it as a restart would.

    The function returns the same object for a memory store (nothing else
    holds its events), and a new store object built from the same URL for
    SQLite and PostgreSQL. The store is deleted on exit.
    """
    if kind.family == "postgres":
        with fresh_postgres_schema() as (url, schema):
            yield functools.partial(
                store_from_url, with_options(url, schema=schema, **kind.options)
            )
        return
    with kind.fresh() as store:
        if kind.family == "sqlite":
            # Imported here: a trioflow without the SQLite store runs the others.
            from trioflow.stores.sqlite import SQLiteStore

            assert isinstance(store, SQLiteStore)
            path = urllib.parse.quote(store.path)
            yield functools.partial(
                store_from_url, f"sqlite:///{path}?synchronous={store.synchronous}"
            )
        else:
            yield lambda: store


async def fill(store: Store, backlog: Backlog, what: str) -> float:
    """Publish the backlog into ``store`` with consumers' cursors at 0; return the seconds taken."""
    events, batch = backlog.events, len(backlog.items)
    started = perf_counter()
    reported = 0
    async with trioflow.open_flow(trioflow.App(store, shutdown_grace=1.0)) as flow:
        # The cursors a restarted flow loads: its consumers had handled nothing.
        await store.commit_cursors(dict.fromkeys(backlog.names, 0))
        for start in range(0, events, batch):
            await flow.publish_many(backlog.items[: events - start])
            filled = min(start + batch, events)
            if 10 * (filled - reported) >= events or filled == events:
                reported = filled
                backlog.progress(
                    f"  {what}: backlog {filled:,} of {events:,} events "
                    f"({100 * filled / events:.0f}%, {perf_counter() - started:.1f}s)"
                )
        published = flow.statistics().published
    if published != events:
        raise BenchmarkFailed(f"{what}: the fill published {published:,} of {events:,} events")
    return perf_counter() - started


def _fill_within(seconds: float, store: Store, backlog: Backlog, what: str) -> float:
    async def main() -> float:
        with trio.fail_after(seconds):
            return await fill(store, backlog, what)

    try:
        return trio.run(main)
    except trio.TooSlowError:
        raise BenchmarkFailed(
            f"{what}: filling the backlog took longer than {seconds:g}s"
        ) from None


async def replay(
    reopen: Reopen,
    tallies: Sequence[Tally],
    events: int,
    what: str,
    *,
    commit_every: int,
    page_size: int,
    batch: int | None = None,
) -> Figures:
    """A new flow on the reopened store, timed until every consumer caught up and committed.

    With ``batch``, its consumers are batch consumers of that many events.
    """
    app = trioflow.App(reopen(), commit_every=commit_every, page_size=page_size, shutdown_grace=1.0)
    names = [f"consumer-{index}" for index in range(len(tallies))]
    for name, tally in zip(names, tallies, strict=True):
        if batch is None:
            app.consumer(name)(tally.handle)
        else:
            app.consumer(name, batch=batch)(tally.handle_batch)
    started = perf_counter()
    async with trioflow.open_flow(app) as flow:
        opened = perf_counter()
        await flow.wait_idle()
        caught_up = perf_counter()
    stopped = perf_counter()
    check_tallies(tallies, events, what=what)
    cursors = {name: c.cursor for name, c in flow.statistics().consumers.items()}
    _check_cursors(cursors, names, events, what)
    return {
        **_figures(events, len(tallies), started, opened, caught_up),
        "stop_s": stopped - caught_up,
    }


async def read_backlog(
    reopen: Reopen, tallies: Sequence[Tally], events: int, what: str, *, page_size: int
) -> Figures:
    """K tasks read the backlog through the store's API, no flow; timed as `replay`."""
    store = reopen()
    names = [f"consumer-{index}" for index in range(len(tallies))]
    started = perf_counter()
    async with store.open():
        opened = perf_counter()
        async with trio.open_nursery() as nursery:
            for name, tally in zip(names, tallies, strict=True):
                nursery.start_soon(_read_one, store, name, tally, page_size)
        caught_up = perf_counter()
        cursors = await store.load_cursors()
    check_tallies(tallies, events, what=what)
    _check_cursors(cursors, names, events, what)
    return _figures(events, len(tallies), started, opened, caught_up)


async def _read_one(store: Store, name: str, tally: Tally, page_size: int) -> None:
    position = (await store.load_cursors()).get(name, 0)
    head = await store.head()
    handle = tally.handle
    while position < head:
        page = await store.read(position, page_size)
        if not page:
            # Events missing: the check after the run says which.
            break
        for event in page:
            await handle(event)
        position = page[-1].seq
    await store.commit_cursors({name: position})


def _check_cursors(cursors: dict[str, int], names: Sequence[str], events: int, what: str) -> None:
    wrong = {name: cursors.get(name) for name in names if cursors.get(name) != events}
    if wrong:
        raise BenchmarkFailed(
            f"{what}: committed cursors {wrong}, expected {events:,} for every consumer"
        )


def _figures(
    events: int, consumers: int, started: float, opened: float, caught_up: float
) -> Figures:
    seconds = caught_up - started
    return {
        "replay_per_s": events / seconds,
        "delivered_per_s": consumers * events / seconds,
        "replay_s": seconds,
        "open_s": opened - started,
    }


def run_once(
    kind: StoreKind, backlog: Backlog, measure: Measure, *, what: str, timeout: float
) -> Figures:
    """Fill a fresh store of ``kind`` (not timed), then time ``measure`` on it, once.

    Raises:
        BenchmarkFailed: The fill or the catch-up failed its check or timed out.
    """
    tallies = [Tally() for _ in range(backlog.consumers)]
    with restartable(kind) as reopen:
        fill_s = _fill_within(timeout, reopen(), backlog, what)
        run = functools.partial(measure, reopen, tallies, backlog.events, what)
        figures = _run_within(timeout, tallies, backlog.events, what, run)
    return {**figures, "fill_s": fill_s}


# --- the cases --------------------------------------------------------------------------


#: This workload's own options: flag, metavar, default, help (all ints >= 1).
_OPTIONS = (
    ("--page-size", "P", 1000, "events per Store.read call, and the flow's page_size"),
    ("--commit-every", "C", 100, "the replaying consumers' commit_every"),
    ("--fill-batch", "B", 10_000, "events per publish_many call when filling the backlog"),
)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, metavar, default, text in _OPTIONS:
        parser.add_argument(
            flag,
            type=positive_int,
            metavar=metavar,
            default=default,
            help=f"{text} (default: %(default)s)",
        )


def _cases(options: Options, args: argparse.Namespace) -> list[Case]:
    n, k, timeout = options.events, options.consumers, options.timeout
    page_size: int = args.page_size
    commit_every: int = args.commit_every
    fill_batch: int = min(args.fill_batch, n)
    backlog = Backlog(
        events=n,
        consumers=k,
        items=[(EVENT_TYPE, item) for item in make_data(fill_batch)],
        progress=options.progress,
    )
    params: dict[str, object] = {"fill_batch": fill_batch, "data_bytes": DATA_BYTES}
    read = functools.partial(read_backlog, page_size=page_size)
    flow = functools.partial(replay, commit_every=commit_every, page_size=page_size)

    def case(
        kind: StoreKind, case_id: str, measure: Measure, description: str, **extra: object
    ) -> Case:
        what = f"recovery {case_id} on {kind.name}"
        return Case(
            id=case_id,
            description=description,
            store=kind.name,
            consumers=k,
            events=n,
            params={**params, **extra},
            run=functools.partial(run_once, kind, backlog, measure, what=what, timeout=timeout),
            reference=case_id == "store-read" and kind.name == "memory",
            baseline="store-read" if case_id in ("replay", "batch") else None,
        )

    read_description = (
        f"no flow: {k} tasks each load their cursor (0), read the backlog with Store.read, "
        f"{page_size:,} events a call, call a no-op handler per event, commit once at the end"
    )
    replay_description = (
        f"a new flow on the reopened store, {k} no-op consumers, commit_every={commit_every}, "
        f"page_size={page_size:,}: from entering open_flow until wait_idle returned"
    )
    memory = STORES["memory"]
    cases = [case(memory, "store-read", read, read_description, page_size=page_size)]
    for kind in options.stores:
        if kind.name != memory.name:
            cases.append(case(kind, "store-read", read, read_description, page_size=page_size))
        cases.append(
            case(
                kind,
                "replay",
                flow,
                replay_description,
                page_size=page_size,
                commit_every=commit_every,
            )
        )
        cases.append(
            case(
                kind,
                "batch",
                functools.partial(flow, batch=page_size),
                f"as replay, with batch consumers (batch={page_size:,}, commit_every=1 batch)",
                page_size=page_size,
                consumer_batch=page_size,
            )
        )
    return cases


WORKLOAD = Workload(
    name="recovery",
    summary=(
        "a restarted flow replays a backlog of N events to K consumers; compared with "
        "reading it through the store's API"
    ),
    metrics=(
        Metric(key="replay_per_s", label="replay ev/s", unit="events/s"),
        Metric(key="delivered_per_s", label="delivered ev/s", unit="events/s"),
        Metric(key="replay_s", label="seconds", unit="s", decimals=2),
    ),
    ratio_metric="delivered_per_s",
    ratio_label="vs memory read",
    baseline_label="vs store read",
    cases=_cases,
    add_arguments=_add_arguments,
    # A backlog worth measuring is far longer than a fan-out run.
    defaults={"events": DEFAULT_BACKLOG},
    option_help={"events": "events in the backlog each run replays"},
)
