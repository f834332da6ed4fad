"""The PostgreSQL driver bridge: asyncpg, run from trio through trio-asyncio.

Layers, each depending only on the one below: the store
(`trioflow.stores.postgres`) -> this module -> asyncpg on a trio-asyncio event
loop (made lean by `trioflow.stores._aio_loop`). This and that module are the
only ones of trioflow that import asyncpg or trio_asyncio, and this is the only place where their
exceptions are seen: `map_exceptions` turns them into
`trioflow.StoreError` and its subclasses at one boundary.

Every coroutine that touches the database runs as one asyncio task on the
store's own trio-asyncio loop, started and awaited by `Driver._call`. Cancelling
the trio task cancels that asyncio task; asyncpg then sends PostgreSQL a cancel
request, and before the trio task sees `trio.Cancelled` the connection is rolled
back (which waits for the cancel request to be acknowledged) or, if that takes
longer than ``cleanup_timeout``, closed. So a cancelled call returns promptly
and never leaves a connection inside an open transaction.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from typing import Any, TypeAlias, TypeVar, cast

import asyncpg
import attrs
import trio
import trio_asyncio  # type: ignore[import-untyped]

from ..._errors import (
    ConfigurationError,
    QueryError,
    StoreError,
    StoreUnavailableError,
    TrioflowError,
)
from .._aio_loop import open_lean_loop
from .._masking import dsn_secrets, mask_dsn, scrub

__all__ = [
    "Driver",
    "DriverConfig",
    "InDoubtError",
    "QueryInterface",
    "Record",
    "StatementTimeoutError",
    "Transaction",
    "exception_chain",
    "map_exceptions",
    "open_driver",
    "shorten",
    "simplify_group",
]

#: A result row: indexable by position and by column name.
Record: TypeAlias = asyncpg.Record

_T = TypeVar("_T")


@attrs.frozen(kw_only=True)
class DriverConfig:
    """How to reach PostgreSQL and how to size and bound the connection pool.

    Attributes:
        dsn: A libpq-style ``postgresql://`` URL that asyncpg understands (no
            trioflow options left in it). Never shown: not even in ``repr()``.
        display: The same URL with its secrets masked, for messages (by
            default, made from ``dsn``).
        min_size: Connections opened eagerly when the pool starts.
        max_size: Most connections the pool holds at once (the LISTEN
            connection is extra).
        connect_timeout: Seconds to wait for a new connection.
        command_timeout: Seconds any one statement may run, or None for no limit.
        cleanup_timeout: Seconds a rollback, cancellation or release may take
            before the connection is closed instead: the bound on how long a
            cancelled call can take to return.
        statement_cache_size: Prepared statements kept per connection (0 turns
            the cache off, as transaction-mode poolers such as PgBouncer need).
        server_settings: Session settings sent when connecting.
        read_committed: Make READ COMMITTED the default isolation of every
            pooled connection, whatever the role's or database's default.
        secrets: The secret values in ``dsn`` (made from it), blotted out of
            the driver's error messages should they echo one.
    """

    dsn: str = attrs.field(repr=False)
    display: str = attrs.field(
        default=attrs.Factory(lambda self: mask_dsn(self.dsn), takes_self=True)
    )
    min_size: int = 1
    max_size: int = 10
    connect_timeout: float = 10.0
    command_timeout: float | None = None
    cleanup_timeout: float = 5.0
    statement_cache_size: int = 100
    server_settings: Mapping[str, str] = attrs.field(factory=dict)
    read_committed: bool = False
    secrets: tuple[str, ...] = attrs.field(
        repr=False, default=attrs.Factory(lambda self: dsn_secrets(self.dsn), takes_self=True)
    )


class StatementTimeoutError(StoreUnavailableError):
    """A statement ran longer than ``command_timeout`` and was cancelled.

    The server was reached and took the statement: something kept it from
    finishing (most often a lock held by another transaction). The message
    names the operation, the limit and where to look.
    """


@contextlib.contextmanager
def map_exceptions(
    config: DriverConfig, operation: str | None = None, *, query: str | None = None
) -> Iterator[None]:
    """Translate asyncpg's and the socket layer's exceptions into trioflow's.

    `trio.Cancelled` and other BaseExceptions pass through untouched. The
    messages show the server's URL with its secrets masked, and the original
    exception (kept as ``__cause__``) has any secret of the DSN that its text
    echoes blotted out, so that no traceback or log shows one.

    Args:
        config: The driver's configuration (the URL to show, the secrets to
            hide, the timeouts to name).
        operation: What the statement was doing, for example ``"reading
            events"``; None while connecting.
        query: A user's statement (a store transaction's): PostgreSQL
            refusing it raises `QueryError` naming it, not a StoreError.
    """
    try:
        yield
    except StoreError:
        raise
    except Exception as exc:
        error: Exception | None = None
        if query is not None:
            error = _refusal(exc, config, query)
        if error is None:
            error = _translate(exc, config, operation)
        if error is None:
            raise
        if config.secrets:
            _scrub_chain(exc, config.secrets)
        raise error from exc


#: Server errors that are no refusal of a user's statement: the connection, the
#: server or an administrator failed it (a cancelled statement is a timeout).
_NOT_REFUSALS = (
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.InsufficientResourcesError,
    asyncpg.PostgresSystemError,
    asyncpg.InternalServerError,
)


def _refusal(exc: Exception, config: DriverConfig, query: str) -> QueryError | None:
    """The `QueryError` for PostgreSQL (or asyncpg, for its arguments) refusing ``query``."""
    if isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, _NOT_REFUSALS):
        said = f"{exc} ({type(exc).__name__}, SQLSTATE {exc.sqlstate})"
        for extra in (exc.detail, exc.hint):
            if extra:
                said += f"; {extra}"
    elif isinstance(exc, asyncpg.InterfaceError) and str(exc).startswith("the server expects"):
        # Too many or too few arguments: found by asyncpg before sending.
        said = str(exc)
    else:
        return None
    return QueryError(
        f"PostgreSQL refused the statement {shorten(query)!r}: {scrub(said, config.secrets)}",
        query=query,
    )


def shorten(query: str, width: int = 120) -> str:
    """``query`` on one line, cut to ``width`` characters, for messages."""
    line = " ".join(query.split())
    return line if len(line) <= width else line[: width - 3] + "..."


def _translate(exc: Exception, config: DriverConfig, operation: str | None) -> TrioflowError | None:
    """The trioflow error for ``exc``, or None when it is not the driver's to translate."""
    display = config.display
    detail = scrub(str(exc), config.secrets)
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return StoreUnavailableError(
            f"PostgreSQL at {display}: {detail}; create the database (for example with "
            "createdb) or fix the database name in the store URL"
        )
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        return StoreUnavailableError(
            f"PostgreSQL at {display} refused the login: {detail}; check the user and password "
            "in the store URL (or its passfile) and the server's pg_hba.conf"
        )
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return StoreError(
            f"PostgreSQL at {display}: permission denied: {detail}; grant the role the missing "
            "privilege, or have a role that holds it open the store once to create the schema"
        )
    if isinstance(exc, asyncpg.TooManyConnectionsError):
        return StoreUnavailableError(
            f"PostgreSQL at {display} has no connection slots left: {detail}; lower the pool "
            "size (pool_max_size) or raise the server's max_connections"
        )
    if isinstance(exc, asyncpg.QueryCanceledError):
        return StoreError(
            f"PostgreSQL at {display} cancelled a statement ({operation or 'connecting'}): "
            f"{detail}; a statement_timeout or an administrator (pg_cancel_backend) stopped "
            "it: retry, or raise the limit"
        )
    if isinstance(exc, asyncpg.PostgresConnectionError | asyncpg.OperatorInterventionError):
        return StoreUnavailableError(
            f"lost the connection to PostgreSQL at {display}: {detail}; "
            "retry once the server is back"
        )
    if isinstance(exc, asyncpg.DataError):
        return StoreError(
            f"PostgreSQL at {display} cannot store a value: {detail}; text must be valid "
            "UTF-8 without NUL characters (also no \\u0000 escapes in JSON data)"
        )
    if isinstance(exc, asyncpg.PostgresError):
        return StoreError(
            f"PostgreSQL at {display} failed: {type(exc).__name__} "
            f"(SQLSTATE {exc.sqlstate}): {detail}"
        )
    if isinstance(exc, asyncpg.exceptions.ClientConfigurationError):
        # An option of the URL asyncpg checks as it connects (sslmode=...):
        # the URL is wrong, not the server, and retrying cannot help.
        return ConfigurationError(
            f"store URL {display}: {detail}; fix that option in the store URL"
        )
    if isinstance(exc, asyncpg.InterfaceError):
        if "closed" in detail or "not connected" in detail:
            return StoreUnavailableError(
                f"the connection to PostgreSQL at {display} is closed ({detail}); "
                "retry once the server is back"
            )
        return StoreError(f"the PostgreSQL driver failed talking to {display}: {detail}")
    if isinstance(exc, TimeoutError):
        return _timeout_error(config, operation)
    if isinstance(exc, OSError):
        return StoreUnavailableError(
            f"cannot connect to PostgreSQL at {display}: {detail}; start the server, or fix "
            "the host and port in the store URL"
        )
    if isinstance(exc, asyncpg.InternalClientError | ValueError):
        return StoreError(f"the PostgreSQL driver failed talking to {display}: {detail}")
    return None


