"""A flow of batch consumers that a crash test SIGKILLs at random moments, then runs to completion.

Run as ``python batch_crash_child.py URL LOGS TOTAL SEED PACE [--finish]``,
where URL is a store URL (``sqlite:///...``, ``postgresql://...?schema=...``).
Its batch consumers (`BATCH_CONSUMERS`: several batch sizes, ``commit_every``
1 and more, a type filter, a bounded buffer) append one line per handler call
to ``LOGS/<consumer>.log``: the seqs of the events the call did, separated by
spaces (for a call that raised `trioflow.BatchError`, those before its index;
a line only if there are some), written in the middle of the call, before it
returns. The test writes a ``restart`` line to each log before it starts this
script. The consumer ``failing`` raises `trioflow.BatchError` at a random
index of some batches, and is retried (never given up on). The script
publishes as ``crash_child.py`` does (`crash_child.publish`, recorded in
``LOGS/published.log``), prints ``ready`` once the flow is open and, without
``--finish``, idles until killed; with it, it waits until every consumer is
idle, prints ``idle`` and exits 0.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Sequence

import trio

import trioflow
from tests._children.crash_child import idle_or_killed, open_log, publish

#: Consumer name -> (batch, its other options: commit_every always).
BATCH_CONSUMERS: dict[str, tuple[int, trioflow.ConsumerOptions]] = {
    "small": (3, {"commit_every": 1}),
    "large": (40, {"commit_every": 4}),
    "filtered": (7, {"commit_every": 2, "types": frozenset({"t.a"})}),
    "bounded": (10, {"commit_every": 3, "buffer": 16}),
    "failing": (8, {"commit_every": 2, "retry": trioflow.Retry(initial=0.001, maximum=0.005)}),
}
#: The probability that ``failing`` raises `trioflow.BatchError` on a call.
FAILURE_RATE = 0.15


async def pause(rng: random.Random) -> None:
    """None at all half the time, else up to 3 ms, now and then up to 30 ms."""
    draw = rng.random()
    if draw < 0.5:
        await trio.lowlevel.checkpoint()
    else:
        await trio.sleep(rng.uniform(0.0, 0.03 if draw > 0.97 else 0.003))


def add_batch_consumer(app: trioflow.App, name: str, fd: int, rng: random.Random) -> None:
    size, options = BATCH_CONSUMERS[name]

    @app.consumer(name, batch=size, **options)
    async def handle(events: Sequence[trioflow.Event]) -> None:
        # Now fast (batches done quicker than a cursor is stored), now busy, sometimes
        # slow (consumers lag behind publishing, fill batches and replay). A kill falls
        # before a batch is done (its cursor must not have moved) or after, before it
        # returns (the batch is past its cursor).
        await pause(rng)
        done = len(events)
        if name == "failing" and rng.random() < FAILURE_RATE:
            done = rng.randrange(len(events))
        if done:
            # One write on an O_APPEND descriptor: a SIGKILL cannot tear the line.
            os.write(fd, (" ".join(str(event.seq) for event in events[:done]) + "\n").encode())
        await pause(rng)
        if done < len(events):
            raise trioflow.BatchError(done, RuntimeError(f"failed at seq {events[done].seq}"))


async def main(url: str, logs: str, total: int, seed: int, pace: float, finish: bool) -> None:
    rng = random.Random(seed)
    # A short lease: a restarted child takes its consumers back soon after a kill,
    # so that most kills fall among batches, not before the first.
    app = trioflow.App(store=url, lease_ttl=0.5)
    for name in BATCH_CONSUMERS:
        fd = open_log(os.path.join(logs, f"{name}.log"))
        add_batch_consumer(app, name, fd, random.Random(rng.random()))
    published = open_log(os.path.join(logs, "published.log"))
    async with trioflow.open_flow(app) as flow:
        print("ready", flush=True)
        await publish(flow, total, rng, 0.0 if finish else pace, published, False)
        await idle_or_killed(flow, finish, "batch_crash_child")


if __name__ == "__main__":
    url, logs, total, seed, pace = sys.argv[1:6]
    trio.run(main, url, logs, int(total), int(seed), float(pace), "--finish" in sys.argv[6:])
