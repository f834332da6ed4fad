"""Where an event's latency goes: timestamps at the store's boundary, and the collector's pauses.

``python -m benchmarks run latency --stages`` wraps the flow's store in a
`TimedStore` (in the publishing process and, across processes, in the
consumers' too), which notes when each ``append`` and ``read`` started and
returned and which sequence numbers it carried, and when ``wait_for_append``
(the store's notification of other processes' appends) returned with which
head. With each event's publish timestamp and the time its handler was
called, that splits the event's latency into stages, each measured outside
trioflow's runtime:

in process
    ``queue`` (publish called until the append carrying the event started:
    waiting for the group commit in flight, and the dispatcher's wake-up),
    ``append`` (the store's append: the round trip, the commit's flush),
    ``deliver`` (the append returned until the handler was called: the
    fan-out, the consumer task's wake-up, the tasks scheduled before it).
across processes
    ``queue`` in the publisher, then ``append_notify`` (the append started
    until the consumers' store said the head moved past the event: the
    commit, made during the append, and the notification's way), in the
    consumers' process ``poll`` (until the dispatcher's read carrying the
    event started),
    ``read`` (that read's round trip and decoding) and ``deliver`` (until
    the handler was called).

The stage figures are each stage's median over every delivery
(``<stage>_p50_ms``), and its mean over the slowest 1% of deliveries, those
at or above the p99 (``<stage>_tail_ms``): the tail's make-up, which sums
to the tail's mean latency. ``gc_tail_ms`` is the mean time the garbage
collector ran, in either process, during those slow deliveries
(`benchmarks._gc.GCTimer` keeps the pauses); ``gc_pause_max_ms`` the longest
pause between the first publish and the last delivery measured.

Stdlib and trioflow's public `trioflow.stores.StoreWrapper` only: the
wrapper costs two clock readings per store call, a few hundred nanoseconds
per group commit.
"""

from __future__ import annotations

import array
import bisect
import math
import statistics
from collections.abc import Mapping, Sequence
from time import monotonic_ns

from trioflow import Event
from trioflow.stores import Appended, NewEvent, Store, StoreWrapper

#: A store call: (started ns, returned ns, first seq, last seq).
Span = tuple[int, int, int, int]
#: A notification: (returned ns, the head it reported).
Wake = tuple[int, int]

_NS_PER_MS = 1_000_000


class TimedStore(StoreWrapper):
    """Passes every call on, noting when appends, reads and notifications happened.

    The notes go into flat arrays of integers while the run goes on: no
    object per call that the garbage collector would track, so that
    measuring does not set off collections of its own (a tuple per call did:
    one full collection per run in the consumers' process).
    """

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self._appends = array.array("q")
        self._reads = array.array("q")
        self._wakes = array.array("q")

    @property
    def appends(self) -> list[Span]:
        """Every append that numbered events, in the order they returned."""
        return _spans(self._appends)

    @property
    def reads(self) -> list[Span]:
        """Every read that returned events, in the order they returned."""
        return _spans(self._reads)

    @property
    def wakes(self) -> list[Wake]:
        """Every notification, in order."""
        notes = self._wakes
        return [(notes[i], notes[i + 1]) for i in range(0, len(notes), 2)]

    async def append(self, events: Sequence[NewEvent]) -> Appended:
        started = monotonic_ns()
        appended = await self.inner.append(events)
        if appended.seqs:
            note = self._appends.append
            note(started)
            note(monotonic_ns())
            note(appended.seqs[0])
            note(appended.seqs[-1])
        return appended

    async def read(
        self, after: int, limit: int, *, max_bytes: int | None = None
    ) -> Sequence[Event]:
        started = monotonic_ns()
        page = await self.inner.read(after, limit, max_bytes=max_bytes)
        if page:
            note = self._reads.append
            note(started)
            note(monotonic_ns())
            note(page[0].seq)
            note(page[-1].seq)
        return page

    async def head(self) -> int:
        return await self.inner.head()

    async def load_cursors(self) -> dict[str, int]:
        return await self.inner.load_cursors()

    async def commit_cursors(
        self, cursors: Mapping[str, int], *, fences: Mapping[str, int] | None = None
    ) -> frozenset[str]:
        return await self.inner.commit_cursors(cursors, fences=fences)

    async def wait_for_append(self, after: int) -> int:
        head = await self.inner.wait_for_append(after)
        self._wakes.append(monotonic_ns())
        self._wakes.append(head)
        return head


def _spans(notes: array.array[int]) -> list[Span]:
    return [(notes[i], notes[i + 1], notes[i + 2], notes[i + 3]) for i in range(0, len(notes), 4)]


