"""The dispatcher: group-commits published events, then fans them out.

One task owns the order of the live stream. It takes every publish request
waiting, commits them to the store in one transaction (group commit), wakes
the publishers, and sends the new events, as one `Batch`, to the memory
channel of every attached consumer. Events appended by other processes or
flows are read from the store and fanned out the same way, so consumers see
one stream in sequence order whoever published.

Each consumer's side of the fan-out is a `Subscription`, which this module
owns: its channel, what it holds (events and bytes), and whether it is fed
at all (a bounded consumer too far behind is detached, and re-attaches once
it has caught up from the store, level with the dispatcher's head).
"""

from __future__ import annotations

import collections
import contextvars
import logging
import math
from collections.abc import Callable, Sequence

import attrs
import trio

from ._errors import BackpressureError, FlowClosedError, OutcomeUnknownError, StoreError
from ._events import DECODED_KEPT, DECODED_KEPT_BYTES, Event, NewEvent
from ._groups import partition_of
from ._histograms import BATCH_BUCKETS, SECONDS_BUCKETS, Histogram, HistogramSnapshot
from ._policies import Overflow
from .stores._base import Store

logger = logging.getLogger("trioflow")

#: The most event data one group commit takes from concurrent publishes (a
#: single publish larger than this goes alone): PostgreSQL refuses a statement
#: over 1 GB, and a group that fails fails every publish in it.
MAX_BATCH_BYTES = 16 * 1024 * 1024


@attrs.frozen(slots=True)
class Batch:
    """A slice of the live stream, as sent to one consumer.

    ``events`` holds every event with ``after < seq <= upto`` that the
    consumer subscribes to (those of other types were left out), in order.
    A consumer whose position is below ``after`` has missed events and reads
    them from the store first.
    """

    after: int
    upto: int
    events: Sequence[Event]
    #: The events' total `Event.size`.
    size: int = 0


@attrs.define(eq=False)
class Subscription:
    """One consumer's feed from the dispatcher: its channel and what it holds.

    The dispatcher offers it batches; the consumer takes them. Whether it is
    attached (fed live) changes only here: the dispatcher detaches it when a
    batch would pass its bounds, and attaches it when it is level.
    """

    name: str
    #: The event types it takes, or None for all.
    types: frozenset[str] | None
    #: The partition it takes, and of how many (a consumer group's), or None for all.
    partition: tuple[int, int] | None
    #: The most events and bytes it may hold, or None.
    buffer: int | None
    buffer_bytes: int | None
    #: Past its bounds: detach it (it catches up from the store), or make the
    #: flow's publishers wait until it has room (`Dispatcher`).
    overflow: Overflow
    #: Woken whenever it takes a batch (the dispatcher waits there for room).
    _room: trio.lowlevel.ParkingLot
    _send: trio.MemorySendChannel[Batch] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[Batch] = attrs.field(init=False)
    _buffered: int = 0
    _buffered_bytes: int = 0
    _attached: bool = True

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[Batch](math.inf)

    @property
    def attached(self) -> bool:
        """False while it is too far behind to be fed live (bounded mode)."""
        return self._attached

    @property
    def buffered(self) -> int:
        """Events sent to its channel and not yet taken."""
        return self._buffered

    @property
    def buffered_bytes(self) -> int:
        """Their total `Event.size`."""
        return self._buffered_bytes

    def take_nowait(self) -> Batch:
        """The next batch, or raise `trio.WouldBlock`."""
        return self._taken(self._receive.receive_nowait())

    async def take(self) -> Batch:
        """Wait for the next batch."""
        return self._taken(await self._receive.receive())

    def attach(self) -> None:
        """Be fed live again (a consumer starting, from whatever position)."""
        self._attached = True

    def wake(self) -> None:
        """Wake the consumer if it waits for a batch (with an empty one it skips)."""
        self._send.send_nowait(Batch(0, 0, ()))

    @property
    def full(self) -> bool:
        """Whether it blocks publishers: ``overflow="block"``, attached, holding ``buffer``."""
        return (
            self.overflow == "block"
            and self._attached
            and self.buffer is not None
            and self._buffered >= self.buffer
        )

    def _drop_held(self) -> None:
        """Drop every batch in its channel (it catches up from the store instead)."""
        while True:
            try:
                self._taken(self._receive.receive_nowait())
            except trio.WouldBlock:
                return

    def _taken(self, batch: Batch) -> Batch:
        self._buffered -= len(batch.events)
        self._buffered_bytes -= batch.size
        if self.overflow == "block":
            self._room.unpark_all()
        return batch

    @property
    def lagging(self) -> bool:
        """Whether it holds more than `DECODED_KEPT` events or `DECODED_KEPT_BYTES` bytes."""
        return self._buffered > DECODED_KEPT or self._buffered_bytes > DECODED_KEPT_BYTES

    def _offer(self, after: int, upto: int, events: Sequence[Event], size: int) -> None:
        """Send it the events it takes of ``after < seq <= upto``, or detach it.

        ``events`` are the batch's, or for a partition of a group the batch's
        events of that partition (the dispatcher splits a batch once), and
        ``size`` is their total `Event.size`.
        """
        if not self._attached:
            return
        types = self.types
        if types is not None:
            events = [e for e in events if e.type in types]
            size = sum(event.size for event in events)
        limit, limit_bytes = self.buffer, self.buffer_bytes
        if self.overflow == "catch-up" and (
            (limit is not None and self._buffered + len(events) > limit)
            or (limit_bytes is not None and self._buffered_bytes + size > limit_bytes)
        ):
            # Too far behind: stop buffering; it catches up from the store.
            # The empty batch wakes it if it is idle, and its `after` tells
            # it to read everything up to here from the store.
            self._attached = False
            self._send.send_nowait(Batch(upto, upto, ()))
            logger.info(
                "consumer %r holds %d events (%d bytes) in memory, more would pass its "
                "buffer; it will catch up from the store",
                self.name,
                self._buffered,
                self._buffered_bytes,
            )
            return
        self._buffered += len(events)
        self._buffered_bytes += size
        self._send.send_nowait(Batch(after, upto, events, size))


