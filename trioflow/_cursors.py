"""Durable cursor commits, grouped across consumers and pipelined with handling."""

from __future__ import annotations

import attrs
import trio

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

        Raises:
            StoreError: The write carrying it failed; the consumer should
                restart from the cursor the store holds.
        """
        await trio.lowlevel.checkpoint()
        while state.committed < seq:
            if state.cursor_error is not None:
                error, state.cursor_error = state.cursor_error, None
                raise error
            await self.changed.park()

    async def commit(self, state: ConsumerState) -> None:
        """Make the consumer's current position durable, and wait for it."""
        self.request(state, state.position)
        await self.wait_durable(state, state.position)

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
                    state.committed = max(state.committed, state.position)
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
            for state, _, _ in batch.values():
                state.cursor_error = exc
                # Let the next request carry this position again.
                state.requested = state.committed
                state.requested_processed = state.committed_processed
        else:
            for state, seq, processed in batch.values():
                state.cursor_error = None
                if seq > state.committed:
                    state.committed = seq
                    state.committed_processed = processed
        self.changed.unpark_all()
