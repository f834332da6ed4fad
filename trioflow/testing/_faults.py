"""A store wrapper that counts calls and injects faults, for tests.

The fault model is the one the runtime is built for: any store call may fail
before it reaches the store, reach the store and then lose its answer, or
hang for a while (and, like a statement already sent to a database, land
late even if its caller gave up). A fault may delay delivery; it must never
make a consumer skip or reorder an event.
"""

from __future__ import annotations

import collections
import datetime
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Literal, TypeVar

import attrs
import trio

from .._dead_letters import DeadLetter
from .._errors import ConfigurationError, OutcomeUnknownError, StoreError, StoreUnavailableError
from .._events import Event, NewEvent
from .._leases import Lease
from .._store_calls import OPERATIONS
from ..stores._base import Appended, CursorInfo, LogBounds, Store, StoreWrapper
from ..stores.memory import MemoryStore

_METHODS = OPERATIONS
#: The calls with an effect in the store: only they can lose an answer or land late.
_EFFECTS = (
    "append",
    "commit_cursors",
    "record_dead_letter",
    "requeue_dead_letters",
    "discard_dead_letters",
    "forget_consumer",
    "claim_leases",
    "release_leases",
    "set_cursor",
    "prune",
)

T = TypeVar("T")

#: What an injected fault does to one call:
#: ``"fail"``: raise before reaching the store (nothing happened);
#: ``"lose"``: reach the store, then raise as if the answer was lost;
#: ``"hang"``: wait, then go on (cancellable: nothing happens if cancelled);
#: ``"land-late"``: wait shielded, then reach the store even if the caller
#: was cancelled meanwhile, as a statement already sent would.
FaultKind = Literal["fail", "lose", "hang", "land-late"]
FAULT_KINDS: tuple[FaultKind, ...] = ("fail", "lose", "hang", "land-late")


@attrs.frozen(kw_only=True)
class _Fault:
    kind: FaultKind
    error: StoreError | None = None
    seconds: float = 0.0


@attrs.define(eq=False)
class _RandomFaults:
    probability: float
    rng: random.Random
    methods: frozenset[str]
    kinds: tuple[FaultKind, ...]
    max_delay: float

    def draw(self, method: str) -> _Fault | None:
        if method not in self.methods or self.rng.random() >= self.probability:
            return None
        kind = self.rng.choice(self.kinds)
        if method not in _EFFECTS:
            # A read has nothing to lose or to land: it fails or hangs.
            kind = "fail" if kind == "lose" else "hang" if kind == "land-late" else kind
        return _Fault(kind=kind, seconds=self.rng.uniform(0, self.max_delay))


