"""Histograms with fixed buckets, recorded on the hot path, read as frozen snapshots.

A `Histogram` belongs to the component that makes the measurement (the
dispatcher its publish latency and batch sizes, the cursor writer its commit
latency, each consumer its handler duration). Recording is one bisection of
a short tuple and two additions, with no allocation; `Flow.statistics` takes
a `HistogramSnapshot` of each, which `trioflow.metrics` exposes to
Prometheus at scrape time.
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

    @bounds.validator
    def _check_bounds(self, _: object, bounds: tuple[float, ...]) -> None:
        if not bounds or list(bounds) != sorted(set(bounds)) or not math.isfinite(bounds[-1]):
            raise ValueError(f"bounds must be finite, strictly increasing numbers, got {bounds!r}")

    def __attrs_post_init__(self) -> None:
        self._counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        """Count one observation of ``value``."""
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self._sum += value

    def snapshot(self) -> HistogramSnapshot:
        """The observations so far, as a frozen value."""
        counts = tuple(self._counts)
        return HistogramSnapshot(
            bounds=self.bounds, counts=counts, count=sum(counts), sum=self._sum
        )
