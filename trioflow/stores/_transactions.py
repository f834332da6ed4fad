"""Store transactions: the user's statements, cursor moves and appends in one commit.

The SQL stores (SQLite, PostgreSQL) open a `StoreTransaction` on their own
database: a transactional handler's statements commit with its consumer's
cursor move (exactly-once effects), and a transactional publish (the outbox)
commits its events with the user's rows. The runtime wraps it in the
`trioflow.Transaction` users see; a store that cannot (memory) refuses.

Contract, for every implementation:

* The block of ``Store.transaction()`` is one database transaction: leaving it
  normally commits everything done through the `StoreTransaction`; leaving it
  by an exception (or cancellation) rolls everything back. After a crash at
  any point, either all of it is in the store or none of it is.
* ``execute``, ``executemany``, ``fetch``, ``fetchrow`` and ``fetchval`` run
  the user's SQL with the store's parameter style (`StoreTransaction.paramstyle`:
  ``"$1"`` on PostgreSQL, ``"?"`` on SQLite) and return plain values: rows as
  dicts of column name to value. A statement the database refuses raises
  `trioflow.QueryError` naming the statement; the transaction then only rolls
  back (PostgreSQL aborts it; the runtime rolls back on any error anyway).
* ``commit_cursors`` is `Store.commit_cursors` inside the transaction, fences
  included (checked atomically with the claims of leases, as there), and
  ``discard_dead_letters`` is `Store.discard_dead_letters` inside it.
* ``append`` is `Store.append` inside the transaction: the events get sequence
  numbers greater than every event committed before, and become visible to
  readers only when the transaction commits, with the store's gap-free reads
  kept: a reader never sees a later event before an earlier one of another
  transaction. It takes the store's ordering lock, held until the commit: call
  it last. If the transaction rolls back, no sequence number it took can hold
  up a reader.
* Every method is a trio checkpoint and may be cancelled; a cancelled method
  leaves the transaction to roll back.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Literal

from .._events import NewEvent
from ._base import Appended

#: A row of a query's result: column name to value.
Row = dict[str, Any]

#: How parameters are written in a store's SQL.
ParamStyle = Literal["$1", "?"]


class StoreTransaction(abc.ABC):
    """One open database transaction of a SQL store. See the module docstring."""

    #: How parameters are written in this store's SQL: ``"$1"`` (numbered, as
    #: PostgreSQL) or ``"?"`` (positional, as SQLite).
    paramstyle: ClassVar[ParamStyle]

    @abc.abstractmethod
    async def execute(self, query: str, *args: object) -> None:
        """Run one statement with ``args`` as its parameters."""

    @abc.abstractmethod
    async def executemany(self, query: str, args: Iterable[Sequence[object]]) -> None:
        """Run one statement once per parameter sequence of ``args``."""

    @abc.abstractmethod
    async def fetch(self, query: str, *args: object) -> list[Row]:
        """Run a query; return all of its rows."""

    @abc.abstractmethod
    async def fetchrow(self, query: str, *args: object) -> Row | None:
        """Run a query; return its first row, or None."""

    @abc.abstractmethod
    async def fetchval(self, query: str, *args: object) -> Any:
        """Run a query; return the first column of its first row, or None."""

    @abc.abstractmethod
    async def commit_cursors(
        self, cursors: Mapping[str, int], *, fences: Mapping[str, int] | None = None
    ) -> frozenset[str]:
        """`Store.commit_cursors`, in this transaction."""

    @abc.abstractmethod
    async def discard_dead_letters(self, consumer: str, seqs: Sequence[int]) -> list[int]:
        """`Store.discard_dead_letters`, in this transaction (a requeued letter's
        handler succeeded: its effects and the letter's removal commit together)."""

    @abc.abstractmethod
    async def append(self, events: Sequence[NewEvent]) -> Appended:
        """`Store.append`, in this transaction; takes the ordering lock until the commit."""
