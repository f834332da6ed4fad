"""The readers of the hand-written programs: a no-op handler that checks order, and its verdict.

Shared by the hand-written asyncpg program and the peers' programs (asyncio
processes that must not import trio), so the standard library only.
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