def _timeout_error(config: DriverConfig, operation: str | None) -> StoreError:
    display = config.display
    if operation is None:
        return StoreUnavailableError(
            f"PostgreSQL at {display} did not answer within connect_timeout="
            f"{config.connect_timeout:g}s; check that the server is up and reachable, or "
            "raise connect_timeout in the store URL"
        )
    limit = (
        "in time"
        if config.command_timeout is None
        else f"within {config.command_timeout:g}s (the store's command_timeout)"
    )
    return StatementTimeoutError(
        f"{operation} did not finish {limit} on PostgreSQL at {display}, and was cancelled: "
        "the server took the statement but it could not complete. Most often another "
        "transaction holds a lock it waits for: look for long-running or 'idle in "
        "transaction' sessions in pg_stat_activity, and for ungranted locks in pg_locks "
        "(pg_blocking_pids() names who blocks whom); else the server is overloaded. Raise "
        "command_timeout in the store URL if such waits are expected"
    )


# Attributes of exceptions that hold text shown by str() or in a traceback
# besides ``args`` (OSError's, and the fields of asyncpg's server errors).
_TEXT_ATTRIBUTES = ("strerror", "filename", "filename2", "message", "detail", "hint")


def _scrub_chain(error: BaseException, secrets: tuple[str, ...]) -> None:
    """Blot ``secrets`` out of the text of ``error`` and every exception chained to it.

    The exceptions are the driver's own, raised by this call: changing them
    in place is the only way to keep a secret that one echoes out of every
    traceback that shows the chain.
    """
    for exc in exception_chain(error):
        exc.args = tuple(scrub(arg, secrets) if isinstance(arg, str) else arg for arg in exc.args)
        for name in _TEXT_ATTRIBUTES:
            value = getattr(exc, name, None)
            if isinstance(value, str):
                with contextlib.suppress(AttributeError, TypeError):
                    setattr(exc, name, scrub(value, secrets))


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and every exception chained to it (causes, contexts), each once."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        exc = pending.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        yield exc
        pending += [exc.__cause__, exc.__context__]


