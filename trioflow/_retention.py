"""Retention: deleting old events that every consumer has passed.

Two callers share this module: ``App(retention=...)``, whose flow runs
`keep_pruning` as one of its tasks, and the ``trioflow prune`` command, which
calls `plan_prune` (its ``--dry-run`` stops there) and then `run_prune`.

The store decides what is safe: `Store.prune` never deletes an event a
stored cursor or a dead letter still needs, checked in the transaction that
deletes. This module decides what is asked: a bound (a sequence number, or an
age turned into one by `Store.seq_before`), and what to do about consumers
whose cursors are below it. An operator's prune refuses them by name
(`PrunedLogError`) unless told to prune only what every cursor has passed; the
App's periodic retention does just that, and logs which consumers hold the
log back.
"""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Callable, Mapping

import attrs
import trio

from ._errors import ConfigurationError, PrunedLogError, StoreError
from .stores._base import LogBounds, Store

logger = logging.getLogger("trioflow")

#: Events deleted per store transaction unless told otherwise: short enough
#: that a SQLite writer waits a few milliseconds for one, long enough that a
#: million events take a few hundred transactions.
DEFAULT_BATCH_SIZE = 1000


def _timedelta(value: datetime.timedelta | float) -> datetime.timedelta:
    """A duration given as a `datetime.timedelta` or as seconds."""
    if isinstance(value, datetime.timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(
            f"a duration must be a datetime.timedelta or a finite number of seconds, got {value!r}"
        )
    return datetime.timedelta(seconds=value)


def _positive(
    _instance: object, attribute: attrs.Attribute[datetime.timedelta], value: datetime.timedelta
) -> None:
    if value <= datetime.timedelta(0):
        raise ConfigurationError(
            f"Retention {attribute.name} must be longer than 0, got {value}; for example "
            "Retention(max_age=datetime.timedelta(days=7))"
        )


def _batch_size(_instance: object, _attribute: object, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"Retention batch_size must be an int >= 1, got {value!r}")


@attrs.frozen(kw_only=True)
class Retention:
    """How long an App keeps events: ``App(store, retention=Retention(max_age=...))``.

    Every ``interval`` the flow deletes the events older than ``max_age``
    that every consumer with a stored cursor has passed (stopped consumers
    too: their cursors stay until they are removed) and that no dead letter
    refers to, ``batch_size`` at a time. A consumer still behind holds the
    log back: its events are kept, and the flow logs a warning naming it
    once per interval. ``App(retention=datetime.timedelta(days=7))`` is
    short for ``Retention(max_age=datetime.timedelta(days=7))``.

    Attributes:
        max_age: Events committed longer ago than this may be deleted (a
            `datetime.timedelta`, or seconds).
        interval: How often the flow looks for events to delete (default:
            every 10 minutes, or ``max_age`` if shorter).
        batch_size: The most events deleted by one store transaction.
    """

    max_age: datetime.timedelta = attrs.field(converter=_timedelta, validator=_positive)
    interval: datetime.timedelta = attrs.field(
        converter=_timedelta,
        validator=_positive,
        default=attrs.Factory(
            lambda self: min(self.max_age, datetime.timedelta(minutes=10)), takes_self=True
        ),
    )
    batch_size: int = attrs.field(default=DEFAULT_BATCH_SIZE, validator=_batch_size)

    @classmethod
    def of(cls, value: Retention | datetime.timedelta | float) -> Retention:
        """``value`` as a `Retention`: itself, or a maximum age (a timedelta or seconds)."""
        return value if isinstance(value, Retention) else cls(max_age=value)


@attrs.frozen(kw_only=True)
class PrunePlan:
    """What a prune up to a bound would do, as `plan_prune` found the store.

    Attributes:
        through: The bound: events with a sequence number up to this one are
            to go (0: none).
        bounds: The log's bounds when the plan was made.
        events: At most this many events would go: the stored sequence
            numbers up to ``through`` (numbers may have holes, and events
            that dead letters refer to stay).
        behind: The consumers whose stored cursors are below ``through``,
            with their cursors: pruning up to ``through`` would pass them.
            Their events are never deleted; `run_prune` refuses the plan
            unless told to prune only what every cursor has passed.
        safe_through: The highest bound no stored cursor is below: what a
            prune deletes when it keeps everything ``behind`` consumers need.
    """

    through: int
    bounds: LogBounds
    events: int
    behind: Mapping[str, int]
    safe_through: int

    def refusal(self) -> PrunedLogError:
        """The error that refuses this plan because consumers are ``behind``."""
        named = ", ".join(f"{name!r} (at {seq})" for name, seq in sorted(self.behind.items()))
        return PrunedLogError(
            f"pruning events up to {self.through} would pass the cursors of consumer(s) "
            f"{named}: they still need those events. Let them catch up, remove the ones no "
            "longer used (`trioflow consumers remove NAME`, or store.forget_consumer), or "
            f"prune only what every cursor has passed (up to {self.safe_through})",
            consumers=dict(self.behind),
        )


@attrs.frozen(kw_only=True)
class PruneProgress:
    """How far `run_prune` has got, after each batch.

    Attributes:
        deleted: Events deleted so far.
        expected: At most this many were planned (`PrunePlan.events`).
    """

    deleted: int
    expected: int


@attrs.frozen(kw_only=True)
class PruneResult:
    """What `run_prune` did.

    Attributes:
        deleted: How many events it deleted.
        bounds: The log's bounds afterwards.
    """

    deleted: int
    bounds: LogBounds


async def plan_prune(
    store: Store,
    *,
    before: int | None = None,
    older_than: datetime.timedelta | float | None = None,
    now: datetime.datetime | None = None,
) -> PrunePlan:
    """Find what pruning the events before a sequence number, or older than an age, would do.

    Give exactly one of ``before`` and ``older_than``. Changes nothing (the
    ``--dry-run`` of ``trioflow prune``).

    Args:
        store: An open store.
        before: Prune the events with sequence numbers below this one.
        older_than: Prune the events committed longer ago than this (a
            `datetime.timedelta`, or seconds), by the store's commit times.
        now: The time ``older_than`` counts back from (default: now).

    Raises:
        ConfigurationError: Neither or both bounds given, or one out of range.
        StoreError: The store failed.
    """
    if (before is None) == (older_than is None):
        raise ConfigurationError(
            "give one bound to prune: before=SEQ (events with lower sequence numbers) or "
            "older_than=DURATION (events committed longer ago)"
        )
    bounds = await store.log_bounds()
    if before is not None:
        if isinstance(before, bool) or not isinstance(before, int) or before < 1:
            raise ConfigurationError(f"before must be a sequence number >= 1, got {before!r}")
        through = before - 1
    else:
        assert older_than is not None
        age = _timedelta(older_than)
        if age < datetime.timedelta(0):
            raise ConfigurationError(f"older_than must not be negative, got {age}")
        moment = (datetime.datetime.now(datetime.UTC) if now is None else now) - age
        through = await store.seq_before(moment)
    through = min(through, bounds.head)
    cursors = await store.cursors()
    behind = {info.consumer: info.seq for info in cursors if info.seq < through}
    safe = min([through, *behind.values()])
    done = max(bounds.pruned_through, bounds.first - 1)
    return PrunePlan(
        through=through,
        bounds=bounds,
        events=max(0, through - done),
        behind=behind,
        safe_through=safe,
    )


async def run_prune(
    store: Store,
    plan: PrunePlan,
    *,
    only_passed: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Callable[[PruneProgress], object] | None = None,
) -> PruneResult:
    """Delete what ``plan`` says, ``batch_size`` events per store transaction.

    The store keeps every event a stored cursor or a dead letter needs,
    whatever happens meanwhile (a cursor reset, a new consumer): the plan
    only says how far to go. Cancelling it stops between batches or rolls
    one back; what was deleted stays deleted.

    Args:
        store: An open store.
        plan: From `plan_prune`.
        only_passed: Prune only what every cursor has passed instead of
            refusing a plan that would pass some.
        batch_size: The most events one store transaction deletes.
        progress: Called after each batch.

    Raises:
        PrunedLogError: The plan would pass consumers' cursors (named in the
            message) and ``only_passed`` is false; nothing was deleted.
        StoreError: The store failed; the batches before it stay deleted.
    """
    if plan.behind and not only_passed:
        raise plan.refusal()
    deleted = 0
    while True:
        count = await store.prune(plan.through, limit=batch_size)
        if not count:
            break
        deleted += count
        if progress is not None:
            progress(PruneProgress(deleted=deleted, expected=plan.events))
    return PruneResult(deleted=deleted, bounds=await store.log_bounds())


async def keep_pruning(store: Store, retention: Retention) -> None:
    """Prune what ``retention`` allows every interval, until cancelled (a flow's task).

    Time is trio's clock from the task's start, counted from the wall clock
    then: under trio's MockClock retention follows virtual time. A store
    failure is logged and tried again at the next interval.
    """
    wall, start = datetime.datetime.now(datetime.UTC), trio.current_time()
    interval = retention.interval.total_seconds()
    while True:
        now = wall + datetime.timedelta(seconds=trio.current_time() - start)
        try:
            await _prune_once(store, retention, now)
        except StoreError as exc:
            logger.warning("retention: pruning failed (%s); trying again in %.0fs", exc, interval)
        await trio.sleep(interval)


async def _prune_once(store: Store, retention: Retention, now: datetime.datetime) -> None:
    plan = await plan_prune(store, older_than=retention.max_age, now=now)
    if plan.behind:
        named = ", ".join(f"{name!r} (at {seq})" for name, seq in sorted(plan.behind.items()))
        logger.warning(
            "retention: events up to %d are older than %s, but consumer(s) %s have not "
            "passed them: they are kept. Remove consumers no longer used (`trioflow "
            "consumers remove NAME`)",
            plan.through,
            shown_duration(retention.max_age),
            named,
        )
    result = await run_prune(store, plan, only_passed=True, batch_size=retention.batch_size)
    if result.deleted:
        logger.info(
            "retention: deleted %d event(s) older than %s; the log now starts at %d",
            result.deleted,
            shown_duration(retention.max_age),
            result.bounds.first,
        )


def shown_duration(age: datetime.timedelta) -> str:
    """``age`` as ``trioflow prune --older-than`` takes it: ``7d``, ``1h30m``, ``90s``.

    Python shows ``timedelta(days=7)`` as ``7 days, 0:00:00``, which a log
    reader has to decode.
    """
    rest = round(age.total_seconds(), 3)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if rest >= size:
            count, rest = divmod(rest, size)
            parts.append(f"{int(count)}{unit}")
    if rest or not parts:
        parts.append(f"{rest:g}s")
    return "".join(parts)
