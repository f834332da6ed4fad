"""Requeued dead letters: handled once due, in seq order, with the policy.

Each one handled is removed from the store (a transactional handler removes
it in its own transaction); one that fails for good is a dead letter again,
or halts the consumer. Letters that come due later are looked for then.
"""

from __future__ import annotations

import logging
import math

import trio

from ._failures import Failures
from ._state import utcnow

logger = logging.getLogger("trioflow")


#: Seconds between looks for requeued dead letters while some are not yet due.
REQUEUE_RECHECK = 5.0
#: Seconds between looks for dead letters requeued where this flow is not told:
#: by another process (another flow, the `trioflow dead-letters` command).
REQUEUE_POLL = 5.0


class Requeues(Failures):
    """Handling its requeued dead letters once they are due."""

    __slots__ = ()

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
        due = await store.due_dead_letters(self.name)
        for letter in due:
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
        # Letters requeued to come due later: look again then. Asked only
        # when some may be waiting: a look that found nothing due and knew
        # of none asks nothing.
        later = await store.earliest_due_at(self.name) if due or self._requeues_later else None
        self._requeues_later = later is not None
        if later is not None:
            # By this host's clock, which may differ from the store's: look
            # again at least every few seconds.
            wait = (later - utcnow()).total_seconds()
            self._requeue_check_at = trio.current_time() + min(max(wait, 0.0), REQUEUE_RECHECK)
        else:
            # Letters requeued elsewhere (another process, the command) are
            # not announced to this flow: look for due ones now and then.
            self._requeue_check_at = trio.current_time() + REQUEUE_POLL
        # Those this flow requeued are looked for when they come due, by
        # trio's clock (which the host's may not follow, under a test's).
        if self._requeue_told_at > trio.current_time():
            self._requeue_check_at = min(self._requeue_check_at, self._requeue_told_at)
        else:
            self._requeue_told_at = math.inf
