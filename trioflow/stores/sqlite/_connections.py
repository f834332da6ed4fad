"""Connections: opening them, their transactions, and sqlite3's errors translated.

The store keeps two connections on its file, each used by one worker thread
at a time; this module makes them and is the one place where sqlite3's (and
the file system's) exceptions become trioflow's.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from typing import Literal

from ..._errors import QueryError, StoreError, StoreUnavailableError
from ._sql import MAX_INT64, MIN_INT64

#: How much of a statement a QueryError's message shows (all of it is in ``.query``).
_SHOWN_QUERY = 200

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


@contextlib.contextmanager
def translate_errors(shown: str, busy_timeout: float, action: str) -> Iterator[None]:
    """Translate sqlite3's (and the file system's) exceptions into trioflow's, here only.

    ``shown`` is the store's path as given, ``action`` what was being done.
    """
    try:
        yield
    except sqlite3.Error as exc:
        _raise_if_unavailable(exc, shown, busy_timeout, action)
        raise StoreError(f"SQLite store {shown!r}: {action} failed: {exc}") from exc
    except OverflowError as exc:
        # sqlite3 binds Python ints as 64-bit integers only.
        raise StoreError(
            f"SQLite store {shown!r}: {action} failed: {exc}; SQLite keeps integers "
            f"from {MIN_INT64} to {MAX_INT64}"
        ) from exc
    except OSError as exc:
        # From the file checks around sqlite3 (a working directory that
        # no longer exists, a file that went while it was being opened).
        raise StoreUnavailableError(
            f"SQLite store {shown!r}: {action} failed: {exc}; check that the file's "
            "directory exists and that this process may use it"
        ) from exc


@contextlib.contextmanager
def translate_query_errors(shown: str, busy_timeout: float, query: str) -> Iterator[None]:
    """Translate what sqlite3 raises for a user's statement into `QueryError`.

    The file system's failures stay `StoreUnavailableError`, as in
    `translate_errors`: the statement was fine, the file was not.
    """
    try:
        yield
    except sqlite3.Error as exc:
        action = f"the statement {shorten(query)}"
        _raise_if_unavailable(exc, shown, busy_timeout, action)
        raise QueryError(f"SQLite store {shown!r}: {action} failed: {exc}", query=query) from exc
    except OverflowError as exc:
        raise QueryError(
            f"SQLite store {shown!r}: the statement {shorten(query)} failed: {exc}; SQLite "
            f"keeps integers from {MIN_INT64} to {MAX_INT64}",
            query=query,
        ) from exc


def shorten(query: str) -> str:
    """``query`` quoted, cut to a couple of hundred characters for a message."""
    if len(query) <= _SHOWN_QUERY:
        return repr(query)
    return f"{query[:_SHOWN_QUERY]!r}... ({len(query)} characters)"


def _raise_if_unavailable(exc: sqlite3.Error, shown: str, busy_timeout: float, action: str) -> None:
    """Raise StoreUnavailableError if ``exc`` says the file cannot be used right now."""
    code = getattr(exc, "sqlite_errorcode", None)
    # Extended result codes carry the primary code in the low byte.
    hint = _UNAVAILABLE_CODES.get(code & 0xFF) if code is not None else None
    if hint is not None:
        raise StoreUnavailableError(
            f"SQLite store {shown!r}: {action} failed: {exc}; "
            + hint.format(busy_timeout=busy_timeout)
        ) from exc


def new_connection(
    path: str, *, busy_timeout: float, synchronous: Literal["full", "normal"]
) -> sqlite3.Connection:
    """A connection to ``path`` with trioflow's settings (in a worker thread)."""
    # isolation_level=None: no implicit transactions, write_transaction issues
    # BEGIN/COMMIT itself. check_same_thread=False: trio's worker threads
    # vary, the store's limiters make sure only one uses a connection at a time.
    connection = sqlite3.connect(
        path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
    )
    try:
        # The store validated it as one of two literals: safe to inline.
        connection.execute(f"PRAGMA synchronous = {synchronous.upper()}")
    except BaseException:
        connection.close()
        raise
    return connection


def switch_to_wal(writer: sqlite3.Connection, *, busy_timeout: float) -> object:
    """Put the file in WAL mode (it stays so); return the journal mode it is in.

    SQLite does not wait for its busy handler here: while another
    connection reads a file still in rollback mode (another process
    opening the same new file, say), the switch fails at once with
    SQLITE_BUSY. So this retries, as the busy handler would, up to
    ``busy_timeout``. It runs in a worker thread.
    """
    deadline = time.monotonic() + busy_timeout
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


def try_begin_immediate(writer: sqlite3.Connection) -> sqlite3.OperationalError | None:
    """Take SQLite's write lock if it is free now; else return SQLite's "busy" error.

    Does not wait in SQLite's busy handler, which `sqlite3.Connection.interrupt`
    cannot cut short: the caller waits between tries where it can be cancelled
    (a trio task). The connection keeps its busy timeout for other work.
    """
    ((milliseconds,),) = writer.execute("PRAGMA busy_timeout").fetchall()
    writer.execute("PRAGMA busy_timeout = 0")
    try:
        writer.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_BUSY:
            raise
        return exc
    finally:
        writer.execute(f"PRAGMA busy_timeout = {int(milliseconds)}")
    return None


def rollback(connection: sqlite3.Connection) -> None:
    """Roll back the open transaction, if any, keeping the original error."""
    if connection.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            connection.execute("ROLLBACK")


@contextlib.contextmanager
def write_transaction(writer: sqlite3.Connection) -> Iterator[None]:
    """Hold SQLite's write lock for the block: commit after it, roll back on error."""
    # IMMEDIATE takes the write lock at once, so what the block reads cannot
    # change before it commits.
    writer.execute("BEGIN IMMEDIATE")
    try:
        yield
        writer.execute("COMMIT")
    except BaseException:
        rollback(writer)
        raise
