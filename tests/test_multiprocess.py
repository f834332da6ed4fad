"""Processes sharing one SQLite file: publishers in some, consumers in another.

The children (``tests/_children``) are started with ``sys.executable``. The
consumer process learns of the others' events only by polling the file; its
consumers log ``"<seq> <publisher> <counter>"`` per event, checked against the
store read directly with sqlite3.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path

import pytest
import trio
from hypothesis import given

from tests._procs import (
    PROCESS_EXAMPLES,
    OutboxPlans,
    Row,
    check_consumer_rows,
    outbox_plans,
    run_outbox_publishers,
    running,
    sqlite_url,
)

pytestmark = pytest.mark.slow

#: The consumers of consumer_child.py.
CONSUMERS = ("plain", "bounded")


def read_events(db: Path) -> list[Row]:
    """Every event in the store as (seq, publisher, counter), in seq order."""
    with contextlib.closing(sqlite3.connect(db)) as connection:
        rows = connection.execute("SELECT seq, data FROM trioflow_events ORDER BY seq")
        return [(seq, json.loads(data)["pub"], json.loads(data)["n"]) for seq, data in rows]


def POLLING(db: Path) -> str:
    return sqlite_url(db, poll_interval=0.02)


async def test_consumer_process_sees_what_a_publisher_process_appends(tmp_path: Path) -> None:
    count = 2000
    db = tmp_path / "events.db"
    logs = tmp_path / "logs"
    logs.mkdir()
    context = f"logs and store in {tmp_path}"
    go = tmp_path / "go"
    go.touch()
    # Polls the file for other processes' appends every 20 ms. A poll fans
    # out up to a page (1,000 events) as one batch: far more than the bounded
    # consumer's buffer, so it detaches and catches up from the store.
    async with running(
        "consumer_child.py", POLLING(db), logs, count, stderr=tmp_path / "consumer.stderr"
    ) as b:
        # The consumer process creates the file; the publisher opens it after.
        await b.expect_line("ready", limit=30)
        async with running(
            "publisher_child.py",
            sqlite_url(db),
            "a",
            count,
            1,
            go,
            stderr=tmp_path / "publisher.stderr",
        ) as a:
            await a.finish(limit=60)
        await b.finish(limit=60)
    events = read_events(db)
    assert [seq for seq, _, _ in events] == list(range(1, count + 1)), context
    assert [n for _, _, n in events] == list(range(count)), context
    check_consumer_rows(logs, CONSUMERS, events, context)


async def test_two_publisher_processes_and_a_consumer_process(tmp_path: Path) -> None:
    count = 1000
    db = tmp_path / "events.db"
    logs = tmp_path / "logs"
    logs.mkdir()
    context = f"logs and store in {tmp_path}"
    go = tmp_path / "go"
    url = sqlite_url(db)
    async with running(
        "consumer_child.py", POLLING(db), logs, 2 * count, stderr=tmp_path / "consumer.stderr"
    ) as consumer:
        await consumer.expect_line("ready", limit=30)
        async with (
            running(
                "publisher_child.py", url, "p1", count, 1, go, stderr=tmp_path / "p1.stderr"
            ) as p1,
            running(
                "publisher_child.py", url, "p2", count, 2, go, stderr=tmp_path / "p2.stderr"
            ) as p2,
        ):
            # Both open the file first, then start together.
            await p1.expect_line("ready", limit=30)
            await p2.expect_line("ready", limit=30)
            go.touch()
            await p1.finish(limit=60)
            await p2.finish(limit=60)
        await consumer.finish(limit=60)
    events = read_events(db)
    assert [seq for seq, _, _ in events] == list(range(1, 2 * count + 1)), context
    for publisher in ("p1", "p2"):
        counters = [n for _, pub, n in events if pub == publisher]
        assert counters == list(range(count)), f"{publisher}'s events out of order; {context}"
    check_consumer_rows(logs, CONSUMERS, events, context)


@PROCESS_EXAMPLES
@given(plans=outbox_plans())
def test_outbox_processes_never_show_a_consumer_a_rolled_back_event_or_a_gap_filled_late(
    plans: OutboxPlans, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp_path = tmp_path_factory.mktemp("outbox")
    db = tmp_path / "events.db"

    async def read() -> list[Row]:
        return await trio.to_thread.run_sync(read_events, db)

    trio.run(run_outbox_publishers, sqlite_url(db), POLLING(db), plans, tmp_path, read)
