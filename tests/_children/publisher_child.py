"""A process that only publishes: no consumers.

Run as ``python publisher_child.py DB NAME COUNT SEED``. Publishes COUNT events
of type ``mp`` with data ``{"pub": NAME, "n": i}`` (i = 0 .. COUNT-1, in
order), in batches of random size with some single publishes, then exits 0.
"""

from __future__ import annotations

import random
import sys
import urllib.parse

import trio

import trioflow


async def main(db: str, name: str, count: int, seed: int) -> None:
    rng = random.Random(seed)
    app = trioflow.App(store=f"sqlite:///{urllib.parse.quote(db)}")
    async with trioflow.open_flow(app) as flow:
        n = 0
        while n < count:
            if rng.random() < 0.2:
                await flow.publish("mp", {"pub": name, "n": n})
                n += 1
            else:
                size = min(rng.randint(2, 60), count - n)
                await flow.publish_many([("mp", {"pub": name, "n": n + i}) for i in range(size)])
                n += size
            # Yield now and then, so concurrent publishers interleave.
            if rng.random() < 0.3:
                await trio.sleep(0.001)


if __name__ == "__main__":
    db, name, count, seed = sys.argv[1:5]
    trio.run(main, db, name, int(count), int(seed))
