"""The schema: its versions, the migrations between them, and the checks at open."""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from collections.abc import Mapping, Sequence

from ..._errors import SchemaVersionError, StoreError
from ._connections import write_transaction
from ._sql import CURSORS_PAST, NUMBERING

#: The schema version this module creates and understands.
SCHEMA_VERSION = 5

#: What brings a file from the version before to each version. A file's
#: migrations run in one transaction under the write lock, so processes that
#: open an old file at once migrate it once, and a failed or interrupted one
#: leaves the file at its old version. Version 1 creates the tables. Steps are
#: never changed once released: files of every older version must migrate.
MIGRATIONS: Mapping[int, Sequence[str]] = {
    1: (
        # One row, enforced by the CHECK, so the version can never be ambiguous.
        """
        CREATE TABLE trioflow_schema (
            singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
            version INTEGER NOT NULL
        )
        """,
        "INSERT INTO trioflow_schema (singleton, version) VALUES (1, 1)",
        # seq is the rowid: range scans by seq and MAX(seq) are B-tree seeks.
        """
        CREATE TABLE trioflow_events (
            seq INTEGER PRIMARY KEY,
            id BLOB(16) UNIQUE NOT NULL,
            type TEXT NOT NULL,
            key TEXT,
            data TEXT NOT NULL,
            created_at INTEGER NOT NULL
        )
        """,
        """
        CREATE TABLE trioflow_cursors (
            consumer TEXT PRIMARY KEY,
            seq INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        )
        """,
    ),
    2: (
        # Sequence numbers are never given twice. The next number is one above
        # both the highest event present and the high-water mark, which covers
        # every event ever deleted: before an event above it is deleted, a
        # trigger raises it to the highest event present. Deleting the newest
        # events thus no longer makes numbering restart below consumers'
        # cursors, appends pay nothing for it, and deleting old events (the
        # mark already covers them) costs one lookup per event.
        """
        CREATE TABLE IF NOT EXISTS trioflow_sequence (
            singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
            high_water INTEGER NOT NULL
        )
        """,
        """
        INSERT INTO trioflow_sequence (singleton, high_water)
        SELECT 1, COALESCE(MAX(seq), 0) FROM trioflow_events WHERE true
        ON CONFLICT (singleton) DO UPDATE SET high_water = MAX(high_water, excluded.high_water)
        """,
        """
        CREATE TRIGGER IF NOT EXISTS trioflow_events_high_water
        BEFORE DELETE ON trioflow_events
        WHEN OLD.seq > (SELECT high_water FROM trioflow_sequence)
        BEGIN
            UPDATE trioflow_sequence SET high_water = (SELECT MAX(seq) FROM trioflow_events);
        END
        """,
    ),
    3: (
        # Dead letters: events a consumer gave up on, one row per consumer and
        # seq, recorded with the consumer's cursor in one transaction. Times
        # are microseconds since 1970 (UTC), as created_at; due_at is NULL
        # while the letter is parked. No IF NOT EXISTS: a table of that name
        # that trioflow did not make fails the migration (which then rolls
        # back whole) instead of being taken for ours.
        """
        CREATE TABLE trioflow_dead_letters (
            consumer TEXT NOT NULL,
            seq INTEGER NOT NULL,
            event_id BLOB NOT NULL,
            type TEXT NOT NULL,
            attempts INTEGER NOT NULL,
            first_failed_at INTEGER NOT NULL,
            last_failed_at INTEGER NOT NULL,
            reason TEXT NOT NULL,
            error_type TEXT NOT NULL,
            message TEXT NOT NULL,
            traceback TEXT NOT NULL,
            due_at INTEGER,
            PRIMARY KEY (consumer, seq)
        )
        """,
        # Only the requeued letters: looking for due ones never scans the
        # parked ones, however many pile up.
        """
        CREATE INDEX trioflow_dead_letters_due ON trioflow_dead_letters (consumer, due_at)
        WHERE due_at IS NOT NULL
        """,
    ),
    4: (
        # Leases: which flow owns each consumer for now, and its fencing
        # token. Rows are never deleted, so a key's token never repeats.
        # expires_at is microseconds since 1970 (UTC) by this machine's
        # clock. WITHOUT ROWID: a fenced write looks a key up in one B-tree.
        # No IF NOT EXISTS, as for version 3.
        """
        CREATE TABLE trioflow_leases (
            key TEXT PRIMARY KEY,
            holder TEXT NOT NULL,
            token INTEGER NOT NULL,
            expires_at INTEGER NOT NULL
        ) WITHOUT ROWID
        """,
    ),
    5: (
        # Pruning: every event up to pruned_through may have been deleted.
        # The head never goes back below it, even when every event is gone,
        # and no cursor may be set below it. One row, beside the high-water
        # mark it complements.
        "ALTER TABLE trioflow_sequence ADD COLUMN pruned_through INTEGER NOT NULL DEFAULT 0",
    ),
}


