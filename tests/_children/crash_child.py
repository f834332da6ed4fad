"""A flow that a crash test SIGKILLs at random moments, then runs to completion.

Run as ``python crash_child.py URL LOGS TOTAL SEED PACE [--finish]``, where URL
is a store URL (``sqlite:///...``, ``postgresql://...?schema=...``). Three consumers append
one line per handled event (``"<seq>\\n"``) to ``LOGS/<consumer>.log``, with a
``restart`` line whenever this script starts. The script publishes events
carrying a running counter ``n`` until the store holds TOTAL of them,
continuing after a crash from the last counter in the store, and records every
publish that returned in ``LOGS/published.log`` (``"<seq> <n>\\n"``). It
prints ``ready`` once the flow is open.

Without ``--finish`` it then idles until killed; with it, it waits until every
consumer is idle and exits 0.
"""

from __future__ import annotations

import os
import random
import sys

import trio

import trioflow
from trioflow.stores import Store

#: Consumer name -> (commit_every or None for the App default, types or None).
CONSUMERS: dict[str, tuple[int | None, frozenset[str] | None]] = {
    "every": (1, None),
    "default": (None, None),
    "filtered": (7, frozenset({"t.a"})),
}
TYPES = ("t.a", "t.b", "t.c")


def open_log(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def add_consumer(app: trioflow.App, name: str, fd: int, rng: random.Random) -> None:
    commit_every, types = CONSUMERS[name]

    @app.consumer(name, commit_every=commit_every, types=types)
    async def handle(event: trioflow.Event) -> None:
        if rng.random() < 0.02:
            # Sometimes slow, so consumers lag behind publishing and replay.
            await trio.sleep(rng.uniform(0.0, 0.02))
        # One write on an O_APPEND descriptor: a SIGKILL cannot tear the line.
        os.write(fd, f"{event.seq}\n".encode())


async def next_counter(store: Store) -> int:
    """The counter after the last event in the store (the only publisher is us)."""
    head = await store.head()
    if head == 0:
        return 0
    (last,) = await store.read(head - 1, 1)
    return int(last.data["n"]) + 1


async def publish(
    flow: trioflow.Flow, total: int, rng: random.Random, pace: float, fd: int
) -> None:
    n = await next_counter(flow.app.store)
    while n < total:
        if rng.random() < 0.3:
            seqs = [await flow.publish(rng.choice(TYPES), {"n": n})]
        else:
            size = min(rng.randint(2, 40), total - n)
            seqs = await flow.publish_many([(rng.choice(TYPES), {"n": n + i}) for i in range(size)])
        # Recorded only once publish returned: these must be in the store.
        os.write(fd, "".join(f"{seq} {n + i}\n" for i, seq in enumerate(seqs)).encode())
        n += len(seqs)
        if pace:
            await trio.sleep(rng.uniform(0, 2 * pace))


async def main(url: str, logs: str, total: int, seed: int, pace: float, finish: bool) -> None:
    rng = random.Random(seed)
    # A short lease: a restarted child takes its consumers back soon after a kill.
    app = trioflow.App(store=url, lease_ttl=1.0)
    for name in CONSUMERS:
        fd = open_log(os.path.join(logs, f"{name}.log"))
        os.write(fd, b"restart\n")
        add_consumer(app, name, fd, random.Random(rng.random()))
    published = open_log(os.path.join(logs, "published.log"))
    async with trioflow.open_flow(app) as flow:
        print("ready", flush=True)
        await publish(flow, total, rng, 0.0 if finish else pace, published)
        if finish:
            with trio.move_on_after(60) as waiting:
                await flow.wait_idle()
            if waiting.cancelled_caught:
                sys.exit(f"crash_child: consumers never idle: {flow.statistics()}")
            print("idle", flush=True)
        else:
            # Killed by the test long before this; bounded in case it is not.
            await trio.sleep(120)
            sys.exit("crash_child: was never killed")


if __name__ == "__main__":
    url, logs, total, seed, pace = sys.argv[1:6]
    trio.run(main, url, logs, int(total), int(seed), float(pace), "--finish" in sys.argv[6:])
