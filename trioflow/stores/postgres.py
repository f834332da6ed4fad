"""The PostgreSQL store: many processes on many machines share one event log.

``postgresql://user@host:5432/db?schema=trioflow`` keeps the log and the
cursors in a PostgreSQL schema of its own. asyncpg does the talking, from trio
through trio-asyncio (see `trioflow.stores._pg_driver`, the only module that
touches either).

Gap-free order with many writers: every append is one call of the schema's
``append`` function, which takes a transaction-scoped advisory lock, reads the
head, numbers the batch from a sequence and inserts it with one ``unnest``.
The lock is held until the transaction commits, so batches commit in the order
of their sequence numbers: a reader that has seen ``s`` has already been able
to see every event below ``s``. A rolled-back append may leave a hole in the
numbering; readers never wait for holes, they just read ``seq > after``.
docs/postgres.md explains the mechanism, its cost and the other choices.

An append whose connection fails after the statement was sent may have
committed although no answer came back (a server crash right after the commit,
a network failure). The store then finds out before it answers: once it can
reach the server again (for up to ``connect_timeout`` seconds) it waits for
the append lock, so that no append is still running, and looks the batch up by
its first event id. Found, the append succeeded and returns its real sequence
numbers; not found, it failed and nothing was persisted. Only when the server
stays out of reach does the error say that the outcome is unknown.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import math
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Final, Literal, get_args

import attrs
import trio

from .._dead_letters import DeadLetter
from .._errors import (
    ConfigurationError,
    OutcomeUnknownError,
    SchemaVersionError,
    StoreError,
    StoreUnavailableError,
    UnknownStoreError,
)
from .._events import JSON, MAX_DEPTH, Event, NewEvent
from ._base import Appended, Store
from ._masking import (
    LIBPQ_OPTIONS,
    SECRET_OPTIONS,
    dsn_secrets,
    is_plain_path,
    mask_dsn,
    scrub,
    userinfo_is_ambiguous,
)
from ._pg_driver import (
    Driver,
    DriverConfig,
    InDoubtError,
    Record,
    Transaction,
    open_driver,
    simplify_group,
)

__all__ = ["CursorDurability", "PostgresStore"]

logger = logging.getLogger("trioflow.stores.postgres")

#: How cursor commits reach the disk; see `PostgresStore`.
CursorDurability = Literal["sync", "async", "unlogged"]

#: The schema version this trioflow writes and understands.
SCHEMA_VERSION: Final = 2

DEFAULT_SCHEMA: Final = "trioflow"

# Lower-case only, so that the name means the same quoted or not; short enough
# that "<schema>_appended" fits PostgreSQL's 63-byte identifier limit.
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,47}")

# First keys of the two-int advisory locks ("tf" and a number), so they stay
# apart from other applications' locks; the second key is derived from the
# schema name, so stores on different schemas never wait for each other.
_LOCK_CLASS_MIGRATE: Final = 0x7466_0001
_LOCK_CLASS_APPEND: Final = 0x7466_0002

# Seconds between attempts to restore a lost LISTEN connection.
_MIN_BACKOFF: Final = 0.1
_MAX_BACKOFF: Final = 10.0
# How often the idle LISTEN connection is pinged, to notice a dead one.
_PING_INTERVAL: Final = 5.0

# Options of the URL's query string that asyncpg (like libpq) understands and
# that trioflow passes through unchanged.
_PASSTHROUGH_OPTIONS: Final = LIBPQ_OPTIONS

# The largest max_bytes sent to the server (a bigint): any page is smaller.
_MAX_BYTES_CAP: Final = 2**62
# A bigint's range: a seq outside it is no dead letter's.
_MIN_BIGINT: Final = -(2**63)
_MAX_BIGINT: Final = 2**63 - 1

#: The columns of a dead letter, in the order `DeadLetter` lists its fields.
_LETTER_COLUMNS: Final = (
    "consumer",
    "seq",
    "event_id",
    "type",
    "attempts",
    "first_failed_at",
    "last_failed_at",
    "reason",
    "error_type",
    "message",
    "traceback",
    "due_at",
)


def _lock_key(schema: str) -> int:
    """A stable signed 32-bit advisory lock key for ``schema``."""
    digest = hashlib.blake2b(schema.encode(), digest_size=4, person=b"trioflow").digest()
    return int.from_bytes(digest, "big", signed=True)


def _check_schema(schema: object) -> str:
    if not isinstance(schema, str) or not _SCHEMA_NAME.fullmatch(schema):
        raise ConfigurationError(
            f"PostgreSQL schema name {schema!r} is invalid: use 1 to 48 characters from "
            "a-z, 0-9 and _, not starting with a digit (for example schema=trioflow)"
        )
    if schema.startswith("pg_") or schema == "information_schema":
        raise ConfigurationError(
            f"PostgreSQL schema name {schema!r} is reserved for the system; choose another "
            "(for example schema=trioflow)"
        )
    return schema


def _display(url: str) -> str:
    """``url`` (or a libpq key/value DSN) with its secrets masked, for messages."""
    return mask_dsn(url, shown=_SHOWN_OPTIONS)


@attrs.frozen(kw_only=True)
class _Queries:
    """The store's SQL, with the (validated, quoted) schema name filled in."""

    schema: str
    lock_key: int

    @property
    def q(self) -> str:
        return f'"{self.schema}"'

    @property
    def channel(self) -> str:
        return f"{self.schema}_appended"

    @property
    def version_table(self) -> str:
        return f"{self.q}.schema_version"

    @property
    def append(self) -> str:
        return f"SELECT o_after, o_first, o_created_at FROM {self.q}.append($1, $2, $3, $4)"

    @property
    def read(self) -> str:
        # octet_length() reads the size from the value's header: it does not
        # fetch or decompress a large (TOASTed) value.
        return (
            "SELECT seq, id, type, key, data, created_at, octet_length(data::text) "
            f"FROM {self.q}.events WHERE seq > $1 ORDER BY seq LIMIT $2"
        )

    @property
    def read_bytes(self) -> str:
        # The running total is computed under the LIMIT, on the index scan,
        # and the rows past $3 bytes are dropped on the server: a page of
        # large events sends only what fits. The first row always passes
        # (its total is its own size).
        return (
            "SELECT seq, id, type, key, data, created_at, size FROM ("
            "SELECT seq, id, type, key, data, created_at, octet_length(data::text) AS size, "
            "sum(octet_length(data::text)) OVER (ORDER BY seq) AS total "
            f"FROM {self.q}.events WHERE seq > $1 ORDER BY seq LIMIT $2"
            ") AS page WHERE total <= $3 OR total = size"
        )

    @property
    def head(self) -> str:
        return f"SELECT coalesce(max(seq), 0) FROM {self.q}.events"

    @property
    def lock_append(self) -> str:
        return f"SELECT pg_advisory_xact_lock({_LOCK_CLASS_APPEND}, {self.lock_key})"

    @property
    def find_batch(self) -> str:
        # The batch's first seq and time, and the head before it: appends
        # commit in seq order, so every event below it was committed first.
        return (
            "SELECT e.seq, e.created_at, "
            f"(SELECT coalesce(max(b.seq), 0) FROM {self.q}.events AS b WHERE b.seq < e.seq) "
            f"FROM {self.q}.events AS e WHERE e.id = $1"
        )

    @property
    def load_cursors(self) -> str:
        # Both copies only ever hold positions the consumer reached: the
        # greater one is its cursor (the unlogged row may be newer than its
        # logged checkpoint, or lost; greatest() skips a missing one).
        return (
            "SELECT coalesce(u.consumer, c.consumer), greatest(u.seq, c.seq) "
            f"FROM {self.q}.cursors AS c FULL JOIN {self.q}.cursors_unlogged AS u "
            "ON u.consumer = c.consumer"
        )

    @property
    def high_water(self) -> str:
        # The highest seq the log has ever given: the sequence's last value
        # (its start value, before any nextval, is not given yet) or, should
        # the sequence lag behind, the highest event.
        return (
            "SELECT greatest("
            f"(SELECT coalesce(max(seq), 0) FROM {self.q}.events), "
            "(SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END "
            f"FROM {self.q}.events_seq))"
        )

    @property
    def cursors_past_high_water(self) -> str:
        return (
            f"SELECT c.consumer, c.seq, h.seq FROM ({self.load_cursors}) AS c(consumer, seq), "
            f"({self.high_water}) AS h(seq) WHERE c.seq > h.seq ORDER BY c.seq DESC, c.consumer"
        )

    def _upsert(self, table: str, source: str) -> str:
        # greatest(): a stored cursor never moves backwards, whatever order
        # commits from several processes arrive in.
        return (
            f"INSERT INTO {self.q}.{table} AS stored (consumer, seq, updated_at) "
            f"SELECT t.consumer, t.seq, now() FROM {source} "
            "ON CONFLICT (consumer) DO UPDATE SET seq = greatest(stored.seq, excluded.seq), "
            "updated_at = excluded.updated_at"
        )

    @property
    def commit_cursors_sync(self) -> str:
        return self._upsert("cursors", "unnest($1::text[], $2::bigint[]) AS t(consumer, seq)")

    @property
    def commit_cursors_async(self) -> str:
        # set_config(..., true) lasts until the end of this statement's own
        # transaction, so its commit does not wait for the WAL flush.
        return self._upsert(
            "cursors",
            "unnest($1::text[], $2::bigint[]) AS t(consumer, seq) CROSS JOIN "
            "(SELECT set_config('synchronous_commit', 'off', true)) AS settings",
        )

    @property
    def commit_cursors_unlogged(self) -> str:
        return self._upsert(
            "cursors_unlogged", "unnest($1::text[], $2::bigint[]) AS t(consumer, seq)"
        )

    @property
    def record_dead_letter(self) -> str:
        # One statement, one transaction: the letter (replacing one of the
        # same consumer and seq) and the consumer's cursor in the logged
        # table, $13 (NULL: left alone). Logged, and committed with the
        # server's synchronous_commit whatever cursor_durability says: see
        # docs/postgres.md, "Dead letters".
        columns = ", ".join(_LETTER_COLUMNS)
        values = ", ".join(f"${number}" for number in range(1, len(_LETTER_COLUMNS) + 1))
        replace = ", ".join(f"{column} = excluded.{column}" for column in _LETTER_COLUMNS[2:])
        letter = (
            f"INSERT INTO {self.q}.dead_letters ({columns}) VALUES ({values}) "
            f"ON CONFLICT (consumer, seq) DO UPDATE SET {replace}"
        )
        cursor = self._upsert(
            "cursors",
            "(VALUES ($1::text, $13::bigint)) AS t(consumer, seq) WHERE t.seq IS NOT NULL",
        )
        return f"WITH letter AS ({letter}) {cursor}"

    @property
    def dead_letters(self) -> str:
        # consumer is COLLATE "C": code-point order, whatever the database's.
        return (
            f"SELECT {', '.join(_LETTER_COLUMNS)} FROM {self.q}.dead_letters ORDER BY consumer, seq"
        )

    @property
    def dead_letters_of(self) -> str:
        return (
            f"SELECT {', '.join(_LETTER_COLUMNS)} FROM {self.q}.dead_letters "
            "WHERE consumer = $1 ORDER BY seq"
        )

    @property
    def due_dead_letters(self) -> str:
        # The database's clock, as requeue's: the host's plays no part.
        return (
            f"SELECT {', '.join(_LETTER_COLUMNS)} FROM {self.q}.dead_letters "
            "WHERE consumer = $1 AND due_at <= now() ORDER BY seq"
        )

    @property
    def requeue_dead_letters(self) -> str:
        return (
            f"WITH requeued AS (UPDATE {self.q}.dead_letters "
            "SET due_at = now() + $3::float8 * interval '1 second' "
            "WHERE consumer = $1 AND seq = ANY($2::bigint[]) RETURNING seq) "
            "SELECT seq FROM requeued ORDER BY seq"
        )

    @property
    def discard_dead_letters(self) -> str:
        return (
            f"WITH discarded AS (DELETE FROM {self.q}.dead_letters "
            "WHERE consumer = $1 AND seq = ANY($2::bigint[]) RETURNING seq) "
            "SELECT seq FROM discarded ORDER BY seq"
        )

    @property
    def forget_consumer(self) -> str:
        # One statement, one transaction: the letters and both copies of the cursor.
        return (
            f"WITH letters AS (DELETE FROM {self.q}.dead_letters WHERE consumer = $1), "
            f"fast AS (DELETE FROM {self.q}.cursors_unlogged WHERE consumer = $1) "
            f"DELETE FROM {self.q}.cursors WHERE consumer = $1"
        )

    @property
    def commit_cursors_unlogged_checkpoint(self) -> str:
        # One statement, one transaction: the unlogged rows for every consumer
        # and the logged checkpoint for those ($3, $4) whose checkpoint is due.
        fast = self._upsert(
            "cursors_unlogged", "unnest($1::text[], $2::bigint[]) AS t(consumer, seq)"
        )
        checkpoint = self._upsert("cursors", "unnest($3::text[], $4::bigint[]) AS t(consumer, seq)")
        return f"WITH fast AS ({fast}) {checkpoint}"

    def migrations(self) -> dict[int, str]:
        """SQL bringing the schema from version ``n - 1`` to ``n``, by ``n``."""
        q = self.q
        return {
            # data is json, not jsonb: jsonb rewrites numbers (1e23 comes back
            # as the integer 100000000000000000000000) and reorders keys, and a
            # replay must hand consumers exactly what live delivery did.
            1: f"""
CREATE TABLE {q}.events (
    seq bigint PRIMARY KEY,
    id uuid NOT NULL UNIQUE,
    type text NOT NULL,
    key text,
    data json NOT NULL,
    created_at timestamptz NOT NULL
);
CREATE SEQUENCE {q}.events_seq AS bigint OWNED BY {q}.events.seq;
CREATE TABLE {q}.cursors (
    consumer text PRIMARY KEY,
    seq bigint NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE UNLOGGED TABLE {q}.cursors_unlogged (
    consumer text PRIMARY KEY,
    seq bigint NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE FUNCTION {q}.append(
    p_ids uuid[], p_types text[], p_keys text[], p_data json[],
    OUT o_after bigint, OUT o_first bigint, OUT o_created_at timestamptz
) LANGUAGE plpgsql AS $append$
BEGIN
    -- Held until this transaction ends: batches commit in sequence order.
    PERFORM pg_advisory_xact_lock({_LOCK_CLASS_APPEND}, {self.lock_key});
    SELECT coalesce(max(seq), 0) INTO o_after FROM {q}.events;
    -- The sequence never goes back, even if events are deleted; greatest()
    -- keeps numbers unique should it ever lag behind the table.
    o_first := greatest(nextval('{q}.events_seq'), o_after + 1);
    PERFORM setval('{q}.events_seq', o_first + cardinality(p_ids) - 1);
    o_created_at := clock_timestamp();
    INSERT INTO {q}.events (seq, id, type, key, data, created_at)
    SELECT o_first + u.ord - 1, u.id, u.type, u.key, u.data, o_created_at
    FROM unnest(p_ids, p_types, p_keys, p_data) WITH ORDINALITY AS u(id, type, key, data, ord);
    PERFORM pg_notify('{self.channel}', '');
END
$append$;
""",
            # Dead letters, one row per consumer and seq. consumer sorts by
            # code point ("C"), as the store contract lists letters. The
            # partial index holds the requeued letters only: looking for due
            # ones never scans the parked ones, however many pile up.
            2: f"""
CREATE TABLE {q}.dead_letters (
    consumer text COLLATE "C" NOT NULL,
    seq bigint NOT NULL,
    event_id uuid NOT NULL,
    type text NOT NULL,
    attempts bigint NOT NULL,
    first_failed_at timestamptz NOT NULL,
    last_failed_at timestamptz NOT NULL,
    reason text NOT NULL,
    error_type text NOT NULL,
    message text NOT NULL,
    traceback text NOT NULL,
    due_at timestamptz,
    PRIMARY KEY (consumer, seq)
);
CREATE INDEX dead_letters_due ON {q}.dead_letters (consumer, due_at) WHERE due_at IS NOT NULL;
""",
        }


