"""Settling an append whose answer was lost: did it commit or not?

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

import logging
import uuid
from collections.abc import Sequence
from typing import Final

import trio

from ..._errors import OutcomeUnknownError, StoreError, StoreUnavailableError
from ..._events import NewEvent
from .._base import Appended
from ._driver import Driver, InDoubtError, Record
from ._sql import Queries

logger = logging.getLogger("trioflow.stores.postgres")

# Seconds between attempts to reach the server again, at first and at most.
_MIN_BACKOFF: Final = 0.1
_MAX_BACKOFF: Final = 1.0


async def settle_in_doubt(
    driver: Driver, sql: Queries, events: Sequence[NewEvent], error: InDoubtError
) -> Appended:
    """Find out whether an append whose answer was lost (or late) committed.

    Tries for up to ``connect_timeout`` seconds, with backoff, to take the
    append lock (so that the lost append, if its server session still
    runs, has ended) and look up the batch's first event.

    Returns:
        What the append would have answered, had its answer come: it committed.

    Raises:
        StoreUnavailableError: The batch was not committed (the message
            says so).
        OutcomeUnknownError: The server could not be asked in time.
    """
    found = await _find_batch(
        driver,
        sql,
        events[0].id,
        error,
        doing=f"appending {len(events)} event(s)",
        unknown="whether they were committed is unknown. If they were, every consumer "
        f"receives them; look for event id {events[0].id} before publishing them again",
    )
    first, created_at, after = found[0], found[1], found[2]
    logger.warning(
        "trioflow: the append of %d event(s) whose answer was lost or late had committed (seq %d)",
        len(events),
        first,
    )
    return Appended(after=after, seqs=range(first, first + len(events)), created_at=created_at)


async def settle_transaction(
    driver: Driver, sql: Queries, events: Sequence[NewEvent], error: InDoubtError
) -> None:
    """Find out whether a store transaction whose COMMIT answer was lost committed.

    ``events`` are the events it appended: its commit is atomic, so it
    committed if and only if its first event is in the log, looked up as
    `settle_in_doubt` does. A transaction that appended nothing left nothing
    trioflow can look for.

    Raises:
        StoreUnavailableError: The transaction was not committed (the message
            says so).
        OutcomeUnknownError: It appended nothing, or the server could not be
            asked in time.
    """
    if not events:
        raise OutcomeUnknownError(
            f"{error}: the transaction appended no event the store could look for, so whether "
            "it committed is unknown; check its effects (its rows, its cursor moves) before "
            "running it again"
        ) from error
    found = await _find_batch(
        driver,
        sql,
        events[0].id,
        error,
        doing=f"committing a transaction that appended {len(events)} event(s)",
        unknown="whether the transaction (its rows, cursor moves and events) was committed "
        f"is unknown. If it was, every consumer receives its events; look for event id "
        f"{events[0].id} before running it again",
    )
    logger.warning(
        "trioflow: the transaction whose COMMIT answer was lost or late had committed (seq %d)",
        found[0],
    )


async def _find_batch(
    driver: Driver,
    sql: Queries,
    first_id: uuid.UUID,
    error: InDoubtError,
    *,
    doing: str,
    unknown: str,
) -> Record:
    """The row of `Queries.find_batch` for ``first_id``, once the append lock is free.

    ``doing`` says what was lost ("appending 3 event(s)"), ``unknown`` what
    to do should the server not answer in time.

    Raises:
        StoreUnavailableError: The batch is not in the log: it was not committed.
        OutcomeUnknownError: The server could not be asked in time.
    """
    display = driver.config.display
    window = driver.config.connect_timeout
    if error.timed_out:
        # The server was reachable: the statement was cancelled after
        # command_timeout, and may have committed just before.
        failure = f"{doing} to PostgreSQL at {display} ran past command_timeout"
        unchecked = "could not check within"
    else:
        failure = f"lost the connection to PostgreSQL at {display} while {doing}"
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
                    operation=f"checking whether {doing} committed"
                ) as tx:
                    await tx.execute(sql.lock_append)
                    # A new statement, so a new snapshot: taken after the lock.
                    found = await tx.fetchrow(sql.find_batch, first_id)
                    looked = True
                break
            except StoreError as exc:
                if looked:
                    # Only ending the read-only transaction failed: the answer stands.
                    break
                last = exc
            await trio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)
    if not looked:
        since = "" if last is error else f"; then: {last}"
        raise OutcomeUnknownError(
            f"{failure}, and {unchecked} {window}s (connect_timeout) whether it "
            f"committed: {unknown} ({error}{since})"
        ) from error
    if found is None:
        raise StoreUnavailableError(
            f"{failure}; checked afterwards: they were not committed, nothing was "
            f"persisted, and retrying is safe ({error})"
        ) from error
    return found
