"""Delivery policies: what a consumer does when its handler fails, as frozen values.

A handler failure (an exception, or its ``timeout`` expiring) is retried in
place: the same event, after a backoff, before any later event, in the same
incarnation. `DeliveryPolicy.after_failure` decides, from the error and the
number of attempts so far, whether to retry and after how long, or to give up
the event as its ``on_exhausted`` says: record it as a dead letter and go on,
or halt the consumer at it. ``"retry-forever"`` never gives up.

Store errors are not handler failures: they restart the consumer from its
cursor with the flow's `RestartPolicy`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Literal

import attrs

from ._dead_letters import DeadLetterReason
from ._errors import ConfigurationError, Reject

#: What a consumer does with an event whose attempts ran out (or that its
#: handler rejected): keep retrying; record it as a dead letter and go on;
#: stop at it until resumed.
OnExhausted = Literal["retry-forever", "dead-letter", "halt"]
ON_EXHAUSTED: tuple[OnExhausted, ...] = ("retry-forever", "dead-letter", "halt")

#: What a bounded consumer (``buffer=``) does when it would hold more: catch
#: up from the store later, or make this flow's publishers wait.
Overflow = Literal["catch-up", "block"]
OVERFLOWS: tuple[Overflow, ...] = ("catch-up", "block")


def backoff(initial: float, multiplier: float, maximum: float, attempt: int) -> float:
    """``initial * multiplier ** (attempt - 1)``, at most ``maximum`` (attempt from 1)."""
    return float(min(maximum, initial * multiplier ** max(attempt - 1, 0)))


def _finite_at_least(
    low: float, owner: str
) -> Callable[[object, attrs.Attribute[float], float], None]:
    def check(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value < math.inf
        ):
            raise ConfigurationError(
                f"{owner}.{attribute.name} must be a finite number >= {low:g}, got {value!r}"
            )

    return check


@attrs.frozen(kw_only=True)
class RestartPolicy:
    """How long a consumer waits before it restarts after a store error.

    The n-th consecutive restart waits ``initial * multiplier ** (n - 1)``
    seconds, never more than ``maximum``. The count resets once the consumer's
    cursor moves (durable progress).
    """

    initial: float = attrs.field(default=0.1, validator=_finite_at_least(0, "RestartPolicy"))
    maximum: float = attrs.field(default=5.0, validator=_finite_at_least(0, "RestartPolicy"))
    multiplier: float = attrs.field(default=2.0, validator=_finite_at_least(1, "RestartPolicy"))

    def delay(self, attempt: int) -> float:
        """Seconds to wait before restart number ``attempt`` (counted from 1)."""
        return backoff(self.initial, self.multiplier, self.maximum, attempt)


def _check_attempts(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            f"Retry.attempts must be an int >= 1 (the calls of the handler per event, the "
            f"first one included), got {value!r}"
        )


def _check_jitter(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ConfigurationError(f"Retry.jitter must be a number from 0 to 1, got {value!r}")


@attrs.frozen(kw_only=True)
class Retry:
    """How a consumer retries an event its handler failed on, in place.

    Args:
        attempts: Calls of the handler per event, the first one included,
            before the consumer gives up on it (``on_exhausted``). Ignored by
            ``"retry-forever"``, which never gives up.
        initial: Seconds before the second attempt.
        maximum: The longest wait between two attempts.
        multiplier: Each wait is this many times the one before.
        jitter: Each wait is moved at random by up to this fraction of it
            (0.1: +/-10%), so that consumers failing together do not retry in
            lockstep.

    Example::

        trioflow.Retry(attempts=5, initial=0.5, maximum=60, multiplier=2, jitter=0.1)
    """

    attempts: int = attrs.field(default=5, validator=_check_attempts)
    initial: float = attrs.field(default=0.1, validator=_finite_at_least(0, "Retry"))
    maximum: float = attrs.field(default=5.0, validator=_finite_at_least(0, "Retry"))
    multiplier: float = attrs.field(default=2.0, validator=_finite_at_least(1, "Retry"))
    jitter: float = attrs.field(default=0.0, validator=_check_jitter)

    def delay(self, failures: int, uniform: Callable[[], float] = random.random) -> float:
        """Seconds to wait after ``failures`` failed attempts, before the next one."""
        wait = backoff(self.initial, self.multiplier, self.maximum, failures)
        if self.jitter:
            wait *= 1 + self.jitter * (2 * uniform() - 1)
        return max(wait, 0.0)


@attrs.frozen(kw_only=True)
class Decision:
    """What to do after a failed attempt: retry after ``delay``, or give up."""

    #: ``"retry"``, or what giving up means: ``"dead-letter"`` or ``"halt"``.
    action: Literal["retry", "dead-letter", "halt"]
    delay: float = 0.0
    #: Why it gave up (None when it retries).
    reason: DeadLetterReason | None = None


@attrs.frozen(kw_only=True)
class DeliveryPolicy:
    """A consumer's whole policy for failures of its handler. See the module docstring."""

    retry: Retry
    #: Only these errors are retried (None: every Exception).
    retry_on: tuple[type[BaseException], ...] | None
    #: Seconds per handler call, or None.
    timeout: float | None
    on_exhausted: OnExhausted

    def after_failure(self, error: BaseException, attempts: int) -> Decision:
        """Decide after ``attempts`` failed calls, the last one failing with ``error``."""
        if isinstance(error, Reject):
            # Retrying is futile and skipping is not allowed: halt.
            give_up = "halt" if self.on_exhausted == "retry-forever" else self.on_exhausted
            return Decision(action=give_up, reason="rejected")
        if self.on_exhausted == "retry-forever":
            return Decision(action="retry", delay=self.retry.delay(attempts))
        if self.retry_on is not None and not isinstance(error, self.retry_on):
            return Decision(action=self.on_exhausted, reason="not-retried")
        if attempts >= self.retry.attempts:
            return Decision(action=self.on_exhausted, reason="exhausted")
        return Decision(action="retry", delay=self.retry.delay(attempts))


