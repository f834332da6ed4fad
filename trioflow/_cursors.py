"""Durable cursor commits, grouped across consumers and pipelined with handling.

The `CursorWriter` owns every consumer's cursor progress (`CursorProgress`:
what is durable, what was asked for) and is the one path by which a flow
writes cursors: one write at a time, so a later write never lands under an
earlier one. The stores ignore a cursor below the stored one besides, so a
stored cursor never moves backwards, whatever order writes land in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

import attrs
import trio

from ._dead_letters import DeadLetter
from ._errors import LeaseLostError, StoreError
from ._histograms import SECONDS_BUCKETS, Histogram, HistogramSnapshot
from ._ownership import LeaseKeeper
from .stores._base import Store
from .stores._transactions import StoreTransaction


@attrs.define(eq=False)
class CursorProgress:
    """One consumer's cursor, as the `CursorWriter` knows it; others only read it.

    ``processed`` figures are the consumer's count of handled events at the
    time a position was asked for or became durable, which is what its
    redelivery bound is measured in.
    """

    name: str
    _committed: int = 0
    _committed_processed: int = 0
    _requested: int = 0
    _requested_processed: int = 0
    #: The failure of the last write that carried this consumer, until a
    #: write of it succeeds.
    _error: BaseException | None = None

    @property
    def committed(self) -> int:
        """The durable cursor: the last position known to be in the store."""
        return self._committed

    @property
    def committed_processed(self) -> int:
        """The consumer's handled count when ``committed`` was reached."""
        return self._committed_processed

    @property
    def requested(self) -> int:
        """The latest position asked for (durable, or carried by a write to come)."""
        return self._requested

    @property
    def requested_processed(self) -> int:
        """The consumer's handled count when ``requested`` was asked for."""
        return self._requested_processed


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
    #: Whose fencing tokens every write carries, and who learns of refusals.
    leases: LeaseKeeper
    #: Requested positions by consumer: (progress, seq, processed, the
    #: fencing token of the ownership that reached seq).
    _pending: dict[str, tuple[CursorProgress, int, int, int | None]] = attrs.Factory(dict)
    _wakeup: trio.Event = attrs.Factory(trio.Event)
    #: Woken after every write, successful or not.
    _changed: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)
    #: How many tasks wait for durable cursors (`Flow.wait_idle`).
    _flush_wanted: int = 0
    #: Held by every write: one at a time, so that a later write never lands
    #: under an earlier one (on a pooled store they use separate connections).
    _writing: trio.Lock = attrs.Factory(trio.Lock)
    _commit_latency: Histogram = attrs.Factory(lambda: Histogram(SECONDS_BUCKETS))

    @property
    def commit_latency(self) -> HistogramSnapshot:
        """Seconds per cursor write that the store answered."""
        return self._commit_latency.snapshot()

    @property
    def flush_wanted(self) -> bool:
        """Whether a task waits for durable cursors: idle consumers then commit at once."""
        return self._flush_wanted > 0

    @contextlib.contextmanager
    def wanting_flush(self) -> Iterator[None]:
        """Make `flush_wanted` true for the length of the block."""
        self._flush_wanted += 1
        try:
            yield
        finally:
            self._flush_wanted -= 1

    async def wait_changed(self) -> None:
        """Wait until the next write ends, successfully or not, or a `nudge`."""
        await self._changed.park()

    def nudge(self) -> None:
        """Wake `wait_changed`'s waiters: a consumer finished work they may wait for."""
        self._changed.unpark_all()

    def loaded(self, progress: CursorProgress, cursor: int, position: int, processed: int) -> None:
        """Note the cursor a consumer read from the store as it (re)started.

        ``position`` and ``processed`` are the consumer's own, from before the
        start; if nothing it handled is still to be made durable, its
        redelivery bound counts from here.
        """
        if cursor > progress._committed:
            progress._committed = cursor
            progress._requested = max(progress._requested, cursor)
        if position <= progress._committed:
            progress._committed_processed = progress._requested_processed = processed

    def request(self, progress: CursorProgress, seq: int, processed: int) -> None:
        """Ask for ``seq`` (the consumer's position) to become its durable cursor."""
        if seq <= progress._requested:
            return
        progress._requested = seq
        progress._requested_processed = processed
        # Fenced by the token it was reached under, not the one current when
        # the write goes out: a position reached before the lease passed on
        # must never land under a later ownership (after an operator's reset).
        token = self.leases.token(progress.name)
        self._pending[progress.name] = (progress, seq, processed, token)
        self._wakeup.set()

    def moved_back(self, progress: CursorProgress, cursor: int, processed: int) -> None:
        """The stored cursor is below the one this flow committed: an operator
        moved it back (`Store.set_cursor`, or forgot it). Count from there, and
        drop a request for a later position still pending.
        """
        progress._committed = progress._requested = cursor
        progress._committed_processed = progress._requested_processed = processed
        progress._error = None
        self._pending.pop(progress.name, None)

    async def wait_durable(self, progress: CursorProgress, seq: int) -> None:
        """Wait until the consumer's durable cursor is at ``seq`` or beyond.

        ``seq`` must have been requested. Raises only when the write carrying
        it failed and no write since asks for it; a failure of an earlier
        write does not end the wait for a later one still under way.

        Raises:
            StoreError: The write carrying ``seq`` failed; the consumer should
                restart (it keeps the position it reached).
        """
        await trio.lowlevel.checkpoint()
        while progress._committed < seq:
            if progress._requested < seq:
                raise progress._error or StoreError(
                    f"the cursor write of consumer {progress.name!r} at {seq} failed"
                )
            await self._changed.park()

    async def commit(self, progress: CursorProgress, seq: int, processed: int) -> None:
        """Make ``seq`` the consumer's durable cursor, and wait for it."""
        self.request(progress, seq, processed)
        await self.wait_durable(progress, seq)

    async def commit_first(self, progress: CursorProgress, seq: int, processed: int) -> None:
        """Store the first cursor of a consumer the store holds none for.

        Raises:
            LeaseLostError: This flow does not own the consumer (any more).
        """
        async with self._writing:
            fences = self._fences([progress.name])
            if not fences:
                raise self._lost(progress.name, fences)
            refused = await self._commit_cursors({progress.name: seq}, fences)
        if refused:
            raise self._lost(progress.name, fences)
        self._landed(progress, seq, processed)
        self._changed.unpark_all()

    async def record_dead_letter(
        self, progress: CursorProgress, letter: DeadLetter, seq: int | None, processed: int
    ) -> None:
        """Record ``letter`` and, in the same store transaction, move the cursor to ``seq``
        (None: leave it), through the one write path.

        Raises:
            LeaseLostError: This flow does not own the consumer (any more);
                nothing was recorded.
        """
        async with self._writing:
            fences = self._fences([progress.name])
            if not fences:
                raise self._lost(progress.name, fences)
            try:
                await self.store.record_dead_letter(letter, cursor=seq, fence=fences[progress.name])
            except LeaseLostError:
                raise self._lost(progress.name, fences) from None
        if seq is not None:
            self._landed(progress, seq, processed)
            self._changed.unpark_all()

    async def flush(self, positions: Iterable[tuple[CursorProgress, int, int]]) -> None:
        """Write the given (progress, position, processed) directly: the final flush.

        Waits for a write under way, so that it cannot land afterwards with
        older positions. Consumers this flow does not own are left out.
        """
        async with self._writing:
            due = [(p, seq, processed) for p, seq, processed in positions if seq > p._committed]
            fences = self._fences([p.name for p, _, _ in due])
            due = [item for item in due if item[0].name in fences]
            if due:
                refused = await self._commit_cursors({p.name: seq for p, seq, _ in due}, fences)
                for progress, seq, processed in due:
                    if progress.name in refused:
                        self._lost(progress.name, fences)
                    else:
                        self._landed(progress, seq, processed)
                self._changed.unpark_all()

    async def commit_in_transaction(
        self, transaction: StoreTransaction, progress: CursorProgress, seq: int
    ) -> None:
        """Move the cursor to ``seq`` inside ``transaction`` (a transactional
        handler's), fenced; call `landed` once the transaction has committed.

        Raises:
            LeaseLostError: This flow does not own the consumer (any more): the
                transaction must roll back.
        """
        fences = self._fences([progress.name])
        if not fences:
            raise self._lost(progress.name, fences)
        refused = await transaction.commit_cursors({progress.name: seq}, fences=fences)
        if refused:
            raise self._lost(progress.name, fences)

    def landed(self, progress: CursorProgress, seq: int, processed: int) -> None:
        """A cursor committed in a transaction (`commit_in_transaction`) is durable."""
        self._landed(progress, seq, processed)
        self._changed.unpark_all()

    def _fences(self, names: Iterable[str]) -> dict[str, int]:
        """The fencing tokens of the consumers among ``names`` that this flow owns."""
        tokens = {name: self.leases.token(name) for name in names}
        return {name: token for name, token in tokens.items() if token is not None}

    def _lost(self, name: str, fences: dict[str, int]) -> LeaseLostError:
        """Tell the lease keeper a write for ``name`` was refused; the error to raise."""
        if name in fences:
            self.leases.lost(name, fences[name])
        return LeaseLostError(
            f"consumer {name!r} is no longer this flow's: another flow took its lease over, "
            "so this flow's write for it was refused; this flow stands by",
            keys=frozenset([name]),
        )

    async def run(self) -> None:
        """Write requested cursors until cancelled."""
        while True:
            await self._wakeup.wait()
            async with self._writing:
                await self._write()

    async def _write(self) -> None:
        self._wakeup = trio.Event()
        # Requests a write since (the final flush, say) already carried past
        # are dropped: the writer never sends a cursor it knows is behind.
        batch = {
            name: request
            for name, request in self._pending.items()
            if request[1] > request[0]._committed
        }
        self._pending = {}
        owned = self._fences(batch)
        fences = {
            name: token
            for name, (_, _, _, token) in batch.items()
            if token is not None and owned.get(name) == token
        }
        for name in [name for name in batch if name not in fences]:
            # Not this flow's (any more), or reached under an ownership that
            # ended: nothing to write for it.
            self._failed(batch.pop(name)[0], self._lost(name, {}))
        if not batch:
            self._changed.unpark_all()
            return
        try:
            refused = await self._commit_cursors(
                {name: seq for name, (_, seq, _, _) in batch.items()}, fences
            )
        except Exception as exc:
            for progress, _, _, _ in batch.values():
                self._failed(progress, exc)
        else:
            for name, (progress, seq, processed, _) in batch.items():
                if name in refused:
                    self._failed(progress, self._lost(name, fences))
                else:
                    self._landed(progress, seq, processed)
        self._changed.unpark_all()

    async def _commit_cursors(
        self, cursors: Mapping[str, int], fences: Mapping[str, int]
    ) -> frozenset[str]:
        """One store write of ``cursors``, timed."""
        started = trio.current_time()
        refused = await self.store.commit_cursors(cursors, fences=fences)
        self._commit_latency.observe(trio.current_time() - started)
        return refused

    def _failed(self, progress: CursorProgress, error: BaseException) -> None:
        progress._error = error
        if progress.name not in self._pending:
            # Let the next request carry this position again; a request made
            # meanwhile carries a later one already.
            progress._requested = progress._committed
            progress._requested_processed = progress._committed_processed

    @staticmethod
    def _landed(progress: CursorProgress, seq: int, processed: int) -> None:
        progress._error = None
        if seq > progress._committed:
            progress._committed = seq
            progress._committed_processed = processed
        if seq > progress._requested:
            progress._requested = seq
            progress._requested_processed = processed
