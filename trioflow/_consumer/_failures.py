"""The delivery policy after a handler failed: retry, back off, dead letter, halt.

A handler failure (an exception, or its timeout) is retried in place, after
the backoff of the consumer's `DeliveryPolicy`, before any later event; when
the policy gives up, the event becomes a dead letter (recorded with the
cursor moved past it, in one store transaction) or the consumer halts at it
(`Halted` ends its incarnation) until resumed.
"""

from __future__ import annotations

import datetime
import logging
import traceback
from typing import Literal

import trio

from .._dead_letters import MAX_MESSAGE_LENGTH, MAX_TRACEBACK_LENGTH, DeadLetter, DeadLetterReason
from .._errors import BatchError
from .._events import Event
from .._policies import Decision
from .._statistics import Stall
from ._calls import Calls
from ._state import describe, utcnow

logger = logging.getLogger("trioflow")


class Halted(Exception):
    """The policy halts the consumer at ``event`` (internal: ends its incarnation)."""

    def __init__(self, event: Event, error: BaseException, attempts: int) -> None:
        super().__init__(event, error, attempts)
        self.event = event
        self.error = error
        self.attempts = attempts


def _handler_error(error: Exception) -> Exception:
    """What the delivery policy decides on: a `BatchError`'s cause, else the error."""
    return error.cause if isinstance(error, BatchError) else error


class Failures(Calls):
    """The delivery policy after a handler failed: retry, back off, dead letter, halt."""

    __slots__ = ()

    async def _after_failure(
        self, event: Event, error: Exception, *, requeued: bool
    ) -> Literal["handled", "dead-lettered", "stopped"]:
        """Apply the policy to an event whose handler just failed: retry it in place
        until it succeeds, or give it up (a dead letter; or halt, by raising `Halted`).
        Returns ``"stopped"`` when the consumer stops while it waits to retry."""
        policy = self.spec.policy
        attempts = 1
        first_failed_at = utcnow()
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
        cursor moved past it), or halt at it (by raising `Halted`)."""
        if decision.action == "halt":
            raise Halted(event, error, attempts)
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
            last_error=describe(error),
            next_attempt_at=utcnow() + datetime.timedelta(seconds=delay),
        )
        logger.error(
            "consumer %r failed on seq=%d (type %r)%s, attempt %d: %s; retrying in %.2fs",
            self.name,
            event.seq,
            event.type,
            "" if batch == 1 else f" and the {batch - 1} event(s) after it in its batch",
            attempts,
            describe(error),
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
            last_failed_at=utcnow(),
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
            describe(error),
            self.name,
        )

    async def _halt(self, halted: Halted) -> None:
        """Stay halted at the event until resumed; then a new incarnation retries it."""
        event = halted.event
        self._halted = True
        self._stall = Stall(
            seq=event.seq,
            type=event.type,
            attempts=halted.attempts,
            last_error=describe(halted.error),
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
