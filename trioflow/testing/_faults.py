"""A store wrapper that counts calls and injects failures, for tests."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence

import trio

from .._errors import StoreError, StoreUnavailableError
from .._events import Event, NewEvent
from ..stores._base import Appended, Store
from ..stores.memory import MemoryStore

_METHODS = ("append", "read", "head", "load_cursors", "commit_cursors", "wait_for_append")


class FaultyStore(Store):
    """Wraps a store (a fresh `MemoryStore` by default) to observe and break it.

    Every call is counted in ``calls``; every cursor commit is recorded in
    ``cursor_commits``. `fail_next` makes the next calls of a method raise,
    as a store going away would, without reaching the wrapped store.

    Example::

        store = FaultyStore()
        store.fail_next("append", times=2)
        app = trioflow.App(store)
    """

    def __init__(self, inner: Store | None = None) -> None:
        self.inner = MemoryStore() if inner is None else inner
        self.calls: collections.Counter[str] = collections.Counter()
        self.cursor_commits: list[dict[str, int]] = []
        self._failures: dict[str, list[BaseException]] = {m: [] for m in _METHODS}

    @property
    def poll_interval(self) -> float | None:
        return self.inner.poll_interval

    @poll_interval.setter
    def poll_interval(self, value: float | None) -> None:
        self.inner.poll_interval = value

    def fail_next(self, method: str, *, times: int = 1, error: StoreError | None = None) -> None:
        """Make the next ``times`` calls of ``method`` raise ``error``.

        Args:
            method: One of append, read, head, load_cursors, commit_cursors,
                wait_for_append.
            times: How many calls fail.
            error: What they raise (default: a StoreUnavailableError).
        """
        if method not in self._failures:
            raise ValueError(f"unknown store method {method!r}; use one of {_METHODS}")
        exc = error or StoreUnavailableError(f"injected failure of {method}")
        self._failures[method].extend([exc] * times)

    async def _enter(self, method: str) -> None:
        self.calls[method] += 1
        queued = self._failures[method]
        if queued:
            await trio.lowlevel.checkpoint()
            raise queued.pop(0)

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[None]:
        async with self.inner.open():
            yield

    async def append(self, events: Sequence[NewEvent]) -> Appended:
        await self._enter("append")
        return await self.inner.append(events)

    async def read(self, after: int, limit: int) -> Sequence[Event]:
        await self._enter("read")
        return await self.inner.read(after, limit)

    async def head(self) -> int:
        await self._enter("head")
        return await self.inner.head()

    async def load_cursors(self) -> dict[str, int]:
        await self._enter("load_cursors")
        return await self.inner.load_cursors()

    async def commit_cursors(self, cursors: Mapping[str, int]) -> None:
        await self._enter("commit_cursors")
        await self.inner.commit_cursors(cursors)
        self.cursor_commits.append(dict(cursors))

    async def wait_for_append(self, after: int) -> int:
        await self._enter("wait_for_append")
        return await self.inner.wait_for_append(after)
