"""An App for the ``trioflow`` command to serve: it has no main of its own.

    trioflow run examples.served_app:app                  # Ctrl+C (or kill -TERM) stops
    trioflow run examples.served_app:app --store sqlite:///other.db

Its store is $TRIOFLOW_STORE, else sqlite:///trioflow.db (``--store``
overrides it). Whatever publishes to that store (another process, another
service) reaches its consumers:

- ``audit`` prints every event it handles, ``audit <seq> <type>``; an event
  with ``{"pause": seconds}`` keeps it busy that long (a slow handler, to see
  a graceful stop wait for it);
- ``billing``, a consumer group of 4 partitions by key, refuses an order
  with a negative amount: it becomes a dead letter (``trioflow dead-letters``).
"""

from __future__ import annotations

import trio

import trioflow

app = trioflow.App(commit_every=10, shutdown_grace=30)


@app.consumer("audit")
async def audit(event: trioflow.Event) -> None:
    print("audit", event.seq, event.type, flush=True)
    if isinstance(event.data, dict) and isinstance(event.data.get("pause"), int | float):
        await trio.sleep(event.data["pause"])


@app.consumer("billing", types={"order.paid"}, partitions=4, on_exhausted="dead-letter")
async def billing(event: trioflow.Event) -> None:
    amount = event.data["amount"] if isinstance(event.data, dict) else None
    if not isinstance(amount, int) or amount < 0:
        raise trioflow.Reject(f"not an amount: {amount!r}")
