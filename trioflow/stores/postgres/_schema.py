"""The PostgreSQL store's schema: its name, its versions and their migrations, checks on open.

Every opener runs `prepare`: it refuses a database that is not UTF8, creates
or upgrades the schema (concurrent openers queue on an advisory lock, and the
one that gets it first migrates while the others find the work done) and
refuses cursors that are past everything the log has given. A migration never
changes once released: version ``n`` is whatever ``migrations()[n]`` did.
"""

from __future__ import annotations

import logging
import re
from typing import Final

from ..._errors import ConfigurationError, SchemaVersionError, StoreError
from ._driver import Driver, Transaction
from ._sql import LOCK_CLASS_APPEND, LOCK_CLASS_MIGRATE, Queries

logger = logging.getLogger("trioflow.stores.postgres")

#: The schema version this trioflow writes and understands.
SCHEMA_VERSION: Final = 5

DEFAULT_SCHEMA: Final = "trioflow"

# Lower-case only, so that the name means the same quoted or not; short enough
# that "<schema>_appended" fits PostgreSQL's 63-byte identifier limit.
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,47}")


def check_schema_name(schema: object) -> str:
    """``schema`` if it is a name trioflow may use for its schema.

    Raises:
        ConfigurationError: It is not (the message says what is allowed).
    """
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


def migrations(sql: Queries) -> dict[int, str]:
    """SQL bringing the schema from version ``n - 1`` to ``n``, by ``n``."""
    q = sql.q
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
{_append_function(sql, version=1)}""",
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
        # Leases, one row per key (a consumer's name), never deleted: a
        # key's token only grows. key sorts by code point ("C"), as the
        # store contract lists leases, and claims lock rows in that order.
        # Every time is the database's: now(), the start of the claim's
        # transaction (see docs/postgres.md, "Leases"). The claim is a
        # function because its answer needs a second statement: the upsert's
        # snapshot misses a row another claimant inserted and committed while
        # this one waited for it; the SELECT after it, in READ COMMITTED, has
        # a snapshot of its own that sees it.
        3: f"""
