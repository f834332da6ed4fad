"""A process that only publishes: no consumers.

Run as ``python publisher_child.py URL NAME COUNT SEED GO``. Opens the
flow, prints ``ready``, waits until the file GO exists (so that several
publishers start together and their appends interleave), then publishes COUNT
events of type ``mp`` with data ``{"pub": NAME, "n": i}`` (i = 0 .. COUNT-1, in
order), in batches of random size with some single publishes, and exits 0.
"""

from __future__ import annotations

import random
import sys

import trio

import trioflow


async def main(url: str, name: str, count: int, seed: int, go: str) -> None:
    rng = random.Random(seed)
    app = trioflow.App(store=url)
    async with trioflow.open_flow(app) as flow:
        print("ready", flush=True)
        with trio.fail_after(60):
            # Another process's signal: nothing to wait on but the file.
            while not await trio.Path(go).exists():  # noqa: ASYNC110
                await trio.sleep(0.005)
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
    url, name, count, seed, go = sys.argv[1:6]
    trio.run(main, url, name, int(count), int(seed), go)
