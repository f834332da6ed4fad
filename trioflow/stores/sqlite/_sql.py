"""The SQL: statements, and the work each store call does on a connection.

Every function here runs in a worker thread, on a connection the store lends
it (the writer inside a write transaction, or the reader), and lets sqlite3's
exceptions through: the store translates them at one boundary. Times are
stored as microseconds since 1970 (UTC).
"""

from __future__ import annotations

import datetime
import math
import sqlite3
import uuid
from collections.abc import Mapping
from typing import Any

from ..._dead_letters import DeadLetter
from ..._errors import LeaseLostError, StoreError
from ..._events import Event, NewEvent, decode_json, utf8_size
from ..._leases import Lease
from .._base import CursorInfo, LogBounds, check_reset, run_search

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_MICROSECOND = datetime.timedelta(microseconds=1)
# SQLite integers are signed 64-bit; larger Python ints cannot be bound.
MIN_INT64 = -(2**63)
MAX_INT64 = 2**63 - 1
# The same decoder the live path uses, so replayed data equals live data.
_decode = decode_json
# The latest expiry a datetime can hold: a lease claimed for longer gets it.
_LATEST = (datetime.datetime.max.replace(tzinfo=datetime.UTC) - _EPOCH) // _MICROSECOND

# The highest event, or the pruning mark when every event up to it was pruned:
# the head never goes back.
_HEAD_OF_LOG = (
    "MAX((SELECT COALESCE(MAX(seq), 0) FROM trioflow_events),"
    " (SELECT COALESCE(MAX(pruned_through), 0) FROM trioflow_sequence))"
)
_HEAD = f"SELECT {_HEAD_OF_LOG}"
# The head, and the high-water mark: the next number is one above both.
NUMBERING = f"SELECT {_HEAD_OF_LOG}, (SELECT COALESCE(MAX(high_water), 0) FROM trioflow_sequence)"
_LOG_BOUNDS = (
    "SELECT (SELECT MIN(seq) FROM trioflow_events), "
    f"{_HEAD_OF_LOG}, (SELECT COALESCE(MAX(pruned_through), 0) FROM trioflow_sequence)"
)
_FIRST_AT_OR_AFTER = (
    "SELECT seq, created_at < ? FROM trioflow_events WHERE seq >= ? ORDER BY seq LIMIT 1"
)
# Consumers in BINARY collation: UTF-8 bytes, which sort as code points do.
_CURSORS = "SELECT consumer, seq, updated_at FROM trioflow_cursors ORDER BY consumer"
_CURSOR = "SELECT seq FROM trioflow_cursors WHERE consumer = ?"
_SET_CURSOR = (
    "INSERT INTO trioflow_cursors (consumer, seq, updated_at) VALUES (?, ?, ?)"
    " ON CONFLICT (consumer) DO UPDATE SET seq = excluded.seq, updated_at = excluded.updated_at"
)
_LOWEST_CURSOR = "SELECT MIN(seq) FROM trioflow_cursors"
# The last of the oldest `limit` events up to the bound that no dead letter
# refers to; then every such event up to it goes.
_PRUNE_LAST = (
    "SELECT MAX(seq) FROM (SELECT seq FROM trioflow_events WHERE seq <= ?"
    " AND seq NOT IN (SELECT seq FROM trioflow_dead_letters) ORDER BY seq LIMIT ?)"
)
_PRUNE = (
    "DELETE FROM trioflow_events WHERE seq <= ?"
    " AND seq NOT IN (SELECT seq FROM trioflow_dead_letters)"
)
_MARK_PRUNED = "UPDATE trioflow_sequence SET pruned_through = MAX(pruned_through, ?)"
CURSORS_PAST = (
    "SELECT consumer, seq FROM trioflow_cursors WHERE seq > ? ORDER BY seq DESC, consumer"
)
_INSERT = (
    "INSERT INTO trioflow_events (seq, id, type, key, data, created_at) VALUES (?, ?, ?, ?, ?, ?)"
)
_READ = (
    "SELECT seq, id, type, key, data, created_at FROM trioflow_events"
    " WHERE seq > ? ORDER BY seq LIMIT ?"
)
_LOAD_CURSORS = "SELECT consumer, seq FROM trioflow_cursors"
_UPSERT_CURSOR = (
    "INSERT INTO trioflow_cursors (consumer, seq, updated_at) VALUES (?, ?, ?)"
    " ON CONFLICT (consumer) DO UPDATE SET seq = excluded.seq, updated_at = excluded.updated_at"
    # A stored cursor never moves backwards: a late commit of an older
    # position leaves the row as it is.
    " WHERE excluded.seq >= trioflow_cursors.seq"
)
_DEAD_LETTER_COLUMNS = (
    "consumer, seq, event_id, type, attempts, first_failed_at, last_failed_at, reason,"
    " error_type, message, traceback, due_at"
)
_RECORD_DEAD_LETTER = (
    f"INSERT OR REPLACE INTO trioflow_dead_letters ({_DEAD_LETTER_COLUMNS})"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# Consumers in BINARY collation: UTF-8 bytes, which sort as code points do.
DEAD_LETTERS = f"SELECT {_DEAD_LETTER_COLUMNS} FROM trioflow_dead_letters ORDER BY consumer, seq"
DEAD_LETTERS_OF = (
    f"SELECT {_DEAD_LETTER_COLUMNS} FROM trioflow_dead_letters WHERE consumer = ? ORDER BY seq"
)
_EARLIEST_DUE_AT = (
    "SELECT min(due_at) FROM trioflow_dead_letters WHERE consumer = ? AND due_at IS NOT NULL"
)
DEAD_LETTER_COUNTS = "SELECT consumer, count(*) FROM trioflow_dead_letters GROUP BY consumer"
DUE_DEAD_LETTERS = (
    f"SELECT {_DEAD_LETTER_COLUMNS} FROM trioflow_dead_letters"
    " WHERE consumer = ? AND due_at <= ? ORDER BY seq"
)
_REQUEUE_DEAD_LETTER = "UPDATE trioflow_dead_letters SET due_at = ? WHERE consumer = ? AND seq = ?"
_DISCARD_DEAD_LETTER = "DELETE FROM trioflow_dead_letters WHERE consumer = ? AND seq = ?"
_LEASE_TOKENS = "SELECT key, token FROM trioflow_leases WHERE key IN"
_LEASE = "SELECT key, holder, token, expires_at FROM trioflow_leases WHERE key = ?"
# A key nobody holds is taken with token 1; a lapsed one (whoever held it)
# with the next token; the holder's own live one is renewed with its token;
# another holder's live one is left alone (the WHERE).
_CLAIM_LEASE = (
    "INSERT INTO trioflow_leases (key, holder, token, expires_at) VALUES (?1, ?2, 1, ?3)"
    " ON CONFLICT (key) DO UPDATE SET"
    " token = CASE WHEN expires_at <= ?4 THEN token + 1 ELSE token END,"
    " holder = excluded.holder, expires_at = excluded.expires_at"
    " WHERE expires_at <= ?4 OR holder = excluded.holder"
)
_RELEASE_LEASE = (
    "UPDATE trioflow_leases SET expires_at = ?1 WHERE key = ?2 AND holder = ?3 AND expires_at > ?1"
)
_FORGET_LAPSED_LEASES = (
    "DELETE FROM trioflow_leases WHERE substr(key, 1, length(?1)) = ?1 AND expires_at <= ?2"
)
# Keys in BINARY collation: by code point, as Python sorts str.
_LIVE_LEASES = (
    "SELECT key, holder, token, expires_at FROM trioflow_leases WHERE expires_at > ? ORDER BY key"
)
_FORGET_CONSUMER = (
    "DELETE FROM trioflow_dead_letters WHERE consumer = ?",
    "DELETE FROM trioflow_cursors WHERE consumer = ?",
)


def append(writer: sqlite3.Connection, batch: list[NewEvent]) -> tuple[int, int, datetime.datetime]:
    """Number and insert one batch, in a write transaction (in a worker thread).

    Returns the head before the batch, the first number it got, and its time.
    """
    after, high_water = writer.execute(NUMBERING).fetchall()[0]
    first = max(after, high_water) + 1
    # Taken under the lock: created_at follows commit order across writers
    # (as far as the wall clock does).
    now = datetime.datetime.now(datetime.UTC)
    micros = _micros(now)
    writer.executemany(
        _INSERT,
        [
            (seq, new.id.bytes, new.type, new.key, new.payload, micros)
            for seq, new in enumerate(batch, start=first)
        ],
    )
    return after, first, now


def log_bounds(reader: sqlite3.Connection) -> LogBounds:
    """The first stored seq, the head and the pruning mark (in a worker thread)."""
    first, head, pruned_through = reader.execute(_LOG_BOUNDS).fetchall()[0]
    return LogBounds(
        first=head + 1 if first is None else first, head=head, pruned_through=pruned_through
    )


def cursors(reader: sqlite3.Connection) -> list[CursorInfo]:
    """Every stored cursor, by consumer (in a worker thread)."""
    return [
        CursorInfo(consumer=consumer, seq=seq, updated_at=_time(updated_at))
        for consumer, seq, updated_at in reader.execute(_CURSORS).fetchall()
    ]


def seq_before(reader: sqlite3.Connection, time: datetime.datetime) -> int:
    """`Store.seq_before` by a binary search on seq, the rowid (in a worker thread)."""
    micros = _micros(time)

    def look_up(seq: int) -> tuple[int, bool] | None:
        rows = reader.execute(_FIRST_AT_OR_AFTER, (micros, seq)).fetchall()
        return (rows[0][0], bool(rows[0][1])) if rows else None

    return run_search(head(reader), look_up)


def set_cursor(writer: sqlite3.Connection, argument: tuple[str, int]) -> int | None:
    """Set a cursor, backwards too, in a write transaction (in a worker thread).

    Raises:
        ConsumerStateError: The seq is not from 0 to the head.
        PrunedLogError: The seq is below the pruning mark.
    """
    consumer, seq = argument
    bounds = log_bounds(writer)
    check_reset(consumer, seq, head=bounds.head, pruned_through=bounds.pruned_through)
    rows = writer.execute(_CURSOR, (consumer,)).fetchall()
    writer.execute(_SET_CURSOR, (consumer, seq, _micros(datetime.datetime.now(datetime.UTC))))
    return rows[0][0] if rows else None


def prune(writer: sqlite3.Connection, argument: tuple[int, int]) -> int:
    """Delete the oldest events no cursor or letter needs, in a write transaction.

    Under the write lock, no cursor can move back (nor a letter appear)
    between the checks and the delete.
    """
    through, limit = argument
    (lowest,) = writer.execute(_LOWEST_CURSOR).fetchall()[0]
    bound = min(through, head(writer), _sql_int(lowest))
    (last,) = writer.execute(_PRUNE_LAST, (bound, limit)).fetchall()[0]
    if last is None:
        return 0
    deleted = writer.execute(_PRUNE, (last,)).rowcount
    writer.execute(_MARK_PRUNED, (last,))
    return deleted


def _sql_int(value: int | None) -> int:
    """A nullable integer column's value, None as the largest SQLite integer."""
    return MAX_INT64 if value is None else value


def load_cursors(reader: sqlite3.Connection) -> dict[str, int]:
    return dict(reader.execute(_LOAD_CURSORS).fetchall())


def commit_cursors(
    writer: sqlite3.Connection, argument: tuple[list[tuple[str, int]], Mapping[str, int] | None]
) -> frozenset[str]:
    """Insert or move forward the cursors whose fence holds, in a write transaction (in
    a worker thread); return the names whose fence does not.

    The fences are checked in the transaction that writes the cursors: no
    claim can come between the check and the write.
    """
    items, fences = argument
    if not fences:
        _upsert_cursors(writer, items)
        return frozenset()
    fenced = [name for name, _ in items if name in fences]
    tokens = _tokens(writer, fenced)
    refused = frozenset(name for name in fenced if tokens.get(name) != fences[name])
    _upsert_cursors(writer, [item for item in items if item[0] not in refused])
    return refused


def _upsert_cursors(writer: sqlite3.Connection, items: list[tuple[str, int]]) -> None:
    micros = _micros(datetime.datetime.now(datetime.UTC))
    writer.executemany(_UPSERT_CURSOR, [(name, seq, micros) for name, seq in items])


def _tokens(writer: sqlite3.Connection, keys: list[str]) -> dict[str, int]:
    """The tokens of the leases on ``keys`` (lapsed or not), by key.

    One statement per 500 keys rather than one per key: a commit of many
    fenced cursors pays for one lookup statement, not for each.
    """
    tokens: dict[str, int] = {}
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        query = f"{_LEASE_TOKENS} ({', '.join('?' * len(chunk))})"
        tokens.update(writer.execute(query, chunk).fetchall())
    return tokens


def _holds(writer: sqlite3.Connection, key: str, token: int) -> bool:
    """Whether ``token`` is the token of ``key``'s lease (lapsed or not)."""
    return _tokens(writer, [key]).get(key) == token


def _micros(moment: datetime.datetime) -> int:
    """Microseconds since 1970 (UTC); a naive time counts as local time, as asyncpg takes it."""
    return (moment.astimezone(datetime.UTC) - _EPOCH) // _MICROSECOND


def _time(micros: int) -> datetime.datetime:
    return _EPOCH + micros * _MICROSECOND


def record_dead_letter(
    writer: sqlite3.Connection, argument: tuple[DeadLetter, int | None, int | None]
) -> None:
    """Keep a letter and move its cursor, in a write transaction (in a worker thread).

    Raises:
        LeaseLostError: The fence given is not the token of the consumer's
            lease; nothing was written.
    """
    letter, cursor, fence = argument
    if fence is not None and not _holds(writer, letter.consumer, fence):
        raise LeaseLostError(
            f"consumer {letter.consumer!r} is no longer this flow's: its lease passed to "
            f"another flow (its token is no longer {fence}), so its dead letter at seq "
            f"{letter.seq} was not recorded and its cursor was left alone; stop handling "
            "the consumer and let the flow that holds its lease deliver the event",
            keys=frozenset([letter.consumer]),
        )
    due_at = None if letter.due_at is None else _micros(letter.due_at)
    writer.execute(
        _RECORD_DEAD_LETTER,
        (
            letter.consumer,
            letter.seq,
            letter.event_id.bytes,
            letter.type,
            letter.attempts,
            _micros(letter.first_failed_at),
            _micros(letter.last_failed_at),
            letter.reason,
            letter.error_type,
            letter.message,
            letter.traceback,
            due_at,
        ),
    )
    if cursor is not None:
        _upsert_cursors(writer, [(letter.consumer, cursor)])


def _letter(row: tuple[Any, ...]) -> DeadLetter:
    """A `DeadLetter` from a row of trioflow_dead_letters, in `_DEAD_LETTER_COLUMNS` order."""
    consumer, seq, event_id, event_type, attempts, first, last, reason = row[:8]
    error_type, message, traceback, due_at = row[8:]
    return DeadLetter(
        consumer=consumer,
        seq=seq,
        event_id=uuid.UUID(bytes=event_id),
        type=event_type,
        attempts=attempts,
        first_failed_at=_time(first),
        last_failed_at=_time(last),
        reason=reason,
        error_type=error_type,
        message=message,
        traceback=traceback,
        due_at=None if due_at is None else _time(due_at),
    )


def requeue_dead_letters(
    writer: sqlite3.Connection, argument: tuple[str, list[int], float]
) -> list[int]:
    """Set the letters' due_at, in a write transaction (in a worker thread)."""
    consumer, seqs, after = argument
    # Taken under the write lock, as append takes created_at.
    now = datetime.datetime.now(datetime.UTC)
    due_at = _micros(now) + round(after * 1_000_000)
    return [
        seq
        for seq in seqs
        if writer.execute(_REQUEUE_DEAD_LETTER, (due_at, consumer, seq)).rowcount
    ]


def discard_dead_letters(
    writer: sqlite3.Connection, argument: tuple[str, list[int], float]
) -> list[int]:
    """Delete letters, in a write transaction (in a worker thread)."""
    consumer, seqs, _ = argument
    return [seq for seq in seqs if writer.execute(_DISCARD_DEAD_LETTER, (consumer, seq)).rowcount]


def forget_consumer(writer: sqlite3.Connection, consumer: str) -> None:
    """Delete a consumer's letters and cursor, in a write transaction (in a worker thread)."""
    for statement in _FORGET_CONSUMER:
        writer.execute(statement, (consumer,))


def claim_leases(writer: sqlite3.Connection, argument: tuple[str, list[str], float]) -> list[Lease]:
    """Take or renew ``holder``'s leases on the keys, in a write transaction (in a worker
    thread); return every key's lease as it stands, in the order of the keys given."""
    holder, keys, ttl = argument
    # Taken under the write lock, as append takes created_at: this machine's
    # clock is the clock of every process sharing the file.
    now = _micros(datetime.datetime.now(datetime.UTC))
    expires_at = min(now + round(ttl * 1_000_000), _LATEST)
    leases = []
    for key in keys:
        writer.execute(_CLAIM_LEASE, (key, holder, expires_at, now))
        leases.append(_lease(writer.execute(_LEASE, (key,)).fetchall()[0]))
    return leases


def release_leases(writer: sqlite3.Connection, argument: tuple[str, list[str]]) -> None:
    """Make ``holder``'s live leases on the keys lapse now, in a write transaction."""
    holder, keys = argument
    now = _micros(datetime.datetime.now(datetime.UTC))
    writer.executemany(_RELEASE_LEASE, [(now, key, holder) for key in keys])


def forget_lapsed_leases(writer: sqlite3.Connection, argument: tuple[str, float]) -> int:
    """Delete the leases on keys starting with the prefix that lapsed at least the
    given seconds ago by this machine's clock, in a write transaction."""
    prefix, lapsed_for = argument
    before = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=lapsed_for)
    return writer.execute(_FORGET_LAPSED_LEASES, (prefix, _micros(before))).rowcount


