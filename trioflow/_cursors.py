"""Durable cursor commits, grouped across consumers."""

from __future__ import annotations

import attrs
import trio

from ._state import ConsumerState
from .stores._base import Store


@attrs.define(eq=False, slots=True)
class _Round:
    """One store write and everyone waiting on it."""

    done: trio.Event = attrs.Factory(trio.Event)
    error: BaseException | None = None


@attrs.define(eq=False)
class CursorWriter:
    """Commits consumers' cursors, coalescing concurrent requests into one write.

    Consumers ask for a commit and wait for it; every request waiting when a
    write starts is carried by that write, so many consumers committing at
    once cost one store transaction.
    """

    store: Store
    _pending: dict[str, tuple[ConsumerState, int]] = attrs.Factory(dict)
    _wakeup: trio.Event = attrs.Factory(trio.Event)
    _round: _Round = attrs.Factory(_Round)
    #: Woken after every successful write (wait_idle waits on it).
    changed: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)

    async def commit(self, state: ConsumerState, seq: int) -> None:
        """Durably record ``seq`` as the consumer's cursor.

        Raises:
            StoreError: The write failed; the cursor stays where it was.
        """
        self._pending[state.spec.name] = (state, seq)
        this_round = self._round
        self._wakeup.set()
        await this_round.done.wait()
        if this_round.error is not None:
            raise this_round.error

    async def commit_now(self, states: list[ConsumerState]) -> None:
        """Write the given consumers' positions directly (the final flush)."""
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
            self._wakeup = trio.Event()
            batch, self._pending = self._pending, {}
            this_round, self._round = self._round, _Round()
            try:
                await self.store.commit_cursors({name: seq for name, (_, seq) in batch.items()})
            except Exception as exc:
                this_round.error = exc
                this_round.done.set()
                continue
            for state, seq in batch.values():
                state.committed = max(state.committed, seq)
            this_round.done.set()
            self.changed.unpark_all()
