"""``trioflow status`` and ``trioflow tail``: what the store holds, for people and scripts."""

from __future__ import annotations

import datetime
import json
import os
import sys
from collections.abc import Iterable, Sequence

import attrs
import click
import trio
from rich.console import Console
from rich.live import Live
from rich.table import Table

from .._events import Event
from ..stores._base import Store
from ._common import checks, optional, seq_option, store_command, store_option

#: Events read from the store per query by ``tail``.
PAGE = 1000

#: ``tail``'s default: the last this many events.
DEFAULT_LAST = 10


@attrs.frozen(kw_only=True)
class ConsumerRow:
    """One consumer's line of ``trioflow status`` (a group's partition is one).

    Attributes:
        consumer: Its cursor's key: a consumer's name, or ``name/p`` for a
            partition of a group.
        cursor: The last sequence number it committed; None if it has none yet.
        head: The store's head when the row was read.
        lag: Sequence numbers between its cursor and the head (at most the
            events it still has to go through).
        updated_at: When its cursor was last committed (aware UTC), if known.
        owner: The holder of its lease (the flow running it), if a lease
            holds; None when no flow runs it now.
        dead_letters: How many dead letters it has.
    """

    consumer: str
    cursor: int | None
    head: int
    lag: int | None
    updated_at: datetime.datetime | None
    owner: str | None
    dead_letters: int

    def to_json(self) -> dict[str, object]:
        """The row as a JSON object (times as ISO 8601 text)."""
        values = attrs.asdict(self)
        values["updated_at"] = None if self.updated_at is None else self.updated_at.isoformat()
        return values


async def read_status(store: Store) -> list[ConsumerRow]:
    """One row per consumer (per partition of a group) the store knows, by name.

    A consumer is known by its cursor, its lease or its dead letters.
    """
    head = await store.head()
    cursors = {info.consumer: info for info in await store.cursors()}
    # Keys with '#' are a group's members and partition count, not consumers.
    owners = {lease.key: lease.holder for lease in await store.leases() if "#" not in lease.key}
    letters = await store.dead_letter_counts()
    rows = []
    for name in sorted({*cursors, *owners, *letters}, key=_by_partition):
        info = cursors.get(name)
        rows.append(
            ConsumerRow(
                consumer=name,
                cursor=None if info is None else info.seq,
                head=head,
                lag=None if info is None else max(0, head - info.seq),
                updated_at=None if info is None else info.updated_at,
                owner=owners.get(name),
                dead_letters=letters.get(name, 0),
            )
        )
    return rows


def _by_partition(name: str) -> tuple[str, int]:
    """Sorts a group's partitions by number: ``billing/2`` before ``billing/10``."""
    group, _, partition = name.partition("/")
    return (group, int(partition) if partition.isdigit() else -1)


async def read_head(store: Store, rows: Sequence[ConsumerRow]) -> int:
    """The head the rows were read with; the store's, when there are none."""
    return rows[0].head if rows else await store.head()


def status_table(rows: Sequence[ConsumerRow], *, head: int, now: datetime.datetime) -> Table:
    """The rows as a table for a terminal."""
    title = f"{len(rows)} consumer(s), head {head}"
    table = Table(title=title, title_justify="left", box=None, header_style="bold")
    table.add_column("CONSUMER", no_wrap=True)
    for name in ("CURSOR", "LAG"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("LAST COMMIT", no_wrap=True)
    table.add_column("OWNER", no_wrap=True)
    table.add_column("DEAD LETTERS", justify="right", no_wrap=True)
    for row in rows:
        table.add_row(
            row.consumer,
            _or_dash(row.cursor),
            _or_dash(row.lag),
            "-" if row.updated_at is None else _when(row.updated_at, now),
            row.owner or "-",
            str(row.dead_letters) if row.dead_letters else "-",
        )
    return table


def _or_dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def _when(moment: datetime.datetime, now: datetime.datetime) -> str:
    ago = max(0, round((now - moment).total_seconds()))
    text = moment.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return f"{text} ({_duration(ago)} ago)"


def _duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def console() -> Console:
    """A console on stdout; wide when it is no terminal, so piped rows keep one line each."""
    terminal = sys.stdout.isatty()
    return Console(highlight=False, width=None if terminal else 200)


@click.command()
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--watch", is_flag=True, help="Refresh until Ctrl+C.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    help="Seconds between refreshes, with --watch.",
)
@store_command
async def status(store: Store, as_json: bool, watch: bool, interval: float) -> None:
    """One row per consumer: cursor, lag, last commit, owner, dead letters.

    A consumer group shows one row per partition (name/p). The owner is the
    flow holding the consumer's lease; none when no flow runs it. With
    --json, one JSON object ({"head": ..., "consumers": [...]}); with --watch
    too, one such line per refresh.
    """
    out = console()

    async def table() -> Table:
        rows = await read_status(store)
        now = datetime.datetime.now(datetime.UTC)
        return status_table(rows, head=await read_head(store, rows), now=now)

    if as_json or not (watch and out.is_terminal):
        # No terminal to redraw a table in (a pipe, a job's log): with
        # --watch, a whole document or table per refresh.
        while True:
            if as_json:
                rows = await read_status(store)
                document = {
                    "head": await read_head(store, rows),
                    "consumers": [row.to_json() for row in rows],
                }
                click.echo(json.dumps(document, separators=(",", ":") if watch else None))
            else:
                out.print(await table())
            if not watch:
                return
            sys.stdout.flush()
            await trio.sleep(interval)
            if not as_json:
                out.print()
    with Live(await table(), console=out, auto_refresh=False) as live:
        while True:
            await trio.sleep(interval)
            live.update(await table(), refresh=True)