def _first_span(spans: Sequence[Span], events: int) -> list[Span | None]:
    """By seq (index 0 unused): the earliest span carrying it."""
    found: list[Span | None] = [None] * (events + 1)
    for span in sorted(spans):
        for seq in range(max(span[2], 1), min(span[3], events) + 1):
            if found[seq] is None:
                found[seq] = span
    return found


def _first_wake(wakes: Sequence[Wake], times: Sequence[int], after_ns: int, seq: int) -> int | None:
    """The first notification at or after ``after_ns`` whose head reached ``seq``."""
    for time, head in wakes[bisect.bisect_left(times, after_ns) :]:
        if head >= seq:
            return time
    return None


class _Pauses:
    """The collector's pauses (disjoint), to ask how long they took within an interval."""

    def __init__(self, pauses: Sequence[tuple[int, int]]) -> None:
        self.pauses = sorted(pauses)
        self.starts = [start for start, _ in self.pauses]
        self.ends = [end for _, end in self.pauses]
        self.before = [0]
        for start, end in self.pauses:
            self.before.append(self.before[-1] + end - start)

    def within(self, start: int, end: int) -> int:
        """Nanoseconds of pauses between ``start`` and ``end``."""
        first = bisect.bisect_right(self.ends, start)
        last = bisect.bisect_left(self.starts, end)
        if first >= last:
            return 0
        total = self.before[last] - self.before[first]
        total -= max(0, start - self.starts[first])
        total -= max(0, self.ends[last - 1] - end)
        return total


def breakdown(
    *,
    stamps: Mapping[int, int],
    samples: Sequence[Sequence[int]],
    warmup: int,
    appends: Sequence[Span],
    reads: Sequence[Span] | None = None,
    wakes: Sequence[Wake] = (),
    pauses: Sequence[tuple[int, int]] = (),
) -> dict[str, float]:
    """Split every delivery's latency into stages; their medians and their means in the tail.

    Args:
        stamps: Each event's publish timestamp (``monotonic_ns``), by seq.
        samples: Per consumer, the latency of seqs 1..N in order (ns).
        warmup: Each consumer's first samples left out, as in the percentiles.
        appends: The publisher's `TimedStore.appends`.
        reads: The consumers' process's `TimedStore.reads`: across processes only.
        wakes: The consumers' process's `TimedStore.wakes`.
        pauses: Garbage collections in either process, (start, end) ns, sorted.
    """
    events = len(stamps)
    appended = _first_span(appends, events)
    read = _first_span(reads, events) if reads is not None else None
    wakes = sorted(wakes)
    times = [time for time, _ in wakes]
    collected = _Pauses(pauses)
    woken: dict[int, int | None] = {}
    stages: dict[str, list[tuple[int, float]]] = {}
    totals: list[int] = []
    in_gc: list[float] = []
    first, last = math.inf, -math.inf
    for consumer in samples:
        for index, latency in enumerate(consumer[warmup:], start=warmup):
            seq = index + 1
            start, handled = stamps[seq], stamps[seq] + latency
            span = appended[seq]
            if span is None:
                continue
            marks = [("queue", span[0])]
            if read is None:
                marks.append(("append", span[1]))
            else:
                # The consumers' process learns of the commit, made during the
                # append, by notification: the publisher's return is not on its way.
                if seq not in woken:
                    woken[seq] = _first_wake(wakes, times, span[0], seq)
                page = read[seq]
                if page is None or woken[seq] is None:
                    continue
                marks += [("append_notify", woken[seq] or 0), ("poll", page[0]), ("read", page[1])]
            marks.append(("deliver", handled))
            before = start
            for name, mark in marks:
                # A read that began before its notification came caught the
                # event early: that stage took no time, not a negative one.
                mark = max(mark, before)
                stages.setdefault(name, []).append((latency, (mark - before) / _NS_PER_MS))
                before = mark
            totals.append(latency)
            in_gc.append(collected.within(start, handled) / _NS_PER_MS)
            first, last = min(first, start), max(last, handled)
    if not totals:
        return {}
    cut = sorted(totals)[max(math.ceil(0.99 * len(totals)), 1) - 1]
    figures: dict[str, float] = {}
    for name, values in stages.items():
        figures[f"{name}_p50_ms"] = statistics.median(value for _, value in values)
        figures[f"{name}_tail_ms"] = statistics.fmean(
            value for latency, value in values if latency >= cut
        )
    figures["gc_tail_ms"] = statistics.fmean(
        gc for latency, gc in zip(totals, in_gc, strict=True) if latency >= cut
    )
    # Within the measurement: not the collection a process makes before it.
    during = [end - start for start, end in pauses if end > first and start < last]
    figures["gc_pause_max_ms"] = max(during, default=0) / _NS_PER_MS
    return figures
