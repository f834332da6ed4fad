"""Pruning a PostgreSQL event log: batched deletes against dropping range partitions.

``python -m benchmarks.prune --url postgresql://... [--events 300000 --prune 200000]``

A stand-alone measurement (not a `python -m benchmarks` workload). For each
method, on a schema of its own: fill the log with ``--events`` events of about
200 bytes, then measure a publisher (appends of 10 events, one at a time, as a
flow's group commits do) alone, and again while the oldest ``--prune`` events
are deleted:

* ``delete``: the store's own `PostgresStore.prune`, ``--batch`` events per
  transaction, then a plain ``VACUUM`` of the events table;
* ``partitions``: the events table made a table partitioned by range of
  seq (``--partition`` events per partition; the store's append function
  inserts into it unchanged, but the unique index on id must go, since a
  partitioned table's unique indexes must hold the partition key), and the
  old partitions dropped whole, one ``DROP TABLE`` per transaction.

With ``--reader S``, a read of the events table (a consumer's replay, a
report) is open for S seconds as the prune starts.

Reported: the publisher's appends per second and its median, 99th
percentile and worst append latency, alone and while pruning; how long the
prune took; how long `PostgresStore.seq_before` takes on the full log; the
events table's size (heap, indexes and TOAST, all
partitions) before, after the prune, after ``VACUUM``, and after appending
``--prune`` new events again (whether the freed space is reused).
"""

from __future__ import annotations

import argparse
import statistics
import uuid
from collections.abc import Awaitable, Callable, Sequence

import trio

from trioflow._events import encode, new_ids
from trioflow.stores import NewEvent
from trioflow.stores.postgres import PostgresStore

_PAD = "x" * 150


def _events(count: int) -> list[NewEvent]:
    ids = new_ids(count)
    return [encode("bench.event", {"n": n, "pad": _PAD}, None, ids[n]) for n in range(count)]


async def _fill(store: PostgresStore, count: int) -> None:
    for start in range(0, count, 5000):
        await store.append(_events(min(5000, count - start)))


async def _size(store: PostgresStore, schema: str) -> int:
    """Bytes of the events table, its indexes and TOAST, over every partition."""
    async with store.transaction() as tx:
        size: int = await tx.fetchval(
            # A table that is not partitioned has no partition tree.
            "SELECT coalesce((SELECT sum(pg_total_relation_size(relid)) "
            "FROM pg_partition_tree($1::regclass)), pg_total_relation_size($1::regclass))",
            f'"{schema}".events',
        )
    return size


async def _publish(store: PostgresStore, stop: trio.Event, took: list[float]) -> None:
    while not stop.is_set():
        start = trio.current_time()
        await store.append(_events(10))
        took.append(trio.current_time() - start)


async def _measure(
    store: PostgresStore, seconds: float | None, work: Callable[[], Awaitable[None]] | None
) -> tuple[list[float], float]:
    """Publisher latencies while ``work`` runs (or for ``seconds``); and the elapsed time."""
    took: list[float] = []
    stop = trio.Event()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_publish, store, stop, took)
        if work is None:
            assert seconds is not None
            await trio.sleep(seconds)
        else:
            await work()
        stop.set()
    return took, trio.current_time() - start


def _row(label: str, took: list[float], elapsed: float) -> str:
    ordered = sorted(took)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"{label:<28} {len(took) * 10 / elapsed:>10.0f} {statistics.median(took) * 1e3:>9.2f} "
        f"{p99 * 1e3:>8.2f} {max(took) * 1e3:>8.2f}"
    )


async def _time_seq_before(store: PostgresStore) -> list[float]:
    """How long `PostgresStore.seq_before` takes, for times spread over the log."""
    first, last = (await store.read(0, 1))[0], (await store.read(await store.head() - 1, 1))[0]
    span = last.created_at - first.created_at
    took = []
    for step in range(21):
        start = trio.current_time()
        await store.seq_before(first.created_at + span * step / 20)
        took.append(trio.current_time() - start)
    return took


async def _read(store: PostgresStore, schema: str, seconds: float) -> None:
    async with store.transaction() as tx:
        await tx.fetchval(f'SELECT count(*) FROM "{schema}".events')
        await tx.fetchval("SELECT pg_sleep($1)", seconds)


