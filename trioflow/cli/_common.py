"""What every `trioflow` command shares: the store option, running trio, one-line errors.

A command's callback parses nothing itself (click does), opens the store with
`open_store`, and runs its async body with `run`: every `TrioflowError` that
escapes becomes one line on stderr, ``trioflow: error: ...``, and an exit
status that says what kind of failure it was (`ExitCode`), never a traceback.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import IO, Any, TypeVar

import click
import trio

from .._errors import (
    ConfigurationError,
    PrunedLogError,
    StoreUnavailableError,
    TrioflowError,
)
from .._leases import new_holder_id
from ..stores._base import Store
from ..stores._url import DEFAULT_STORE_URL, default_store_url, store_from_url
from ..stores.memory import MemoryStore

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


class ExitCode(enum.IntEnum):
    """The exit statuses of the `trioflow` command, one per kind of outcome."""

    #: It did what was asked.
    OK = 0
    #: It failed: the store refused or failed an operation, or a flow stopped
    #: on a fatal error.
    FAILED = 1
    #: Bad arguments: an unknown option, a malformed store URL, a consumer
    #: the store does not know (click's own usage errors exit 2 as well).
    USAGE = 2
    #: The store cannot be reached or opened, or holds no trioflow store.
    UNAVAILABLE = 3
    #: Refused as unsafe: the consumer runs in a flow (``--force`` overrides),
    #: or pruning would delete events a consumer still needs.
    REFUSED = 4
    #: The store's schema needs a migration: ``trioflow migrate --check`` says
    #: so, and the other commands (but ``run``) refuse to migrate it themselves.
    PENDING = 5


class CommandError(click.ClickException):
    """A failure of a command, shown as one line on stderr with its exit status."""

    def __init__(self, message: str, code: ExitCode = ExitCode.FAILED) -> None:
        super().__init__(one_line(message))
        # click types it as a class variable; per instance it is what click exits with.
        self.exit_code = int(code)  # type: ignore[misc]

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"trioflow: error: {self.format_message()}", file=file or sys.stderr)


def one_line(message: str) -> str:
    """``message`` with its line breaks and runs of blanks made single spaces."""
    return re.sub(r"\s+", " ", message).strip()


def exit_code_of(error: TrioflowError) -> ExitCode:
    """The exit status a command ends with when ``error`` escapes it."""
    if isinstance(error, StoreUnavailableError):
        return ExitCode.UNAVAILABLE
    if isinstance(error, PrunedLogError):
        return ExitCode.REFUSED
    if isinstance(error, ConfigurationError):
        return ExitCode.USAGE
    return ExitCode.FAILED


def run(body: Callable[[], Awaitable[T]]) -> T:
    """Run ``body`` with trio; turn trioflow's errors and Ctrl+C into a clean exit.

    Raises:
        CommandError: A `TrioflowError` escaped ``body``.
        click.exceptions.Exit: Interrupted (status 130, as shells report SIGINT).
    """
    try:
        try:
            return trio.run(body)
        except BaseExceptionGroup as group:
            # A nursery wraps what crosses it: one error is that error.
            sole = sole_error(group)
            if sole is group:
                raise
            raise sole from None
    except TrioflowError as exc:
        raise CommandError(str(exc), exit_code_of(exc)) from None
    except KeyboardInterrupt:
        raise click.exceptions.Exit(130) from None


def sole_error(error: BaseException) -> BaseException:
    """The one exception inside nested exception groups of one each, else ``error``."""
    found = error
    while isinstance(found, BaseExceptionGroup) and len(found.exceptions) == 1:
        found = found.exceptions[0]
    return error if isinstance(found, BaseExceptionGroup) else found


def store_option(command: F) -> F:
    """The ``--store URL`` option every command takes."""
    return click.option(
        "--store",
        "store_url",
        metavar="URL",
        default=None,
        help=(
            "The store: sqlite:///path.db, postgresql://user@host/db. "
            f"Default: $TRIOFLOW_STORE, else {DEFAULT_STORE_URL}."
        ),
    )(command)


def optional(*declarations: str, type: Any, metavar: str, help: str) -> Callable[[F], F]:
    """A click option without a default (None when not given)."""
    return click.option(*declarations, type=type, default=None, metavar=metavar, help=help)


def seq_option(*declarations: str, help: str) -> Callable[[F], F]:
    """An option taking a sequence number (>= 1), None when not given."""
    return optional(*declarations, type=click.IntRange(min=1), metavar="SEQ", help=help)


def store_url_or_default(url: str | None) -> str:
    """The store URL a command uses: ``--store``, else $TRIOFLOW_STORE, else the default."""
    return default_store_url() if url is None else url


def build_store(url: str | None) -> Store:
    """The store a command names (not opened yet).

    Raises:
        CommandError: The URL is malformed or names no store trioflow knows.
    """
    try:
        return store_from_url(store_url_or_default(url))
    except TrioflowError as exc:
        raise CommandError(str(exc), exit_code_of(exc)) from None


@contextlib.asynccontextmanager
async def open_store(store: Store) -> AsyncIterator[Store]:
    """Open ``store`` for a command, refusing one that holds no trioflow schema.

    Only ``trioflow migrate`` (and any flow) creates a schema: a mistyped URL
    or path would otherwise leave an empty store behind, and the command would
    report an empty one instead of the mistake. Nor does it migrate an older
    schema: that is for ``trioflow migrate``, at a time the operator chooses.

    Raises:
        CommandError: The store holds no trioflow schema, or an older one.
        StoreUnavailableError: The store cannot be reached or opened.
    """
    status = await store.schema_status()
    if status is not None and status.stored is None:
        raise CommandError(
            f"{shown(store)} holds no trioflow store (no flow ever opened it): check --store "
            "or $TRIOFLOW_STORE; `trioflow migrate` creates one",
            ExitCode.UNAVAILABLE,
        )
    if status is not None and status.pending:
        # Opening would migrate it: a look at a store (status, tail) must not
        # change its schema under the flows of an older trioflow that run on it.
        raise CommandError(
            f"{shown(store)} has schema version {status.stored}, older than this trioflow's "
            f"({status.current}); commands other than run and migrate never migrate it: run "
            "`trioflow migrate` when the store's flows are upgraded, or use the trioflow "
            "they run",
            ExitCode.PENDING,
        )
    async with store.open():
        yield store


def checks(
    check: Callable[..., None],
) -> Callable[[Callable[..., Awaitable[None]]], Callable[..., Awaitable[None]]]:
    """Give a `store_command` function a check of its options, run before the store opens.

    ``check`` takes the same options (without the store) and raises
    `click.UsageError` for a bad combination.
    """

    def decorate(function: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        function.check = check  # type: ignore[attr-defined]
        return function

    return decorate


def shown(store: Store) -> str:
    """The store as messages name it (a PostgreSQL store's password masked)."""
    return "memory://" if isinstance(store, MemoryStore) else repr(store)


def cli_holder() -> str:
    """The lease holder id of this command: a flow's, marked as the command's."""
    return f"trioflow-cli:{new_holder_id()}"


def store_command(
    function: Callable[..., Awaitable[None]],
) -> Callable[..., None]:
    """Make an async ``function(store, **options)`` a click callback taking ``store_url``.

    The callback builds the store from the option, opens it (`open_store`)
    and runs the function in it with `run`. A
    function's ``check`` attribute, if set (`checks`), sees the options
    first: bad arguments are refused before any store is touched.
    """

    @functools.wraps(function)
    def callback(store_url: str | None, **options: Any) -> None:
        check: Callable[..., None] | None = getattr(function, "check", None)
        if check is not None:
            check(**options)
        store = build_store(store_url)
        if isinstance(store, MemoryStore):
            # It would look at a new, empty store of its own, and report that.
            raise CommandError(
                "memory:// is a store inside one process, which this command cannot see: "
                "name the store the App uses (sqlite:///path.db, postgresql://...)",
                ExitCode.USAGE,
            )

        async def body() -> None:
            async with open_store(store) as opened:
                await function(opened, **options)

        run(body)

    return callback


class OneLineGroup(click.Group):
    """A click group whose usage errors (its own and its subcommands') are one
    line, ``trioflow: error: ...``, with `ExitCode.USAGE`, like every other error."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        with _one_line_usage():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_usage():
            return super().invoke(ctx)


@contextlib.contextmanager
def _one_line_usage() -> Iterator[None]:
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise
    except click.UsageError as exc:
        path = exc.ctx.command_path if exc.ctx is not None else "trioflow"
        raise CommandError(
            f"{exc.format_message()} (see `{path} --help`)", ExitCode.USAGE
        ) from None
