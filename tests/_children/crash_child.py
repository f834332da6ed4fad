"""A flow that a crash test SIGKILLs at random moments, then runs to completion.

Run as ``python crash_child.py URL LOGS TOTAL SEED PACE [--finish] [--poison]``,
where URL is a store URL (``sqlite:///...``, ``postgresql://...?schema=...``).
Three consumers (`CONSUMERS`) append one line per handled event
(``"<seq>\\n"``) to ``LOGS/<consumer>.log``, with a ``restart`` line whenever
this script starts. The script publishes events carrying a running counter
``n`` until the store holds TOTAL of them, continuing after a crash from the
last counter in the store, and records every publish that returned in
``LOGS/published.log`` (``"<seq> <n>\\n"``). It prints ``ready`` once the
flow is open.

Without ``--finish`` it then idles until killed; with it, it waits until every
consumer is idle and exits 0.

With ``--poison`` the events carry ``"poison"`` too, true for some counters
(`poisoned`), and two other consumers (`POISON_CONSUMERS`) run instead: their
handlers fail on every attempt at a poison event, so that each one becomes a
dead letter, and log the other events as above.
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
#: With --poison, the consumers instead: name -> commit_every. Each gives up
#: on a poison event after two attempts, as a dead letter.
POISON_CONSUMERS = {"each": 1, "batched": 10}
TYPES = ("t.a", "t.b", "t.c")


def open_log(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def poisoned(n: int) -> bool:
    """Whether the event with counter ``n`` is poison: one in 13, now and then three in a row."""
    return n % 13 == 5 or n % 100 in (60, 61, 62)


def consumer_options(name: str, poison: bool) -> trioflow.ConsumerOptions:
    if poison:
        return {
            "commit_every": POISON_CONSUMERS[name],
            "retry": trioflow.Retry(attempts=2, initial=0.01, maximum=0.01),
            "on_exhausted": "dead-letter",
        }
    commit_every, types = CONSUMERS[name]
    return {"commit_every": commit_every, "types": types}


def add_consumer(
    app: trioflow.App, name: str, fd: int, rng: random.Random, options: trioflow.ConsumerOptions
) -> None:
    @app.consumer(name, **options)
    async def handle(event: trioflow.Event) -> None:
        if rng.random() < 0.02:
            # Sometimes slow, so consumers lag behind publishing and replay.
            await trio.sleep(rng.uniform(0.0, 0.02))
        if event.data.get("poison"):
            raise RuntimeError(f"poison event n={event.data['n']}")
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
    flow: trioflow.Flow, total: int, rng: random.Random, pace: float, fd: int, poison: bool
) -> None:
    def data(n: int) -> dict[str, object]:
        return {"n": n, "poison": poisoned(n)} if poison else {"n": n}

    n = await next_counter(flow.app.store)
    while n < total:
        if rng.random() < 0.3:
            seqs = [await flow.publish(rng.choice(TYPES), data(n))]
        else:
            size = min(rng.randint(2, 40), total - n)
            seqs = await flow.publish_many([(rng.choice(TYPES), data(n + i)) for i in range(size)])
        # Recorded only once publish returned: these must be in the store.
        os.write(fd, "".join(f"{seq} {n + i}\n" for i, seq in enumerate(seqs)).encode())
        n += len(seqs)
        if pace:
            await trio.sleep(rng.uniform(0, 2 * pace))


async def main(
    url: str, logs: str, total: int, seed: int, pace: float, finish: bool, poison: bool
) -> None:
    rng = random.Random(seed)
    # A short lease: a restarted child takes its consumers back soon after a kill.
    app = trioflow.App(store=url, lease_ttl=1.0)
    for name in POISON_CONSUMERS if poison else CONSUMERS:
        fd = open_log(os.path.join(logs, f"{name}.log"))
        os.write(fd, b"restart\n")
        add_consumer(app, name, fd, random.Random(rng.random()), consumer_options(name, poison))
    published = open_log(os.path.join(logs, "published.log"))
    async with trioflow.open_flow(app) as flow:
        print("ready", flush=True)
        await publish(flow, total, rng, 0.0 if finish else pace, published, poison)
        await idle_or_killed(flow, finish, "crash_child")


async def idle_or_killed(flow: trioflow.Flow, finish: bool, child: str) -> None:
    """With ``finish`` wait until every consumer is idle and print ``idle``; without
    it wait to be killed. Exit non-zero (naming ``child``) if that never happens."""
    if finish:
        with trio.move_on_after(60) as waiting:
            await flow.wait_idle()
        if waiting.cancelled_caught:
            sys.exit(f"{child}: consumers never idle: {flow.statistics()}")
        print("idle", flush=True)
    else:
        # Killed by the test long before this; bounded in case it is not.
        await trio.sleep(120)
        sys.exit(f"{child}: was never killed")


if __name__ == "__main__":
    url, logs, total, seed, pace = sys.argv[1:6]
    flags = sys.argv[6:]
    trio.run(
        main,
        url,
        logs,
        int(total),
        int(seed),
        float(pace),
        "--finish" in flags,
        "--poison" in flags,
    )
