"""`SQLiteTransaction`: a transaction of the user's statements on the store's writer.

The store lends the transaction its writer connection for the whole block,
under its write limiter (no other write of the store interleaves). Each call
runs in a worker thread, one at a time (a limiter of the transaction's own),
and is abandoned when cancelled: the statement is then interrupted
(`sqlite3.Connection.interrupt`), and the rollback waits for the thread to end,
since the limiter is released only when it does.

Statements that would end the transaction or change the shared connection are
refused when SQLite prepares them, by an authorizer installed for the
transaction's life: however a ``COMMIT`` is spelt, it never runs.
"""

from __future__ import annotations

import contextlib
import datetime
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import trio

from ..._errors import QueryError, StoreError
from ..._events import NewEvent
from .._base import Appended
from .._transactions import ParamStyle, Row, StoreTransaction
from . import _sql
from ._connections import (
    rollback,
    shorten,
    translate_errors,
    translate_query_errors,
    try_begin_immediate,
)

_T = TypeVar("_T")
_R = TypeVar("_R")

#: Seconds between tries to take the write lock: the first, and the longest.
_FIRST_PAUSE = 0.001
_LONGEST_PAUSE = 0.05

#: Pragmas that only read, whatever their argument (a table's or an index's name).
_READING_PRAGMAS = frozenset(
    {
        "collation_list",
        "compile_options",
        "data_version",
        "database_list",
        "foreign_key_check",
        "foreign_key_list",
        "freelist_count",
        "function_list",
        "index_info",
        "index_list",
        "index_xinfo",
        "integrity_check",
        "module_list",
        "page_count",
        "pragma_list",
        "quick_check",
        "table_info",
        "table_list",
        "table_xinfo",
    }
)
#: Pragmas that read without an argument and set a value with one: only read here.
_SETTING_PRAGMAS = frozenset(
    {"application_id", "encoding", "foreign_keys", "journal_mode", "page_size", "user_version"}
)
#: ``defer_foreign_keys`` lasts until the transaction ends: it may be set.
_TRANSACTION_PRAGMAS = frozenset({"defer_foreign_keys"})


def refusal(action: int, name: str | None, argument: str | None) -> str | None:
    """Why a user's statement may not run in a transaction, or None if it may.

    ``action``, ``name`` and ``argument`` are what SQLite's authorizer is given.
    """
    if action == sqlite3.SQLITE_TRANSACTION:
        return (
            "BEGIN, COMMIT, END and ROLLBACK are trioflow's: the transaction commits when its "
            "block ends and rolls back when the block raises"
        )
    if action == sqlite3.SQLITE_SAVEPOINT:
        return "SAVEPOINT, RELEASE and ROLLBACK TO are refused: the transaction is trioflow's"
    if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
        return (
            "ATTACH and DETACH are refused: the connection is the store's, and the "
            "transaction covers its file only"
        )
    if action == sqlite3.SQLITE_PRAGMA:
        pragma = (name or "").lower()
        if (
            pragma in _READING_PRAGMAS
            or pragma in _TRANSACTION_PRAGMAS
            or (pragma in _SETTING_PRAGMAS and argument is None)
        ):
            return None
        return (
            f"PRAGMA {pragma} is refused: the connection is the store's, which sets it up "
            "itself; only pragmas that read (table_info, foreign_key_check...) and "
            "defer_foreign_keys run in a transaction"
        )
    return None


