"""A process that a crash test SIGKILLs while it records dead letters.

Run as ``python dead_letter_child.py URL LOG SEED``, where URL is a store URL
whose log already holds plenty of events. It opens the store, prints
``ready``, and then each of three consumers (one task each, all at once)
gives up on every event after its cursor: it records
the event's dead letter with its cursor through the store API, and now and
then records an earlier letter of its own again without a cursor (a requeued
letter that failed again) or requeues one. Each ``record_dead_letter`` that
returned is logged to LOG as ``"<consumer> <seq>"``. It never stops by itself.
"""

from __future__ import annotations

import datetime
import os
import random
import sys

import trio

import trioflow
from trioflow.stores import Store, store_from_url

CONSUMERS = ("c0", "c1", "c2")


def dead_letter_of(
    consumer: str, event: trioflow.Event, failed_at: datetime.datetime, attempts: int = 1
) -> trioflow.DeadLetter:
    return trioflow.DeadLetter(
        consumer=consumer,
        seq=event.seq,
        event_id=event.id,
        type=event.type,
        attempts=attempts,
        first_failed_at=failed_at,
        last_failed_at=failed_at,
        reason="exhausted",
        error_type="builtins.RuntimeError",
        message=f"{consumer} gave up on {event.seq}",
        traceback="Traceback (most recent call last):\n" + "  a frame\n" * 200,
    )


async def give_up_on_everything(
    store: Store, consumer: str, cursor: int, log: int, rng: random.Random
) -> None:
    while events := await store.read(cursor, rng.randint(1, 30)):
        for event in events:
            failed_at = datetime.datetime.now(datetime.UTC)
            await store.record_dead_letter(
                dead_letter_of(consumer, event, failed_at), cursor=event.seq
            )
            # One write on an O_APPEND descriptor: a SIGKILL cannot tear the line.
            os.write(log, f"{consumer} {event.seq}\n".encode())
            cursor = event.seq
            if rng.random() < 0.1:
                (earlier,) = await store.read(rng.randint(0, event.seq - 1), 1)
                again = dead_letter_of(consumer, earlier, failed_at, attempts=2)
                await store.record_dead_letter(again, cursor=None)
            if rng.random() < 0.05:
                await store.requeue_dead_letters(consumer, [rng.randint(1, event.seq)], after=60)
    sys.exit(f"dead_letter_child: {consumer} ran out of events at {cursor}")


async def main(url: str, log_path: str, seed: int) -> None:
    rng = random.Random(seed)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    store = store_from_url(url)
    async with store.open():
        cursors = await store.load_cursors()
        print("ready", flush=True)
        async with trio.open_nursery() as nursery:
            for consumer in CONSUMERS:
                nursery.start_soon(
                    give_up_on_everything,
                    store,
                    consumer,
                    cursors.get(consumer, 0),
                    log,
                    random.Random(rng.random()),
                )


if __name__ == "__main__":
    url, log_path, seed = sys.argv[1:4]
    trio.run(main, url, log_path, int(seed))
