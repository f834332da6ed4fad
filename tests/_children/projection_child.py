"""A flow with a transactional projection and an outbox, SIGKILLed at random by a test.

Run as ``python projection_child.py URL LOGS COMMIT_EVERY SEED PACE [--finish]
[--tables=PREFIX]``, where URL is a store URL (``sqlite:///...``,
``postgresql://...?schema=...``) and PREFIX is put before the names of its
tables (a schema: ``"name".``). It creates, if missing:

* ``effects (seq, amount, applied)``, with no unique key on ``seq``, so an
  event applied twice shows as a second row; ``applied`` numbers the rows in
  the order they were inserted;
* ``totals``, one row (id 1) whose ``total`` and ``handled`` the projection
  adds each event's amount and 1 to;
* ``orders (id, amount)``, the outbox's rows.

The consumer ``projection`` (transactional, COMMIT_EVERY events per
transaction) applies every ``pay`` and ``order.created`` event to
``effects`` and ``totals``; its first attempt at some events fails after its
insert, to be retried in a new transaction. Meanwhile one task publishes
``pay`` and ``noise`` events (``{"amount": ...}``; ``noise`` is not
projected), appending the seqs of every publish that returned to
``LOGS/published.log``; another, the outbox, inserts an order with a random
id and publishes its ``order.created`` event in one ``flow.transaction()``,
appending the id to ``LOGS/orders.log`` once it committed, or, for the
blocks it rolls back on purpose, to ``LOGS/rolledback.log``. It prints
``ready`` once the tables exist.

Without ``--finish`` it goes on until killed; with it, it publishes
`FINAL_EVENTS` events and `FINAL_ORDERS` orders, waits until the projection
is idle, prints ``idle`` and exits 0. With ``--ride-out`` (for a test that
crashes the database server under it) a publish or an outbox block that fails
with a store error is tried again when nothing was persisted, and left out of
the logs when its outcome is unknown.
"""

from __future__ import annotations

import itertools
import os
import random
import sys

import trio

import trioflow
from tests._children.crash_child import idle_or_killed

PROJECTED = frozenset({"pay", "order.created"})
#: What the final run publishes: some events, some orders.
FINAL_EVENTS = 200
FINAL_ORDERS = 20
#: What a run killed at random publishes at most.
MOST_EVENTS = 400


class RolledBack(Exception):
    """Raised in an outbox block to roll it back."""


def sql(tx: trioflow.Transaction, query: str) -> str:
    """``query`` with its ``?`` parameters written in the store's style."""
    if tx.paramstyle == "?":
        return query
    numbers = itertools.count(1)
    return "".join(
        f"${next(numbers)}{part}" if index else part for index, part in enumerate(query.split("?"))
    )


