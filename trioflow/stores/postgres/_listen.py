"""LISTEN for appends: one connection kept up for as long as the store is open.

Every append notifies the schema's channel in its transaction, so the
notification arrives once the batch is visible; its payload is the batch's
last seq (empty from a schema older than version 5). The store wakes its
waiters on each one (`PostgresStore.wait_for_append`); while the connection is down
they fall back to polling, and once it is back they re-read the head, since
notifications sent meanwhile are lost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

import trio

from ..._errors import StoreError
from ._driver import Driver

logger = logging.getLogger("trioflow.stores.postgres")

# Seconds between attempts to restore a lost LISTEN connection.
_MIN_BACKOFF: Final = 0.1
_MAX_BACKOFF: Final = 10.0
# How often the idle LISTEN connection is pinged, to notice a dead one.
_PING_INTERVAL: Final = 5.0


async def listen_forever(
    driver: Driver,
    channel: str,
    *,
    on_notify: Callable[[int, str], None],
    on_listening: Callable[[], None],
    poll_interval: float | None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep a LISTEN connection on ``channel`` up, reconnecting with backoff.

    Calls ``on_notify(pid, payload)`` for every notification (``pid``: the
    server process that sent it) and ``on_listening()`` every time the LISTEN is in
    place, the first time and after each reconnection. Started with
    ``nursery.start``: fails if the first connection fails, then only logs
    (``poll_interval``: how often the store polls meanwhile, for the log).
    """
    started = False
    backoff = _MIN_BACKOFF

    def listening() -> None:
        nonlocal started, backoff
        backoff = _MIN_BACKOFF
        on_listening()
        if not started:
            started = True
            task_status.started()
        else:
            logger.info("trioflow: LISTEN connection to %s restored", driver.config.display)

    while True:
        try:
            await driver.listen(
                channel, on_notify, on_listening=listening, ping_interval=_PING_INTERVAL
            )
        except StoreError as exc:
            if not started:
                raise
            logger.warning(
                "trioflow: LISTEN connection failed (%s); polling every %ss until it is "
                "back, retrying in %.1fs",
                exc,
                poll_interval,
                backoff,
            )
        await trio.sleep(backoff)
        backoff = min(backoff * 2, _MAX_BACKOFF)