def event_json(event: Event) -> str:
    """An event as one line of JSON."""
    return json.dumps(
        {
            "seq": event.seq,
            "id": str(event.id),
            "type": event.type,
            "key": event.key,
            "created_at": event.created_at.isoformat(),
            "data": event.data,
        },
        ensure_ascii=False,
    )


async def start_of_last(store: Store, count: int, types: frozenset[str] | None) -> int:
    """The position after which the last ``count`` events (of ``types``) are."""
    head = await store.head()
    if count == 0:
        return head
    window = count
    while True:
        after = max(0, head - window)
        seqs = await _matching_seqs(store, after, head, types)
        if len(seqs) >= count or after == 0:
            return seqs[-count] - 1 if len(seqs) >= count else after
        # Sequence numbers may have holes, and --type skips events: widen the
        # window until it holds enough of them, or the whole log.
        window *= 4


async def _matching_seqs(
    store: Store, after: int, through: int, types: frozenset[str] | None
) -> list[int]:
    """The seqs of the events (of ``types``) after ``after`` through ``through``."""
    seqs: list[int] = []
    while after < through:
        page = await store.read(after, PAGE)
        if not page:
            break
        seqs += [e.seq for e in page if e.seq <= through and (types is None or e.type in types)]
        after = page[-1].seq
    return seqs


def print_events(events: Iterable[Event], types: frozenset[str] | None) -> None:
    """Print the events (of ``types``) as JSON lines, then flush."""
    try:
        for event in events:
            if types is None or event.type in types:
                click.echo(event_json(event))
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went (`| head`): stop quietly, and keep Python from
        # complaining when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0) from None


def _check_tail(from_seq: int | None, last: int | None, **options: object) -> None:
    if from_seq is not None and last is not None:
        raise click.UsageError("give --from or --last, not both")


@click.command()
@store_option
@seq_option("--from", "from_seq", help="Start at this sequence number.")
@optional(
    "--last",
    type=click.IntRange(min=0),
    metavar="N",
    help=f"Start with the last N events (of --type). Default: {DEFAULT_LAST}, without --from.",
)
@click.option(
    "--type",
    "types",
    multiple=True,
    metavar="TYPE",
    help="Only events of this type (repeat it for several).",
)
@click.option("--follow", "-f", is_flag=True, help="Then print new events as they come.")
@store_command
@checks(_check_tail)
async def tail(
    store: Store,
    from_seq: int | None,
    last: int | None,
    types: tuple[str, ...],
    follow: bool,
) -> None:
    """Print events as JSON lines: the last ones, or from a sequence number on.

    Each line is {"seq", "id", "type", "key", "created_at", "data"}. With
    --follow it waits for new events, until Ctrl+C.
    """
    wanted = frozenset(types) or None
    if from_seq is not None:
        after = from_seq - 1
    else:
        after = await start_of_last(store, DEFAULT_LAST if last is None else last, wanted)
    while True:
        page = await store.read(after, PAGE)
        if page:
            print_events(page, wanted)
            after = page[-1].seq
            continue
        if not follow:
            return
        await store.wait_for_append(after)
