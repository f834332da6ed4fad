"""Handling what a consumer took: shielded, in order, with its policy.

`Handling._handle` runs the handler on each new event (a batch consumer's:
on batches, a transactional consumer's: in transactions), takes a failure to
the delivery policy, and requests cursor commits as it goes; it is where the
redelivery bound after a crash is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from .._events import Event
from .._groups import partition_of
from ._batches import Batches
from ._calls import plain_handler
from ._requeues import Requeues


class Handling(Batches, Requeues):
    """Handling what it took, shielded, event by event (or batch by batch)."""

    __slots__ = ()

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
        handler = plain_handler(spec)
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
                finished = await self._handle_batches(events)
                events = ()
            elif transactional and (commit_every > 1 or spec.batch is not None):
                # Whole transactions of up to commit_every events (a batch
                # consumer's: batch); from a failed one on, one event per
                # transaction, with the policy.
                events = await self._handle_in_transactions(events)
            ownership = self._ownership
            for event in events:
                seq = event.seq
                if seq <= self._position:
                    continue
                started = clock()
                if started >= self._yield_at:
                    # Handlers that never wait would hold the thread for the
                    # whole batch: let the flow's other tasks (the dispatcher
                    # sending the next group commit, the other consumers, the
                    # lease keeper) run between events. Asked here with the
                    # clock reading the loop takes anyway, not per event.
                    await self._take_turns()
                    started = clock()
                if self._must_stop() or not ownership.owned_at(started):
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
                        started = clock()
                        if self._must_stop() or not ownership.owned_at(started):
                            finished = False
                            break
                    try:
                        if transactional:
                            await self._call_in_transaction(event)
                        else:
                            # `_call_events` inlined: no tuple and no extra
                            # coroutine per event on the hot path.
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
