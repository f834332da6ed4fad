"""The Redis Streams program that trioflow's fan-out is compared with (``--peer redis``).

Plain asyncio and redis-py's asyncio client (``asyncio.run``; no trio, no
trioflow), doing with Redis Streams and consumer groups what trioflow's
fan-out does. The harness runs it in a subprocess, as it runs the
hand-written asyncpg program; it can also be run alone::

    python -m benchmarks.redis_fanout --events 100000
    python -m benchmarks.redis_fanout --probe

The server is the one $TRIOFLOW_BENCH_REDIS_URL names (default
``redis://127.0.0.1:6379/0``), or ``--url``. It creates a stream under a new
random key (``--name``), runs once, prints its figures as one JSON object on
stdout, and deletes the key, also when it gives up after ``--timeout``.
Exit status 1 (with the reason on stderr) when its correctness check fails.

What it does, all in one process on the default asyncio event loop:

- Set-up (not timed): one consumer group per reader (``XGROUP CREATE ...
  0 MKSTREAM``): each group has its own position in the stream, so every
  reader gets every event (fan-out, not work sharing). One client, with its
  own connection, for the writer and for each reader.
- The writer: for each batch of ``--batch-size`` events, one pipeline of
  ``XADD key * type T data JSON`` (compact ``json.dumps``), sent as one
  MULTI/EXEC transaction: one round trip, all of the batch or none, as a
  trioflow ``publish_many`` or the asyncpg program's COPY. The entry id
  Redis gives is the event's identity and order (trioflow's ``seq``).
- K readers, concurrently with the writer: ``XREADGROUP GROUP reader-i
  reader COUNT --page-size BLOCK 1000 STREAMS key >``; a reader level with
  the writer blocks in Redis until the next batch arrives. For every entry
  ``json.loads`` its data and ``await`` a no-op handler (it checks that the
  event follows the previous one). Every ``--commit-every`` events, and
  after the last, ``await`` one ``XACK`` of the entries handled since the
  previous one: the closest analogue of trioflow's cursor commit every C
  events, since after a crash a group redelivers exactly its unacknowledged
  entries (at most C handled ones, as trioflow redelivers at most C). It
  stops once it has handled event N.

Durability is the server's: Redis acknowledges an XADD or XACK once it is in
memory, and writes it to disk only with ``appendonly yes`` (``appendfsync
always`` to wait for the disk). ``--probe`` reports those settings; the
harness records them with the results.

Figures: publish ev/s is N over the time from the first XADD until the last
EXEC returned; delivered ev/s is K*N over the time from the first XADD until
every reader's last XACK returned. The check: every reader handled exactly
events 1..N in order; afterwards every group has no entry pending and has
delivered up to the last entry.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

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
    from redis.asyncio import Redis  # type: ignore[import-not-found, unused-ignore]

#: Milliseconds a reader level with the writer blocks in XREADGROUP before asking again.
BLOCK_MS = 1000

_dumps = json.JSONEncoder(separators=(",", ":")).encode
_loads = json.loads


def _client(url: str) -> Redis:
    import redis.asyncio  # type: ignore[import-not-found, unused-ignore]

    client: Redis = redis.asyncio.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT)
    return client


async def probe(url: str) -> Probe:
    """Connect once: can the benchmark run on ``url``, and what server is it."""
    import redis  # type: ignore[import-not-found, unused-ignore]
    import redis.utils  # type: ignore[import-not-found, unused-ignore]

    client_info = {
        "redis": importlib.metadata.version("redis"),
        "hiredis": bool(redis.utils.HIREDIS_AVAILABLE),
    }
    try:
        client = _client(url)
    except ValueError as exc:
        return Probe(problem=f"not a Redis URL: {masked(url)}: {exc}", client=client_info)
    try:
        server: dict[str, Any] = await client.info("server")
        persistence: dict[str, Any] = await client.info("persistence")
        try:
            config: dict[Any, Any] = await client.config_get("appendfsync")
        except redis.exceptions.ResponseError:
            # Managed servers may forbid CONFIG; the figures stand without it.
            config = {}
    except (redis.exceptions.RedisError, OSError) as exc:
        return Probe(problem=f"cannot connect to Redis at {masked(url)}: {exc}", client=client_info)
    finally:
        await client.aclose()
    version = str(server.get("redis_version", "0"))
    found = {
        "redis_version": version,
        "aof_enabled": bool(persistence.get("aof_enabled")),
        "appendfsync": config.get("appendfsync"),
    }
    if int(version.split(".")[0]) < 5:
        return Probe(
            problem=f"Redis {version} at {masked(url)} has no consumer groups (5.0 or newer)",
            server=found,
            client=client_info,
        )
    return Probe(problem=None, server=found, client=client_info)


async def write(
    client: Redis, key: str, data: Sequence[Data], batch_size: int, *, deadline: float
) -> tuple[float, bytes]:
    """XADD ``data`` in MULTI/EXEC batches; return perf_counter() after the last, and its id.

    Gives up before a batch once perf_counter() is past ``deadline``.
    """
    last = b""
    for start in range(0, len(data), batch_size):
        if time.perf_counter() >= deadline:
            break
        async with client.pipeline(transaction=True) as pipe:
            for item in data[start : start + batch_size]:
                pipe.xadd(key, {"type": EVENT_TYPE, "data": _dumps(item)})
            ids: list[bytes] = await pipe.execute()
        last = ids[-1]
    return time.perf_counter(), last


async def read(
    client: Redis,
    key: str,
    group: str,
    tally: Tally,
    *,
    events: int,
    page_size: int,
    commit_every: int,
    deadline: float,
) -> float:
    """Read, decode, handle and XACK up to event ``events``; return perf_counter() then.

    Gives up before a read once perf_counter() is past ``deadline``.
    """
    handle = tally.handle
    streams: dict[Any, Any] = {key: ">"}
    unacknowledged: list[bytes] = []
    while tally.last < events and time.perf_counter() < deadline:
        response: Any = await client.xreadgroup(
            group, "reader", streams, count=page_size, block=BLOCK_MS
        )
        if not response:
            continue
        for entry_id, fields in response[0][1]:
            data = _loads(fields[b"data"])
            await handle(data["order"], data)
            unacknowledged.append(entry_id)
            if len(unacknowledged) >= commit_every:
                await client.xack(key, group, *unacknowledged)
                unacknowledged = []
    if unacknowledged:
        await client.xack(key, group, *unacknowledged)
    return time.perf_counter()


async def run(args: argparse.Namespace) -> Outcome:
    """Set up, run once, check, delete the stream; return the figures and any problems."""
    key: str = args.name
    events: int = args.events
    readers: int = args.readers
    data = make_data(events)
    groups = [f"reader-{index}" for index in range(readers)]
    admin = _client(args.url)
    try:
        for group in groups:
            await admin.xgroup_create(key, group, id="0", mkstream=True)
        writer = _client(args.url)
        clients = [_client(args.url) for _ in groups]
        tallies = [Tally() for _ in groups]
        collecting = GCTimer()
        try:
            with collecting:
                started = time.perf_counter()
                # Each task checks the deadline itself: redis-py may swallow a
                # cancellation during a blocking read, so none is relied on.
                deadline = started + args.timeout
                async with asyncio.TaskGroup() as tasks:
                    writing = tasks.create_task(
                        write(writer, key, data, args.batch_size, deadline=deadline)
                    )
                    reading = [
                        tasks.create_task(
                            read(
                                client,
                                key,
                                group,
                                tally,
                                events=events,
                                page_size=args.page_size,
                                commit_every=args.commit_every,
                                deadline=deadline,
                            )
                        )
                        for client, group, tally in zip(clients, groups, tallies, strict=True)
                    ]
        finally:
            for client in [writer, *clients]:
                await client.aclose()
        group_info: list[dict[str, Any]] = await admin.xinfo_groups(key)
    finally:
        try:
            await admin.delete(key)
        finally:
            await admin.aclose()
    published, last_id = writing.result()
    delivered = max(task.result() for task in reading)
    problems = order_problems(tallies, events)
    if problems and delivered >= deadline:
        problems.insert(0, f"gave up after {args.timeout:g}s (--timeout)")
    by_name = {info["name"].decode(): info for info in group_info}
    for index, group in enumerate(groups):
        info = by_name.get(group, {})
        if info.get("pending") != 0 or info.get("last-delivered-id") != last_id:
            problems.append(
                f"reader {index}'s group has {info.get('pending')} entries pending and "
                f"delivered up to {info.get('last-delivered-id')!r}, not {last_id!r}"
            )
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
    """The command line of ``python -m benchmarks.redis_fanout``."""
    return program_parser(
        PEERS["redis"],
        "The Redis Streams fan-out program (one run; JSON on stdout).",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Probe, or run once; print the outcome as JSON; return 1 if the check failed."""
    return program_main(argv, build_parser(), run=run, probe=probe)


if __name__ == "__main__":
    sys.exit(main())
