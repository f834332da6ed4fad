"""Transactional consumers and flow.transaction() on PostgreSQL: $1 parameters, the pool."""

from __future__ import annotations

import uuid

import pytest
import trio

import trioflow


@pytest.fixture
def table() -> str:
    """A table name of this test's own, in the database's default schema (the tests
    drop it)."""
    return f"tf_effects_{uuid.uuid4().hex[:12]}"


async def test_a_handler_and_its_cursor_commit_together_and_failures_roll_back(
    store_url: str, table: str
) -> None:
    app = trioflow.App(store_url)
    failed: list[int] = []

    @app.consumer("projection", transactional=True, retry=trioflow.Retry(initial=0.01))
    async def project(event: trioflow.Event, tx: trioflow.Transaction) -> None:
        assert tx.paramstyle == "$1"
        await tx.execute(f"INSERT INTO {table} (seq, amount) VALUES ($1, $2)", event.seq, 1)
        if event.seq == 3 and not failed:
            failed.append(3)
            raise RuntimeError("after the insert")

    try:
        async with trioflow.open_flow(app) as flow:
            async with flow.transaction() as tx:
                await tx.execute(f"CREATE TABLE {table} (seq bigint, amount int)")
            await flow.publish_many([("paid", None)] * 5)
            await flow.wait_idle()
            async with flow.transaction() as tx:
                rows = await tx.fetch(f"SELECT seq, amount FROM {table} ORDER BY seq")
            assert rows == [{"seq": n, "amount": 1} for n in range(1, 6)]
            assert flow.statistics().consumers["projection"].cursor == 5
    finally:
        async with trioflow.open_flow(trioflow.App(store_url)) as flow, flow.transaction() as tx:
            await tx.execute(f"DROP TABLE IF EXISTS {table}")
    assert failed == [3]


async def test_the_outbox_publishes_with_its_rows_or_not_at_all(store_url: str, table: str) -> None:
    app = trioflow.App(store_url)
    seen: list[object] = []

    @app.consumer("mailer")
    async def mail(event: trioflow.Event) -> None:
        seen.append(event.data)

    try:
        async with trioflow.open_flow(app) as flow:
            async with flow.transaction() as tx:
                await tx.execute(f"CREATE TABLE {table} (seq bigint, amount int)")
                await tx.execute(f"INSERT INTO {table} (seq, amount) VALUES ($1, $2)", 7, 30)
                tx.publish("order.created", {"id": 7})
                await trio.sleep(0.1)
                assert seen == []
            await flow.wait_idle()
            assert seen == [{"id": 7}]
            with pytest.raises(trioflow.QueryError, match="INSERT INTO nowhere"):
                async with flow.transaction() as tx:
                    tx.publish("order.created", {"id": 8})
                    await tx.execute("INSERT INTO nowhere VALUES (1)")
            with pytest.raises(RuntimeError):
                async with flow.transaction() as tx:
                    await tx.execute(f"INSERT INTO {table} (seq, amount) VALUES ($1, $2)", 9, 1)
                    tx.publish("order.created", {"id": 9})
                    raise RuntimeError("changed my mind")
            await flow.publish("after")
            await flow.wait_idle()
            assert seen == [{"id": 7}, None]
            async with flow.transaction() as tx:
                assert await tx.fetchval(f"SELECT count(*) FROM {table}") == 1
    finally:
        async with trioflow.open_flow(trioflow.App(store_url)) as flow, flow.transaction() as tx:
            await tx.execute(f"DROP TABLE IF EXISTS {table}")
