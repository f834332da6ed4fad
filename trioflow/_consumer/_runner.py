"""The consumers of one flow (`ConsumerRunner`), and one consumer's life (`Consumer`).

`Consumer.run` stands by while another flow owns the consumer and, while
this one does, runs incarnations (`_incarnation`): load the cursor, catch up,
then take batches from its feed; a store error ends an incarnation and a new
one starts after a backoff, a halt waits to be resumed.
"""

from __future__ import annotations

import contextvars
import logging
import math
from collections.abc import Callable, Sequence

import attrs
import trio

from .._app import ConsumerSpec
from .._cursors import CursorProgress, CursorWriter
from .._dispatch import Batch, Dispatcher, feeding
from .._errors import ConsumerStateError, LeaseLostError, StoreError
from .._ownership import LeaseKeeper
from .._pages import PageReader
from .._statistics import ConsumerStatistics
from .._store_calls import SlowCalls
from ..stores._base import Store
from ._failures import Halted
from ._replay import Replay
from ._startup import Startup

#: The runner of the flow whose consumer task this is, if any: publishing
#: from a handler stays possible while the flow stops (see `Flow.publish`).
handler_of: contextvars.ContextVar[ConsumerRunner | None] = contextvars.ContextVar(
    "trioflow_handler_of", default=None
)

logger = logging.getLogger("trioflow")


@attrs.define(eq=False)
class _StartedOnce:
    """A task status that reports "started" once, however many incarnations start."""

    status: trio.TaskStatus[None]
    done: bool = False

    def started(self) -> None:
        if not self.done:
            self.done = True
            self.status.started()


@attrs.define(eq=False)
class ConsumerRunner:
    """What every consumer of one flow shares, and the flow's way to stop them."""

    store: Store
    dispatcher: Dispatcher
    cursors: CursorWriter
    leases: LeaseKeeper
    page_size: int
    page_bytes: int
    commit_interval: float
    restart_delay: Callable[[int], float]
    #: Where handlers that outlive their timeout are reported.
    slow_calls: SlowCalls
    _consumers: list[Consumer] = attrs.Factory(list)
    _stopping: bool = False
    _stop_deadline: float = float("inf")
    #: Set once the flow has started the consumers it opened with.
    _all_started: trio.Event = attrs.Factory(trio.Event)
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

    def all_started(self) -> None:
        """The flow has started every consumer it opened with: they may replay now."""
        self._all_started.set()

    async def wait_all_started(self) -> None:
        """Wait until `all_started`: consumers that open with the flow start their
        replays together, so that they read each page once between them. (One
        that started first would otherwise be pages ahead by the time the last
        one starts, past the pages kept for it, and every page be read twice.)"""
        await self._all_started.wait()

    def add(self, spec: ConsumerSpec) -> Consumer:
        """A new consumer of this flow, fed by the dispatcher from now on."""
        consumer = Consumer(
            spec=spec,
            runner=self,
            feed=self.dispatcher.subscribe(
                spec.name,
                types=spec.types,
                partition=None
                if spec.partition is None
                else (spec.partition, spec.partitions or 1),
                buffer=spec.buffer,
                buffer_bytes=spec.buffer_bytes,
                overflow=spec.overflow,
            ),
            cursor=CursorProgress(spec.name),
            ownership=self.leases.ownership(spec.name),
        )
        self._consumers.append(consumer)
        return consumer

    def remove(self, consumer: Consumer) -> None:
        """Forget a consumer whose task has ended; the dispatcher feeds it no more."""
        self._consumers.remove(consumer)
        self.dispatcher.unsubscribe(consumer._feed)

    def stop(self, deadline: float) -> None:
        """Start no new event; let handlers in flight run until ``deadline``."""
        self._stopping = True
        self._stop_deadline = deadline
        for consumer in self._consumers:
            consumer._stop_handling(deadline)


