"""The SQLite store: the embedded default, one file shared by the processes of one machine.

Model: one writer connection and one reader connection on the same file, each
used by at most one worker thread at a time (a `trio.CapacityLimiter` of 1
guards each). The database runs in WAL mode, so reads proceed from a committed
snapshot while a write commits; only writers queue behind each other, within
this process through the limiter and across processes through SQLite's file
lock (``busy_timeout`` bounds that wait).

Why reads are gap-free even with several writing processes: ``append`` first
takes SQLite's write lock (``BEGIN IMMEDIATE``), then numbers its batch from
one above the highest number given so far and commits. The lock serialises
writers, so batches commit in sequence-number order and every snapshot a
reader sees holds a prefix of the log. For the same reason sequence numbers
have no holes. The highest number given is the highest event present or, if
the newest events were deleted, the high-water mark a trigger keeps above
every deleted event: a number is never given twice.

SQLite cannot tell one process about another's commits, so `wait_for_append`
polls: every 5 ms at first, then twice as long after each empty poll, up to
`poll_interval` seconds. Events streaming in from another process are seen
within milliseconds, and an idle process polls a few times a second. Appends
made through this instance wake its waiters at once.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import sqlite3
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypeVar

import trio

from .._dead_letters import DeadLetter
from .._errors import (
    ConfigurationError,
    SchemaVersionError,
    StoreError,
    StoreUnavailableError,
    UnknownStoreError,
)
from .._events import Event, NewEvent, utf8_size
from ._base import Appended, Store

_T = TypeVar("_T")
_R = TypeVar("_R")

#: The schema version this module creates and understands.
SCHEMA_VERSION = 3

_DEFAULT_POLL_INTERVAL = 0.1
#: Seconds before `SQLiteStore.wait_for_append` first polls; it doubles up to `poll_interval`.
_FIRST_POLL = 0.005
_DEFAULT_BUSY_TIMEOUT = 30.0

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_MICROSECOND = datetime.timedelta(microseconds=1)
# SQLite integers are signed 64-bit; larger Python ints cannot be bound.
_MIN_INT64 = -(2**63)
_MAX_INT64 = 2**63 - 1
# The same decoder the publishing side uses, so replayed data equals live data.
_decode = json.JSONDecoder().decode

_URL_OPTIONS = "synchronous=full|normal, poll_interval=<seconds > 0>, busy_timeout=<seconds >= 0>"
_URL_FORMS = "sqlite:///relative/path.db or sqlite:////absolute/path.db"

#: What brings a file from the version before to each version. A file's
#: migrations run in one transaction under the write lock, so processes that
#: open an old file at once migrate it once, and a failed or interrupted one
#: leaves the file at its old version. Version 1 creates the tables. Steps are
#: never changed once released: files of every older version must migrate.
_MIGRATIONS: Mapping[int, Sequence[str]] = {
    1: (
        # One row, enforced by the CHECK, so the version can never be ambiguous.
        """
        CREATE TABLE trioflow_schema (
            singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
            version INTEGER NOT NULL
        )
        """,
        "INSERT INTO trioflow_schema (singleton, version) VALUES (1, 1)",
        # seq is the rowid: range scans by seq and MAX(seq) are B-tree seeks.
        """
        CREATE TABLE trioflow_events (
            seq INTEGER PRIMARY KEY,
            id BLOB(16) UNIQUE NOT NULL,
            type TEXT NOT NULL,
            key TEXT,
            data TEXT NOT NULL,
            created_at INTEGER NOT NULL
        )
        """,
        """
        CREATE TABLE trioflow_cursors (
            consumer TEXT PRIMARY KEY,
            seq INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        )
        """,
    ),
    2: (
        # Sequence numbers are never given twice. The next number is one above
        # both the highest event present and the high-water mark, which covers
        # every event ever deleted: before an event above it is deleted, a
        # trigger raises it to the highest event present. Deleting the newest
        # events thus no longer makes numbering restart below consumers'
        # cursors, appends pay nothing for it, and deleting old events (the
        # mark already covers them) costs one lookup per event.
        """
        CREATE TABLE IF NOT EXISTS trioflow_sequence (
            singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
            high_water INTEGER NOT NULL
        )
        """,
        """
        INSERT INTO trioflow_sequence (singleton, high_water)
        SELECT 1, COALESCE(MAX(seq), 0) FROM trioflow_events WHERE true
        ON CONFLICT (singleton) DO UPDATE SET high_water = MAX(high_water, excluded.high_water)
        """,
        """
        CREATE TRIGGER IF NOT EXISTS trioflow_events_high_water
        BEFORE DELETE ON trioflow_events
        WHEN OLD.seq > (SELECT high_water FROM trioflow_sequence)
        BEGIN
            UPDATE trioflow_sequence SET high_water = (SELECT MAX(seq) FROM trioflow_events);
        END
        """,
    ),
    3: (
        # Dead letters: events a consumer gave up on, one row per consumer and
        # seq, recorded with the consumer's cursor in one transaction. Times
        # are microseconds since 1970 (UTC), as created_at; due_at is NULL
        # while the letter is parked. No IF NOT EXISTS: a table of that name
        # that trioflow did not make fails the migration (which then rolls
        # back whole) instead of being taken for ours.
        """
        CREATE TABLE trioflow_dead_letters (
            consumer TEXT NOT NULL,
            seq INTEGER NOT NULL,
            event_id BLOB NOT NULL,
            type TEXT NOT NULL,
            attempts INTEGER NOT NULL,
            first_failed_at INTEGER NOT NULL,
            last_failed_at INTEGER NOT NULL,
            reason TEXT NOT NULL,
            error_type TEXT NOT NULL,
            message TEXT NOT NULL,
            traceback TEXT NOT NULL,
            due_at INTEGER,
            PRIMARY KEY (consumer, seq)
        )
        """,
        # Only the requeued letters: looking for due ones never scans the
        # parked ones, however many pile up.
        """
        CREATE INDEX trioflow_dead_letters_due ON trioflow_dead_letters (consumer, due_at)
        WHERE due_at IS NOT NULL
        """,
    ),
}
_HEAD = "SELECT COALESCE(MAX(seq), 0) FROM trioflow_events"
# The head, and the high-water mark: the next number is one above both.
_NUMBERING = (
    "SELECT (SELECT COALESCE(MAX(seq), 0) FROM trioflow_events),"
    " (SELECT COALESCE(MAX(high_water), 0) FROM trioflow_sequence)"
)
_CURSORS_PAST = (
    "SELECT consumer, seq FROM trioflow_cursors WHERE seq > ? ORDER BY seq DESC, consumer"
)
_INSERT = (
    "INSERT INTO trioflow_events (seq, id, type, key, data, created_at) VALUES (?, ?, ?, ?, ?, ?)"
)
_READ = (
    "SELECT seq, id, type, key, data, created_at FROM trioflow_events"
    " WHERE seq > ? ORDER BY seq LIMIT ?"
)
_LOAD_CURSORS = "SELECT consumer, seq FROM trioflow_cursors"
_UPSERT_CURSOR = (
    "INSERT INTO trioflow_cursors (consumer, seq, updated_at) VALUES (?, ?, ?)"
    " ON CONFLICT (consumer) DO UPDATE SET seq = excluded.seq, updated_at = excluded.updated_at"
    # A stored cursor never moves backwards: a late commit of an older
    # position leaves the row as it is.
    " WHERE excluded.seq >= trioflow_cursors.seq"
)
_DEAD_LETTER_COLUMNS = (
    "consumer, seq, event_id, type, attempts, first_failed_at, last_failed_at, reason,"
    " error_type, message, traceback, due_at"
)
_RECORD_DEAD_LETTER = (
    f"INSERT OR REPLACE INTO trioflow_dead_letters ({_DEAD_LETTER_COLUMNS})"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# Consumers in BINARY collation: UTF-8 bytes, which sort as code points do.
_DEAD_LETTERS = f"SELECT {_DEAD_LETTER_COLUMNS} FROM trioflow_dead_letters ORDER BY consumer, seq"
_DEAD_LETTERS_OF = (
    f"SELECT {_DEAD_LETTER_COLUMNS} FROM trioflow_dead_letters WHERE consumer = ? ORDER BY seq"
)
_DUE_DEAD_LETTERS = (
    f"SELECT {_DEAD_LETTER_COLUMNS} FROM trioflow_dead_letters"
    " WHERE consumer = ? AND due_at <= ? ORDER BY seq"
)
_REQUEUE_DEAD_LETTER = "UPDATE trioflow_dead_letters SET due_at = ? WHERE consumer = ? AND seq = ?"
_DISCARD_DEAD_LETTER = "DELETE FROM trioflow_dead_letters WHERE consumer = ? AND seq = ?"
_FORGET_CONSUMER = (
    "DELETE FROM trioflow_dead_letters WHERE consumer = ?",
    "DELETE FROM trioflow_cursors WHERE consumer = ?",
)

# Primary result codes meaning "cannot reach or use the file right now": the
# caller may retry later. Everything else is a plain StoreError.
_UNAVAILABLE_CODES = {
    sqlite3.SQLITE_BUSY: "another connection holds the lock (this one waits up to "
    "busy_timeout={busy_timeout:g}s); retry, or raise busy_timeout",
    sqlite3.SQLITE_LOCKED: "the database is locked; retry",
    sqlite3.SQLITE_CANTOPEN: "cannot open the file; check that its directory exists and that "
    "this process may read and write it",
    sqlite3.SQLITE_NOTADB: "the file is not a SQLite database; point the store at a trioflow "
    "database or at a path that does not exist yet",
    sqlite3.SQLITE_READONLY: "the database is read-only; trioflow needs write access to the "
    "file and its directory (for the -wal and -shm files)",
    sqlite3.SQLITE_PERM: "permission denied; trioflow needs write access to the file and its "
    "directory",
    sqlite3.SQLITE_IOERR: "disk I/O error; check the disk and the file system",
    sqlite3.SQLITE_FULL: "the disk is full; free some space",
    sqlite3.SQLITE_PROTOCOL: "the file locking protocol failed; retry",
}


class SQLiteStore(Store):
    """The event log, cursors and dead letters in one SQLite file (WAL mode).

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
        # The opened file's absolute path, device and inode (see _check_file).
        self._opened: tuple[str, int, int] | None = None

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
        if not isinstance(url, str):
            raise UnknownStoreError(f"a store URL must be a str, got {url!r}; use {_URL_FORMS}")
        try:
            parts = urllib.parse.urlsplit(url)
        except ValueError:
            # An unbalanced or misplaced "[" or "]", read as an IPv6 host.
            raise UnknownStoreError(
                f"SQLite store URL {url!r} is malformed (a '[' or ']' before the path?); "
                f"use {_URL_FORMS}"
            ) from None
        if parts.scheme.lower() != "sqlite":
            raise UnknownStoreError(f"store URL {url!r} is not a sqlite: URL; use {_URL_FORMS}")
        if parts.netloc or not parts.path.startswith("/"):
            raise UnknownStoreError(
                f"SQLite store URL {url!r}: a SQLite URL has no host and starts with three "
                f"slashes; use {_URL_FORMS}"
            )
        if parts.fragment:
            raise UnknownStoreError(
                f"SQLite store URL {url!r} has a #fragment; percent-encode '#' in the path as %23"
            )
        path = urllib.parse.unquote(parts.path[1:])
        if not path:
            raise UnknownStoreError(f"SQLite store URL {url!r} names no file; use {_URL_FORMS}")
        try:
            pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise UnknownStoreError(
                f"SQLite store URL {url!r}: cannot parse the query; accepted: {_URL_OPTIONS}"
            ) from None
        options: dict[str, str] = {}
        for name, value in pairs:
            if name not in ("synchronous", "poll_interval", "busy_timeout"):
                raise UnknownStoreError(
                    f"SQLite store URL {url!r}: unknown option {name!r}; accepted: {_URL_OPTIONS}"
                )
            if name in options:
                raise UnknownStoreError(
                    f"SQLite store URL {url!r}: option {name!r} is given twice; give it once"
                )
            options[name] = value
        synchronous: Literal["full", "normal"]
        raw_synchronous = options.get("synchronous", "full").lower()
        if raw_synchronous == "full":
            synchronous = "full"
        elif raw_synchronous == "normal":
            synchronous = "normal"
        else:
            raise UnknownStoreError(
                f"SQLite store URL {url!r}: synchronous must be full or normal, "
                f"got {options['synchronous']!r}"
            )
        try:
            poll_interval = float(options.get("poll_interval", _DEFAULT_POLL_INTERVAL))
            busy_timeout = float(options.get("busy_timeout", _DEFAULT_BUSY_TIMEOUT))
        except ValueError:
            raise UnknownStoreError(
                f"SQLite store URL {url!r}: poll_interval and busy_timeout must be numbers of "
                f"seconds; accepted: {_URL_OPTIONS}"
            ) from None
        try:
            return cls(
                path,
                synchronous=synchronous,
                poll_interval=poll_interval,
                busy_timeout=busy_timeout,
            )
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
        writer = self._connection(self._writer)
        with self._errors(f"appending {len(batch)} events"):
            after, first, created_at = await trio.to_thread.run_sync(
                self._write, _append, writer, batch, limiter=self._write_limiter
            )
        self._appended.set()
        self._appended = trio.Event()
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
        reader = self._connection(self._reader)
        with self._errors("reading events"):
            return await trio.to_thread.run_sync(
                self._read,
                reader,
                min(max(after, -1), _MAX_INT64),
                min(limit, _MAX_INT64),
                max_bytes,
                limiter=self._read_limiter,
            )

    async def head(self) -> int:
        """Return the highest committed sequence number (0 if the log is empty).

        Raises:
            StoreError: The path no longer names the file that was opened.
        """
        reader = self._connection(self._reader)
        with self._errors("reading the head"):
            return await trio.to_thread.run_sync(self._head, reader, limiter=self._read_limiter)

    async def load_cursors(self) -> dict[str, int]:
        """Return every consumer's committed cursor, by consumer name."""
        reader = self._connection(self._reader)
        with self._errors("loading cursors"):
            return await trio.to_thread.run_sync(_load_cursors, reader, limiter=self._read_limiter)

    async def commit_cursors(self, cursors: Mapping[str, int]) -> None:
        """Set the given consumers' cursors in one transaction (insert or move forward).

        A cursor below the one stored is ignored: a stored cursor never moves
        backwards, whichever process or handle commits.

        Durable when this returns with ``synchronous="full"``; with
        ``"normal"``, a power loss may undo the last commits.
        """
        items = list(cursors.items())
        if not items:
            await trio.lowlevel.checkpoint()
            return
        writer = self._connection(self._writer)
        with self._errors(f"committing {len(items)} cursors"):
            await trio.to_thread.run_sync(
                self._write, _commit_cursors, writer, items, limiter=self._write_limiter
            )

    async def record_dead_letter(self, letter: DeadLetter, *, cursor: int | None) -> None:
        """Keep ``letter`` and move its consumer's cursor forward, in one write transaction.

        See `Store.record_dead_letter`. Like `append`, the transaction runs to
        its end in a worker thread even if the caller is cancelled meanwhile:
        a cancelled call kept the letter and moved the cursor, or did neither.

        Raises:
            StoreUnavailableError: The write lock was not free within
                ``busy_timeout``, or the file cannot be used.
            StoreError: The path no longer names the file that was opened, or
                a number does not fit SQLite's 64-bit integers.
        """
        writer = self._connection(self._writer)
        with self._errors(
            f"recording the dead letter of consumer {letter.consumer!r} at seq {letter.seq}"
        ):
            await trio.to_thread.run_sync(
                self._write,
                _record_dead_letter,
                writer,
                (letter, cursor),
                limiter=self._write_limiter,
            )

    async def dead_letters(self, consumer: str | None = None) -> list[DeadLetter]:
        """Return the dead letters of ``consumer`` (or of all), by consumer then seq."""
        if consumer is None:
            return await self._read_letters("listing the dead letters", _DEAD_LETTERS)
        return await self._read_letters(
            f"listing the dead letters of consumer {consumer!r}", _DEAD_LETTERS_OF, consumer
        )

    async def requeue_dead_letters(
        self, consumer: str, seqs: Sequence[int], *, after: float = 0.0
    ) -> list[int]:
        """Hand these letters back ``after`` seconds from now (this machine's clock).

        See `Store.requeue_dead_letters`; one write transaction.
        """
        return await self._change_letters(
            f"requeueing dead letters of consumer {consumer!r}",
            _requeue_dead_letters,
            consumer,
            seqs,
            after,
        )

    async def due_dead_letters(self, consumer: str) -> list[DeadLetter]:
        """Return ``consumer``'s requeued letters due by this machine's clock, by seq."""
        return await self._read_letters(
            f"looking for due dead letters of consumer {consumer!r}",
            _DUE_DEAD_LETTERS,
            consumer,
            due=True,
        )

    async def discard_dead_letters(self, consumer: str, seqs: Sequence[int]) -> list[int]:
        """Delete these letters of ``consumer``; return the seqs that existed, ascending."""
        return await self._change_letters(
            f"discarding dead letters of consumer {consumer!r}",
            _discard_dead_letters,
            consumer,
            seqs,
            0.0,
        )

    async def forget_consumer(self, consumer: str) -> None:
        """Delete ``consumer``'s cursor and dead letters, in one write transaction."""
        writer = self._connection(self._writer)
        with self._errors(f"forgetting consumer {consumer!r}"):
            await trio.to_thread.run_sync(
                self._write, _forget_consumer, writer, consumer, limiter=self._write_limiter
            )

    async def wait_for_append(self, after: int) -> int:
        """Return once the head is past ``after``.

        Polls the head, because other processes' commits cannot be signalled:
        5 ms after the call, then after twice as long each time, up to
        `poll_interval` seconds. A caller that keeps finding events (another
        process publishing) thus keeps polling every few milliseconds. An
        append through this instance ends the wait at once.

        Raises:
            StoreError: The path no longer names the file that was opened:
                no other process's events will come.
        """
        delay = min(_FIRST_POLL, self.poll_interval)
        while True:
            # Taken before reading the head, so an append that commits while
            # the head is read still wakes this wait: no lost wake-up.
            appended = self._appended
            head = await self.head()
            if head > after:
                return head
            with trio.move_on_after(delay):
                await appended.wait()
            delay = min(2 * delay, self.poll_interval)

    # -- internals ---------------------------------------------------------

    async def _read_letters(
        self, action: str, query: str, *parameters: object, due: bool = False
    ) -> list[DeadLetter]:
        reader = self._connection(self._reader)
        with self._errors(action):
            return await trio.to_thread.run_sync(
                self._fetch_letters, reader, query, parameters, due, limiter=self._read_limiter
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
        wanted = sorted({seq for seq in seqs if _MIN_INT64 <= seq <= _MAX_INT64})
        if not wanted:
            await trio.lowlevel.checkpoint()
            return []
        writer = self._connection(self._writer)
        with self._errors(action):
            return await trio.to_thread.run_sync(
                self._write, work, writer, (consumer, wanted, after), limiter=self._write_limiter
            )

    def _connection(self, connection: sqlite3.Connection | None) -> sqlite3.Connection:
        if connection is None:
            raise StoreError(
                f"SQLite store {self._path!r} is not open; use it inside `async with store.open():`"
            )
        return connection

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Translate sqlite3's (and the file system's) exceptions into trioflow's, here only."""
        try:
            yield
        except sqlite3.Error as exc:
            code = getattr(exc, "sqlite_errorcode", None)
            # Extended result codes carry the primary code in the low byte.
            hint = _UNAVAILABLE_CODES.get(code & 0xFF) if code is not None else None
            if hint is not None:
                raise StoreUnavailableError(
                    f"SQLite store {self._path!r}: {action} failed: {exc}; "
                    + hint.format(busy_timeout=self._busy_timeout)
                ) from exc
            raise StoreError(f"SQLite store {self._path!r}: {action} failed: {exc}") from exc
        except OverflowError as exc:
            # sqlite3 binds Python ints as 64-bit integers only.
            raise StoreError(
                f"SQLite store {self._path!r}: {action} failed: {exc}; SQLite keeps integers "
                f"from {_MIN_INT64} to {_MAX_INT64}"
            ) from exc
        except OSError as exc:
            # From the file checks around sqlite3 (a working directory that
            # no longer exists, a file that went while it was being opened).
            raise StoreUnavailableError(
                f"SQLite store {self._path!r}: {action} failed: {exc}; check that the file's "
                "directory exists and that this process may use it"
            ) from exc

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
        # isolation_level=None: no implicit transactions, this module issues
        # BEGIN/COMMIT itself. check_same_thread=False: trio's worker threads
        # vary, the limiters make sure only one uses a connection at a time.
        connection = sqlite3.connect(
            path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            # Validated in __init__ to be one of two literals: safe to inline.
            connection.execute(f"PRAGMA synchronous = {self._synchronous.upper()}")
        except BaseException:
            connection.close()
            raise
        return connection

    def _connect(self) -> tuple[sqlite3.Connection, sqlite3.Connection]:
        """Open both connections and make the schema ready (in a worker thread)."""
        # Resolved once, so both connections name the same file even if the
        # working directory changes in between.
        path = os.path.abspath(self._path)
        directory = os.path.dirname(path)
        if not os.path.isdir(directory):
            # sqlite3 would only say "unable to open database file".
            raise StoreUnavailableError(
                f"SQLite store {self._path!r}: directory {directory!r} does not exist; "
                "create it first (trioflow creates the file, not its directory)"
            )
        self._create_private(path)
        writer = self._new_connection(path)
        try:
            mode = self._switch_to_wal(writer)
            if str(mode).lower() != "wal":
                raise StoreUnavailableError(
                    f"SQLite store {self._path!r}: cannot switch the database to WAL mode "
                    f"(it stays in {mode!r} mode); use a file on a local file system"
                )
            self._ensure_schema(writer)
            # Once the writer has the file open: from now on each write and
            # each poll checks that the path still names this file.
            opened = os.stat(path)
            self._opened = (path, opened.st_dev, opened.st_ino)
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

    def _switch_to_wal(self, writer: sqlite3.Connection) -> object:
        """Put the file in WAL mode (it stays so); return the journal mode it is in.

        SQLite does not wait for its busy handler here: while another
        connection reads a file still in rollback mode (another process
        opening the same new file, say), the switch fails at once with
        SQLITE_BUSY. So this retries, as the busy handler would, up to
        ``busy_timeout``. It runs in a worker thread.
        """
        deadline = time.monotonic() + self._busy_timeout
        pause = 0.001
        while True:
            try:
                (mode,) = writer.execute("PRAGMA journal_mode = WAL").fetchall()[0]
            except sqlite3.OperationalError as exc:
                code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
                if code not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise
                if time.monotonic() >= deadline:
                    raise
            else:
                return mode
            time.sleep(pause)
            pause = min(2 * pause, 0.05)

    def _write(
        self,
        work: Callable[[sqlite3.Connection, _T], _R],
        writer: sqlite3.Connection,
        argument: _T,
    ) -> _R:
        """Run ``work`` in a write transaction on the file opened (in a worker thread)."""
        with _write_transaction(writer):
            # Under the write lock, just before the writes it guards.
            self._check_file()
            return work(writer, argument)

    def _head(self, reader: sqlite3.Connection) -> int:
        self._check_file()
        # fetchall, not fetchone: it steps the statement to its end, which ends
        # the read transaction instead of leaving the snapshot pinned.
        head: int = reader.execute(_HEAD).fetchall()[0][0]
        return head

    def _check_file(self) -> None:
        """Raise StoreError unless the path still names the file that was opened.

        SQLite goes on writing to a file deleted, moved or replaced while it
        is open, and publishes would go on succeeding into a file no one will
        open again. A stat of the path (a microsecond or two) tells.
        """
        if self._opened is None:
            return
        path, device, inode = self._opened
        try:
            now = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise StoreError(
                f"SQLite store {self._path!r}: the database file was deleted or moved away "
                "while the store was open, so nothing more is written: events and cursors "
                "committed since are not in the file the path names now (there is none). "
                "Stop every process using the store, put the file back with its -wal and -shm "
                "files (or restore a backup, or start afresh), then start them again"
            ) from None
        except OSError as exc:
            raise StoreUnavailableError(
                f"SQLite store {self._path!r}: cannot check that the database file is still "
                f"there ({exc}); check the permissions of its directory"
            ) from exc
        if (now.st_dev, now.st_ino) != (device, inode):
            raise StoreError(
                f"SQLite store {self._path!r}: the database file was replaced by another file "
                f"while the store was open (device {device} inode {inode}, now device "
                f"{now.st_dev} inode {now.st_ino}), so nothing more is written: events and "
                "cursors committed since are in the file that was replaced, not in the file "
                "the path names now. Stop every process using the store, keep the file you "
                "want at the path (with its own -wal and -shm files), then start them again"
            )

    def _create_private(self, path: str) -> None:
        """Create the file readable and writable by its owner only, unless it exists.

        SQLite would create it 0644 under the usual umask: every user of the
        machine could read the events. SQLite gives the -wal and -shm files
        the database file's mode, so they are private too. An existing file
        keeps the mode its owner chose.
        """
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        except OSError as exc:
            raise StoreUnavailableError(
                f"SQLite store {self._path!r}: cannot create the file ({exc}); check that this "
                "process may write in its directory"
            ) from exc
        # An empty file is an empty database to SQLite.
        os.close(descriptor)

    def _ensure_schema(self, writer: sqlite3.Connection) -> None:
        """Create or migrate the schema, then check the cursors (in a worker thread)."""
        # IMMEDIATE: processes opening a new or old file at once must not
        # both create or migrate it; the second waits, then finds it done.
        with _write_transaction(writer):
            version = self._stored_version(writer)
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step]:
                    writer.execute(statement)
                writer.execute("UPDATE trioflow_schema SET version = ?", (step,))
        # After the commit: a file whose cursors fail the check is still
        # migrated, and opens once they are fixed.
        self._check_cursors(writer)

    def _stored_version(self, writer: sqlite3.Connection) -> int:
        """The file's schema version, 0 for a file without trioflow's tables."""
        exists = writer.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'trioflow_schema'"
        ).fetchall()
        if not exists:
            return 0
        rows = writer.execute("SELECT version FROM trioflow_schema").fetchall()
        version = rows[0][0] if len(rows) == 1 else None
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"SQLite store {self._path!r} has schema version {version}, written by "
                f"a newer trioflow (this one knows version {SCHEMA_VERSION}); upgrade "
                "trioflow, or point the store at another file"
            )
        if not isinstance(version, int) or version < 1:
            raise SchemaVersionError(
                f"SQLite store {self._path!r} has an unknown schema version "
                f"({version!r}); it was not written by trioflow: point the store at "
                "another file"
            )
        return version

    def _check_cursors(self, writer: sqlite3.Connection) -> None:
        """Refuse a file whose cursors are past every sequence number it has given.

        Those consumers would skip the events numbered up to their cursors:
        the file was reset (its events and high-water mark deleted) or
        replaced by another under cursors kept from before.
        """
        head, high_water = writer.execute(_NUMBERING).fetchall()[0]
        given = max(head, high_water)
        past = writer.execute(_CURSORS_PAST, (given,)).fetchall()
        if not past:
            return
        named = ", ".join(f"{consumer!r} (at {seq})" for consumer, seq in past[:10])
        more = f" and {len(past) - 10} more" if len(past) > 10 else ""
        raise StoreError(
            f"SQLite store {self._path!r}: the cursors of consumers {named}{more} are past "
            f"{given}, the highest sequence number this file has given: the file was reset or "
            "replaced under its cursors, and those consumers would skip the next events. If "
            "it is the right file, have numbering continue above the cursors: run `UPDATE "
            f"trioflow_sequence SET high_water = {past[0][1]}` on it (with the sqlite3 command, "
            "say) while no process uses it; if it is not, point the store at the right file"
        )

    def _read(
        self, reader: sqlite3.Connection, after: int, limit: int, max_bytes: int | None
    ) -> list[Event]:
        """Fetch and build the events in the worker thread, off the trio thread."""
        events: list[Event] = []
        add = events.append
        new_uuid = uuid.UUID
        budget = math.inf if max_bytes is None else max_bytes
        total = 0
        # A batch shares one timestamp: build its datetime once.
        last_micros: int | None = None
        created_at = _EPOCH
        cursor = reader.execute(_READ, (after, limit))
        try:
            # Row by row rather than fetchall: the loop stops at the byte
            # budget without fetching the rest of the page.
            for seq, raw_id, event_type, key, data, micros in cursor:
                try:
                    size = utf8_size(data)
                    total += size
                    if total > budget and events:
                        break
                    if micros != last_micros:
                        created_at = _EPOCH + micros * _MICROSECOND
                        last_micros = micros
                    add(
                        Event(
                            seq=seq,
                            id=new_uuid(bytes=raw_id),
                            type=event_type,
                            data=_decode(data),
                            key=key,
                            created_at=created_at,
                            size=size,
                        )
                    )
                except Exception as exc:
                    # Whatever the decoders raise (RecursionError for data
                    # nested too deeply, TypeError for a blob...).
                    raise StoreError(
                        f"SQLite store {self._path!r}: event {seq} cannot be decoded "
                        f"({type(exc).__name__}: {exc}); the file was changed by something "
                        "other than trioflow: restore it from a backup, or delete that event"
                    ) from exc
        finally:
            # Resets the statement, which ends the read transaction even when
            # the loop stopped early (else the snapshot stays pinned).
            cursor.close()
        return events

    def _fetch_letters(
        self, reader: sqlite3.Connection, query: str, parameters: tuple[object, ...], due: bool
    ) -> list[DeadLetter]:
        """Fetch and build dead letters (in a worker thread); ``due``: those due by now."""
        if due:
            parameters = (*parameters, _micros(datetime.datetime.now(datetime.UTC)))
        letters: list[DeadLetter] = []
        for row in reader.execute(query, parameters).fetchall():
            try:
                letters.append(_letter(row))
            except Exception as exc:
                raise StoreError(
                    f"SQLite store {self._path!r}: the dead letter of consumer {row[0]!r} at "
                    f"seq {row[1]!r} cannot be decoded ({type(exc).__name__}: {exc}); the file "
                    "was changed by something other than trioflow: restore it from a backup, "
                    "or delete that row of trioflow_dead_letters"
                ) from exc
        return letters


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


