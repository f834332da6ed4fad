"""The runtime's one door to its store: slow calls are logged, odd failures contained.

A store call that waits on a lock held by a long transaction, a busy disk or a
lost network looks, from inside the flow, like nothing at all: a publish that
never returns, a consumer that stalls at ``commit_every``. `WatchedStore`
wraps the flow's store so that every call waiting longer than a threshold is
logged, naming the call and how long it has waited, again at doubling
intervals while it waits, and once more when it ends.

It is also where a store that breaks the contract is contained: an exception
other than a `TrioflowError` (a decode error a backend failed to translate,
say) becomes a `StoreError` for the one task that made the call, so one bad
event never ends the flow.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import TypeVar

import attrs
import trio

from ._dead_letters import DeadLetter
from ._errors import StoreError, TrioflowError
from ._events import Event, NewEvent
from ._leases import Lease
from .stores._base import Appended, CursorInfo, LogBounds, Store, StoreWrapper

logger = logging.getLogger("trioflow")

T = TypeVar("T")

#: The store operations the flow calls through `WatchedStore` (and `FaultyStore`
#: can break), by `Store` method name.
OPERATIONS = (
    "append",
    "read",
    "head",
    "load_cursors",
    "commit_cursors",
    "wait_for_append",
    "record_dead_letter",
    "claim_leases",
    "release_leases",
    "leases",
    "forget_lapsed_leases",
    "dead_letters",
    "dead_letter_counts",
    "earliest_due_at",
    "requeue_dead_letters",
    "due_dead_letters",
    "discard_dead_letters",
    "forget_consumer",
    "cursors",
    "set_cursor",
    "log_bounds",
    "seq_before",
    "prune",
)


@attrs.define(eq=False)
class _Call:
    #: What to log while it goes on, and when it ends, with ``{elapsed}``.
    still: str
    done: str
    started: float
    after: float
    #: When to log (again) that it goes on.
    due: float
    warned: int = 0


@attrs.define(eq=False)
class SlowCalls:
    """Calls under way that may outlast what they should, and the task that reports them.

    Store calls are tracked against ``store_threshold`` (None: not at all);
    other calls (a handler past its timeout) give their own time.
    """

    store_threshold: float | None
    _calls: dict[int, _Call] = attrs.Factory(dict)
    _tokens: Iterator[int] = attrs.Factory(itertools.count)
    _wakeup: trio.Event = attrs.Factory(trio.Event)
    #: When the reporting task wakes next (trio time). A new call wakes it
    #: only if it is due earlier: the task does not run once per call.
    _next_due: float = math.inf

    @contextlib.contextmanager
    def track_store_call(self, what: str) -> Iterator[None]:
        """Note a store call under way for the length of the block."""
        if self.store_threshold is None:
            yield
            return
        with self.track(
            still=f"store call {what} has waited {{elapsed:.1f}}s and goes on waiting: the "
            "store may be blocked (a lock held by a long transaction, a busy disk, a network "
            "that stopped answering)",
            done=f"store call {what} finished after {{elapsed:.1f}}s",
            after=self.store_threshold,
        ):
            yield

    @contextlib.contextmanager
    def track(self, *, still: str, done: str, after: float) -> Iterator[None]:
        """Note a call under way for the length of the block; log ``still`` if it
        lasts ``after`` seconds (and at doubling intervals), then ``done``."""
        now = trio.current_time()
        token = next(self._tokens)
        due = now + after
        self._calls[token] = _Call(still=still, done=done, started=now, after=after, due=due)
        if due < self._next_due:
            self._next_due = due
            self._wakeup.set()
        try:
            yield
        finally:
            call = self._calls.pop(token)
            if call.warned:
                logger.warning(call.done.format(elapsed=trio.current_time() - call.started))

    async def run(self) -> None:
        """Log every call still going past its due time, until cancelled."""
        while True:
            now = trio.current_time()
            for call in self._calls.values():
                if call.due <= now:
                    call.warned += 1
                    call.due = call.started + call.after * 2**call.warned
                    logger.warning(call.still.format(elapsed=now - call.started))
            self._next_due = min((call.due for call in self._calls.values()), default=math.inf)
            self._wakeup = trio.Event()
            with trio.move_on_at(self._next_due):
                await self._wakeup.wait()


class WatchedStore(StoreWrapper):
    """The flow's store, seen through `SlowCalls` and the error boundary.

    ``wait_for_append`` waits by design and is not watched; its errors are
    contained all the same. It also keeps what the flow's health and metrics
    need to know of its store: its failed calls by operation, and when a call
    last returned.
    """

    def __init__(self, inner: Store, calls: SlowCalls) -> None:
        super().__init__(inner)
        self._calls = calls
        # Every operation from the start, so that a counter of failures
        # shows as 0 before the first one (a rate needs two samples).
        self._errors: collections.Counter[str] = collections.Counter(dict.fromkeys(OPERATIONS, 0))
        self._answered_at = -math.inf
        self._last_error: StoreError | None = None

    @property
    def errors(self) -> dict[str, int]:
        """Failed calls so far, by operation (the `Store` method's name)."""
        return dict(self._errors)

    @property
    def answered_at(self) -> float:
        """When a call last returned (trio time; ``-inf`` before any did)."""
        return self._answered_at

    @property
    def last_error(self) -> StoreError | None:
        """The error of the last call that ended, if it failed; None if it returned."""
        return self._last_error

    async def _call(
        self, op: str, detail: str | None, call: Callable[[], Awaitable[T]], *, watch: bool = True
    ) -> T:
        try:
            if not watch:
                result = await call()
            else:
                what = op if detail is None else f"{op} ({detail})"
                with self._calls.track_store_call(what):
                    result = await call()
        except StoreError as exc:
            self._failed(op, exc)
            raise
        except TrioflowError:
            # A refusal by design (a lost lease): the store answered.
            self._answered()
            raise
        except Exception as exc:
            logger.error("the store %r raised an unexpected error", self.inner, exc_info=exc)
            error = StoreError(
                f"the store failed with an unexpected {type(exc).__name__}: {exc}; it should "
                "raise trioflow.StoreError (a bug in the store)"
            )
            self._failed(op, error)
            raise error from exc
        self._answered()
        return result

    def _answered(self) -> None:
        self._answered_at = trio.current_time()
        self._last_error = None

    def _failed(self, op: str, error: StoreError) -> None:
        self._errors[op] += 1
        self._last_error = error

    async def append(self, events: Sequence[NewEvent]) -> Appended:
        return await self._call(
            "append", f"{len(events)} events", lambda: self.inner.append(events)
        )

    async def read(
        self, after: int, limit: int, *, max_bytes: int | None = None
    ) -> Sequence[Event]:
        return await self._call(
            "read",
            f"events after {after}",
            lambda: self.inner.read(after, limit, max_bytes=max_bytes),
        )

    async def head(self) -> int:
        return await self._call("head", None, self.inner.head)

    async def load_cursors(self) -> dict[str, int]:
        return await self._call("load_cursors", None, self.inner.load_cursors)

    async def commit_cursors(
        self, cursors: Mapping[str, int], *, fences: Mapping[str, int] | None = None
    ) -> frozenset[str]:
        return await self._call(
            "commit_cursors",
            _names(cursors),
            lambda: self.inner.commit_cursors(cursors, fences=fences),
        )

    async def wait_for_append(self, after: int) -> int:
        return await self._call(
            "wait_for_append", None, lambda: self.inner.wait_for_append(after), watch=False
        )

    async def record_dead_letter(
        self, letter: DeadLetter, *, cursor: int | None, fence: int | None = None
    ) -> None:
        await self._call(
            "record_dead_letter",
            f"{letter.consumer}, seq {letter.seq}",
            lambda: self.inner.record_dead_letter(letter, cursor=cursor, fence=fence),
        )

    async def claim_leases(self, holder: str, keys: Sequence[str], ttl: float) -> list[Lease]:
        return await self._call(
            "claim_leases", _names(keys), lambda: self.inner.claim_leases(holder, keys, ttl)
        )

    async def release_leases(self, holder: str, keys: Sequence[str]) -> None:
        await self._call(
            "release_leases", _names(keys), lambda: self.inner.release_leases(holder, keys)
        )

    async def leases(self) -> list[Lease]:
        return await self._call("leases", None, self.inner.leases)

    async def dead_letters(self, consumer: str | None = None) -> list[DeadLetter]:
        return await self._call("dead_letters", None, lambda: self.inner.dead_letters(consumer))

    async def forget_lapsed_leases(self, prefix: str, *, lapsed_for: float) -> int:
        return await self._call(
            "forget_lapsed_leases",
            None,
            lambda: self.inner.forget_lapsed_leases(prefix, lapsed_for=lapsed_for),
        )

    async def dead_letter_counts(self) -> dict[str, int]:
        return await self._call("dead_letter_counts", None, self.inner.dead_letter_counts)

    async def earliest_due_at(self, consumer: str) -> datetime.datetime | None:
        return await self._call(
            "earliest_due_at", None, lambda: self.inner.earliest_due_at(consumer)
        )

    async def requeue_dead_letters(
        self, consumer: str, seqs: Sequence[int], *, after: float = 0.0
    ) -> list[int]:
        return await self._call(
            "requeue_dead_letters",
            consumer,
            lambda: self.inner.requeue_dead_letters(consumer, seqs, after=after),
        )

    async def due_dead_letters(self, consumer: str) -> list[DeadLetter]:
        return await self._call(
            "due_dead_letters", consumer, lambda: self.inner.due_dead_letters(consumer)
        )

    async def discard_dead_letters(self, consumer: str, seqs: Sequence[int]) -> list[int]:
        return await self._call(
            "discard_dead_letters",
            consumer,
            lambda: self.inner.discard_dead_letters(consumer, seqs),
        )

    async def forget_consumer(self, consumer: str) -> None:
        await self._call("forget_consumer", consumer, lambda: self.inner.forget_consumer(consumer))

    async def cursors(self) -> list[CursorInfo]:
        return await self._call("cursors", None, self.inner.cursors)

    async def set_cursor(self, consumer: str, seq: int) -> int | None:
        return await self._call(
            "set_cursor", consumer, lambda: self.inner.set_cursor(consumer, seq)
        )

    async def log_bounds(self) -> LogBounds:
        return await self._call("log_bounds", None, self.inner.log_bounds)

    async def seq_before(self, time: datetime.datetime) -> int:
        return await self._call("seq_before", None, lambda: self.inner.seq_before(time))

    async def prune(self, through: int, *, limit: int) -> int:
        return await self._call(
            "prune",
            f"through {through}, {limit} at most",
            lambda: self.inner.prune(through, limit=limit),
        )


def _names(names: Iterable[str]) -> str:
    """The first few of ``names``, sorted, for a log line."""
    ordered = sorted(names)
    return ", ".join(ordered[:5]) + (", ..." if len(ordered) > 5 else "")
