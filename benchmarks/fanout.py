"""The fan-out workload: how fast trioflow persists events and delivers them to K consumers.

Cases (``--case`` selects by id; ``raw`` always runs, the ratios need it):

``raw`` (the reference)
    The in-process ceiling: one task sends N pre-built events, one
    ``await send.send(event)`` at a time, into K unbounded trio memory
    channels; K tasks receive them and call the same handler the trioflow
    consumers use.
``raw-batch``
    The same, sending lists of ``--batch-size`` events: what batching buys.
``publish-many``
    trioflow: one task calls ``publish_many`` with ``--batch-size`` events at
    a time; K consumers with no-op handlers commit their cursors every
    ``--commit-every`` events.
``publish-many-commit1``
    The same with ``commit_every=1``: a cursor commit after every event.
``publish-tasks``
    ``--publishers`` tasks each call ``publish`` one event at a time (trioflow
    groups concurrent calls into one store transaction).
``batch``
    As ``publish-many``, with batch consumers (``batch=1000``): each handler
    call takes up to 1,000 events (the same per-event work, in a loop), and
    ``commit_every`` is 1 batch: the cursor is durable up to the batch before
    the one being handled.
``tx`` (SQLite and PostgreSQL stores)
    As ``publish-many``, with transactional consumers
    (``transactional=True, commit_every=C``) each inserting one effect row
    per event into a table of its own (`benchmarks._effects`): C events per
    transaction.
``tx-commit1``
    The same with ``commit_every=1``: one transaction per event.
``asyncpg``, ``asyncpg-commit1``, ``asyncpg-tx``, ``asyncpg-tx-commit1`` (PostgreSQL stores)
    The hand-written program (`benchmarks.asyncpg_fanout`) doing the job of
    ``publish-many``, ``publish-many-commit1``, ``tx`` and ``tx-commit1``:
    the ``vs hand-written`` baseline of each.
``copy`` (PostgreSQL stores; K=0)
    The publish ceiling: the same program's writer alone (``--readers 0``),
    binary COPY of the same payloads in batches of ``--batch-size``: the
    ``publish vs COPY`` column of ``publish-many`` and ``publish-tasks``.
``asyncpg-bytes`` (PostgreSQL stores)
    The delivery ceiling: the same program with readers that decode nothing
    (``--bytes-only``: ``seq`` and the data's bytes, a no-op handler, a cursor
    upsert every ``--commit-every``): the ``vs bytes-only`` column.
``redis-streams`` (with ``--peer redis``)
    A peer, not a trioflow store (its store column is empty): Redis Streams
    with one consumer group per reader, driven by the asyncio program
    `benchmarks.redis_fanout` in a subprocess: MULTI/EXEC pipelines of
    ``--batch-size`` XADDs; K readers each in its own group (so each gets
    every event), XREADGROUP COUNT 1000, ``json.loads`` and a no-op handler
    per event, one XACK every ``--commit-every`` events.
``nats-jetstream`` (with ``--peer nats``)
    A peer: NATS JetStream, a file-storage stream and one durable pull
    consumer per reader (``ack_policy=all``), driven by
    `benchmarks.nats_fanout`: async publishes awaited per ``--batch-size``
    batch; ``fetch(1000)``, ``json.loads`` and a no-op handler per event, one
    confirmed ack (of all before it) every ``--commit-every`` events.

The peers run only when asked for, ``--peer redis --peer nats`` or ``--peer
all``, whatever the stores: they need their client libraries (``pip install
'.[bench]'``) and servers ($TRIOFLOW_BENCH_REDIS_URL, default
``redis://127.0.0.1:6379/0``; $TRIOFLOW_BENCH_NATS_URL, default
``nats://127.0.0.1:4222``), and a run of the trioflow stores alone should
need neither. A peer whose client is missing or whose server is unreachable
is skipped with a line on stderr saying why, and listed under
``skipped_peers`` in the JSON file. Both acknowledge every C events, the
analogue of trioflow's cursor commit every C events: after a crash each
redelivers at most the C events handled since (see their modules).

Figures: publish ev/s is N over the time from the first publish (send) until
the last one returned; delivered ev/s is K*N over the time from the first
publish until every consumer had handled, and committed, all N events
(``await flow.wait_idle()``). Every run then checks that each consumer
handled exactly sequence numbers 1..N, in order, and that its committed
cursor is N (in the ``tx`` cases, also that its effect table holds exactly one
row per seq 1..N); otherwise the benchmark fails. A peer's program checks the same
(each reader handled events 1..N in order, nothing left unacknowledged) and
exits non-zero if not, which fails the benchmark too.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import sys
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from time import perf_counter
from typing import TypeVar

import attrs
import trio

import trioflow
from trioflow.stores import Store

# Re-exported: the events' shape is part of this workload's definition.
from ._data import DATA_BYTES as DATA_BYTES
from ._data import EVENT_TYPE as EVENT_TYPE
from ._data import Data as Data
from ._data import make_data as make_data
from ._effects import count_sql, create_sql, effect_problems, effect_table, insert_sql
from ._harness import BenchmarkFailed, Case, Options, Workload, positive_int, run_program
from ._peers import ALL_PEERS, PEERS, PeerKind, peers_named
from ._report import Comparison, Metric
from ._stores import POSTGRES_URL_VARIABLE, StoreKind, fresh_postgres_schema

#: Rows per query of the hand-written program's readers (trioflow's default page_size).
PAGE_SIZE = 1000

#: One run's figures, by metric key.
Figures = Mapping[str, float]
T = TypeVar("T")


class Tally:
    """A consumer's no-op handler that also notes what it was given.

    The raw-channel baseline calls the very same handler, so the ratios
    measure trioflow's machinery, not the handler.
    """

    __slots__ = ("count", "last", "out_of_order")

    def __init__(self) -> None:
        self.count = 0
        self.last = 0
        self.out_of_order = 0

    async def handle(self, event: trioflow.Event) -> None:
        """Count ``event`` and check it directly follows the previous one."""
        seq = event.seq
        if seq != self.last + 1:
            self.out_of_order += 1
        self.last = seq
        self.count += 1

    async def handle_batch(self, events: Sequence[trioflow.Event]) -> None:
        """`handle` each of ``events``, as a batch consumer's handler."""
        last, out_of_order = self.last, 0
        for event in events:
            seq = event.seq
            if seq != last + 1:
                out_of_order += 1
            last = seq
        self.last = last
        self.count += len(events)
        self.out_of_order += out_of_order


