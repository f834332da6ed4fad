"""One consumer's life: recover from its cursor, replay, go live, restart on failure.

Start-up and restart are one code path (`_incarnation`): load the durable
cursor, replay from the store up to the live stream, then take batches from
the consumer's memory channel. A batch that starts past the consumer's
position means it missed events (it was detached, or just restarted): it
reads them from the store before going on. Events at or below its position
are skipped. Together these make the seam between replay and live exact: no
gap, no duplicate.

A handler that raises ends the incarnation: its cancel scope is cancelled,
its position (the last event handled successfully) is committed, and after a
backoff a new incarnation starts from the durable cursor, so the failed event
is delivered again and nothing else in the flow notices.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Sequence

import attrs
import trio

from ._cursors import CursorWriter
from ._dispatch import Batch, Dispatcher
from ._errors import StoreError
from ._events import Event
from ._pages import PageReader
from ._state import ConsumerState
from .stores._base import Store

logger = logging.getLogger("trioflow")

#: Seconds between progress messages while a consumer replays a backlog.
PROGRESS_EVERY = 5.0
#: Events in the first page a replay reads; each next page is twice as large,
#: up to the flow's ``page_size``.
FIRST_PAGE = 32


#: The runner of the flow whose consumer task this is, if any: publishing
#: from a handler stays possible while the flow stops (see `Flow.publish`).
handler_of: contextvars.ContextVar[ConsumerRunner | None] = contextvars.ContextVar(
    "trioflow_handler_of", default=None
)


@attrs.define(eq=False)
class _StartedOnce:
    """A task status that reports "started" once, however many incarnations start."""

    status: trio.TaskStatus[None]
    done: bool = False

    def started(self) -> None:
        if not self.done:
            self.done = True
            self.status.started()


class HandlerFailed(Exception):
    """A consumer's handler raised; carries the event it failed on."""

    def __init__(self, event: Event, error: Exception) -> None:
        super().__init__(event, error)
        self.event = event
        self.error = error