class PostgresStore(Store):
    """An event log, cursor table and dead letters in a PostgreSQL schema.

    Processes on any number of machines may open stores on the same schema at
    once: they see each other's events in one order, and ``wait_for_append``
    wakes at once (through LISTEN/NOTIFY) when any of them appends. One
    instance may be open only once at a time.

    Args:
        dsn: A ``postgresql://`` URL that asyncpg understands, without
            trioflow's options; see `from_url`.
        schema: The PostgreSQL schema holding trioflow's tables, created on
            first use.
        pool_min_size: Connections opened when the store opens.
        pool_max_size: Most pooled connections (one more is used for LISTEN).
        poll_interval: Seconds ``wait_for_append`` waits for a notification
            before re-checking the head anyway: notifications wake waiters at
            once, this only bounds the delay when one was lost (while the
            LISTEN connection reconnects, or behind a transaction pooler).
            Kept in the `Store.poll_interval` attribute, which
            ``App(poll_interval=...)`` overrides.
        cursor_durability: ``"sync"`` (default): a cursor commit is on disk when
            ``commit_cursors`` returns. ``"async"``: the commit does not wait
            for the WAL flush; a server crash can lose the last ~0.6 s (three
            ``wal_writer_delay``) of cursor commits. ``"unlogged"``: cursors go
            to an UNLOGGED table plus a logged checkpoint per consumer at most
            every ``cursor_checkpoint_interval`` seconds; a server crash or
            failover loses up to that long of cursor progress. Events are
            always durable; lost cursor progress means redelivery, never loss.
        cursor_checkpoint_interval: For ``"unlogged"``: seconds between a
            consumer's logged checkpoints.
        connect_timeout: Seconds to wait for a new connection.
        command_timeout: Seconds any one statement may run (None: no limit).
        cleanup_timeout: Seconds a cancelled call may spend rolling back and
            returning its connection before the connection is closed instead.
        statement_cache_size: Prepared statements kept per connection; 0 for
            transaction-mode poolers such as PgBouncer.
        application_name: Shown in ``pg_stat_activity``.

    Raises:
        ConfigurationError: An option is out of range.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        pool_min_size: int = 1,
        pool_max_size: int = 10,
        poll_interval: float = 1.0,
        cursor_durability: CursorDurability = "sync",
        cursor_checkpoint_interval: float = 5.0,
        connect_timeout: float = 10.0,
        command_timeout: float | None = None,
        cleanup_timeout: float = 5.0,
        statement_cache_size: int = 100,
        application_name: str = "trioflow",
    ) -> None:
        _check_schema(schema)
        if not isinstance(dsn, str) or not dsn:
            # Not its repr: whatever it is, it may hold a password.
            got = "an empty str" if dsn == "" else type(dsn).__name__
            raise ConfigurationError(f"PostgreSQL DSN must be a non-empty str, got {got}")
        if not 0 <= pool_min_size <= pool_max_size or pool_max_size < 1:
            raise ConfigurationError(
                f"pool sizes must satisfy 0 <= pool_min_size <= pool_max_size and "
                f"pool_max_size >= 1, got {pool_min_size} and {pool_max_size}"
            )
        for name, value in [
            ("poll_interval", poll_interval),
            ("cursor_checkpoint_interval", cursor_checkpoint_interval),
            ("connect_timeout", connect_timeout),
            ("cleanup_timeout", cleanup_timeout),
            ("command_timeout", 1.0 if command_timeout is None else command_timeout),
        ]:
            if not isinstance(value, int | float) or not 0 < value < math.inf:
                raise ConfigurationError(
                    f"{name} must be a positive number of seconds, got {value!r}"
                )
        if cursor_durability not in get_args(CursorDurability):
            raise ConfigurationError(
                f"cursor_durability must be one of {', '.join(get_args(CursorDurability))}, "
                f"got {cursor_durability!r}"
            )
        if statement_cache_size < 0:
            raise ConfigurationError(
                f"statement_cache_size must be >= 0, got {statement_cache_size!r}"
            )
        self.schema = schema
        self.cursor_durability: CursorDurability = cursor_durability
        self.poll_interval = float(poll_interval)
        self._checkpoint_interval = float(cursor_checkpoint_interval)
        self._sql = _Queries(schema=schema, lock_key=_lock_key(schema))
        self._config = DriverConfig(
            dsn=dsn,
            min_size=pool_min_size,
            max_size=pool_max_size,
            connect_timeout=float(connect_timeout),
            command_timeout=None if command_timeout is None else float(command_timeout),
            cleanup_timeout=float(cleanup_timeout),
            statement_cache_size=statement_cache_size,
            server_settings={"application_name": application_name},
            # The append function reads the head after taking its lock; that
            # needs a fresh snapshot per statement.
            read_committed=True,
        )
        self._driver: Driver | None = None
        #: The masked URL the store was built from, if any (see `from_url`).
        self._shown_as: str | None = None
        self._opened = False
        self._appended = trio.Event()
        #: The highest sequence number known to be committed: from this
        #: instance's own appends and head reads.
        self._known_head = 0
        #: Whether another process may have appended since the head was last
        #: read (a notification from a backend not in our pool, a lost LISTEN
        #: connection, a poll interval without any): `wait_for_append` then
        #: reads the head; otherwise it trusts `_known_head`.
        self._stale = True
        self._checkpointed_at: dict[str, float] = {}
        #: Test hook: awaited between the insert and the commit of every
        #: append (which then takes two more round trips). Internal.
        self._before_commit: Callable[[], Awaitable[None]] | None = None

    @classmethod
    def from_url(cls, url: str) -> PostgresStore:
        """Build a store from ``postgresql://user:password@host:port/db?options``.

        trioflow's options (the keyword arguments of `PostgresStore`, for
        example ``schema=trioflow&pool_max_size=20&cursor_durability=async``)
        are taken out of the query string; libpq connection options that
        asyncpg understands (``sslmode``, ``host``, ``passfile``, ...) are
        passed on. ``application_name`` is accepted too.

        Raises:
            UnknownStoreError: The URL is malformed or has an unknown or invalid
                option.
        """
        if not isinstance(url, str):
            raise UnknownStoreError(
                f"a PostgreSQL store URL must be a str, got {type(url).__name__}"
            )
        display = _display(url)
        secrets = dsn_secrets(url, shown=_SHOWN_OPTIONS)

        def refuse(problem: str) -> UnknownStoreError:
            return UnknownStoreError(f"store URL {display}{problem}")

        def quote(value: object) -> str:
            # A value quoted back (a schema name, say) may hold a piece of a
            # password that a malformed URL put out of place.
            return scrub(str(value), secrets)

        if any(ord(char) < 32 or char == "\x7f" for char in url):
            # URL parsers drop some (tabs, line breaks) and keep others: what
            # is connected to would not be what is shown.
            raise refuse(" holds control characters (a line break, say); remove them")
        if userinfo_is_ambiguous(url):
            # Readers of URLs disagree about where such a userinfo ends: a
            # piece of the password could become the host, the database or an
            # option, and be quoted back.
            raise refuse(
                " is malformed: an '@', '/', '?' or '#' in the user name or password must be "
                "percent-encoded (%40, %2F, %3F, %23), and so must any other '@' (in the "
                "database name or an option's value)"
            )
        try:
            parts = urllib.parse.urlsplit(url)
            _ = parts.port  # raises ValueError on a bad port
        except ValueError as exc:
            raise refuse(f" is malformed: {_url_problem(exc)}") from None
        if parts.scheme.lower() not in ("postgresql", "postgres"):
            raise refuse(" is not a PostgreSQL URL; use postgresql://user@host/db")
        if parts.fragment:
            raise refuse(" has a #fragment; remove it")
        if not is_plain_path(parts.path):
            raise refuse(
                " is malformed: its path must be a database name, with characters other than "
                "letters, digits and ._-~$ percent-encoded (a space as %20)"
            )
        try:
            pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            if parts.query:
                raise refuse(
                    ": cannot parse the query string; use ?name=value&name=value"
                ) from None
            pairs = []
        options: dict[str, str] = {}
        for name, value in pairs:
            if name in options:
                raise refuse(f" gives option {quote(name)!r} twice")
            options[name] = value
        kwargs: dict[str, object] = {}
        for name, convert in _URL_OPTIONS.items():
            if name in options:
                raw = options.pop(name)
                try:
                    kwargs[name] = convert(raw)
                except ValueError:
                    raise refuse(
                        f": option {name}={quote(raw)!r} is not valid: "
                        f"expected {_URL_OPTION_KINDS[name]}"
                    ) from None
        unknown = sorted(set(options) - _PASSTHROUGH_OPTIONS)
        if unknown:
            raise refuse(
                f": unknown option(s) {quote(', '.join(unknown))}; trioflow "
                f"knows {', '.join(sorted(_URL_OPTIONS))} and passes on "
                f"{', '.join(sorted(_PASSTHROUGH_OPTIONS))}"
            )
        dsn = urllib.parse.urlunsplit(
            ("postgresql", parts.netloc, parts.path, urllib.parse.urlencode(options), "")
        )
        try:
            store = cls(dsn, **kwargs)  # type: ignore[arg-type]
        except ConfigurationError as exc:
            raise refuse(f": {quote(exc)}") from None
        # Shown as the URL it came from (its options too), masked as that URL
        # is: a damaged URL may have put a secret out of place (in the
        # schema, say), where the rebuilt DSN would show it.
        store._shown_as = display if "schema" in kwargs else f"{display} schema={store.schema!r}"
        store._config = attrs.evolve(
            store._config,
            display=display,
            secrets=tuple(sorted({*secrets, *store._config.secrets}, key=len, reverse=True)),
        )
        return store

    def __repr__(self) -> str:
        if self._shown_as is not None:
            return f"<PostgresStore {self._shown_as}>"
        return f"<PostgresStore {self._config.display} schema={self.schema!r}>"

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[None]:
        """Connect, create or migrate the schema, start listening; close on exit.

        Raises:
            ConfigurationError: This instance is already open.
            StoreUnavailableError: The server cannot be reached or refused the
                login, or the database does not exist.
            SchemaVersionError: The schema was written by a newer trioflow.
            StoreError: The database's encoding is not UTF8; the schema
                cannot be created (for example, the role may not create
                schemas in this database); or a consumer's cursor is past
                every sequence number the log has given (the log was reset
                or replaced under its cursors).
        """
        if self._opened:
            raise ConfigurationError(
                f"{self!r} is already open; share the open store, or make another "
                "PostgresStore for the same URL"
            )
        self._opened = True
        # Nothing is known of the log until the head is read again.
        self._known_head, self._stale = 0, True
        body_error: BaseException | None = None
        error: BaseException | None = None
        try:
            async with open_driver(self._config) as driver:
                await self._check_encoding(driver)
                await self._migrate(driver)
                await self._check_high_water(driver)
                async with trio.open_nursery() as nursery:
                    await nursery.start(self._listen_forever, driver)
                    self._driver = driver
                    try:
                        yield
                    except BaseException as exc:
                        body_error = exc
                        raise
                    finally:
                        self._driver = None
                        nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The listener's nursery wraps whatever crosses it in an exception
            # group; callers expect the block's own exception, or the one
            # StoreError that made opening fail.
            error = simplify_group(group, body_error)
            if error is group:
                raise
        finally:
            self._opened = False
            self._checkpointed_at.clear()
        if error is not None:
            raise error

    async def append(self, events: Sequence[NewEvent]) -> Appended:
        """Commit ``events`` in one round trip; see the module docstring for the order."""
        driver = self._require_open()
        if not events:
            head = await self.head()
            return Appended(
                after=head,
                seqs=range(head + 1, head + 1),
                created_at=datetime.datetime.now(datetime.UTC),
            )
        args = (
            [event.id for event in events],
            [event.type for event in events],
            [event.key for event in events],
            [event.payload for event in events],
        )
        operation = f"appending {len(events)} event(s)"
        row: Record | None
        try:
            if self._before_commit is None:
                row = await driver.fetchrow_write(self._sql.append, *args, operation=operation)
            else:
                async with driver.transaction(operation=operation) as transaction:
                    row = await transaction.fetchrow(self._sql.append, *args)
                    await self._before_commit()
        except InDoubtError as exc:
            appended = await self._settle_in_doubt(driver, events, exc)
        else:
            assert row is not None
            after, first, created_at = row[0], row[1], row[2]
            appended = Appended(
                after=after, seqs=range(first, first + len(events)), created_at=created_at
            )
        if appended.seqs:
            self._known_head = max(self._known_head, appended.seqs[-1])
        # Its own NOTIFY comes back from a backend in our pool and is ignored
        # (`_on_notify`): waiters learn of it here, with no query.
        self._wake()
        return appended

    async def _settle_in_doubt(
        self, driver: Driver, events: Sequence[NewEvent], error: InDoubtError
    ) -> Appended:
        """Find out whether an append whose answer was lost (or late) committed.

        Tries for up to ``connect_timeout`` seconds, with backoff, to take the
        append lock (so that the lost append, if its server session still
        runs, has ended) and look up the batch's first event.

        Raises:
            StoreUnavailableError: The batch was not committed (the message
                says so).
            OutcomeUnknownError: The server could not be asked in time.
        """
        first_id = events[0].id
        display = self._config.display
        window = self._config.connect_timeout
        appending = f"appending {len(events)} event(s)"
        if error.timed_out:
            # The server was reachable: the statement was cancelled after
            # command_timeout, and may have committed just before.
            failure = f"{appending} to PostgreSQL at {display} ran past command_timeout"
            unchecked = "could not check within"
        else:
            failure = f"lost the connection to PostgreSQL at {display} while {appending}"
            unchecked = "could not reach it again within"
        logger.warning("trioflow: %s (%s); checking whether it committed", failure, error)
        backoff = _MIN_BACKOFF
        last: StoreError = error
        found: Record | None = None
        looked = False
        with trio.move_on_after(window):
            while True:
                try:
                    async with driver.transaction(
                        operation=f"checking whether {appending} committed"
                    ) as tx:
                        await tx.execute(self._sql.lock_append)
                        # A new statement, so a new snapshot: taken after the lock.
                        found = await tx.fetchrow(self._sql.find_batch, first_id)
                        looked = True
                    break
                except StoreError as exc:
                    if looked:
                        # Only ending the read-only transaction failed: the answer stands.
                        break
                    last = exc
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
        if not looked:
            since = "" if last is error else f"; then: {last}"
            raise OutcomeUnknownError(
                f"{failure}, and {unchecked} {window}s (connect_timeout) whether it "
                f"committed: whether they were committed is unknown. If they were, every "
                f"consumer receives them; look for event id {first_id} before publishing "
                f"them again ({error}{since})"
            ) from error
        if found is None:
            raise StoreUnavailableError(
                f"{failure}; checked afterwards: they were not committed, nothing was "
                f"persisted, and retrying is safe ({error})"
            ) from error
        first, created_at, after = found[0], found[1], found[2]
        logger.warning(
            "trioflow: the append of %d event(s) whose answer was lost or late had committed "
            "(seq %d)",
            len(events),
            first,
        )
        return Appended(after=after, seqs=range(first, first + len(events)), created_at=created_at)

    async def read(
        self, after: int, limit: int, *, max_bytes: int | None = None
    ) -> Sequence[Event]:
        """Return up to ``limit`` events with ``seq > after``, in order.

        With ``max_bytes``, the page is cut on the server, before the event
        that would take its total size past ``max_bytes`` (the first event
        always comes): large events beyond the cut are never sent.

        Raises:
            StoreError: The server failed, or a stored event's data cannot be
                decoded (the message names its sequence number).
        """
        driver = self._require_open()
        operation = f"reading events after seq {after}"
        if max_bytes is None:
            rows = await driver.fetch(self._sql.read, after, max(limit, 0), operation=operation)
        else:
            rows = await driver.fetch(
                self._sql.read_bytes,
                after,
                max(limit, 0),
                min(max_bytes, _MAX_BYTES_CAP),
                operation=operation,
            )
        if not rows:
            return []
        datas = self._decode_page(rows)
        return [
            Event(
                seq=row[0],
                id=row[1],
                type=row[2],
                data=data,
                key=row[3],
                created_at=row[5],
                size=row[6],
            )
            for row, data in zip(rows, datas, strict=True)
        ]

    def _decode_page(self, rows: Sequence[Record]) -> list[JSON]:
        """The data of a page of rows, decoded.

        One decode call for the whole page: the column holds valid JSON texts
        (PostgreSQL checked them), so joined they are one valid array, and
        one call costs a third less than one call per event. The array adds a
        level of nesting to every event, though, and PostgreSQL accepts JSON
        that Python cannot decode (a number of more than 4300 digits, nesting
        deeper than the recursion limit allows). So when the page fails, its
        events are decoded one by one, at the same depth of the call stack:
        the page fails only for an event that cannot be decoded alone, and
        says which.

        Raises:
            StoreError: An event cannot be decoded; the message names it.
        """
        try:
            datas: list[JSON] = _decode_json("[" + ",".join([row[4] for row in rows]) + "]")
        except Exception:
            datas = []
            for row in rows:
                try:
                    datas.append(_decode_json(row[4]))
                except Exception as exc:
                    raise self._undecodable(row, exc) from exc
        return datas

    def _undecodable(self, row: Record, error: Exception) -> StoreError:
        reason = str(error)
        reason = reason if len(reason) <= 300 else reason[:297] + "..."
        return StoreError(
            f"event seq {row[0]} (id {row[1]}) in PostgreSQL schema {self.schema!r} at "
            f"{self._config.display} cannot be decoded: {type(error).__name__}: {reason}. "
            "Its data is JSON that PostgreSQL accepted but Python cannot read, which publish "
            f"never stores (it refuses data nested deeper than {MAX_DEPTH} levels, say): the "
            "row was written some other way. Repair or delete it (UPDATE or DELETE FROM "
            f"{self._sql.q}.events WHERE seq = {row[0]}); until then no consumer can read "
            "past it"
        )

    async def head(self) -> int:
        """Return the highest committed sequence number (0 for an empty log)."""
        driver = self._require_open()
        head: int = await driver.fetchval(self._sql.head, operation="reading the head of the log")
        self._known_head = max(self._known_head, head)
        return head

    async def load_cursors(self) -> dict[str, int]:
        """Return every consumer's cursor (the greater of its unlogged and logged copies)."""
        driver = self._require_open()
        rows = await driver.fetch(self._sql.load_cursors, operation="loading the cursors")
        return {row[0]: row[1] for row in rows}

    async def commit_cursors(self, cursors: Mapping[str, int]) -> None:
        """Move the given cursors forward, as durably as ``cursor_durability`` says.

        A cursor below the stored one is ignored: stored cursors never move
        backwards (in the unlogged table and its logged checkpoint alike).
        """
        driver = self._require_open()
        if not cursors:
            await trio.lowlevel.checkpoint()
            return
        names = list(cursors)
        seqs = [cursors[name] for name in names]
        operation = f"committing the cursors of {len(names)} consumer(s)"
        if self.cursor_durability == "sync":
            await driver.execute(self._sql.commit_cursors_sync, names, seqs, operation=operation)
        elif self.cursor_durability == "async":
            await driver.execute(self._sql.commit_cursors_async, names, seqs, operation=operation)
        else:
            now = trio.current_time()
            due = [
                name
                for name in names
                if now - self._checkpointed_at.get(name, -math.inf) >= self._checkpoint_interval
            ]
            if due:
                await driver.execute(
                    self._sql.commit_cursors_unlogged_checkpoint,
                    names,
                    seqs,
                    due,
                    [cursors[name] for name in due],
                    operation=operation,
                )
                for name in due:
                    self._checkpointed_at[name] = now
            else:
                await driver.execute(
                    self._sql.commit_cursors_unlogged, names, seqs, operation=operation
                )

    async def record_dead_letter(self, letter: DeadLetter, *, cursor: int | None) -> None:
        """Keep ``letter`` and move its consumer's cursor forward, in one statement.

        See `Store.record_dead_letter`. Whatever ``cursor_durability`` says, the
        cursor goes to the logged cursor table and the statement commits as
        durably as the server's ``synchronous_commit`` makes it: a letter and
        the cursor past it survive a server crash together. (An unlogged
        cursor lost in a crash would redeliver an event that has a letter; a
        lost letter under a kept cursor would lose the event.)

        A connection lost while the statement ran leaves it committed or not;
        recording the same letter and cursor again is safe.
        """
        driver = self._require_open()
        await driver.execute(
            self._sql.record_dead_letter,
            *[getattr(letter, column) for column in _LETTER_COLUMNS],
            cursor,
            operation=f"recording the dead letter of consumer {letter.consumer!r} at seq "
            f"{letter.seq}",
        )

    async def dead_letters(self, consumer: str | None = None) -> list[DeadLetter]:
        """Return the dead letters of ``consumer`` (or of all), by consumer then seq."""
        driver = self._require_open()
        if consumer is None:
            rows = await driver.fetch(self._sql.dead_letters, operation="listing the dead letters")
        else:
            rows = await driver.fetch(
                self._sql.dead_letters_of,
                consumer,
                operation=f"listing the dead letters of consumer {consumer!r}",
            )
        return [_letter(row) for row in rows]

    async def requeue_dead_letters(
        self, consumer: str, seqs: Sequence[int], *, after: float = 0.0
    ) -> list[int]:
        """Hand these letters back ``after`` seconds from now, by the database's clock.

        See `Store.requeue_dead_letters`; one statement.
        """
        return await self._change_letters(
            self._sql.requeue_dead_letters,
            f"requeueing dead letters of consumer {consumer!r}",
            consumer,
            seqs,
            float(after),
        )

    async def due_dead_letters(self, consumer: str) -> list[DeadLetter]:
        """Return ``consumer``'s requeued letters due by the database's clock, by seq."""
        driver = self._require_open()
        rows = await driver.fetch(
            self._sql.due_dead_letters,
            consumer,
            operation=f"looking for due dead letters of consumer {consumer!r}",
        )
        return [_letter(row) for row in rows]

    async def discard_dead_letters(self, consumer: str, seqs: Sequence[int]) -> list[int]:
        """Delete these letters of ``consumer``; return the seqs that existed, ascending."""
        return await self._change_letters(
            self._sql.discard_dead_letters,
            f"discarding dead letters of consumer {consumer!r}",
            consumer,
            seqs,
        )

    async def forget_consumer(self, consumer: str) -> None:
        """Delete ``consumer``'s dead letters and both copies of its cursor, in one statement."""
        driver = self._require_open()
        await driver.execute(
            self._sql.forget_consumer, consumer, operation=f"forgetting consumer {consumer!r}"
        )
        # Should it come back, its first unlogged commit writes a checkpoint at once.
        self._checkpointed_at.pop(consumer, None)

    async def _change_letters(
        self, query: str, operation: str, consumer: str, seqs: Sequence[int], *more: object
    ) -> list[int]:
        """Run ``query`` on the letters of ``consumer`` at ``seqs``; return the seqs it found."""
        driver = self._require_open()
        # A seq a bigint cannot hold is no letter's: left out rather than failing the call.
        wanted = sorted({seq for seq in seqs if _MIN_BIGINT <= seq <= _MAX_BIGINT})
        if not wanted:
            await trio.lowlevel.checkpoint()
            return []
        rows = await driver.fetch(query, consumer, wanted, *more, operation=operation)
        return [row[0] for row in rows]

    async def wait_for_append(self, after: int) -> int:
        """Return the head once it is past ``after``: on NOTIFY, or after a fallback poll.

        The head is read only when another process may have appended (see
        `_stale`); this instance's own appends are known without a query.
        Returns early, with ``after``, when the server cannot be reached.
        """
        self._require_open()
        poll_interval = math.inf if self.poll_interval is None else self.poll_interval
        while True:
            # Take the event before reading the head: an append or notification
            # that lands while the head is read sets this very event, so it
            # cannot be missed.
            appended = self._appended
            if self._known_head > after:
                await trio.lowlevel.checkpoint()
                return self._known_head
            if self._stale:
                self._stale = False
                try:
                    head = await self.head()
                except StoreUnavailableError as exc:
                    # The server is away (restarting, say): wait as a poll
                    # would. The caller's next read reports the outage if it
                    # lasts; failing here would only stop a consumer's wait
                    # loop that has nothing to fix.
                    logger.debug("trioflow: head unavailable while waiting for appends: %s", exc)
                    self._stale = True
                    with trio.move_on_after(poll_interval):
                        await appended.wait()
                    return after
                if head > after:
                    return head
            with trio.move_on_after(poll_interval) as poll:
                await appended.wait()
            if poll.cancelled_caught:
                self._stale = True

    def _require_open(self) -> Driver:
        driver = self._driver
        if driver is None:
            raise StoreError(
                f"{self!r} is not open; call its methods inside `async with store.open():`"
            )
        return driver

    def _wake(self) -> None:
        self._appended.set()
        self._appended = trio.Event()

    def _on_notify(self, pid: int) -> None:
        """A notification: an append committed, by us (ignored) or another process."""
        driver = self._driver
        if driver is not None and driver.is_pool_backend(pid):
            return
        self._stale = True
        self._wake()

    async def _listen_forever(
        self, driver: Driver, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep a LISTEN connection up, reconnecting with backoff; wake waiters on NOTIFY."""
        started = False
        backoff = _MIN_BACKOFF

        def on_listening() -> None:
            nonlocal started, backoff
            backoff = _MIN_BACKOFF
            # Notifications sent while we were not listening are lost: let
            # waiters re-read the head.
            self._stale = True
            self._wake()
            if not started:
                started = True
                task_status.started()
            else:
                logger.info("trioflow: LISTEN connection to %s restored", driver.config.display)

        while True:
            try:
                await driver.listen(
                    self._sql.channel,
                    self._on_notify,
                    on_listening=on_listening,
                    ping_interval=_PING_INTERVAL,
                )
            except StoreError as exc:
                if not started:
                    raise
                logger.warning(
                    "trioflow: LISTEN connection failed (%s); polling every %ss until it is "
                    "back, retrying in %.1fs",
                    exc,
                    self.poll_interval,
                    backoff,
                )
            await trio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)

    async def _check_encoding(self, driver: Driver) -> None:
        """Refuse a database whose encoding is not UTF8, before anything is created in it.

        Events are UTF-8 JSON: in another encoding, an event holding a
        character the encoding lacks fails its whole batch (and the publishes
        grouped with it), long after the store opened.
        """
        row = await driver.fetchrow(
            "SELECT current_setting('server_encoding'), current_database()",
            operation="checking the database's encoding",
        )
        assert row is not None
        encoding, database = row[0], row[1]
        if encoding != "UTF8":
            raise StoreError(
                f"PostgreSQL database {database!r} at {self._config.display} uses the "
                f"{encoding} encoding; trioflow stores events as UTF-8 JSON, and a character "
                f"{encoding} cannot hold would fail every publish batched with it. Use a UTF8 "
                "database: CREATE DATABASE <name> ENCODING 'UTF8' TEMPLATE template0 (with "
                "LC_COLLATE and LC_CTYPE of a UTF-8 locale, or 'C')"
            )

    async def _check_high_water(self, driver: Driver) -> None:
        """Refuse a log whose cursors are past every sequence number it has given.

        Cursors only ever hold positions consumers reached. One above the
        log's high-water mark means the log was reset (its sequence
        restarted) or replaced (a restored or recreated events table) while
        the cursors were kept: new events would be numbered at or below those
        cursors, and their consumers would skip them.
        """
        rows = await driver.fetch(
            self._sql.cursors_past_high_water, operation="checking cursors against the log"
        )
        if not rows:
            return
        high = rows[0][2]
        shown = ", ".join(f"{consumer!r} at {seq}" for consumer, seq, _ in rows[:10])
        more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
        raise StoreError(
            f"PostgreSQL schema {self.schema!r} at {self._config.display} holds cursors past "
            f"every sequence number its event log has given (its high-water mark is {high}): "
            f"consumer(s) {shown}{more}. The log was reset or replaced under its cursors, and "
            "new events would be numbered at or below them: those consumers would skip them. "
            "If the store points at the wrong database or schema, fix its URL; if the log was "
            f"reset on purpose, remove those cursors (DELETE FROM {self._sql.q}.cursors and "
            f"{self._sql.q}.cursors_unlogged WHERE consumer = ...), or set them to {high} or "
            "below, with every process of the application stopped"
        )

    async def _read_version(self, conn: Driver | Transaction) -> int | None:
        # A query on pg_tables, not to_regclass(): inside a transaction that
        # just waited for the migration lock, to_regclass() can answer from a
        # stale catalog cache and miss a table another opener just committed.
        exists = await conn.fetchval(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_tables "
            "WHERE schemaname = $1 AND tablename = 'schema_version')",
            self.schema,
            operation="reading the schema version",
        )
        if not exists:
            return None
        version: int | None = await conn.fetchval(
            f"SELECT version FROM {self._sql.version_table}", operation="reading the schema version"
        )
        return version

    def _too_new(self, version: int) -> SchemaVersionError:
        return SchemaVersionError(
            f"PostgreSQL schema {self.schema!r} at {self._config.display} has trioflow schema "
            f"version {version}, newer than this trioflow understands ({SCHEMA_VERSION}): "
            "upgrade trioflow, or use another schema (?schema=...)"
        )

    async def _migrate(self, driver: Driver) -> None:
        """Create or upgrade the schema; concurrent openers queue on an advisory lock."""
        version = await self._read_version(driver)
        if version == SCHEMA_VERSION:
            return
        if version is not None and version > SCHEMA_VERSION:
            raise self._too_new(version)
        try:
            async with driver.transaction(operation="creating or migrating the schema") as tx:
                await tx.execute(
                    "SELECT pg_advisory_xact_lock($1, $2)", _LOCK_CLASS_MIGRATE, self._sql.lock_key
                )
                # Another process may have migrated while we waited for the lock.
                version = await self._read_version(tx)
                if version is not None and version > SCHEMA_VERSION:
                    raise self._too_new(version)
                if version is None:
                    # Check first: CREATE SCHEMA IF NOT EXISTS needs the CREATE
                    # privilege even when the schema (made by an admin) exists.
                    if not await tx.fetchval(
                        "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = $1)", self.schema
                    ):
                        await tx.execute(f"CREATE SCHEMA {self._sql.q}")
                    await tx.execute(
                        f"CREATE TABLE {self._sql.version_table} ("
                        "singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton), "
                        "version integer NOT NULL, migrated_at timestamptz NOT NULL)"
                    )
                    await tx.execute(
                        f"INSERT INTO {self._sql.version_table} (version, migrated_at) "
                        "VALUES (0, now())"
                    )
                    version = 0
                migrations = self._sql.migrations()
                for target in range(version + 1, SCHEMA_VERSION + 1):
                    await tx.execute(migrations[target])
                    await tx.execute(
                        f"UPDATE {self._sql.version_table} SET version = $1, migrated_at = now()",
                        target,
                    )
                    logger.info(
                        "trioflow: PostgreSQL schema %r migrated to version %d", self.schema, target
                    )
        except StoreError as exc:
            # Only plain failures (permission denied, a clashing table) get the
            # context; unavailable servers and newer schemas speak for themselves.
            if type(exc) is not StoreError:
                raise
            raise StoreError(
                f"cannot create or migrate trioflow's schema {self.schema!r}: {exc}"
            ) from exc


_decode_json = json.JSONDecoder().decode


def _letter(row: Record) -> DeadLetter:
    """A `DeadLetter` from a row in `_LETTER_COLUMNS` order."""
    return DeadLetter(**dict(zip(_LETTER_COLUMNS, row, strict=True)))


def _url_problem(error: ValueError) -> str:
    """What is wrong with a URL that `urllib.parse` refused, without quoting any of it."""
    text = str(error)
    if "Port" in text:
        return "the port is not a number from 0 to 65535"
    if "IPv6" in text:
        return "an IPv6 address needs both its brackets, as in postgresql://user@[::1]:5432/db"
    return "the host holds characters that are not allowed; percent-encode them"


def _optional_float(raw: str) -> float | None:
    return None if raw.lower() in ("", "none") else float(raw)


_URL_OPTIONS: Final[dict[str, Callable[[str], object]]] = {
    "schema": str,
    "pool_min_size": int,
    "pool_max_size": int,
    "poll_interval": float,
    "cursor_durability": str,
    "cursor_checkpoint_interval": float,
    "connect_timeout": float,
    "command_timeout": _optional_float,
    "cleanup_timeout": float,
    "statement_cache_size": int,
    "application_name": str,
}

_URL_OPTION_KINDS: Final = {
    "schema": "a schema name",
    "pool_min_size": "an integer",
    "pool_max_size": "an integer",
    "poll_interval": "seconds, for example 1.0",
    "cursor_durability": "sync, async or unlogged",
    "cursor_checkpoint_interval": "seconds, for example 5",
    "connect_timeout": "seconds, for example 10",
    "command_timeout": "seconds, or none",
    "cleanup_timeout": "seconds, for example 5",
    "statement_cache_size": "an integer",
    "application_name": "a name",
}

#: Options whose values messages show: trioflow's and libpq's, but the secrets.
_SHOWN_OPTIONS: Final = frozenset(_URL_OPTIONS) | (LIBPQ_OPTIONS - SECRET_OPTIONS)
