"""A flow stopped gracefully mid-stream, then run again to completion.

Run as ``python graceful_child.py DB LOGS TOTAL SEED stop|finish``. Three
consumers append ``"<seq>\\n"`` per handled event to ``LOGS/<consumer>.log``
(with a ``restart`` line when this script starts). The script publishes events
carrying a running counter ``n`` until the store holds TOTAL of them
(continuing from the last counter in the store).

``stop``: handlers take 50 ms per event; once the consumer ``every`` has
handled ``STOP_AFTER`` events, the body of ``open_flow`` is cancelled, so the
flow stops gracefully with handlers in flight and publishes maybe pending.
``finish``: handlers are instant; it waits until every consumer is idle.
Either way it prints the flow's statistics as JSON when the flow has stopped.
"""

from __future__ import annotations

import json
import os
import random
import sys
import urllib.parse

import attrs
import trio

import trioflow
from trioflow.stores import Store

#: Consumer name -> (commit_every, types or None).
CONSUMERS: dict[str, tuple[int, frozenset[str] | None]] = {
    "every": (1, None),
    "default": (100, None),
    "filtered": (7, frozenset({"t.a"})),
}
TYPES = ("t.a", "t.b", "t.c")
STOP_AFTER = 10
HANDLER_SECONDS = 0.05


async def next_counter(store: Store) -> int:
    """The counter after the last event in the store (the only publisher is us)."""
    head = await store.head()
    if head == 0:
        return 0
    (last,) = await store.read(head - 1, 1)
    return int(last.data["n"]) + 1


async def main(db: str, logs: str, total: int, seed: int, phase: str) -> None:
    rng = random.Random(seed)
    stopping = phase == "stop"
    body = trio.CancelScope()
    app = trioflow.App(store=f"sqlite:///{urllib.parse.quote(db)}")

    def add_consumer(name: str) -> None:
        commit_every, types = CONSUMERS[name]
        fd = os.open(
            os.path.join(logs, f"{name}.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644
        )
        os.write(fd, b"restart\n")
        handled = 0

        @app.consumer(name, commit_every=commit_every, types=types)
        async def handle(event: trioflow.Event) -> None:
            nonlocal handled
            if stopping:
                await trio.sleep(HANDLER_SECONDS)
            os.write(fd, f"{event.seq}\n".encode())
            handled += 1
            if stopping and name == "every" and handled == STOP_AFTER:
                body.cancel()

    for name in CONSUMERS:
        add_consumer(name)
    async with trioflow.open_flow(app) as flow:
        with body:
            n = await next_counter(app.store)
            while n < total:
                size = min(rng.randint(1, 8), total - n)
                seqs = await flow.publish_many(
                    [(rng.choice(TYPES), {"n": n + i}) for i in range(size)]
                )
                n += len(seqs)
                # Spread publishing out, so the stop may land while it goes on.
                await trio.sleep(0.005)
            with trio.move_on_after(50) as waiting:
                await flow.wait_idle()
            if waiting.cancelled_caught:
                sys.exit(f"graceful_child: consumers never idle: {flow.statistics()}")
        if stopping and not body.cancel_called:
            sys.exit("graceful_child: the consumer 'every' never reached STOP_AFTER events")
    stats = flow.statistics()
    print(json.dumps({name: attrs.asdict(c) for name, c in stats.consumers.items()}), flush=True)


if __name__ == "__main__":
    db, logs, total, seed, phase = sys.argv[1:6]
    if phase not in ("stop", "finish"):
        sys.exit(f"graceful_child: phase must be stop or finish, got {phase!r}")
    trio.run(main, db, logs, int(total), int(seed), phase)
