"""One consumer's life: recover from its cursor, replay, go live, restart on failure.

Start-up and restart are one code path (`Consumer._incarnation`): load the
durable cursor, replay from the store up to the live stream, then take
batches from the consumer's `Subscription`. A batch that starts past the
consumer's position means it missed events (it was detached, or just
restarted): it reads them from the store before going on. Events at or below
its position are skipped. Together these make the seam between replay and
live exact: no gap, no duplicate.

A handler that raises ends the incarnation: its cancel scope is cancelled,
its position (the last event handled successfully) is committed, and after a
backoff a new incarnation starts from the durable cursor, so the failed event
is delivered again and nothing else in the flow notices.

Who owns what: a `Consumer` owns its position and counters; its feed belongs
to the dispatcher (`Subscription`), its cursor progress to the cursor writer
(`CursorProgress`); it changes those only through their owners' methods.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Sequence

import attrs
import trio

from ._app import ConsumerSpec
from ._cursors import CursorProgress, CursorWriter
from ._dispatch import Batch, Dispatcher, Subscription
from ._errors import StoreError
from ._events import Event
from ._pages import PageReader
from ._statistics import ConsumerStatistics
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
    """What every consumer of one flow shares, and the flow's way to stop them."""

    store: Store
    dispatcher: Dispatcher
    cursors: CursorWriter
    page_size: int
    page_bytes: int
    commit_interval: float
    restart_delay: Callable[[int], float]
    _consumers: list[Consumer] = attrs.Factory(list)
    _stopping: bool = False
    _stop_deadline: float = float("inf")
    #: Replay pages, shared by the consumers replaying the same events.
    pages: PageReader = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.pages = PageReader(self.store, keep=2 * self.page_size, keep_bytes=2 * self.page_bytes)

    @property
    def consumers(self) -> Sequence[Consumer]:
        """The flow's consumers, in registration order."""
        return tuple(self._consumers)

    @property
    def stopping(self) -> bool:
        """Whether the flow is stopping: consumers start no new event."""
        return self._stopping

    @property
    def stop_deadline(self) -> float:
        """When handlers in flight are cancelled, once stopping (trio time)."""
        return self._stop_deadline

    def add(self, spec: ConsumerSpec) -> Consumer:
        """A new consumer of this flow, fed by the dispatcher from now on."""
        consumer = Consumer(
            spec=spec,
            runner=self,
            feed=self.dispatcher.subscribe(
                spec.name, types=spec.types, buffer=spec.buffer, buffer_bytes=spec.buffer_bytes
            ),
            cursor=CursorProgress(spec.name),
        )
        self._consumers.append(consumer)
        return consumer

    def stop(self, deadline: float) -> None:
        """Start no new event; let handlers in flight run until ``deadline``."""
        self._stopping = True
        self._stop_deadline = deadline
        for consumer in self._consumers:
            consumer._stop_handling(deadline)


