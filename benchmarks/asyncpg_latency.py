"""The hand-written asyncpg program that trioflow's latency on PostgreSQL is judged against.

What the machine allows: plain asyncio and asyncpg (``asyncio.run``; no trio,
no trio-asyncio, no trioflow) doing by hand what a trioflow publish and its
delivery do on PostgreSQL, paced at a fixed rate. The latency workload runs it
in a subprocess (the ``asyncpg@R`` cases); it can also be run alone::

    python -m benchmarks.asyncpg_latency --schema tf_bench_try --rate 1000 --events 5000 \\
        --out samples.json

The server is the one $TRIOFLOW_BENCH_POSTGRES_URL names (default
``postgresql://postgres@127.0.0.1:5432/test``), or ``--url``. It creates the
schema, runs once, writes every reader's latency samples to ``--out``
(`benchmarks._samples.child_report`, as the workload's cross-process child
does, so that `benchmarks.latency` ranks and checks both alike), prints its
own figures as one JSON object on stdout and drops the schema. Exit status 1
(the reason on stderr) when a reader did not handle exactly seqs 1..N in
order, or a committed cursor is not N.

What it does, on one asyncio event loop:

- Set-up (not timed): the hand-written fan-out program's tables
  (`benchmarks.asyncpg_fanout`: ``events`` shaped like trioflow's, and
  ``cursors``) and an ``append`` function doing what trioflow's does, in
  one statement: take a transaction-scoped advisory lock (which orders the
  commits by seq), number the batch after ``max(seq)``, insert it with one
  ``unnest``, ``pg_notify`` the schema's channel. One connection for the
  writer, one that LISTENs, one per reader.
- The publisher: a task paces the schedule by absolute deadlines
  (``start + i / R``); at each deadline it takes the publish timestamp
  (``time.monotonic_ns()``, into the event's data under ``t_ns``), encodes
  the data as JSON and queues the event for the writer.
- The writer, on its one connection, group-commits: while a commit is in
  flight events queue, and the next commit takes all of them, each commit
  one call of ``append`` (one round trip, its own transaction). This is
  how trioflow's dispatcher appends, and the fairer floor of the two ways
  to write. An event per commit, each in a task of its own at its
  deadline, needs a connection per commit in flight (an asyncpg connection
  runs one query at a time); under the ordering lock each commit then waits
  for the one before it, a flush per event instead of per group, and
  without the lock commits land out of seq order, so a reader paging by
  seq could pass over an event: no lower a floor for the same guarantee,
  and a design trioflow does not use.
- The listener connection wakes every reader on each notification (one
  ``asyncio.Event``, as trioflow's one LISTEN connection per store wakes
  its dispatcher).
- K readers, each on its own connection, page through
  ``seq > $1 ORDER BY seq LIMIT 1000`` (`benchmarks.asyncpg_fanout.read`,
  with its ``json.loads`` of each row and an upsert of its cursor every
  ``--commit-every`` events); the handler notes the event's latency, the
  time it was called minus the timestamp in the row's data, and checks its
  seq follows the previous one.

Figures on stdout: ``publish_s`` (from the first deadline until the last
commit returned), ``late_max_ms`` (the most the pacing task woke after a
deadline) and ``gc_s``. The report on ``--out`` also holds, under
``stages``, each event's publish timestamp, each commit's span and the
collector's pauses, from which ``--stages`` splits the latency: the wait for
the commit in flight, the commit, and the notification with the read.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

from ._data import EVENT_TYPE, Data
from ._gc import GCTimer
from ._readers import Outcome, Tally, order_problems, report
from ._samples import STAMP, child_report, now_ns
from .asyncpg_fanout import (
    Connection,
    Wakeup,
    _positive_int,
    cursor_problems,
    frozen_data,
    open_connections,
    program_parser,
    read,
    read_cursors,
)

#: Rows per reader query (trioflow's default page_size).
PAGE_SIZE = 1000

_dumps = json.JSONEncoder(separators=(",", ":")).encode


class LatencyTally(Tally):
    """A reader's no-op handler that notes each event's latency, then checks its seq."""

    __slots__ = ("samples",)

    def __init__(self) -> None:
        super().__init__()
        #: Nanoseconds from the publish timestamp to this handler's call, per event.
        self.samples: list[int] = []

    async def handle(self, order: int, data: object) -> None:
        """Note the latency of the event (first thing), then count it and check its seq."""
        assert isinstance(data, dict)
        self.samples.append(now_ns() - data[STAMP])
        await super().handle(order, data)


def _append_sql(schema: str) -> str:
    """The ``append`` function: lock, number, insert and notify in one transaction."""
    q = f'"{schema}"'
    return f"""
CREATE FUNCTION {q}.append(p_ids uuid[], p_types text[], p_data json[])
RETURNS bigint LANGUAGE plpgsql AS $append$
DECLARE
    first bigint;
BEGIN
    -- Held until the commit: batches commit in the order of their seqs.
    PERFORM pg_advisory_xact_lock(hashtext('{schema}'));
    SELECT coalesce(max(seq), 0) + 1 INTO first FROM {q}.events;
    INSERT INTO {q}.events (seq, id, type, data)
    SELECT first + u.ord - 1, u.id, u.type, u.data
    FROM unnest(p_ids, p_types, p_data) WITH ORDINALITY AS u(id, type, data, ord);
    PERFORM pg_notify('{schema}', '');
    RETURN first + cardinality(p_ids) - 1;
