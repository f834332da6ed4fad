"""`Transaction`: the user's side of a store transaction.

A transactional handler gets one (``async def handler(event, tx)``), and
``flow.transaction()`` opens one (the outbox). Its statements run in the
store's database transaction, with the store's parameter style; events it
publishes are appended in that same transaction, at its end; the consumer's
cursor move (for a handler) commits with them. It is valid only while the
handler runs, or inside the ``async with`` block: afterwards every call is
refused, never run outside the transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import trio

from ._errors import TransactionClosedError
from ._events import JSON, NewEvent, encode, new_ids
from .stores._transactions import ParamStyle, Row, StoreTransaction


@attrs.define(eq=False)
class Transaction:
    """A transaction of the store's database, for a handler or the outbox.

    A transactional handler gets one (``async def handler(event, tx)``), and
    `Flow.transaction` opens one (the outbox). Its statements run in the
    store's database transaction; events it publishes are appended in that
    same transaction, at its end; the consumer's cursor move (for a handler)
    commits with them. It is valid only while the handler runs, or inside the
    ``async with`` block: afterwards every call raises
    `trioflow.TransactionClosedError`, never runs outside the transaction.

    Statements use the store's parameter style (`paramstyle`): ``$1, $2``
    on PostgreSQL, ``?`` on SQLite. A statement the database refuses raises
    `trioflow.QueryError` naming it, and the whole transaction rolls back.
    """

    _store_tx: StoreTransaction
    #: What it belongs to, for errors: "the handler of consumer 'x' on seq=5", say.
    _owner: str
    _open: bool = True
    _published: list[NewEvent] = attrs.Factory(list)

    @property
    def paramstyle(self) -> ParamStyle:
        """How parameters are written: ``"$1"`` (PostgreSQL) or ``"?"`` (SQLite)."""
        return self._store_tx.paramstyle

    async def execute(self, query: str, *args: object) -> None:
        """Run one statement with ``args`` as its parameters."""
        self._check_open()
        await self._store_tx.execute(query, *args)

    async def executemany(self, query: str, args: Iterable[Sequence[object]]) -> None:
        """Run one statement once per parameter sequence of ``args``."""
        self._check_open()
        await self._store_tx.executemany(query, args)

    async def fetch(self, query: str, *args: object) -> list[Row]:
        """Run a query; return its rows as dicts of column name to value."""
        self._check_open()
        return await self._store_tx.fetch(query, *args)

    async def fetchrow(self, query: str, *args: object) -> Row | None:
        """Run a query; return its first row, or None."""
        self._check_open()
        return await self._store_tx.fetchrow(query, *args)

    async def fetchval(self, query: str, *args: object) -> Any:
        """Run a query; return the first column of its first row, or None."""
        self._check_open()
        return await self._store_tx.fetchval(query, *args)

    def publish(self, type: str, data: JSON = None, *, key: str | None = None) -> None:
        """Publish an event in this transaction: appended at its end, visible to
        consumers only once it commits, never if it rolls back.

        Checked at once, as `Flow.publish` checks: an invalid event raises
        `trioflow.InvalidEventError` here, and nothing is published.
        """
        self._check_open()
        (event_id,) = new_ids(1)
        self._published.append(encode(type, data, key, event_id))

    @property
    def published(self) -> Sequence[NewEvent]:
        """The events published in it so far (appended when it commits)."""
        return tuple(self._published)

    def _close(self) -> None:
        """Refuse every later call: the handler returned, or the block ended."""
        self._open = False

    def _check_open(self) -> None:
        if not self._open:
            raise TransactionClosedError(
                f"this transaction of {self._owner} has ended: use a Transaction only while "
                "its handler runs (or inside its `async with flow.transaction()` block); it "
                "is never run outside its transaction"
            )


async def append_published(tx: Transaction) -> Sequence[int]:
    """Append what ``tx`` published, in its store transaction; return their seqs."""
    if not tx._published:
        await trio.lowlevel.checkpoint()
        return ()
    appended = await tx._store_tx.append(tx._published)
    return appended.seqs
