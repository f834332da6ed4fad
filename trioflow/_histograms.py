"""Histograms with fixed buckets, recorded on the hot path, read as frozen snapshots.

A `Histogram` belongs to the component that makes the measurement (the
dispatcher its publish latency and batch sizes, the cursor writer its commit
latency, each consumer its handler duration). Recording appends the value to
a list, which is sorted into the buckets every `FOLD_AT` values and when a
snapshot is taken: a handler call is timed for the cost of an append, not of
a bisection and a counter update each. `Flow.statistics` takes a
`HistogramSnapshot` of each, which `trioflow.metrics` exposes to Prometheus
at scrape time.
"""

from __future__ import annotations

import bisect
import math

import attrs

#: Upper bounds, in seconds, of the latency and duration buckets: from 0.1 ms
#: (a handler that does nothing, a group commit on the memory store) to a minute.
SECONDS_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
#: Upper bounds of the buckets of events per group commit (`App` ``max_batch``
#: is 10,000 by default).
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
#: Values a histogram holds unsorted at most, before it counts them into its buckets.
FOLD_AT = 1024


@attrs.frozen(kw_only=True)
class HistogramSnapshot:
    """The observations of a histogram so far, counted in fixed buckets.

    Attributes:
        bounds: The buckets' upper bounds, increasing; an observation ``v``
            falls in the first bucket whose bound is ``>= v`` (Prometheus'
            ``le``), or in the overflow bucket past the last bound.
        counts: Observations per bucket, one more than ``bounds`` (the last
            is the overflow bucket); not cumulative.
        count: Observations in all, ``sum(counts)``.
        sum: The sum of the observed values.
    """

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    count: int
    sum: float

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= bound)`` for every bucket, ending at ``inf``.

        The shape of Prometheus' ``_bucket`` series.
        """
        total = 0
        buckets = []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += count
            buckets.append((bound, total))
        return buckets


@attrs.define(eq=False, slots=True)
class Histogram:
    """A histogram its owner records into with `observe`; others read `snapshot`."""

    bounds: tuple[float, ...] = attrs.field()
    _counts: list[int] = attrs.field(init=False)
    _sum: float = 0.0
    #: Observations not yet counted into ``_counts`` and ``_sum``.
    _pending: list[float] = attrs.Factory(list)

    @bounds.validator
    def _check_bounds(self, _: object, bounds: tuple[float, ...]) -> None:
        if not bounds or list(bounds) != sorted(set(bounds)) or not math.isfinite(bounds[-1]):
            raise ValueError(f"bounds must be finite, strictly increasing numbers, got {bounds!r}")

    def __attrs_post_init__(self) -> None:
        self._counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        """Count one observation of ``value``."""
        pending = self._pending
        pending.append(value)
        if len(pending) >= FOLD_AT:
            self._fold()

    def snapshot(self) -> HistogramSnapshot:
        """The observations so far, as a frozen value."""
        self._fold()
        counts = tuple(self._counts)
        return HistogramSnapshot(
            bounds=self.bounds, counts=counts, count=sum(counts), sum=self._sum
        )

    def _fold(self) -> None:
        """Count the pending observations into the buckets."""
        pending = self._pending
        if not pending:
            return
        pending.sort()
        counts = self._counts
        below = 0
        for index, bound in enumerate(self.bounds):
            # Values <= bound: Prometheus' "le".
            upto = bisect.bisect_right(pending, bound, lo=below)
            counts[index] += upto - below
            below = upto
        counts[-1] += len(pending) - below
        self._sum += sum(pending)
        pending.clear()
