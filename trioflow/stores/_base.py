"""The store contract: the narrow interface every storage backend meets.

A store keeps four things: the event log (events with strictly increasing
sequence numbers), the consumers' cursors (the last sequence number each
durable consumer has processed), their dead letters (events a consumer
gave up on, `trioflow.DeadLetter`) and their leases (which flow owns each
consumer for now, `trioflow.Lease`). The runtime never talks to a database in any
other way, so a new backend is one class that passes
`trioflow.testing.StoreContract`.

Contract, for every implementation:

* ``append`` commits a batch atomically (all of it or none of it) and gives its
  events sequence numbers greater than every event already committed, in the
  order given. Sequence numbers may have holes but never repeat.
* Gap-free reads: once ``read(after, ...)`` has returned an event with sequence
  number ``s``, no event with a sequence number below ``s`` may appear later.
  A store shared by several writers (processes, machines) must hold back events
  until every lower sequence number is committed or abandoned.
* ``head`` is the highest sequence number that ``read`` can return now (0 when
  the log is empty).
* Cursor commits are durable when ``commit_cursors`` returns, unless the store
  documents a weaker setting the user chose.
* A stored cursor never moves backwards: a commit below the stored value is
  ignored (a late write of an older position can never undo a newer one).
* Whatever ``append`` accepted, ``read`` returns exactly: the same ``data``
  (numbers and key order included, nesting up to `trioflow.MAX_DEPTH`, sizes up
  to `trioflow.MAX_DATA_BYTES`) and the same ``size``. An event the store
  cannot decode is a `trioflow.StoreError` naming its sequence number.
* Every method is a trio checkpoint and may be cancelled; a cancelled ``append``
  either committed the whole batch or nothing.
* Event ids are unique; a store may refuse a batch that repeats one (the
  runtime generates random UUIDs, so it never does).
* Dead letters are kept per consumer and sequence number (recording one
  again replaces it). Recording one and moving its consumer's cursor past it
  happen in one transaction: after a crash the event is either still to be
  delivered or its dead letter is recorded, never neither.
  ``dead_letter_counts`` and ``earliest_due_at`` answer from the letters
  without listing them (the base class's defaults list them; a store on a
  database asks it instead).
* Leases (`trioflow.Lease`): ``claim_leases`` takes a key that is free, lapsed
  or already the claimant's, and renews the claimant's own, in one
  transaction, with the expiry by the store's clock. A key's fencing token
  grows every time its lease passes to another holder or is taken again after
  it lapsed, and never repeats: lease rows are never deleted, but by
  ``forget_lapsed_leases``, which the runtime calls only for keys whose
  tokens fence nothing (a group's memberships, one per flow that joined).
* Fenced writes: a cursor commit or dead letter carrying a fence (a token) for
  its consumer lands only while that token is still the key's, and atomically
  with that check: once a claim has given the key a new token, no write with
  the old one lands, and a claim never slips between a fenced write's check
  and its effect.
* Failures surface as `trioflow.StoreError` (or a subclass), never as a
  driver's own exception type.

Retention (what ``trioflow prune`` and ``App(retention=...)`` build on):

* ``prune(through, limit=n)`` deletes, in one transaction, at most ``n`` of
  the oldest events with ``seq <= through``, but never one a stored cursor
  still needs (``seq`` above that cursor) and never one a dead letter refers
  to (requeueing reads the event from the log). The cursors and letters are
  checked in the transaction that deletes, so a concurrent `set_cursor`
  cannot slip between. It advances the log's ``pruned_through`` to the
  highest sequence number deleted and returns how many it deleted (0: nothing
  is left to do for that bound).
* The head never goes back, not even when every event has been pruned:
  ``head`` is at least ``pruned_through``, an append's ``after`` too, and
  appends go on numbering above every number ever given.
* ``log_bounds`` tells the lowest sequence number still stored (``first``;
  ``head + 1`` when none is), the ``head`` and ``pruned_through`` (0 if never
  pruned), counting every prune that started before the call (one under way
  is waited for). A consumer whose cursor is below ``pruned_through`` may
  have lost events: `set_cursor` refuses to put one there, and the runtime
  refuses to start one from there.
* ``cursors`` lists every stored cursor with when it last changed, by
  consumer name in code-point order; ``set_cursor`` sets one to any position
  from ``pruned_through`` to the head, backwards too (an operator's reset),
  and returns the previous one. It is the one way, besides
  ``forget_consumer``, that a stored cursor moves back.
* ``seq_before(time)`` is the highest sequence number of a stored event
  committed before ``time`` (0 if none), found without scanning the log:
  sequence numbers and commit times grow together (they are taken under the
  append lock), so stores search by sequence number.
"""