def ensure_schema(writer: sqlite3.Connection, shown: str) -> None:
    """Create or migrate the schema, then check the cursors (in a worker thread)."""
    # IMMEDIATE: processes opening a new or old file at once must not
    # both create or migrate it; the second waits, then finds it done.
    with write_transaction(writer):
        version = _stored_version(writer, shown)
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[step]:
                writer.execute(statement)
            writer.execute("UPDATE trioflow_schema SET version = ?", (step,))
    # After the commit: a file whose cursors fail the check is still
    # migrated, and opens once they are fixed.
    _check_cursors(writer, shown)


def read_version(path: str) -> int | None:
    """The schema version of the file at ``path`` as it is, opened read-only (in a
    worker thread); None if there is no file, or no trioflow schema in it yet.

    Raises:
        sqlite3.Error: The file cannot be read (the caller translates it).
    """
    if not os.path.exists(path):
        return None
    uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro"
    connection = sqlite3.connect(uri, uri=True, isolation_level=None)
    try:
        exists = connection.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'trioflow_schema'"
        ).fetchall()
        if not exists:
            return None
        rows = connection.execute("SELECT version FROM trioflow_schema").fetchall()
    finally:
        connection.close()
    version = rows[0][0] if len(rows) == 1 else None
    return version if isinstance(version, int) else None


def _stored_version(writer: sqlite3.Connection, shown: str) -> int:
    """The file's schema version, 0 for a file without trioflow's tables."""
    exists = writer.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'trioflow_schema'"
    ).fetchall()
    if not exists:
        return 0
    rows = writer.execute("SELECT version FROM trioflow_schema").fetchall()
    version = rows[0][0] if len(rows) == 1 else None
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"SQLite store {shown!r} has schema version {version}, written by "
            f"a newer trioflow (this one knows version {SCHEMA_VERSION}); upgrade "
            "trioflow, or point the store at another file"
        )
    if not isinstance(version, int) or version < 1:
        raise SchemaVersionError(
            f"SQLite store {shown!r} has an unknown schema version "
            f"({version!r}); it was not written by trioflow: point the store at "
            "another file"
        )
    return version


def _check_cursors(writer: sqlite3.Connection, shown: str) -> None:
    """Refuse a file whose cursors are past every sequence number it has given.

    Those consumers would skip the events numbered up to their cursors:
    the file was reset (its events and high-water mark deleted) or
    replaced by another under cursors kept from before.
    """
    head, high_water = writer.execute(NUMBERING).fetchall()[0]
    given = max(head, high_water)
    past = writer.execute(CURSORS_PAST, (given,)).fetchall()
    if not past:
        return
    named = ", ".join(f"{consumer!r} (at {seq})" for consumer, seq in past[:10])
    more = f" and {len(past) - 10} more" if len(past) > 10 else ""
    raise StoreError(
        f"SQLite store {shown!r}: the cursors of consumers {named}{more} are past "
        f"{given}, the highest sequence number this file has given: the file was reset or "
        "replaced under its cursors, and those consumers would skip the next events. If "
        "it is the right file, have numbering continue above the cursors: run `UPDATE "
        f"trioflow_sequence SET high_water = {past[0][1]}` on it (with the sqlite3 command, "
        "say) while no process uses it; if it is not, point the store at the right file"
    )
