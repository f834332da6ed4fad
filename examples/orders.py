"""An order service: orders written with their events, a projection applied exactly once.

Run it twice: ``python examples/orders.py``. It uses the embedded SQLite
store (``trioflow.db`` in the current directory, or ``$TRIOFLOW_STORE``).

* Placing an order inserts its row and publishes ``order.placed`` in one
  transaction: the event exists exactly when the row does.
* The ``totals`` consumer is transactional: its update of the customer's total
  and its cursor move commit together, so each order counts exactly once, even
  if the process is killed between any two steps.
"""

from __future__ import annotations

import trio

import trioflow

app = trioflow.App()


async def create_tables(tx: trioflow.Transaction) -> None:
    await tx.execute(
        "CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, customer TEXT, amount INTEGER)"
    )
    await tx.execute(
        "CREATE TABLE IF NOT EXISTS totals "
        "(customer TEXT PRIMARY KEY, total INTEGER, orders INTEGER)"
    )


@app.consumer("totals", transactional=True)
async def add_to_total(event: trioflow.Event, tx: trioflow.Transaction) -> None:
    order = event.data
    assert isinstance(order, dict)
    await create_tables(tx)
    await tx.execute(
        "INSERT INTO totals (customer, total, orders) VALUES (?, ?, 1) "
        "ON CONFLICT (customer) DO UPDATE SET total = total + excluded.total, "
        "orders = orders + 1",
        order["customer"],
        order["amount"],
    )


async def place_order(flow: trioflow.Flow, customer: str, amount: int) -> None:
    async with flow.transaction() as tx:
        await create_tables(tx)
        next_id = await tx.fetchval("SELECT coalesce(max(id), 0) + 1 FROM orders")
        await tx.execute(
            "INSERT INTO orders (id, customer, amount) VALUES (?, ?, ?)", next_id, customer, amount
        )
        tx.publish(
            "order.placed", {"id": next_id, "customer": customer, "amount": amount}, key=customer
        )


async def main() -> None:
    async with trioflow.open_flow(app) as flow:
        for customer, amount in [("ada", 30), ("bob", 12), ("ada", 8)]:
            await place_order(flow, customer, amount)
        await flow.wait_idle()
        async with flow.transaction() as tx:
            placed = await tx.fetchval("SELECT count(*) FROM orders")
            for row in await tx.fetch(
                "SELECT customer, total, orders FROM totals ORDER BY customer"
            ):
                print(f"{row['customer']}: total {row['total']} from {row['orders']} order(s)")
        print(f"orders placed: {placed}")


if __name__ == "__main__":
    trio.run(main)
