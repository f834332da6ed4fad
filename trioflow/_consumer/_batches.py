"""A batch consumer's delivery: filling batches from its feed, and handling them.

A batch consumer (``batch=N``) lives as any consumer does (`trioflow._consumer`):
it replays from its cursor, then takes the dispatcher's batches from its feed.
What differs is here:

* `Batches._fill_batch`: live, it joins the batches already waiting in its feed to the
  one it took, without a channel ``await`` per batch, up to ``batch`` events;
  with ``max_wait``, it waits that long for more before it hands them over.
* `Batches._handle_batches`: it cuts what it holds into batches of up to ``batch``
  events it selects (types, partition), calls the handler once per batch, and
  moves its position past a batch once the handler returns. A `BatchError`
  moves it past the events the handler says it did, and names the event that
  failed; the delivery policy decides on the failure, and a retry hands over
  the rest, in place, after the backoff. When the policy gives up:

  - on a named event (a `BatchError`): that event is given up on (a dead
    letter, or a halt), after its attempts, as a single event's would be,
    and the rest goes on in batches;
  - on a batch that failed as a whole (any other error, a timeout): the
    failing event is unknown, so the rest of the batch is narrowed down:
    handed over one event at a time (batches of one), each with the whole
    policy, by the consumer's per-event path, so only events that fail on
    their own become dead letters or halt the consumer.
* Its redelivery bound counts batches: before a batch, it waits for its cursor
  to be durable if it would otherwise hold ``commit_every`` handled batches
  (or parts of batches a `BatchError` marked done) that are not.

The consumer owns the state this module changes (its position, counters and
batch ends): these are its methods, in a class of their own so that each file
does one job.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Sequence

import trio

from .._dispatch import Batch
from .._errors import BatchError
from .._events import Event
from ._failures import Failures
from ._state import utcnow

logger = logging.getLogger("trioflow")


def _seq(event: Event) -> int:
    return event.seq


class Batches(Failures):
    """A batch consumer's delivery: filling batches, and handling them with the policy."""

    __slots__ = ()

    async def _fill_batch(self, batch: Batch) -> Batch:
        """``batch``, joined by the batches that follow on from it in the consumer's feed.

        Takes what is waiting (no channel wait) until it holds ``spec.batch``
        events; with ``spec.max_wait``, waits up to that long from now for more.
        A batch that does not follow on (the consumer was detached meanwhile) is
        kept for the consumer's loop to take next (``Consumer._held``).
        """
        spec, feed = self.spec, self._feed
        size, max_wait = spec.batch, spec.max_wait
        assert size is not None
        if len(batch.events) >= size or (max_wait is None and feed.buffered == 0):
            return batch
        events: list[Event] = list(batch.events)
        upto = batch.upto
        deadline = -math.inf if max_wait is None else trio.current_time() + max_wait
        while len(events) < size:
            more: Batch | None = None
            try:
                more = feed.take_nowait()
            except trio.WouldBlock:
                if max_wait is None or self._must_stop() or not feed.attached:
                    break
                with trio.move_on_at(deadline) as waiting:
                    self._fill_scope = waiting
                    more = await feed.take()
                self._fill_scope = None
                if more is None:
                    break
            if more.upto <= upto:
                continue  # a wake-up (requeued letters): the loop looks for them next
            if more.after > upto:
                self._held = more
                break
            events.extend(event for event in more.events if event.seq > upto)
            upto = more.upto
        return Batch(batch.after, upto, events)

    async def _handle_batches(self, events: Sequence[Event]) -> bool:
        """Hand ``events`` past the consumer's position to its handler, in batches.

        Runs in the consumer's handler scope (`Handling._handle`). Returns True
        once every event is handled (or given up on, as the policy says), False
        if it stopped first: the flow or the consumer is stopping, or this flow
        no longer owns it.
        """
        spec = self.spec
        size = spec.batch
        assert size is not None
        filtered = spec.types is not None or spec.partition is not None
        start = bisect.bisect_right(events, self._position, key=_seq)
        while start < len(events):
            chunk: Sequence[Event]
            if filtered:
                selected: list[Event] = []
                end = start
                while end < len(events) and len(selected) < size:
                    if self._selects(events[end]):
                        selected.append(events[end])
                    end += 1
                chunk = selected
            else:
                end = min(start + size, len(events))
                chunk = events[start:end]
            if chunk and not await self._deliver_batch(chunk):
                return False
            self._position = max(self._position, events[end - 1].seq)
            start = end
        return True

    async def _deliver_batch(self, chunk: Sequence[Event]) -> bool:
        """Handle one batch with the delivery policy; False if it stopped first."""
        policy = self.spec.policy
        attempts = 0
        first_failed_at = utcnow()
        while True:
            await self._take_turns()
            if self._must_stop() or not self._ownership.owned:
                # As for single events: no handler starts once the consumer is
                # stopping or lost (the cancellation comes at the next checkpoint).
                return False
            await self._room_for_a_batch()
            try:
                await self._call_events(chunk)
            except Exception as exc:
                self._reraise_store_failure(exc)
                index, error, named = self._how_far(exc, len(chunk))
                if index:
                    self._batch_done(chunk[:index])
                    chunk = chunk[index:]
                    attempts = 0  # the attempts count per first event of a batch
                if not attempts:
                    first_failed_at = utcnow()
                attempts += 1
                self._failures += 1
                decision = policy.after_failure(error, attempts)
                if decision.action == "retry":
                    retry = await self._back_off(
                        chunk[0], error, attempts, decision.delay, batch=len(chunk)
                    )
                    if not retry:
                        return False
                    continue
                self._stall = None
                if named:
                    # The handler named the event that failed: give it up alone.
                    await self._give_up(
                        chunk[0], error, attempts, first_failed_at, decision, requeued=False
                    )
                    self._position = chunk[0].seq
                    chunk, attempts = chunk[1:], 0
                    if not chunk:
                        return True
                    continue
                if len(chunk) > 1:
                    logger.warning(
                        "consumer %r gave up on the batch of seqs %d..%d after %d attempt(s) "
                        "(%s: %s); it hands those %d events over one at a time, so that only "
                        "the events that fail on their own become dead letters or halt it",
                        self.name,
                        chunk[0].seq,
                        chunk[-1].seq,
                        attempts,
                        type(error).__qualname__,
                        error,
                        len(chunk),
                    )
                return await self._one_at_a_time(chunk)
            self._stall = None
            self._batch_done(chunk)
            return True

    async def _one_at_a_time(self, events: Sequence[Event]) -> bool:
        """Handle ``events`` as batches of one, each with the whole delivery policy."""
        for event in events:
            await self._take_turns()
            if self._must_stop() or not self._ownership.owned:
                return False
            await self._room_for_a_batch()
            try:
                await self._call(event)
            except Exception as exc:
                self._reraise_store_failure(exc)
                outcome = await self._after_failure(event, exc, requeued=False)
                if outcome == "stopped":
                    return False
                if outcome == "dead-lettered":
                    self._position = event.seq
                    continue
            self._batch_done((event,))
        return True

    def _how_far(self, error: Exception, size: int) -> tuple[int, Exception, bool]:
        """How many events of a batch of ``size`` its failed handler did, why it failed,
        and whether it named the event that failed (the one after those it did)."""
        if not isinstance(error, BatchError):
            return 0, error, False
        if error.index >= size:
            logger.warning(
                "consumer %r: its handler raised BatchError(%d, ...) on a batch of %d events, "
                "so it says it did them all, yet failed; none of the batch counts as done: "
                "give the index of the first event not done",
                self.name,
                error.index,
                size,
            )
            return 0, error.cause, False
        return error.index, error.cause, True

    def _batch_done(self, events: Sequence[Event]) -> None:
        """Move past ``events``, handled, and ask for the cursor to follow."""
        self._processed += len(events)
        position = self._position = events[-1].seq
        ends = self._batch_ends
        ends.append(position)
        cursor, cursors = self._cursor, self._runner.cursors
        request_every = max(self.spec.commit_every // 2, 1)
        unrequested = 0
        for end in reversed(ends):
            if end <= cursor.requested or unrequested >= request_every:
                break
            unrequested += 1
        if unrequested >= request_every:
            self._requested_at = trio.current_time()
            cursors.request(cursor, position, self._processed)

    async def _room_for_a_batch(self) -> None:
        """Wait for the cursor to be durable if ``commit_every`` handled batches are not."""
        ends, cursor = self._batch_ends, self._cursor
        committed = cursor.committed
        while ends and ends[0] <= committed:
            ends.popleft()
        if len(ends) >= self.spec.commit_every:
            cursors = self._runner.cursors
            cursors.request(cursor, self._position, self._processed)
            await cursors.wait_durable(cursor, self._position)
            ends.clear()