from __future__ import annotations

import abc
import contextlib
import datetime
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import TYPE_CHECKING

import attrs
import trio

from .._dead_letters import DeadLetter
from .._errors import ConfigurationError, ConsumerStateError, PrunedLogError
from .._events import Event, NewEvent
from .._leases import Lease

if TYPE_CHECKING:
    from ._transactions import StoreTransaction


@attrs.frozen(kw_only=True, slots=True)
class Appended:
    """What a store reports after committing a batch.

    Attributes:
        after: The store's head just before this batch: every event with a
            sequence number up to ``after`` was committed before the batch.
        seqs: The sequence numbers given to the batch's events, in order.
        created_at: The commit time recorded for every event of the batch.
        events: The batch as `Event`s, if the store built them (optional).
    """

    after: int
    seqs: Sequence[int]
    created_at: datetime.datetime
    #: The batch as `Event`s, when the store built them anyway (else None:
    #: the runtime builds them from the `NewEvent`s and ``seqs``).
    events: Sequence[Event] | None = None


@attrs.frozen(kw_only=True, slots=True)
class SchemaStatus:
    """A store's schema version: the one it holds, and the one this trioflow writes.

    Attributes:
        stored: The version the store holds now; None when it holds no
            trioflow schema yet (opening the store creates it).
        current: The version this trioflow creates, and migrates older ones to,
            when it opens the store.
    """

    stored: int | None
    current: int

    @property
    def pending(self) -> bool:
        """Whether opening the store would create or migrate its schema."""
        return self.stored is None or self.stored < self.current


@attrs.frozen(kw_only=True, slots=True)
class CursorInfo:
    """One stored cursor, as `Store.cursors` lists them.

    Attributes:
        consumer: The consumer's name.
        seq: The last sequence number it processed (0: none yet).
        updated_at: When the cursor last changed (aware, UTC), or None if
            the store cannot say.
    """

    consumer: str
    seq: int
    updated_at: datetime.datetime | None


@attrs.frozen(kw_only=True, slots=True)
class LogBounds:
    """Where the stored log begins and ends, as `Store.log_bounds` tells.

    Attributes:
        first: The lowest sequence number still stored (``head + 1`` when no
            event is stored).
        head: The highest sequence number ``read`` can return now.
        pruned_through: Every event up to this sequence number may have been
            deleted by pruning (0 if the log was never pruned). Events a dead
            letter refers to are kept below it.
    """

    first: int
    head: int
    pruned_through: int


