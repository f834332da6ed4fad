"""Latency samples across processes: the publish timestamp, its clock, the report of samples.

The standard library only: the latency workload's child process (trioflow)
and the hand-written asyncpg latency program (`benchmarks.asyncpg_latency`,
asyncio, no trio) both stamp events and write their readers' samples the
same way, and `benchmarks.latency` reads and checks them with one code path.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

#: The key of the publish timestamp (``monotonic_ns``) in every event's data.
STAMP = "t_ns"

#: The clock of both timestamps: CLOCK_MONOTONIC, system-wide on Linux, so a
#: child process's readings can be compared with its parent's.
now_ns = time.monotonic_ns


class Sampled(Protocol):
    """A reader's tally (``benchmarks._readers.Tally``'s figures) and its latency samples."""

    count: int
    last: int
    out_of_order: int
    #: Nanoseconds from the publish timestamp to the handler's call, per event.
    samples: list[int]


def child_report(
    tallies: Sequence[Sampled],
    cursors: Mapping[str, int],
    stages: Mapping[str, object] | None = None,
) -> str:
    """What a child process writes for the harness: JSON, one entry per consumer (or reader).

    ``stages`` holds what the harness needs to split the latency into stages
    (`benchmarks._stages`), or None.
    """
    return json.dumps(
        {
            "stages": stages,
            "consumers": [
                {
                    "count": tally.count,
                    "last": tally.last,
                    "out_of_order": tally.out_of_order,
                    "samples_ns": tally.samples,
                }
                for tally in tallies
            ],
            "cursors": dict(cursors),
        }
    )
