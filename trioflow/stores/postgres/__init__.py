"""The PostgreSQL store: many processes on many machines share one event log.

Layers, each depending only on those below it:

* `_store`: `PostgresStore`, the `trioflow.stores.Store` itself;
* `_url` (its URL and options), `_schema` (its versions, migrations and the
  checks made on opening), `_recovery` (settling an append whose answer was
  lost), `_listen` (the LISTEN connection that wakes waiters);
* `_sql`: the statements, as text;
* `_driver`: the bridge to asyncpg on a trio-asyncio loop, the one module
  that touches either (with `trioflow.stores._aio_loop`, its loop).
"""

from ._schema import DEFAULT_SCHEMA as DEFAULT_SCHEMA
from ._schema import SCHEMA_VERSION as SCHEMA_VERSION
from ._store import CursorDurability as CursorDurability
from ._store import PostgresStore as PostgresStore

__all__ = ["DEFAULT_SCHEMA", "SCHEMA_VERSION", "CursorDurability", "PostgresStore"]
