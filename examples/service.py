"""A long-running trioflow service that stops gracefully on SIGINT or SIGTERM.

    python examples/service.py            # Ctrl+C (or kill -TERM) to stop

It runs two consumers with `trioflow.serve`, publishes a heartbeat event every
second, and logs each consumer's statistics every five seconds. On a signal
it cancels the flow: in-flight handlers finish, cursors are committed, and
the next start resumes exactly where this one stopped. Other processes on the
same store (``TRIOFLOW_STORE``) can publish too; their events reach these
consumers within the store's poll interval.
"""

from __future__ import annotations

import logging
import signal

import trio

import trioflow

log = logging.getLogger("service")
app = trioflow.App()


@app.consumer("metrics")
async def metrics(event: trioflow.Event) -> None:
    log.info("metrics saw #%d %s", event.seq, event.type)


@app.consumer("slow-archive", buffer=1_000)
async def archive(event: trioflow.Event) -> None:
    await trio.sleep(0.2)  # a slow sink: falls behind without slowing anyone


async def heartbeat(flow: trioflow.Flow) -> None:
    beat = 0
    while True:
        beat += 1
        await flow.publish("service.heartbeat", {"beat": beat})
        await trio.sleep(1)


async def report(flow: trioflow.Flow) -> None:
    while True:
        await trio.sleep(5)
        for name, stats in flow.statistics().consumers.items():
            log.info(
                "%s: cursor %d, lag %d, buffered %d", name, stats.cursor, stats.lag, stats.buffered
            )


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            flow = await nursery.start(trioflow.serve, app)
            nursery.start_soon(heartbeat, flow)
            nursery.start_soon(report, flow)
            async for signum in signals:
                log.info("got %s: stopping", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


if __name__ == "__main__":
    trio.run(main)
