"""Dead letters: events a consumer gave up on, kept in the store until dealt with."""

from __future__ import annotations

import datetime
import uuid
from typing import Literal

import attrs

#: Why an event became a dead letter: its attempts ran out; its error was not
#: one its consumer's ``retry_on`` retries; its handler raised `Reject`.
DeadLetterReason = Literal["exhausted", "not-retried", "rejected"]

#: The longest error message and traceback kept in a dead letter, in characters.
MAX_MESSAGE_LENGTH = 4096
MAX_TRACEBACK_LENGTH = 16384


@attrs.frozen(kw_only=True)
class DeadLetter:
    """An event a consumer gave up on, as its store keeps it.

    Attributes:
        consumer: The consumer that gave up on it.
        seq: The event's sequence number.
        event_id: The event's id.
        type: The event's type.
        attempts: How many times its handler was called for it, in the round
            that gave up (a requeued letter starts a new round).
        first_failed_at: When its first attempt failed (aware UTC).
        last_failed_at: When its last attempt failed (aware UTC).
        reason: Why the consumer gave up: ``"exhausted"`` (attempts ran
            out), ``"not-retried"`` (the error is not in ``retry_on``) or
            ``"rejected"`` (the handler raised `trioflow.Reject`).
        error_type: The qualified name of the last error's type.
        message: The last error's message (at most 4096 characters).
        traceback: The last error's traceback, its end kept (at most 16384
            characters).
        due_at: None while it is parked; once requeued, when it is handed
            back to its consumer (aware UTC, by the store's clock).
    """

    consumer: str
    seq: int
    event_id: uuid.UUID
    type: str
    attempts: int
    first_failed_at: datetime.datetime
    last_failed_at: datetime.datetime
    reason: DeadLetterReason
    error_type: str
    message: str
    traceback: str
    due_at: datetime.datetime | None = None
