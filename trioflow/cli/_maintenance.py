"""``trioflow migrate`` and ``trioflow prune``: the store's schema, and the log's size."""

from __future__ import annotations

import datetime
import re
import sys
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.progress import Progress

from .._errors import SchemaVersionError
from .._retention import DEFAULT_BATCH_SIZE, PruneProgress, plan_prune, run_prune
from ..stores._base import LogBounds, SchemaStatus, Store
from ._common import (
    ExitCode,
    build_store,
    checks,
    optional,
    run,
    seq_option,
    shown,
    store_command,
    store_option,
)


def _version(status: SchemaStatus) -> str:
    return "none" if status.stored is None else str(status.stored)


def _check_not_newer(store: Store, status: SchemaStatus) -> None:
    if status.stored is not None and status.stored > status.current:
        raise SchemaVersionError(
            f"{shown(store)} has schema version {status.stored}, newer than this trioflow knows "
            f"({status.current}): upgrade trioflow"
        )


@click.command()
@store_option
@click.option(
    "--check",
    is_flag=True,
    help=f"Only say whether a migration is pending; exit {int(ExitCode.PENDING)} if one is.",
)
def migrate(store_url: str | None, check: bool) -> None:
    """Create or migrate the store's schema; print its version before and after.

    Every flow does this when it opens its store; run it to do it ahead of
    a deployment, or with --check to see whether a deployment would.
    """
    store = build_store(store_url)

    async def body() -> None:
        before = await store.schema_status()
        if before is None:
            click.echo(f"{shown(store)} keeps no schema: nothing to migrate")
            return
        _check_not_newer(store, before)
        if check:
            if before.pending:
                click.echo(
                    f"schema version {_version(before)}: a migration to version "
                    f"{before.current} is pending; `trioflow migrate` runs it"
                )
                raise click.exceptions.Exit(ExitCode.PENDING)
            click.echo(f"schema version {before.current}: up to date")
            return
        async with store.open():
            pass
        after = await store.schema_status()
        assert after is not None
        if before.stored == after.stored:
            click.echo(f"schema version {_version(after)}: up to date, nothing to do")
        else:
            click.echo(f"schema version {_version(before)} -> {_version(after)}: migrated")

    run(body)


#: Without a terminal, ``prune`` prints a line of progress at each of this
#: many equal steps of a prune of more than one batch.
PROGRESS_STEPS = 10

#: Seconds per unit of a duration: ``90s``, ``15m``, ``12h``, ``7d``, ``2w``.
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)([smhdw]))+")


if TYPE_CHECKING:
    # Generic in click 8.5's stubs, a plain class before: subscripted for mypy only.
    _ParamType = click.ParamType[datetime.timedelta]
else:
    _ParamType = click.ParamType


class Duration(_ParamType):
    """A duration such as ``7d``, ``12h``, ``1h30m`` or ``90s``."""

    name = "duration"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime.timedelta:
        if isinstance(value, datetime.timedelta):
            return value
        text = str(value).strip().lower()
        if not _DURATION.fullmatch(text):
            self.fail(f"{value!r} is not a duration such as 7d, 12h, 1h30m or 90s", param, ctx)
        seconds = sum(
            float(number) * UNITS[unit]
            for number, unit in re.findall(r"(\d+(?:\.\d+)?)([smhdw])", text)
        )
        return datetime.timedelta(seconds=seconds)


def _check_prune(
    older_than: datetime.timedelta | None, before: int | None, **options: object
) -> None:
    if (older_than is None) == (before is None):
        raise click.UsageError("give --older-than DURATION or --before SEQ (one of them)")


@click.command()
@store_option
@optional(
    "--older-than",
    type=Duration(),
    metavar="DURATION",
    help="Delete the events committed longer ago than this: 7d, 12h, 1h30m, 90s.",
)
@seq_option("--before", help="Delete the events with sequence numbers below SEQ.")
@click.option("--dry-run", is_flag=True, help="Only say what would be deleted.")
@click.option(
    "--only-passed",
    is_flag=True,
    help="Delete only what every consumer's cursor has passed, instead of refusing.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="The most events one store transaction deletes.",
)
@store_command
@checks(_check_prune)
async def prune(
    store: Store,
    older_than: datetime.timedelta | None,
    before: int | None,
    dry_run: bool,
    only_passed: bool,
    batch_size: int,
) -> None:
    """Delete old events that every consumer has passed.

    Never deletes an event a stored cursor still needs, nor one a dead
    letter refers to. Refused, naming them, when consumers' cursors are
    below the bound (exit 4), unless --only-passed.
    """
    plan = await plan_prune(store, before=before, older_than=older_than)
    if plan.behind and not only_passed:
        raise plan.refusal()
    through = plan.safe_through if only_passed else plan.through
    bounds = plan.bounds
    # Sequence numbers may have holes: at most this many events go.
    events = through - max(bounds.pruned_through, bounds.first - 1)
    if events <= 0:
        click.echo(f"nothing to prune: the log holds {_span(bounds)}")
        return
    if dry_run:
        click.echo(
            f"would delete at most {events} event(s), up to seq {through}, of {_span(bounds)}"
        )
        return
    terminal = sys.stderr.isatty()
    with Progress(
        *Progress.get_default_columns(),
        console=Console(stderr=True),
        transient=True,
        disable=not terminal,
    ) as bar:
        task = bar.add_task("pruning", total=events)
        shown = 0

        def advance(progress: PruneProgress) -> None:
            nonlocal shown
            bar.update(task, completed=progress.deleted)
            if terminal or events <= batch_size:
                return
            # No terminal for a bar (a job's log): a line at each tenth of
            # the work, so a long prune shows it is moving, and how far.
            tenth = PROGRESS_STEPS * progress.deleted // events
            if tenth > shown:
                shown = tenth
                click.echo(
                    f"pruning: {progress.deleted} of at most {events} event(s) deleted",
                    err=True,
                )

        result = await run_prune(
            store, plan, only_passed=only_passed, batch_size=batch_size, progress=advance
        )
    click.echo(f"deleted {result.deleted} event(s); the log holds {_span(result.bounds)}")


def _span(bounds: LogBounds) -> str:
    if bounds.first > bounds.head:
        return f"no events (head {bounds.head})"
    return f"seq {bounds.first} to {bounds.head}"
