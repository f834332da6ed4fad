"""``trioflow migrate`` and ``trioflow prune``: the store's schema, and the log's size."""

from __future__ import annotations

import click

from .._errors import SchemaVersionError
from ..stores._base import SchemaStatus, Store
from ._common import ExitCode, build_store, run, shown, store_option


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
