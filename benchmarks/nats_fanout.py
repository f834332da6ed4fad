"""The NATS JetStream program that trioflow's fan-out is compared with (``--peer nats``).

Plain asyncio and nats-py (``asyncio.run``; no trio, no trioflow), doing with
a JetStream stream and durable pull consumers what trioflow's fan-out does.
The harness runs it in a subprocess, as it runs the hand-written asyncpg
program; it can also be run alone::

    python -m benchmarks.nats_fanout --events 100000
    python -m benchmarks.nats_fanout --probe

The server is the one $TRIOFLOW_BENCH_NATS_URL names (default
``nats://127.0.0.1:4222``), or ``--url``; it must have JetStream enabled. It
creates a stream under a new random name (``--name``), runs once, prints its
figures as one JSON object on stdout, and deletes the stream, also when it
gives up after ``--timeout``. Exit status 1 (with the reason on stderr) when
its correctness check fails.

What it does, all in one process on the default asyncio event loop:

- Set-up (not timed): a stream with file storage (``storage=file``, the
  default limits retention) on the subjects ``NAME.>``, and one durable pull
  consumer per reader (``reader-i``, deliver all, ``ack_policy=all``): each
  consumer has its own position in the stream, so every reader gets every
  event (fan-out, not work sharing). One connection for the writer and one
  for each reader.
- The writer: for each batch of ``--batch-size`` events, one
  ``publish_async`` per event on the subject ``NAME.bench.fanout`` with its
  data as compact JSON, then awaits the batch's publish acknowledgements
  (each says the server stored the message in the stream): the batch is
  durable in the stream's sense when the call returns, as a trioflow
  ``publish_many`` is committed (though not atomic: JetStream has no
  transaction). The stream's sequence number is the event's identity and
  order (trioflow's ``seq``).
- K readers, concurrently with the writer: ``fetch(--page-size)`` on their
  consumer; a reader level with the writer waits in a pull request until
  the next message arrives. For every message ``json.loads`` its data and
  ``await`` a no-op handler (it checks that the event follows the previous
  one). Every ``--commit-every`` events, and after the last, ``await`` a
  synchronous acknowledgement (``ack_sync``: the server confirms it) of the
  last message handled, which under ``ack_policy=all`` acknowledges every
  message before it too: the consumer's ack floor is its durable cursor,
  moved every C events as trioflow commits its cursor every C events (an
  ack per message would be a round trip per event, trioflow's
  ``commit_every=1``). It stops once it has handled event N.

Durability is the server's: JetStream acknowledges a publish once the
message is written to the stream's files, and flushes them to disk on its
own schedule (``sync_interval``, 2 minutes by default) unless configured to
sync always. ``--probe`` reports the server's version; the harness records
it with the results.

Figures: publish ev/s is N over the time from the first publish until the
last batch's acknowledgements arrived; delivered ev/s is K*N over the time
from the first publish until every reader's last acknowledgement was
confirmed. The check: every reader handled exactly events 1..N in order;
afterwards every consumer's ack floor is the stream's last message, with
nothing pending and nothing redelivered.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._data import EVENT_TYPE, Data, make_data
from ._gc import GCTimer
from ._peers import (
    CONNECT_TIMEOUT,
    PEERS,
    Outcome,
    Probe,
    Tally,
    figures,
    masked,
    order_problems,
    program_main,
    program_parser,
)

if TYPE_CHECKING:
    # The client is imported where used, so that this module (and its check)
    # imports without it; the ignore is for type checks where it is missing.
    from nats.aio.client import Client  # type: ignore[import-not-found, unused-ignore]
    from nats.js import JetStreamContext  # type: ignore[import-not-found, unused-ignore]

#: Seconds a reader level with the writer waits in one pull request before asking again.
FETCH_TIMEOUT = 1.0
#: Seconds the readers' consumers wait for an acknowledgement before redelivering:
#: longer than any run, since a redelivery would fail the order check.
ACK_WAIT = 3600.0

_dumps = json.JSONEncoder(separators=(",", ":")).encode
_loads = json.loads


async def _connect(url: str) -> Client:
    import nats  # type: ignore[import-not-found, unused-ignore]

    client: Client = await nats.connect(url, connect_timeout=CONNECT_TIMEOUT)
    return client


async def probe(url: str) -> Probe:
    """Connect once: can the benchmark run on ``url``, does it have JetStream, what version."""
    import nats  # type: ignore[import-not-found, unused-ignore]

    client_info = {"nats-py": importlib.metadata.version("nats-py")}
    failures: list[Exception] = []

    async def note(error: Exception) -> None:
        failures.append(error)

    try:
        # Two attempts, a tenth of a second apart, then give up: by default
        # nats-py keeps trying for minutes.
        client = await nats.connect(
            url,
            connect_timeout=CONNECT_TIMEOUT,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.1,
            error_cb=note,
        )
    except (nats.errors.Error, OSError, ValueError) as exc:
        reason = failures[-1] if failures else exc
        return Probe(
            problem=f"cannot connect to NATS at {masked(url)}: {reason}", client=client_info
        )
    try:
        version = client.connected_server_version
        server = {"nats_server": f"{version.major}.{version.minor}.{version.patch}"}
        try:
            await client.jetstream().account_info()
        except (nats.errors.Error, TimeoutError) as exc:
            return Probe(
                problem=f"NATS at {masked(url)} has no JetStream (nats-server -js): {exc!r}",
                server=server,
                client=client_info,
            )
    finally:
        await client.close()
    return Probe(problem=None, server=server, client=client_info)


async def write(
    js: JetStreamContext, subject: str, data: Sequence[Data], batch_size: int, *, deadline: float
) -> tuple[float, int]:
    """Publish ``data``, awaiting acks per batch; return perf_counter() after the last, its seq.

    Gives up before a batch once perf_counter() is past ``deadline``.
    """
    last = 0
    for start in range(0, len(data), batch_size):
        if time.perf_counter() >= deadline:
            break
        futures = [
            await js.publish_async(subject, _dumps(item).encode())
            for item in data[start : start + batch_size]
        ]
        acks = await asyncio.gather(*futures)
        last = acks[-1].seq
    return time.perf_counter(), last


async def read(
    js: JetStreamContext,
    stream: str,
    durable: str,
    tally: Tally,
    *,
    events: int,
    page_size: int,
    commit_every: int,
    deadline: float,
) -> float:
    """Fetch, decode, handle and ack up to event ``events``; return perf_counter() then.

    Gives up before a fetch once perf_counter() is past ``deadline``.
    """
    subscription = await js.pull_subscribe_bind(durable=durable, stream=stream)
    handle = tally.handle
    unacknowledged = 0
    last = None
    while tally.last < events and time.perf_counter() < deadline:
        try:
            messages = await subscription.fetch(page_size, timeout=FETCH_TIMEOUT)
        except TimeoutError:
            continue
        for last in messages:
            data = _loads(last.data)
            await handle(data["order"], data)
            unacknowledged += 1
            if unacknowledged >= commit_every:
                await last.ack_sync()
                unacknowledged = 0
    if unacknowledged and last is not None:
        await last.ack_sync()
    return time.perf_counter()


async def run(args: argparse.Namespace) -> Outcome:
    """Set up, run once, check, delete the stream; return the figures and any problems."""
    from nats.js.api import (  # type: ignore[import-not-found, unused-ignore]
        AckPolicy,
        ConsumerConfig,
        DeliverPolicy,
        StorageType,
        StreamConfig,
    )

    stream: str = args.name
    subject = f"{stream}.{EVENT_TYPE}"
    events: int = args.events
    readers: int = args.readers
    data = make_data(events)
    durables = [f"reader-{index}" for index in range(readers)]
    admin = await _connect(args.url)
    admin_js = admin.jetstream()
    try:
        await admin_js.add_stream(
            StreamConfig(name=stream, subjects=[f"{stream}.>"], storage=StorageType.FILE)
        )
        for durable in durables:
            await admin_js.add_consumer(
                stream,
                ConsumerConfig(
                    durable_name=durable,
                    deliver_policy=DeliverPolicy.ALL,
                    ack_policy=AckPolicy.ALL,
                    ack_wait=ACK_WAIT,
                    # The default (1,000) would stall a fetch of a full page
                    # while the previous page's last events await their ack.
                    max_ack_pending=-1,
                ),
            )
        writer = await _connect(args.url)
        # Room for a whole batch of publishes awaiting their acknowledgements.
        js = writer.jetstream(publish_async_max_pending=max(4000, args.batch_size))
        connections = [await _connect(args.url) for _ in durables]
        tallies = [Tally() for _ in durables]
        collecting = GCTimer()
        try:
            with collecting:
                started = time.perf_counter()
                # Each task checks the deadline itself, as the Redis program's
                # do, rather than relying on a cancellation reaching it.
                deadline = started + args.timeout
                async with asyncio.TaskGroup() as tasks:
                    writing = tasks.create_task(
                        write(js, subject, data, args.batch_size, deadline=deadline)
                    )
                    reading = [
                        tasks.create_task(
                            read(
                                connection.jetstream(),
                                stream,
                                durable,
                                tally,
                                events=events,
                                page_size=args.page_size,
                                commit_every=args.commit_every,
                                deadline=deadline,
                            )
                        )
                        for connection, durable, tally in zip(
                            connections, durables, tallies, strict=True
                        )
                    ]
        finally:
            for connection in [writer, *connections]:
                await connection.close()
        consumers = [await admin_js.consumer_info(stream, durable) for durable in durables]
    finally:
        try:
            await admin_js.delete_stream(stream)
        finally:
            await admin.close()
    published, last_seq = writing.result()
    delivered = max(task.result() for task in reading)
    problems = order_problems(tallies, events)
    if problems and delivered >= deadline:
        problems.insert(0, f"gave up after {args.timeout:g}s (--timeout)")
    problems += [
        f"reader {index}'s consumer has its ack floor at {info.ack_floor.stream_seq}, not "
        f"{last_seq}, with {info.num_ack_pending} pending and {info.num_redelivered} redelivered"
        for index, info in enumerate(consumers)
        if info.ack_floor.stream_seq != last_seq or info.num_ack_pending or info.num_redelivered
    ]
    return figures(
        events=events,
        readers=readers,
        started=started,
        published=published,
        delivered=delivered,
        gc_seconds=collecting.seconds,
        problems=problems,
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.nats_fanout``."""
    return program_parser(
        PEERS["nats"],
        "The NATS JetStream fan-out program (one run; JSON on stdout).",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Probe, or run once; print the outcome as JSON; return 1 if the check failed."""
    return program_main(argv, build_parser(), run=run, probe=probe)


if __name__ == "__main__":
    sys.exit(main())