class EffectWriter:
    """A transactional consumer's handler: the `Tally`'s, plus one effect row per event.

    The row goes into the consumer's own table (`benchmarks._effects`), in the
    transaction that moves its cursor.
    """

    __slots__ = ("insert", "table", "tally")

    def __init__(self, tally: Tally, table: str) -> None:
        self.tally = tally
        self.table = table
        #: Set once the store's parameter style is known (`prepare`).
        self.insert = ""

    async def prepare(self, tx: trioflow.Transaction) -> None:
        """Create the table in ``tx`` and choose the insert's parameter style."""
        await tx.execute(create_sql(self.table))
        self.insert = insert_sql(self.table, tx.paramstyle)

    async def handle(self, event: trioflow.Event, tx: trioflow.Transaction) -> None:
        """Count ``event`` and insert its effect row."""
        await self.tally.handle(event)
        await tx.execute(self.insert, event.seq, event.data["total_cents"])


def check_tallies(tallies: Sequence[Tally], events: int, *, what: str) -> None:
    """Raise `BenchmarkFailed` unless every tally saw exactly seqs 1..``events`` in order."""
    problems = [
        f"consumer {index} handled {tally.count:,} events ending at seq {tally.last:,} "
        f"with {tally.out_of_order:,} out of order"
        for index, tally in enumerate(tallies)
        if tally.count != events or tally.last != events or tally.out_of_order
    ]
    if problems:
        raise BenchmarkFailed(
            f"{what}: expected every consumer to handle seqs 1..{events:,} in order, but "
            + "; ".join(problems)
        )