class Store(abc.ABC):
    """An event log with durable consumer cursors. See the module docstring."""

    #: Seconds between polls for events appended by other processes, for
    #: stores that cannot be told (None: the store wakes waiters itself).
    poll_interval: float | None = None

    #: Whether `transaction` works (a store on a SQL database).
    supports_transactions: bool = False

    @abc.abstractmethod
    def open(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Connect, create the schema if missing, check its version; close on exit.

        Used as ``async with store.open(): ...``; the store's other methods
        may only be called inside that block. A store that needs background
        tasks (a notification listener, say) runs them in a nursery of its own
        inside this context manager. Opening a store that is already open
        raises ConfigurationError, except for stores documented as shareable.

        Raises:
            StoreUnavailableError: The store cannot be reached or opened.
            SchemaVersionError: The schema was written by a newer trioflow.
        """

    async def schema_status(self) -> SchemaStatus | None:
        """Read the store's schema version, changing nothing; the store need not be open.

        `open` creates or migrates the schema; this only says whether it
        would (``trioflow migrate --check``). A schema newer than this
        trioflow's is reported, not refused.

        Returns:
            The versions, or None for a store that keeps no schema (memory).

        Raises:
            StoreUnavailableError: The store cannot be reached.
        """
        await trio.lowlevel.checkpoint()
        return None

    @abc.abstractmethod
    async def append(self, events: Sequence[NewEvent]) -> Appended:
        """Commit ``events`` atomically and return the sequence numbers they got."""

    @abc.abstractmethod
    async def read(
        self, after: int, limit: int, *, max_bytes: int | None = None
    ) -> Sequence[Event]:
        """Return up to ``limit`` (>= 1) events with ``seq > after``, in sequence order.

        With ``max_bytes``, stop before the event that would take the total
        `Event.size` of the page past it; the first event is returned whatever
        its size, so a reader always makes progress.
        """

    @abc.abstractmethod
    async def head(self) -> int:
        """Return the highest sequence number ``read`` can return now (0 if none)."""

    @abc.abstractmethod
    async def load_cursors(self) -> dict[str, int]:
        """Return every consumer's committed cursor, by consumer name."""

    @abc.abstractmethod
    async def commit_cursors(
        self, cursors: Mapping[str, int], *, fences: Mapping[str, int] | None = None
    ) -> frozenset[str]:
        """Durably set the given consumers' cursors (insert, or move forward).

        A cursor below the one stored is ignored: a stored cursor never moves
        backwards. A consumer named in ``fences`` is written only if its
        lease's token is still the one given (whether or not the lease has
        lapsed meanwhile); the others of the call are written regardless.

        Returns:
            The consumers whose fence no longer held: nothing was written for them.
        """

    @abc.abstractmethod
    async def record_dead_letter(
        self, letter: DeadLetter, *, cursor: int | None, fence: int | None = None
    ) -> None:
        """Keep ``letter`` (replacing one for the same consumer and seq) and, in the same
        transaction, move its consumer's cursor forward to ``cursor`` (never back;
        None: leave the cursor alone, for a requeued letter that failed again).

        The letter is kept as given, its ``due_at`` too: pass ``due_at=None`` to park
        it. Recording the same letter and cursor again changes nothing, so a call
        whose answer was lost may be retried.

        Raises:
            LeaseLostError: ``fence`` is given and is no longer the token of the
                consumer's lease; nothing was recorded.
        """

    @abc.abstractmethod
    async def claim_leases(self, holder: str, keys: Sequence[str], ttl: float) -> list[Lease]:
        """Take or renew ``holder``'s leases on ``keys`` for ``ttl`` seconds, in one transaction.

        For each key: a key nobody holds, whose lease has lapsed, or that
        ``holder`` holds already becomes ``holder``'s until the store's clock
        plus ``ttl``. Its token stays the same when ``holder`` renews a lease
        that has not lapsed, and otherwise becomes one more than the key's
        last (1 for a new key). A key another holder holds is left alone.

        Returns:
            Every key's lease as it stands after the call (``holder``'s or
            another's), by key.
        """

    @abc.abstractmethod
    async def release_leases(self, holder: str, keys: Sequence[str]) -> None:
        """Let go of ``holder``'s leases on ``keys`` now: they lapse at once.

        Keys held by another holder are left alone. The token stays with the
        key, so the next claimant's token is still a new one.
        """

    @abc.abstractmethod
    async def leases(self) -> list[Lease]:
        """Every lease that has not lapsed, by key."""

    async def forget_lapsed_leases(self, prefix: str, *, lapsed_for: float) -> int:
        """Delete the leases on keys starting with ``prefix`` that lapsed at least
        ``lapsed_for`` seconds ago (by the store's clock); return how many.

        Only for keys whose tokens fence nothing: a group's memberships, one
        key per flow that ever joined, which would otherwise pile up. A key
        forgotten and claimed again starts over at token 1. A lease claimed
        or renewed meanwhile is kept.

        This default forgets nothing (the rows stay, as they did); the stores
        that come with trioflow delete them.
        """
        await trio.lowlevel.checkpoint()
        return 0

    @abc.abstractmethod
    async def dead_letters(self, consumer: str | None = None) -> list[DeadLetter]:
        """Return the dead letters of ``consumer`` (or of all), by consumer then seq.

        Consumers come in the order of their names' code points (as Python sorts
        `str`), whatever the database's collation.
        """

    async def earliest_due_at(self, consumer: str) -> datetime.datetime | None:
        """The earliest ``due_at`` of ``consumer``'s requeued letters (come due or
        not), or None when none is requeued: when to look for due ones next.

        Reads no letter: a consumer with many parked letters and one requeued
        asks this after each look. This default reads `dead_letters`; the
        stores that come with trioflow ask their database.
        """
        times = [letter.due_at for letter in await self.dead_letters(consumer)]
        return min((time for time in times if time is not None), default=None)

    async def dead_letter_counts(self) -> dict[str, int]:
        """How many dead letters each consumer has; consumers with none are left out.

        What `trioflow status` shows on every refresh: no letter is read. This
        default counts `dead_letters`; the stores that come with trioflow
        count in the database instead.
        """
        counts: dict[str, int] = {}
        for letter in await self.dead_letters():
            counts[letter.consumer] = counts.get(letter.consumer, 0) + 1
        return counts

    @abc.abstractmethod
    async def requeue_dead_letters(
        self, consumer: str, seqs: Sequence[int], *, after: float = 0.0
    ) -> list[int]:
        """Hand these letters back to ``consumer`` once ``after`` seconds have passed.

        Sets each one's ``due_at`` to the store's clock plus ``after`` (a
        letter already requeued gets the new time). Returns the seqs that were
        dead letters of ``consumer``, in ascending order; the others are
        ignored.
        """

    @abc.abstractmethod
    async def due_dead_letters(self, consumer: str) -> list[DeadLetter]:
        """Return ``consumer``'s requeued letters whose ``due_at`` has come, by seq."""

    @abc.abstractmethod
    async def discard_dead_letters(self, consumer: str, seqs: Sequence[int]) -> list[int]:
        """Delete these letters of ``consumer``; return the seqs that existed, ascending."""

    @abc.abstractmethod
    async def forget_consumer(self, consumer: str) -> None:
        """Delete ``consumer``'s cursor and dead letters: it starts afresh if it comes back.

        With `set_cursor`, the one way a stored cursor moves back (to none). A
        removed consumer no longer holds pruning back.
        """

    @abc.abstractmethod
    async def cursors(self) -> list[CursorInfo]:
        """Every stored cursor, by consumer name (in code-point order)."""

    @abc.abstractmethod
    async def set_cursor(self, consumer: str, seq: int) -> int | None:
        """Set ``consumer``'s cursor to ``seq``, backwards too: an operator's reset.

        Leases are the caller's business: claim the consumer's lease around
        the call, or stop the flows that run it, or a running flow may move
        the cursor forward again.

        Returns:
            The cursor before the call (None if there was none).

        Raises:
            ConsumerStateError: ``seq`` is below 0 or past the head.
            PrunedLogError: ``seq`` is below ``pruned_through``: the events
                after it were pruned (checked in the transaction that writes).
        """

    @abc.abstractmethod
    async def log_bounds(self) -> LogBounds:
        """Return the first stored sequence number, the head and ``pruned_through``."""

    @abc.abstractmethod
    async def seq_before(self, time: datetime.datetime) -> int:
        """The highest sequence number of a stored event committed before ``time`` (0 if none).

        A search by sequence number, not a scan: cheap however long the log.
        """

    @abc.abstractmethod
    async def prune(self, through: int, *, limit: int) -> int:
        """Delete at most ``limit`` of the oldest events with ``seq <= through``, in one
        transaction, keeping every event a stored cursor or a dead letter still needs.

        Returns:
            How many events were deleted (0: nothing is left to prune up to
            ``through``, or cursors and letters hold the rest).

        Raises:
            ValueError: ``limit`` is below 1.
        """

    def transaction(self) -> contextlib.AbstractAsyncContextManager[StoreTransaction]:
        """Open a transaction on the store's database: ``async with store.transaction() as tx``.

        See `trioflow.stores.StoreTransaction` for what it promises. Stores
        that keep their data in a SQL database (SQLite, PostgreSQL) offer it;
        the default refuses.

        Raises:
            ConfigurationError: This store cannot run transactions.
        """
        raise ConfigurationError(
            f"the {type(self).__name__} cannot run transactions (transactional consumers, "
            "flow.transaction()): use the SQLite or PostgreSQL store"
        )

    @abc.abstractmethod
    async def wait_for_append(self, after: int) -> int:
        """Wait until the head may have moved past ``after``; return the head as last read.

        Used to learn of events appended by other processes or other flows on
        the same store. May return early, with a head not past ``after``
        (callers loop); stores that cannot be notified poll every
        `poll_interval` seconds.
        """


class StoreWrapper(Store):
    """A store that passes everything on to ``inner``; subclasses wrap some calls.

    The flow's own view of its store, and `trioflow.testing.FaultyStore`, are
    such wrappers.
    """

    def __init__(self, inner: Store) -> None:
        self.inner = inner

    @property
    def poll_interval(self) -> float | None:
        return self.inner.poll_interval

    @poll_interval.setter
    def poll_interval(self, value: float | None) -> None:
        self.inner.poll_interval = value

    @property
    def supports_transactions(self) -> bool:
        return self.inner.supports_transactions

    @supports_transactions.setter
    def supports_transactions(self, value: bool) -> None:
        self.inner.supports_transactions = value

    def open(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self.inner.open()

    async def schema_status(self) -> SchemaStatus | None:
        return await self.inner.schema_status()

    async def record_dead_letter(
        self, letter: DeadLetter, *, cursor: int | None, fence: int | None = None
    ) -> None:
        await self.inner.record_dead_letter(letter, cursor=cursor, fence=fence)

    async def claim_leases(self, holder: str, keys: Sequence[str], ttl: float) -> list[Lease]:
        return await self.inner.claim_leases(holder, keys, ttl)

    async def release_leases(self, holder: str, keys: Sequence[str]) -> None:
        await self.inner.release_leases(holder, keys)

    async def leases(self) -> list[Lease]:
        return await self.inner.leases()

    def transaction(self) -> contextlib.AbstractAsyncContextManager[StoreTransaction]:
        return self.inner.transaction()

    async def dead_letters(self, consumer: str | None = None) -> list[DeadLetter]:
        return await self.inner.dead_letters(consumer)

    async def dead_letter_counts(self) -> dict[str, int]:
        return await self.inner.dead_letter_counts()

    async def earliest_due_at(self, consumer: str) -> datetime.datetime | None:
        return await self.inner.earliest_due_at(consumer)

    async def forget_lapsed_leases(self, prefix: str, *, lapsed_for: float) -> int:
        return await self.inner.forget_lapsed_leases(prefix, lapsed_for=lapsed_for)

    async def requeue_dead_letters(
        self, consumer: str, seqs: Sequence[int], *, after: float = 0.0
    ) -> list[int]:
        return await self.inner.requeue_dead_letters(consumer, seqs, after=after)

    async def due_dead_letters(self, consumer: str) -> list[DeadLetter]:
        return await self.inner.due_dead_letters(consumer)

    async def discard_dead_letters(self, consumer: str, seqs: Sequence[int]) -> list[int]:
        return await self.inner.discard_dead_letters(consumer, seqs)

    async def forget_consumer(self, consumer: str) -> None:
        await self.inner.forget_consumer(consumer)

    async def cursors(self) -> list[CursorInfo]:
        return await self.inner.cursors()

    async def set_cursor(self, consumer: str, seq: int) -> int | None:
        return await self.inner.set_cursor(consumer, seq)

    async def log_bounds(self) -> LogBounds:
        return await self.inner.log_bounds()

    async def seq_before(self, time: datetime.datetime) -> int:
        return await self.inner.seq_before(time)

    async def prune(self, through: int, *, limit: int) -> int:
        return await self.inner.prune(through, limit=limit)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self.inner!r}>"


def within_bytes(page: Sequence[Event], max_bytes: int) -> Sequence[Event]:
    """The longest prefix of ``page`` whose total `Event.size` is within ``max_bytes``.

    Never empty when ``page`` is not: the first event is kept whatever its size.
    """
    total = 0
    for index, event in enumerate(page):
        total += event.size
        if total > max_bytes and index:
            return page[:index]
    return page


def check_reset(consumer: str, seq: int, *, head: int, pruned_through: int) -> None:
    """Refuse a `Store.set_cursor` to ``seq`` unless ``pruned_through <= seq <= head``.

    Raises:
        ConsumerStateError: ``seq`` is below 0 or past the head.
        PrunedLogError: ``seq`` is below ``pruned_through``.
    """
    if seq < 0 or seq > head:
        raise ConsumerStateError(
            f"cannot set the cursor of consumer {consumer!r} to {seq}: a cursor is a "
            f"sequence number from 0 to the head of the log ({head}); choose one in that range"
        )
    if seq < pruned_through:
        raise PrunedLogError(
            f"cannot set the cursor of consumer {consumer!r} to {seq}: the events up to "
            f"{pruned_through} were pruned, so the consumer would skip them; set it to "
            f"{pruned_through} or later (it then goes on with the oldest event kept)",
            consumers={consumer: seq},
        )


def check_limit(limit: int) -> None:
    """Refuse a `Store.prune` batch size below 1."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"prune's limit must be an int >= 1, got {limit!r}")


def search_seq_before(head: int) -> Generator[int, tuple[int, bool] | None, int]:
    """The binary search behind `Store.seq_before`, apart from how a store looks events up.

    Yields sequence numbers ``s`` to look up: send back the first stored event
    at or after ``s`` as ``(seq, committed_before)``, or None if there is
    none. Returns the answer (as `StopIteration.value`) after about log2(head)
    lookups. Relies on commit times growing with sequence numbers.
    """
    low, high = 0, head
    # The answer lies in [low, high]; low is 0 or a seq committed before.
    while low < high:
        middle = (low + high + 1) // 2
        found = yield middle
        if found is not None and found[0] <= high and found[1]:
            low = found[0]
        else:
            # No stored event in [middle, high] was committed before.
            high = middle - 1
    return low


def run_search(head: int, look_up: Callable[[int], tuple[int, bool] | None]) -> int:
    """Run `search_seq_before` with a blocking ``look_up`` (in a worker thread, say)."""
    search = search_seq_before(head)
    try:
        seq = next(search)
        while True:
            seq = search.send(look_up(seq))
    except StopIteration as done:
        answer: int = done.value
        return answer