async def _partition(store: PostgresStore, schema: str, total: int, size: int) -> None:
    """Make the (empty) events table a table partitioned by range of seq."""
    q = f'"{schema}"'
    async with store.transaction() as tx:
        # The sequence numbering the events stays: it belonged to the table.
        await tx.execute(f"ALTER SEQUENCE {q}.events_seq OWNED BY NONE")
        await tx.execute(f"DROP TABLE {q}.events")
        await tx.execute(
            f"CREATE TABLE {q}.events (seq bigint NOT NULL, id uuid NOT NULL, type text NOT "
            "NULL, key text, data json NOT NULL, created_at timestamptz NOT NULL, "
            "PRIMARY KEY (seq)) PARTITION BY RANGE (seq)"
        )
        for low in range(1, total + 1, size):
            await tx.execute(
                f"CREATE TABLE {q}.events_{low} PARTITION OF {q}.events "
                f"FOR VALUES FROM ({low}) TO ({low + size})"
            )


async def _method(
    url: str, method: str, events: int, prune: int, batch: int, part: int, reader: float
) -> None:
    schema = f"tf_bench_prune_{uuid.uuid4().hex[:8]}"
    store = PostgresStore.from_url(f"{url}{'&' if '?' in url else '?'}schema={schema}")
    try:
        async with store.open():
            if method == "partitions":
                # Room for the fill, what the publisher adds, and the refill.
                await _partition(store, schema, 3 * (events + prune) + 200_000, part)
            await _fill(store, events)
            await store.commit_cursors({"reader": events})
            searches = await _time_seq_before(store)
            alone, alone_s = await _measure(store, 10.0, None)
            before = await _size(store, schema)

            async def delete() -> None:
                while await store.prune(prune, limit=batch):
                    pass

            async def drop() -> None:
                for low in range(1, prune + 1, part):
                    async with store.transaction() as tx:
                        await tx.execute(f'DROP TABLE "{schema}".events_{low}')

            prune_work = delete if method == "delete" else drop

            async def with_reader() -> None:
                # A consumer's replay, or a report: a read of the events table still
                # open when the prune starts.
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_read, store, schema, reader)
                    await trio.sleep(0.1)
                    await prune_work()

            during, during_s = await _measure(store, None, with_reader if reader else prune_work)
            pruned = await _size(store, schema)
            driver = store._require_open()
            vacuum_start = trio.current_time()
            await driver.execute(f'VACUUM "{schema}".events')
            vacuum_s = trio.current_time() - vacuum_start
            vacuumed = await _size(store, schema)
            await _fill(store, prune)
            refilled = await _size(store, schema)
            also = f", a reader open {reader:g} s as it starts" if reader else ""
            print(f"\n{method}: {events} events, {prune} pruned{also}")
            print(
                f"{'publisher':<28} {'events/s':>10} {'median ms':>9} {'p99 ms':>8} {'max ms':>8}"
            )
            print(_row("alone (10 s)", alone, alone_s))
            print(_row(f"while pruning ({during_s:.1f} s)", during, during_s))
            print(f"prune took {during_s:.2f} s; VACUUM took {vacuum_s:.2f} s")
            print(
                f"seq_before on {events} events: median {statistics.median(searches) * 1e3:.2f} "
                f"ms, max {max(searches) * 1e3:.2f} ms ({len(searches)} calls)"
            )
            mib = 1024 * 1024
            print(
                f"size MiB: before {before / mib:.1f}, after prune {pruned / mib:.1f}, after "
                f"VACUUM {vacuumed / mib:.1f}, after {prune} new events {refilled / mib:.1f}"
            )
            await driver.execute(f'DROP SCHEMA "{schema}" CASCADE')
    except BaseException:
        print(f"(schema {schema} may be left behind)")
        raise


async def _main(
    url: str, methods: Sequence[str], events: int, prune: int, batch: int, part: int, reader: float
) -> None:
    for method in methods:
        await _method(url, method, events, prune, batch, part, reader)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="a postgresql:// URL (no schema option)")
    parser.add_argument("--methods", default="delete,partitions")
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--prune", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1000, help="events per delete transaction")
    parser.add_argument("--partition", type=int, default=50_000, help="events per partition")
    parser.add_argument(
        "--reader", type=float, default=0.0, help="seconds a read of the events stays open"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    methods = args.methods.split(",")
    trio.run(
        _main, args.url, methods, args.events, args.prune, args.batch, args.partition, args.reader
    )


if __name__ == "__main__":
    main()
