"""trioflow in one file: publish events, fan them out to two durable consumers.

Run it twice: the second run publishes three more events, and each consumer
handles only those, resuming from its durable cursor in the store (by
default the SQLite file ``trioflow.db`` in the current directory; set
``TRIOFLOW_STORE`` to use another, for example ``memory://``).
"""

from __future__ import annotations

import logging

import trio

import trioflow

app = trioflow.App()  # $TRIOFLOW_STORE, else sqlite:///trioflow.db


@app.consumer("audit")
async def audit(event: trioflow.Event) -> None:
    """Sees every event, in order."""
    print(f"  audit   #{event.seq:<4} {event.type:<15} {event.data}")


@app.consumer("mailer", types={"order.created"})
async def mailer(event: trioflow.Event) -> None:
    """Sees only new orders, and takes its time: it never slows `audit` down."""
    await trio.sleep(0.05)
    print(f"  mailer  #{event.seq:<4} welcome mail for order {event.data['id']} ({event.key})")


async def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    async with trioflow.open_flow(app) as flow:
        order = flow.statistics().head // 3 + 1
        seq = await flow.publish("order.created", {"id": order}, key="customer-7")
        print(f"published order.created as #{seq}")
        seqs = await flow.publish_many(
            [("order.paid", {"id": order}), ("order.shipped", {"id": order})]
        )
        print(f"published order.paid and order.shipped as {seqs}")
        await flow.wait_idle()
        for name, stats in flow.statistics().consumers.items():
            print(f"{name}: cursor {stats.cursor}, lag {stats.lag}, handled {stats.processed}")


if __name__ == "__main__":
    trio.run(main)
