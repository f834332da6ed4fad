"""Calling a consumer's handler: plain, timed, transactional, on batches.

One call of the handler is `Calls._invoke` (on one event, or a batch
consumer's list of events); `_call_timed` cancels it after the policy's
timeout, as a failed attempt, and reports a handler that ignores that. A
transactional consumer's calls run in store transactions that also move its
cursor (and append what its handlers published, and remove a requeued dead
letter), `commit_every` events (a batch consumer's: one batch) a transaction.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import cast

import trio

from .._app import ConsumerSpec
from .._errors import HandlerTimeoutError, LeaseLostError, StoreError
from .._events import Event
from .._transactions import Transaction, append_published
from ._state import ConsumerState


def plain_handler(spec: ConsumerSpec) -> Callable[[Event], Awaitable[object]]:
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


class Calls(ConsumerState):
    """Calling the handler: plain, timed, in transactions, on batches."""

    __slots__ = ()

    async def _invoke(self, events: Sequence[Event], tx: Transaction | None = None) -> None:
        """Call the handler once: on ``events`` (a batch consumer's), else on its one event."""
        spec = self.spec
        if spec.batch is None:
            (event,) = events
            if tx is None:
                await plain_handler(spec)(event)
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

    async def _call_events(self, events: Sequence[Event], tx: Transaction | None = None) -> None:
        """Call the handler once (a transactional one in ``tx``), with the timeout if any;
        timed itself, not the transaction around it."""
        started = trio.current_time()
        try:
            if self.spec.policy.timeout is None:
                await self._invoke(events, tx)
            else:
                await self._call_timed(events, tx)
        finally:
            self._handler_duration.observe(trio.current_time() - started)

    async def _call(self, event: Event) -> None:
        """Handle one event (a batch consumer's: as a batch of one)."""
        if self.spec.transactional:
            # Times its handler calls itself, not the transaction around them.
            await self._call_in_transaction(event)
        else:
            await self._call_events((event,))

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
                    await self._call_events(chunk, tx)
                else:
                    for event in chunk:
                        await self._call_events((event,), tx)
            finally:
                tx._close()
            published = await append_published(tx)
            if len(chunk) == 1 and self._requeued_letter == chunk[0].seq:
                # Behind the cursor already; the letter goes with the effects.
                await store_tx.discard_dead_letters(self.name, [chunk[0].seq])
            await runner.cursors.commit_in_transaction(store_tx, self._cursor, last)
        return bool(published)

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

    def _reraise_store_failure(self, error: Exception) -> None:
        """Raise ``error`` again if it is not the handler's failure but the store's:
        a lost lease, or (around a transactional handler) the transaction's store
        failing; those take the restart-from-cursor path, not the delivery policy."""
        if isinstance(error, LeaseLostError) or (
            self.spec.transactional and isinstance(error, StoreError)
        ):
            raise error
