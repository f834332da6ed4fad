"""Replay from the store: catching up to the live stream, and filling gaps.

A consumer replays from its position up to the live stream in pages that
start small and double, reports its progress on a long replay, and attaches
to the dispatcher's feed once level with it.
"""

from __future__ import annotations

import logging

import trio

from .._errors import StoreError
from ._handling import Handling

logger = logging.getLogger("trioflow")


#: Seconds between progress messages while a consumer replays a backlog.
PROGRESS_EVERY = 5.0
#: Events in the first page a replay reads; each next page is twice as large,
#: up to the flow's ``page_size``.
FIRST_PAGE = 32


class Replay(Handling):
    """Replaying from the store: catching up to the live stream, filling gaps."""

    __slots__ = ()

    async def _catch_up(self) -> None:
        """Replay from the store until level with the live stream, then attach."""
        dispatcher = self._runner.dispatcher
        if dispatcher.attach_if_level(self._feed, self._position):
            return
        logger.info(
            "consumer %r replaying from %d (head %d)", self.name, self._position, dispatcher.head
        )
        while True:
            await self._replay(until=dispatcher.head, progress=True)
            if dispatcher.attach_if_level(self._feed, self._position):
                return

    async def _replay(self, *, until: int, progress: bool = False) -> None:
        """Handle events from the store after the position, up to ``until``."""
        with self._runner.pages.replaying():
            await self._replay_pages(until, progress=progress)

    async def _replay_pages(self, until: int, *, progress: bool) -> None:
        runner = self._runner
        # Start small and double: a consumer restarted after a failure may
        # fail again a few events later, and a full page of large events read
        # for nothing is what made such restarts slow; a long replay reaches
        # full pages after a few reads.
        limit = min(FIRST_PAGE, runner.page_size)
        started = trio.current_time()
        reported = started
        first = self._position
        while self._position < until:
            page = await runner.pages.read(self._position, limit, max_bytes=runner.page_bytes)
            limit = min(2 * limit, runner.page_size)
            if not page:
                # The flow has seen events up to `until` committed, so the
                # store breaks its contract (or lost data). Never skip them:
                # fail, and let the restart backoff try again.
                raise StoreError(
                    f"the store returned no events after {self._position}, though events up "
                    f"to {until} were committed; check that the store is not a lagging replica"
                )
            spec = self.spec
            if spec.partition is not None and spec.partitions is not None:
                # A group's partitions replaying together split a page once.
                await self._handle(
                    runner.pages.split(page, spec.partitions)[spec.partition], page[-1].seq
                )
            else:
                await self._handle(page, page[-1].seq)
            if self._must_stop():
                return
            now = trio.current_time()
            if progress and now - reported >= PROGRESS_EVERY:
                reported = now
                done = self._position - first
                logger.info(
                    "consumer %r replaying: at %d of %d (%.0f%%, %.0f events/s)",
                    self.name,
                    self._position,
                    until,
                    100 * done / max(until - first, 1),
                    done / max(now - started, 1e-9),
                )
