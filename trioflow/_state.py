"""What the runtime knows about one consumer while a flow runs."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import attrs
import trio

from ._app import ConsumerSpec

if TYPE_CHECKING:
    from ._dispatch import Batch


@attrs.define(eq=False)
class ConsumerState:
    """One consumer's live state, shared by the dispatcher and its own task.

    The dispatcher writes ``buffered`` and ``attached``; the consumer task
    writes the rest. Everything runs in one trio thread, so a read and a write
    with no checkpoint between them are atomic.
    """

    spec: ConsumerSpec
    send: trio.MemorySendChannel[Batch]
    receive: trio.MemoryReceiveChannel[Batch]
    #: Last sequence number handled (or skipped by the type filter), in memory.
    position: int = 0
    #: Last sequence number durably committed as its cursor.
    committed: int = 0
    #: Events sent to its channel and not yet taken out.
    buffered: int = 0
    #: Their total `Event.size` (counted for bounded consumers only).
    buffered_bytes: int = 0
    #: False while it is too far behind to be fed live (bounded mode).
    attached: bool = True
    #: ``processed`` when the position now durable was reached.
    committed_processed: int = 0
    #: The latest position asked of the cursor writer, and ``processed`` then.
    requested: int = 0
    requested_processed: int = 0
    #: A failed cursor write, for the consumer to raise when it next waits.
    cursor_error: BaseException | None = None
    #: trio.current_time() of the last cursor commit request.
    committed_at: float = 0.0
    processed: int = 0
    failures: int = 0
    restarts: int = 0
    #: The sequence number its handler is working on, or None.
    in_flight: int | None = None
    #: The shielded scope around its current handlers, while it has one.
    handler_scope: trio.CancelScope | None = None
    #: The cancel scope of the running incarnation.
    scope: trio.CancelScope | None = None
    finished: trio.Event = attrs.Factory(trio.Event)

    @classmethod
    def new(cls, spec: ConsumerSpec) -> ConsumerState:
        """Return the state of a consumer about to start, with an empty channel."""
        send, receive = trio.open_memory_channel["Batch"](math.inf)
        return cls(spec=spec, send=send, receive=receive)