def _rollback(connection: sqlite3.Connection) -> None:
    """Roll back the open transaction, if any, keeping the original error."""
    if connection.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            connection.execute("ROLLBACK")


@contextlib.contextmanager
def _write_transaction(writer: sqlite3.Connection) -> Iterator[None]:
    """Hold SQLite's write lock for the block: commit after it, roll back on error."""
    # IMMEDIATE takes the write lock at once, so what the block reads cannot
    # change before it commits.
    writer.execute("BEGIN IMMEDIATE")
    try:
        yield
        writer.execute("COMMIT")
    except BaseException:
        _rollback(writer)
        raise


def _append(
    writer: sqlite3.Connection, batch: list[NewEvent]
) -> tuple[int, int, datetime.datetime]:
    """Number and insert one batch, in a write transaction (in a worker thread).

    Returns the head before the batch, the first number it got, and its time.
    """
    after, high_water = writer.execute(_NUMBERING).fetchall()[0]
    first = max(after, high_water) + 1
    # Taken under the lock: created_at follows commit order across writers
    # (as far as the wall clock does).
    now = datetime.datetime.now(datetime.UTC)
    micros = _micros(now)
    writer.executemany(
        _INSERT,
        [
            (seq, new.id.bytes, new.type, new.key, new.payload, micros)
            for seq, new in enumerate(batch, start=first)
        ],
    )
    return after, first, now


