"""The in-memory store: for tests, examples and benchmarks; nothing survives the process."""

from __future__ import annotations

import bisect
import collections
import contextlib
import datetime
from collections.abc import AsyncIterator, Mapping, Sequence

import attrs
import trio

from .._dead_letters import DeadLetter
from .._errors import LeaseLostError
from .._events import DECODED_KEPT, Event, NewEvent
from .._leases import Lease
from ._base import (
    Appended,
    CursorInfo,
    LogBounds,
    Store,
    check_limit,
    check_reset,
    within_bytes,
)


class MemoryStore(Store):
    """An event log and cursor table held in this process's memory.

    Several flows in one process may share one instance (each sees the
    others' events, as processes sharing a database would). It is also the
    reference implementation of the store contract: sequence numbers start
    at 1 and have no holes until the log is pruned.

    It keeps the very `Event` objects it hands to the flows that append, so
    once an event is `DECODED_KEPT` events behind the head it keeps only its
    JSON text, not the data a consumer decoded (`Event.forget_data`).
    """

    def __init__(self) -> None:
        #: The stored events, by seq; pruning leaves holes (events kept for
        #: dead letters) and a missing start.
        self._events: list[Event] = []
        #: The highest seq given: it never goes back, even when every event is pruned.
        self._head = 0
        self._pruned_through = 0
        self._cursors: dict[str, int] = {}
        self._cursor_times: dict[str, datetime.datetime] = {}
        self._dead: dict[tuple[str, int], DeadLetter] = {}
        self._leases: dict[str, Lease] = {}
        self._clock_origin: tuple[trio.lowlevel.TrioToken, datetime.datetime, float] | None = None
        self._appended = trio.Event()

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[None]:
        """Open the store; a memory store may be open in several flows at once."""
        await trio.lowlevel.checkpoint()
        yield

    async def append(self, events: Sequence[NewEvent]) -> Appended:
        await trio.lowlevel.checkpoint()
        after = self._head
        # The store's clock, which moves with trio's: under a MockClock,
        # events age with virtual time (retention tests rely on it).
        now = self._now()
        batch = [new.persisted(seq, now) for seq, new in enumerate(events, start=after + 1)]
        stored = self._events
        stored.extend(batch)
        for event in stored[-DECODED_KEPT - len(batch) : -DECODED_KEPT]:
            event.forget_data()
        self._head += len(batch)
        if events:
            self._appended.set()
            self._appended = trio.Event()
        return Appended(
            after=after,
            seqs=range(after + 1, after + 1 + len(events)),
            created_at=now,
            events=batch,
        )

    async def read(
        self, after: int, limit: int, *, max_bytes: int | None = None
    ) -> Sequence[Event]:
        await trio.lowlevel.checkpoint()
        if limit < 1:
            return []
        start = bisect.bisect_right(self._events, after, key=_seq)
        page = self._events[start : start + limit]
        return page if max_bytes is None else within_bytes(page, max_bytes)

    async def head(self) -> int:
        await trio.lowlevel.checkpoint()
        return self._head

    async def load_cursors(self) -> dict[str, int]:
        await trio.lowlevel.checkpoint()
        return dict(self._cursors)

    async def commit_cursors(
        self, cursors: Mapping[str, int], *, fences: Mapping[str, int] | None = None
    ) -> frozenset[str]:
        await trio.lowlevel.checkpoint()
        refused = frozenset(
            name for name in cursors if fences and name in fences and not self._holds(name, fences)
        )
        for name, seq in cursors.items():
            if name not in refused:
                self._move_forward(name, seq)
        return refused

    def _move_forward(self, name: str, seq: int) -> None:
        """Insert or move forward one cursor (a stored cursor never moves back)."""
        if seq > self._cursors.get(name, -1):
            self._cursors[name] = seq
            self._cursor_times[name] = self._now()

    def _holds(self, key: str, fences: Mapping[str, int]) -> bool:
        lease = self._leases.get(key)
        return lease is not None and lease.token == fences[key]

    async def record_dead_letter(
        self, letter: DeadLetter, *, cursor: int | None, fence: int | None = None
    ) -> None:
        await trio.lowlevel.checkpoint()
        if fence is not None and not self._holds(letter.consumer, {letter.consumer: fence}):
            raise LeaseLostError(
                f"consumer {letter.consumer!r} is no longer this flow's: its lease passed "
                f"to another flow, so its dead letter at seq {letter.seq} was not recorded",
                keys=frozenset([letter.consumer]),
            )
        self._dead[letter.consumer, letter.seq] = letter
        if cursor is not None:
            self._move_forward(letter.consumer, cursor)

    async def dead_letters(self, consumer: str | None = None) -> list[DeadLetter]:
        await trio.lowlevel.checkpoint()
        return [
            letter
            for key, letter in sorted(self._dead.items())
            if consumer is None or key[0] == consumer
        ]

    async def earliest_due_at(self, consumer: str) -> datetime.datetime | None:
        await trio.lowlevel.checkpoint()
        return min(
            (
                letter.due_at
                for (name, _), letter in self._dead.items()
                if name == consumer and letter.due_at is not None
            ),
            default=None,
        )

    async def dead_letter_counts(self) -> dict[str, int]:
        await trio.lowlevel.checkpoint()
        return dict(collections.Counter(consumer for consumer, _ in self._dead))

    def _now(self) -> datetime.datetime:
        """The clock of commit times, dead letters' due times and leases: the wall clock,
        moving with trio's.

        So a test under trio's MockClock sees requeued letters come due as
        virtual time passes.
        """
        token = trio.lowlevel.current_trio_token()
        if self._clock_origin is None or self._clock_origin[0] is not token:
            # A new trio run (a new clock): start from the wall clock again.
            self._clock_origin = (token, datetime.datetime.now(datetime.UTC), trio.current_time())
        _, wall, trio_time = self._clock_origin
        return wall + datetime.timedelta(seconds=trio.current_time() - trio_time)

    async def requeue_dead_letters(
        self, consumer: str, seqs: Sequence[int], *, after: float = 0.0
    ) -> list[int]:
        await trio.lowlevel.checkpoint()
        due = self._now() + datetime.timedelta(seconds=after)
        found = sorted({seq for seq in seqs if (consumer, seq) in self._dead})
        for seq in found:
            self._dead[consumer, seq] = attrs.evolve(self._dead[consumer, seq], due_at=due)
        return found

    async def due_dead_letters(self, consumer: str) -> list[DeadLetter]:
        await trio.lowlevel.checkpoint()
        now = self._now()
        return [
            letter
            for key, letter in sorted(self._dead.items())
            if key[0] == consumer and letter.due_at is not None and letter.due_at <= now
        ]

    async def discard_dead_letters(self, consumer: str, seqs: Sequence[int]) -> list[int]:
        await trio.lowlevel.checkpoint()
        found = sorted({seq for seq in seqs if (consumer, seq) in self._dead})
        for seq in found:
            del self._dead[consumer, seq]
        return found

    async def forget_consumer(self, consumer: str) -> None:
        await trio.lowlevel.checkpoint()
        self._cursors.pop(consumer, None)
        self._cursor_times.pop(consumer, None)
        for key in [key for key in self._dead if key[0] == consumer]:
            del self._dead[key]

    async def claim_leases(self, holder: str, keys: Sequence[str], ttl: float) -> list[Lease]:
        await trio.lowlevel.checkpoint()
        now = self._now()
        expires_at = now + datetime.timedelta(seconds=ttl)
        claimed = []
        for key in sorted(set(keys)):
            lease = self._leases.get(key)
            if lease is None:
                lease = Lease(key=key, holder=holder, token=1, expires_at=expires_at)
            elif lease.holder == holder and lease.expires_at > now:
                lease = attrs.evolve(lease, expires_at=expires_at)
            elif lease.expires_at <= now:
                lease = Lease(key=key, holder=holder, token=lease.token + 1, expires_at=expires_at)
            self._leases[key] = lease
            claimed.append(lease)
        return claimed

    async def release_leases(self, holder: str, keys: Sequence[str]) -> None:
        await trio.lowlevel.checkpoint()
        now = self._now()
        for key in keys:
            lease = self._leases.get(key)
            if lease is not None and lease.holder == holder and lease.expires_at > now:
                self._leases[key] = attrs.evolve(lease, expires_at=now)

    async def leases(self) -> list[Lease]:
        await trio.lowlevel.checkpoint()
        now = self._now()
        return [lease for _, lease in sorted(self._leases.items()) if lease.expires_at > now]

    async def forget_lapsed_leases(self, prefix: str, *, lapsed_for: float) -> int:
        await trio.lowlevel.checkpoint()
        before = self._now() - datetime.timedelta(seconds=lapsed_for)
        doomed = [
            key
            for key, lease in self._leases.items()
            if key.startswith(prefix) and lease.expires_at <= before
        ]
        for key in doomed:
            del self._leases[key]
        return len(doomed)

    async def cursors(self) -> list[CursorInfo]:
        await trio.lowlevel.checkpoint()
        return [
            CursorInfo(consumer=name, seq=self._cursors[name], updated_at=self._cursor_times[name])
            for name in sorted(self._cursors)
        ]

    async def set_cursor(self, consumer: str, seq: int) -> int | None:
        await trio.lowlevel.checkpoint()
        check_reset(consumer, seq, head=self._head, pruned_through=self._pruned_through)
        previous = self._cursors.get(consumer)
        self._cursors[consumer] = seq
        self._cursor_times[consumer] = self._now()
        return previous

    async def log_bounds(self) -> LogBounds:
        await trio.lowlevel.checkpoint()
        first = self._events[0].seq if self._events else self._head + 1
        return LogBounds(first=first, head=self._head, pruned_through=self._pruned_through)

    async def seq_before(self, time: datetime.datetime) -> int:
        await trio.lowlevel.checkpoint()
        # A naive time counts as local time, as the SQL stores take it.
        index = bisect.bisect_left(self._events, time.astimezone(datetime.UTC), key=_created_at)
        return self._events[index - 1].seq if index else 0

    async def prune(self, through: int, *, limit: int) -> int:
        check_limit(limit)
        await trio.lowlevel.checkpoint()
        # No checkpoint from here on: the cursors and letters checked are the
        # ones in place when the events go.
        bound = min(through, self._head, *self._cursors.values())
        lettered = {seq for _, seq in self._dead}
        doomed: set[int] = set()
        for event in self._events:
            if event.seq > bound or len(doomed) == limit:
                break
            if event.seq not in lettered:
                doomed.add(event.seq)
        if doomed:
            self._events = [event for event in self._events if event.seq not in doomed]
            self._pruned_through = max(self._pruned_through, *doomed)
        return len(doomed)

    async def wait_for_append(self, after: int) -> int:
        while self._head <= after:
            await self._appended.wait()
        await trio.lowlevel.checkpoint()
        return self._head


def _seq(event: Event) -> int:
    return event.seq


def _created_at(event: Event) -> datetime.datetime:
    return event.created_at