class InDoubtError(StoreUnavailableError):
    """The connection failed after a write was sent: it may or may not have committed.

    Raised by `Driver.fetchrow_write` and by the COMMIT of `Driver.transaction`,
    where PostgreSQL may have committed (and the commit survives a server
    crash) although its answer never arrived. The store resolves it by
    looking for what it wrote once it can reach the server again.

    Its ``__cause__`` is what went wrong: a `StatementTimeoutError` when the
    statement (or COMMIT) ran past ``command_timeout``, else the lost
    connection.
    """

    @property
    def timed_out(self) -> bool:
        """Whether the write ran past ``command_timeout`` (the server was reachable)."""
        return isinstance(self.__cause__, StatementTimeoutError)


class _NeverSent(Exception):
    """A statement failed before it was sent: `Driver._run` tries another connection."""


def _never_sent(error: StoreError) -> bool:
    """Whether ``error`` came from a connection that could not send anything.

    asyncpg checks its connection before it writes a statement: a connection
    already closed, or one that received a FATAL error while idle and is
    waiting for the close that follows ("another operation is in progress"),
    fails at once.
    """
    cause = error.__cause__
    if isinstance(cause, asyncpg.InternalClientError):
        return "another operation" in str(cause)
    if isinstance(cause, asyncpg.InterfaceError):
        return str(cause) == "connection is closed"
    return False


_Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record]"

