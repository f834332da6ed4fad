"""A consumer's state, and the few questions every part of it asks.

`ConsumerState` holds what one consumer owns: its position and counters, the
scopes its stop reaches, its stall and halt, its requeue bookkeeping; and the
handles on what others own (its feed, its cursor progress, its ownership),
which it changes only through their owners' methods. The classes of this
package add behaviour to it, one job each, and `Consumer` joins them.
"""

from __future__ import annotations

import collections
import datetime
import math
from typing import TYPE_CHECKING

import attrs
import trio

from .._app import ConsumerSpec
from .._cursors import CursorProgress
from .._dispatch import Batch, Subscription
from .._events import Event
from .._groups import partition_of
from .._histograms import SECONDS_BUCKETS, Histogram
from .._ownership import Ownership
from .._statistics import Stall

if TYPE_CHECKING:
    from ._runner import ConsumerRunner


#: Seconds a consumer goes on handling events (or batches) whose handlers do
#: not wait before it lets the flow's other tasks run: a checkpoint between
#: two calls, so that the lease keeper, the dispatcher and the other
#: consumers are never held up for a whole batch.
TIME_SLICE = 0.001


def describe(error: BaseException) -> str:
    return f"{type(error).__qualname__}: {error}"


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@attrs.define(eq=False)
class ConsumerState:
    """A consumer's state: its position and counters, its feed, cursor and
    ownership; the classes of this package add its behaviour, one job each."""

    spec: ConsumerSpec
    _runner: ConsumerRunner
    _feed: Subscription
    _cursor: CursorProgress
    #: Whether this flow owns it, as the lease keeper knows.
    _ownership: Ownership
    #: Last sequence number handled (or skipped by the type filter, or given
    #: up on as a dead letter), in memory.
    _position: int = 0
    _processed: int = 0
    _failures: int = 0
    _retries: int = 0
    _redelivered: int = 0
    _restarts: int = 0
    _dead_lettered: int = 0
    #: Seconds per handler call.
    _handler_duration: Histogram = attrs.Factory(lambda: Histogram(SECONDS_BUCKETS))
    #: When its handling has held the thread for `TIME_SLICE` (trio time).
    _yield_at: float = -math.inf
    #: trio.current_time() of its last cursor commit request on a schedule.
    _requested_at: float = 0.0
    #: The shielded scope around its current handlers, while it has one.
    _handler_scope: trio.CancelScope | None = None
    #: The wait before the next attempt at a failed event, while it waits.
    _backoff_scope: trio.CancelScope | None = None
    #: A batch consumer's wait for more events to fill a batch (``max_wait``).
    _fill_scope: trio.CancelScope | None = None
    #: A batch consumer's: a batch taken from its feed while filling one, that
    #: does not follow on from it (it handles it next).
    _held: Batch | None = None
    #: A batch consumer's: the positions after each batch it handled that may
    #: not be durable yet (its redelivery bound counts batches).
    _batch_ends: collections.deque[int] = attrs.Factory(collections.deque)
    #: Stopping on its own (removed from the flow), not with the whole flow,
    #: and when its handlers in flight are cancelled then (trio time).
    _stopping: bool = False
    _stop_deadline: float = math.inf
    #: The event it is held up at, and whether it halted there.
    _stall: Stall | None = None
    _halted: bool = False
    _resumed: trio.Event = attrs.Factory(trio.Event)
    #: When to look for requeued dead letters next (trio time).
    _requeue_check_at: float = -math.inf
    #: Whether letters requeued to come due later may be waiting: it was told
    #: of a requeue, it has just started, or it saw some. Else it only looks
    #: for due ones, every `REQUEUE_POLL` seconds.
    _requeues_later: bool = True
    #: When the letters this flow requeued come due (trio time; inf: none).
    _requeue_told_at: float = math.inf
    _in_requeues: bool = False
    #: The requeued dead letter being handled, if any: a transactional handler
    #: removes it in its own transaction.
    _requeued_letter: int | None = None
    _finished: trio.Event = attrs.Factory(trio.Event)

    @property
    def name(self) -> str:
        """The durable consumer name."""
        return self.spec.name

    async def _take_turns(self) -> None:
        """Let the flow's other tasks run if its handling has held the thread for a
        `TIME_SLICE` (handlers that wait let them run anyway)."""
        if trio.current_time() >= self._yield_at:
            await trio.lowlevel.cancel_shielded_checkpoint()
            self._yield_at = trio.current_time() + TIME_SLICE

    def _must_stop(self) -> bool:
        return self._stopping or self._runner.stopping

    def _selects(self, event: Event) -> bool:
        spec = self.spec
        if spec.types is not None and event.type not in spec.types:
            return False
        return spec.partition is None or (
            partition_of(event.key, event.seq, spec.partitions or 1) == spec.partition
        )
