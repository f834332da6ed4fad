"""Timing the garbage collector; the standard library only, so every benchmark program can use it.

The subprocess programs (the hand-written asyncpg program, the peers' programs)
import no trio and no trioflow; this module is safe for them too.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Mapping


class GCTimer:
    """Adds up the time the garbage collector runs, while in the ``with`` block.

    Trio programs allocate heavily; this shows how much of a run was
    collection pauses (``gc_s`` in the JSON file), which grow with the heap.
    With ``keep_pauses``, each pause is also kept in `pauses`, as (start, end)
    in ``time.monotonic_ns()``: the clock the latency workload stamps events
    with, one for every process of the machine.
    """

    def __init__(self, *, keep_pauses: bool = False) -> None:
        self.seconds = 0.0
        self.pauses: list[tuple[int, int]] = []
        self._keep = keep_pauses
        self._started = 0

    def _callback(self, phase: str, info: Mapping[str, int]) -> None:
        if phase == "start":
            self._started = time.monotonic_ns()
        else:
            ended = time.monotonic_ns()
            self.seconds += (ended - self._started) / 1e9
            if self._keep:
                self.pauses.append((self._started, ended))

    def __enter__(self) -> GCTimer:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc_info: object) -> None:
        gc.callbacks.remove(self._callback)
