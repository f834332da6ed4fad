"""A process that only consumes events other processes publish.

Run as ``python consumer_child.py URL LOGS EXPECT``. Two consumers, ``plain``
and ``bounded`` (``buffer=64``: it detaches and catches up from the store when
behind), append ``"<seq> <pub> <n>\\n"`` per event to ``LOGS/<consumer>.log``.
It learns of the other processes' appends as the store URL says: by polling
(SQLite, ``?poll_interval=``), or through LISTEN/NOTIFY (PostgreSQL). Prints
``ready`` once the flow is open, and exits 0 once both have handled EXPECT
events.
"""

from __future__ import annotations

import os
import sys

import trio

import trioflow


async def main(url: str, logs: str, expect: int) -> None:
    # A short lease: a restarted child takes its consumers back soon after a kill.
    app = trioflow.App(store=url, lease_ttl=1.0)
    done = {name: trio.Event() for name in ("plain", "bounded")}

    def add_consumer(name: str, buffer: int | None) -> None:
        fd = os.open(
            os.path.join(logs, f"{name}.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644
        )
        handled = 0

        @app.consumer(name, buffer=buffer)
        async def handle(event: trioflow.Event) -> None:
            nonlocal handled
            if buffer is not None and event.seq % 97 == 0:
                # Fall behind now and then, past the buffer: catch up from the store.
                await trio.sleep(0.02)
            os.write(fd, f"{event.seq} {event.data['pub']} {event.data['n']}\n".encode())
            handled += 1
            if handled >= expect:
                done[name].set()

    add_consumer("plain", None)
    add_consumer("bounded", 64)
    async with trioflow.open_flow(app) as flow:
        print("ready", flush=True)
        with trio.move_on_after(50) as waiting:
            for event in done.values():
                await event.wait()
        if waiting.cancelled_caught:
            sys.exit(f"consumer_child: not all {expect} events handled: {flow.statistics()}")


if __name__ == "__main__":
    url, logs, expect = sys.argv[1:4]
    trio.run(main, url, logs, int(expect))