def open_log(logs: str, name: str) -> int:
    return os.open(os.path.join(logs, name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


async def create_tables(flow: trioflow.Flow, tables: str) -> None:
    async with flow.transaction() as tx:
        # `applied` numbers the rows in the order they were inserted: the
        # order the projection applied its events in.
        applied = (
            "applied INTEGER PRIMARY KEY AUTOINCREMENT"
            if tx.paramstyle == "?"
            else "applied BIGSERIAL PRIMARY KEY"
        )
        await tx.execute(
            f"CREATE TABLE IF NOT EXISTS {tables}effects (seq BIGINT, amount BIGINT, {applied})"
        )
        await tx.execute(
            f"CREATE TABLE IF NOT EXISTS {tables}totals "
            "(id BIGINT PRIMARY KEY, total BIGINT NOT NULL, handled BIGINT NOT NULL)"
        )
        await tx.execute(
            f"INSERT INTO {tables}totals (id, total, handled) VALUES (1, 0, 0) "
            "ON CONFLICT (id) DO NOTHING"
        )
        await tx.execute(
            f"CREATE TABLE IF NOT EXISTS {tables}orders (id BIGINT PRIMARY KEY, amount BIGINT)"
        )


def add_projection(app: trioflow.App, commit_every: int, rng: random.Random, tables: str) -> None:
    failed: set[int] = set()

    @app.consumer(
        "projection",
        transactional=True,
        commit_every=commit_every,
        types=PROJECTED,
        retry=trioflow.Retry(attempts=3, initial=0.01, maximum=0.01),
    )
    async def project(event: trioflow.Event, tx: trioflow.Transaction) -> None:
        amount = event.data["amount"]
        await tx.execute(
            sql(tx, f"INSERT INTO {tables}effects (seq, amount) VALUES (?, ?)"), event.seq, amount
        )
        if rng.random() < 0.05:
            # Sometimes slow between its statements, so kills land inside transactions.
            await trio.sleep(rng.uniform(0.0, 0.01))
        if event.seq % 23 == 0 and event.seq not in failed:
            # After the insert: the retry must find it rolled back.
            failed.add(event.seq)
            raise RuntimeError(f"first attempt at seq={event.seq} fails")
        await tx.execute(
            sql(
                tx,
                f"UPDATE {tables}totals SET total = total + ?, handled = handled + 1 WHERE id = 1",
            ),
            amount,
        )


async def publish(
    flow: trioflow.Flow, rng: random.Random, pace: float, most: int, fd: int, ride_out: bool
) -> None:
    published = 0
    while published < most:
        size = min(rng.randint(1, 10), most - published)
        batch = [
            (rng.choice(("pay", "pay", "noise")), {"amount": rng.randint(1, 100)})
            for _ in range(size)
        ]
        try:
            seqs = await flow.publish_many(batch)
        except trioflow.OutcomeUnknownError:
            if not ride_out:
                raise
            published += size  # maybe stored, maybe not: in no log
            continue
        except trioflow.StoreError:
            if not ride_out:
                raise
            await trio.sleep(0.1)  # nothing was persisted: try again
            continue
        # Recorded only once publish returned: these must be in the store.
        os.write(fd, "".join(f"{seq}\n" for seq in seqs).encode())
        published += size
        await trio.sleep(rng.uniform(0, 2 * pace))


async def outbox(
    flow: trioflow.Flow,
    rng: random.Random,
    pace: float,
    most: int,
    logs: str,
    tables: str,
    ride_out: bool,
) -> None:
    committed, rolled_back = open_log(logs, "orders.log"), open_log(logs, "rolledback.log")
    orders = 0
    while orders < most:
        order_id = rng.getrandbits(48)
        roll_back = rng.random() < 0.15
        try:
            async with flow.transaction() as tx:
                amount = rng.randint(1, 100)
                await tx.execute(
                    sql(tx, f"INSERT INTO {tables}orders (id, amount) VALUES (?, ?)"),
                    order_id,
                    amount,
                )
                if rng.random() < 0.2:
                    await trio.sleep(rng.uniform(0.0, 0.01))
                tx.publish("order.created", {"order": order_id, "amount": amount})
                if roll_back:
                    raise RolledBack
        except RolledBack:
            os.write(rolled_back, f"{order_id}\n".encode())
        except trioflow.OutcomeUnknownError:
            if not ride_out:
                raise
            orders += 1  # maybe committed, maybe not: in no log
        except trioflow.StoreError:
            if not ride_out:
                raise
            # Rolled back by the failure: tried again with another id.
            await trio.sleep(0.1)
        else:
            os.write(committed, f"{order_id}\n".encode())
            orders += 1
        await trio.sleep(rng.uniform(0, 4 * pace))


async def main(
    url: str,
    logs: str,
    commit_every: int,
    seed: int,
    pace: float,
    finish: bool,
    tables: str,
    ride_out: bool,
) -> None:
    rng = random.Random(seed)
    # A short lease: a restarted child takes its consumer back soon after a kill.
    app = trioflow.App(store=url, lease_ttl=1.0)
    add_projection(app, commit_every, random.Random(rng.random()), tables)
    published = open_log(logs, "published.log")
    async with trioflow.open_flow(app) as flow:
        await create_tables(flow, tables)
        print("ready", flush=True)
        events, orders = (FINAL_EVENTS, FINAL_ORDERS) if finish else (MOST_EVENTS, MOST_EVENTS)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                publish, flow, random.Random(rng.random()), pace, events, published, ride_out
            )
            nursery.start_soon(
                outbox, flow, random.Random(rng.random()), pace, orders, logs, tables, ride_out
            )
        await idle_or_killed(flow, finish, "projection_child")


if __name__ == "__main__":
    url, logs, commit_every, seed, pace = sys.argv[1:6]
    flags = sys.argv[6:]
    prefixes = [flag.removeprefix("--tables=") for flag in flags if flag.startswith("--tables=")]
    trio.run(
        main,
        url,
        logs,
        int(commit_every),
        int(seed),
        float(pace),
        "--finish" in flags,
        prefixes[0] if prefixes else "",
        "--ride-out" in flags,
    )
