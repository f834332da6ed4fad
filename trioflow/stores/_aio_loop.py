"""A leaner trio-asyncio event loop for the PostgreSQL driver.

trio-asyncio's loop runs one asyncio callback per pass of trio's scheduler:
each ``call_soon`` goes through a memory channel, and every receive is a
checkpoint with a cancel scope around it. It also waits for the whole callback
queue to drain after every socket read. One asyncpg statement makes about ten
such callbacks, so a round trip to PostgreSQL costs several scheduler passes
(each an ``epoll_wait``), which is most of the bridge's overhead.

`open_lean_loop` opens trio-asyncio's own loop (its nurseries, cancellation and
shutdown are unchanged) and makes it a `LeanLoop`, which on each wake-up runs
every callback already queued, as asyncio's own loop does in one iteration, and
does not wait for the queue after a read (asyncio's loop does not either); like
asyncio's loop, it checks that callbacks are not coroutines only in debug mode.
The order of callbacks is unchanged: first in, first out, timers by deadline.

It overrides three private methods of trio-asyncio's loop, ``_main_loop_one``,
``_io_task`` and ``_check_callback``, whose shape is the same in the releases the package accepts
(``trio-asyncio>=0.15,<0.17`` in pyproject.toml); ``test_driver.py`` checks
that the lean loop is the one running.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import sniffio
import trio
import trio_asyncio  # type: ignore[import-untyped]
from trio_asyncio._async import TrioEventLoop  # type: ignore[import-untyped]
from trio_asyncio._handles import AsyncHandle  # type: ignore[import-untyped]

__all__ = ["LeanLoop", "open_lean_loop"]


class LeanLoop(TrioEventLoop):  # type: ignore[misc]
    """trio-asyncio's loop, running every queued callback per wake-up."""

    async def _main_loop_one(self, no_wait: bool = False) -> None:
        if no_wait:
            # Only the loop's shutdown drains this way; keep trio-asyncio's code.
            await super()._main_loop_one(no_wait=True)
            return
        timeout = math.inf
        if self._timers:
            timeout = self._timers[0]._when - self.time()
            if timeout <= 0:
                self._run_handle(heapq.heappop(self._timers))
                return
        if timeout == math.inf:
            handle = await self._q_recv.receive()
        else:
            handle = None
            with trio.move_on_after(timeout):
                handle = await self._q_recv.receive()
            if handle is None:
                # A timer is due: the next call runs it.
                return
        while True:
            if isinstance(handle, asyncio.TimerHandle):
                heapq.heappush(self._timers, handle)
            elif isinstance(handle, AsyncHandle):
                handle._context.run(self._nursery.start_soon, handle._run, name=handle._callback)
                await handle._started.wait()
            else:
                # `stop()` queues a callback that raises TrioAsyncioExit, which
                # ends the loop here as it does in trio-asyncio's own code.
                self._run_handle(handle)
            try:
                handle = self._q_recv.receive_nowait()
            except trio.WouldBlock:
                return

    def _check_callback(self, callback: Any, method: str) -> None:
        # asyncio's own loop checks that a callback is no coroutine only in
        # debug mode; trio-asyncio always does, and the check (two `inspect`
        # calls) costs more than most callbacks do.
        if self.get_debug():
            super()._check_callback(callback, method)

    @staticmethod
    def _run_handle(handle: asyncio.Handle) -> None:
        if handle._cancelled:
            return
        previous, sniffio.thread_local.name = sniffio.thread_local.name, "asyncio"
        try:
            handle._run()
        finally:
            sniffio.thread_local.name = previous

    async def _io_task(
        self, fd: int, handle: Any, wait_ready: Callable[[int], Awaitable[None]]
    ) -> None:
        with handle._scope:
            try:
                while not handle._cancelled:
                    try:
                        await wait_ready(fd)
                    except OSError:
                        # The file descriptor was closed under a cancelled handle.
                        if handle._cancelled:
                            break
                        raise
                    if handle._cancelled:
                        break
                    handle._run()
            except Exception as exc:
                handle._raise(exc)


@contextlib.asynccontextmanager
async def open_lean_loop() -> AsyncIterator[LeanLoop]:
    """``trio_asyncio.open_loop()``, with the loop made a `LeanLoop`.

    trio-asyncio's ``_main_loop`` looks ``_main_loop_one`` up on every pass, and
    every reader or writer starts an ``_io_task`` when it is added, so the
    change of class takes effect at once, before any connection exists.
    """
    async with trio_asyncio.open_loop() as loop:
        if type(loop) is not TrioEventLoop:
            raise RuntimeError(
                f"trio-asyncio opened a {type(loop).__name__}, not the TrioEventLoop this "
                "version of trioflow was written for; install trio-asyncio>=0.15,<0.17"
            )
        loop.__class__ = LeanLoop
        yield loop
