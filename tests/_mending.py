"""Shared by the property tests of failure policies: mending a flow, and letting it settle."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

import trioflow


async def mend(flow: trioflow.Flow, requeued: Callable[[str], set[int]]) -> None:
    """Resume every halted consumer and requeue every dead letter (noted in ``requeued``)."""
    for name, stats in flow.statistics().consumers.items():
        if stats.halted:
            await flow.resume(name)
        letters = [letter.seq for letter in await flow.dead_letters(name)]
        if letters:
            requeued(name).update(letters)
            await flow.requeue(name, letters)


async def settle(flow: trioflow.Flow, mend: Callable[[trioflow.Flow], Awaitable[None]]) -> None:
    """Mend (resume, requeue) until every consumer is level and idle, with no dead letter.

    Failures planned to end keep happening a few times: this mends up to 12
    times, and fails the test if the consumers have not settled by then.
    """
    for _ in range(12):
        await mend(flow)
        with trio.move_on_after(1_000) as waiting:
            await flow.wait_idle()
        stats = flow.statistics().consumers.values()
        settled = not waiting.cancelled_caught and not any(s.halted for s in stats)
        if settled and not await flow.dead_letters():
            return
    raise AssertionError("the consumers did not settle")