#: How errors name a statement whose caller did not say what it does.
_STATEMENT = "a statement"

#: The failures of a sent write that leave its outcome unknown.
_IN_DOUBT = (StoreUnavailableError, StatementTimeoutError)


class QueryInterface(abc.ABC):
    """The query API, written once for the pool (`Driver`) and a transaction (`Transaction`).

    Every method takes ``operation``: what the statement does, as errors name
    it ("reading events"), so that a statement timeout or a lost connection
    says which operation failed; None names it by the implementation's
    default (`_operation`). Each implementation says once, in `_run`, where
    a statement runs: the pool lends a connection for it (its own implicit
    transaction), a transaction runs it on the connection it holds. Errors
    and timeouts are translated on the way back (`Driver._call`).
    """

    __slots__ = ()

    #: How errors name a statement whose caller did not say what it does.
    _operation: str = _STATEMENT
    #: Whether the statements are a user's (see `Transaction.users`).
    _users: bool = False

    @abc.abstractmethod
    async def _run(
        self,
        statement: Callable[[_Connection], Coroutine[Any, Any, _T]],
        operation: str,
        *,
        query: str | None = None,
    ) -> _T:
        """Run ``statement`` on a connection; translate its errors, naming ``operation``.

        ``query``: the user's statement, which a refusal names (`map_exceptions`).
        """

    async def _query(
        self,
        statement: Callable[[_Connection], Coroutine[Any, Any, _T]],
        query: str | None,
        operation: str | None,
    ) -> _T:
        """The path of every query method: name the operation, then `_run` the statement."""
        users = query if self._users else None
        if operation is None:
            operation = (
                self._operation
                if users is None
                else f"the transaction's statement {shorten(users)!r}"
            )
        return await self._run(statement, operation, query=users)

    async def execute(self, query: str, *args: object, operation: str | None = None) -> str:
        """Run a statement; return its status tag (for example ``"INSERT 0 5"``)."""
        return await self._query(
            lambda connection: connection.execute(query, *args), query, operation
        )

    async def fetch(self, query: str, *args: object, operation: str | None = None) -> list[Record]:
        """Run a query and return all of its rows."""
        return await self._query(
            lambda connection: connection.fetch(query, *args), query, operation
        )

    async def fetchrow(
        self, query: str, *args: object, operation: str | None = None
    ) -> Record | None:
        """Run a query and return its first row, or None when it has none."""
        return await self._query(
            lambda connection: connection.fetchrow(query, *args), query, operation
        )

    async def fetchval(self, query: str, *args: object, operation: str | None = None) -> Any:
        """Run a query and return the first column of its first row (None if no row)."""
        return await self._query(
            lambda connection: connection.fetchval(query, *args), query, operation
        )

    async def executemany(
        self, query: str, args: Iterable[Sequence[object]], *, operation: str | None = None
    ) -> None:
        """Run a statement once per argument tuple, pipelined."""
        rows = list(args)
        await self._query(lambda connection: connection.executemany(query, rows), query, operation)

    async def copy_records(
        self,
        table: str,
        *,
        schema: str,
        columns: Sequence[str],
        records: Iterable[Sequence[object]],
        operation: str | None = None,
    ) -> str:
        """Bulk-insert rows with COPY (binary); return the status tag."""
        rows = list(records)
        return await self._query(
            lambda connection: connection.copy_records_to_table(
                table, records=rows, columns=columns, schema_name=schema
            ),
            None,
            operation,
        )


