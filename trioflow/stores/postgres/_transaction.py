"""Store transactions on PostgreSQL: the user's SQL, cursor commits and appends in one commit.

`PostgresTransaction` is the `StoreTransaction` of `PostgresStore.transaction`:
one pooled connection inside one READ COMMITTED transaction (the isolation of
every statement the store runs). The user's statements go to the driver's
`Transaction.users` view, so that PostgreSQL refusing one raises
`trioflow.QueryError` naming it; cursor commits and appends run the store's own
statements on the same connection (`PostgresStore._commit_cursors_on`,
`PostgresStore._append_on`).

The transaction's end belongs to the block: statements that would end it
early, or change the pooled connection's session for whoever uses it next, are
refused before they are sent (`refusal`); every statement runs through the
extended protocol, which takes one statement only, so that none can hide
behind a semicolon. This is a guard against mistakes, not a sandbox: a function
can still change a session setting (``set_config(..., false)``).
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final

import attrs

from ..._errors import QueryError, StoreError
from ..._events import NewEvent
from .._base import Appended
from .._transactions import ParamStyle, Row, StoreTransaction
from ._driver import Record, Transaction, shorten

if TYPE_CHECKING:
    from ._store import PostgresStore

# Leading blanks, comments and parentheses before a statement's first word.
_LEAD: Final = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*(?:[^*]|\*(?!/))*\*/|\()*")
_WORD: Final = re.compile(r"[A-Za-z_]+")

#: What the block's end does, said by the refusals of statements that end it.
_THE_END: Final = (
    "trioflow ends the transaction itself: it commits when the block ends normally and "
    "rolls back when it ends by an exception"
)
_ENDS: Final = f"it would end the transaction before its block does; {_THE_END}"
_SESSION: Final = "it changes the session of a pooled connection, for whoever uses it next"

#: First words of statements that end the transaction or change the session.
_REFUSED: Final = {
    "ABORT": _ENDS,
    "BEGIN": f"the transaction has begun already; {_THE_END}",
    "COMMIT": _ENDS,
    "DEALLOCATE": f"{_SESSION} (its prepared statements)",
    "DISCARD": _SESSION,
    "END": _ENDS,
    "LISTEN": _SESSION,
    "LOAD": _SESSION,
    "PREPARE": "it outlives the transaction (a session's prepared statement, or a two-phase "
    "commit, which trioflow does not take part in)",
    "RESET": f"{_SESSION}; use SET LOCAL, which lasts until the transaction ends",
    "ROLLBACK": _ENDS,
    "START": f"the transaction has begun already; {_THE_END}",
    "UNLISTEN": _SESSION,
}


def refusal(query: str) -> str | None:
    """Why ``query`` may not run in a store transaction, or None when it may.

    Refused: ending the transaction (``COMMIT``, ``ROLLBACK``, ``END``...),
    beginning one, and changing the session for the connection's next users
    (``SET`` without ``LOCAL``, ``SET SESSION``, ``RESET``, ``LISTEN``,
    ``DISCARD``, ``PREPARE``...). ``SET TRANSACTION`` is refused too: the
    store's append needs READ COMMITTED, a fresh snapshot per statement.
    ``SET LOCAL`` and ``SET CONSTRAINTS`` last until the commit, and pass.
    """
    words = _first_words(query)
    if not words:
        return None
    first, second = (*words, "")[:2]
    if first == "ROLLBACK" and second == "TO":
        return (
            "ROLLBACK TO SAVEPOINT is not allowed in a trioflow transaction: it could undo an "
            "append or a cursor commit whose answer trioflow already gave; a failed statement "
            "rolls the whole transaction back"
        )
    if first in _REFUSED:
        return f"{first} is not allowed in a trioflow transaction: {_REFUSED[first]}"
    if first == "SET" and second not in ("LOCAL", "CONSTRAINTS"):
        if second == "TRANSACTION":
            return (
                "SET TRANSACTION is not allowed in a trioflow transaction: it runs READ "
                "COMMITTED, which the store's append needs (a fresh snapshot per statement)"
            )
        return (
            f"{' '.join(words)} is not allowed in a trioflow transaction: {_SESSION}; use "
            "SET LOCAL, which lasts until the transaction ends"
        )
    return None


def _first_words(query: str) -> list[str]:
    """The first two words of ``query``, upper case, past blanks, comments and parentheses."""
    lead = _LEAD.match(query)
    start = 0 if lead is None else lead.end()
    return [match[0].upper() for match in itertools.islice(_WORD.finditer(query, start), 2)]


def _row(record: Record) -> Row:
    return dict(record.items())


@attrs.define(eq=False)
class PostgresTransaction(StoreTransaction):
    """One open transaction of a `PostgresStore`. See `StoreTransaction`.

    Valid inside its ``store.transaction()`` block only, and for one task at
    a time. Once a method failed, PostgreSQL has aborted the transaction:
    every later statement is refused, and the block's end rolls back even if
    the error was caught.
    """

    paramstyle: ClassVar[ParamStyle] = "$1"

    _store: PostgresStore
    _inner: Transaction
    #: The events appended in this transaction, batch by batch.
    appended: list[tuple[Sequence[NewEvent], Appended]] = attrs.field(init=False, factory=list)
    #: The first error a method raised (the transaction is aborted), if any.
    failed: BaseException | None = attrs.field(init=False, default=None)
    _closed: bool = attrs.field(init=False, default=False)

    async def execute(self, query: str, *args: object) -> None:
        with self._statement(query) as inner:
            # fetch, not execute: asyncpg sends an execute without arguments
            # in the simple protocol, which runs several statements at once.
            await inner.fetch(query, *args)

    async def executemany(self, query: str, args: Iterable[Sequence[object]]) -> None:
        with self._statement(query) as inner:
            await inner.executemany(query, args)

    async def fetch(self, query: str, *args: object) -> list[Row]:
        with self._statement(query) as inner:
            return [_row(record) for record in await inner.fetch(query, *args)]

    async def fetchrow(self, query: str, *args: object) -> Row | None:
        with self._statement(query) as inner:
            record = await inner.fetchrow(query, *args)
        return None if record is None else _row(record)

    async def fetchval(self, query: str, *args: object) -> Any:
        with self._statement(query) as inner:
            return await inner.fetchval(query, *args)

    async def commit_cursors(
        self, cursors: Mapping[str, int], *, fences: Mapping[str, int] | None = None
    ) -> frozenset[str]:
        with self._statement(None):
            return await self._store._commit_cursors_on(
                self._inner, cursors, fences=fences, in_transaction=True
            )

    async def discard_dead_letters(self, consumer: str, seqs: Sequence[int]) -> list[int]:
        with self._statement(None):
            return await self._store._change_letters_on(
                self._inner,
                self._store._sql.discard_dead_letters,
                f"discarding dead letters of consumer {consumer!r}",
                consumer,
                seqs,
            )

    async def append(self, events: Sequence[NewEvent]) -> Appended:
        with self._statement(None):
            appended = await self._store._append_on(self._inner, events)
        if events:
            self.appended.append((events, appended))
        return appended

    def close(self) -> None:
        """End the use of this transaction: the block is over."""
        self._closed = True

    def check_committable(self) -> None:
        """Raise if the transaction may not commit: one of its statements failed.

        PostgreSQL would answer the COMMIT of an aborted transaction by
        rolling it back; saying so here keeps the block from looking committed.
        """
        failed = self.failed
        if failed is None:
            return
        if isinstance(failed, QueryError):
            raise QueryError(
                f"{failed} (the error was caught, but PostgreSQL aborted the transaction: it "
                "was rolled back, nothing of it was committed)",
                query=failed.query,
            ) from failed
        raise StoreError(
            f"a statement of this transaction failed ({type(failed).__name__}: {failed}); "
            "PostgreSQL aborted the transaction: it was rolled back, nothing of it was "
            "committed"
        ) from failed

    @contextlib.contextmanager
    def _statement(self, query: str | None) -> Iterator[Transaction]:
        """Check that ``query`` (the user's; None: the store's) may run; record a failure.

        Yields the driver's transaction to run it on: its `Transaction.users`
        view for the user's statements.
        """
        if self._closed:
            raise StoreError(
                "this transaction has ended: use a StoreTransaction only inside its "
                "`async with store.transaction()` block"
            )
        failed = self.failed
        if failed is not None:
            said = "to go on" if query is None else f"the statement {shorten(query)!r}"
            raise QueryError(
                f"refused {said}: an earlier statement of this transaction "
                f"failed ({failed}), and PostgreSQL aborted the transaction; leave the block, "
                "which rolls it back",
                query=query or "",
            )
        try:
            if query is None:
                yield self._inner
                return
            reason = refusal(query)
            if reason is not None:
                raise QueryError(f"refused the statement {shorten(query)!r}: {reason}", query=query)
            yield self._inner.users()
        except BaseException as exc:
            self.failed = exc
            raise