@attrs.define(eq=False)
class Consumer:
    """One consumer of a flow: its loop, and the position and counters it owns."""

    spec: ConsumerSpec
    _runner: ConsumerRunner
    _feed: Subscription
    _cursor: CursorProgress
    #: Last sequence number handled (or skipped by the type filter), in memory.
    _position: int = 0
    _processed: int = 0
    _failures: int = 0
    _restarts: int = 0
    #: trio.current_time() of its last cursor commit request on a schedule.
    _requested_at: float = 0.0
    #: The shielded scope around its current handlers, while it has one.
    _handler_scope: trio.CancelScope | None = None
    _finished: trio.Event = attrs.Factory(trio.Event)

    @property
    def name(self) -> str:
        """The durable consumer name."""
        return self.spec.name

    @property
    def committed(self) -> int:
        """Its durable cursor."""
        return self._cursor.committed

    def statistics(self, head: int) -> ConsumerStatistics:
        """A snapshot, with ``head`` the last sequence number the flow fanned out."""
        return ConsumerStatistics(
            cursor=self._cursor.committed,
            position=self._position,
            head=head,
            lag=max(head - self._position, 0),
            buffered=self._feed.buffered,
            buffered_bytes=self._feed.buffered_bytes,
            attached=self._feed.attached,
            processed=self._processed,
            failures=self._failures,
            restarts=self._restarts,
        )

    def request_commit(self) -> None:
        """Ask for its position to be made durable now (`Flow.wait_idle` waits)."""
        self._runner.cursors.request(self._cursor, self._position, self._processed)

    def final_position(self) -> tuple[CursorProgress, int, int]:
        """What the final flush of a stopping flow writes for it."""
        return self._cursor, self._position, self._processed

    async def wait_finished(self) -> None:
        """Wait until its task has ended."""
        await self._finished.wait()

    def _stop_handling(self, deadline: float) -> None:
        if self._handler_scope is not None:
            self._handler_scope.deadline = deadline

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled, restarting after failures.

        Reports itself started once its first incarnation has loaded its
        cursor; a store failure before that is retried with the same backoff
        as a restart, and ``nursery.start`` waits (cancellably) meanwhile.
        """
        runner = self._runner
        handler_of.set(runner)
        status = _StartedOnce(task_status)
        attempt = 0
        try:
            while True:
                committed_before = self._cursor.committed
                with trio.CancelScope() as scope:
                    try:
                        await self._incarnation(status)
                    except HandlerFailed as failed:
                        self._failures += 1
                        logger.error(
                            "consumer %r failed on seq=%d (type %r); restarting from its cursor",
                            self.name,
                            failed.event.seq,
                            failed.event.type,
                            exc_info=failed.error,
                        )
                    except StoreError as exc:
                        self._failures += 1
                        logger.error(
                            "consumer %r stopped on a store error; restarting from its cursor: %s",
                            self.name,
                            exc,
                        )
                    finally:
                        self._handler_scope = None
                    # Everything the incarnation started goes with it.
                    scope.cancel()
                if runner.stopping:
                    # The stop sequence commits every position itself.
                    return
                await self._save_position()
                # Only durable progress resets the backoff: a consumer whose
                # cursor writes keep failing backs off to the cap.
                attempt = 1 if self._cursor.committed > committed_before else attempt + 1
                self._restarts += 1
                await trio.sleep(runner.restart_delay(attempt))
        finally:
            self._finished.set()

    async def _save_position(self) -> None:
        if self._position > self._cursor.committed:
            try:
                await self._runner.cursors.commit(self._cursor, self._position, self._processed)
            except StoreError as exc:
                logger.warning(
                    "consumer %r could not commit its cursor at %d (%s); it goes on from there "
                    "and commits it later",
                    self.name,
                    self._position,
                    exc,
                )

    async def _incarnation(self, task_status: _StartedOnce) -> None:
        runner, spec = self._runner, self.spec
        cursor = (await runner.store.load_cursors()).get(spec.name)
        if cursor is None:
            cursor = 0 if spec.start == "earliest" else await runner.store.head()
            await runner.cursors.commit_first(self._cursor, cursor, self._processed)
        runner.cursors.loaded(self._cursor, cursor, self._position, self._processed)
        # Events an earlier incarnation handled stay handled, whether or not
        # their cursor write landed: the position never moves back, so a
        # restart redelivers only the event that failed.
        self._position = max(self._position, self._cursor.committed)
        self._feed.attach()
        head = runner.dispatcher.head
        if not task_status.done and cursor > head:
            logger.warning(
                "consumer %r has cursor %d, past the last event in the store (%d): events up "
                "to %d were deleted, or the store is not the one its cursor was committed to; "
                "it waits for events after %d",
                spec.name,
                cursor,
                head,
                cursor,
                cursor,
            )
        task_status.started()
        await self._catch_up()
        feed = self._feed
        while True:
            try:
                batch = feed.take_nowait()
            except trio.WouldBlock:
                if not feed.attached:
                    await self._catch_up()
                    continue
                batch = await self._take_idle()
            if batch.upto <= self._position:
                continue
            if batch.after > self._position:
                await self._replay(until=batch.after)
            await self._handle(batch.events, batch.upto)

    async def _take_idle(self) -> Batch:
        """Wait for the next batch, having the position made durable meanwhile.

        The commit is requested without waiting for it (`_handle` waits where
        the redelivery bound needs it): at once if `Flow.wait_idle` is waiting
        for durable cursors, else once ``commit_interval`` has passed since the
        last request, unless events come first. A flow that handles one event
        at a time thus writes cursors every ``commit_interval``, not once per
        event, and never has a cursor write between two events.
        """
        cursors = self._runner.cursors
        while self._position > self._cursor.requested:
            due = self._requested_at + self._runner.commit_interval
            if cursors.flush_wanted or trio.current_time() >= due:
                self._requested_at = trio.current_time()
                cursors.request(self._cursor, self._position, self._processed)
                break
            with trio.move_on_at(due):
                return await self._feed.take()
        return await self._feed.take()

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
        runner = self._runner
        started = trio.current_time()
        reported = started
        first = self._position
        # Start small and double: a consumer restarted after a failure may
        # fail again a few events later, and a full page of large events read
        # for nothing is what made such restarts slow; a long replay reaches
        # full pages after a few reads.
        limit = min(FIRST_PAGE, runner.page_size)
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
            await self._handle(page, page[-1].seq)
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

    async def _handle(self, events: Sequence[Event], upto: int) -> None:
        """Run the handler on each new event, in order; then move to ``upto``.

        Handlers run shielded: an outside cancellation never interrupts one
        mid-event. Stopping sets a deadline on the shield (the grace period).

        Cursor commits are requested every ``commit_every // 2`` handled
        events without waiting; the consumer waits for one only before it
        would hold ``commit_every`` handled events that are not durable, which
        is what bounds redelivery after a crash.
        """
        runner, spec, cursor = self._runner, self.spec, self._cursor
        handler = spec.handler
        types = spec.types
        commit_every = spec.commit_every
        request_every = max(commit_every // 2, 1)
        cursors = runner.cursors
        with trio.CancelScope(shield=True, deadline=runner.stop_deadline) as scope:
            self._handler_scope = scope
            for event in events:
                seq = event.seq
                if seq <= self._position:
                    continue
                if runner.stopping:
                    break
                if types is None or event.type in types:
                    if self._processed - cursor.committed_processed >= commit_every:
                        cursors.request(cursor, self._position, self._processed)
                        await cursors.wait_durable(cursor, self._position)
                    try:
                        await handler(event)
                    except Exception as exc:
                        raise HandlerFailed(event, exc) from exc
                    self._processed += 1
                    self._position = seq
                    if self._processed - cursor.requested_processed >= request_every:
                        self._requested_at = trio.current_time()
                        cursors.request(cursor, seq, self._processed)
                else:
                    self._position = seq
            else:
                if upto > self._position:
                    self._position = upto
                now = trio.current_time()
                if now - self._requested_at >= runner.commit_interval:
                    self._requested_at = now
                    cursors.request(cursor, self._position, self._processed)
        self._handler_scope = None
        if runner.stopping:
            # Leave the rest to the stop sequence, which cancels this task.
            await trio.sleep_forever()