@attrs.define(eq=False)
class Driver(QueryInterface):
    """Statements on a pool of asyncpg connections, callable from trio.

    Each query method (`QueryInterface`) takes a pooled connection, runs one
    statement in its own implicit transaction, and puts the connection back. Use `transaction` to
    run several statements atomically. Built by `open_driver`.

    The pool lives on the trio side: taking and returning a connection are
    plain trio operations, and only the statements themselves cross into
    asyncio. (asyncpg's own pool runs every acquire and release as asyncio
    tasks plus a reset query, which through trio-asyncio doubled the cost of
    a small statement.) Each connection keeps asyncpg's prepared-statement
    cache. A connection whose statement failed or was cancelled is rolled back
    before reuse (which also waits for a cancel request to be acknowledged),
    or closed if that does not finish within ``cleanup_timeout``.
    """

    _loop: Any
    _config: DriverConfig
    _slots: trio.Semaphore
    _idle: list[_Connection] = attrs.Factory(list)
    _busy: set[_Connection] = attrs.Factory(set)

    @property
    def config(self) -> DriverConfig:
        """The configuration this driver was opened with."""
        return self._config

    async def fetchrow_write(
        self, query: str, *args: object, operation: str | None = None
    ) -> Record | None:
        """`fetchrow` for a statement that writes, telling an unsent one from one in doubt.

        Raises:
            StoreUnavailableError: No connection could be made: nothing was sent.
            InDoubtError: The connection failed, or the statement ran past
                ``command_timeout``, once it was sent; its implicit
                transaction may have committed.
            StoreError: PostgreSQL refused or failed the statement: it was
                rolled back.
        """
        return await self._run(
            lambda connection: connection.fetchrow(query, *args),
            operation or self._operation,
            in_doubt_when_lost=True,
        )

    async def _run(
        self,
        statement: Callable[[_Connection], Coroutine[Any, Any, _T]],
        operation: str,
        *,
        query: str | None = None,
        in_doubt_when_lost: bool = False,
    ) -> _T:
        """Run one statement on a pooled connection, in its own implicit transaction.

        A pooled connection that the server ended while it sat idle (a server
        shutdown sends a FATAL error, then closes) can look open until the close
        arrives; a statement on it fails before anything is sent. Such a
        connection is dropped and the statement runs on another, as on a
        connection found closed: at most once per pooled connection, then on a
        new one.

        With ``in_doubt_when_lost``, losing the connection once the statement
        was sent, or the statement running past ``command_timeout``, raises
        `InDoubtError`.
        """
        tries = self._config.max_size + 1
        while True:
            tries -= 1
            try:
                async with self._connection() as connection:
                    try:
                        return await self._call(statement(connection), operation, query=query)
                    except StoreError as exc:
                        if _never_sent(exc):
                            if tries > 0:
                                raise _NeverSent from exc
                        elif in_doubt_when_lost and type(exc) in _IN_DOUBT:
                            raise InDoubtError(str(exc)) from exc
                        raise
            except _NeverSent:
                # The connection is closed by now (rolling it back failed).
                continue

    @contextlib.asynccontextmanager
    async def transaction(self, *, operation: str = _STATEMENT) -> AsyncIterator[Transaction]:
        """Hold one pooled connection inside a transaction for the block.

        Commits when the block ends normally. On an exception or cancellation
        it rolls back (shielded, for at most ``cleanup_timeout``; a connection
        that cannot roll back in time is closed, which makes PostgreSQL abort
        the transaction) and re-raises. The commit itself is shielded from
        cancellation for at most ``cleanup_timeout``, so that once the block
        has finished the outcome is known: if the commit did not finish in
        that time, or the connection failed during it, `InDoubtError` says
        the outcome is unknown.

        Args:
            operation: What the transaction does, as errors name it (the
                default of its statements' own ``operation``).

        Yields:
            The transaction; use it from one task at a time.
        """
        async with self._connection() as connection:
            await self._call(connection.execute("BEGIN"), operation)
            yield Transaction(driver=self, connection=connection, operation=operation)
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self._config.cleanup_timeout
                try:
                    status = await self._call(connection.execute("COMMIT"), operation)
                except InDoubtError:
                    raise
                except StoreUnavailableError as exc:
                    raise InDoubtError(
                        f"{exc} (during COMMIT: whether the transaction committed is unknown)"
                    ) from exc
            if scope.cancelled_caught:
                raise InDoubtError(
                    f"PostgreSQL at {self._config.display} did not confirm a COMMIT within "
                    f"{self._config.cleanup_timeout}s: whether the transaction committed is "
                    "unknown; check the server, then retry what is safe to retry"
                )
            if status != "COMMIT":
                # The answer to the COMMIT of a transaction that a failed
                # statement aborted (its error caught inside the block).
                raise StoreError(
                    f"PostgreSQL at {self._config.display} rolled back a transaction instead of "
                    f"committing it ({operation}): one of its statements had failed"
                )

    async def listen(
        self,
        channel: str,
        on_notify: Callable[[int, str], None],
        *,
        on_listening: Callable[[], None],
        ping_interval: float,
    ) -> None:
        """LISTEN on ``channel`` on a dedicated connection until it fails.

        Calls ``on_listening()`` once the LISTEN is in place and
        ``on_notify(pid, payload)`` for every notification, with the process id
        of the server backend that sent it and its payload (both synchronously,
        in the trio thread). Sends a ping every ``ping_interval`` seconds so
        that a silently dead connection is noticed. Never returns normally.

        Raises:
            StoreUnavailableError: The connection was lost or could not be made.
        """
        config = self._config
        connection = await self._connect(listen=True)
        lost = trio.Event()

        def on_termination(_connection: object) -> None:
            lost.set()

        def on_notification(_connection: object, pid: int, _channel: str, payload: object) -> None:
            # asyncpg hands over the payload as text ("" when there is none).
            on_notify(pid, payload if isinstance(payload, str) else "")

        try:
            connection.add_termination_listener(on_termination)
            await self._call(
                connection.add_listener(channel, on_notification), "starting to LISTEN"
            )
            on_listening()
            while True:
                with trio.move_on_after(ping_interval):
                    await lost.wait()
                    raise StoreUnavailableError(
                        f"the LISTEN connection to PostgreSQL at {config.display} was closed"
                    )
                with trio.fail_after(config.connect_timeout):
                    await self._call(connection.execute("SELECT 1"), "pinging the server")
        except trio.TooSlowError:
            raise StoreUnavailableError(
                f"the LISTEN connection to PostgreSQL at {config.display} stopped answering"
            ) from None
        finally:
            await self._close_shielded(connection)

    def is_pool_backend(self, pid: int) -> bool:
        """Whether ``pid`` is the server process of one of this pool's open connections.

        (A notification's sender, say: this driver's own statement.)
        """
        return any(
            not connection.is_closed() and connection.get_server_pid() == pid
            for connection in itertools.chain(self._idle, self._busy)
        )

    async def _call(
        self, coro: Coroutine[Any, Any, _T], operation: str | None, *, query: str | None = None
    ) -> _T:
        """Run an asyncio coroutine on the driver's loop; translate its errors.

        ``operation`` names what it does in errors (None: connecting);
        ``query`` is a user's statement (see `map_exceptions`).
        """
        with map_exceptions(self._config, operation, query=query):
            try:
                return cast(_T, await self._loop.run_aio_coroutine(coro))
            except asyncio.CancelledError:
                # Cancelled on the asyncio side without a trio cancellation:
                # only the loop shutting down does that.
                raise StoreUnavailableError(
                    "the PostgreSQL store was closed while a call was running; "
                    "use the store only inside its `async with store.open()` block"
                ) from None

    async def _connect(self, *, listen: bool = False) -> _Connection:
        connection: _Connection = await self._call(_connect(self._config, listen=listen), None)
        return connection

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[_Connection]:
        """Lend a pooled connection for the block; settle or close it if the block fails."""
        async with self._slots:
            connection = None
            while self._idle:
                candidate = self._idle.pop()
                if not candidate.is_closed():
                    connection = candidate
                    break
            if connection is None:
                connection = await self._connect()
            self._busy.add(connection)
            try:
                yield connection
            except BaseException:
                await self._settle(connection)
                raise
            finally:
                self._busy.discard(connection)
            self._idle.append(connection)

    async def _settle(self, connection: _Connection) -> None:
        """Make a connection whose block failed reusable (rolled back), or close it."""
        if not connection.is_closed():
            with trio.CancelScope(shield=True) as scope:
                # ROLLBACK first waits for any pending cancel request to be
                # acknowledged, then ends whatever transaction is open.
                scope.deadline = trio.current_time() + self._config.cleanup_timeout
                try:
                    await self._call(
                        connection.execute("ROLLBACK", timeout=self._config.cleanup_timeout),
                        "rolling back",
                    )
                except Exception:
                    connection.terminate()
            if scope.cancelled_caught:
                connection.terminate()
        if not connection.is_closed():
            self._idle.append(connection)

    async def _close_shielded(self, connection: _Connection) -> None:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self._config.cleanup_timeout
            with contextlib.suppress(Exception):
                await self._call(connection.close(timeout=self._config.cleanup_timeout), "closing")
        if not connection.is_closed():
            connection.terminate()

    async def _open(self) -> None:
        """Open ``min_size`` connections, so that a bad server fails now."""
        for _ in range(self._config.min_size):
            self._idle.append(await self._connect())

    async def _close(self) -> None:
        """Close every connection: politely when idle, at once when still lent."""
        for connection in list(self._busy):
            connection.terminate()
        idle, self._idle = self._idle, []
        async with trio.open_nursery() as nursery:
            for connection in idle:
                nursery.start_soon(self._close_shielded, connection)