def live_leases(reader: sqlite3.Connection, shown: str) -> list[Lease]:
    """Every lease that has not lapsed by this machine's clock, by key (in a worker thread)."""
    now = _micros(datetime.datetime.now(datetime.UTC))
    leases = []
    for row in reader.execute(_LIVE_LEASES, (now,)).fetchall():
        try:
            leases.append(_lease(row))
        except Exception as exc:
            raise StoreError(
                f"SQLite store {shown!r}: the lease on {row[0]!r} cannot be decoded "
                f"({type(exc).__name__}: {exc}); the file was changed by something other "
                "than trioflow: delete that row of trioflow_leases while no process uses it"
            ) from exc
    return leases


def earliest_due_at(reader: sqlite3.Connection, consumer: str) -> datetime.datetime | None:
    """The earliest due time of the consumer's requeued letters (in a worker thread)."""
    (micros,) = reader.execute(_EARLIEST_DUE_AT, (consumer,)).fetchone()
    return None if micros is None else _time(micros)


def dead_letter_counts(reader: sqlite3.Connection) -> dict[str, int]:
    """How many dead letters each consumer has (in a worker thread)."""
    return dict(reader.execute(DEAD_LETTER_COUNTS).fetchall())


def _lease(row: tuple[Any, ...]) -> Lease:
    """A `Lease` from a row of trioflow_leases: key, holder, token, expires_at."""
    key, holder, token, expires_at = row
    return Lease(key=key, holder=holder, token=token, expires_at=_time(expires_at))