def _load_cursors(reader: sqlite3.Connection) -> dict[str, int]:
    return dict(reader.execute(_LOAD_CURSORS).fetchall())


def _commit_cursors(writer: sqlite3.Connection, items: list[tuple[str, int]]) -> None:
    """Insert or move forward cursors, in a write transaction (in a worker thread)."""
    micros = _micros(datetime.datetime.now(datetime.UTC))
    writer.executemany(_UPSERT_CURSOR, [(name, seq, micros) for name, seq in items])


def _micros(moment: datetime.datetime) -> int:
    """Microseconds since 1970 (UTC); a naive time counts as local time, as asyncpg takes it."""
    return (moment.astimezone(datetime.UTC) - _EPOCH) // _MICROSECOND


def _time(micros: int) -> datetime.datetime:
    return _EPOCH + micros * _MICROSECOND


def _record_dead_letter(
    writer: sqlite3.Connection, argument: tuple[DeadLetter, int | None]
) -> None:
    """Keep a letter and move its cursor, in a write transaction (in a worker thread)."""
    letter, cursor = argument
    due_at = None if letter.due_at is None else _micros(letter.due_at)
    writer.execute(
        _RECORD_DEAD_LETTER,
        (
            letter.consumer,
            letter.seq,
            letter.event_id.bytes,
            letter.type,
            letter.attempts,
            _micros(letter.first_failed_at),
            _micros(letter.last_failed_at),
            letter.reason,
            letter.error_type,
            letter.message,
            letter.traceback,
            due_at,
        ),
    )
    if cursor is not None:
        _commit_cursors(writer, [(letter.consumer, cursor)])


