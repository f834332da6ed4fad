"""A process that only publishes: no consumers.

Run as ``python publisher_child.py URL NAME COUNT SEED GO [KEYS PACE [STOP]]``.
Opens the flow, prints ``ready``, waits until the file GO exists (so that
several publishers start together and their appends interleave), then
publishes COUNT events of type ``mp`` with data ``{"pub": NAME, "n": i}``
(i = 0 .. COUNT-1, in order), in batches of random size with some single
publishes, and exits 0.

With KEYS (a number above 0) each event gets a key, one of ``k0`` ..
``k<KEYS-1>`` at random (the same names in every publisher, so that their
events of one key interleave); with PACE it sleeps up to twice PACE seconds
(PACE on average) after each publish call, spreading its events over time;
with STOP it stops early, after the publish call under way, once the file
STOP exists.
"""

from __future__ import annotations

import random
import sys

import trio

import trioflow


async def main(
    url: str, name: str, count: int, seed: int, go: str, keys: int, pace: float, stop: str
) -> None:
    rng = random.Random(seed)
    app = trioflow.App(store=url)

    def key() -> str | None:
        return f"k{rng.randrange(keys)}" if keys else None

    async with trioflow.open_flow(app) as flow:
        print("ready", flush=True)
        await wait_for_file(go)
        n = 0
        while n < count and not (stop and await trio.Path(stop).exists()):
            if rng.random() < 0.2:
                await flow.publish("mp", {"pub": name, "n": n}, key=key())
                n += 1
            else:
                size = min(rng.randint(2, 60), count - n)
                await flow.publish_many(
                    [("mp", {"pub": name, "n": n + i}, key()) for i in range(size)]
                )
                n += size
            if pace:
                await trio.sleep(rng.uniform(0, 2 * pace))
            # Yield now and then, so concurrent publishers interleave.
            elif rng.random() < 0.3:
                await trio.sleep(0.001)


async def wait_for_file(path: str) -> None:
    """Return once ``path`` exists (fail after a minute)."""
    with trio.fail_after(60):
        # Another process's signal: nothing to wait on but the file.
        while not await trio.Path(path).exists():  # noqa: ASYNC110
            await trio.sleep(0.005)


if __name__ == "__main__":
    url, name, count, seed, go = sys.argv[1:6]
    keys, pace, stop = [*sys.argv[6:9], "0", "0", ""][:3]
    trio.run(main, url, name, int(count), int(seed), go, int(keys), float(pace), stop)
