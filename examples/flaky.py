"""A flaky handler: failures retried in place, a poison event dead-lettered, then requeued.

The consumer ``shipping`` books a courier for each parcel. The courier's API
is flaky: the first call for every even-numbered parcel fails, and the
consumer tries that parcel again, in place, after a short backoff, before any
later parcel. One parcel goes to a postcode the courier does not serve: it
fails on every attempt, so after three the consumer gives up on it, records it
as a dead letter, and goes on with the next parcels. The program then lists
the dead letters, fixes the cause (the courier now serves that postcode), and
requeues them: the consumer handles the parcel, and its dead letter is gone.

Like quickstart.py it uses the SQLite file ``trioflow.db`` in the current
directory (or ``TRIOFLOW_STORE``); run it again and it ships four new parcels.
trioflow logs each failure on the ``trioflow`` logger (to stderr here).
"""

from __future__ import annotations

import logging

import trio

import trioflow

app = trioflow.App()  # $TRIOFLOW_STORE, else sqlite:///trioflow.db

#: Postcodes the courier does not serve yet.
unserved = {"99999"}
#: Handler calls so far, by event seq.
calls: dict[int, int] = {}


class CourierError(Exception):
    """The courier refused a parcel."""


@app.consumer(
    "shipping",
    types={"parcel.ready"},
    retry=trioflow.Retry(attempts=3, initial=0.05, maximum=0.2),
    on_exhausted="dead-letter",
)
async def shipping(event: trioflow.Event) -> None:
    """Books a courier for the parcel; fails as the courier does."""
    call = calls[event.seq] = calls.get(event.seq, 0) + 1
    parcel, postcode = event.data["parcel"], event.data["postcode"]
    where = f"  shipping #{event.seq:<3} parcel {parcel} (call {call}):"
    if parcel % 2 == 0 and call == 1:
        print(f"{where} courier busy (retried in place)")
        raise ConnectionError("courier API busy")
    if postcode in unserved:
        print(f"{where} postcode {postcode} not served")
        raise CourierError(f"postcode {postcode} is not served")
    print(f"{where} courier booked for {postcode}")


async def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    async with trioflow.open_flow(app) as flow:
        print("publishing parcels 1 to 4; parcel 3 goes to 99999, which the courier does not serve")
        for parcel, postcode in ((1, "10115"), (2, "20095"), (3, "99999"), (4, "80331")):
            await flow.publish("parcel.ready", {"parcel": parcel, "postcode": postcode})
        await flow.wait_idle()

        letters = await flow.dead_letters("shipping")
        print(f"dead letters of 'shipping': {len(letters)}")
        for letter in letters:
            print(
                f"  #{letter.seq} {letter.reason} after {letter.attempts} attempts: "
                f"{letter.error_type}: {letter.message}"
            )

        print("the courier now serves 99999: requeueing them")
        unserved.clear()
        await flow.requeue("shipping", [letter.seq for letter in letters])
        await flow.wait_idle()  # waits for requeued dead letters too

        left = len(await flow.dead_letters("shipping"))
        stats = flow.statistics().consumers["shipping"]
        print(
            f"shipping: cursor {stats.cursor}, handled {stats.processed}, "
            f"failed calls {stats.failures}, dead letters left {left}"
        )


if __name__ == "__main__":
    trio.run(main)