END
$append$;
"""


class Writer:
    """The paced publisher and the group-committing writer, on one connection.

    `publish` queues an event; `commit` commits whatever is queued, one
    group at a time, until every event is committed.
    """

    def __init__(self, connection: Connection, schema: str, events: int) -> None:
        self.connection = connection
        self.append = f'SELECT "{schema}".append($1::uuid[], $2::text[], $3::json[])'
        self.events = events
        #: The events waiting for the next commit: (stamp, id, encoded data).
        self.queued: list[tuple[int, uuid.UUID, str]] = []
        self.queued_some = asyncio.Event()
        #: Each event's publish timestamp, in seq order (seq 1 first).
        self.stamps: list[int] = []
        #: Each commit: (started ns, returned ns, first seq, last seq).
        self.commits: list[tuple[int, int, int, int]] = []

    def publish(self, item: Data) -> None:
        """Stamp ``item``, encode it and queue it for the next commit."""
        item[STAMP] = stamp = now_ns()
        self.queued.append((stamp, uuid.uuid4(), _dumps(item)))
        self.queued_some.set()

    async def commit(self) -> None:
        """Commit the queued events, a group at a time, until all ``events`` are committed."""
        while len(self.stamps) < self.events:
            await self.queued_some.wait()
            self.queued_some.clear()
            while self.queued:
                # Whatever queued while the previous commit was in flight.
                group, self.queued = self.queued, []
                started = now_ns()
                last = await self.connection.fetchval(
                    self.append,
                    [event_id for _, event_id, _ in group],
                    [EVENT_TYPE] * len(group),
                    [encoded for _, _, encoded in group],
                )
                self.commits.append((started, now_ns(), last - len(group) + 1, last))
                self.stamps += [stamp for stamp, _, _ in group]


async def pace(rate: float, data: Sequence[Data], writer: Writer) -> tuple[float, float]:
    """Publish the i-th item at ``start + i / rate``; return (seconds until the last commit
    returned, the most the pacing woke after a deadline)."""
    loop = asyncio.get_running_loop()
    late = 0.0
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(writer.commit())
        start = loop.time()
        for index, item in enumerate(data):
            # Absolute deadlines: a late wake-up shortens the next sleep.
            deadline = start + index / rate
            await asyncio.sleep(max(deadline - loop.time(), 0))
            late = max(late, loop.time() - deadline)
            writer.publish(item)
    return loop.time() - start, late


async def run(args: argparse.Namespace) -> Outcome:
    """Set up, run once, write the samples, check, drop the schema; return the figures."""
    schema: str = args.schema
    events: int = args.events
    readers: int = args.readers
    data = frozen_data(events)
    async with open_connections(
        args.url,
        schema,
        readers=readers + 1,
        cursor_durability=args.cursor_durability,
        setup=_append_sql(schema),
    ) as (admin, connection, [listener, *connections]):
        tallies = [LatencyTally() for _ in range(readers)]
        wakeup = Wakeup()
        await listener.add_listener(schema, lambda *_: wakeup.set())
        writer = Writer(connection, schema, events)
        # As trioflow's processes do once their flows have opened (`steady`):
        # this process's first full collection, before the measurement.
        gc.collect()
        with GCTimer(keep_pauses=True) as collecting:
            async with asyncio.TaskGroup() as tasks:
                publishing = tasks.create_task(pace(args.rate, data, writer))
                for index, (reader, tally) in enumerate(zip(connections, tallies, strict=True)):
                    reading = read(
                        reader,
                        schema,
                        f"reader-{index}",
                        tally,
                        events=events,
                        page_size=PAGE_SIZE,
                        commit_every=args.commit_every,
                        wakeup=wakeup,
                    )
                    tasks.create_task(reading)
        seconds, late = publishing.result()
        cursors = await read_cursors(admin, schema)
    stages = {"stamps": writer.stamps, "appends": writer.commits, "pauses": collecting.pauses}
    args.out.write_text(child_report(tallies, cursors, stages), encoding="utf-8")
    return {
        "publish_s": seconds,
        "late_max_ms": late * 1000,
        "gc_s": collecting.seconds,
        "problems": order_problems(tallies, events) + cursor_problems(cursors, readers, events),
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.asyncpg_latency``."""
    parser = program_parser(
        "benchmarks.asyncpg_latency",
        "The hand-written asyncpg latency program (one run; figures as JSON on stdout, "
        "samples in --out).",
        events=5000,
    )
    parser.add_argument("--readers", type=_positive_int, default=4, metavar="K")
    parser.add_argument("--rate", type=float, default=1000.0, metavar="R", help="events/s")
    parser.add_argument("--commit-every", type=_positive_int, default=100, metavar="C")
    parser.add_argument(
        "--cursor-durability", choices=("sync", "async", "unlogged"), default="sync"
    )
    parser.add_argument("--out", type=Path, required=True, metavar="FILE")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run once; write the samples, print the figures as JSON; return 1 if the check failed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.rate < float("inf"):
        parser.error(f"--rate must be a finite number > 0, got {args.rate}")
    # No bound of its own: the harness kills it when its run times out.
    return report(asyncio.run(run(args)))


if __name__ == "__main__":
    sys.exit(main())
