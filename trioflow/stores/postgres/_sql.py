"""The PostgreSQL store's SQL text, with its (validated, quoted) schema name filled in.

Statements only: what each one is for, and why it is written so, lives
beside it; the code that runs them is in `trioflow.stores.postgres._store`.
"""

from __future__ import annotations

import hashlib
from typing import Final

import attrs

# First keys of the two-int advisory locks ("tf" and a number), so they stay
# apart from other applications' locks; the second key is derived from the
# schema name, so stores on different schemas never wait for each other.
LOCK_CLASS_MIGRATE: Final = 0x7466_0001
LOCK_CLASS_APPEND: Final = 0x7466_0002

#: The columns of a dead letter, in the order `DeadLetter` lists its fields.
LETTER_COLUMNS: Final = (
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


def lock_key(schema: str) -> int:
    """A stable signed 32-bit advisory lock key for ``schema``."""
    digest = hashlib.blake2b(schema.encode(), digest_size=4, person=b"trioflow").digest()
    return int.from_bytes(digest, "big", signed=True)


@attrs.frozen(kw_only=True)
class Queries:
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
    def _head_of_log(self) -> str:
        # The highest event, or the pruning mark once every event up to it
        # was pruned: the head never goes back.
        return (
            f"greatest((SELECT coalesce(max(seq), 0) FROM {self.q}.events), "
            f"(SELECT pruned_through FROM {self.q}.log_state))"
        )

    @property
    def head(self) -> str:
        return f"SELECT {self._head_of_log}"

    @property
    def log_bounds(self) -> str:
        return (
            f"SELECT (SELECT min(seq) FROM {self.q}.events), {self._head_of_log}, "
            f"(SELECT pruned_through FROM {self.q}.log_state)"
        )

    @property
    def first_at_or_after(self) -> str:
        # A primary-key seek: seq_before's binary search costs log2(head) of them.
        return (
            f"SELECT seq, created_at < $2 FROM {self.q}.events WHERE seq >= $1 ORDER BY seq LIMIT 1"
        )

    @property
    def cursors(self) -> str:
        # As load_cursors, with when each last changed; by code point.
        return (
            "SELECT coalesce(u.consumer, c.consumer) AS consumer, greatest(u.seq, c.seq), "
            f"greatest(u.updated_at, c.updated_at) FROM {self.q}.cursors AS c "
            f"FULL JOIN {self.q}.cursors_unlogged AS u ON u.consumer = c.consumer "
            'ORDER BY coalesce(u.consumer, c.consumer) COLLATE "C"'
        )

    def lock_log_state(self, *, prune: bool) -> str:
        """Read and lock the pruning mark: a prune takes it FOR UPDATE, a cursor reset
        FOR SHARE, so the two never run at once (resets do, with each other)."""
        mode = "UPDATE" if prune else "SHARE"
        return f"SELECT pruned_through FROM {self.q}.log_state FOR {mode}"

    @property
    def cursor_of(self) -> str:
        return (
            f"SELECT greatest(u.seq, c.seq) FROM {self.q}.cursors AS c "
            f"FULL JOIN {self.q}.cursors_unlogged AS u ON u.consumer = c.consumer "
            "WHERE coalesce(u.consumer, c.consumer) = $1"
        )

    @property
    def set_cursor(self) -> str:
        # The logged row holds the new position; the unlogged copy goes, or
        # greatest() would keep the old one.
        return (
            f"WITH fast AS (DELETE FROM {self.q}.cursors_unlogged WHERE consumer = $1) "
            f"INSERT INTO {self.q}.cursors AS stored (consumer, seq, updated_at) "
            "VALUES ($1, $2, now()) ON CONFLICT (consumer) DO UPDATE SET seq = excluded.seq, "
            "updated_at = excluded.updated_at"
        )

    @property
    def prune(self) -> str:
        """Delete up to $2 of the oldest events up to $1 no cursor or letter needs.

        Run after locking log_state FOR UPDATE, in a statement of its own: in
        READ COMMITTED a statement's snapshot is taken when it starts, so
        this one sees every reset that committed before the lock was ours.
        A consumer's cursor is the lower of its two copies here: the
        unlogged one may be lost in a crash, and the logged one is then its
        position. Returns how many went.
        """
        return (
            f"WITH bound AS (SELECT least($1::bigint, {self._head_of_log}, "
            f"(SELECT min(least(c.seq, u.seq)) FROM {self.q}.cursors AS c "
            f"FULL JOIN {self.q}.cursors_unlogged AS u ON u.consumer = c.consumer)) AS seq), "
            f"doomed AS (SELECT e.seq FROM {self.q}.events AS e, bound "
            "WHERE e.seq <= bound.seq AND NOT EXISTS "
            f"(SELECT FROM {self.q}.dead_letters AS d WHERE d.seq = e.seq) "
            "ORDER BY e.seq LIMIT $2), "
            f"deleted AS (DELETE FROM {self.q}.events WHERE seq IN (SELECT seq FROM doomed) "
            "RETURNING seq), "
            f"marked AS (UPDATE {self.q}.log_state "
            "SET pruned_through = greatest(pruned_through, (SELECT max(seq) FROM deleted))) "
            "SELECT count(*) FROM deleted"
        )

    @property
    def lock_append(self) -> str:
        return f"SELECT pg_advisory_xact_lock({LOCK_CLASS_APPEND}, {self.lock_key})"

    @property
    def find_batch(self) -> str:
        # The batch's first seq and time, and the head before it: appends
        # commit in seq order, so every event below it was committed first.
        return (
            "SELECT e.seq, e.created_at, "
            f"greatest((SELECT coalesce(max(b.seq), 0) FROM {self.q}.events AS b "
            "WHERE b.seq < e.seq), "
            # Events before it may have been pruned since.
            f"(SELECT least(pruned_through, e.seq - 1) FROM {self.q}.log_state)) "
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

    def record_dead_letter(self, *, fenced: bool = False) -> str:
        """Keep a letter ($1 to $12) and move its consumer's cursor to $13 (NULL: left alone).

        One statement, one transaction. Logged, and committed with the
        server's synchronous_commit whatever cursor_durability says: see
        docs/postgres.md, "Dead letters". ``fenced``: only while $14 is the
        token of the consumer's lease, checked under a lock on the lease row
        (see `commit_cursors`); the statement then returns whether it held.
        """
        columns = ", ".join(LETTER_COLUMNS)
        values = ", ".join(f"${number}" for number in range(1, len(LETTER_COLUMNS) + 1))
        replace = ", ".join(f"{column} = excluded.{column}" for column in LETTER_COLUMNS[2:])
        guard = " AND EXISTS (SELECT FROM lease)" if fenced else ""
        letter = (
            f"INSERT INTO {self.q}.dead_letters ({columns}) "
            + (
                f"SELECT {values} WHERE EXISTS (SELECT FROM lease) "
                if fenced
                else f"VALUES ({values}) "
            )
            + f"ON CONFLICT (consumer, seq) DO UPDATE SET {replace}"
        )
        cursor = self._upsert(
            "cursors",
            f"(VALUES ($1::text, $13::bigint)) AS t(consumer, seq) WHERE t.seq IS NOT NULL{guard}",
        )
        if not fenced:
            return f"WITH letter AS ({letter}) {cursor}"
        lease = f"SELECT key FROM {self.q}.leases WHERE key = $1 AND token = $14 FOR SHARE"
        return (
            f"WITH lease AS MATERIALIZED ({lease}), letter AS ({letter}), moved AS ({cursor}) "
            "SELECT EXISTS (SELECT FROM lease)"
        )

    @property
    def dead_letters(self) -> str:
        # consumer is COLLATE "C": code-point order, whatever the database's.
        return (
            f"SELECT {', '.join(LETTER_COLUMNS)} FROM {self.q}.dead_letters ORDER BY consumer, seq"
        )

    @property
    def dead_letters_of(self) -> str:
        return (
            f"SELECT {', '.join(LETTER_COLUMNS)} FROM {self.q}.dead_letters "
            "WHERE consumer = $1 ORDER BY seq"
        )

    @property
    def earliest_due_at(self) -> str:
        # From the index of requeued letters (consumer, due_at).
        return (
            f"SELECT min(due_at) FROM {self.q}.dead_letters "
            "WHERE consumer = $1 AND due_at IS NOT NULL"
        )

    @property
    def dead_letter_counts(self) -> str:
        return f"SELECT consumer, count(*) FROM {self.q}.dead_letters GROUP BY consumer"

    @property
    def due_dead_letters(self) -> str:
        # The database's clock, as requeue's: the host's plays no part.
        return (
            f"SELECT {', '.join(LETTER_COLUMNS)} FROM {self.q}.dead_letters "
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

    def commit_cursors(self, durability: str, *, checkpoint: bool, fenced: bool) -> str:
        """Move cursors ($1 names, $2 seqs) forward in one statement, one transaction.

        ``durability`` is the store's ``cursor_durability``. ``checkpoint``
        (unlogged only): also write the logged checkpoint of the consumers
        $3 at $4. ``fenced``: write a consumer of the fenced ones (the next
        two parameters: names in code-point order, and their tokens) only
        while its lease's token is the one given; the statement returns the
        refused ones. The lease rows are locked FOR SHARE, so a claim that
        would give one a new token waits until this transaction ends, and
        the token checked is the latest committed one (READ COMMITTED
        re-reads a row it had to wait for): no claim commits between the
        check and the write. FOR KEY SHARE would not do: a claim's update
        leaves the key alone, so it takes FOR NO KEY UPDATE, which FOR KEY
        SHARE does not block.
        """
        cursors = "unnest($1::text[], $2::bigint[]) AS t(consumer, seq)"
        if durability == "async":
            # set_config(..., true) lasts until the end of this statement's own
            # transaction, so its commit does not wait for the WAL flush.
            cursors += (
                " CROSS JOIN (SELECT set_config('synchronous_commit', 'off', true)) AS settings"
            )
        sources = {"cursors_unlogged" if durability == "unlogged" else "cursors": cursors}
        if checkpoint:
            sources["cursors"] = "unnest($3::text[], $4::bigint[]) AS t(consumer, seq)"
        held = " WHERE t.consumer NOT IN (SELECT consumer FROM refused)" if fenced else ""
        *firsts, last = [self._upsert(table, source + held) for table, source in sources.items()]
        if not fenced:
            # The unlogged rows for every consumer and, when due, the logged checkpoint.
            return "".join(f"WITH fast AS ({first}) " for first in firsts) + last
        names, tokens = ("$5", "$6") if checkpoint else ("$3", "$4")
        lease = (
            f"SELECT key, token FROM {self.q}.leases WHERE key = ANY({names}::text[]) "
            "ORDER BY key FOR SHARE"
        )
        refused = (
            f"SELECT f.consumer FROM unnest({names}::text[], {tokens}::bigint[]) "
            "AS f(consumer, token) LEFT JOIN lease ON lease.key = f.consumer "
            "WHERE lease.token IS DISTINCT FROM f.token"
        )
        writes = "".join(
            f", write_{number} AS ({write})" for number, write in enumerate([*firsts, last])
        )
        return (
            f"WITH lease AS MATERIALIZED ({lease}), refused AS MATERIALIZED ({refused}){writes} "
            "SELECT consumer FROM refused"
        )

    @property
    def claim_leases(self) -> str:
        return (
            f"SELECT o_key, o_holder, o_token, o_expires_at FROM {self.q}.claim_leases($1, $2, $3)"
        )

    @property
    def release_leases(self) -> str:
        # The database's clock, as the claims': lapsed at once. The rows are
        # locked in key order first, as claims and fenced writes lock them,
        # so that a release never deadlocks with a claim of the same keys.
        return (
            f"WITH locked AS (SELECT key FROM {self.q}.leases "
            "WHERE key = ANY($2::text[]) AND holder = $1 AND expires_at > now() "
            "ORDER BY key FOR UPDATE) "
            f"UPDATE {self.q}.leases AS l SET expires_at = now() "
            "FROM locked WHERE l.key = locked.key AND l.holder = $1"
        )

    @property
    def forget_lapsed_leases(self) -> str:
        # The database's clock, as the claims'. Rows another transaction has
        # locked (a claim renewing one) are skipped, not waited for: no
        # deadlock with claims or with another flow forgetting the same rows.
        return (
            f"WITH doomed AS (SELECT key FROM {self.q}.leases "
            "WHERE left(key, length($1)) = $1 "
            "AND expires_at <= now() - $2::float8 * interval '1 second' "
            "ORDER BY key FOR UPDATE SKIP LOCKED) "
            f"DELETE FROM {self.q}.leases AS l USING doomed WHERE l.key = doomed.key "
            "RETURNING l.key"
        )

    @property
    def leases(self) -> str:
        # key is COLLATE "C": code-point order, whatever the database's.
        return (
            f"SELECT key, holder, token, expires_at FROM {self.q}.leases "
            "WHERE expires_at > now() ORDER BY key"
        )