def head(reader: sqlite3.Connection) -> int:
    """The highest sequence number committed (0 if none)."""
    # fetchall, not fetchone: it steps the statement to its end, which ends
    # the read transaction instead of leaving the snapshot pinned.
    found: int = reader.execute(_HEAD).fetchall()[0][0]
    return found


def read_events(
    reader: sqlite3.Connection, shown: str, after: int, limit: int, max_bytes: int | None
) -> list[Event]:
    """Fetch and build the events in the worker thread, off the trio thread."""
    events: list[Event] = []
    add = events.append
    new_uuid = uuid.UUID
    budget = math.inf if max_bytes is None else max_bytes
    total = 0
    # A batch shares one timestamp: build its datetime once.
    last_micros: int | None = None
    created_at = _EPOCH
    cursor = reader.execute(_READ, (after, limit))
    try:
        # Row by row rather than fetchall: the loop stops at the byte
        # budget without fetching the rest of the page.
        for seq, raw_id, event_type, key, data, micros in cursor:
            try:
                size = utf8_size(data)
                total += size
                if total > budget and events:
                    break
                if micros != last_micros:
                    created_at = _EPOCH + micros * _MICROSECOND
                    last_micros = micros
                add(
                    Event(
                        seq=seq,
                        id=new_uuid(bytes=raw_id),
                        type=event_type,
                        data=_decode(data),
                        key=key,
                        created_at=created_at,
                        size=size,
                    )
                )
            except Exception as exc:
                # Whatever the decoders raise (RecursionError for data
                # nested too deeply, TypeError for a blob...).
                raise StoreError(
                    f"SQLite store {shown!r}: event {seq} cannot be decoded "
                    f"({type(exc).__name__}: {exc}); the file was changed by something "
                    "other than trioflow: restore it from a backup, or delete that event"
                ) from exc
    finally:
        # Resets the statement, which ends the read transaction even when
        # the loop stopped early (else the snapshot stays pinned).
        cursor.close()
    return events


def fetch_letters(
    reader: sqlite3.Connection,
    shown: str,
    query: str,
    parameters: tuple[object, ...],
    due: bool,
) -> list[DeadLetter]:
    """Fetch and build dead letters (in a worker thread); ``due``: those due by now."""
    if due:
        parameters = (*parameters, _micros(datetime.datetime.now(datetime.UTC)))
    letters: list[DeadLetter] = []
    for row in reader.execute(query, parameters).fetchall():
        try:
            letters.append(_letter(row))
        except Exception as exc:
            raise StoreError(
                f"SQLite store {shown!r}: the dead letter of consumer {row[0]!r} at "
                f"seq {row[1]!r} cannot be decoded ({type(exc).__name__}: {exc}); the file "
                "was changed by something other than trioflow: restore it from a backup, "
                "or delete that row of trioflow_dead_letters"
            ) from exc
    return letters
