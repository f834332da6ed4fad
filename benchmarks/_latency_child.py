"""The consumers' process of the latency workload's cross-process cases.

`benchmarks.latency` runs it from the repository root while it publishes::

    python -m benchmarks._latency_child --consumers 4 --events 5000 --out samples.json

It opens the store named by $TRIOFLOW_BENCH_LATENCY_STORE_URL (the
parent's store, already created), runs K consumers (``consumer-0`` ...)
whose no-op handlers note each event's latency (`LatencyTally`), and prints
``ready`` on stdout once they have started. When every consumer has handled
N events it waits for their cursors to be committed, leaves the flow, and
writes `child_report` (each consumer's count, last seq, out-of-order count
and latency samples in nanoseconds, and the committed cursors) to
``--out``; the parent checks them. Exit status 0 once written; it fails
(status 1) if ``--timeout`` passes first.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

import trioflow
from trioflow.stores import store_from_url

from ._gc import GCTimer
from ._harness import positive_float, positive_int
from ._stages import TimedStore
from .latency import READY, STORE_URL_VARIABLE, LatencyTally, child_report, steady


class _Counted(LatencyTally):
    """A `LatencyTally` that calls ``done()`` once it has handled ``events`` events."""

    __slots__ = ("done", "events")

    def __init__(self, events: int, done: Callable[[], None]) -> None:
        super().__init__()
        self.events = events
        self.done = done

    async def handle(self, event: trioflow.Event) -> None:
        """Note, count and check ``event``; say so when it was the last one expected."""
        await super().handle(event)
        if self.count == self.events:
            self.done()


async def consume(
    url: str,
    *,
    consumers: int,
    events: int,
    poll_interval: float | None,
    timed: TimedStore | None = None,
    gc_freeze: bool = False,
) -> tuple[list[LatencyTally], dict[str, int]]:
    """Run ``consumers`` consumers on ``url`` (or ``timed``, its store timed) until each
    handled ``events`` events; with ``gc_freeze``, freeze the collector once the flow
    has opened (`steady`, which collects garbage once first).

    Returns their tallies and their committed cursors.
    """
    finished = trio.Event()
    remaining = consumers

    def done() -> None:
        nonlocal remaining
        remaining -= 1
        if not remaining:
            finished.set()

    tallies = [_Counted(events, done) for _ in range(consumers)]
    app = trioflow.App(timed or url, poll_interval=poll_interval, shutdown_grace=1.0)
    for index, tally in enumerate(tallies):
        app.consumer(f"consumer-{index}")(tally.handle)
    async with trioflow.open_flow(app) as flow:
        with steady(gc_freeze):
            print(READY, flush=True)
            await finished.wait()
            await flow.wait_idle()
        cursors = {name: c.cursor for name, c in flow.statistics().consumers.items()}
    return list(tallies), cursors


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks._latency_child``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks._latency_child",
        description=f"Consume N events on ${STORE_URL_VARIABLE}, noting their latency.",
    )
    parser.add_argument("--consumers", type=positive_int, required=True, metavar="K")
    parser.add_argument("--events", type=positive_int, required=True, metavar="N")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE")
    parser.add_argument("--timeout", type=positive_float, default=600.0, metavar="SECONDS")
    parser.add_argument("--poll-interval", type=positive_float, metavar="SECONDS")
    parser.add_argument(
        "--stages",
        action="store_true",
        help="time the store's reads and notifications and the collector's pauses",
    )
    parser.add_argument(
        "--gc-freeze", action="store_true", help="gc.freeze() once the flow has opened"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Consume, then write the report to ``--out``; return the exit status."""
    args = build_parser().parse_args(argv)
    url = os.environ[STORE_URL_VARIABLE]
    timed = TimedStore(store_from_url(url)) if args.stages else None

    async def run() -> tuple[list[LatencyTally], dict[str, int]]:
        # The parent kills this process when its run times out; this bound
        # covers a parent that died without doing so.
        with trio.fail_after(args.timeout):
            return await consume(
                url,
                consumers=args.consumers,
                events=args.events,
                poll_interval=args.poll_interval,
                timed=timed,
                gc_freeze=args.gc_freeze,
            )

    with GCTimer(keep_pauses=True) as collecting:
        tallies, cursors = trio.run(run)
    stages = None
    if timed is not None:
        stages = {"reads": timed.reads, "wakes": timed.wakes, "pauses": collecting.pauses}
    args.out.write_text(child_report(tallies, cursors, stages), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
