"""The SQLite store: the embedded default, one file shared by the processes of one machine.

Model: one writer connection and one reader connection on the same file, each
used by at most one worker thread at a time (a `trio.CapacityLimiter` of 1
guards each). The database runs in WAL mode, so reads proceed from a committed
snapshot while a write commits; only writers queue behind each other, within
this process through the limiter and across processes through SQLite's file
lock (``busy_timeout`` bounds that wait).

Why reads are gap-free even with several writing processes: ``append`` first
takes SQLite's write lock (``BEGIN IMMEDIATE``), then numbers its batch from
one above the highest number given so far and commits. The lock serialises
writers, so batches commit in sequence-number order and every snapshot a
reader sees holds a prefix of the log. For the same reason sequence numbers
have no holes. The highest number given is the highest event present or, if
the newest events were deleted, the high-water mark a trigger keeps above
every deleted event: a number is never given twice.

SQLite cannot tell one process about another's commits, so `wait_for_append`
polls: every 5 ms at first, then twice as long after each empty poll, up to
`poll_interval` seconds. Events streaming in from another process are seen
within milliseconds, and an idle process polls a few times a second. Appends
made through this instance wake its waiters at once.

Layout: ``_store`` is `SQLiteStore` and its connections' worker threads;
``_sql`` the statements and the work each call does on a connection;
``_schema`` the schema versions, migrations and checks at open;
``_connections`` opening connections, write transactions and the one place
sqlite3's errors become trioflow's; ``_transaction`` the transactions users
open (`SQLiteStore.transaction`): their statements on the writer connection;
``_files`` the file's creation and identity checks; ``_url`` the ``sqlite:``
URLs.
"""

from __future__ import annotations

from ..._util import fixup_module_metadata
from ._schema import MIGRATIONS, SCHEMA_VERSION
from ._store import SQLiteStore

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

#: The released migration steps, by version: tests build old files with them.
_MIGRATIONS = MIGRATIONS

fixup_module_metadata(__name__, globals())
