"""The effect rows of the transactional fan-out cases, and their check.

Each consumer (hand-written reader) inserts one row per event into a table of
its own, in the transaction that moves its cursor; after the run every table
must hold exactly one row per event. The tables have no unique key on
purpose: a doubled row is counted by the check, not refused by PostgreSQL.

Shared by the trioflow cases and the hand-written asyncpg program (which must
not import trio), so the standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def effect_table(index: int, schema: str | None = None) -> str:
    """The name of consumer ``index``'s effect table, in ``schema`` if given."""
    return f"effects_{index}" if schema is None else f'"{schema}".effects_{index}'


def create_sql(table: str) -> str:
    """The statement creating ``table``, the same on SQLite and PostgreSQL."""
    return f"CREATE TABLE {table} (seq bigint NOT NULL, total_cents bigint NOT NULL)"


def insert_sql(table: str, paramstyle: str) -> str:
    """The statement inserting one effect row (seq, the event's ``total_cents``)."""
    params = "$1, $2" if paramstyle == "$1" else "?, ?"
    return f"INSERT INTO {table} (seq, total_cents) VALUES ({params})"


def count_sql(table: str) -> str:
    """A query for ``table``'s rows, distinct seqs, lowest and highest seq (one row)."""
    return (
        "SELECT count(*) AS total, count(DISTINCT seq) AS seqs, "
        f"coalesce(min(seq), 0) AS low, coalesce(max(seq), 0) AS high FROM {table}"
    )


def effect_problems(counts: Sequence[Mapping[str, int]], events: int) -> list[str]:
    """What each table got wrong, given its `count_sql` row, unless it holds one row per
    event 1..``events``."""
    expected = {"total": events, "seqs": events, "low": 1, "high": events}
    return [
        f"effect table {index} holds {count['total']:,} rows of {count['seqs']:,} distinct "
        f"seqs {count['low']:,}..{count['high']:,} (expected one row per seq 1..{events:,})"
        for index, count in enumerate(counts)
        if dict(count) != expected
    ]
