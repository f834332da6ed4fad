"""Durable cursor commits, grouped across consumers and pipelined with handling.

Every cursor write of a flow goes through its one `CursorWriter`, one write
at a time, so a later write never lands under an earlier one; the stores
ignore a cursor below the stored one besides, so a stored cursor never moves
backwards, whatever order writes land in.
"""

from __future__ import annotations

import attrs
import trio

from ._errors import StoreError
from ._state import ConsumerState
from .stores._base import Store


@attrs.define(eq=False)
class CursorWriter:
    """Commits consumers' cursors, many consumers in one store write.

    A consumer *requests* a commit without waiting and keeps handling events;
    it waits (`wait_durable`) only when waiting is what keeps its redelivery
    bound: before it would have more than ``commit_every`` handled events
    that are not yet durable. Every request pending when a write starts is
    carried by that write.
    """

    store: Store
    _pending: dict[str, tuple[ConsumerState, int, int]] = attrs.Factory(dict)
    _wakeup: trio.Event = attrs.Factory(trio.Event)
    #: Woken after every write, successful or not.
    changed: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)
    #: How many tasks wait for durable cursors (`Flow.wait_idle`): while
    #: any does, idle consumers request their commits at once.
    flush_wanted: int = 0
    #: Held by every write: one at a time, so that a later write never lands
    #: under an earlier one (on a pooled store they use separate connections).
    _writing: trio.Lock = attrs.Factory(trio.Lock)

    def request(self, state: ConsumerState, seq: int) -> None:
        """Ask for ``seq`` (the consumer's position) to become its durable cursor."""
        if seq <= state.requested:
            return
        state.requested = seq
        state.requested_processed = state.processed
        self._pending[state.spec.name] = (state, seq, state.processed)
        self._wakeup.set()

    async def wait_durable(self, state: ConsumerState, seq: int) -> None:
        """Wait until the consumer's durable cursor is at ``seq`` or beyond.

        ``seq`` must have been requested. Raises only when the write carrying
        it failed and no write since asks for it; a failure of an earlier
        write does not end the wait for a later one still under way.

        Raises:
            StoreError: The write carrying ``seq`` failed; the consumer should
                restart (it keeps the position it reached).
        """
        await trio.lowlevel.checkpoint()
        while state.committed < seq:
            if state.requested < seq:
                raise state.cursor_error or StoreError(
                    f"the cursor write of consumer {state.spec.name!r} at {seq} failed"
                )
            await self.changed.park()

    async def commit(self, state: ConsumerState) -> None:
        """Make the consumer's current position durable, and wait for it."""
        self.request(state, state.position)
        await self.wait_durable(state, state.position)

    async def commit_first(self, state: ConsumerState, seq: int) -> None:
        """Store the first cursor of a consumer the store holds none for."""
        async with self._writing:
            await self.store.commit_cursors({state.spec.name: seq})
        self._landed(state, seq, state.processed)
        self.changed.unpark_all()

    async def commit_now(self, states: list[ConsumerState]) -> None:
        """Write the given consumers' positions directly (the final flush).

        Waits for a write under way, so that it cannot land afterwards with
        older positions.
        """
        async with self._writing:
            cursors = {s.spec.name: s.position for s in states if s.position > s.committed}
            if cursors:
                await self.store.commit_cursors(cursors)
                for state in states:
                    self._landed(state, state.position, state.processed)
                self.changed.unpark_all()

    async def run(self) -> None:
        """Write requested cursors until cancelled."""
        while True:
            await self._wakeup.wait()
            async with self._writing:
                await self._write()

    async def _write(self) -> None:
        self._wakeup = trio.Event()
        batch, self._pending = self._pending, {}
        try:
            await self.store.commit_cursors({name: seq for name, (_, seq, _) in batch.items()})
        except Exception as exc:
            for name, (state, _, _) in batch.items():
                state.cursor_error = exc
                if name not in self._pending:
                    # Let the next request carry this position again; a
                    # request made meanwhile carries a later one already.
                    state.requested = state.committed
                    state.requested_processed = state.committed_processed
        else:
            for state, seq, processed in batch.values():
                self._landed(state, seq, processed)
        self.changed.unpark_all()

    @staticmethod
    def _landed(state: ConsumerState, seq: int, processed: int) -> None:
        state.cursor_error = None
        if seq > state.committed:
            state.committed = seq
            state.committed_processed = processed
        if seq > state.requested:
            state.requested = seq
            state.requested_processed = processed
