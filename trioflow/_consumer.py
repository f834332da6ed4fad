"""One consumer's life: recover from its cursor, replay, go live, apply its policy.

Start-up and restart are one code path (`Consumer._incarnation`): load the
durable cursor, replay from the store up to the live stream, then take
batches from the consumer's `Subscription`. A batch that starts past the
consumer's position means it missed events (it was detached, or just
restarted): it reads them from the store before going on. Events at or below
its position are skipped. Together these make the seam between replay and
live exact: no gap, no duplicate.

A handler failure (an exception, or its timeout) is retried in place, after
the backoff of the consumer's `DeliveryPolicy`, before any later event; when
the policy gives up, the event becomes a dead letter (recorded with the
cursor moved past it, in one store transaction) or the consumer halts at it
until resumed. A store error ends the incarnation: its cancel scope is
cancelled and, after a backoff, a new incarnation starts from the durable
cursor (or the position already reached, if further), by the start-up path.

A batch consumer (``batch=``) takes the same path; its handler is called
once per batch of up to ``batch`` events (`trioflow._batches`), and a batch
that fails for good is narrowed down to single events (one-event batches),
which take this module's per-event path.

Who owns what: a `Consumer` owns its position and counters; its feed belongs
to the dispatcher (`Subscription`), its cursor progress to the cursor writer
(`CursorProgress`); it changes those only through their owners' methods.
"""

from __future__ import annotations

import collections
import contextvars
import datetime
import logging
import math
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, cast

import attrs
import trio

from ._app import ConsumerSpec
from ._batches import fill_batch, handle_batches
from ._cursors import CursorProgress, CursorWriter
from ._dead_letters import (
    MAX_MESSAGE_LENGTH,
    MAX_TRACEBACK_LENGTH,
    DeadLetter,
    DeadLetterReason,
)
from ._dispatch import Batch, Dispatcher, Subscription, feeding
from ._errors import (
    BatchError,
    ConsumerStateError,
    HandlerTimeoutError,
    LeaseLostError,
    PrunedLogError,
    StoreError,
)
from ._events import Event
from ._groups import partition_of
from ._histograms import SECONDS_BUCKETS, Histogram
from ._ownership import LeaseKeeper, Ownership
from ._pages import PageReader
from ._policies import Decision
from ._statistics import ConsumerStatistics, Stall
from ._store_calls import SlowCalls
from ._transactions import Transaction, append_published
from .stores._base import Store

logger = logging.getLogger("trioflow")

#: Seconds between progress messages while a consumer replays a backlog.
PROGRESS_EVERY = 5.0
#: Events in the first page a replay reads; each next page is twice as large,
#: up to the flow's ``page_size``.
FIRST_PAGE = 32
#: Seconds between looks for requeued dead letters while some are not yet due.
REQUEUE_RECHECK = 5.0


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


class _Halted(Exception):
    """The policy halts the consumer at ``event`` (internal: ends its incarnation)."""

    def __init__(self, event: Event, error: BaseException, attempts: int) -> None:
        super().__init__(event, error, attempts)
        self.event = event
        self.error = error
        self.attempts = attempts


def _plain(spec: ConsumerSpec) -> Callable[[Event], Awaitable[object]]:
    """The handler of a consumer that is not transactional: it takes the event."""
    return cast(Callable[[Event], Awaitable[object]], spec.handler)


def _with_transaction(spec: ConsumerSpec) -> Callable[[Event, Transaction], Awaitable[object]]:
    """The handler of a transactional consumer: it takes the event and its transaction."""
    return cast(Callable[[Event, Transaction], Awaitable[object]], spec.handler)


def _batch_handler(spec: ConsumerSpec) -> Callable[[Sequence[Event]], Awaitable[object]]:
    """The handler of a batch consumer that is not transactional: it takes the events."""
    return cast(Callable[[Sequence[Event]], Awaitable[object]], spec.handler)


def _batch_with_transaction(
    spec: ConsumerSpec,
) -> Callable[[Sequence[Event], Transaction], Awaitable[object]]:
    """The handler of a transactional batch consumer: it takes the events and their
    transaction."""
    return cast(Callable[[Sequence[Event], Transaction], Awaitable[object]], spec.handler)


def _handler_error(error: Exception) -> Exception:
    """What the delivery policy decides on: a `BatchError`'s cause, else the error."""
    return error.cause if isinstance(error, BatchError) else error


def _describe(error: BaseException) -> str:
    return f"{type(error).__qualname__}: {error}"


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


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


