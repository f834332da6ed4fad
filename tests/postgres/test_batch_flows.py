"""Batch consumers on PostgreSQL: plain and transactional, across a restart."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import trioflow

Events = Sequence[trioflow.Event]


async def test_batch_consumers_replay_go_live_and_commit_per_batch(store_url: str) -> None:
    table = f"tf_batch_{uuid.uuid4().hex[:12]}"
    loaded: list[list[int]] = []
    failed: list[int] = []

    def build() -> trioflow.App:
        app = trioflow.App(store_url, page_size=50)

        @app.consumer("loader", batch=40, types={"paid"})
        async def load(events: Events) -> None:
            loaded.append([event.seq for event in events])

        @app.consumer("projection", batch=30, transactional=True, retry=trioflow.Retry(initial=0))
        async def project(events: Events, tx: trioflow.Transaction) -> None:
            for event in events:
                await tx.execute(f"INSERT INTO {table} (seq) VALUES ($1)", event.seq)
                if event.seq == 77 and not failed:
                    failed.append(event.seq)
                    raise RuntimeError("after the insert: the whole batch rolls back")

        return app

    try:
        async with trioflow.open_flow(trioflow.App(store_url)) as flow:
            async with flow.transaction() as tx:
                await tx.execute(f"CREATE TABLE {table} (seq bigint PRIMARY KEY)")
            # A backlog, replayed when the consumers start.
            await flow.publish_many([("paid" if n % 4 else "refunded", n) for n in range(100)])
        async with trioflow.open_flow(build()) as flow:
            await flow.wait_idle()
            await flow.publish_many([("paid", n) for n in range(100)])
            await flow.wait_idle()
            stats = flow.statistics().consumers
            async with flow.transaction() as tx:
                rows = await tx.fetch(f"SELECT seq FROM {table} ORDER BY seq")
    finally:
        async with trioflow.open_flow(trioflow.App(store_url)) as flow, flow.transaction() as tx:
            await tx.execute(f"DROP TABLE IF EXISTS {table}")
    handed = [seq for batch in loaded for seq in batch]
    assert handed == [n + 1 for n in range(100) if n % 4] + list(range(101, 201))
    assert max(map(len, loaded)) == 40
    assert (stats["loader"].cursor, stats["loader"].processed) == (200, 175)
    assert [row["seq"] for row in rows] == list(range(1, 201))
    assert (stats["projection"].cursor, stats["projection"].processed) == (200, 200)
    assert failed == [77]
