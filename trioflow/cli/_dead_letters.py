"""``trioflow dead-letters list|requeue|discard``: the events consumers gave up on."""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence

import attrs
import click
from rich.table import Table

from .._consumer._requeues import REQUEUE_POLL
from .._dead_letters import DeadLetter
from .._groups import partition_key
from ..stores._base import Store
from ._common import CommandError, ExitCode, store_command, store_option
from ._watch import console

#: The most characters of a letter's message a table shows.
SHOWN_MESSAGE = 60


async def letters_of(store: Store, consumer: str | None) -> list[DeadLetter]:
    """The dead letters of ``consumer`` (of each partition, for a group), or of all.

    Raises:
        CommandError: The store knows no consumer of that name (a typo would
            otherwise list, requeue or discard nothing and succeed).
    """
    letters = await store.dead_letters()
    if consumer is None:
        return letters
    prefix = partition_key(consumer, 0).removesuffix("0")
    chosen = [
        letter
        for letter in letters
        if letter.consumer == consumer or letter.consumer.startswith(prefix)
    ]
    if not chosen:
        await _check_known(store, consumer, prefix)
    return chosen


async def _check_known(store: Store, consumer: str, prefix: str) -> None:
    # Known by a cursor or a lease, as `trioflow status` lists it: a consumer
    # or group, or one partition of a group (``billing/1``).
    keys = {info.consumer for info in await store.cursors()}
    keys |= {lease.key for lease in await store.leases() if "#" not in lease.key}
    if any(key == consumer or key.startswith(prefix) for key in keys):
        return
    known = sorted({key.split("/")[0] for key in keys})
    raise CommandError(
        f"the store knows no consumer named {consumer!r}; it knows "
        f"{', '.join(map(repr, known)) or 'none'} (`trioflow status` lists them)",
        ExitCode.USAGE,
    )


def letter_json(letter: DeadLetter) -> dict[str, object]:
    """A dead letter as a JSON object (times as ISO 8601 text, ids as text)."""
    values = attrs.asdict(letter)
    for name, value in values.items():
        if isinstance(value, datetime.datetime):
            values[name] = value.isoformat()
    values["event_id"] = str(letter.event_id)
    return values


def letters_table(letters: Sequence[DeadLetter]) -> Table:
    table = Table(
        title=f"{len(letters)} dead letter(s)",
        title_justify="left",
        box=None,
        header_style="bold",
    )
    for name in ("CONSUMER", "SEQ", "TYPE", "REASON", "ATTEMPTS", "LAST FAILED", "STATE"):
        numeric = name in ("SEQ", "ATTEMPTS")
        table.add_column(name, justify="right" if numeric else "left", no_wrap=True)
    table.add_column("ERROR", overflow="ellipsis", no_wrap=True, max_width=SHOWN_MESSAGE)
    for letter in letters:
        due = letter.due_at
        table.add_row(
            letter.consumer,
            str(letter.seq),
            letter.type,
            letter.reason,
            str(letter.attempts),
            letter.last_failed_at.strftime("%Y-%m-%d %H:%M:%SZ"),
            "parked" if due is None else f"requeued, due {due:%H:%M:%SZ}",
            f"{letter.error_type}: {letter.message}",
        )
    return table


@click.group("dead-letters")
def dead_letters() -> None:
    """List, requeue or discard dead letters: events consumers gave up on."""


@dead_letters.command("list")
@store_option
@click.argument("consumer", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, tracebacks included.")
@store_command
async def list_letters(store: Store, consumer: str | None, as_json: bool) -> None:
    """List the dead letters of CONSUMER (of every partition of a group), or of all."""
    letters = await letters_of(store, consumer)
    if as_json:
        click.echo(json.dumps([letter_json(letter) for letter in letters], indent=2))
    elif not letters:
        click.echo("no dead letters" + ("" if consumer is None else f" of {consumer!r}"))
    else:
        console().print(letters_table(letters))


async def chosen_letters(
    store: Store, consumer: str, seqs: Sequence[int], every: bool
) -> dict[str, list[int]]:
    """The letters of ``consumer`` named by ``seqs`` (or all of them), by the key
    they are kept under (a group's partition).

    Raises:
        CommandError: Neither or both of seqs and --all, or a seq is no dead
            letter of ``consumer`` (then nothing is changed).
    """
    if bool(seqs) == every:
        raise CommandError("give the SEQs of the letters, or --all", ExitCode.USAGE)
    held = {letter.seq: letter.consumer for letter in await letters_of(store, consumer)}
    wanted = sorted(held) if every else sorted(set(seqs))
    missing = [seq for seq in wanted if seq not in held]
    if missing:
        raise CommandError(
            f"consumer {consumer!r} has no dead letter at seq {', '.join(map(str, missing))}; "
            f"nothing was changed; list them with `trioflow dead-letters list {consumer}`",
            ExitCode.USAGE,
        )
    by_key: dict[str, list[int]] = {}
    for seq in wanted:
        by_key.setdefault(held[seq], []).append(seq)
    return by_key


def _count(by_key: dict[str, list[int]]) -> int:
    return sum(map(len, by_key.values()))


@dead_letters.command("requeue")
@store_option
@click.argument("consumer")
@click.argument("seqs", nargs=-1, type=click.IntRange(min=1), metavar="[SEQ]...")
@click.option("--all", "every", is_flag=True, help="Every dead letter of CONSUMER.")
@click.option(
    "--after",
    type=click.FloatRange(min=0),
    default=0.0,
    metavar="SECONDS",
    help="Hand them back only after this many seconds.",
)
@store_command
async def requeue(
    store: Store, consumer: str, seqs: tuple[int, ...], every: bool, after: float
) -> None:
    """Hand dead letters back to CONSUMER, to be handled again with its policy.

    A flow running CONSUMER in another process finds them within a few
    seconds (said on stderr when one runs it); a flow's own `flow.requeue`
    wakes it at once.
    """
    by_key = await chosen_letters(store, consumer, seqs, every)
    for key, key_seqs in by_key.items():
        await store.requeue_dead_letters(key, key_seqs, after=after)
    click.echo(f"requeued {_count(by_key)} dead letter(s) of {consumer!r}")
    # A flow is told of requeues made in its own process only; others it
    # finds when it next looks: say when, so the operator knows what to expect.
    holders = sorted({lease.holder for lease in await store.leases() if lease.key in by_key})
    if holders:
        click.echo(
            f"note: {consumer!r} runs in a flow ({', '.join(holders)}), which looks for "
            f"requeued letters every {REQUEUE_POLL:g}s",
            err=True,
        )


@dead_letters.command("discard")
@store_option
@click.argument("consumer")
@click.argument("seqs", nargs=-1, type=click.IntRange(min=1), metavar="[SEQ]...")
@click.option("--all", "every", is_flag=True, help="Every dead letter of CONSUMER.")
@store_command
async def discard(store: Store, consumer: str, seqs: tuple[int, ...], every: bool) -> None:
    """Delete dead letters of CONSUMER: it does not handle their events again."""
    by_key = await chosen_letters(store, consumer, seqs, every)
    for key, key_seqs in by_key.items():
        await store.discard_dead_letters(key, key_seqs)
    click.echo(f"discarded {_count(by_key)} dead letter(s) of {consumer!r}")
