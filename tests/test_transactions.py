"""Transactional consumers (exactly-once effects) and flow.transaction() (the outbox), on SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

import trioflow
from tests._procs import sqlite_url

SCHEMA = "CREATE TABLE IF NOT EXISTS effects (seq INTEGER PRIMARY KEY, amount INTEGER NOT NULL)"


def sqlite_app(tmp_path: Path, **options: object) -> trioflow.App:
    return trioflow.App(sqlite_url(tmp_path / "events.db"), **options)  # type: ignore[arg-type]


async def rows(flow: trioflow.Flow) -> list[dict[str, object]]:
    async with flow.transaction() as tx:
        await tx.execute(SCHEMA)
        return await tx.fetch("SELECT seq, amount FROM effects ORDER BY seq")


async def test_a_handlers_statements_commit_with_its_cursor(tmp_path: Path) -> None:
    app = sqlite_app(tmp_path)

    @app.consumer("projection", transactional=True)
    async def project(event: trioflow.Event, tx: trioflow.Transaction) -> None:
        await tx.execute(SCHEMA)
        await tx.execute("INSERT INTO effects (seq, amount) VALUES (?, ?)", event.seq, event.data)

    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("paid", n) for n in range(1, 21)])
        await flow.wait_idle()
        assert await rows(flow) == [{"seq": n, "amount": n} for n in range(1, 21)]
        assert flow.statistics().consumers["projection"].cursor == 20


async def test_a_handler_that_raises_rolls_its_transaction_back_and_is_retried(
    tmp_path: Path,
) -> None:
    app = sqlite_app(tmp_path)
    failed: list[int] = []

    @app.consumer("projection", transactional=True, retry=trioflow.Retry(attempts=3, initial=0.01))
    async def project(event: trioflow.Event, tx: trioflow.Transaction) -> None:
        await tx.execute(SCHEMA)
        await tx.execute("INSERT INTO effects (seq, amount) VALUES (?, ?)", event.seq, 1)
        if event.seq == 3 and not failed:
            failed.append(event.seq)
            raise RuntimeError("after the insert")

    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("paid", None)] * 5)
        await flow.wait_idle()
        # The failed attempt's insert was rolled back: one row per event.
        assert await rows(flow) == [{"seq": n, "amount": 1} for n in range(1, 6)]
    assert failed == [3]


async def test_a_transaction_kept_after_its_handler_returned_is_refused(tmp_path: Path) -> None:
    app = sqlite_app(tmp_path)
    kept: list[trioflow.Transaction] = []

    @app.consumer("keeper", transactional=True)
    async def keep(event: trioflow.Event, tx: trioflow.Transaction) -> None:
        await tx.execute(SCHEMA)
        kept.append(tx)

    async with trioflow.open_flow(app) as flow:
        await flow.publish("x")
        await flow.wait_idle()
        with pytest.raises(trioflow.TransactionClosedError, match="consumer 'keeper' on seq=1"):
            await kept[0].execute("INSERT INTO effects (seq, amount) VALUES (?, ?)", 99, 1)
        with pytest.raises(trioflow.TransactionClosedError):
            kept[0].publish("late")
        assert await rows(flow) == []


async def test_the_outbox_publishes_with_the_rows_or_not_at_all(tmp_path: Path) -> None:
    app = sqlite_app(tmp_path)
    seen: list[tuple[int, object]] = []

    @app.consumer("mailer")
    async def mail(event: trioflow.Event) -> None:
        seen.append((event.seq, event.data))

    async with trioflow.open_flow(app) as flow:
        async with flow.transaction() as tx:
            await tx.execute(SCHEMA)
            await tx.execute("INSERT INTO effects (seq, amount) VALUES (?, ?)", 7, 30)
            tx.publish("order.created", {"id": 7})
            await trio.sleep(0.1)
            assert seen == []
        await flow.wait_idle()
        assert seen == [(1, {"id": 7})]
        with pytest.raises(RuntimeError):
            async with flow.transaction() as tx:
                await tx.execute("INSERT INTO effects (seq, amount) VALUES (?, ?)", 8, 40)
                tx.publish("order.created", {"id": 8})
                raise RuntimeError("changed my mind")
        with pytest.raises(trioflow.InvalidEventError):
            async with flow.transaction() as tx:
                await tx.execute("INSERT INTO effects (seq, amount) VALUES (?, ?)", 9, 50)
                tx.publish("order.created", {"bad": float("nan")})
        with pytest.raises(trioflow.QueryError, match="INSERT INTO nowhere"):
            async with flow.transaction() as tx:
                tx.publish("order.created", {"id": 10})
                await tx.execute("INSERT INTO nowhere VALUES (1)")
        await flow.publish("after")
        await flow.wait_idle()
        # Nothing of the three blocks that did not commit.
        assert [data for _, data in seen] == [{"id": 7}, None]
        assert await rows(flow) == [{"seq": 7, "amount": 30}]


async def test_a_handler_publishing_in_its_transaction_publishes_only_if_it_commits(
    tmp_path: Path,
) -> None:
    app = sqlite_app(tmp_path)
    followed: list[object] = []
    attempts: list[int] = []

    @app.consumer("orders", transactional=True, types={"order"}, retry=trioflow.Retry(initial=0.01))
    async def order(event: trioflow.Event, tx: trioflow.Transaction) -> None:
        attempts.append(event.seq)
        tx.publish("shipment", {"for": event.seq})
        if len(attempts) == 1:
            raise RuntimeError("first attempt fails after publishing")

    @app.consumer("shipments", types={"shipment"})
    async def ship(event: trioflow.Event) -> None:
        followed.append(event.data)

    async with trioflow.open_flow(app) as flow:
        await flow.publish("order")
        await flow.wait_idle()
        await flow.wait_idle()
    assert attempts == [1, 1]
    assert followed == [{"for": 1}]


def test_the_memory_store_refuses_transactional_consumers() -> None:
    app = trioflow.App("memory://")
    with pytest.raises(trioflow.ConfigurationError, match="cannot run transactions"):

        @app.consumer("projection", transactional=True)
        async def project(event: trioflow.Event, tx: trioflow.Transaction) -> None: ...


def test_a_transactional_handler_must_take_the_transaction(tmp_path: Path) -> None:
    app = sqlite_app(tmp_path)
    with pytest.raises(trioflow.ConfigurationError, match="event and its transaction"):

        @app.consumer("projection", transactional=True)
        async def project(event: trioflow.Event) -> None: ...


async def test_the_memory_store_refuses_flow_transactions() -> None:
    async with trioflow.open_flow(trioflow.App("memory://")) as flow:
        with pytest.raises(trioflow.ConfigurationError, match="cannot run transactions"):
            async with flow.transaction():
                pass  # pragma: no cover


async def test_commit_every_batches_events_and_a_failure_redoes_its_batch_singly(
    tmp_path: Path,
) -> None:
    app = sqlite_app(tmp_path)
    calls: list[int] = []

    @app.consumer(
        "projection",
        transactional=True,
        commit_every=5,
        retry=trioflow.Retry(attempts=3, initial=0.01),
    )
    async def project(event: trioflow.Event, tx: trioflow.Transaction) -> None:
        calls.append(event.seq)
        await tx.execute(SCHEMA)
        await tx.execute("INSERT INTO effects (seq, amount) VALUES (?, ?)", event.seq, 1)
        if event.seq == 7 and calls.count(7) == 1:
            raise RuntimeError("once")

    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("paid", None)] * 12)
        await flow.wait_idle()
        assert await rows(flow) == [{"seq": n, "amount": 1} for n in range(1, 13)]
    # 1-5 in one transaction; 6-10 failed at 7 and rolled back; from there
    # on, one event per transaction (7 succeeds the second time).
    assert calls == [1, 2, 3, 4, 5, 6, 7, 6, 7, 8, 9, 10, 11, 12]


async def test_a_requeued_dead_letter_is_removed_in_its_handlers_transaction(
    tmp_path: Path,
) -> None:
    app = sqlite_app(tmp_path)
    fixed = False

    @app.consumer(
        "projection",
        transactional=True,
        retry=trioflow.Retry(attempts=1),
        on_exhausted="dead-letter",
    )
    async def project(event: trioflow.Event, tx: trioflow.Transaction) -> None:
        await tx.execute(SCHEMA)
        await tx.execute("INSERT INTO effects (seq, amount) VALUES (?, ?)", event.seq, 1)
        if event.data == "poison" and not fixed:
            raise RuntimeError("poison")

    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("paid", None), ("paid", "poison"), ("paid", None)])
        await flow.wait_idle()
        assert [letter.seq for letter in await flow.dead_letters()] == [2]
        assert [row["seq"] for row in await rows(flow)] == [1, 3]
        fixed = True
        await flow.requeue("projection", [2])
        await flow.wait_idle()
        assert await flow.dead_letters() == []
        assert [row["seq"] for row in await rows(flow)] == [1, 2, 3]
