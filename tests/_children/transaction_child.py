"""A process that writes to a SQLite store next to a test's own transactions.

Run as ``python transaction_child.py PATH MODE``, with PATH a SQLite file
whose table ``rows (id INTEGER PRIMARY KEY)`` exists. It opens the store and
prints ``ready``; then, by MODE:

* ``append``: waits for a line on stdin, appends one event of type
  ``child`` (waiting for the write lock as long as busy_timeout allows),
  prints its sequence number and exits 0;
* ``hold``: opens a transaction, inserts the rows 1 and 2, commits the
  cursor of consumer ``c`` at 1 and appends two events, prints ``inside``
  and sleeps with the transaction open until it is killed.
"""

from __future__ import annotations

import sys

import trio

from trioflow._events import encode, new_ids
from trioflow.stores.sqlite import SQLiteStore


async def main(path: str, mode: str) -> None:
    store = SQLiteStore(path)
    async with store.open():
        print("ready", flush=True)
        if mode == "append":
            await trio.to_thread.run_sync(sys.stdin.readline)
            (event_id,) = new_ids(1)
            appended = await store.append([encode("child", {}, None, event_id)])
            print(appended.seqs[0], flush=True)
            return
        async with store.transaction() as tx:
            await tx.executemany("INSERT INTO rows (id) VALUES (?)", [(1,), (2,)])
            await tx.commit_cursors({"c": 1})
            await tx.append([encode("child", {}, None, event_id) for event_id in new_ids(2)])
            print("inside", flush=True)
            await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2])
