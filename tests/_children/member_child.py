"""One member of a scaled-out service, for the multi-process tests of leases and groups.

Run as ``python member_child.py URL LOG LEASE_TTL [PAUSE]``. The flow runs a plain
consumer, ``solo``, and a group, ``g`` (`PARTITIONS` partitions), both with
``commit_every`` `COMMIT_EVERY`, on a store wrapped to log its fenced writes;
each handler call sleeps PAUSE seconds (default 0.002).
It appends one JSON object per line to LOG, each written with a single
``os.write`` on an ``O_APPEND`` descriptor (so a SIGKILL can end the log but
never tear a line; every member's processes may share one file). Every line
has ``kind``, ``pid`` and ``t``, the time of ``time.monotonic_ns()``: the
clock every process of the host shares, so lines of different processes
compare. The kinds:

* ``start`` / ``end``: a handler call began / ended, with ``c`` (the
  consumer's key: ``solo`` or ``g/<partition>``), ``seq`` and ``key`` (the
  event's); ``end`` says ``ok`` (false: the call was cancelled);
* ``claim``: a lease claim returned; ``t0`` when it was sent, ``held`` the
  keys this flow holds with their fencing tokens;
* ``commit``: a cursor write returned; ``t0`` when it was sent, ``ok`` the
  keys written (``[key, token, cursor]``), ``refused`` those the store
  refused (``[key, token]``); ``failed`` (an error) when it raised;
* ``dead-letter``: the same for a dead letter (none are expected);
* ``warn``: a warning the ``trioflow`` logger emitted.

It prints ``ready`` once the flow is open. Then it reads commands on stdin:
``stats`` prints one JSON line, ``{"holder": ..., "owned": [keys]}``; ``stop``
(or the end of stdin) stops the flow gracefully and exits 0.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence

import trio

import trioflow
from trioflow._events import NewEvent
from trioflow._groups import partition_of
from trioflow.stores import Appended, Store, store_from_url
from trioflow.stores._base import StoreWrapper

PARTITIONS = 6
COMMIT_EVERY = 8


class Log:
    """The member's log: one JSON object per line, one ``os.write`` per line."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.pid = os.getpid()

    def write(self, kind: str, **fields: object) -> None:
        line = {"kind": kind, "pid": self.pid, "t": time.monotonic_ns(), **fields}
        os.write(self.fd, (json.dumps(line) + "\n").encode())


class LoggingStore(StoreWrapper):
    """Logs the outcome of every lease claim and every fenced write."""

    def __init__(self, inner: Store, log: Log) -> None:
        super().__init__(inner)
        self.log = log

    async def append(self, events: Sequence[NewEvent]) -> Appended:
        return await self.inner.append(events)

    async def read(
        self, after: int, limit: int, *, max_bytes: int | None = None
    ) -> Sequence[trioflow.Event]:
        return await self.inner.read(after, limit, max_bytes=max_bytes)

    async def head(self) -> int:
        return await self.inner.head()

    async def load_cursors(self) -> dict[str, int]:
        return await self.inner.load_cursors()

    async def wait_for_append(self, after: int) -> int:
        return await self.inner.wait_for_append(after)

    async def claim_leases(
        self, holder: str, keys: Sequence[str], ttl: float
    ) -> list[trioflow.Lease]:
        sent = time.monotonic_ns()
        leases = await self.inner.claim_leases(holder, keys, ttl)
        held = {lease.key: lease.token for lease in leases if lease.holder == holder}
        self.log.write("claim", t0=sent, held=held)
        return leases

    async def commit_cursors(
        self, cursors: Mapping[str, int], *, fences: Mapping[str, int] | None = None
    ) -> frozenset[str]:
        sent = time.monotonic_ns()
        tokens = dict(fences or {})
        try:
            refused = await self.inner.commit_cursors(cursors, fences=fences)
        except BaseException as exc:
            self.log.write("commit", t0=sent, failed=repr(exc), keys=sorted(cursors))
            raise
        self.log.write(
            "commit",
            t0=sent,
            ok=[[key, tokens.get(key), seq] for key, seq in cursors.items() if key not in refused],
            refused=[[key, tokens.get(key)] for key in sorted(refused)],
        )
        return refused

    async def record_dead_letter(
        self, letter: trioflow.DeadLetter, *, cursor: int | None, fence: int | None = None
    ) -> None:
        sent = time.monotonic_ns()
        outcome = "ok"
        try:
            await self.inner.record_dead_letter(letter, cursor=cursor, fence=fence)
        except trioflow.LeaseLostError:
            outcome = "refused"
            raise
        except BaseException as exc:
            outcome = repr(exc)
            raise
        finally:
            self.log.write(
                "dead-letter",
                t0=sent,
                c=letter.consumer,
                seq=letter.seq,
                token=fence,
                outcome=outcome,
            )


class WarningLog(logging.Handler):
    """Copies the ``trioflow`` logger's warnings (a lease lost, say) into the log."""

    def __init__(self, log: Log) -> None:
        super().__init__(logging.WARNING)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        self.log.write("warn", message=record.getMessage())


def add_consumers(app: trioflow.App, log: Log, pause: float) -> None:
    async def handle(event: trioflow.Event, consumer: str) -> None:
        log.write("start", c=consumer, seq=event.seq, key=event.key)
        ok = False
        try:
            await trio.sleep(pause)
            ok = True
        finally:
            log.write("end", c=consumer, seq=event.seq, key=event.key, ok=ok)

    @app.consumer("solo", commit_every=COMMIT_EVERY)
    async def solo(event: trioflow.Event) -> None:
        await handle(event, "solo")

    @app.consumer("g", partitions=PARTITIONS, commit_every=COMMIT_EVERY)
    async def group(event: trioflow.Event) -> None:
        partition = partition_of(event.key, event.seq, PARTITIONS)
        await handle(event, f"g/{partition}")


async def main(url: str, path: str, lease_ttl: float, pause: float) -> None:
    log = Log(path)
    logger = logging.getLogger("trioflow")
    logger.addHandler(WarningLog(log))
    app = trioflow.App(
        store=LoggingStore(store_from_url(url), log), lease_ttl=lease_ttl, commit_interval=0.2
    )
    add_consumers(app, log, pause)
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stdin, trioflow.open_flow(app) as flow:
        print("ready", flush=True)
        buffer = b""
        while True:
            while b"\n" not in buffer:
                chunk = await stdin.receive_some()
                if not chunk:
                    return
                buffer += chunk
            line, _, buffer = buffer.partition(b"\n")
            command = line.decode().strip()
            if command == "stop":
                return
            if command == "stats":
                stats = flow.statistics()
                owned = sorted(name for name, c in stats.consumers.items() if c.owned)
                print(json.dumps({"holder": stats.holder, "owned": owned}), flush=True)
            else:
                sys.exit(f"member_child: unknown command {command!r}")


if __name__ == "__main__":
    url, path, lease_ttl = sys.argv[1:4]
    pause = float(sys.argv[4]) if len(sys.argv) > 4 else 0.002
    trio.run(main, url, path, float(lease_ttl), pause)