CREATE TABLE {q}.leases (
    key text COLLATE "C" PRIMARY KEY,
    holder text NOT NULL,
    token bigint NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE FUNCTION {q}.claim_leases(p_holder text, p_keys text[], p_ttl float8)
RETURNS TABLE (o_key text, o_holder text, o_token bigint, o_expires_at timestamptz)
LANGUAGE plpgsql AS $claim$
BEGIN
    -- Keys in code-point order: concurrent claims (and fenced writes, which
    -- lock lease rows in the same order) never wait for each other in a cycle.
    INSERT INTO {q}.leases AS held (key, holder, token, expires_at)
    SELECT k.key, p_holder, 1, now() + p_ttl * interval '1 second'
    FROM (SELECT DISTINCT u.key COLLATE "C" AS key FROM unnest(p_keys) AS u(key)) AS k
    ORDER BY k.key
    ON CONFLICT (key) DO UPDATE SET
        holder = excluded.holder,
        -- A live lease renewed by its holder keeps its token; a lease taken
        -- over, or taken again after it lapsed, gets the next one.
        token = CASE WHEN held.holder = excluded.holder AND held.expires_at > now()
            THEN held.token ELSE held.token + 1 END,
        expires_at = excluded.expires_at
    WHERE held.holder = excluded.holder OR held.expires_at <= now();
    RETURN QUERY SELECT l.key, l.holder, l.token, l.expires_at FROM {q}.leases AS l
        WHERE l.key = ANY(p_keys) ORDER BY l.key;
END
$claim$;
""",
        # Pruning. log_state's one row holds pruned_through: every event up to
        # it may have been deleted. Prunes lock the row FOR UPDATE and cursor
        # resets FOR SHARE, so a reset never slips between a prune's check of
        # the cursors and its delete. append now takes the head before its
        # batch as at least pruned_through: with every event pruned, max(seq)
        # alone would go back to 0. The index on dead_letters(seq) keeps a
        # prune's "no letter refers to it" check a lookup per event.
        4: f"""
CREATE TABLE {q}.log_state (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    pruned_through bigint NOT NULL
);
INSERT INTO {q}.log_state (pruned_through) VALUES (0);
CREATE INDEX dead_letters_seq ON {q}.dead_letters (seq);
{_append_function(sql, version=4)}""",
        # The notification carries the batch's last seq. The advisory lock
        # orders appends until commit, and a notification is delivered only
        # once its transaction committed: every batch below that seq has
        # committed or rolled back by then, so listeners may take it as a
        # committed head without reading max(seq). They still read the head
        # on an empty payload (sent by version 4's function, say).
        5: _append_function(sql, version=5),
    }


def _append_function(sql: Queries, *, version: int) -> str:
    """The schema's ``append`` function as schema ``version`` (1, 4 or 5) created it.

    Version 4 takes the head before the batch as at least ``pruned_through``:
    with every event pruned, max(seq) alone would go back to 0. Version 5
    notifies with the batch's last seq instead of an empty payload. The texts
    of versions 1 and 4 are exactly what they were when released.
    """
    q = sql.q
    if version >= 4:
        create = "CREATE OR REPLACE FUNCTION"
        after = f"""    -- One statement, one snapshot: a prune that committed deleted its events
    -- and raised pruned_through together.
    SELECT greatest(
        (SELECT coalesce(max(seq), 0) FROM {q}.events),
        (SELECT pruned_through FROM {q}.log_state)
    ) INTO o_after;
"""
    else:
        create = "CREATE FUNCTION"
        after = f"    SELECT coalesce(max(seq), 0) INTO o_after FROM {q}.events;\n"
    payload = "(o_first + cardinality(p_ids) - 1)::text" if version >= 5 else "''"
    return f"""{create} {q}.append(
    p_ids uuid[], p_types text[], p_keys text[], p_data json[],
    OUT o_after bigint, OUT o_first bigint, OUT o_created_at timestamptz
) LANGUAGE plpgsql AS $append$
BEGIN
    -- Held until this transaction ends: batches commit in sequence order.
    PERFORM pg_advisory_xact_lock({LOCK_CLASS_APPEND}, {sql.lock_key});
{after}    -- The sequence never goes back, even if events are deleted; greatest()
    -- keeps numbers unique should it ever lag behind the table.
    o_first := greatest(nextval('{q}.events_seq'), o_after + 1);
    PERFORM setval('{q}.events_seq', o_first + cardinality(p_ids) - 1);
    o_created_at := clock_timestamp();
    INSERT INTO {q}.events (seq, id, type, key, data, created_at)
    SELECT o_first + u.ord - 1, u.id, u.type, u.key, u.data, o_created_at
    FROM unnest(p_ids, p_types, p_keys, p_data) WITH ORDINALITY AS u(id, type, key, data, ord);
    PERFORM pg_notify('{sql.channel}', {payload});
END
$append$;
"""


async def prepare(driver: Driver, sql: Queries) -> None:
    """Check the database, create or migrate the schema, check the cursors against the log.

    Raises:
        SchemaVersionError: The schema was written by a newer trioflow.
        StoreError: The database is not UTF8, the schema cannot be created,
            or cursors are past the log's high-water mark.
    """
    await _check_encoding(driver)
    await _migrate(driver, sql)
    await _check_high_water(driver, sql)


async def _check_encoding(driver: Driver) -> None:
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
            f"PostgreSQL database {database!r} at {driver.config.display} uses the "
            f"{encoding} encoding; trioflow stores events as UTF-8 JSON, and a character "
            f"{encoding} cannot hold would fail every publish batched with it. Use a UTF8 "
            "database: CREATE DATABASE <name> ENCODING 'UTF8' TEMPLATE template0 (with "
            "LC_COLLATE and LC_CTYPE of a UTF-8 locale, or 'C')"
        )


async def _check_high_water(driver: Driver, sql: Queries) -> None:
    """Refuse a log whose cursors are past every sequence number it has given.

    Cursors only ever hold positions consumers reached. One above the
    log's high-water mark means the log was reset (its sequence
    restarted) or replaced (a restored or recreated events table) while
    the cursors were kept: new events would be numbered at or below those
    cursors, and their consumers would skip them.
    """
    rows = await driver.fetch(
        sql.cursors_past_high_water, operation="checking cursors against the log"
    )
    if not rows:
        return
    high = rows[0][2]
    shown = ", ".join(f"{consumer!r} at {seq}" for consumer, seq, _ in rows[:10])
    more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
    raise StoreError(
        f"PostgreSQL schema {sql.schema!r} at {driver.config.display} holds cursors past "
        f"every sequence number its event log has given (its high-water mark is {high}): "
        f"consumer(s) {shown}{more}. The log was reset or replaced under its cursors, and "
        "new events would be numbered at or below them: those consumers would skip them. "
        "If the store points at the wrong database or schema, fix its URL; if the log was "
        f"reset on purpose, remove those cursors (DELETE FROM {sql.q}.cursors and "
        f"{sql.q}.cursors_unlogged WHERE consumer = ...), or set them to {high} or "
        "below, with every process of the application stopped"
    )


async def stored_version(driver: Driver, sql: Queries) -> int | None:
    """The schema version the database holds (None: no trioflow schema yet), changing nothing."""
    return await _read_version(driver, sql)


async def _read_version(conn: Driver | Transaction, sql: Queries) -> int | None:
    # A query on pg_tables, not to_regclass(): inside a transaction that
    # just waited for the migration lock, to_regclass() can answer from a
    # stale catalog cache and miss a table another opener just committed.
    exists = await conn.fetchval(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_tables "
        "WHERE schemaname = $1 AND tablename = 'schema_version')",
        sql.schema,
        operation="reading the schema version",
    )
    if not exists:
        return None
    version: int | None = await conn.fetchval(
        f"SELECT version FROM {sql.version_table}", operation="reading the schema version"
    )
    return version


def _too_new(driver: Driver, sql: Queries, version: int) -> SchemaVersionError:
    return SchemaVersionError(
        f"PostgreSQL schema {sql.schema!r} at {driver.config.display} has trioflow schema "
        f"version {version}, newer than this trioflow understands ({SCHEMA_VERSION}): "
        "upgrade trioflow, or use another schema (?schema=...)"
    )


async def _migrate(driver: Driver, sql: Queries) -> None:
    """Create or upgrade the schema; concurrent openers queue on an advisory lock."""
    version = await _read_version(driver, sql)
    if version == SCHEMA_VERSION:
        return
    if version is not None and version > SCHEMA_VERSION:
        raise _too_new(driver, sql, version)
    try:
        async with driver.transaction(operation="creating or migrating the schema") as tx:
            await tx.execute(
                "SELECT pg_advisory_xact_lock($1, $2)", LOCK_CLASS_MIGRATE, sql.lock_key
            )
            # Another process may have migrated while we waited for the lock.
            version = await _read_version(tx, sql)
            if version is not None and version > SCHEMA_VERSION:
                raise _too_new(driver, sql, version)
            if version is None:
                # Check first: CREATE SCHEMA IF NOT EXISTS needs the CREATE
                # privilege even when the schema (made by an admin) exists.
                if not await tx.fetchval(
                    "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = $1)", sql.schema
                ):
                    await tx.execute(f"CREATE SCHEMA {sql.q}")
                await tx.execute(
                    f"CREATE TABLE {sql.version_table} ("
                    "singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton), "
                    "version integer NOT NULL, migrated_at timestamptz NOT NULL)"
                )
                await tx.execute(
                    f"INSERT INTO {sql.version_table} (version, migrated_at) VALUES (0, now())"
                )
                version = 0
            steps = migrations(sql)
            for target in range(version + 1, SCHEMA_VERSION + 1):
                await tx.execute(steps[target])
                await tx.execute(
                    f"UPDATE {sql.version_table} SET version = $1, migrated_at = now()", target
                )
                logger.info(
                    "trioflow: PostgreSQL schema %r migrated to version %d", sql.schema, target
                )
    except StoreError as exc:
        # Only plain failures (permission denied, a clashing table) get the
        # context; unavailable servers and newer schemas speak for themselves.
        if type(exc) is not StoreError:
            raise
        raise StoreError(
            f"cannot create or migrate trioflow's schema {sql.schema!r}: {exc}"
        ) from exc