@attrs.define(eq=False)
class ConsumerRunner:
    """What every consumer task of one flow shares."""

    store: Store
    dispatcher: Dispatcher
    cursors: CursorWriter
    page_size: int
    page_bytes: int
    commit_interval: float
    restart_delay: Callable[[int], float]
    stopping: bool = False
    stop_deadline: float = float("inf")
    #: Replay pages, shared by the consumers replaying the same events.
    pages: PageReader = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.pages = PageReader(self.store, keep=2 * self.page_size, keep_bytes=2 * self.page_bytes)

    async def supervise(
        self, state: ConsumerState, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run ``state``'s consumer until cancelled, restarting it after failures.

        Reports itself started once its first incarnation has loaded its
        cursor; a store failure before that is retried with the same backoff
        as a restart, and ``nursery.start`` waits (cancellably) meanwhile.
        """
        handler_of.set(self)
        status = _StartedOnce(task_status)
        attempt = 0
        try:
            while True:
                committed_before = state.committed
                with trio.CancelScope() as scope:
                    state.scope = scope
                    try:
                        await self._incarnation(state, status)
                    except HandlerFailed as failed:
                        state.failures += 1
                        logger.error(
                            "consumer %r failed on seq=%d (type %r); restarting from its cursor",
                            state.spec.name,
                            failed.event.seq,
                            failed.event.type,
                            exc_info=failed.error,
                        )
                    except StoreError as exc:
                        state.failures += 1
                        logger.error(
                            "consumer %r stopped on a store error; restarting from its cursor: %s",
                            state.spec.name,
                            exc,
                        )
                    finally:
                        state.handler_scope = None
                        state.in_flight = None
                    # Everything the incarnation started goes with it.
                    scope.cancel()
                if self.stopping:
                    # The stop sequence commits every position itself.
                    return
                await self._save_position(state)
                # Only durable progress resets the backoff: a consumer whose
                # cursor writes keep failing backs off to the cap.
                attempt = 1 if state.committed > committed_before else attempt + 1
                delay = self.restart_delay(attempt)
                state.restarts += 1
                await trio.sleep(delay)
        finally:
            state.finished.set()

    async def _save_position(self, state: ConsumerState) -> None:
        if state.position > state.committed:
            try:
                await self.cursors.commit(state)
            except StoreError as exc:
                logger.warning(
                    "consumer %r could not commit its cursor at %d (%s); it goes on from there "
                    "and commits it later",
                    state.spec.name,
                    state.position,
                    exc,
                )

    async def _incarnation(self, state: ConsumerState, task_status: _StartedOnce) -> None:
        spec = state.spec
        cursor = (await self.store.load_cursors()).get(spec.name)
        if cursor is None:
            cursor = 0 if spec.start == "earliest" else await self.store.head()
            await self.cursors.commit_first(state, cursor)
        if cursor > state.committed:
            state.committed = cursor
        # Events an earlier incarnation handled stay handled, whether or not
        # their cursor write landed: the position never moves back, so a
        # restart redelivers only the event that failed.
        if state.committed > state.position:
            state.position = state.committed
        if state.position == state.committed:
            state.committed_processed = state.requested_processed = state.processed
        state.attached = True
        if not task_status.done and cursor > self.dispatcher.head:
            logger.warning(
                "consumer %r has cursor %d, past the last event in the store (%d): events up "
                "to %d were deleted, or the store is not the one its cursor was committed to; "
                "it waits for events after %d",
                spec.name,
                cursor,
                self.dispatcher.head,
                cursor,
                cursor,
            )
        task_status.started()
        await self._catch_up(state)
        receive = state.receive
        while True:
            try:
                batch = receive.receive_nowait()
            except trio.WouldBlock:
                if not state.attached:
                    await self._catch_up(state)
                    continue
                batch = await self._receive_idle(state, receive)
            state.buffered -= len(batch.events)
            state.buffered_bytes -= batch.size
            if batch.upto <= state.position:
                continue
            if batch.after > state.position:
                await self._replay(state, until=batch.after)
            await self._handle(state, batch.events, batch.upto)

    async def _receive_idle(
        self, state: ConsumerState, receive: trio.MemoryReceiveChannel[Batch]
    ) -> Batch:
        """Wait for the next batch, having the position made durable meanwhile.

        The commit is requested without waiting for it (`_handle` waits where
        the redelivery bound needs it): at once if `Flow.wait_idle` is waiting
        for durable cursors, else once ``commit_interval`` has passed since the
        last request, unless events come first. A flow that handles one event
        at a time thus writes cursors every ``commit_interval``, not once per
        event, and never has a cursor write between two events.
        """
        while state.position > state.requested:
            due = state.committed_at + self.commit_interval
            if self.cursors.flush_wanted or trio.current_time() >= due:
                state.committed_at = trio.current_time()
                self.cursors.request(state, state.position)
                break
            with trio.move_on_at(due):
                return await receive.receive()
        return await receive.receive()

    async def _catch_up(self, state: ConsumerState) -> None:
        """Replay from the store until level with the live stream, then attach."""
        target = self.dispatcher.head
        if state.position >= target:
            state.attached = True
            return
        logger.info(
            "consumer %r replaying from %d (head %d)", state.spec.name, state.position, target
        )
        while True:
            await self._replay(state, until=self.dispatcher.head, progress=True)
            # No checkpoint between this check and attaching: the next batch
            # the dispatcher sends starts exactly at its head.
            if state.position >= self.dispatcher.head:
                state.attached = True
                return

    async def _replay(self, state: ConsumerState, *, until: int, progress: bool = False) -> None:
        """Handle events from the store after the position, up to ``until``."""
        started = trio.current_time()
        reported = started
        first = state.position
        # Start small and double: a consumer restarted after a failure may
        # fail again a few events later, and a full page of large events read
        # for nothing is what made such restarts slow; a long replay reaches
        # full pages after a few reads.
        limit = min(FIRST_PAGE, self.page_size)
        while state.position < until:
            page = await self.pages.read(state.position, limit, max_bytes=self.page_bytes)
            limit = min(2 * limit, self.page_size)
            if not page:
                # The flow has seen events up to `until` committed, so the
                # store breaks its contract (or lost data). Never skip them:
                # fail, and let the restart backoff try again.
                raise StoreError(
                    f"the store returned no events after {state.position}, though events up "
                    f"to {until} were committed; check that the store is not a lagging replica"
                )
            await self._handle(state, page, page[-1].seq)
            now = trio.current_time()
            if progress and now - reported >= PROGRESS_EVERY:
                reported = now
                done = state.position - first
                logger.info(
                    "consumer %r replaying: at %d of %d (%.0f%%, %.0f events/s)",
                    state.spec.name,
                    state.position,
                    until,
                    100 * done / max(until - first, 1),
                    done / max(now - started, 1e-9),
                )

    async def _handle(self, state: ConsumerState, events: Sequence[Event], upto: int) -> None:
        """Run the handler on each new event, in order; then move to ``upto``.

        Handlers run shielded: an outside cancellation never interrupts one
        mid-event. Stopping sets a deadline on the shield (the grace period).

        Cursor commits are requested every ``commit_every // 2`` handled
        events without waiting; the consumer waits for one only before it
        would hold ``commit_every`` handled events that are not durable, which
        is what bounds redelivery after a crash.
        """
        spec = state.spec
        handler = spec.handler
        types = spec.types
        commit_every = spec.commit_every
        request_every = max(commit_every // 2, 1)
        cursors = self.cursors
        with trio.CancelScope(shield=True, deadline=self.stop_deadline) as scope:
            state.handler_scope = scope
            for event in events:
                seq = event.seq
                if seq <= state.position:
                    continue
                if self.stopping:
                    break
                if types is None or event.type in types:
                    if state.processed - state.committed_processed >= commit_every:
                        cursors.request(state, state.position)
                        await cursors.wait_durable(state, state.position)
                    state.in_flight = seq
                    try:
                        await handler(event)
                    except Exception as exc:
                        raise HandlerFailed(event, exc) from exc
                    state.processed += 1
                    state.position = seq
                    if state.processed - state.requested_processed >= request_every:
                        state.committed_at = trio.current_time()
                        cursors.request(state, seq)
                else:
                    state.position = seq
            else:
                state.in_flight = None
                if upto > state.position:
                    state.position = upto
                now = trio.current_time()
                if now - state.committed_at >= self.commit_interval:
                    state.committed_at = now
                    cursors.request(state, state.position)
        state.handler_scope = None
        if self.stopping:
            # Leave the rest to the stop sequence, which cancels this task.
            await trio.sleep_forever()