#: The feed of the consumer whose handler (or a task it started) runs here, if any.
feeding: contextvars.ContextVar[Subscription | None] = contextvars.ContextVar(
    "trioflow_feeding", default=None
)


@attrs.define(eq=False, slots=True)
class _Publish:
    events: Sequence[NewEvent]
    #: The feed of the consumer whose handler published, if one did.
    publisher: Subscription | None = None
    done: trio.Event = attrs.Factory(trio.Event)
    seqs: Sequence[int] = ()
    error: BaseException | None = None
    size: int = 0
    #: When it was handed to the dispatcher (trio time).
    submitted_at: float = 0.0

    def __attrs_post_init__(self) -> None:
        self.size = sum(event.size for event in self.events)


@attrs.define(eq=False)
class Dispatcher:
    """Group commit and fan-out. See the module docstring."""

    store: Store
    page_size: int
    page_bytes: int
    max_batch: int
    #: Seconds to wait before the n-th attempt to read the head at start-up.
    retry_delay: Callable[[int], float]
    _head: int = 0
    _published: int = 0
    _subscriptions: list[Subscription] = attrs.Factory(list)
    #: Where group commits wait for room in blocking subscriptions.
    _room: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)
    _blocking: bool = True
    _pending: collections.deque[_Publish] = attrs.Factory(collections.deque)
    _wakeup: trio.Event = attrs.Factory(trio.Event)
    #: How far the requested poll reads: the highest head asked for (inf: to
    #: the end of the log, which costs a final read that finds nothing;
    #: -inf: no poll requested).
    _poll_until: float = -math.inf
    _polled: trio.Event = attrs.Factory(trio.Event)
    _poll_ok: bool = True
    _committing: bool = False
    _settled: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)
    #: Seconds from submit to committed, per publish request; events per group commit.
    _publish_latency: Histogram = attrs.Factory(lambda: Histogram(SECONDS_BUCKETS))
    _batch_size: Histogram = attrs.Factory(lambda: Histogram(BATCH_BUCKETS))
    #: While a consumer lags, the events fanned out last, oldest first, and
    #: their total size: past `DECODED_KEPT` (or `DECODED_KEPT_BYTES`) their
    #: decoded data is dropped.
    _recent: collections.deque[Event] = attrs.Factory(collections.deque)
    _recent_bytes: int = 0

    @property
    def head(self) -> int:
        """The last sequence number fanned out to consumers (or known when the
        flow started): every event up to here is in the store."""
        return self._head

    @property
    def published(self) -> int:
        """Events this flow committed since it started."""
        return self._published

    @property
    def publish_latency(self) -> HistogramSnapshot:
        """Seconds from `submit` until the group commit holding the request returned,
        per request that committed."""
        return self._publish_latency.snapshot()

    @property
    def batch_size(self) -> HistogramSnapshot:
        """Events per group commit."""
        return self._batch_size.snapshot()

    def subscribe(
        self,
        name: str,
        *,
        types: frozenset[str] | None,
        partition: tuple[int, int] | None = None,
        buffer: int | None,
        buffer_bytes: int | None,
        overflow: Overflow = "catch-up",
    ) -> Subscription:
        """A new feed for a consumer, attached: it gets every batch from now on."""
        subscription = Subscription(
            name, types, partition, buffer, buffer_bytes, overflow, self._room
        )
        self._subscriptions.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Feed ``subscription`` no more (its consumer left the flow)."""
        self._subscriptions.remove(subscription)
        self._room.unpark_all()

    def stop_blocking(self) -> None:
        """Let publishes through whatever the blocking consumers hold (the flow stops)."""
        self._blocking = False
        self._room.unpark_all()

    def detach(self, subscription: Subscription) -> None:
        """Feed ``subscription`` no more until it is level again (a consumer that
        halted, or stands by while another flow owns it); drop what it holds.

        A detached consumer blocks no publisher and holds no event: it reads
        from the store what it missed when it goes on.
        """
        subscription._attached = False
        subscription._drop_held()
        self._room.unpark_all()

    def attach_if_level(self, subscription: Subscription, position: int) -> bool:
        """Feed ``subscription`` live again if ``position`` is level with the head.

        No checkpoint between a consumer's last replayed event and this call:
        the next batch the dispatcher sends then starts exactly at its head.
        """
        if position < self._head:
            return False
        subscription._attached = True
        return True

    async def submit(self, events: Sequence[NewEvent]) -> Sequence[int]:
        """Commit ``events`` in the next group commit; return their sequence numbers.

        The caller checks first that the flow accepts them (`Flow` does,
        before encoding).

        Raises:
            BackpressureError: A handler of a consumer with ``overflow="block"``
                published while that consumer is full.
        """
        request = _Publish(events, feeding.get(), submitted_at=trio.current_time())
        self._pending.append(request)
        self._wakeup.set()
        try:
            await request.done.wait()
        except trio.Cancelled:
            # Still waiting in the queue: withdraw it, so a cancelled publish
            # that was never sent to the store is certainly not persisted.
            if request in self._pending:
                self._pending.remove(request)
            raise
        if request.error is not None:
            raise request.error
        return request.seqs

    def request_poll(self, until: float = math.inf) -> None:
        """Ask the dispatcher to read the store for events others appended, up to
        ``until`` (a head the store named), else to the end of the log."""
        self._poll_until = max(self._poll_until, until)
        self._wakeup.set()

    async def wait_polled(self) -> bool:
        """Wait until the next requested poll has been done; False if its read failed."""
        await self._polled.wait()
        return self._poll_ok

    async def wait_drained(self) -> None:
        """Wait until every submitted publish request has been answered."""
        await trio.lowlevel.checkpoint()
        while self._pending or self._committing:
            await self._settled.park()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Group-commit and fan out until cancelled.

        Reports itself started once it knows the store's head; a store failure
        before that is retried with backoff (``nursery.start`` waits,
        cancellably).
        """
        failures = 0
        while True:
            try:
                self._head = await self.store.head()
                break
            except StoreError as exc:
                failures += 1
                delay = self.retry_delay(failures)
                logger.warning(
                    "reading the store's head failed (%s); retrying in %.1fs", exc, delay
                )
                await trio.sleep(delay)
        task_status.started()
        try:
            while True:
                if not self._pending and self._poll_until == -math.inf:
                    self._settled.unpark_all()
                    await self._wakeup.wait()
                    self._wakeup = trio.Event()
                if self._pending:
                    self._committing = True
                    try:
                        await self._wait_for_room()
                        if self._pending:
                            await self._commit_pending()
                    finally:
                        self._committing = False
                if self._poll_until > -math.inf:
                    until, self._poll_until = self._poll_until, -math.inf
                    # Events committed since the head was named come along
                    # if the read finds them: no wait for the next wake-up.
                    self._poll_ok = await self._fan_out_from_store(until=until, past=True)
                    self._polled.set()
                    self._polled = trio.Event()
        finally:
            for request in self._pending:
                request.error = FlowClosedError("the flow stopped before the event was committed")
                request.done.set()
            self._pending.clear()
            self._settled.unpark_all()

    async def _wait_for_room(self) -> None:
        """Hold this flow's publishes while a blocking consumer is full (backpressure).

        A publish made by the handler of a full consumer fails instead: it
        would wait for that very consumer, which waits for its handler.
        """
        while self._blocking:
            full = [s for s in self._subscriptions if s.full]
            if not full:
                return
            for request in list(self._pending):
                if request.publisher in full:
                    self._pending.remove(request)
                    assert request.publisher is not None
                    request.error = BackpressureError(
                        f"a handler of consumer {request.publisher.name!r} published while that "
                        f"consumer holds its buffer of {request.publisher.buffer} events "
                        "(overflow='block'): waiting for room would wait for this very "
                        "handler. Nothing was persisted; publish from another task, or give "
                        "the consumer a larger buffer or overflow='catch-up'"
                    )
                    request.done.set()
            if not self._pending:
                return
            await self._room.park()

    async def _commit_pending(self) -> None:
        taken: list[_Publish] = []
        count = size = 0
        while self._pending and (
            not taken
            or (
                count + len(self._pending[0].events) <= self.max_batch
                and size + self._pending[0].size <= MAX_BATCH_BYTES
            )
        ):
            request = self._pending.popleft()
            taken.append(request)
            count += len(request.events)
            size += request.size
        events = [event for request in taken for event in request.events]
        try:
            appended = await self.store.append(events)
        except StoreError as exc:
            logger.warning("committing %d published events failed: %s", len(events), exc)
            for request in taken:
                request.error = exc
                request.done.set()
            return
        except BaseException:
            for request in taken:
                request.error = OutcomeUnknownError(
                    "the flow stopped while the event was being committed; it may or may not "
                    "have been persisted"
                )
                request.done.set()
            raise
        start = 0
        committed_at = trio.current_time()
        latency = self._publish_latency
        for request in taken:
            request.seqs = appended.seqs[start : start + len(request.events)]
            start += len(request.events)
            request.done.set()
            latency.observe(committed_at - request.submitted_at)
        self._published += len(events)
        self._batch_size.observe(len(events))
        if not events:
            return
        if appended.after > self._head:
            # Others appended since our last look: fan theirs out first.
            await self._fan_out_from_store(until=appended.after)
        persisted = appended.events
        if persisted is None:
            created_at = appended.created_at
            persisted = [
                new.persisted(seq, created_at)
                for new, seq in zip(events, appended.seqs, strict=True)
            ]
        # The batch starts where the store says the log stood before it, not
        # at our head: if others' events could not be read just now, the gap
        # tells every consumer to read them from the store itself.
        self._fan_out(appended.after, persisted)

    async def _fan_out_from_store(self, *, until: float, past: bool = False) -> bool:
        """Fan out events others appended, reading until the head is at ``until``; the
        events of the last page past ``until`` too if ``past``. False if a read failed."""
        while self._head < until:
            try:
                page = await self.store.read(self._head, self.page_size, max_bytes=self.page_bytes)
            except StoreError as exc:
                # Consumers fill any gap from the store themselves (batches
                # say where they start); the next poll tries again.
                logger.warning("reading new events from the store failed: %s", exc)
                return False
            if not past:
                page = [event for event in page if event.seq <= until]
            if not page:
                return True
            self._fan_out(self._head, page)
        return True

    def _fan_out(self, after: int, events: Sequence[Event]) -> None:
        upto = events[-1].seq
        size = sum(event.size for event in events)
        #: The batch split by partition, with each part's size, per partition
        #: count: once per group, not once per partition.
        split: dict[int, tuple[list[list[Event]], list[int]]] = {}
        lagging = False
        for subscription in self._subscriptions:
            part = subscription.partition
            if part is None:
                subscription._offer(after, upto, events, size)
            else:
                mine, partitions = part
                parts = split.get(partitions)
                if parts is None:
                    buckets: list[list[Event]] = [[] for _ in range(partitions)]
                    for event in events:
                        buckets[partition_of(event.key, event.seq, partitions)].append(event)
                    parts = split[partitions] = (
                        buckets,
                        [sum(event.size for event in bucket) for bucket in buckets],
                    )
                subscription._offer(after, upto, parts[0][mine], parts[1][mine])
            lagging = lagging or subscription.lagging
        self._head = upto
        self._forget_old_data(events, size, lagging=lagging)

    def _forget_old_data(self, events: Sequence[Event], size: int, *, lagging: bool) -> None:
        """While a consumer lags, drop the decoded data of events now far behind the
        head (`Event.forget_data`).

        Consumers that keep up have handled them; one that lags keeps their
        JSON text only, not a decoded copy several times its size. It may hold
        up to `DECODED_KEPT` events decoded before it counts as lagging, and
        as many of the latest after.

        While no consumer lags, nothing is kept here: an event every consumer
        has handled is freed at once (by reference counting). Keeping the last
        few thousand for nothing would keep each one's objects alive long
        enough for the garbage collector to move them to its oldest
        generation, whose full collections then come often and scan them all.
        """
        recent = self._recent
        if not lagging:
            if recent:
                recent.clear()
                self._recent_bytes = 0
            return
        recent.extend(events)
        self._recent_bytes += size
        while len(recent) > DECODED_KEPT or (
            self._recent_bytes > DECODED_KEPT_BYTES and len(recent) > 1
        ):
            old = recent.popleft()
            self._recent_bytes -= old.size
            old.forget_data()
