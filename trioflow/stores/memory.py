"""The in-memory store: for tests, examples and benchmarks; nothing survives the process."""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import AsyncIterator, Mapping, Sequence

import trio

from .._events import Event, NewEvent
from ._base import Appended, Store, within_bytes


class MemoryStore(Store):
    """An event log and cursor table held in this process's memory.

    Several flows in one process may share one instance (each sees the
    others' events, as processes sharing a database would). It is also the
    reference implementation of the store contract: sequence numbers start
    at 1 and have no holes.
    """

    def __init__(self) -> None:
        self._events: list[Event] = []
        self._cursors: dict[str, int] = {}
        self._appended = trio.Event()

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[None]:
        """Open the store; a memory store may be open in several flows at once."""
        await trio.lowlevel.checkpoint()
        yield

    async def append(self, events: Sequence[NewEvent]) -> Appended:
        await trio.lowlevel.checkpoint()
        after = len(self._events)
        now = datetime.datetime.now(datetime.UTC)
        batch = [new.persisted(seq, now) for seq, new in enumerate(events, start=after + 1)]
        self._events.extend(batch)
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
        start = max(after, 0)
        page = self._events[start : start + limit]
        return page if max_bytes is None else within_bytes(page, max_bytes)

    async def head(self) -> int:
        await trio.lowlevel.checkpoint()
        return len(self._events)

    async def load_cursors(self) -> dict[str, int]:
        await trio.lowlevel.checkpoint()
        return dict(self._cursors)

    async def commit_cursors(self, cursors: Mapping[str, int]) -> None:
        await trio.lowlevel.checkpoint()
        stored = self._cursors
        for name, seq in cursors.items():
            if seq > stored.get(name, -1):
                stored[name] = seq

    async def wait_for_append(self, after: int) -> int:
        while len(self._events) <= after:
            await self._appended.wait()
        await trio.lowlevel.checkpoint()
        return len(self._events)
