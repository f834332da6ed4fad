"""The store itself: `SQLiteStore`, its two connections and their worker threads."""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Literal, TypeVar, TypeVarTuple

import trio

from ..._dead_letters import DeadLetter
from ..._errors import ConfigurationError, StoreError, StoreUnavailableError, UnknownStoreError
from ..._events import Event, NewEvent
from ..._leases import Lease
from .._base import Appended, CursorInfo, LogBounds, SchemaStatus, Store, check_limit
from .._transactions import StoreTransaction
from . import _sql
from ._connections import new_connection, switch_to_wal, translate_errors, write_transaction
from ._files import OpenedFile, check_directory, create_private
from ._schema import SCHEMA_VERSION, ensure_schema, read_version
from ._transaction import SQLiteTransaction
from ._url import parse_url

_T = TypeVar("_T")
_R = TypeVar("_R")
_Ts = TypeVarTuple("_Ts")

_DEFAULT_POLL_INTERVAL = 0.1
#: Seconds before `SQLiteStore.wait_for_append` first polls; it doubles up to `poll_interval`.
_FIRST_POLL = 0.005
_DEFAULT_BUSY_TIMEOUT = 30.0


class SQLiteStore(Store):
    """The event log, cursors, dead letters and leases in one SQLite file (WAL mode).

    Several processes on one machine may open the same file at once: their
    appends queue behind SQLite's write lock and every process reads the same
    log. The file must not live on a network file system (WAL needs shared
    memory between processes). Sequence numbers start at 1 and have no holes;
    they are never given twice, even after the newest events are deleted.

    The file is created readable and writable by its owner only (0600). Each
    write and each poll of `wait_for_append` checks that the path still names
    the file that was opened: if it was deleted or replaced meanwhile, they
    raise `StoreError` rather than write where no one will find it.

    One instance may be open once at a time; open a second instance on the
    same path to get an independent handle.

    Args:
        path: The database file. Its directory must exist; the file is
            created (with the schema) on first open.
        synchronous: ``"full"`` (the default) makes every commit durable when
            it returns, even across a power loss. ``"normal"`` is faster but a
            power loss (not a process crash) may undo the last commits,
            appended events and cursor commits alike.
        poll_interval: The longest wait, in seconds, between polls for events
            appended by other processes (see `wait_for_append`).
        busy_timeout: Seconds to wait for another connection's write lock
            before giving up with `StoreUnavailableError`.

    Raises:
        ConfigurationError: An option is invalid.
    """

    poll_interval: float
    supports_transactions = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Literal["full", "normal"] = "full",
        poll_interval: float = _DEFAULT_POLL_INTERVAL,
        busy_timeout: float = _DEFAULT_BUSY_TIMEOUT,
    ) -> None:
        path = os.fspath(path)
        if not isinstance(path, str) or not path:
            raise ConfigurationError(
                f"SQLite store path must be a non-empty str or os.PathLike[str], got {path!r}"
            )
        if "\x00" in path:
            # sqlite3 would only fail at open, with a bare ValueError.
            raise ConfigurationError(
                f"SQLite store path {path!r} holds a NUL character, which no file name can; "
                "remove it (in a sqlite: URL, %00 stands for NUL)"
            )
        try:
            os.fsencode(path)
        except UnicodeError:
            raise ConfigurationError(
                f"SQLite store path {path!r} cannot be encoded as a file name (it holds a lone "
                "surrogate character); use a path of valid Unicode text"
            ) from None
        if path == ":memory:":
            # Each connection would get its own, separate in-memory database.
            raise ConfigurationError(
                "SQLite store path ':memory:' is not supported; use MemoryStore (memory://) "
                "for a store that lives in this process"
            )
        if synchronous not in ("full", "normal"):
            raise ConfigurationError(
                f"SQLite store synchronous must be 'full' or 'normal', got {synchronous!r}"
            )
        self._path = path
        self._synchronous: Literal["full", "normal"] = synchronous
        self.poll_interval = _seconds("poll_interval", poll_interval, allow_zero=False)
        self._busy_timeout = _seconds("busy_timeout", busy_timeout, allow_zero=True)
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._write_limiter = trio.CapacityLimiter(1)
        self._read_limiter = trio.CapacityLimiter(1)
        self._is_open = False
        self._appended = trio.Event()
        #: The highest sequence number known to be committed: from this
        #: instance's own appends and head reads.
        self._known_head = 0
        #: Whether `_known_head` comes from an append just made: the next
        #: `wait_for_append` needs no head read to start with.
        self._fresh = False
        # The file opened (see _check_file).
        self._opened: OpenedFile | None = None
        # Whether the file gives pages freed by pruning back to the file system.
        self._incremental_vacuum = False

    @classmethod
    def from_url(cls, url: str) -> SQLiteStore:
        """Build (but do not open) the store a ``sqlite:`` URL names.

        ``sqlite:///relative/path.db`` names a path relative to the working
        directory, ``sqlite:////absolute/path.db`` an absolute one. Characters
        that URLs reserve (``%``, ``?``, ``#``) must be percent-encoded in the
        path. The query may set ``synchronous`` (``full`` or ``normal``),
        ``poll_interval`` and ``busy_timeout`` (seconds), for example
        ``sqlite:///app.db?synchronous=normal&poll_interval=0.05``.

        Raises:
            UnknownStoreError: The URL is not a valid SQLite store URL.
        """
        path, options = parse_url(url)
        try:
            return cls(path, **options)
        except ConfigurationError as exc:
            raise UnknownStoreError(f"SQLite store URL {url!r}: {exc}") from None

    @property
    def path(self) -> str:
        """The database file's path, as given."""
        return self._path

    @property
    def synchronous(self) -> Literal["full", "normal"]:
        """The durability setting: ``"full"`` or ``"normal"``."""
        return self._synchronous

    @property
    def busy_timeout(self) -> float:
        """Seconds to wait for another connection's write lock."""
        return self._busy_timeout

    def __repr__(self) -> str:
        return f"SQLiteStore({self._path!r}, synchronous={self._synchronous!r})"

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[None]:
        """Connect, create or migrate the schema, check the cursors; close on exit.

        A file of an older schema version is migrated in place, under the
        write lock.

        Raises:
            ConfigurationError: This instance is already open.
            StoreUnavailableError: The directory does not exist, the file is
                not a SQLite database, or it cannot be opened or locked.
            SchemaVersionError: The file was written by a newer trioflow.
            StoreError: A consumer's cursor is past every sequence number the
                file has given (the file was reset or replaced under it).
        """
        if self._is_open:
            raise ConfigurationError(
                f"{self!r} is already open; open it once, or create a second SQLiteStore on "
                "the same path for an independent handle"
            )
        # Set before the first checkpoint so a concurrent open() sees it.
        self._is_open = True
        # Nothing is known of the file until its head is read again.
        self._known_head, self._fresh = 0, False
        try:
            with self._errors("opening the database"):
                self._writer, self._reader = await trio.to_thread.run_sync(self._connect)
            yield
        finally:
            try:
                # Shielded: the connections must be closed even when the block
                # is cancelled; closing is quick and does not wait on locks.
                with trio.CancelScope(shield=True), self._errors("closing the database"):
                    await self._close()
            finally:
                self._is_open = False

    async def schema_status(self) -> SchemaStatus:
        """Read the file's schema version, changing nothing (a missing file is not created).

        Raises:
            StoreUnavailableError: The file cannot be read.
        """
        with self._errors("reading the schema version"):
            stored = await trio.to_thread.run_sync(read_version, self._path)
        return SchemaStatus(stored=stored, current=SCHEMA_VERSION)

    async def append(self, events: Sequence[NewEvent]) -> Appended:
        """Commit ``events`` atomically; see `Store.append`.

        The commit runs to completion in a worker thread even if the caller is
        cancelled meanwhile, so a cancelled append committed the whole batch
        or (cancelled before it started) nothing.

        Raises:
            StoreUnavailableError: The write lock was not free within
                ``busy_timeout``, or the file cannot be used.
            StoreError: The batch was rolled back for another reason: an event
                id already in the store, say, or the path no longer names the
                file that was opened (it was deleted or replaced).
        """
        batch = list(events)
        if not batch:
            after = await self.head()
            return Appended(
                after=after,
                seqs=range(after + 1, after + 1),
                created_at=datetime.datetime.now(datetime.UTC),
            )
        after, first, created_at = await self._write_in_thread(
            "append", f"appending {len(batch)} events", _sql.append, batch
        )
        self._known_head = max(self._known_head, first + len(batch) - 1)
        self._fresh = True
        self._wake_waiters()
        return Appended(after=after, seqs=range(first, first + len(batch)), created_at=created_at)

    async def read(
        self, after: int, limit: int, *, max_bytes: int | None = None
    ) -> Sequence[Event]:
        """Return up to ``limit`` events with ``seq > after``, in sequence order.

        With ``max_bytes``, the page ends before the event that would take its
        total `Event.size` past ``max_bytes`` (the first event always comes):
        rows are fetched one at a time and the fetching stops there, so a page
        of large events holds only what fits in memory, not ``limit`` of them.

        Raises:
            StoreError: A stored event cannot be decoded (the message names
                its sequence number).
        """
        if limit <= 0:
            # SQLite reads LIMIT -1 as "no limit"; the contract means none.
            await trio.lowlevel.checkpoint()
            return []
        return await self._read_in_thread(
            "reading events",
            _sql.read_events,
            self._path,
            min(max(after, -1), _sql.MAX_INT64),
            min(limit, _sql.MAX_INT64),
            max_bytes,
        )

    async def head(self) -> int:
        """Return the highest committed sequence number (0 if the log is empty).

        Raises:
            StoreError: The path no longer names the file that was opened.
        """
        head = await self._read_in_thread("reading the head", self._head)
        self._known_head = max(self._known_head, head)
        return head

    async def load_cursors(self) -> dict[str, int]:
        """Return every consumer's committed cursor, by consumer name."""
        return await self._read_in_thread("loading cursors", _sql.load_cursors)

    async def commit_cursors(
        self, cursors: Mapping[str, int], *, fences: Mapping[str, int] | None = None
    ) -> frozenset[str]:
        """Set the given consumers' cursors in one transaction (insert or move forward).

        A cursor below the one stored is ignored: a stored cursor never moves
        backwards, whichever process or handle commits. A consumer named in
        ``fences`` is written only if its lease's token is still the one
        given, checked in the same write transaction (one primary-key lookup
        per fenced consumer); see `Store.commit_cursors`.

        Durable when this returns with ``synchronous="full"``; with
        ``"normal"``, a power loss may undo the last commits.

        Returns:
            The consumers whose fence no longer held: nothing was written for them.
        """
        items = list(cursors.items())
        if not items:
            await trio.lowlevel.checkpoint()
            return frozenset()
        return await self._write_in_thread(
            "commit_cursors",
            f"committing {len(items)} cursors",
            _sql.commit_cursors,
            (items, fences),
        )

    async def record_dead_letter(
        self, letter: DeadLetter, *, cursor: int | None, fence: int | None = None
    ) -> None:
        """Keep ``letter`` and move its consumer's cursor forward, in one write transaction.

        See `Store.record_dead_letter`. Like `append`, the transaction runs to
        its end in a worker thread even if the caller is cancelled meanwhile:
        a cancelled call kept the letter and moved the cursor, or did neither.

        Raises:
            LeaseLostError: ``fence`` is given and is no longer the token of
                the consumer's lease; nothing was recorded.
            StoreUnavailableError: The write lock was not free within
                ``busy_timeout``, or the file cannot be used.
            StoreError: The path no longer names the file that was opened, or
                a number does not fit SQLite's 64-bit integers.
        """
        await self._write_in_thread(
            "record_dead_letter",
            f"recording the dead letter of consumer {letter.consumer!r} at seq {letter.seq}",
            _sql.record_dead_letter,
            (letter, cursor, fence),
        )

    async def claim_leases(self, holder: str, keys: Sequence[str], ttl: float) -> list[Lease]:
        """Take or renew ``holder``'s leases on ``keys`` for ``ttl`` seconds, in one write
        transaction; see `Store.claim_leases`.

        The store's clock is this machine's wall clock, read under the write
        lock: every process sharing the file shares it. A clock set forward
        or back moves every lease's end by as much.

        Returns:
            Every key's lease as it stands after the call, by key.

        Raises:
            ValueError: ``ttl`` is not a finite number.
            StoreError: The path no longer names the file that was opened.
        """
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl):
            raise ValueError(f"a lease's ttl must be a finite number of seconds, got {ttl!r}")
        wanted = sorted(set(keys))
        if not wanted:
            await trio.lowlevel.checkpoint()
            return []
        return await self._write_in_thread(
            "claim_leases",
            f"claiming {len(wanted)} leases for {holder!r}",
            _sql.claim_leases,
            (holder, wanted, ttl),
        )

    async def release_leases(self, holder: str, keys: Sequence[str]) -> None:
        """Make ``holder``'s leases on ``keys`` lapse now, in one write transaction.

        Keys held by another holder are left alone; the tokens stay with the keys.
        """
        wanted = sorted(set(keys))
        if not wanted:
            await trio.lowlevel.checkpoint()
            return
        await self._write_in_thread(
            "release_leases",
            f"releasing {len(wanted)} leases of {holder!r}",
            _sql.release_leases,
            (holder, wanted),
        )

    async def leases(self) -> list[Lease]:
        """Every lease that has not lapsed by this machine's clock, by key."""
        return await self._read_in_thread("listing the leases", _sql.live_leases, self._path)

    async def forget_lapsed_leases(self, prefix: str, *, lapsed_for: float) -> int:
        """Delete the leases on keys starting with ``prefix`` that lapsed ``lapsed_for``
        seconds ago or more by this machine's clock, in one write transaction."""
        return await self._write_in_thread(
            "forget_lapsed_leases",
            f"forgetting the lapsed leases of {prefix!r}...",
            _sql.forget_lapsed_leases,
            (prefix, lapsed_for),
        )

    async def dead_letters(self, consumer: str | None = None) -> list[DeadLetter]:
        """Return the dead letters of ``consumer`` (or of all), by consumer then seq."""
        if consumer is None:
            return await self._read_letters("listing the dead letters", _sql.DEAD_LETTERS)
        return await self._read_letters(
            f"listing the dead letters of consumer {consumer!r}", _sql.DEAD_LETTERS_OF, consumer
        )

    async def earliest_due_at(self, consumer: str) -> datetime.datetime | None:
        """The earliest due time of ``consumer``'s requeued letters, asked of SQLite."""
        return await self._read_in_thread(
            f"looking for requeued dead letters of consumer {consumer!r}",
            _sql.earliest_due_at,
            consumer,
        )

    async def dead_letter_counts(self) -> dict[str, int]:
        """How many dead letters each consumer has, counted by SQLite."""
        return await self._read_in_thread("counting the dead letters", _sql.dead_letter_counts)

    async def requeue_dead_letters(
        self, consumer: str, seqs: Sequence[int], *, after: float = 0.0
    ) -> list[int]:
        """Hand these letters back ``after`` seconds from now (this machine's clock).

        See `Store.requeue_dead_letters`; one write transaction.
        """
        return await self._change_letters(
            f"requeueing dead letters of consumer {consumer!r}",
            _sql.requeue_dead_letters,
            consumer,
            seqs,
            after,
        )

    async def due_dead_letters(self, consumer: str) -> list[DeadLetter]:
        """Return ``consumer``'s requeued letters due by this machine's clock, by seq."""
        return await self._read_letters(
            f"looking for due dead letters of consumer {consumer!r}",
            _sql.DUE_DEAD_LETTERS,
            consumer,
            due=True,
        )

    async def discard_dead_letters(self, consumer: str, seqs: Sequence[int]) -> list[int]:
        """Delete these letters of ``consumer``; return the seqs that existed, ascending."""
        return await self._change_letters(
            f"discarding dead letters of consumer {consumer!r}",
            _sql.discard_dead_letters,
            consumer,
            seqs,
            0.0,
        )

    async def forget_consumer(self, consumer: str) -> None:
        """Delete ``consumer``'s cursor and dead letters, in one write transaction."""
        await self._write_in_thread(
            "forget_consumer", f"forgetting consumer {consumer!r}", _sql.forget_consumer, consumer
        )

    async def cursors(self) -> list[CursorInfo]:
        """Every stored cursor, by consumer name (in code-point order)."""
        return await self._read_in_thread("listing the cursors", _sql.cursors)

    async def set_cursor(self, consumer: str, seq: int) -> int | None:
        """Set ``consumer``'s cursor to ``seq``, backwards too; see `Store.set_cursor`.

        The bounds are checked in the write transaction that sets it: no prune
        slips between.
        """
        return await self._write_in_thread(
            "set_cursor",
            f"setting the cursor of consumer {consumer!r}",
            _sql.set_cursor,
            (consumer, seq),
        )

    async def log_bounds(self) -> LogBounds:
        """The first stored sequence number, the head and ``pruned_through``."""
        return await self._read_in_thread("reading the bounds of the log", _sql.log_bounds)

    async def seq_before(self, time: datetime.datetime) -> int:
        """The highest seq of a stored event committed before ``time``: a binary search on
        seq (the rowid), about log2(head) lookups; publishing pays nothing for it."""
        return await self._read_in_thread(
            "looking for the last event before a time", _sql.seq_before, time
        )

    async def prune(self, through: int, *, limit: int) -> int:
        """Delete up to ``limit`` of the oldest events no cursor or letter needs; see
        `Store.prune`.

        One write transaction (publishers wait for it: keep ``limit`` to a
        few thousand). On a file with ``auto_vacuum=INCREMENTAL`` (every file
        this trioflow creates), the pages freed go back to the file system
        right after, in a second short transaction; see docs/sqlite.md.
        """
        check_limit(limit)
        writer = self._writable("prune")
        bound = min(max(through, 0), _sql.MAX_INT64)
        with self._errors(f"pruning events up to {through}"):
            return await trio.to_thread.run_sync(
                self._prune,
                writer,
                (bound, min(limit, _sql.MAX_INT64)),
                limiter=self._write_limiter,
            )

    def _prune(self, writer: sqlite3.Connection, argument: tuple[int, int]) -> int:
        deleted = self._write(_sql.prune, writer, argument)
        if deleted and self._incremental_vacuum:
            # executescript steps the pragma to its end (execute frees one
            # page only), in a transaction of its own.
            writer.executescript("PRAGMA incremental_vacuum")
        return deleted

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[StoreTransaction]:
        """Open a write transaction on the file: ``async with store.transaction() as tx``.

        See `trioflow.stores.StoreTransaction`. Statements take ``?``
        parameters. The transaction holds SQLite's write lock from its start
        (``BEGIN IMMEDIATE``) to its end, and this store's other writes wait
        for it: keep the block short. Its events are visible, and wake this
        store's `wait_for_append`, once it commits. Statements that would end
        the transaction (``COMMIT``, ``SAVEPOINT``...) or change the
        connection (``ATTACH``, most ``PRAGMA``) raise `trioflow.QueryError`.

        Raises:
            ConfigurationError: This task already has a transaction of this
                store open (transactions do not nest).
            StoreUnavailableError: Another connection held the write lock
                for longer than ``busy_timeout``, or the file cannot be used.
            StoreError: The path no longer names the file that was opened,
                or the commit failed (then nothing was committed).
        """
        self._writable("a transaction")
        async with self._write_limiter:
            transaction = SQLiteTransaction(
                # Again: the store may have been closed while this waited.
                self._connection(self._writer),
                shown=self._path,
                busy_timeout=self._busy_timeout,
                check_file=self._check_file,
            )
            try:
                await transaction.begin()
                yield transaction
            except BaseException:
                with trio.CancelScope(shield=True):
                    await transaction.roll_back()
                raise
            # Once the block has ended, the commit runs to its end, as an append does.
            with trio.CancelScope(shield=True):
                await transaction.commit()
        if transaction.appended:
            self._wake_waiters()

    async def wait_for_append(self, after: int) -> int:
        """Return once the head is past ``after``.

        Polls the head, because other processes' commits cannot be signalled:
        5 ms after the call, then after twice as long each time, up to
        `poll_interval` seconds. A caller that keeps finding events (another
        process publishing) thus keeps polling every few milliseconds. An
        append through this instance ends the wait at once, with the head it
        made and no read; a wait that starts level with that head does not
        read it again either: other processes' events are looked for at its
        first poll.

        Raises:
            StoreError: The path no longer names the file that was opened:
                no other process's events will come.
        """
        delay = min(_FIRST_POLL, self.poll_interval)
        # A caller level with the head this instance's own append just made
        # (the flow's watcher, once the dispatcher fanned that batch out)
        # learns nothing from a read now: it polls after the first delay.
        fresh, self._fresh = self._fresh, False
        read_now = not (fresh and self._known_head == after)
        while True:
            # Taken before reading the head, so an append that commits while
            # the head is read still wakes this wait: no lost wake-up.
            appended = self._appended
            if read_now:
                head = await self.head()
                if head > after:
                    return head
            with trio.move_on_after(delay):
                await appended.wait()
            if self._fresh and self._known_head > after:
                # Woken by this instance's own append: its head is known.
                return self._known_head
            read_now = True
            delay = min(2 * delay, self.poll_interval)

    # -- internals ---------------------------------------------------------

    async def _read_letters(
        self, action: str, query: str, *parameters: object, due: bool = False
    ) -> list[DeadLetter]:
        return await self._read_in_thread(
            action, _sql.fetch_letters, self._path, query, parameters, due
        )

    async def _change_letters(
        self,
        action: str,
        work: Callable[[sqlite3.Connection, tuple[str, list[int], float]], list[int]],
        consumer: str,
        seqs: Sequence[int],
        after: float,
    ) -> list[int]:
        """Run ``work`` on the letters of ``consumer`` at ``seqs`` in a write transaction."""
        # A seq SQLite cannot hold is no letter's: left out rather than failing the call.
        wanted = sorted({seq for seq in seqs if _sql.MIN_INT64 <= seq <= _sql.MAX_INT64})
        if not wanted:
            await trio.lowlevel.checkpoint()
            return []
        return await self._write_in_thread(action, action, work, (consumer, wanted, after))

    def _wake_waiters(self) -> None:
        """End every `wait_for_append` of this instance: events were committed."""
        self._appended.set()
        self._appended = trio.Event()

    def _writable(self, action: str) -> sqlite3.Connection:
        """The writer, unless the calling task holds a transaction (it would wait forever)."""
        # Only a transaction's task borrows the limiter itself; threads borrow
        # it through placeholders of their own.
        if trio.lowlevel.current_task() in self._write_limiter.statistics().borrowers:
            raise ConfigurationError(
                f"SQLite store {self._path!r}: {action} inside a transaction of the "
                "same store would wait for that transaction to end; write through the "
                "transaction (tx.append, tx.commit_cursors), or after its block"
            )
        return self._connection(self._writer)

    def _connection(self, connection: sqlite3.Connection | None) -> sqlite3.Connection:
        if connection is None:
            raise StoreError(
                f"SQLite store {self._path!r} is not open; use it inside `async with store.open():`"
            )
        return connection

    def _errors(self, action: str) -> contextlib.AbstractContextManager[None]:
        return translate_errors(self._path, self._busy_timeout, action)

    async def _close(self) -> None:
        writer, reader = self._writer, self._reader
        self._writer = self._reader = None
        self._opened = None
        # Through the limiters, so a call still running in a worker thread
        # finishes before its connection is closed under it.
        if reader is not None:
            await trio.to_thread.run_sync(reader.close, limiter=self._read_limiter)
        if writer is not None:
            # Last, because the last connection to close checkpoints the WAL.
            await trio.to_thread.run_sync(writer.close, limiter=self._write_limiter)

    def _new_connection(self, path: str) -> sqlite3.Connection:
        return new_connection(path, busy_timeout=self._busy_timeout, synchronous=self._synchronous)

    def _connect(self) -> tuple[sqlite3.Connection, sqlite3.Connection]:
        """Open both connections and make the schema ready (in a worker thread)."""
        # Resolved once, so both connections name the same file even if the
        # working directory changes in between.
        path = os.path.abspath(self._path)
        check_directory(path, self._path)
        create_private(path, self._path)
        writer = self._new_connection(path)
        try:
            if not writer.execute("PRAGMA page_count").fetchall()[0][0]:
                # A new file: it can still take incremental vacuum, which only
                # applies before the first table (or after a VACUUM).
                writer.execute("PRAGMA auto_vacuum = INCREMENTAL")
            mode = switch_to_wal(writer, busy_timeout=self._busy_timeout)
            if str(mode).lower() != "wal":
                raise StoreUnavailableError(
                    f"SQLite store {self._path!r}: cannot switch the database to WAL mode "
                    f"(it stays in {mode!r} mode); use a file on a local file system"
                )
            ensure_schema(writer, self._path)
            self._incremental_vacuum = writer.execute("PRAGMA auto_vacuum").fetchall()[0][0] == 2
            # Once the writer has the file open: from now on each write and
            # each poll checks that the path still names this file.
            self._opened = OpenedFile.at(path)
            reader = self._new_connection(path)
            try:
                # A guard: the reader must never write, writes go through the
                # writer's limiter and transaction discipline.
                reader.execute("PRAGMA query_only = ON")
            except BaseException:
                reader.close()
                raise
        except BaseException:
            writer.close()
            raise
        return writer, reader

    async def _write_in_thread(
        self,
        method: str,
        action: str,
        work: Callable[[sqlite3.Connection, _T], _R],
        argument: _T,
    ) -> _R:
        """``work(writer, argument)`` in a write transaction, in a worker thread: the
        way of every write. ``method`` names the call should the calling task
        hold a transaction of this store (`_writable` refuses it), ``action``
        says what it does, for errors."""
        writer = self._writable(method)
        with self._errors(action):
            return await trio.to_thread.run_sync(
                self._write, work, writer, argument, limiter=self._write_limiter
            )

    async def _read_in_thread(
        self, action: str, work: Callable[[sqlite3.Connection, *_Ts], _R], *args: *_Ts
    ) -> _R:
        """``work(reader, *args)`` on the reading connection, in a worker thread: the
        way of every read. ``action`` is what it does, for errors."""
        reader = self._connection(self._reader)
        with self._errors(action):
            return await trio.to_thread.run_sync(work, reader, *args, limiter=self._read_limiter)

    def _write(
        self,
        work: Callable[[sqlite3.Connection, _T], _R],
        writer: sqlite3.Connection,
        argument: _T,
    ) -> _R:
        """Run ``work`` in a write transaction on the file opened (in a worker thread)."""
        with write_transaction(writer):
            # Under the write lock, just before the writes it guards.
            self._check_file()
            return work(writer, argument)

    def _head(self, reader: sqlite3.Connection) -> int:
        self._check_file()
        return _sql.head(reader)

    def _check_file(self) -> None:
        """Raise StoreError unless the path still names the file that was opened."""
        if self._opened is not None:
            self._opened.check(self._path)


def _seconds(name: str, value: float, *, allow_zero: bool) -> float:
    """Return ``value`` as a float if it is a valid number of seconds."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(
            f"SQLite store {name} must be a finite number of seconds {bound}, got {value!r}"
        )
    return float(value)