def _letter(row: tuple[Any, ...]) -> DeadLetter:
    """A `DeadLetter` from a row of trioflow_dead_letters, in `_DEAD_LETTER_COLUMNS` order."""
    consumer, seq, event_id, event_type, attempts, first, last, reason = row[:8]
    error_type, message, traceback, due_at = row[8:]
    return DeadLetter(
        consumer=consumer,
        seq=seq,
        event_id=uuid.UUID(bytes=event_id),
        type=event_type,
        attempts=attempts,
        first_failed_at=_time(first),
        last_failed_at=_time(last),
        reason=reason,
        error_type=error_type,
        message=message,
        traceback=traceback,
        due_at=None if due_at is None else _time(due_at),
    )


def _requeue_dead_letters(
    writer: sqlite3.Connection, argument: tuple[str, list[int], float]
) -> list[int]:
    """Set the letters' due_at, in a write transaction (in a worker thread)."""
    consumer, seqs, after = argument
    # Taken under the write lock, as append takes created_at.
    now = datetime.datetime.now(datetime.UTC)
    due_at = _micros(now) + round(after * 1_000_000)
    return [
        seq
        for seq in seqs
        if writer.execute(_REQUEUE_DEAD_LETTER, (due_at, consumer, seq)).rowcount
    ]


def _discard_dead_letters(
    writer: sqlite3.Connection, argument: tuple[str, list[int], float]
) -> list[int]:
    """Delete letters, in a write transaction (in a worker thread)."""
    consumer, seqs, _ = argument
    return [seq for seq in seqs if writer.execute(_DISCARD_DEAD_LETTER, (consumer, seq)).rowcount]


def _forget_consumer(writer: sqlite3.Connection, consumer: str) -> None:
    """Delete a consumer's letters and cursor, in a write transaction (in a worker thread)."""
    for statement in _FORGET_CONSUMER:
        writer.execute(statement, (consumer,))
