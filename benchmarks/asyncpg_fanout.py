"""The hand-written asyncpg program that trioflow's PostgreSQL fan-out is compared with.

Plain asyncio and asyncpg (``asyncio.run``; no trio, no trio-asyncio, no
trioflow), doing by hand what trioflow's fan-out does on PostgreSQL. The
harness runs it in a subprocess, so that asyncio and trio never share a
process; it can also be run alone::

    python -m benchmarks.asyncpg_fanout --schema tf_bench_try --events 100000

The server is the one $TRIOFLOW_BENCH_POSTGRES_URL names (default
``postgresql://postgres@127.0.0.1:5432/test``), or ``--url``.

It creates the schema, runs once, prints its figures as one JSON object on
stdout, and drops the schema. Exit status 1 (with the reason on stderr) when
its correctness check fails.

What it does, all in one process on the default asyncio event loop:

- Set-up (not timed): a schema with an ``events`` table shaped like
  trioflow's (``seq bigserial`` primary key, ``id uuid`` unique, ``type``,
  ``key``, ``data json``, ``created_at timestamptz DEFAULT now()``) and a
  ``cursors`` table (consumer, seq, updated_at); one connection for the
  writer and one per reader, each keeping asyncpg's prepared statements.
- The writer: for each batch of ``--batch-size`` events, builds one record
  per event (``uuid.uuid4()``, the type, no key, ``json.dumps`` of the data,
  compact) and inserts the batch with one binary COPY
  (``copy_records_to_table``), its own transaction; after each COPY it
  wakes the readers (an ``asyncio.Event``, in-process: no NOTIFY).
- K readers, concurrently with the writer, each on its own connection: read
  ``SELECT seq, id, type, key, data, created_at ... WHERE seq > $1 ORDER BY
  seq LIMIT $2`` pages of ``--page-size`` rows; for every row
  ``json.loads`` its data and ``await`` a no-op async handler with the seq
  and the decoded data (it checks that the seq follows the previous one, as
  trioflow's benchmark handler does); every ``--commit-every`` events, and
  after the last, ``await`` an upsert of its cursor (``INSERT ... ON
  CONFLICT (consumer) DO UPDATE``, one statement, its own transaction). A
  short page means the reader is level with the writer: it waits to be woken
  (or 50 ms) before the next query. It stops once it has committed N.
- ``--effects``: the job of trioflow's transactional consumers. Each
  reader also has an ``effects_<index>`` table (seq, total_cents; no unique
  key, so that a doubled row is counted, not refused) and takes every page
  ``--commit-every`` rows at a time, each in one transaction (``async with
  connection.transaction()``: BEGIN, then per row ``json.loads``, the
  handler and one ``INSERT`` of its effect row, then the cursor upsert,
  COMMIT). The check then also counts every table's rows: exactly one per
  seq 1..N.
- ``--cursor-durability`` mirrors trioflow's store option: ``sync`` commits
  the upserts normally; ``async`` runs the readers' sessions with
  ``synchronous_commit = off``; ``unlogged`` makes ``cursors`` an UNLOGGED
  table (trioflow also keeps a logged checkpoint every 5 s; this does not).

Two ceilings, the same program with less to do (shared code, not copies):

- ``--readers 0``, **the publish ceiling** (the ``copy`` case): the writer
  alone, the same COPY batches with no reader competing for the process.
  It reports what it published only.
- ``--bytes-only``, **the delivery ceiling** (the ``asyncpg-bytes`` case):
  each reader selects only ``seq, data``, with asyncpg's codec for ``json``
  set to hand over the column's bytes as they came (no ``json.loads``, no
  str), and calls the no-op handler with the seq and those bytes; paging,
  waking and cursor upserts as above.

Figures: publish ev/s is N over the time from the first COPY until the last
one returned; delivered ev/s is K*N over the time from the first COPY until
every reader had committed N. The check: every reader saw exactly seqs
1..N in order, and every cursor row holds N.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TypeAlias

import asyncpg

from ._data import EVENT_TYPE, Data, make_data
from ._effects import count_sql, create_sql, effect_problems, effect_table, insert_sql
from ._gc import GCTimer
from ._readers import Tally, figures, order_problems, report

#: The environment variable naming the server (as for the harness), and its default.
URL_VARIABLE = "TRIOFLOW_BENCH_POSTGRES_URL"
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
#: Seconds a reader level with the writer waits for a wake-up before it looks anyway.
POLL_INTERVAL = 0.05

_dumps = json.JSONEncoder(separators=(",", ":")).encode
_loads = json.loads

Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record]"


class Wakeup:
    """Wakes the readers after each COPY: take `event` before a query, wait on it after."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def set(self) -> None:
        self.event.set()
        self.event = asyncio.Event()


