"""The blocking watchdog: warn when one task step held the event loop too long.

Trio runs one task step at a time, so a handler that calls ``time.sleep`` or a
synchronous client holds up every other consumer, the dispatcher and every
publisher until it returns. Nothing fails; everything is just late. While a
flow runs, a trio `Instrument` times every task step of the run with
`time.perf_counter` (the real time the loop was held, whatever clock trio
uses) and logs a WARNING on the ``trioflow`` logger for a step that took
longer than ``App(blocking_warning=...)`` seconds.

It times every task of the run, not only the flow's: a blocking call in a
publisher, or in any other task beside the flow, stalls the consumers just
the same, and knowing which task did it is the point. Watching only the
flow's tasks would cost the same, since finding out whose step it was costs
more than timing it; so the hot path only times, and all the rest (who ran,
whether to warn) happens for the rare step over the threshold.

The flow names its tasks with `flow_task_name` and `consumer_task_name`. A
step is blamed on a consumer when it ran in the consumer's task or in a task
started under it (a nursery in its handler); any other step on the task's
own name. Warnings are rate-limited per culprit: at most one every
`WARN_EVERY` seconds, the next one (or a summary when the flow stops) giving
the count of steps left out, so a handler that blocks on every event does not
flood the log. One instrument serves every flow of a run (several Apps may
run flows side by side), so each slow step is reported once, against the
lowest threshold of the flows running.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
from collections.abc import Iterator, Mapping
from time import perf_counter

import attrs
import trio

logger = logging.getLogger("trioflow")

#: Seconds between two warnings about the same consumer or task.
WARN_EVERY = 60.0

_FLOW = "trioflow "
_CONSUMER = "trioflow consumer "
_ADVICE = "run blocking code with `await trio.to_thread.run_sync(...)`"


def flow_task_name(role: str) -> str:
    """The name of one of the flow's own tasks, such as ``"dispatcher"``."""
    return _FLOW + role


def consumer_task_name(consumer: str) -> str:
    """The name of the task that runs the consumer named ``consumer``."""
    return _CONSUMER + consumer


@attrs.define(eq=False)
class _Quiet:
    """One culprit's rate limit: no warning until ``until``, counting the rest."""

    until: float
    suppressed: int = 0
    longest: float = 0.0


@attrs.define(eq=False)
class BlockingWatchdog(trio.abc.Instrument):
    """Warn about task steps that held the event loop over ``threshold`` seconds.

    Attributes:
        threshold: Seconds one task step may hold the loop before a warning.
        every: Seconds between two warnings about the same culprit.
    """

    threshold: float
    every: float = WARN_EVERY
    #: The thresholds of the flows this instrument watches for.
    thresholds: list[float] = attrs.Factory(list)
    #: perf_counter() when the current step began. Infinite until one is
    #: seen to begin, so the step that installs the instrument is not timed.
    _began: float = math.inf
    #: Rate limits, by culprit (what the warning names).
    _quiet: dict[str, _Quiet] = attrs.Factory(dict)
    #: perf_counter() when the garbage collection under way began.
    _collecting_since: float = 0.0

    # `after_task_step` runs after every step of every task: keep it to a
    # clock read, a subtraction and a comparison. A step begins where the
    # previous one ended, or where the wait for I/O ended: trio's own work
    # between steps takes microseconds, and leaving out `before_task_step`
    # halves what the instrument costs per step (trio's call of a hook costs
    # more than the hook).
    def after_io_wait(self, timeout: float) -> None:
        """Note when the loop stopped waiting: the next step begins."""
        self._began = perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        """Warn if the step that just ended took longer than the threshold."""
        now = perf_counter()
        held = now - self._began
        self._began = now
        if held > self.threshold:
            self._blocked(task, held)
            # Logging may take a while; it is no task's step.
            self._began = perf_counter()

    def collecting(self, phase: str, info: Mapping[str, int]) -> None:
        """Leave garbage collections out of the step they interrupt.

        A `gc.callbacks` entry while the instrument is installed. A
        collection holds the loop too (in whichever thread it runs), but the
        step it fell in did not make it, and would be blamed for a blocking
        call it did not make. Moving the step's start forward by the
        collection's length costs nothing per step.
        """
        if phase == "start":
            self._collecting_since = perf_counter()
        else:
            self._began += perf_counter() - self._collecting_since

    def _blocked(self, task: trio.lowlevel.Task, held: float) -> None:
        now = perf_counter()
        culprit, is_consumer = _culprit(task)
        quiet = self._quiet.get(culprit)
        if quiet is not None and now < quiet.until:
            quiet.suppressed += 1
            quiet.longest = max(quiet.longest, held)
            return
        self._quiet.pop(culprit, None)
        self.report_suppressed(until=now)
        if is_consumer:
            message = "%s blocked the event loop for %.2f s in one step: its handler made a "
            message += "blocking call; " + _ADVICE
        else:
            message = "%s blocked the event loop for %.2f s in one step, holding up every "
            message += "consumer; " + _ADVICE
        if quiet is not None and quiet.suppressed:
            message += " (and in %s since its last warning, the longest %.2f s)"
            logger.warning(message, culprit, held, _more_steps(quiet.suppressed), quiet.longest)
        else:
            logger.warning(message, culprit, held)
        self._quiet[culprit] = _Quiet(until=now + self.every)

    def report_suppressed(self, *, until: float = math.inf) -> None:
        """Log the steps left out by rate limits that ended before ``until``.

        Then forget those rate limits, so culprits that stopped blocking are
        not remembered forever.
        """
        for culprit, quiet in list(self._quiet.items()):
            if quiet.until > until:
                continue
            del self._quiet[culprit]
            if quiet.suppressed:
                logger.warning(
                    "%s blocked the event loop in %s since its last warning, the longest "
                    "for %.2f s; %s",
                    culprit,
                    _more_steps(quiet.suppressed),
                    quiet.longest,
                    _ADVICE,
                )