def delivery_policy(
    *,
    retry: Retry,
    retry_on: object,
    timeout: object,
    on_exhausted: object,
) -> DeliveryPolicy:
    """Check a consumer's policy options and build its `DeliveryPolicy`.

    Raises:
        ConfigurationError: An option is invalid.
    """
    if not isinstance(retry, Retry):
        raise ConfigurationError(f"retry must be a trioflow.Retry, got {retry!r}")
    if on_exhausted not in ON_EXHAUSTED:
        raise ConfigurationError(
            f"on_exhausted must be one of {', '.join(map(repr, ON_EXHAUSTED))}, "
            f"got {on_exhausted!r}"
        )
    exceptions: tuple[type[BaseException], ...] | None = None
    if retry_on is not None:
        if isinstance(retry_on, type):
            retry_on = (retry_on,)
        if not isinstance(retry_on, tuple | list) or not all(
            isinstance(kind, type) and issubclass(kind, Exception) for kind in retry_on
        ):
            raise ConfigurationError(
                f"retry_on must be an Exception subclass or a tuple of them, got {retry_on!r}"
            )
        if on_exhausted == "retry-forever":
            raise ConfigurationError(
                "retry_on chooses which errors are retried before giving up, and "
                "on_exhausted='retry-forever' never gives up: set on_exhausted to "
                "'dead-letter' or 'halt', or drop retry_on"
            )
        exceptions = tuple(retry_on)
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout < math.inf
    ):
        raise ConfigurationError(
            f"timeout must be a finite number of seconds > 0 (or None), got {timeout!r}"
        )
    assert on_exhausted in ON_EXHAUSTED
    return DeliveryPolicy(
        retry=retry,
        retry_on=exceptions,
        timeout=None if timeout is None else float(timeout),
        on_exhausted=on_exhausted,
    )