async def _connect(config: DriverConfig, *, listen: bool) -> _Connection:
    connection = await asyncpg.connect(
        config.dsn,
        timeout=config.connect_timeout,
        command_timeout=config.command_timeout,
        # The LISTEN connection runs no statements worth preparing.
        statement_cache_size=0 if listen else config.statement_cache_size,
        server_settings=dict(config.server_settings),
    )
    if config.read_committed and not listen:
        try:
            # Checked rather than sent as a startup parameter, which poolers
            # such as PgBouncer refuse; almost every server already has it.
            level = await connection.fetchval(
                "SELECT current_setting('default_transaction_isolation')"
            )
            if level != "read committed":
                await connection.execute("SET default_transaction_isolation TO 'read committed'")
        except BaseException:
            connection.terminate()
            raise
    return connection


@attrs.define(eq=False)
class Transaction(QueryInterface):
    """Statements on the one connection of a `Driver.transaction` block.

    Valid only inside that block, and for one task at a time: the connection
    goes back to the pool when the block ends.
    """

    _driver: Driver
    _connection: _Connection
    #: What the transaction does: its statements' default ``operation``.
    _operation: str = _STATEMENT
    _users: bool = False

    def users(self) -> Transaction:
        """This transaction, for a user's statements (a store transaction's).

        PostgreSQL refusing one of them (bad SQL, a constraint, a type...)
        raises `trioflow.QueryError` naming it, and a timeout or lost
        connection names it as the operation.
        """
        return attrs.evolve(self, users=True)

    async def _run(
        self,
        statement: Callable[[_Connection], Coroutine[Any, Any, _T]],
        operation: str,
        *,
        query: str | None = None,
    ) -> _T:
        return await self._driver._call(statement(self._connection), operation, query=query)