def _more_steps(count: int) -> str:
    return "1 more step" if count == 1 else f"{count} more steps"


def _culprit(task: trio.lowlevel.Task) -> tuple[str, bool]:
    """What to blame a step of ``task`` on, and whether that is a consumer."""
    current: trio.lowlevel.Task | None = task
    while current is not None:
        if current.name.startswith(_CONSUMER):
            return f"consumer {current.name.removeprefix(_CONSUMER)!r}", True
        nursery = current.parent_nursery
        current = None if nursery is None else nursery.parent_task
    return f"task {task.name!r}", False


_RUN_WATCHDOG: trio.lowlevel.RunVar[BlockingWatchdog | None] = trio.lowlevel.RunVar(
    "trioflow.watchdog", default=None
)


@contextlib.contextmanager
def watch_blocking(threshold: float | None) -> Iterator[None]:
    """Warn, inside the block, about task steps that hold the loop too long.

    Installs the run's `BlockingWatchdog` (the first flow of the run to enter
    installs it, the last to leave removes it and logs what its rate limits
    left out). With several flows running, the lowest threshold applies.

    Args:
        threshold: Seconds one task step may hold the event loop before a
            warning; None watches nothing.
    """
    if threshold is None:
        yield
        return
    watchdog = _RUN_WATCHDOG.get()
    if watchdog is None:
        watchdog = BlockingWatchdog(threshold=threshold)
        _RUN_WATCHDOG.set(watchdog)
        gc.callbacks.append(watchdog.collecting)
    # Adding is idempotent, and puts back an instrument trio removed because
    # it raised; the step under way is not timed.
    watchdog._began = math.inf
    trio.lowlevel.add_instrument(watchdog)
    watchdog.thresholds.append(threshold)
    watchdog.threshold = min(watchdog.thresholds)
    try:
        yield
    finally:
        watchdog.thresholds.remove(threshold)
        if watchdog.thresholds:
            watchdog.threshold = min(watchdog.thresholds)
        else:
            _RUN_WATCHDOG.set(None)
            with contextlib.suppress(ValueError):
                gc.callbacks.remove(watchdog.collecting)
            # trio removes an instrument that raised; it is gone already.
            with contextlib.suppress(KeyError):
                trio.lowlevel.remove_instrument(watchdog)
            watchdog.report_suppressed()