class SQLiteTransaction(StoreTransaction):
    """One open write transaction on a `SQLiteStore`'s writer connection.

    Made by `SQLiteStore.transaction`, which holds the store's write limiter
    around it and calls `begin`, then `commit` or `roll_back`.
    """

    paramstyle: ClassVar[ParamStyle] = "?"

    def __init__(
        self,
        writer: sqlite3.Connection,
        *,
        shown: str,
        busy_timeout: float,
        check_file: Callable[[], None],
    ) -> None:
        self._writer = writer
        self._shown = shown
        self._busy_timeout = busy_timeout
        self._check_file = check_file
        # One call on the connection at a time, and the rollback after an
        # abandoned call's thread has ended.
        self._limiter = trio.CapacityLimiter(1)
        #: Why the transaction can only roll back now: the first call that
        #: failed, and its statement if it was the user's.
        self._failure: tuple[str, str | None] | None = None
        self._ended = False
        # Set by the authorizer and read back in the same worker thread.
        self._refused: str | None = None
        #: Whether events were appended: the store wakes its waiters after the commit.
        self.appended = False

    # -- the store's side ------------------------------------------------------

    async def begin(self) -> None:
        """Take SQLite's write lock, waiting for other connections up to busy_timeout.

        The wait happens here, in trio, rather than in SQLite's busy handler,
        so a cancelled caller stops waiting at once.
        """
        deadline = time.monotonic() + self._busy_timeout
        pause = _FIRST_PAUSE
        with self._errors("beginning a transaction"):
            while True:
                busy = await trio.to_thread.run_sync(self._begin, limiter=self._limiter)
                if busy is None:
                    return
                if time.monotonic() >= deadline:
                    raise busy
                await trio.sleep(pause)
                pause = min(2 * pause, _LONGEST_PAUSE)

    async def commit(self) -> None:
        """Commit, or roll back and raise if a call of the transaction failed.

        Run it shielded: the commit goes to its end once started.
        """
        self._ended = True
        if self._failure is not None:
            await self.roll_back()
            raise self._failed_error("it was rolled back, not committed")
        with self._errors("committing a transaction"):
            await trio.to_thread.run_sync(self._commit, limiter=self._limiter)

    async def roll_back(self) -> None:
        """Roll back, once any abandoned call's thread has ended. Run it shielded."""
        self._ended = True
        await trio.to_thread.run_sync(self._roll_back, limiter=self._limiter)

    # -- the user's side -------------------------------------------------------

    async def execute(self, query: str, *args: object) -> None:
        """Run one statement with ``args`` as its ``?`` parameters."""
        await self._query(query, lambda writer: writer.execute(query, args).close())

    async def executemany(self, query: str, args: Iterable[Sequence[object]]) -> None:
        """Run one statement once per parameter sequence of ``args``."""
        rows = list(args)
        await self._query(query, lambda writer: writer.executemany(query, rows).close())

    async def fetch(self, query: str, *args: object) -> list[Row]:
        """Run a query; return all of its rows as dicts of column name to value."""
        return await self._query(query, lambda writer: _rows(writer.execute(query, args), None))

    async def fetchrow(self, query: str, *args: object) -> Row | None:
        """Run a query; return its first row as a dict, or None."""
        rows = await self._query(query, lambda writer: _rows(writer.execute(query, args), 1))
        return rows[0] if rows else None

    async def fetchval(self, query: str, *args: object) -> Any:
        """Run a query; return the first column of its first row, or None."""
        return await self._query(query, lambda writer: _first_value(writer.execute(query, args)))

    async def commit_cursors(
        self, cursors: Mapping[str, int], *, fences: Mapping[str, int] | None = None
    ) -> frozenset[str]:
        """`SQLiteStore.commit_cursors`, in this transaction (fences checked in it too)."""
        items = list(cursors.items())
        if not items:
            self._check_usable(None)
            await trio.lowlevel.checkpoint()
            return frozenset()
        return await self._store_call(
            f"committing {len(items)} cursors", _sql.commit_cursors, (items, fences)
        )

    async def discard_dead_letters(self, consumer: str, seqs: Sequence[int]) -> list[int]:
        """`SQLiteStore.discard_dead_letters`, in this transaction."""
        wanted = sorted(set(seqs))
        if not wanted:
            self._check_usable(None)
            await trio.lowlevel.checkpoint()
            return []
        return await self._store_call(
            f"discarding dead letters of consumer {consumer!r}",
            _sql.discard_dead_letters,
            (consumer, wanted, 0.0),
        )

    async def append(self, events: Sequence[NewEvent]) -> Appended:
        """`SQLiteStore.append`, in this transaction: visible to readers on its commit."""
        batch = list(events)
        if not batch:
            after = await self._store_call("reading the head", _head, None)
            now = datetime.datetime.now(datetime.UTC)
            return Appended(after=after, seqs=range(after + 1, after + 1), created_at=now)
        after, first, created_at = await self._store_call(
            f"appending {len(batch)} events", _sql.append, batch
        )
        self.appended = True
        return Appended(after=after, seqs=range(first, first + len(batch)), created_at=created_at)

    # -- internals -------------------------------------------------------------

    async def _query(self, query: str, call: Callable[[sqlite3.Connection], _R]) -> _R:
        """Run ``call``, a user's statement, in the worker thread."""
        errors = translate_query_errors(self._shown, self._busy_timeout, query)
        return await self._call(query, errors, self._run, query, call)

    async def _store_call(
        self, action: str, work: Callable[[sqlite3.Connection, _T], _R], argument: _T
    ) -> _R:
        """Run ``work``, one of the store's own, in the worker thread."""
        return await self._call(None, self._errors(action), self._work, work, argument)

    async def _call(
        self,
        query: str | None,
        errors: contextlib.AbstractContextManager[None],
        function: Callable[..., _R],
        *args: Any,
    ) -> _R:
        self._check_usable(query)
        try:
            with errors:
                return await trio.to_thread.run_sync(
                    function, *args, abandon_on_cancel=True, limiter=self._limiter
                )
        except BaseException as exc:
            if self._failure is None:
                self._failure = (f"{type(exc).__name__}: {exc}", query)
            if isinstance(exc, trio.Cancelled):
                # The thread goes on alone: cut its statement short. Harmless
                # if it has ended (SQLite forgets an interrupt once idle).
                self._writer.interrupt()
            raise

    def _check_usable(self, query: str | None) -> None:
        if self._ended:
            raise StoreError(
                f"SQLite store {self._shown!r}: the transaction has ended; use a "
                "StoreTransaction only inside its `async with store.transaction()` block"
            )
        if self._failure is not None:
            raise self._failed_error("it can only roll back now: leave its block")

    def _failed_error(self, what: str) -> StoreError | QueryError:
        """The error saying that a call failed before, so ``what``; a QueryError if it
        was a statement of the user's (it names that statement)."""
        assert self._failure is not None
        failed, query = self._failure
        message = f"a call in this transaction failed ({failed}), so {what}"
        if query is not None:
            return QueryError(message, query=query)
        return StoreError(message)

    def _errors(self, action: str) -> contextlib.AbstractContextManager[None]:
        return translate_errors(self._shown, self._busy_timeout, action)

    # -- in the worker thread --------------------------------------------------

    def _begin(self) -> sqlite3.OperationalError | None:
        """Take the write lock now, or return SQLite's "busy" error."""
        busy = try_begin_immediate(self._writer)
        if busy is not None:
            return busy
        try:
            # Under the write lock, before anything is written.
            self._check_file()
            self._writer.set_authorizer(self._authorize)
        except BaseException:
            rollback(self._writer)
            raise
        return None

    def _commit(self) -> None:
        self._writer.set_authorizer(None)
        try:
            self._writer.execute("COMMIT")
        except BaseException:
            rollback(self._writer)
            raise

    def _roll_back(self) -> None:
        self._writer.set_authorizer(None)
        rollback(self._writer)

    def _run(self, query: str, call: Callable[[sqlite3.Connection], _R]) -> _R:
        self._refused = None
        try:
            result = call(self._writer)
        except sqlite3.DatabaseError as exc:
            if self._refused is None or exc.sqlite_errorcode != sqlite3.SQLITE_AUTH:
                raise
            raise QueryError(
                f"SQLite store {self._shown!r}: the statement {shorten(query)} is refused in "
                f"a transaction: {self._refused}",
                query=query,
            ) from None
        if not self._writer.in_transaction:  # pragma: no cover - the authorizer prevents it
            raise StoreError(
                f"SQLite store {self._shown!r}: the statement {shorten(query)} ended the "
                "transaction; what ran before it may have been committed"
            )
        return result

    def _work(self, work: Callable[[sqlite3.Connection, _T], _R], argument: _T) -> _R:
        # As the store's own writes do: just before writing, under the lock.
        self._check_file()
        return work(self._writer, argument)

    def _authorize(
        self,
        action: int,
        name: str | None,
        argument: str | None,
        database: str | None,
        trigger: str | None,
    ) -> int:
        reason = refusal(action, name, argument)
        if reason is None:
            return sqlite3.SQLITE_OK
        self._refused = reason
        return sqlite3.SQLITE_DENY


def _rows(cursor: sqlite3.Cursor, limit: int | None) -> list[Row]:
    """The rows of ``cursor`` (at most ``limit``) as dicts; resets its statement."""
    try:
        names = [column[0] for column in cursor.description or ()]
        found = cursor.fetchall() if limit is None else cursor.fetchmany(limit)
        return [dict(zip(names, row, strict=True)) for row in found]
    finally:
        cursor.close()


def _first_value(cursor: sqlite3.Cursor) -> Any:
    """The first column of the first row of ``cursor``, or None; resets its statement."""
    try:
        row = cursor.fetchone()
        return None if row is None else row[0]
    finally:
        cursor.close()


def _head(writer: sqlite3.Connection, _: None) -> int:
    return _sql.head(writer)
