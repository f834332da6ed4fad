"""A member process of the failover and groups workloads: one flow running one consumer.

`benchmarks._members` starts it from the repository root::

    python -m benchmarks._member_child --consumer NAME --log FILE [--partitions P]
        [--lease-ttl T] [--handler-ms MS] [--gated]

It opens the store named by $TRIOFLOW_BENCH_MEMBER_STORE_URL (already
created by the parent) and runs one consumer, a group of P partitions with
``--partitions``, with ``App(lease_ttl=T)``: it competes for the consumer's
leases with the other members, as any replica of a service would. Its
handler waits for the gate (open from the start unless ``--gated``), sleeps
MS milliseconds if asked, then appends ``"<seq> <key or -> <monotonic_ns>"``
to ``--log`` with one ``os.write`` on an ``O_APPEND`` descriptor: a SIGKILL
can end the log but never tear a line.

It says on stdout, one line each:

``owns NAMES``
    whenever what it owns changes (and once started): the comma-separated
    consumer names (``g/0,g/5`` for partitions), empty when it stands by;
``handling``
    after its first handled event;
``done NS``
    once it finished (``go`` or ``finish`` below), with the monotonic_ns
    time at which ``flow.wait_idle()`` returned: every cursor at the head.

It reads commands on stdin, one a line:

``go N``
    open the gate; once it has handled N events, wait until every cursor
    of the consumer is at the head and say ``done``;
``finish``
    wait until every cursor is at the head, say ``done``, and stop;
``stop``, or the end of its input
    stop at once, gracefully: the flow releases its leases.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

import trioflow

from ._harness import positive_float, positive_int
from .latency import now_ns

#: The environment variable giving a member its store URL (not its command
#: line, where a password in the URL would show).
STORE_URL_VARIABLE = "TRIOFLOW_BENCH_MEMBER_STORE_URL"
#: How often a member looks at what it owns, to say so.
OWNERSHIP_CHECK = 0.01


def _say(line: str) -> None:
    print(line, flush=True)


class _Lines:
    """The lines of a stream, one at a time."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def next(self) -> str | None:
        """The next line, stripped; None at the end of the stream."""
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some()
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode().strip()


async def member(
    url: str,
    *,
    consumer: str,
    log: Path,
    partitions: int | None,
    lease_ttl: float,
    handler_seconds: float,
    gated: bool,
) -> None:
    """Run the member until told to stop (see the module's docstring)."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    gate = trio.Event()
    if not gated:
        gate.set()
    first = trio.Event()
    enough = trio.Event()
    handled = 0
    expected = math.inf

    async def handle(event: trioflow.Event) -> None:
        nonlocal handled
        await gate.wait()
        if handler_seconds:
            await trio.sleep(handler_seconds)
        os.write(fd, f"{event.seq} {event.key or '-'} {now_ns()}\n".encode())
        handled += 1
        first.set()
        if handled >= expected:
            enough.set()

    async def say_handling() -> None:
        await first.wait()
        _say("handling")

    async def say_owned(flow: trioflow.Flow) -> None:
        said: list[str] | None = None
        while True:
            consumers = flow.statistics().consumers
            owned = sorted((n for n, c in consumers.items() if c.owned), key=_natural)
            if owned != said:
                _say(f"owns {','.join(owned)}")
                said = owned
            await trio.sleep(OWNERSHIP_CHECK)

    async def finish(flow: trioflow.Flow) -> None:
        await enough.wait()
        await flow.wait_idle()
        _say(f"done {now_ns()}")

    app = trioflow.App(url, lease_ttl=lease_ttl, shutdown_grace=1.0)
    app.consumer(consumer, partitions=partitions)(handle)
    commands = _Lines(trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())))
    async with trioflow.open_flow(app) as flow, trio.open_nursery() as nursery:
        nursery.start_soon(say_owned, flow)
        nursery.start_soon(say_handling)
        while (command := await commands.next()) is not None:
            word, _, argument = command.partition(" ")
            if word == "go":
                expected = int(argument)
                if handled >= expected:
                    enough.set()
                gate.set()
                nursery.start_soon(finish, flow)
            elif word == "finish":
                enough.set()
                await finish(flow)
                break
            elif word == "stop":
                break
            else:
                raise ValueError(f"unknown command {command!r}")
        nursery.cancel_scope.cancel()
    os.close(fd)


def _natural(name: str) -> tuple[str, int]:
    # g/2 before g/10.
    base, _, partition = name.rpartition("/")
    return (base, int(partition)) if partition.isdigit() else (name, -1)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks._member_child``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks._member_child",
        description=f"Run one consumer on ${STORE_URL_VARIABLE}, as one member of several.",
    )
    parser.add_argument("--consumer", required=True, metavar="NAME")
    parser.add_argument("--log", type=Path, required=True, metavar="FILE")
    parser.add_argument("--partitions", type=positive_int, metavar="P")
    parser.add_argument("--lease-ttl", type=positive_float, default=6.0, metavar="SECONDS")
    parser.add_argument("--handler-ms", type=float, default=0.0, metavar="MS")
    parser.add_argument("--gated", action="store_true")
    parser.add_argument("--timeout", type=positive_float, default=600.0, metavar="SECONDS")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the member; return the exit status."""
    args = build_parser().parse_args(argv)

    async def run() -> None:
        # The parent kills this process when its run times out; this bound
        # covers a parent that died without doing so.
        with trio.fail_after(args.timeout):
            await member(
                os.environ[STORE_URL_VARIABLE],
                consumer=args.consumer,
                log=args.log,
                partitions=args.partitions,
                lease_ttl=args.lease_ttl,
                handler_seconds=args.handler_ms / 1000,
                gated=args.gated,
            )

    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