def make_events(data: Sequence[Data]) -> list[trioflow.Event]:
    """The events the raw-channel baseline sends: seqs 1..N, as trioflow would deliver them."""
    now = datetime.datetime.now(datetime.UTC)
    return [
        trioflow.Event(
            seq=seq, id=uuid.UUID(int=seq), type=EVENT_TYPE, data=item, key=None, created_at=now
        )
        for seq, item in enumerate(data, start=1)
    ]


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


# --- the raw-channel baselines ---------------------------------------------------------


async def _receive_each(
    receive: trio.MemoryReceiveChannel[trioflow.Event],
    tally: Tally,
    count: int,
    finished: list[float],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    task_status.started()
    handle = tally.handle
    for _ in range(count):
        await handle(await receive.receive())
    finished.append(perf_counter())


async def _receive_batches(
    receive: trio.MemoryReceiveChannel[Sequence[trioflow.Event]],
    tally: Tally,
    count: int,
    finished: list[float],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    task_status.started()
    handle = tally.handle
    received = 0
    while received < count:
        batch = await receive.receive()
        for event in batch:
            await handle(event)
        received += len(batch)
    finished.append(perf_counter())


async def _raw_each(events: Sequence[trioflow.Event], tallies: Sequence[Tally]) -> Figures:
    finished: list[float] = []
    sends: list[trio.MemorySendChannel[trioflow.Event]] = []
    async with trio.open_nursery() as nursery:
        for tally in tallies:
            send, receive = trio.open_memory_channel[trioflow.Event](math.inf)
            sends.append(send)
            await nursery.start(_receive_each, receive, tally, len(events), finished)
        started = perf_counter()
        for event in events:
            for send in sends:
                await send.send(event)
        published = perf_counter()
    check_tallies(tallies, len(events), what="raw channels")
    return _figures(len(events), len(tallies), started, published, max(finished))


async def _raw_batches(
    batches: Sequence[Sequence[trioflow.Event]], tallies: Sequence[Tally]
) -> Figures:
    events = sum(len(batch) for batch in batches)
    finished: list[float] = []
    sends: list[trio.MemorySendChannel[Sequence[trioflow.Event]]] = []
    async with trio.open_nursery() as nursery:
        for tally in tallies:
            send, receive = trio.open_memory_channel[Sequence[trioflow.Event]](math.inf)
            sends.append(send)
            await nursery.start(_receive_batches, receive, tally, events, finished)
        started = perf_counter()
        for batch in batches:
            for send in sends:
                await send.send(batch)
        published = perf_counter()
    check_tallies(tallies, events, what="raw channels, batched")
    return _figures(events, len(tallies), started, published, max(finished))


# --- trioflow ---------------------------------------------------------------------------


async def _publish_each(flow: trioflow.Flow, data: Sequence[Data]) -> None:
    for item in data:
        await flow.publish(EVENT_TYPE, item)


async def _flow_run(
    store: Store,
    variant: _FlowVariant,
    tallies: Sequence[Tally],
    what: str,
    writer: Callable[[Tally, str], EffectWriter] = EffectWriter,
) -> Figures:
    """One run: publish as ``variant`` says, to one consumer per tally.

    A transactional variant's consumers write effect rows (``writer`` makes
    their handlers), checked after the run.
    """
    events = variant.events
    # Stopping is not measured (only recorded as stop_s); a short grace keeps a
    # run quick should stopping wait out its grace period.
    app = trioflow.App(store, commit_every=variant.commit_every, shutdown_grace=1.0)
    # On PostgreSQL in the store's own schema, dropped after the run with it.
    schema: str | None = getattr(store, "schema", None)
    writers = [writer(tally, effect_table(index, schema)) for index, tally in enumerate(tallies)]
    for index, (tally, effects) in enumerate(zip(tallies, writers, strict=True)):
        if variant.transactional:
            app.consumer(
                f"consumer-{index}", transactional=True, commit_every=variant.commit_every
            )(effects.handle)
        elif variant.batch is not None:
            app.consumer(f"consumer-{index}", batch=variant.batch)(tally.handle_batch)
        else:
            app.consumer(f"consumer-{index}")(tally.handle)
    async with trioflow.open_flow(app) as flow:
        if variant.transactional:
            async with flow.transaction() as tx:
                for effects in writers:
                    await effects.prepare(tx)
        started = perf_counter()
        if variant.batches:
            for batch in variant.batches:
                await flow.publish_many(batch)
        else:
            async with trio.open_nursery() as nursery:
                for share in variant.shares:
                    nursery.start_soon(_publish_each, flow, share)
        published = perf_counter()
        await flow.wait_idle()
        delivered = perf_counter()
        statistics = flow.statistics()
        problems: list[str] = []
        if variant.transactional:
            counts: list[Mapping[str, int]] = []
            async with flow.transaction() as tx:
                for effects in writers:
                    count = await tx.fetchrow(count_sql(effects.table))
                    assert count is not None  # an aggregate's one row
                    counts.append(count)
            problems = effect_problems(counts, events)
    stopped = perf_counter()
    check_tallies(tallies, events, what=what)
    cursors = {name: c.cursor for name, c in statistics.consumers.items()}
    if statistics.published != events or any(cursor != events for cursor in cursors.values()):
        raise BenchmarkFailed(
            f"{what}: published {statistics.published:,} of {events:,} events; "
            f"committed cursors {cursors}, expected {events:,} each"
        )
    if problems:
        raise BenchmarkFailed(f"{what}: " + "; ".join(problems))
    return {
        **_figures(events, len(tallies), started, published, delivered),
        "stop_s": stopped - delivered,
    }


def _run_within(
    seconds: float,
    tallies: Sequence[Tally],
    events: int,
    what: str,
    run: Callable[[], Awaitable[Figures]],
) -> Figures:
    """``trio.run(run)``, failing the benchmark if it takes longer than ``seconds``.

    Without a deadline, a flow that lost an event would wait for it forever.
    """

    async def main() -> Figures | None:
        with trio.move_on_after(seconds):
            return await run()
        return None

    figures = trio.run(main)
    if figures is None:
        what = f"{what} timed out after {seconds:g}s"
        check_tallies(tallies, events, what=what)
        raise BenchmarkFailed(f"{what}, though every consumer handled every event")
    return figures


def _figures(
    events: int, consumers: int, started: float, published: float, delivered: float
) -> Figures:
    return {
        "publish_s": published - started,
        "delivered_s": delivered - started,
        "publish_per_s": events / (published - started),
        "delivered_per_s": consumers * events / (delivered - started),
    }


# --- the cases --------------------------------------------------------------------------


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        metavar="B",
        default=1000,
        help="events per publish_many call, and per list in raw-batch (default: %(default)s)",
    )
    parser.add_argument(
        "--commit-every",
        type=positive_int,
        metavar="C",
        default=100,
        help="the consumers' commit_every, except in publish-many-commit1 (default: %(default)s)",
    )
    parser.add_argument(
        "--publishers",
        type=positive_int,
        metavar="P",
        default=64,
        help="concurrent tasks calling publish() in publish-tasks (default: %(default)s)",
    )
    parser.add_argument(
        "--peer",
        action="append",
        choices=[*PEERS, ALL_PEERS],
        help=(
            "also run this peer on the same events: redis (Redis Streams), nats (NATS "
            "JetStream), all; repeatable (default: none). Needs pip install '.[bench]' and "
            "the server; otherwise it is skipped with a line saying why"
        ),
    )


def _cases(options: Options, args: argparse.Namespace) -> list[Case]:
    batch_size: int = args.batch_size
    commit_every: int = args.commit_every
    publishers: int = args.publishers
    n, k, timeout = options.events, options.consumers, options.timeout
    data = make_data(n)
    events = make_events(data)
    event_batches = _chunks(events, batch_size)
    items = [(EVENT_TYPE, item) for item in data]
    item_batches = _chunks(items, batch_size)
    shares = [data[index::publishers] for index in range(publishers)]

    cases = [
        Case(
            id="raw",
            description=(
                f"one task sends each of N pre-built events to {k} unbounded trio memory "
                f"channels (await send.send per event and channel); {k} tasks receive them"
            ),
            store=None,
            consumers=k,
            events=n,
            params={"send": "each"},
            reference=True,
            run=lambda: _raw_case(events, consumers=k, timeout=timeout),
        ),
        Case(
            id="raw-batch",
            description=f"as raw, sending lists of {batch_size:,} events",
            store=None,
            consumers=k,
            events=n,
            params={"send": "batch", "batch_size": batch_size},
            run=lambda: _raw_batch_case(event_batches, consumers=k, timeout=timeout),
        ),
    ]
    # The hand-written program's cases (PostgreSQL stores), by what they are compared with.
    hand_written = _Program(id="asyncpg", commit_every=commit_every)
    ceilings = {
        "copy": _Program(id="copy", commit_every=commit_every, readers=0, column="copy"),
        "bytes": _Program(
            id="asyncpg-bytes", commit_every=commit_every, bytes_only=True, column="bytes"
        ),
    }
    peers = {peer.name: peer.case for peer in peers_named(args.peer or ())}
    variants = [
        _FlowVariant(
            id="publish-many",
            description=(
                f"one task calls publish_many with {batch_size:,} events at a time; "
                f"{k} no-op consumers, commit_every={commit_every}"
            ),
            commit_every=commit_every,
            batches=item_batches,
            baseline=hand_written,
            ceilings=ceilings,
            peers=peers,
        ),
        _FlowVariant(
            id="publish-tasks",
            description=(
                f"{publishers} tasks each call publish() one event at a time; "
                f"{k} no-op consumers, commit_every={commit_every}"
            ),
            commit_every=commit_every,
            shares=shares,
            baseline=hand_written,
            ceilings=ceilings,
            peers=peers,
        ),
        _FlowVariant(
            id="publish-many-commit1",
            description="as publish-many, with commit_every=1 (a cursor commit after every event)",
            commit_every=1,
            batches=item_batches,
            baseline=_Program(id="asyncpg-commit1", commit_every=1),
        ),
        _FlowVariant(
            id="batch",
            description=(
                f"as publish-many, with batch consumers (batch={PAGE_SIZE:,}): up to "
                f"{PAGE_SIZE:,} events per handler call, commit_every=1 batch"
            ),
            commit_every=1,
            batch=PAGE_SIZE,
            batches=item_batches,
            baseline=hand_written,
            ceilings=ceilings,
            peers=peers,
        ),
    ]
    tx_variants = [
        _FlowVariant(
            id="tx",
            description=(
                f"as publish-many, with transactional consumers each inserting one effect row "
                f"per event into a table of its own; commit_every={commit_every} events per "
                "transaction"
            ),
            commit_every=commit_every,
            batches=item_batches,
            transactional=True,
            baseline=_Program(id="asyncpg-tx", commit_every=commit_every, effects=True),
        ),
        _FlowVariant(
            id="tx-commit1",
            description="as tx, with commit_every=1 (one transaction per event)",
            commit_every=1,
            batches=item_batches,
            transactional=True,
            baseline=_Program(id="asyncpg-tx-commit1", commit_every=1, effects=True),
        ),
    ]
    for kind in options.stores:
        # The memory store runs no transactions.
        kind_variants = variants + (tx_variants if kind.family != "memory" else [])
        store_cases: list[Case] = []
        postgres = kind.family == "postgres"
        for variant in kind_variants:
            programs = variant.programs() if postgres else []
            for program in programs:
                if program.id not in {c.id for c in store_cases}:
                    # Each hand-written run just before the trioflow cases compared
                    # with it, so that both see the machine in the same state.
                    store_cases.append(_asyncpg_case(kind, options, batch_size, program))
            store_cases.append(
                Case(
                    id=variant.id,
                    description=variant.description,
                    store=kind.name,
                    consumers=k,
                    events=n,
                    params=variant.params(),
                    run=_flow_case(kind, variant, consumers=k, timeout=timeout),
                    baseline=variant.baseline.id if postgres and variant.baseline else None,
                    compared={
                        **({key: p.id for key, p in variant.ceilings.items()} if postgres else {}),
                        **variant.peers,
                    },
                )
            )
        cases.extend(store_cases)
    cases.extend(
        _peer_case(peer, options, batch_size, commit_every) for peer in peers_named(args.peer or ())
    )
    return cases


@attrs.frozen(kw_only=True, eq=False)
class _FlowVariant:
    """How a trioflow case publishes: ``publish_many`` batches, or concurrent ``publish``.

    Its inputs are built once, before any run, as the raw baseline's events are:
    building them is not timed, and the collector leaves them alone.
    """

    id: str
    description: str
    commit_every: int
    #: For publish_many: the ``(type, data)`` items of each call.
    batches: Sequence[Sequence[tuple[str, Data]]] = ()
    #: For publish: the data each publishing task publishes, one call each.
    shares: Sequence[Sequence[Data]] = ()
    #: On PostgreSQL: the hand-written program's case it is compared with.
    baseline: _Program | None = None
    #: On PostgreSQL: the ceilings it is compared with, by `Comparison` key.
    ceilings: Mapping[str, _Program] = attrs.field(factory=dict)
    #: The peers' cases it is compared with, by `Comparison` key (the peer's name).
    peers: Mapping[str, str] = attrs.field(factory=dict)
    #: Whether its consumers are transactional, each writing one effect row per event.
    transactional: bool = False
    #: For batch consumers: the most events per handler call.
    batch: int | None = None

    def programs(self) -> list[_Program]:
        """The hand-written program's cases it is compared with, on a PostgreSQL store."""
        return [*([self.baseline] if self.baseline else []), *self.ceilings.values()]

    @property
    def events(self) -> int:
        return sum(map(len, self.batches)) + sum(map(len, self.shares))

    def params(self) -> dict[str, object]:
        params: dict[str, object] = {"commit_every": self.commit_every, "data_bytes": DATA_BYTES}
        if self.transactional:
            params.update(transactional=True, effect_rows=1)
        if self.batch is not None:
            params.update(consumer_batch=self.batch)
        if self.batches:
            params.update(publish="publish_many", batch_size=len(self.batches[0]))
        if self.shares:
            params.update(publish="publish", publishers=len(self.shares))
        return params


def _raw_case(events: Sequence[trioflow.Event], *, consumers: int, timeout: float) -> Figures:
    tallies = [Tally() for _ in range(consumers)]
    return _run_within(
        timeout,
        tallies,
        len(events),
        "raw channels",
        functools.partial(_raw_each, events, tallies),
    )


def _raw_batch_case(
    batches: Sequence[Sequence[trioflow.Event]], *, consumers: int, timeout: float
) -> Figures:
    tallies = [Tally() for _ in range(consumers)]
    return _run_within(
        timeout,
        tallies,
        sum(map(len, batches)),
        "raw channels, batched",
        functools.partial(_raw_batches, batches, tallies),
    )


def _flow_case(
    kind: StoreKind,
    variant: _FlowVariant,
    *,
    consumers: int,
    timeout: float,
) -> Callable[[], Figures]:
    def run() -> Figures:
        tallies = [Tally() for _ in range(consumers)]
        what = f"trioflow {variant.id} on {kind.name}"
        with kind.fresh() as store:
            return _run_within(
                timeout,
                tallies,
                variant.events,
                what,
                functools.partial(_flow_run, store, variant, tallies, what),
            )

    return run


# --- the hand-written asyncpg program (PostgreSQL stores only) ------------------------


@attrs.frozen(kw_only=True)
class _Program:
    """A run of the hand-written program (`benchmarks.asyncpg_fanout`): one case.

    Attributes:
        id: Its case id.
        commit_every: Events per cursor upsert (with ``effects``: per transaction).
        effects: One effect row per event, in the transaction moving the cursor.
        bytes_only: Readers that decode nothing (the delivery ceiling).
        readers: Its readers: None for the run's K; 0 for the writer alone
            (the publish ceiling), a case of K=0 that runs once per sweep.
        column: The `Comparison` key of the column it is the 1.00 of; None
            for the ``vs hand-written`` column.
    """

    id: str
    commit_every: int
    effects: bool = False
    bytes_only: bool = False
    readers: int | None = None
    column: str | None = None


def _asyncpg_case(kind: StoreKind, options: Options, batch_size: int, program: _Program) -> Case:
    """The hand-written program (`benchmarks.asyncpg_fanout`) on ``kind``'s server, as
    ``program`` says.

    It runs in a subprocess, so that asyncio and trio never share a process,
    with the cursor durability of the store it is compared with; in one
    transaction with effect rows (as a transactional consumer's cursor, which
    is as durable as its transaction) with sync, logged cursors.
    """
    case_id, commit_every, effects = program.id, program.commit_every, program.effects
    durability = "sync" if effects else kind.options.get("cursor_durability", "sync")
    n, timeout = options.events, options.timeout
    k = options.consumers if program.readers is None else program.readers
    command = [
        sys.executable,
        "-m",
        "benchmarks.asyncpg_fanout",
        f"--events={n}",
        f"--readers={k}",
        f"--batch-size={batch_size}",
        f"--page-size={PAGE_SIZE}",
        f"--commit-every={commit_every}",
        f"--cursor-durability={durability}",
        *(["--effects"] if effects else []),
        *(["--bytes-only"] if program.bytes_only else []),
    ]
    what = f"hand-written asyncpg program ({case_id}) on {kind.name}"

    def run() -> Figures:
        with fresh_postgres_schema() as (url, schema):
            return run_program(
                [*command, f"--schema={schema}"],
                what=what,
                timeout=timeout,
                env={POSTGRES_URL_VARIABLE: url},
            )

    events = f"{commit_every} event{'s' if commit_every != 1 else ''}"
    writer = f"COPY batches of {batch_size:,}"
    if k == 0:
        description = (
            f"the publish ceiling: the hand-written asyncio+asyncpg program's writer alone in a "
            f"subprocess, binary COPY (copy_records_to_table) of the same payloads in {writer}"
        )
    else:
        reading = (
            "seq and the data's bytes (no decoding) and a no-op handler per event"
            if program.bytes_only
            else "json.loads and a no-op handler per event"
        )
        description = (
            ("the delivery ceiling: " if program.bytes_only else "")
            + f"hand-written asyncio+asyncpg program in a subprocess: {writer}; "
            f"{k} readers paging by seq {PAGE_SIZE:,} rows at a time, {reading}, "
            + (
                f"one effect row inserted per event and a cursor upsert, in a transaction "
                f"per {events}"
                if effects
                else f"cursor upsert every {events}"
            )
            + f" (cursor_durability={durability})"
        )
    return Case(
        id=case_id,
        description=description,
        store=kind.name,
        consumers=k,
        events=n,
        params={
            "program": "benchmarks.asyncpg_fanout",
            "readers": k,
            "commit_every": commit_every,
            "batch_size": batch_size,
            "page_size": PAGE_SIZE,
            "cursor_durability": durability,
            "data_bytes": DATA_BYTES,
            **({"transactional": True, "effect_rows": 1} if effects else {}),
            **({"bytes_only": True} if program.bytes_only else {}),
        },
        run=run,
        baseline=case_id if program.column is None else None,
        compared={} if program.column is None else {program.column: case_id},
    )


# --- the peers (--peer): other systems, each driven by its own asyncio program --------


def _peer_case(peer: PeerKind, options: Options, batch_size: int, commit_every: int) -> Case:
    """``peer``'s program (`benchmarks.redis_fanout`, ...) on the same events, in a subprocess."""
    n, k, timeout = options.events, options.consumers, options.timeout
    command = [
        sys.executable,
        "-m",
        peer.program,
        f"--events={n}",
        f"--readers={k}",
        f"--batch-size={batch_size}",
        f"--page-size={PAGE_SIZE}",
        f"--commit-every={commit_every}",
        # The program gives up by itself first, so that it deletes its stream.
        f"--timeout={timeout}",
    ]
    what = f"{peer.title} program ({peer.case})"
    probe = peer.probe()

    def run() -> Figures:
        # The program's own deadline comes first (it then deletes its
        # stream); this one only stops a program that ignored it.
        return run_program(
            command, what=what, timeout=timeout + 60, env={peer.url_variable: peer.url()}
        )

    descriptions = {
        "redis": (
            f"Redis Streams (redis-py asyncio) in a subprocess: MULTI/EXEC pipelines of "
            f"{batch_size:,} XADDs; {k} consumer groups of one reader, XREADGROUP COUNT "
            f"{PAGE_SIZE:,}, json.loads and a no-op handler per event, XACK every "
            f"{commit_every} events"
        ),
        "nats": (
            f"NATS JetStream (nats-py) in a subprocess: file-storage stream, async publishes "
            f"awaited per {batch_size:,}; {k} durable pull consumers (ack_policy=all), "
            f"fetch({PAGE_SIZE:,}), json.loads and a no-op handler per event, a confirmed ack "
            f"every {commit_every} events"
        ),
    }
    return Case(
        id=peer.case,
        description=descriptions.get(peer.name, f"{peer.title} ({peer.program})"),
        store=None,
        consumers=k,
        events=n,
        params={
            "program": peer.program,
            "commit_every": commit_every,
            "batch_size": batch_size,
            "page_size": PAGE_SIZE,
            "data_bytes": DATA_BYTES,
            "server": dict(probe.server),
            "client": dict(probe.client),
        },
        run=run,
    )


WORKLOAD = Workload(
    name="fanout",
    summary=(
        "publish N events, deliver them to K consumers; compared with raw trio channels "
        "and, on PostgreSQL, a hand-written asyncpg program and its ceilings (COPY alone, "
        "bytes-only readers)"
    ),
    metrics=(
        Metric(key="publish_per_s", label="publish ev/s", unit="events/s"),
        Metric(key="delivered_per_s", label="delivered ev/s", unit="events/s"),
    ),
    ratio_metric="delivered_per_s",
    ratio_label="delivered vs raw",
    baseline_label="vs hand-written",
    comparisons=(
        Comparison(key="copy", label="publish vs COPY", metric="publish_per_s"),
        Comparison(key="bytes", label="vs bytes-only", metric="delivered_per_s"),
        *(
            Comparison(key=peer.name, label=f"vs {peer.case}", metric="delivered_per_s")
            for peer in PEERS.values()
        ),
    ),
    cases=_cases,
    add_arguments=_add_arguments,
)