class FaultyStore(StoreWrapper):
    """Wraps a store (a fresh `MemoryStore` by default) to observe and break it.

    Every call is counted in ``calls``; every cursor commit that reached the
    store is recorded in ``cursor_commits``. `fail_next` makes the next calls
    of a method fail (or lose their answer), `delay_next` makes them hang,
    and `fail_randomly` injects any of these at random.

    Example::

        store = FaultyStore()
        store.fail_next("append", times=2)
        app = trioflow.App(store)
    """

    def __init__(self, inner: Store | None = None) -> None:
        super().__init__(MemoryStore() if inner is None else inner)
        self.calls: collections.Counter[str] = collections.Counter()
        self.cursor_commits: list[dict[str, int]] = []
        #: Every fault injected, as (method, kind), in order.
        self.injected: list[tuple[str, FaultKind]] = []
        self._queued: dict[str, list[_Fault]] = {m: [] for m in _METHODS}
        self._random: _RandomFaults | None = None

    def fail_next(
        self,
        method: str,
        *,
        times: int = 1,
        error: StoreError | None = None,
        lose_answer: bool = False,
    ) -> None:
        """Make the next ``times`` calls of ``method`` raise ``error``.

        Args:
            method: The name of a method of the store contract (append,
                read, commit_cursors, prune...).
            times: How many calls fail.
            error: What they raise (default: a `StoreUnavailableError`, or for
                a lost append answer an `OutcomeUnknownError`).
            lose_answer: Let the call reach the store first, then raise: an
                append is committed, a cursor commit lands, a prune deletes,
                but the caller is told it failed.
        """
        self._check_method(method, effect=lose_answer)
        kind: FaultKind = "lose" if lose_answer else "fail"
        self._queued[method].extend([_Fault(kind=kind, error=error)] * times)

    def delay_next(
        self, method: str, seconds: float, *, times: int = 1, land_late: bool = False
    ) -> None:
        """Make the next ``times`` calls of ``method`` hang for ``seconds`` first.

        With ``land_late`` the wait is shielded and the call reaches the store
        even if its caller is cancelled meanwhile, as a statement already sent
        to a database server does.
        """
        self._check_method(method, effect=land_late)
        kind: FaultKind = "land-late" if land_late else "hang"
        self._queued[method].extend([_Fault(kind=kind, seconds=seconds)] * times)

    def fail_randomly(
        self,
        probability: float,
        *,
        rng: random.Random,
        methods: Sequence[str] = _METHODS,
        kinds: Sequence[FaultKind] = FAULT_KINDS,
        max_delay: float = 1.0,
    ) -> None:
        """Inject a fault into each call with ``probability``, drawn from ``rng``.

        ``kinds`` are chosen uniformly; calls without an effect in the store
        (all but append and commit_cursors) fail instead of losing their
        answer, and hang instead of landing late. Hangs last up to
        ``max_delay`` seconds. ``probability=0`` stops random faults.
        """
        for method in methods:
            self._check_method(method)
        for kind in kinds:
            if kind not in FAULT_KINDS:
                raise ConfigurationError(f"unknown fault kind {kind!r}; use one of {FAULT_KINDS}")
        self._random = _RandomFaults(
            probability=probability,
            rng=rng,
            methods=frozenset(methods),
            kinds=tuple(kinds),
            max_delay=max_delay,
        )

    def _check_method(self, method: str, *, effect: bool = False) -> None:
        if method not in self._queued:
            raise ConfigurationError(f"unknown store method {method!r}; use one of {_METHODS}")
        if effect and method not in _EFFECTS:
            raise ConfigurationError(
                f"{method} has no effect in the store to lose or to land late; "
                f"only {' and '.join(_EFFECTS)} do"
            )

    async def _call(self, method: str, call: Callable[[], Awaitable[T]]) -> T:
        self.calls[method] += 1
        queued = self._queued[method]
        fault = queued.pop(0) if queued else None
        if fault is None and self._random is not None:
            fault = self._random.draw(method)
        if fault is None:
            return await call()
        self.injected.append((method, fault.kind))
        if fault.kind == "fail":
            await trio.lowlevel.checkpoint()
            raise fault.error or StoreUnavailableError(f"injected failure of {method}")
        if fault.kind == "hang":
            await trio.sleep(fault.seconds)
            return await call()
        if fault.kind == "land-late":
            with trio.CancelScope(shield=True):
                await trio.sleep(fault.seconds)
                result = await call()
            await trio.lowlevel.checkpoint()
            return result
        with trio.CancelScope(shield=True):
            await call()
        await trio.lowlevel.checkpoint()
        if fault.error is not None:
            raise fault.error
        if method == "append":
            raise OutcomeUnknownError(f"injected loss of the answer to {method}")
        raise StoreUnavailableError(f"injected loss of the answer to {method}")

    async def append(self, events: Sequence[NewEvent]) -> Appended:
        return await self._call("append", lambda: self.inner.append(events))

    async def read(
        self, after: int, limit: int, *, max_bytes: int | None = None
    ) -> Sequence[Event]:
        return await self._call("read", lambda: self.inner.read(after, limit, max_bytes=max_bytes))

    async def head(self) -> int:
        return await self._call("head", self.inner.head)

    async def load_cursors(self) -> dict[str, int]:
        return await self._call("load_cursors", self.inner.load_cursors)

    async def commit_cursors(
        self, cursors: Mapping[str, int], *, fences: Mapping[str, int] | None = None
    ) -> frozenset[str]:
        async def commit() -> frozenset[str]:
            refused = await self.inner.commit_cursors(cursors, fences=fences)
            self.cursor_commits.append({k: v for k, v in cursors.items() if k not in refused})
            return refused

        return await self._call("commit_cursors", commit)

    async def wait_for_append(self, after: int) -> int:
        return await self._call("wait_for_append", lambda: self.inner.wait_for_append(after))

    async def record_dead_letter(
        self, letter: DeadLetter, *, cursor: int | None, fence: int | None = None
    ) -> None:
        await self._call(
            "record_dead_letter",
            lambda: self.inner.record_dead_letter(letter, cursor=cursor, fence=fence),
        )

    async def claim_leases(self, holder: str, keys: Sequence[str], ttl: float) -> list[Lease]:
        return await self._call("claim_leases", lambda: self.inner.claim_leases(holder, keys, ttl))

    async def release_leases(self, holder: str, keys: Sequence[str]) -> None:
        await self._call("release_leases", lambda: self.inner.release_leases(holder, keys))

    async def leases(self) -> list[Lease]:
        return await self._call("leases", self.inner.leases)

    async def dead_letters(self, consumer: str | None = None) -> list[DeadLetter]:
        return await self._call("dead_letters", lambda: self.inner.dead_letters(consumer))

    async def forget_lapsed_leases(self, prefix: str, *, lapsed_for: float) -> int:
        return await self._call(
            "forget_lapsed_leases",
            lambda: self.inner.forget_lapsed_leases(prefix, lapsed_for=lapsed_for),
        )

    async def dead_letter_counts(self) -> dict[str, int]:
        return await self._call("dead_letter_counts", self.inner.dead_letter_counts)

    async def earliest_due_at(self, consumer: str) -> datetime.datetime | None:
        return await self._call("earliest_due_at", lambda: self.inner.earliest_due_at(consumer))

    async def requeue_dead_letters(
        self, consumer: str, seqs: Sequence[int], *, after: float = 0.0
    ) -> list[int]:
        return await self._call(
            "requeue_dead_letters",
            lambda: self.inner.requeue_dead_letters(consumer, seqs, after=after),
        )

    async def due_dead_letters(self, consumer: str) -> list[DeadLetter]:
        return await self._call("due_dead_letters", lambda: self.inner.due_dead_letters(consumer))

    async def discard_dead_letters(self, consumer: str, seqs: Sequence[int]) -> list[int]:
        return await self._call(
            "discard_dead_letters", lambda: self.inner.discard_dead_letters(consumer, seqs)
        )

    async def forget_consumer(self, consumer: str) -> None:
        await self._call("forget_consumer", lambda: self.inner.forget_consumer(consumer))

    async def cursors(self) -> list[CursorInfo]:
        return await self._call("cursors", self.inner.cursors)

    async def set_cursor(self, consumer: str, seq: int) -> int | None:
        return await self._call("set_cursor", lambda: self.inner.set_cursor(consumer, seq))

    async def log_bounds(self) -> LogBounds:
        return await self._call("log_bounds", self.inner.log_bounds)

    async def seq_before(self, time: datetime.datetime) -> int:
        return await self._call("seq_before", lambda: self.inner.seq_before(time))

    async def prune(self, through: int, *, limit: int) -> int:
        return await self._call("prune", lambda: self.inner.prune(through, limit=limit))
