"""The PostgreSQL store: many processes on many machines share one event log.

``postgresql://user@host:5432/db?schema=trioflow`` keeps the log and the
cursors in a PostgreSQL schema of its own. asyncpg does the talking, from trio
through trio-asyncio (see `trioflow.stores.postgres._driver`, the only module
that touches either).

Gap-free order with many writers: every append is one call of the schema's
``append`` function, which takes a transaction-scoped advisory lock, reads the
head, numbers the batch from a sequence and inserts it with one ``unnest``.
The lock is held until the transaction commits, so batches commit in the order
of their sequence numbers: a reader that has seen ``s`` has already been able
to see every event below ``s``. A rolled-back append may leave a hole in the
numbering; readers never wait for holes, they just read ``seq > after``.
A store transaction (`PostgresStore.transaction`) appends with the same
function, so its batch too commits in sequence order, and only once the whole
transaction does.
docs/postgres.md explains the mechanism, its cost and the other choices. An
append whose answer was lost is settled before the store answers (see
`trioflow.stores.postgres._recovery`).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Final, Literal, get_args

import attrs
import trio

from ..._dead_letters import DeadLetter
from ..._errors import ConfigurationError, LeaseLostError, StoreError, StoreUnavailableError
from ..._events import JSON, MAX_DEPTH, Event, NewEvent, decode_json
from ..._leases import Lease
from .._base import (
    Appended,
    CursorInfo,
    LogBounds,
    SchemaStatus,
    Store,
    check_limit,
    check_reset,
    search_seq_before,
)
from .._transactions import StoreTransaction
from ._driver import (
    Driver,
    DriverConfig,
    InDoubtError,
    QueryInterface,
    Record,
    Transaction,
    open_driver,
    simplify_group,
)
from ._listen import listen_forever
from ._recovery import settle_in_doubt, settle_transaction
from ._schema import DEFAULT_SCHEMA, SCHEMA_VERSION, check_schema_name, prepare, stored_version
from ._sql import LETTER_COLUMNS, Queries, lock_key
from ._transaction import PostgresTransaction
from ._url import parse_url

logger = logging.getLogger("trioflow.stores.postgres")

#: How cursor commits reach the disk; see `PostgresStore`.
CursorDurability = Literal["sync", "async", "unlogged"]

# The largest max_bytes sent to the server (a bigint): any page is smaller.
_MAX_BYTES_CAP: Final = 2**62
# A bigint's range: a seq outside it is no dead letter's.
_MIN_BIGINT: Final = -(2**63)
_MAX_BIGINT: Final = 2**63 - 1


class PostgresStore(Store):
    """An event log, cursor table, dead letters and leases in a PostgreSQL schema.

    Processes on any number of machines may open stores on the same schema at
    once: they see each other's events in one order, and ``wait_for_append``
    wakes at once (through LISTEN/NOTIFY) when any of them appends. One
    instance may be open only once at a time.

    Args:
        dsn: A ``postgresql://`` URL that asyncpg understands, without
            trioflow's options; see `from_url`.
        schema: The PostgreSQL schema holding trioflow's tables, created on
            first use.
        pool_min_size: Connections opened when the store opens.
        pool_max_size: Most pooled connections (one more is used for LISTEN).
        poll_interval: Seconds ``wait_for_append`` waits for a notification
            before re-checking the head anyway: notifications wake waiters at
            once, this only bounds the delay when one was lost (while the
            LISTEN connection reconnects, or behind a transaction pooler).
            Kept in the `Store.poll_interval` attribute, which
            ``App(poll_interval=...)`` overrides.
        cursor_durability: ``"sync"`` (default): a cursor commit is on disk when
            ``commit_cursors`` returns. ``"async"``: the commit does not wait
            for the WAL flush; a server crash can lose the last ~0.6 s (three
            ``wal_writer_delay``) of cursor commits. ``"unlogged"``: cursors go
            to an UNLOGGED table plus a logged checkpoint per consumer at most
            every ``cursor_checkpoint_interval`` seconds; a server crash or
            failover loses up to that long of cursor progress. Events are
            always durable; lost cursor progress means redelivery, never loss.
        cursor_checkpoint_interval: For ``"unlogged"``: seconds between a
            consumer's logged checkpoints.
        connect_timeout: Seconds to wait for a new connection.
        command_timeout: Seconds any one statement may run (None: no limit).
        cleanup_timeout: Seconds a cancelled call may spend rolling back and
            returning its connection before the connection is closed instead.
        statement_cache_size: Prepared statements kept per connection; 0 for
            transaction-mode poolers such as PgBouncer.
        application_name: Shown in ``pg_stat_activity``.

    Raises:
        ConfigurationError: An option is out of range.
    """

    supports_transactions = True

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        pool_min_size: int = 1,
        pool_max_size: int = 10,
        poll_interval: float = 1.0,
        cursor_durability: CursorDurability = "sync",
        cursor_checkpoint_interval: float = 5.0,
        connect_timeout: float = 10.0,
        command_timeout: float | None = None,
        cleanup_timeout: float = 5.0,
        statement_cache_size: int = 100,
        application_name: str = "trioflow",
    ) -> None:
        check_schema_name(schema)
        if not isinstance(dsn, str) or not dsn:
            # Not its repr: whatever it is, it may hold a password.
            got = "an empty str" if dsn == "" else type(dsn).__name__
            raise ConfigurationError(f"PostgreSQL DSN must be a non-empty str, got {got}")
        if not 0 <= pool_min_size <= pool_max_size or pool_max_size < 1:
            raise ConfigurationError(
                f"pool sizes must satisfy 0 <= pool_min_size <= pool_max_size and "
                f"pool_max_size >= 1, got {pool_min_size} and {pool_max_size}"
            )
        for name, value in [
            ("poll_interval", poll_interval),
            ("cursor_checkpoint_interval", cursor_checkpoint_interval),
            ("connect_timeout", connect_timeout),
            ("cleanup_timeout", cleanup_timeout),
            ("command_timeout", 1.0 if command_timeout is None else command_timeout),
        ]:
            if not isinstance(value, int | float) or not 0 < value < math.inf:
                raise ConfigurationError(
                    f"{name} must be a positive number of seconds, got {value!r}"
                )
        if cursor_durability not in get_args(CursorDurability):
            raise ConfigurationError(
                f"cursor_durability must be one of {', '.join(get_args(CursorDurability))}, "
                f"got {cursor_durability!r}"
            )
        if statement_cache_size < 0:
            raise ConfigurationError(
                f"statement_cache_size must be >= 0, got {statement_cache_size!r}"
            )
        self.schema = schema
        self.cursor_durability: CursorDurability = cursor_durability
        self.poll_interval = float(poll_interval)
        self._checkpoint_interval = float(cursor_checkpoint_interval)
        self._sql = Queries(schema=schema, lock_key=lock_key(schema))
        self._config = DriverConfig(
            dsn=dsn,
            min_size=pool_min_size,
            max_size=pool_max_size,
            connect_timeout=float(connect_timeout),
            command_timeout=None if command_timeout is None else float(command_timeout),
            cleanup_timeout=float(cleanup_timeout),
            statement_cache_size=statement_cache_size,
            server_settings={"application_name": application_name},
            # The append function reads the head after taking its lock; that
            # needs a fresh snapshot per statement.
            read_committed=True,
        )
        self._driver: Driver | None = None
        #: The masked URL the store was built from, if any (see `from_url`).
        self._shown_as: str | None = None
        self._opened = False
        self._appended = trio.Event()
        #: The highest sequence number known to be committed: from this
        #: instance's own appends, other processes' notifications and head
        #: reads.
        self._known_head = 0
        #: Whether another process may have appended since the head was last
        #: read (a notification from a backend not in our pool, a lost LISTEN
        #: connection, a poll interval without any): `wait_for_append` then
        #: reads the head; otherwise it trusts `_known_head`.
        self._stale = True
        self._checkpointed_at: dict[str, float] = {}
        #: Test hook: awaited between the insert and the commit of every
        #: append (which then takes two more round trips). Internal.
        self._before_commit: Callable[[], Awaitable[None]] | None = None

    @classmethod
    def from_url(cls, url: str) -> PostgresStore:
        """Build a store from ``postgresql://user:password@host:port/db?options``.

        trioflow's options (the keyword arguments of `PostgresStore`, for
        example ``schema=trioflow&pool_max_size=20&cursor_durability=async``)
        are taken out of the query string; libpq connection options that
        asyncpg understands (``sslmode``, ``host``, ``passfile``, ...) are
        passed on. ``application_name`` is accepted too.

        Raises:
            UnknownStoreError: The URL is malformed or has an unknown or invalid
                option.
        """
        parsed = parse_url(url)
        try:
            store = cls(parsed.dsn, **parsed.options)  # type: ignore[arg-type]
        except ConfigurationError as exc:
            raise parsed.refuse(f": {parsed.quote(exc)}") from None
        # Shown as the URL it came from (its options too), masked as that URL
        # is: a damaged URL may have put a secret out of place (in the
        # schema, say), where the rebuilt DSN would show it.
        display = parsed.display
        shown_schema = "schema" in parsed.options
        store._shown_as = display if shown_schema else f"{display} schema={store.schema!r}"
        store._config = attrs.evolve(
            store._config,
            display=display,
            secrets=tuple(sorted({*parsed.secrets, *store._config.secrets}, key=len, reverse=True)),
        )
        return store

    def __repr__(self) -> str:
        if self._shown_as is not None:
            return f"<PostgresStore {self._shown_as}>"
        return f"<PostgresStore {self._config.display} schema={self.schema!r}>"

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[None]:
        """Connect, create or migrate the schema, start listening; close on exit.

        Raises:
            ConfigurationError: This instance is already open.
            StoreUnavailableError: The server cannot be reached or refused the
                login, or the database does not exist.
            SchemaVersionError: The schema was written by a newer trioflow.
            StoreError: The database's encoding is not UTF8; the schema
                cannot be created (for example, the role may not create
                schemas in this database); or a consumer's cursor is past
                every sequence number the log has given (the log was reset
                or replaced under its cursors).
        """
        if self._opened:
            raise ConfigurationError(
                f"{self!r} is already open; share the open store, or make another "
                "PostgresStore for the same URL"
            )
        self._opened = True
        # Nothing is known of the log until the head is read again.
        self._known_head, self._stale = 0, True
        body_error: BaseException | None = None
        error: BaseException | None = None
        try:
            async with open_driver(self._config) as driver:
                await prepare(driver, self._sql)
                async with trio.open_nursery() as nursery:
                    await nursery.start(
                        partial(
                            listen_forever,
                            driver,
                            self._sql.channel,
                            on_notify=self._on_notify,
                            on_listening=self._on_listening,
                            poll_interval=self.poll_interval,
                        )
                    )
                    self._driver = driver
                    try:
                        yield
                    except BaseException as exc:
                        body_error = exc
                        raise
                    finally:
                        self._driver = None
                        nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The listener's nursery wraps whatever crosses it in an exception
            # group; callers expect the block's own exception, or the one
            # StoreError that made opening fail.
            error = simplify_group(group, body_error)
            if error is group:
                raise
        finally:
            self._opened = False
            self._checkpointed_at.clear()
        if error is not None:
            raise error

    async def schema_status(self) -> SchemaStatus:
        """Read the schema's version on one connection of its own, changing nothing.

        Raises:
            StoreUnavailableError: The server cannot be reached or refused the login.
        """
        config = attrs.evolve(self._config, min_size=1, max_size=1)
        async with open_driver(config) as driver:
            stored = await stored_version(driver, self._sql)
        return SchemaStatus(stored=stored, current=SCHEMA_VERSION)

    async def append(self, events: Sequence[NewEvent]) -> Appended:
        """Commit ``events`` in one round trip; see the module docstring for the order."""
        driver = self._require_open()
        if not events:
            head = await self.head()
            return Appended(
                after=head,
                seqs=range(head + 1, head + 1),
                created_at=datetime.datetime.now(datetime.UTC),
            )
        args = _append_args(events)
        operation = f"appending {len(events)} event(s)"
        row: Record | None
        try:
            if self._before_commit is None:
                row = await driver.fetchrow_write(self._sql.append, *args, operation=operation)
            else:
                async with driver.transaction(operation=operation) as transaction:
                    row = await transaction.fetchrow(self._sql.append, *args)
                    await self._before_commit()
        except InDoubtError as exc:
            appended = await settle_in_doubt(driver, self._sql, events, exc)
        else:
            assert row is not None
            appended = _appended(row, len(events))
        self._committed(appended)
        return appended

    def _committed(self, appended: Appended) -> None:
        """Tell this store's waiters of a committed batch."""
        if appended.seqs:
            self._known_head = max(self._known_head, appended.seqs[-1])
        # Its own NOTIFY comes back from a backend in our pool and is ignored
        # (`_on_notify`): waiters learn of it here, with no query.
        self._wake()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[StoreTransaction]:
        """One READ COMMITTED transaction on one pooled connection; see `StoreTransaction`.

        The user's SQL uses ``$1`` parameters and gets rows as dicts.
        Statements that would end the transaction or change the pooled
        connection's session are refused (see
        `trioflow.stores.postgres._transaction`). ``append`` calls the
        store's append function in the transaction: it waits for the
        ordering lock then, not before, and holds it until the commit, so
        other publishers wait only for the part of the transaction after
        it. Its NOTIFY is delivered at the commit, when this store's waiters
        learn of the events too. Cursor commits in a transaction write the
        logged cursor table, whatever ``cursor_durability`` says: they are
        as durable as the transaction's commit (see docs/postgres.md,
        "Transactions").

        A COMMIT whose answer is lost is settled as an append's is, by the
        first event the transaction appended; a transaction that appended
        none raises `OutcomeUnknownError`.

        Raises:
            QueryError: PostgreSQL refused a statement (also when that error
                was caught inside the block): everything was rolled back.
            StoreUnavailableError: The connection was lost; nothing was
                committed (after a lost COMMIT answer: checked).
            OutcomeUnknownError: The COMMIT's answer was lost and whether it
                committed could not be found out.
        """
        driver = self._require_open()
        committing = False
        appended: list[tuple[Sequence[NewEvent], Appended]] = []
        try:
            async with driver.transaction(operation="running a transaction") as inner:
                transaction = PostgresTransaction(store=self, inner=inner)
                appended = transaction.appended
                try:
                    yield transaction
                finally:
                    transaction.close()
                transaction.check_committable()
                committing = True
        except InDoubtError as exc:
            if not committing:
                raise
            events = [event for batch, _ in appended for event in batch]
            await settle_transaction(driver, self._sql, events, exc)
        for _, batch in appended:
            self._committed(batch)

    async def _append_on(self, transaction: Transaction, events: Sequence[NewEvent]) -> Appended:
        """`append` in a store transaction: the same statement, its lock held until the commit."""
        operation = f"appending {len(events)} event(s) in a transaction"
        if not events:
            head: int = await transaction.fetchval(self._sql.head, operation=operation)
            return Appended(
                after=head,
                seqs=range(head + 1, head + 1),
                created_at=datetime.datetime.now(datetime.UTC),
            )
        row = await transaction.fetchrow(
            self._sql.append, *_append_args(events), operation=operation
        )
        assert row is not None
        return _appended(row, len(events))

    async def read(
        self, after: int, limit: int, *, max_bytes: int | None = None
    ) -> Sequence[Event]:
        """Return up to ``limit`` events with ``seq > after``, in order.

        With ``max_bytes``, the page is cut on the server, before the event
        that would take its total size past ``max_bytes`` (the first event
        always comes): large events beyond the cut are never sent.

        Raises:
            StoreError: The server failed, or a stored event's data cannot be
                decoded (the message names its sequence number).
        """
        driver = self._require_open()
        operation = f"reading events after seq {after}"
        if max_bytes is None:
            rows = await driver.fetch(self._sql.read, after, max(limit, 0), operation=operation)
        else:
            rows = await driver.fetch(
                self._sql.read_bytes,
                after,
                max(limit, 0),
                min(max_bytes, _MAX_BYTES_CAP),
                operation=operation,
            )
        if not rows:
            return []
        datas = self._decode_page(rows)
        return [
            Event(
                seq=row[0],
                id=row[1],
                type=row[2],
                data=data,
                key=row[3],
                created_at=row[5],
                size=row[6],
            )
            for row, data in zip(rows, datas, strict=True)
        ]

    def _decode_page(self, rows: Sequence[Record]) -> list[JSON]:
        """The data of a page of rows, decoded.

        One decode call for the whole page: the column holds valid JSON texts
        (PostgreSQL checked them), so joined they are one valid array, and
        one call costs a third less than one call per event. The array adds a
        level of nesting to every event, though, and PostgreSQL accepts JSON
        that Python cannot decode (a number of more than 4300 digits, nesting
        deeper than the recursion limit allows). So when the page fails, its
        events are decoded one by one, at the same depth of the call stack:
        the page fails only for an event that cannot be decoded alone, and
        says which.

        Raises:
            StoreError: An event cannot be decoded; the message names it.
        """
        try:
            datas: list[JSON] = decode_json("[" + ",".join([row[4] for row in rows]) + "]")
        except Exception:
            datas = []
            for row in rows:
                try:
                    datas.append(decode_json(row[4]))
                except Exception as exc:
                    raise self._undecodable(row, exc) from exc
        return datas

    def _undecodable(self, row: Record, error: Exception) -> StoreError:
        reason = str(error)
        reason = reason if len(reason) <= 300 else reason[:297] + "..."
        return StoreError(
            f"event seq {row[0]} (id {row[1]}) in PostgreSQL schema {self.schema!r} at "
            f"{self._config.display} cannot be decoded: {type(error).__name__}: {reason}. "
            "Its data is JSON that PostgreSQL accepted but Python cannot read, which publish "
            f"never stores (it refuses data nested deeper than {MAX_DEPTH} levels, say): the "
            "row was written some other way. Repair or delete it (UPDATE or DELETE FROM "
            f"{self._sql.q}.events WHERE seq = {row[0]}); until then no consumer can read "
            "past it"
        )

    async def head(self) -> int:
        """Return the highest committed sequence number (0 for an empty log)."""
        driver = self._require_open()
        head: int = await driver.fetchval(self._sql.head, operation="reading the head of the log")
        self._known_head = max(self._known_head, head)
        return head

    async def load_cursors(self) -> dict[str, int]:
        """Return every consumer's cursor (the greater of its unlogged and logged copies)."""
        driver = self._require_open()
        rows = await driver.fetch(self._sql.load_cursors, operation="loading the cursors")
        return {row[0]: row[1] for row in rows}

    async def commit_cursors(
        self, cursors: Mapping[str, int], *, fences: Mapping[str, int] | None = None
    ) -> frozenset[str]:
        """Move the given cursors forward, as durably as ``cursor_durability`` says.

        A cursor below the stored one is ignored: stored cursors never move
        backwards (in the unlogged table and its logged checkpoint alike).
        One statement, fenced or not: a consumer in ``fences`` is written
        only while its lease's token is the one given, checked under a lock
        on its lease row that holds off any claim until the write commits
        (see docs/postgres.md, "Leases and fenced writes").

        Returns:
            The consumers whose fence no longer held: nothing was written for them.
        """
        driver = self._require_open()
        return await self._commit_cursors_on(driver, cursors, fences=fences)

    async def _commit_cursors_on(
        self,
        runner: QueryInterface,
        cursors: Mapping[str, int],
        *,
        fences: Mapping[str, int] | None,
        in_transaction: bool = False,
    ) -> frozenset[str]:
        """`commit_cursors` on the pool, or in a store transaction (``in_transaction``).

        In a transaction the cursors go to the logged table, with the
        statement of ``cursor_durability="sync"``: the transaction's commit
        makes them durable with the user's rows. (``"async"`` would make the
        whole transaction's commit asynchronous, events included;
        ``"unlogged"`` would lose the cursor in a server crash that keeps the
        rows, and the handler's effects would be applied again.)
        """
        if not cursors:
            await trio.lowlevel.checkpoint()
            return frozenset()
        durability = "sync" if in_transaction else self.cursor_durability
        names = list(cursors)
        args: list[object] = [names, [cursors[name] for name in names]]
        now = trio.current_time()
        due = []
        if durability == "unlogged":
            due = [
                name
                for name in names
                if now - self._checkpointed_at.get(name, -math.inf) >= self._checkpoint_interval
            ]
            if due:
                args += [due, [cursors[name] for name in due]]
        # Code-point order, the order the lease rows are locked in by claims too.
        fenced = sorted(name for name in names if fences is not None and name in fences)
        if fenced:
            assert fences is not None
            args += [fenced, [fences[name] for name in fenced]]
        query = self._sql.commit_cursors(durability, checkpoint=bool(due), fenced=bool(fenced))
        operation = f"committing the cursors of {len(names)} consumer(s)"
        refused: frozenset[str] = frozenset()
        if fenced:
            rows = await runner.fetch(query, *args, operation=operation)
            refused = frozenset(row[0] for row in rows)
        else:
            await runner.execute(query, *args, operation=operation)
        for name in due:
            if name not in refused:
                self._checkpointed_at[name] = now
        return refused

    async def record_dead_letter(
        self, letter: DeadLetter, *, cursor: int | None, fence: int | None = None
    ) -> None:
        """Keep ``letter`` and move its consumer's cursor forward, in one statement.

        See `Store.record_dead_letter`. Whatever ``cursor_durability`` says, the
        cursor goes to the logged cursor table and the statement commits as
        durably as the server's ``synchronous_commit`` makes it: a letter and
        the cursor past it survive a server crash together. (An unlogged
        cursor lost in a crash would redeliver an event that has a letter; a
        lost letter under a kept cursor would lose the event.) With ``fence``,
        the lease's token is checked in the same statement, as
        `commit_cursors` checks it.

        A connection lost while the statement ran leaves it committed or not;
        recording the same letter and cursor again is safe.

        Raises:
            LeaseLostError: ``fence`` is no longer the token of the consumer's
                lease; nothing was recorded.
        """
        driver = self._require_open()
        args = [*[getattr(letter, column) for column in LETTER_COLUMNS], cursor]
        operation = f"recording the dead letter of consumer {letter.consumer!r} at seq {letter.seq}"
        if fence is None:
            await driver.execute(self._sql.record_dead_letter(), *args, operation=operation)
            return
        held = await driver.fetchval(
            self._sql.record_dead_letter(fenced=True), *args, fence, operation=operation
        )
        if not held:
            raise LeaseLostError(
                f"consumer {letter.consumer!r} is no longer this flow's: its lease passed to "
                f"another flow (its token is no longer {fence}), so its dead letter at seq "
                f"{letter.seq} was not recorded and its cursor was not moved; the flow that "
                "holds the lease now handles the event",
                keys=frozenset([letter.consumer]),
            )

    async def claim_leases(self, holder: str, keys: Sequence[str], ttl: float) -> list[Lease]:
        """Take or renew ``holder``'s leases on ``keys`` by the database's clock, in one statement.

        See `Store.claim_leases`. The expiry is the database's ``now()`` (the
        start of the claim's transaction) plus ``ttl``: no host's clock plays
        a part, so hosts whose clocks disagree still agree on who holds a key.
        """
        driver = self._require_open()
        wanted = sorted(set(keys))
        if not wanted:
            await trio.lowlevel.checkpoint()
            return []
        rows = await driver.fetch(
            self._sql.claim_leases,
            holder,
            wanted,
            float(ttl),
            operation=f"claiming the leases of {len(wanted)} consumer(s) for holder {holder!r}",
        )
        return [_lease(row) for row in rows]

    async def release_leases(self, holder: str, keys: Sequence[str]) -> None:
        """Let ``holder``'s leases on ``keys`` lapse now, by the database's clock."""
        driver = self._require_open()
        wanted = sorted(set(keys))
        if not wanted:
            await trio.lowlevel.checkpoint()
            return
        await driver.execute(
            self._sql.release_leases,
            holder,
            wanted,
            operation=f"releasing the leases of {len(wanted)} consumer(s) of holder {holder!r}",
        )

    async def leases(self) -> list[Lease]:
        """Every lease that has not lapsed by the database's clock, by key."""
        driver = self._require_open()
        rows = await driver.fetch(self._sql.leases, operation="listing the leases")
        return [_lease(row) for row in rows]

    async def forget_lapsed_leases(self, prefix: str, *, lapsed_for: float) -> int:
        """Delete the leases on keys starting with ``prefix`` that lapsed ``lapsed_for``
        seconds ago or more by the database's clock, in one statement."""
        driver = self._require_open()
        rows = await driver.fetch(
            self._sql.forget_lapsed_leases,
            prefix,
            lapsed_for,
            operation=f"forgetting the lapsed leases of {prefix!r}...",
        )
        return len(rows)

    async def dead_letters(self, consumer: str | None = None) -> list[DeadLetter]:
        """Return the dead letters of ``consumer`` (or of all), by consumer then seq."""
        driver = self._require_open()
        if consumer is None:
            rows = await driver.fetch(self._sql.dead_letters, operation="listing the dead letters")
        else:
            rows = await driver.fetch(
                self._sql.dead_letters_of,
                consumer,
                operation=f"listing the dead letters of consumer {consumer!r}",
            )
        return [_letter(row) for row in rows]

    async def earliest_due_at(self, consumer: str) -> datetime.datetime | None:
        """The earliest due time of ``consumer``'s requeued letters, asked of PostgreSQL."""
        driver = self._require_open()
        due_at: datetime.datetime | None = await driver.fetchval(
            self._sql.earliest_due_at,
            consumer,
            operation=f"looking for requeued dead letters of consumer {consumer!r}",
        )
        return due_at

    async def dead_letter_counts(self) -> dict[str, int]:
        """How many dead letters each consumer has, counted by PostgreSQL."""
        driver = self._require_open()
        rows = await driver.fetch(
            self._sql.dead_letter_counts, operation="counting the dead letters"
        )
        return {row[0]: row[1] for row in rows}

    async def requeue_dead_letters(
        self, consumer: str, seqs: Sequence[int], *, after: float = 0.0
    ) -> list[int]:
        """Hand these letters back ``after`` seconds from now, by the database's clock.

        See `Store.requeue_dead_letters`; one statement.
        """
        return await self._change_letters(
            self._sql.requeue_dead_letters,
            f"requeueing dead letters of consumer {consumer!r}",
            consumer,
            seqs,
            float(after),
        )

    async def due_dead_letters(self, consumer: str) -> list[DeadLetter]:
        """Return ``consumer``'s requeued letters due by the database's clock, by seq."""
        driver = self._require_open()
        rows = await driver.fetch(
            self._sql.due_dead_letters,
            consumer,
            operation=f"looking for due dead letters of consumer {consumer!r}",
        )
        return [_letter(row) for row in rows]

    async def discard_dead_letters(self, consumer: str, seqs: Sequence[int]) -> list[int]:
        """Delete these letters of ``consumer``; return the seqs that existed, ascending."""
        return await self._change_letters(
            self._sql.discard_dead_letters,
            f"discarding dead letters of consumer {consumer!r}",
            consumer,
            seqs,
        )

    async def forget_consumer(self, consumer: str) -> None:
        """Delete ``consumer``'s dead letters and both copies of its cursor, in one statement."""
        driver = self._require_open()
        await driver.execute(
            self._sql.forget_consumer, consumer, operation=f"forgetting consumer {consumer!r}"
        )
        # Should it come back, its first unlogged commit writes a checkpoint at once.
        self._checkpointed_at.pop(consumer, None)

    async def cursors(self) -> list[CursorInfo]:
        """Every stored cursor (the greater of its two copies), by consumer name."""
        driver = self._require_open()
        rows = await driver.fetch(self._sql.cursors, operation="listing the cursors")
        return [CursorInfo(consumer=row[0], seq=row[1], updated_at=row[2]) for row in rows]

    async def set_cursor(self, consumer: str, seq: int) -> int | None:
        """Set ``consumer``'s cursor to ``seq``, backwards too; see `Store.set_cursor`.

        One transaction, which holds the pruning mark's row FOR SHARE while
        it checks ``seq`` against it and writes: a prune waits for it, or it
        for the prune, and then sees the prune's mark.
        """
        driver = self._require_open()
        operation = f"setting the cursor of consumer {consumer!r}"
        async with driver.transaction(operation=operation) as tx:
            pruned_through = await tx.fetchval(self._sql.lock_log_state(prune=False))
            head = await tx.fetchval(self._sql.head)
            check_reset(consumer, seq, head=head, pruned_through=pruned_through)
            previous: int | None = await tx.fetchval(self._sql.cursor_of, consumer)
            await tx.execute(self._sql.set_cursor, consumer, seq)
        self._checkpointed_at.pop(consumer, None)
        return previous

    async def log_bounds(self) -> LogBounds:
        """The first stored sequence number, the head and ``pruned_through``.

        Waits for a prune under way (it takes the pruning mark's row FOR
        SHARE first, in a transaction of its own), so the answer covers every
        prune that started before the call: a consumer that stored its first
        cursor and then reads the bounds learns of any prune that may have
        passed it.
        """
        driver = self._require_open()
        async with driver.transaction(operation="reading the log's bounds") as tx:
            await tx.fetchval(self._sql.lock_log_state(prune=False))
            row = await tx.fetchrow(self._sql.log_bounds)
        assert row is not None
        first, head, pruned_through = row[0], row[1], row[2]
        return LogBounds(
            first=head + 1 if first is None else first, head=head, pruned_through=pruned_through
        )

    async def seq_before(self, time: datetime.datetime) -> int:
        """The highest seq of a stored event committed before ``time``: a binary search on
        the primary key, about log2(head) index seeks; publishing pays nothing for it."""
        driver = self._require_open()
        operation = "looking for the last event before a time"
        when = time.astimezone(datetime.UTC)
        search = search_seq_before(await self.head())
        try:
            seq = next(search)
            while True:
                row = await driver.fetchrow(
                    self._sql.first_at_or_after, seq, when, operation=operation
                )
                seq = search.send(None if row is None else (row[0], row[1]))
        except StopIteration as done:
            found: int = done.value
            return found

    async def prune(self, through: int, *, limit: int) -> int:
        """Delete up to ``limit`` of the oldest events no cursor or letter needs; see
        `Store.prune`.

        One transaction: it locks the pruning mark's row (cursor resets wait
        for it), then deletes by primary key in one statement that checks
        the cursors and letters as they stand once the lock is held.
        Publishers never wait for it: appends take no lock a prune holds.
        See docs/postgres.md, "Retention", for batch sizes and vacuum.
        """
        check_limit(limit)
        driver = self._require_open()
        bound = min(max(through, 0), _MAX_BIGINT)
        operation = f"pruning events up to {through}"
        async with driver.transaction(operation=operation) as tx:
            await tx.fetchval(self._sql.lock_log_state(prune=True))
            deleted: int = await tx.fetchval(self._sql.prune, bound, min(limit, _MAX_BIGINT))
        return deleted

    async def _change_letters(
        self, query: str, operation: str, consumer: str, seqs: Sequence[int], *more: object
    ) -> list[int]:
        """Run ``query`` on the letters of ``consumer`` at ``seqs``; return the seqs it found."""
        return await self._change_letters_on(
            self._require_open(), query, operation, consumer, seqs, *more
        )

    async def _change_letters_on(
        self,
        on: QueryInterface,
        query: str,
        operation: str,
        consumer: str,
        seqs: Sequence[int],
        *more: object,
    ) -> list[int]:
        """`_change_letters` on the pool or in a transaction."""
        # A seq a bigint cannot hold is no letter's: left out rather than failing the call.
        wanted = sorted({seq for seq in seqs if _MIN_BIGINT <= seq <= _MAX_BIGINT})
        if not wanted:
            await trio.lowlevel.checkpoint()
            return []
        rows = await on.fetch(query, consumer, wanted, *more, operation=operation)
        return [row[0] for row in rows]

    async def wait_for_append(self, after: int) -> int:
        """Return the head once it is past ``after``: on NOTIFY, or after a fallback poll.

        The head is read only when another process may have appended (see
        `_stale`); this instance's own appends are known without a query.
        Returns early, with ``after``, when the server cannot be reached.
        """
        self._require_open()
        poll_interval = math.inf if self.poll_interval is None else self.poll_interval
        while True:
            # Take the event before reading the head: an append or notification
            # that lands while the head is read sets this very event, so it
            # cannot be missed.
            appended = self._appended
            if self._known_head > after:
                await trio.lowlevel.checkpoint()
                return self._known_head
            if self._stale:
                self._stale = False
                try:
                    head = await self.head()
                except StoreUnavailableError as exc:
                    # The server is away (restarting, say): wait as a poll
                    # would. The caller's next read reports the outage if it
                    # lasts; failing here would only stop a consumer's wait
                    # loop that has nothing to fix.
                    logger.debug("trioflow: head unavailable while waiting for appends: %s", exc)
                    self._stale = True
                    with trio.move_on_after(poll_interval):
                        await appended.wait()
                    return after
                if head > after:
                    return head
            with trio.move_on_after(poll_interval) as poll:
                await appended.wait()
            if poll.cancelled_caught:
                self._stale = True

    def _require_open(self) -> Driver:
        driver = self._driver
        if driver is None:
            raise StoreError(
                f"{self!r} is not open; call its methods inside `async with store.open():`"
            )
        return driver

    def _wake(self) -> None:
        self._appended.set()
        self._appended = trio.Event()

    def _on_notify(self, pid: int, payload: str) -> None:
        """A notification: an append committed, by us (ignored) or another process.

        Its payload is the batch's last seq (schema version 5): appends hold
        the append lock until they commit, so every batch below it had
        committed (or rolled back) first, and it is a committed head; no
        query needed. An empty or unreadable payload (from an older schema's
        function, or a NOTIFY sent by hand) makes waiters read the head.
        """
        driver = self._driver
        if driver is not None and driver.is_pool_backend(pid):
            return
        # A bigint has at most 19 digits: no int() of a huge string.
        if payload.isascii() and payload.isdecimal() and len(payload) <= 19:
            self._known_head = max(self._known_head, int(payload))
        else:
            self._stale = True
        self._wake()

    def _on_listening(self) -> None:
        """The LISTEN connection is (back) in place."""
        # Notifications sent while we were not listening are lost: let
        # waiters re-read the head.
        self._stale = True
        self._wake()


def _append_args(events: Sequence[NewEvent]) -> tuple[list[object], ...]:
    """The parameters of `Queries.append` for ``events``: ids, types, keys, data."""
    return (
        [event.id for event in events],
        [event.type for event in events],
        [event.key for event in events],
        [event.payload for event in events],
    )


def _appended(row: Record, count: int) -> Appended:
    """What an append of ``count`` events answered (`Queries.append`'s row)."""
    after, first, created_at = row[0], row[1], row[2]
    return Appended(after=after, seqs=range(first, first + count), created_at=created_at)


def _lease(row: Record) -> Lease:
    """A `Lease` from a row of key, holder, token and expiry."""
    return Lease(key=row[0], holder=row[1], token=row[2], expires_at=row[3])


def _letter(row: Record) -> DeadLetter:
    """A `DeadLetter` from a row in `LETTER_COLUMNS` order."""
    return DeadLetter(**dict(zip(LETTER_COLUMNS, row, strict=True)))
