"""Where a consumer starts from: its first cursor, or a stored one not pruned past."""

from __future__ import annotations

from .._errors import PrunedLogError
from ._state import ConsumerState


class Startup(ConsumerState):
    """Where a consumer starts: its first cursor, and the pruned-log check."""

    __slots__ = ()

    async def _first_cursor(self) -> int:
        """Store the cursor of a consumer the store holds none for, at once; return it.

        ``"earliest"`` begins after the pruned part of the log: with the
        oldest event kept. Stored at once, the cursor holds pruning back
        from then on; a prune that was under way meanwhile may have passed
        it, so the bounds are read again after it landed (`Store.log_bounds`
        waits for such a prune) and the cursor moved up to the pruned log:
        for a new consumer that is where the earliest event still is.
        """
        runner, spec = self._runner, self.spec
        bounds = await runner.store.log_bounds()
        cursor = bounds.pruned_through if spec.start == "earliest" else bounds.head
        while True:
            await runner.cursors.commit_first(self._cursor, cursor, self._processed)
            pruned_through = (await runner.store.log_bounds()).pruned_through
            if pruned_through <= cursor:
                return cursor
            cursor = pruned_through

    async def _check_not_pruned(self, cursor: int) -> None:
        """Refuse to start from a stored cursor whose next events were pruned.

        Pruning never passes a stored cursor, so this takes force: a cursor
        written into the database by hand, or restored from an old backup.

        Raises:
            PrunedLogError: Events after ``cursor`` were pruned.
        """
        pruned_through = (await self._runner.store.log_bounds()).pruned_through
        if cursor < pruned_through:
            name = self.spec.name
            if self.spec.partition is None:
                command = f"`trioflow consumers reset {name} --to earliest`, or "
                remove = f"`trioflow consumers remove {name}`, or "
            else:
                # The command moves or removes a whole group, never one
                # partition: resetting would send the others back too.
                group = name.rpartition("/")[0]
                command = ""
                remove = f"the whole group: `trioflow consumers remove {group}`, or "
            raise PrunedLogError(
                f"consumer {name!r} has cursor {cursor}, but the events up to "
                f"{pruned_through} were pruned: it would skip events {cursor + 1} to "
                f"{pruned_through}, so it does not start. Set its cursor to {pruned_through} "
                f"or later to go on with the oldest event kept ({command}"
                f"store.set_cursor({name!r}, {pruned_through})), or remove it to start afresh "
                f"({remove}store.forget_consumer({name!r}))",
                consumers={name: cursor},
            )