class Consumer(Replay, Startup):
    """One consumer of a flow: its loop, and the position and counters it owns."""

    __slots__ = ()

    @property
    def committed(self) -> int:
        """Its durable cursor."""
        return self._cursor.committed

    @property
    def requeues_pending(self) -> bool:
        """Whether requeued dead letters may be due that it has not handled yet."""
        return self._requeue_check_at <= trio.current_time() or self._in_requeues

    @property
    def owned(self) -> bool:
        """Whether this flow owns it now (else another flow does, or nobody yet)."""
        return self._ownership.owned

    @property
    def halted(self) -> bool:
        """Whether it halted at an event and waits for `resume`."""
        return self._halted

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
            retries=self._retries,
            redelivered=self._redelivered,
            restarts=self._restarts,
            dead_lettered=self._dead_lettered,
            halted=self._halted,
            stall=self._stall,
            owned=self._ownership.owned,
            owner=self._ownership.owner,
            handler_duration=self._handler_duration.snapshot(),
        )

    def request_commit(self) -> None:
        """Ask for its position to be made durable now (`Flow.wait_idle` waits)."""
        self._runner.cursors.request(self._cursor, self._position, self._processed)

    def final_position(self) -> tuple[CursorProgress, int, int]:
        """What the final flush of a stopping flow writes for it."""
        return self._cursor, self._position, self._processed

    def resume(self) -> None:
        """Start a halted consumer again, from the event it halted at.

        Raises:
            ConsumerStateError: It is not halted.
        """
        if not self._halted:
            raise ConsumerStateError(
                f"consumer {self.name!r} is not halted, so there is nothing to resume; "
                f"statistics().consumers[{self.name!r}].halted says when it is"
            )
        self._resumed.set()

    def requeued(self, after: float) -> None:
        """Dead letters of it were requeued, due in ``after`` seconds: look for them then."""
        due = trio.current_time() + after
        self._requeue_check_at = min(self._requeue_check_at, due)
        self._requeue_told_at = min(self._requeue_told_at, due)
        self._requeues_later = True
        self._feed.wake()

    def stop(self, deadline: float) -> None:
        """Stop on its own (it leaves the flow): no new event; handlers get until ``deadline``."""
        self._stopping = True
        self._stop_deadline = deadline
        self._stop_handling(deadline)

    async def wait_finished(self) -> None:
        """Wait until its task has ended."""
        await self._finished.wait()

    def _stop_handling(self, deadline: float) -> None:
        if self._handler_scope is not None:
            self._handler_scope.deadline = deadline
        if self._backoff_scope is not None:
            self._backoff_scope.cancel()
        if self._fill_scope is not None:
            self._fill_scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled: handle events while this flow owns the consumer, else stand by.

        Reports itself started once its first incarnation has loaded its
        cursor, or once it is known to stand by (another flow owns it); a
        store failure before that is retried with the same backoff as a
        restart, and ``nursery.start`` waits (cancellably) meanwhile. When
        this flow loses the consumer's lease, whatever it was doing is
        cancelled (a handler in flight too) and it stands by; when it owns it
        again it restarts from its durable cursor, by the start-up path.
        """
        handler_of.set(self._runner)
        feeding.set(self._feed)
        status = _StartedOnce(task_status)
        ownership = self._ownership
        try:
            while True:
                if not ownership.owned:
                    await self._stand_by(status)
                    continue
                with trio.CancelScope() as owned, ownership.cancelling(owned):
                    try:
                        await self._run_owned(status)
                        return
                    except LeaseLostError:
                        # A fenced write was refused; the keeper knows.
                        pass
                self._lease_lost()
        finally:
            self._finished.set()

    async def _stand_by(self, status: _StartedOnce) -> None:
        """Wait, holding no event, until this flow owns the consumer (or learns who does)."""
        self._runner.dispatcher.detach(self._feed)
        if self._ownership.known:
            # open_flow need not wait for a consumer another flow runs.
            status.started()
        await self._ownership.wait_changed()

    def _lease_lost(self) -> None:
        """Forget what is owner's business: a halt, a stall, the backoff of restarts."""
        self._runner.dispatcher.detach(self._feed)
        self._stall = None
        self._halted = False
        self._resumed = trio.Event()
        self._handler_scope = self._backoff_scope = self._fill_scope = None
        self._held = None
        self._runner.cursors.nudge()

    async def _run_owned(self, status: _StartedOnce) -> None:
        """The consumer's life as its owner: incarnations, restarted after store errors.

        Returns when the flow (or the consumer alone) stops.
        """
        runner = self._runner
        attempt = 0
        while True:
            committed_before = self._cursor.committed
            halted: Halted | None = None
            with trio.CancelScope() as scope:
                try:
                    await self._incarnation(status)
                except Halted as exc:
                    halted = exc
                except StoreError as exc:
                    self._failures += 1
                    logger.error(
                        "consumer %r stopped on a store error; restarting from its cursor: %s",
                        self.name,
                        exc,
                    )
                finally:
                    self._handler_scope = self._backoff_scope = self._fill_scope = None
                    self._held = None
                # Everything the incarnation started goes with it.
                scope.cancel()
            if self._must_stop():
                # The stop sequence commits every position itself.
                return
            await self._save_position()
            if halted is not None:
                await self._halt(halted)
                attempt = 0
                continue
            # Only durable progress resets the backoff: a consumer whose
            # cursor writes keep failing backs off to the cap.
            attempt = 1 if self._cursor.committed > committed_before else attempt + 1
            self._restarts += 1
            await trio.sleep(runner.restart_delay(attempt))

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
        known = self._cursor.committed
        if (cursor is None and (known or self._position)) or (
            cursor is not None and cursor < known
        ):
            # Flows never move a stored cursor back: an operator did
            # (`trioflow consumers reset` or `remove`), holding its lease, so
            # this flow lost the consumer meanwhile. Start from where the
            # store says, not from what this flow had reached.
            logger.warning(
                "consumer %r: its stored cursor was moved back from %d to %s; it goes on "
                "from there",
                self.name,
                known,
                "none (it starts afresh)" if cursor is None else cursor,
            )
            runner.cursors.moved_back(self._cursor, cursor or 0, self._processed)
            self._position = self._cursor.committed
        if cursor is None:
            cursor = await self._first_cursor()
        else:
            await self._check_not_pruned(cursor)
        runner.cursors.loaded(self._cursor, cursor, self._position, self._processed)
        # Events an earlier incarnation handled stay handled, whether or not
        # their cursor write landed: the position never moves back, so a
        # restart redelivers nothing it finished.
        self._position = max(self._position, self._cursor.committed)
        self._feed.attach()
        # Dead letters requeued while it was away are handled once it is live.
        self._requeue_check_at = -math.inf
        self._requeues_later = True
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
        await runner.wait_all_started()
        await self._catch_up()
        feed = self._feed
        while True:
            if trio.current_time() >= self._requeue_check_at:
                await self._handle_requeued()
            try:
                if self._held is not None:
                    batch, self._held = self._held, None
                else:
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
            if spec.batch is not None:
                batch = await self._fill_batch(batch)
            await self._handle(batch.events, batch.upto)

    async def _take_idle(self) -> Batch:
        """Wait for the next batch, having the position made durable meanwhile.

        The commit is requested without waiting for it (`_handle` waits where
        the redelivery bound needs it): at once if `Flow.wait_idle` is waiting
        for durable cursors, else once ``commit_interval`` has passed since the
        last request, unless events come first. A flow that handles one event
        at a time thus writes cursors every ``commit_interval``, not once per
        event, and never has a cursor write between two events. Requeued dead
        letters coming due end the wait too (with an empty batch).
        """
        cursors = self._runner.cursors
        while self._position > self._cursor.requested:
            due = self._requested_at + self._runner.commit_interval
            if cursors.flush_wanted or trio.current_time() >= due:
                self._requested_at = trio.current_time()
                cursors.request(self._cursor, self._position, self._processed)
                break
            with trio.move_on_at(min(due, self._requeue_check_at)):
                return await self._feed.take()
            if trio.current_time() >= self._requeue_check_at:
                return Batch(0, 0, ())
        with trio.move_on_at(self._requeue_check_at):
            return await self._feed.take()
        return Batch(0, 0, ())