@contextlib.asynccontextmanager
async def open_driver(config: DriverConfig) -> AsyncIterator[Driver]:
    """Start a trio-asyncio loop and a connection pool; close both on exit.

    The store always runs its own loop, even when the caller is already inside
    a ``trio_asyncio.open_loop()`` block: its asyncio tasks then end with the
    store, whatever the caller's loop does. The caller's notion of the current
    loop is left as it was, so asyncio code the caller runs inside the block
    keeps using the caller's loop, not one that closes with the store.

    Raises:
        StoreUnavailableError: The server cannot be reached or refused the login.
    """
    outer_loop = trio_asyncio.current_loop.get()
    body_error: BaseException | None = None
    error: BaseException | None = None
    try:
        async with open_lean_loop() as loop:
            token = trio_asyncio.current_loop.set(outer_loop)
            try:
                driver = Driver(loop=loop, config=config, slots=trio.Semaphore(config.max_size))
                try:
                    await driver._open()
                    try:
                        yield driver
                    except BaseException as exc:
                        body_error = exc
                        raise
                finally:
                    with trio.CancelScope(shield=True) as scope:
                        scope.deadline = trio.current_time() + config.cleanup_timeout
                        await driver._close()
            finally:
                trio_asyncio.current_loop.reset(token)
    except BaseExceptionGroup as group:
        # trio-asyncio's loop runs the block inside nurseries, which wrap
        # whatever crosses them in exception groups; callers expect the
        # block's own exception, or the one StoreError that made opening fail.
        error = simplify_group(group, body_error)
        if error is group:
            raise
    if error is not None:
        # Raised outside the except clause, so it is not chained to the group.
        raise error


def simplify_group(
    group: BaseExceptionGroup[BaseException], body_error: BaseException | None
) -> BaseException:
    """Pick the exception to raise for a group that crossed a context manager.

    Args:
        group: What came out of the nurseries.
        body_error: The exception the ``async with`` block raised, if any.

    Returns:
        ``body_error`` if the group holds it, else the group's only leaf
        exception, else the group itself.
    """
    leaves = _leaves(group)
    if body_error is not None and any(leaf is body_error for leaf in leaves):
        return body_error
    if len(leaves) == 1:
        return leaves[0]
    return group


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for sub in error.exceptions for leaf in _leaves(sub)]
    return [error]