def _schema_sql(schema: str, *, unlogged: bool, effect_tables: Sequence[str] = ()) -> str:
    q = f'"{schema}"'
    return f"""
CREATE SCHEMA {q};
CREATE TABLE {q}.events (
    seq bigserial PRIMARY KEY,
    id uuid NOT NULL UNIQUE,
    type text NOT NULL,
    key text,
    data json NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE {"UNLOGGED " if unlogged else ""}TABLE {q}.cursors (
    consumer text PRIMARY KEY,
    seq bigint NOT NULL,
    updated_at timestamptz NOT NULL
);
""" + "".join(f"{create_sql(table)};\n" for table in effect_tables)


async def write(
    connection: Connection,
    schema: str,
    data: Sequence[Data],
    batch_size: int,
    wakeup: Wakeup,
) -> float:
    """COPY ``data`` in batches; return perf_counter() when the last COPY returned."""
    columns = ("id", "type", "key", "data")
    for start in range(0, len(data), batch_size):
        records = [
            (uuid.uuid4(), EVENT_TYPE, None, _dumps(item))
            for item in data[start : start + batch_size]
        ]
        await connection.copy_records_to_table(
            "events", records=records, columns=columns, schema_name=schema
        )
        wakeup.set()
    return time.perf_counter()


async def read(
    connection: Connection,
    schema: str,
    name: str,
    tally: Tally,
    *,
    events: int,
    page_size: int,
    commit_every: int,
    wakeup: Wakeup,
    effects: str | None = None,
    raw: bool = False,
) -> float:
    """Read, decode, handle and commit up to seq ``events``; return perf_counter() then.

    With ``effects`` (a table), in transactions of ``commit_every`` events
    that each insert one row per event there and move the cursor. With
    ``raw``, only seq and the data's bytes, undecoded (see `hand_over_json_bytes`).
    """
    q = f'"{schema}"'
    columns = "seq, data" if raw else "seq, id, type, key, data, created_at"
    select = f"SELECT {columns} FROM {q}.events WHERE seq > $1 ORDER BY seq LIMIT $2"
    upsert = (
        f"INSERT INTO {q}.cursors (consumer, seq, updated_at) VALUES ($1, $2, now()) "
        "ON CONFLICT (consumer) DO UPDATE SET seq = excluded.seq, updated_at = excluded.updated_at"
    )
    handle = tally.handle
    insert = None if effects is None else insert_sql(effects, "$1")
    position = 0
    uncommitted = 0
    while position < events:
        woken = wakeup.event
        rows = await connection.fetch(select, position, page_size)
        if insert is not None:
            for start in range(0, len(rows), commit_every):
                async with connection.transaction():
                    for row in rows[start : start + commit_every]:
                        seq = row[0]
                        data = _loads(row[4])
                        await handle(seq, data)
                        await connection.execute(insert, seq, data["total_cents"])
                    await connection.execute(upsert, name, seq)
                position = seq
        else:
            for row in rows:
                seq = row[0]
                await handle(seq, row[1] if raw else _loads(row[4]))
                position = seq
                uncommitted += 1
                if uncommitted >= commit_every:
                    await connection.execute(upsert, name, position)
                    uncommitted = 0
        if len(rows) < page_size and position < events:
            # Level with the writer: the next COPY wakes us (the event was
            # taken before the query, so a COPY during it is not missed).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), POLL_INTERVAL)
    if uncommitted:
        await connection.execute(upsert, name, position)
    return time.perf_counter()


async def hand_over_json_bytes(connection: Connection) -> None:
    """Make ``connection`` return ``json`` columns as the bytes the server sent: no decoding."""
    await connection.set_type_codec(
        "json", schema="pg_catalog", encoder=bytes, decoder=bytes, format="binary"
    )


def frozen_data(events: int) -> list[Data]:
    """The data of ``events`` events (`make_data`), kept out of the collector's way.

    As the harness does for its own cases: the inputs live through the run.
    """
    data = make_data(events)
    gc.collect()
    gc.freeze()
    return data


@contextlib.asynccontextmanager
async def open_connections(
    url: str,
    schema: str,
    *,
    readers: int,
    cursor_durability: str,
    effect_tables: Sequence[str] = (),
    setup: str = "",
) -> AsyncIterator[tuple[Connection, Connection, list[Connection]]]:
    """Create ``schema`` (and run ``setup``); yield the admin, writer and reader connections.

    The readers' sessions commit asynchronously when ``cursor_durability`` is
    ``async``; ``unlogged`` makes the cursor table UNLOGGED. On exit the
    connections are closed and the schema is dropped.
    """
    settings = {"application_name": "trioflow-bench-asyncpg"}
    reader_settings = dict(settings)
    if cursor_durability == "async":
        reader_settings["synchronous_commit"] = "off"
    admin = await asyncpg.connect(url, server_settings=settings)
    try:
        await admin.execute(
            _schema_sql(
                schema, unlogged=cursor_durability == "unlogged", effect_tables=effect_tables
            )
            + setup
        )
        writer = await asyncpg.connect(url, server_settings=settings)
        connections = [
            await asyncpg.connect(url, server_settings=reader_settings) for _ in range(readers)
        ]
        try:
            yield admin, writer, connections
        finally:
            for connection in [writer, *connections]:
                await connection.close()
    finally:
        try:
            await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await admin.close()


