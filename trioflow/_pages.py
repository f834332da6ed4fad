"""Replay pages shared between consumers: one store read, one decode, for all of them.

Consumers that replay the same stretch of the log (after a restart of the
process, all from about the same cursors) would each read and decode every
event from the store: K times the store's work for K consumers. The live path
already shares each decoded event between consumers; `PageReader` does the same
for replays. A read is served from a recent page that covers it, or joins a read
of the same position already under way, or goes to the store.

Sharing is sound because a page, once read, is final: stores guarantee that no
event can later appear below a sequence number a reader has seen, so the
events after any position inside a page are exactly the rest of that page
(followed, perhaps, by more that a new read would return).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
from collections.abc import Iterator, Sequence

import attrs
import trio

from ._events import Event
from ._groups import partition_of
from .stores._base import Store, within_bytes

#: Pages split by partition kept for the other partitions of a group.
SPLITS_KEPT = 8


@attrs.define(eq=False)
class _Read:
    """A store read under way; its waiters take its page when ``done`` is set."""

    done: trio.Event = attrs.Factory(trio.Event)
    page: Sequence[Event] | None = None


@attrs.define(eq=False)
class PageReader:
    """Reads replay pages from the store, sharing them between consumers.

    Keeps the most recent pages, at most ``keep`` events and ``keep_bytes``
    of event data in all (the flow keeps two full pages: consumers replaying
    together are rarely further apart), besides the reads under way; and the
    split by partition of at most `SPLITS_KEPT` stretches of the pages it
    keeps, none of a page it dropped. Once no replay is under way
    (`replaying`) it lets go of them all.
    """

    store: Store
    keep: int
    keep_bytes: int
    #: Recent pages by the position they were read after, oldest first.
    _pages: collections.OrderedDict[int, tuple[list[int], Sequence[Event]]] = attrs.Factory(
        collections.OrderedDict
    )
    _reads: dict[int, _Read] = attrs.Factory(dict)
    #: Recent pages split by partition, for the partitions of a group
    #: replaying together: by (first seq, last seq, partition count).
    _splits: collections.OrderedDict[tuple[int, int, int], list[list[Event]]] = attrs.Factory(
        collections.OrderedDict
    )
    _kept: int = 0
    _kept_bytes: int = 0
    #: Replays under way (`replaying`).
    _replaying: int = 0
    #: Reads answered without going to the store (for statistics and tests).
    shared: int = 0

    async def read(self, after: int, limit: int, *, max_bytes: int) -> Sequence[Event]:
        """Up to ``limit`` events with ``seq > after``, in order, as `Store.read` returns them.

        May return fewer than ``limit`` events when a shared page ends early;
        returns nothing only when the store had nothing past ``after``.
        """
        while (under_way := self._reads.get(after)) is not None:
            await under_way.done.wait()
            if under_way.page:
                self.shared += 1
                return within_bytes(under_way.page[:limit], max_bytes)
            # It failed or found nothing: look again (another waiter may
            # have started the next read), else read for ourselves.
        page = self._cached(after, limit, max_bytes)
        if page:
            self.shared += 1
            await trio.lowlevel.checkpoint()
            return page
        read = self._reads[after] = _Read()
        try:
            read.page = page = await self.store.read(after, limit, max_bytes=max_bytes)
        finally:
            read.done.set()
            del self._reads[after]
        if page and after not in self._pages:
            self._pages[after] = ([event.seq for event in page], page)
            self._kept += len(page)
            self._kept_bytes += sum(event.size for event in page)
            dropped_any = False
            while self._kept > self.keep or self._kept_bytes > self.keep_bytes:
                _, (_, dropped) = self._pages.popitem(last=False)
                self._kept -= len(dropped)
                self._kept_bytes -= sum(event.size for event in dropped)
                dropped_any = True
            if dropped_any:
                # A split would keep a dropped page's events alive.
                for key in [key for key in self._splits if not self._covers(key[0], key[1])]:
                    del self._splits[key]
        return page

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """Mark a replay under way for the block: when the last one ends, the pages
        kept for consumers replaying together are let go (they would otherwise
        stay, up to twice ``keep_bytes`` of events, until the next replay)."""
        self._replaying += 1
        try:
            yield
        finally:
            self._replaying -= 1
            if not self._replaying:
                self._pages.clear()
                self._splits.clear()
                self._kept = self._kept_bytes = 0

    def held(self) -> int:
        """How many events it holds, in the pages it keeps and their splits."""
        ids = {id(event) for _, page in self._pages.values() for event in page}
        for buckets in self._splits.values():
            ids.update(id(event) for bucket in buckets for event in bucket)
        return len(ids)

    def split(self, page: Sequence[Event], partitions: int) -> list[list[Event]]:
        """``page``'s events by partition (`partition_of`), computed once for every
        partition of a group that replays the same page."""
        key = (page[0].seq, page[-1].seq, partitions)
        buckets = self._splits.get(key)
        if buckets is None:
            buckets = [[] for _ in range(partitions)]
            for event in page:
                buckets[partition_of(event.key, event.seq, partitions)].append(event)
            if self._covers(key[0], key[1]):
                self._splits[key] = buckets
                if len(self._splits) > SPLITS_KEPT:
                    self._splits.popitem(last=False)
        return buckets

    def _covers(self, first: int, last: int) -> bool:
        """Whether a page it keeps holds every event from ``first`` through ``last``."""
        return any(seqs[0] <= first and last <= seqs[-1] for seqs, _ in self._pages.values())

    def _cached(self, after: int, limit: int, max_bytes: int) -> Sequence[Event]:
        for start, (seqs, page) in self._pages.items():
            if start <= after < seqs[-1]:
                first = bisect.bisect_right(seqs, after)
                return within_bytes(page[first : first + limit], max_bytes)
        return ()
