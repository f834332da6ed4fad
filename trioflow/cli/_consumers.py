"""``trioflow consumers reset|remove``: move or delete a consumer's durable cursor.

A flow running the consumer holds its lease, and every cursor write it makes
is fenced by the lease's token. So the command first claims the consumer's
lease (each partition's, for a group) as a holder of its own: while it holds
it, no flow handles the consumer. With ``--force`` it takes the lease over
from the flow that holds it (releasing it on that flow's behalf, then
claiming it), which gives the lease a new token: the old owner's fenced writes
are refused from then on, it stops handling the consumer, and when it takes the
lease back (after the command releases it) it restarts from the stored cursor,
the one the command set.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import click
import trio

from .._groups import partition_key
from .._ownership import count_key
from ..stores._base import Store
from ._common import CommandError, ExitCode, checks, cli_holder, store_command, store_option

#: Seconds the command's own leases last: if it dies holding them, flows take
#: the consumer back after this long.
LEASE_TTL = 30.0

#: Tries at taking a lease over from a flow that claims it back meanwhile.
TAKEOVER_TRIES = 5


async def consumer_keys(store: Store, name: str) -> list[str]:
    """The cursor and lease keys of consumer ``name``: its name, or its partitions'.

    Raises:
        CommandError: The store knows no consumer of that name (no cursor,
            lease or group of it).
    """
    if "/" in name or "#" in name:
        raise CommandError(
            f"{name!r} is not a consumer name; for a consumer group give the group's name "
            "(every partition is reset)",
            ExitCode.USAGE,
        )
    leases = {lease.key: lease.holder for lease in await store.leases()}
    count = leases.get(count_key(name), "").removeprefix("partitions=")
    cursors = [info.consumer for info in await store.cursors()]
    if count.isdigit():
        return [partition_key(name, p) for p in range(int(count))]
    prefix = partition_key(name, 0).removesuffix("0")
    partitions = sorted(
        (key for key in {*cursors, *leases} if key.startswith(prefix)),
        key=lambda key: int(key.removeprefix(prefix)) if key.removeprefix(prefix).isdigit() else 0,
    )
    if partitions:
        return partitions
    if name in cursors or name in leases:
        return [name]
    known = sorted({key.split("/")[0] for key in [*cursors, *leases] if "#" not in key})
    raise CommandError(
        f"the store knows no consumer named {name!r}; it knows "
        f"{', '.join(map(repr, known)) or 'none'} (`trioflow status` lists them)",
        ExitCode.USAGE,
    )


@contextlib.asynccontextmanager
async def holding(
    store: Store, name: str, keys: Sequence[str], *, force: bool
) -> AsyncIterator[str]:
    """Hold the leases on ``keys`` as this command's own holder; release them on exit.

    Yields:
        The command's holder id.

    Raises:
        CommandError: A flow holds one of them and ``force`` is False
            (`ExitCode.REFUSED`), or it kept claiming it back.
    """
    holder = cli_holder()
    try:
        for _ in range(TAKEOVER_TRIES):
            leases = await store.claim_leases(holder, keys, LEASE_TTL)
            others = {lease.key: lease.holder for lease in leases if lease.holder != holder}
            if not others:
                break
            if not force:
                shown = ", ".join(f"{key} by {other}" for key, other in sorted(others.items()))
                raise CommandError(
                    f"consumer {name!r} runs in a flow (its lease is held: {shown}); stop "
                    "the flow first, or pass --force to take the consumer over from it (it "
                    "restarts from the new position)",
                    ExitCode.REFUSED,
                )
            for key, other in others.items():
                # On the owner's behalf: the claim that follows gives the
                # lease a new token, which fences the owner's writes off.
                await store.release_leases(other, [key])
        else:
            raise CommandError(
                f"consumer {name!r}: its flows kept claiming it back; try again",
                ExitCode.FAILED,
            )
        yield holder
    finally:
        with trio.CancelScope(shield=True):
            await store.release_leases(holder, keys)


def _check_reset(to: str, **options: object) -> None:
    if to not in ("earliest", "latest") and not (to.isascii() and to.isdigit()):
        raise click.UsageError(f"--to {to!r}: give a sequence number, earliest or latest")


async def target_position(store: Store, to: str) -> int:
    """The cursor ``--to`` names: a sequence number, ``earliest`` or ``latest``."""
    bounds = await store.log_bounds()
    if to == "earliest":
        return bounds.pruned_through
    if to == "latest":
        return bounds.head
    seq = int(to)
    if not bounds.pruned_through <= seq <= bounds.head:
        pruned = f" (the events up to {bounds.pruned_through} were pruned)"
        raise CommandError(
            f"--to {seq}: a cursor goes from {bounds.pruned_through} to the head, "
            f"{bounds.head}{pruned if bounds.pruned_through else ''}; choose one in that range",
            ExitCode.USAGE,
        )
    return seq


@click.group()
def consumers() -> None:
    """Reset or remove a consumer's durable cursor."""


@consumers.command()
@store_option
@click.argument("name")
@click.option(
    "--to",
    required=True,
    metavar="SEQ|earliest|latest",
    help=(
        "The new cursor: the consumer next handles the first event after it. earliest: "
        "before the oldest event kept; latest: the head (skip everything so far)."
    ),
)
@click.option("--force", is_flag=True, help="Take the consumer over from the flow running it.")
@store_command
@checks(_check_reset)
async def reset(store: Store, name: str, to: str, force: bool) -> None:
    """Move consumer NAME's cursor (every partition's, for a group), back or forward.

    Refused while a flow runs NAME, unless --force: then the flow stops
    handling it at once and restarts from the new cursor.
    """
    keys = await consumer_keys(store, name)
    seq = await target_position(store, to)
    async with holding(store, name, keys, force=force):
        for key in keys:
            before = await store.set_cursor(key, seq)
            click.echo(f"{key}: {'none' if before is None else before} -> {seq}")


@consumers.command()
@store_option
@click.argument("name")
@click.option("--force", is_flag=True, help="Take the consumer over from the flow running it.")
@store_command
async def remove(store: Store, name: str, force: bool) -> None:
    """Delete consumer NAME's cursor and dead letters (every partition's, for a group).

    A consumer of that name started later begins afresh, from its start
    option. Refused while a flow runs NAME, unless --force.
    """
    keys = await consumer_keys(store, name)
    async with holding(store, name, keys, force=force):
        for key in keys:
            await store.forget_consumer(key)
    for lease in await store.leases():
        if lease.key == count_key(name):
            # A group's partition count goes with it, as with
            # `flow.remove_consumer(name, forget=True)`.
            await store.release_leases(lease.holder, [lease.key])
    click.echo(f"removed consumer {name!r} ({len(keys)} cursor(s))")
