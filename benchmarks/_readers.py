"""The readers of the hand-written programs: a no-op handler that checks order, and its verdict.

Shared by the hand-written asyncpg program (and its ceilings: the COPY writer
alone, the bytes-only readers) and the peers' programs (asyncio processes
that must not import trio), so the standard library only: the handler, the
order check, the figures every program reports and how it prints them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence


class Tally:
    """A reader's no-op handler, which only notes what it was given.

    It is called with each event's place in publication order, 1..N (the
    sequence number in the asyncpg program, ``data["order"]`` in the peers'),
    so a reader that lost, repeated or reordered an event is caught.
    """

    __slots__ = ("count", "last", "out_of_order")

    def __init__(self) -> None:
        self.count = 0
        self.last = 0
        self.out_of_order = 0

    async def handle(self, order: int, data: object) -> None:
        """Count the event and check it directly follows the previous one."""
        if order != self.last + 1:
            self.out_of_order += 1
        self.last = order
        self.count += 1


def order_problems(tallies: Sequence[Tally], events: int) -> list[str]:
    """What each reader got wrong, unless it handled exactly events 1..``events`` in order."""
    return [
        f"reader {index} handled {tally.count:,} events ending at {tally.last:,} "
        f"with {tally.out_of_order:,} out of order (expected 1..{events:,} in order)"
        for index, tally in enumerate(tallies)
        if tally.count != events or tally.last != events or tally.out_of_order
    ]


#: A program's run: the figures, and under "problems" what its check found.
Outcome = dict[str, object]


def figures(
    *,
    events: int,
    readers: int,
    started: float,
    published: float,
    delivered: float | None,
    gc_seconds: float,
    problems: list[str],
) -> Outcome:
    """A run's figures, with the same meaning in every program and in trioflow's cases.

    ``delivered`` is None for a writer alone (no readers): it reports only
    what it published.
    """
    outcome: Outcome = {
        "publish_s": published - started,
        "publish_per_s": events / (published - started),
        "gc_s": gc_seconds,
        "problems": problems,
    }
    if delivered is not None:
        outcome["delivered_s"] = delivered - started
        outcome["delivered_per_s"] = readers * events / (delivered - started)
    return outcome


def report(outcome: Mapping[str, object]) -> int:
    """Print ``outcome`` as JSON on stdout, its ``problems`` on stderr; return the exit status.

    The status is 1 if the run's check found problems (the harness then fails
    the benchmark with the stderr), else 0.
    """
    print(json.dumps(outcome), flush=True)
    problems = outcome["problems"]
    assert isinstance(problems, list)
    if problems:
        print("; ".join(problems), file=sys.stderr)
        return 1
    return 0