def cursor_problems(cursors: Mapping[str, int], readers: int, events: int) -> list[str]:
    """What is wrong with the readers' committed cursors, unless each is at ``events``."""
    return [
        f"reader {index}'s committed cursor is {cursors.get(f'reader-{index}')}, not {events:,}"
        for index in range(readers)
        if cursors.get(f"reader-{index}") != events
    ]


async def read_cursors(admin: Connection, schema: str) -> dict[str, int]:
    """The committed cursors, by reader name."""
    rows = await admin.fetch(f'SELECT consumer, seq FROM "{schema}".cursors')
    return {row[0]: row[1] for row in rows}


async def run(args: argparse.Namespace) -> dict[str, object]:
    """Set up, run once, check, drop the schema; return the figures."""
    schema: str = args.schema
    events: int = args.events
    readers: int = args.readers
    data = frozen_data(events)
    tables = [effect_table(index, schema) for index in range(readers)] if args.effects else []
    async with open_connections(
        args.url,
        schema,
        readers=readers,
        cursor_durability=args.cursor_durability,
        effect_tables=tables,
    ) as (admin, writer, connections):
        if args.bytes_only:
            for connection in connections:
                await hand_over_json_bytes(connection)
        tallies = [Tally() for _ in range(readers)]
        wakeup = Wakeup()
        collecting = GCTimer()
        with collecting:
            started = time.perf_counter()
            published, *finished = await asyncio.gather(
                write(writer, schema, data, args.batch_size, wakeup),
                *(
                    read(
                        connection,
                        schema,
                        f"reader-{index}",
                        tally,
                        events=events,
                        page_size=args.page_size,
                        commit_every=args.commit_every,
                        wakeup=wakeup,
                        effects=tables[index] if tables else None,
                        raw=args.bytes_only,
                    )
                    for index, (connection, tally) in enumerate(
                        zip(connections, tallies, strict=True)
                    )
                ),
            )
        # A writer alone (no readers) delivers nothing: only its publish figures.
        delivered = max(finished, default=None)
        cursors = await read_cursors(admin, schema)
        counts = [await admin.fetchrow(count_sql(table)) for table in tables]
    problems = order_problems(tallies, events)
    problems += cursor_problems(cursors, readers, events)
    problems += effect_problems([dict(count) for count in counts if count is not None], events)
    return figures(
        events=events,
        readers=readers,
        started=started,
        published=published,
        delivered=delivered,
        gc_seconds=collecting.seconds,
        problems=problems,
    )


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _at_least(1)


def program_parser(program: str, description: str, *, events: int) -> argparse.ArgumentParser:
    """The options of every hand-written PostgreSQL program: the server, the schema, N."""
    parser = argparse.ArgumentParser(prog=f"python -m {program}", description=description)
    parser.add_argument(
        "--url",
        default=os.environ.get(URL_VARIABLE) or DEFAULT_URL,
        help=f"a plain libpq URL of the server (default: ${URL_VARIABLE}, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--schema", required=True, help="a schema name to create, use and drop (must not exist)"
    )
    parser.add_argument("--events", type=_positive_int, default=events, metavar="N")
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.asyncpg_fanout``."""
    parser = program_parser(
        "benchmarks.asyncpg_fanout",
        "The hand-written asyncpg fan-out program (one run; JSON on stdout).",
        events=100_000,
    )
    parser.add_argument(
        "--readers",
        type=_at_least(0),
        default=4,
        metavar="K",
        help="readers (default: %(default)s); 0: the writer alone, the publish ceiling",
    )
    parser.add_argument("--batch-size", type=_positive_int, default=1000, metavar="B")
    parser.add_argument("--page-size", type=_positive_int, default=1000, metavar="P")
    parser.add_argument("--commit-every", type=_positive_int, default=100, metavar="C")
    parser.add_argument(
        "--cursor-durability", choices=("sync", "async", "unlogged"), default="sync"
    )
    parser.add_argument(
        "--effects",
        action="store_true",
        help="one effect row per event, inserted with the cursor move in one transaction",
    )
    parser.add_argument(
        "--bytes-only",
        action="store_true",
        help="the delivery ceiling: readers select seq and the data's bytes, decoding nothing",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run once; print the figures as JSON; return 1 if the check failed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.bytes_only and args.effects:
        parser.error("--bytes-only readers decode nothing, and --effects needs the decoded data")
    return report(asyncio.run(run(args)))


if __name__ == "__main__":
    sys.exit(main())