@attrs.define(eq=False)
class Consumer:
    """One consumer of a flow: its loop, and the position and counters it owns."""

    spec: ConsumerSpec
    _runner: ConsumerRunner
    _feed: Subscription
    _cursor: CursorProgress
    #: Whether this flow owns it, as the lease keeper knows.
    _ownership: Ownership
    #: Last sequence number handled (or skipped by the type filter, or given
    #: up on as a dead letter), in memory.
    _position: int = 0
    _processed: int = 0
    _failures: int = 0
    _retries: int = 0
    _redelivered: int = 0
    _restarts: int = 0
    _dead_lettered: int = 0
    #: Seconds per handler call.
    _handler_duration: Histogram = attrs.Factory(lambda: Histogram(SECONDS_BUCKETS))
    #: trio.current_time() of its last cursor commit request on a schedule.
    _requested_at: float = 0.0
    #: The shielded scope around its current handlers, while it has one.
    _handler_scope: trio.CancelScope | None = None
    #: The wait before the next attempt at a failed event, while it waits.
    _backoff_scope: trio.CancelScope | None = None
    #: A batch consumer's wait for more events to fill a batch (``max_wait``).
    _fill_scope: trio.CancelScope | None = None
    #: A batch consumer's: a batch taken from its feed while filling one, that
    #: does not follow on from it (it handles it next).
    _held: Batch | None = None
    #: A batch consumer's: the positions after each batch it handled that may
    #: not be durable yet (its redelivery bound counts batches).
    _batch_ends: collections.deque[int] = attrs.Factory(collections.deque)
    #: Stopping on its own (removed from the flow), not with the whole flow,
    #: and when its handlers in flight are cancelled then (trio time).
    _stopping: bool = False
    _stop_deadline: float = math.inf
    #: The event it is held up at, and whether it halted there.
    _stall: Stall | None = None
    _halted: bool = False
    _resumed: trio.Event = attrs.Factory(trio.Event)
    #: When to look for requeued dead letters next (trio time).
    _requeue_check_at: float = -math.inf
    _in_requeues: bool = False
    #: The requeued dead letter being handled, if any: a transactional handler
    #: removes it in its own transaction.
    _requeued_letter: int | None = None
    _finished: trio.Event = attrs.Factory(trio.Event)

    @property
    def name(self) -> str:
        """The durable consumer name."""
        return self.spec.name

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
        self._requeue_check_at = min(self._requeue_check_at, trio.current_time() + after)
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

    def _must_stop(self) -> bool:
        return self._stopping or self._runner.stopping

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
            halted: _Halted | None = None
            with trio.CancelScope() as scope:
                try:
                    await self._incarnation(status)
                except _Halted as exc:
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

    async def _halt(self, halted: _Halted) -> None:
        """Stay halted at the event until resumed; then a new incarnation retries it."""
        event = halted.event
        self._halted = True
        self._stall = Stall(
            seq=event.seq,
            type=event.type,
            attempts=halted.attempts,
            last_error=_describe(halted.error),
            next_attempt_at=None,
        )
        # Nothing is held for it while it waits: it catches up from the store.
        self._runner.dispatcher.detach(self._feed)
        logger.error(
            "consumer %r halted at seq=%d (type %r) after %d attempt(s); every other consumer "
            "goes on; resume it with `await flow.resume(%r)` (or by starting a new flow)",
            self.name,
            event.seq,
            event.type,
            halted.attempts,
            self.name,
            exc_info=halted.error,
        )
        await self._resumed.wait()
        self._resumed = trio.Event()
        self._halted = False
        self._stall = None
        logger.info("consumer %r resumed at seq=%d", self.name, event.seq)

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
                batch = await fill_batch(self, batch)
            await self._handle(batch.events, batch.upto)

    async def _first_cursor(self) -> int:
        """Store the cursor of a consumer the store holds none for, at once; return it.

        ``"earliest"`` begins after the pruned part of the log: with the
        oldest event kept. Stored at once, the cursor holds pruning back
        from then on; a prune that was under way meanwhile may have passed
        it, so the bounds are read again after it landed (`Store.log_bounds`
        waits for such a prune) and the cursor moved up to the pruned log:
        for a new consumer that is where the earliest event still is.
        """
        runner, spec = self._runner, self.spec
        bounds = await runner.store.log_bounds()
        cursor = bounds.pruned_through if spec.start == "earliest" else bounds.head
        while True:
            await runner.cursors.commit_first(self._cursor, cursor, self._processed)
            pruned_through = (await runner.store.log_bounds()).pruned_through
            if pruned_through <= cursor:
                return cursor
            cursor = pruned_through

    async def _check_not_pruned(self, cursor: int) -> None:
        """Refuse to start from a stored cursor whose next events were pruned.

        Pruning never passes a stored cursor, so this takes force: a cursor
        written into the database by hand, or restored from an old backup.

        Raises:
            PrunedLogError: Events after ``cursor`` were pruned.
        """
        pruned_through = (await self._runner.store.log_bounds()).pruned_through
        if cursor < pruned_through:
            name = self.spec.name
            if self.spec.partition is None:
                command = f"`trioflow consumers reset {name} --to earliest`, or "
                remove = f"`trioflow consumers remove {name}`, or "
            else:
                # The command moves or removes a whole group, never one
                # partition: resetting would send the others back too.
                group = name.rpartition("/")[0]
                command = ""
                remove = f"the whole group: `trioflow consumers remove {group}`, or "
            raise PrunedLogError(
                f"consumer {name!r} has cursor {cursor}, but the events up to "
                f"{pruned_through} were pruned: it would skip events {cursor + 1} to "
                f"{pruned_through}, so it does not start. Set its cursor to {pruned_through} "
                f"or later to go on with the oldest event kept ({command}"
                f"store.set_cursor({name!r}, {pruned_through})), or remove it to start afresh "
                f"({remove}store.forget_consumer({name!r}))",
                consumers={name: cursor},
            )

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

    async def _handle(self, events: Sequence[Event], upto: int) -> None:
        """Run the handler on each new event, in order, with the policy; then move to ``upto``.

        Handlers run shielded: an outside cancellation never interrupts one
        mid-event. Stopping sets a deadline on the shield (the grace period),
        and cancels a wait between attempts at a failed event.

        Cursor commits are requested every ``commit_every // 2`` handled
        events without waiting; the consumer waits for one only before it
        would hold ``commit_every`` handled events that are not durable, which
        is what bounds redelivery after a crash.
        """
        runner, spec, cursor = self._runner, self.spec, self._cursor
        handler = _plain(spec)
        types = spec.types
        partition, partitions = spec.partition, spec.partitions or 1
        timed = spec.policy.timeout is not None
        transactional = spec.transactional
        commit_every = spec.commit_every
        request_every = max(commit_every // 2, 1)
        cursors = runner.cursors
        # Per event: two reads of the clock and an append (`Histogram.observe`).
        clock, spent = trio.lowlevel.current_clock().current_time, self._handler_duration.observe
        deadline = min(runner.stop_deadline, self._stop_deadline)
        with (
            trio.CancelScope(shield=True, deadline=deadline) as scope,
            self._ownership.cancelling(scope),
        ):
            self._handler_scope = scope
            finished = True
            if spec.batch is not None and not transactional:
                finished = await handle_batches(self, events)
                events = ()
            elif transactional and (commit_every > 1 or spec.batch is not None):
                # Whole transactions of up to commit_every events (a batch
                # consumer's: batch); from a failed one on, one event per
                # transaction, with the policy.
                events = await self._handle_in_transactions(events)
            for event in events:
                seq = event.seq
                if seq <= self._position:
                    continue
                if self._must_stop() or not self._ownership.owned:
                    # Lost, or its lease's time ran out: the cancellation
                    # reaches the incarnation at its next checkpoint (once the
                    # keeper has run); no handler starts meanwhile.
                    finished = False
                    break
                if (types is None or event.type in types) and (
                    partition is None or partition_of(event.key, seq, partitions) == partition
                ):
                    if self._processed - cursor.committed_processed >= commit_every:
                        cursors.request(cursor, self._position, self._processed)
                        await cursors.wait_durable(cursor, self._position)
                    try:
                        if transactional:
                            await self._call_in_transaction(event)
                        else:
                            started = clock()
                            try:
                                if timed:
                                    await self._call_timed((event,))
                                else:
                                    await handler(event)
                            finally:
                                spent(clock() - started)
                    except Exception as exc:
                        self._reraise_store_failure(exc)
                        outcome = await self._after_failure(event, exc, requeued=False)
                        if outcome == "stopped":
                            finished = False
                            break
                        if outcome == "dead-lettered":
                            self._position = seq
                            continue
                    self._processed += 1
                    self._position = seq
                    if self._processed - cursor.requested_processed >= request_every:
                        self._requested_at = trio.current_time()
                        cursors.request(cursor, seq, self._processed)
                else:
                    self._position = seq
            if finished:
                if upto > self._position:
                    self._position = upto
                now = trio.current_time()
                if now - self._requested_at >= runner.commit_interval:
                    self._requested_at = now
                    cursors.request(cursor, self._position, self._processed)
        self._handler_scope = None
        if self._must_stop():
            # Leave the rest to the stop sequence, which cancels this task.
            await trio.sleep_forever()

    async def _invoke(self, events: Sequence[Event], tx: Transaction | None = None) -> None:
        """Call the handler once: on ``events`` (a batch consumer's), else on its one event."""
        spec = self.spec
        if spec.batch is None:
            (event,) = events
            if tx is None:
                await _plain(spec)(event)
            else:
                await _with_transaction(spec)(event, tx)
        # A list of its own, every call: the handler may keep or change it.
        elif tx is None:
            await _batch_handler(spec)(list(events))
        else:
            await _batch_with_transaction(spec)(list(events), tx)

    async def _call_timed(self, events: Sequence[Event], tx: Transaction | None = None) -> None:
        """Call the handler, cancelled after the policy's timeout (a failed attempt)."""
        timeout = self.spec.policy.timeout
        assert timeout is not None
        first = events[0]
        seqs = f"seq={first.seq}" if len(events) == 1 else f"seqs {first.seq}..{events[-1].seq}"
        started = trio.current_time()
        # Reported if it goes on well past its timeout: cancellation cannot
        # stop a blocking call, or code that catches trio.Cancelled.
        with (
            self._runner.slow_calls.track(
                still=f"the handler of consumer {self.name!r} on {seqs} is still "
                f"running {{elapsed:.1f}}s after it started, though it was cancelled at its "
                f"timeout of {timeout:g}s: it ignores cancellation (a blocking call, or code "
                "that catches trio.Cancelled)",
                done=f"the handler of consumer {self.name!r} on {seqs} returned "
                "{elapsed:.1f}s after it started",
                after=2 * timeout,
            ),
            trio.move_on_after(timeout) as scope,
        ):
            await self._invoke(events, tx)
        if scope.cancelled_caught:
            raise HandlerTimeoutError(
                self.name, first.seq, first.type, timeout, trio.current_time() - started
            )

    async def _call_events(self, events: Sequence[Event]) -> None:
        """Call a handler that is not transactional once, with the timeout if any."""
        started = trio.current_time()
        try:
            if self.spec.policy.timeout is None:
                await self._invoke(events)
            else:
                await self._call_timed(events)
        finally:
            self._handler_duration.observe(trio.current_time() - started)

    async def _call(self, event: Event) -> None:
        """Handle one event (a batch consumer's: as a batch of one)."""
        if self.spec.transactional:
            # Times its handler calls itself, not the transaction around them.
            await self._call_in_transaction(event)
        else:
            await self._call_events((event,))

    def _selects(self, event: Event) -> bool:
        spec = self.spec
        if spec.types is not None and event.type not in spec.types:
            return False
        return spec.partition is None or (
            partition_of(event.key, event.seq, spec.partitions or 1) == spec.partition
        )

    async def _handle_in_transactions(self, events: Sequence[Event]) -> Sequence[Event]:
        """Handle ``events`` (a transactional consumer's) in transactions of up to
        ``commit_every`` of them, each committing its handlers' statements, what
        they published and the cursor move past its last event.

        Returns the events still to handle: none, or those from the first
        transaction that failed on (its handler raised; it rolled back), for
        `_handle` to take one per transaction with the delivery policy.
        """
        runner, spec, cursors = self._runner, self.spec, self._runner.cursors
        pending = [event for event in events if event.seq > self._position]
        start = 0
        while start < len(pending):
            if self._must_stop() or not self._ownership.owned:
                return pending[start:]
            chunk: list[Event] = []
            end = start
            size = spec.commit_every if spec.batch is None else spec.batch
            while end < len(pending) and len(chunk) < size:
                if self._selects(pending[end]):
                    chunk.append(pending[end])
                end += 1
            last = pending[end - 1].seq
            if chunk:
                try:
                    published = await self._call_chunk_in_transaction(chunk, last)
                except Exception as exc:
                    self._reraise_store_failure(exc)
                    return pending[start:]
                self._processed += len(chunk)
                cursors.landed(self._cursor, last, self._processed)
                if published:
                    runner.dispatcher.request_poll()
            self._position = last
            start = end
        return ()

    async def _call_chunk_in_transaction(self, chunk: Sequence[Event], last: int) -> bool:
        """One transaction for ``chunk``'s handler calls and the cursor move to
        ``last`` (and, for a requeued dead letter, its removal); return whether
        the handlers published."""
        runner = self._runner
        seqs = f"{chunk[0].seq}" if len(chunk) == 1 else f"{chunk[0].seq}..{chunk[-1].seq}"
        async with runner.store.transaction() as store_tx:
            tx = Transaction(store_tx, f"the handler of consumer {self.name!r} on seq={seqs}")
            try:
                if self.spec.batch is not None:
                    # One call for the whole chunk: it is the batch.
                    await self._call_in(chunk, tx)
                else:
                    for event in chunk:
                        await self._call_in((event,), tx)
            finally:
                tx._close()
            published = await append_published(tx)
            if len(chunk) == 1 and self._requeued_letter == chunk[0].seq:
                # Behind the cursor already; the letter goes with the effects.
                await store_tx.discard_dead_letters(self.name, [chunk[0].seq])
            await runner.cursors.commit_in_transaction(store_tx, self._cursor, last)
        return bool(published)

    async def _call_in(self, events: Sequence[Event], tx: Transaction) -> None:
        """Call a transactional handler once in ``tx``, with the timeout if any;
        timed itself, not the transaction around it."""
        started = trio.current_time()
        try:
            if self.spec.policy.timeout is None:
                await self._invoke(events, tx)
            else:
                await self._call_timed(events, tx)
        finally:
            self._handler_duration.observe(trio.current_time() - started)

    def _reraise_store_failure(self, error: Exception) -> None:
        """Raise ``error`` again if it is not the handler's failure but the store's:
        a lost lease, or (around a transactional handler) the transaction's store
        failing; those take the restart-from-cursor path, not the delivery policy."""
        if isinstance(error, LeaseLostError) or (
            self.spec.transactional and isinstance(error, StoreError)
        ):
            raise error

    async def _call_in_transaction(self, event: Event) -> None:
        """Call a transactional handler in a store transaction that also moves the
        cursor past ``event`` (and appends what the handler published): all of it
        commits, or none of it (the handler raised, the lease was lost, a crash)."""
        runner = self._runner
        published = await self._call_chunk_in_transaction([event], event.seq)
        # Durable now: the position moves with the count of handled events.
        runner.cursors.landed(self._cursor, event.seq, self._processed + 1)
        if published:
            runner.dispatcher.request_poll()

    async def _after_failure(
        self, event: Event, error: Exception, *, requeued: bool
    ) -> Literal["handled", "dead-lettered", "stopped"]:
        """Apply the policy to an event whose handler just failed: retry it in place
        until it succeeds, or give it up (a dead letter; or halt, by raising `_Halted`).
        Returns ``"stopped"`` when the consumer stops while it waits to retry."""
        policy = self.spec.policy
        attempts = 1
        first_failed_at = _utcnow()
        error = _handler_error(error)
        while True:
            self._failures += 1
            decision = policy.after_failure(error, attempts)
            if decision.action != "retry":
                await self._give_up(
                    event, error, attempts, first_failed_at, decision, requeued=requeued
                )
                return "dead-lettered"
            if not await self._back_off(event, error, attempts, decision.delay):
                return "stopped"
            attempts += 1
            self._retries += 1
            try:
                await self._call(event)
            except Exception as exc:
                self._reraise_store_failure(exc)
                error = _handler_error(exc)
                continue
            self._stall = None
            return "handled"

    async def _give_up(
        self,
        event: Event,
        error: Exception,
        attempts: int,
        first_failed_at: datetime.datetime,
        decision: Decision,
        *,
        requeued: bool,
    ) -> None:
        """Give ``event`` up as ``decision`` says: record it as a dead letter (the
        cursor moved past it), or halt at it (by raising `_Halted`)."""
        if decision.action == "halt":
            raise _Halted(event, error, attempts)
        assert decision.reason is not None
        await self._dead_letter(
            event, error, attempts, first_failed_at, decision.reason, requeued=requeued
        )
        self._stall = None

    async def _back_off(
        self, event: Event, error: Exception, attempts: int, delay: float, *, batch: int = 1
    ) -> bool:
        """Note the stall at ``event`` (the first of ``batch`` events), log, and wait
        ``delay`` before the next attempt; return False if it must stop instead."""
        self._stall = Stall(
            seq=event.seq,
            type=event.type,
            attempts=attempts,
            last_error=_describe(error),
            next_attempt_at=_utcnow() + datetime.timedelta(seconds=delay),
        )
        logger.error(
            "consumer %r failed on seq=%d (type %r)%s, attempt %d: %s; retrying in %.2fs",
            self.name,
            event.seq,
            event.type,
            "" if batch == 1 else f" and the {batch - 1} event(s) after it in its batch",
            attempts,
            _describe(error),
            delay,
            # The whole traceback once; the attempts after, one line each.
            exc_info=error if attempts == 1 else None,
        )
        with trio.CancelScope() as backoff:
            self._backoff_scope = backoff
            if self._must_stop():
                backoff.cancel()
            await trio.sleep(delay)
        self._backoff_scope = None
        return not (backoff.cancelled_caught or self._must_stop() or not self._ownership.owned)

    async def _dead_letter(
        self,
        event: Event,
        error: Exception,
        attempts: int,
        first_failed_at: datetime.datetime,
        reason: DeadLetterReason,
        *,
        requeued: bool,
    ) -> None:
        letter = DeadLetter(
            consumer=self.name,
            seq=event.seq,
            event_id=event.id,
            type=event.type,
            attempts=attempts,
            first_failed_at=first_failed_at,
            last_failed_at=_utcnow(),
            reason=reason,
            error_type=f"{type(error).__module__}.{type(error).__qualname__}",
            message=str(error)[:MAX_MESSAGE_LENGTH],
            traceback="".join(traceback.format_exception(error))[-MAX_TRACEBACK_LENGTH:],
        )
        cursors = self._runner.cursors
        if requeued:
            # Behind its cursor already: the letter alone is written again.
            await cursors.record_dead_letter(self._cursor, letter, None, self._processed)
        else:
            await cursors.record_dead_letter(self._cursor, letter, event.seq, self._processed)
        self._dead_lettered += 1
        logger.error(
            "consumer %r gave up on seq=%d (type %r) after %d attempt(s) (%s: %s) and recorded "
            "it as a dead letter; see `await flow.dead_letters(%r)`",
            self.name,
            event.seq,
            event.type,
            attempts,
            reason,
            _describe(error),
            self.name,
        )

    async def _handle_requeued(self) -> None:
        """Handle its requeued dead letters that are due, in seq order, with its policy.

        Each one handled is removed from the store; one that fails for good is
        a dead letter again (parked), or halts the consumer.
        """
        self._in_requeues = True
        try:
            await self._handle_due_requeues()
        finally:
            self._in_requeues = False
            # `Flow.wait_idle` waits for requeued letters too.
            self._runner.cursors.nudge()

    async def _handle_due_requeues(self) -> None:
        runner = self._runner
        self._requeue_check_at = math.inf
        store = runner.store
        for letter in await store.due_dead_letters(self.name):
            page = await store.read(letter.seq - 1, 1)
            if not page or page[0].seq != letter.seq:
                logger.error(
                    "consumer %r: the event of requeued dead letter seq=%d is no longer in the "
                    "store; the dead letter stays (discard it with `flow.discard`)",
                    self.name,
                    letter.seq,
                )
                continue
            event = page[0]
            if self._must_stop() or not self._ownership.owned:
                # Not this flow's to handle now (see `_handle`).
                return
            deadline = min(runner.stop_deadline, self._stop_deadline)
            with (
                trio.CancelScope(shield=True, deadline=deadline) as scope,
                self._ownership.cancelling(scope),
            ):
                self._handler_scope = scope
                self._requeued_letter = letter.seq
                self._redelivered += 1
                try:
                    await self._call(event)
                except Exception as exc:
                    self._reraise_store_failure(exc)
                    outcome = await self._after_failure(event, exc, requeued=True)
                else:
                    outcome = "handled"
                finally:
                    self._requeued_letter = None
                if outcome == "handled":
                    if not self.spec.transactional:
                        # A transactional handler removed it in its transaction.
                        await store.discard_dead_letters(self.name, [letter.seq])
                    self._processed += 1
            self._handler_scope = None
            if outcome == "stopped" or self._must_stop():
                return
        # Letters requeued to come due later: look again then.
        later = [
            letter.due_at
            for letter in await store.dead_letters(self.name)
            if letter.due_at is not None
        ]
        if later:
            # By this host's clock, which may differ from the store's: look
            # again at least every few seconds.
            wait = (min(later) - _utcnow()).total_seconds()
            self._requeue_check_at = trio.current_time() + min(max(wait, 0.0), REQUEUE_RECHECK)
