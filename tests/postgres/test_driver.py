"""The asyncpg bridge: cancellation, transactions, error translation, LISTEN."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import attrs
import pytest
import trio
import trio.testing
import trio_asyncio  # type: ignore[import-untyped]

from trioflow import StoreError, StoreUnavailableError
from trioflow.stores.postgres._driver import (
    Driver,
    DriverConfig,
    StatementTimeoutError,
    open_driver,
)

# A cancelled call must come back this fast (the bound is cleanup_timeout,
# 5 s by default; a healthy server answers a cancel request in milliseconds).
PROMPT = 1.0


@contextlib.asynccontextmanager
async def open_tagged(url: str, tag: str, **settings: object) -> AsyncIterator[Driver]:
    """A driver whose connections carry ``tag`` as application_name."""
    config = DriverConfig(
        dsn=url,
        display=url,
        min_size=1,
        max_size=3,
        server_settings={"application_name": tag},
        **settings,  # type: ignore[arg-type]
    )
    async with open_driver(config) as driver:
        yield driver


async def activity(admin: Driver, tag: str) -> list[tuple[str, str]]:
    """(state, query) of every backend whose application_name is ``tag``."""
    rows = await admin.fetch(
        "SELECT state, query FROM pg_stat_activity WHERE application_name = $1", tag
    )
    return [(row["state"], row["query"]) for row in rows]


async def assert_clean(admin: Driver, tag: str) -> None:
    """No backend of ``tag`` is inside a transaction or still running a query."""
    # The server updates pg_stat_activity a moment after a backend changes
    # state; give it a little time, but not much.
    with trio.move_on_after(2):
        while True:
            states = await activity(admin, tag)
            if all(state == "idle" for state, _ in states):
                return
            await trio.sleep(0.02)
    raise AssertionError(f"connections not idle after a cancellation: {states}")


@pytest.fixture
def tag() -> str:
    return f"trioflow-test-{uuid.uuid4().hex[:12]}"


async def test_cancel_mid_query_returns_promptly_and_leaves_the_pool_healthy(
    pg_url: str, admin: Driver, tag: str
) -> None:
    async with open_tagged(pg_url, tag) as driver:
        start = trio.current_time()
        with trio.move_on_after(0.2) as scope:
            await driver.execute("SELECT pg_sleep(30)")
        assert scope.cancelled_caught
        assert trio.current_time() - start < 0.2 + PROMPT
        # The server stopped the statement (it was cancelled, not abandoned).
        await assert_clean(admin, tag)
        assert await driver.fetchval("SELECT 41 + 1") == 42


async def test_cancel_inside_a_transaction_rolls_it_back(
    pg_url: str, admin: Driver, tag: str, schema: str
) -> None:
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    await admin.execute(f'CREATE TABLE "{schema}".t (n int)')
    async with open_tagged(pg_url, tag) as driver:
        start = trio.current_time()
        with trio.move_on_after(0.2) as scope:
            async with driver.transaction() as tx:
                await tx.execute(f'INSERT INTO "{schema}".t VALUES (1)')
                await tx.execute("SELECT pg_sleep(30)")
        assert scope.cancelled_caught
        assert trio.current_time() - start < 0.2 + PROMPT
        await assert_clean(admin, tag)
        assert await admin.fetchval(f'SELECT count(*) FROM "{schema}".t') == 0
        # Cancelled between statements (in trio code), too.
        with trio.move_on_after(0.1) as scope:
            async with driver.transaction() as tx:
                await tx.execute(f'INSERT INTO "{schema}".t VALUES (2)')
                await trio.sleep_forever()
        assert scope.cancelled_caught
        await assert_clean(admin, tag)
        assert await admin.fetchval(f'SELECT count(*) FROM "{schema}".t') == 0
        assert await driver.fetchval("SELECT 1") == 1


async def test_cancel_while_waiting_for_a_lock(pg_url: str, admin: Driver, tag: str) -> None:
    key = uuid.uuid4().int % 2**31
    async with open_tagged(pg_url, tag) as driver, admin.transaction() as holder:
        await holder.execute("SELECT pg_advisory_xact_lock($1)", key)
        start = trio.current_time()
        with trio.move_on_after(0.2) as scope:
            async with driver.transaction() as tx:
                await tx.execute("SELECT pg_advisory_xact_lock($1)", key)
        assert scope.cancelled_caught
        assert trio.current_time() - start < 0.2 + PROMPT
        await assert_clean(admin, tag)


async def test_cancel_before_anything_ran(pg_url: str, tag: str) -> None:
    async with open_tagged(pg_url, tag) as driver:
        for call in (
            lambda: driver.fetchval("SELECT 1"),
            lambda: driver.fetch("SELECT 1"),
            lambda: driver.execute("SELECT 1"),
        ):
            with trio.CancelScope() as scope:
                scope.cancel()
                await call()
            assert scope.cancelled_caught
        assert await driver.fetchval("SELECT 2") == 2


async def test_many_cancellations_do_not_leak_connections(
    pg_url: str, admin: Driver, tag: str
) -> None:
    async with open_tagged(pg_url, tag) as driver:
        for delay in (0, 0.001, 0.003, 0.01, 0.03) * 4:
            with trio.move_on_after(delay):
                async with driver.transaction() as tx:
                    await tx.execute("SELECT pg_sleep(0.05)")
        await assert_clean(admin, tag)
        assert len(await activity(admin, tag)) <= 3
        assert await driver.fetchval("SELECT 3") == 3


async def test_transaction_commits_or_rolls_back(admin: Driver, schema: str) -> None:
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    await admin.execute(f'CREATE TABLE "{schema}".t (n int)')
    async with admin.transaction() as tx:
        await tx.execute(f'INSERT INTO "{schema}".t VALUES (1)')
    with pytest.raises(ZeroDivisionError):
        async with admin.transaction() as tx:
            await tx.execute(f'INSERT INTO "{schema}".t VALUES (2)')
            raise ZeroDivisionError
    assert [row[0] for row in await admin.fetch(f'SELECT n FROM "{schema}".t')] == [1]


async def test_errors_are_translated(admin: Driver, schema: str) -> None:
    with pytest.raises(StoreError, match="SQLSTATE 42601") as info:
        await admin.execute("SELEKT 1")
    assert type(info.value).__module__.startswith("trioflow")
    assert type(info.value.__cause__).__module__.startswith("asyncpg")
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    await admin.execute(f'CREATE TABLE "{schema}".t (n int PRIMARY KEY)')
    await admin.execute(f'INSERT INTO "{schema}".t VALUES (1)')
    with pytest.raises(StoreError, match="UniqueViolation"):
        async with admin.transaction() as tx:
            await tx.execute(f'INSERT INTO "{schema}".t VALUES (1)')
    with pytest.raises(StoreError, match="NUL"):
        await admin.execute("SELECT $1::text", "a\x00b")
    with pytest.raises(StoreError, match="UTF-8"):
        await admin.execute("SELECT $1::text", "\ud800")


async def test_unreachable_server() -> None:
    # Port 1 on localhost: nothing listens there.
    config = DriverConfig(dsn="postgresql://nobody@127.0.0.1:1/db", display="127.0.0.1:1")
    with pytest.raises(
        StoreUnavailableError, match=r"cannot connect to PostgreSQL at 127\.0\.0\.1:1"
    ):
        async with open_driver(config):
            pass  # pragma: no cover


async def test_statement_timeout_is_a_store_error(pg_url: str, tag: str) -> None:
    async with open_tagged(pg_url, tag, command_timeout=0.1) as driver:
        # It names the operation and the limit; the connection stays usable.
        with pytest.raises(
            StatementTimeoutError,
            match=r"^sleeping did not finish within 0\.1s \(the store's command_timeout\)",
        ):
            await driver.execute("SELECT pg_sleep(5)", operation="sleeping")
        assert await driver.fetchval("SELECT 4") == 4


async def test_listen_wakes_on_notify(pg_url: str, admin: Driver) -> None:
    channel = f"tf_test_{uuid.uuid4().hex[:12]}"
    got: list[int] = []
    payloads: list[str] = []
    notified = trio.Event()
    listening = trio.Event()

    def on_notify(pid: int, payload: str) -> None:
        got.append(pid)
        payloads.append(payload)
        notified.set()

    async with (
        open_tagged(pg_url, "trioflow-test-listen") as driver,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(
            lambda: driver.listen(
                channel, on_notify, on_listening=listening.set, ping_interval=0.05
            )
        )
        await listening.wait()
        await admin.execute("SELECT pg_notify($1, '17')", channel)
        with trio.fail_after(5):
            await notified.wait()
        # Pings keep going without disturbing anything.
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
        # The sender's backend is told apart: admin's pool, not the listener's.
        assert len(got) == 1
        assert payloads == ["17"]
        assert admin.is_pool_backend(got[0])
        assert not driver.is_pool_backend(got[0])


async def test_listen_reports_a_lost_connection(pg_url: str, admin: Driver) -> None:
    tag = f"trioflow-test-{uuid.uuid4().hex[:12]}"
    listening = trio.Event()

    async def kill_listener() -> None:
        await listening.wait()
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = $1 AND query LIKE 'LISTEN%'",
            tag,
        )

    async with open_tagged(pg_url, tag) as driver, trio.open_nursery() as nursery:
        nursery.start_soon(kill_listener)
        with pytest.raises(StoreUnavailableError, match="LISTEN"), trio.fail_after(10):
            await driver.listen(
                "tf_unused", lambda pid, payload: None, on_listening=listening.set, ping_interval=5
            )


async def test_runs_inside_the_callers_own_trio_asyncio_loop(pg_url: str, tag: str) -> None:
    async with trio_asyncio.open_loop() as outer:
        async with open_tagged(pg_url, tag) as driver:
            # The caller's current loop is still its own...
            assert trio_asyncio.current_loop.get() is outer
            assert await driver.fetchval("SELECT 5") == 5
        assert trio_asyncio.current_loop.get() is outer


async def test_usable_from_tasks_started_before_it_opened(pg_url: str, tag: str) -> None:
    # Tasks spawned from a nursery opened outside the driver's block do not
    # inherit its loop in their context; the driver must not rely on it.
    ready, receive = trio.open_memory_channel[Driver](1)
    results: list[int] = []
    done = trio.Event()

    async def outside_task() -> None:
        driver = await receive.receive()
        results.append(await driver.fetchval("SELECT 6"))
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(outside_task)
        async with open_tagged(pg_url, tag) as driver:
            await ready.send(driver)
            with trio.fail_after(10):
                await done.wait()
    assert results == [6]


async def test_body_exceptions_are_not_swallowed(pg_url: str, tag: str) -> None:
    error = KeyError("x")
    with pytest.raises(KeyError) as info:
        async with open_tagged(pg_url, tag):
            raise error
    assert info.value is error


async def test_read_committed_is_enforced_when_asked(pg_url: str) -> None:
    # A session whose default is serializable (as a role or database may set).
    config = DriverConfig(
        dsn=pg_url,
        display=pg_url,
        server_settings={"default_transaction_isolation": "serializable"},
        read_committed=True,
    )
    async with open_driver(config) as driver:
        assert await driver.fetchval("SHOW transaction_isolation") == "read committed"
        async with driver.transaction() as tx:
            assert await tx.fetchval("SHOW transaction_isolation") == "read committed"
    async with open_driver(attrs.evolve(config, read_committed=False)) as driver:
        assert await driver.fetchval("SHOW transaction_isolation") == "serializable"


async def test_bulk_statements(admin: Driver, schema: str) -> None:
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    await admin.execute(f'CREATE TABLE "{schema}".t (n int, s text)')
    await admin.executemany(f'INSERT INTO "{schema}".t VALUES ($1, $2)', [(1, "a"), (2, "b")])
    tag = await admin.copy_records("t", schema=schema, columns=["n", "s"], records=[(3, "c")])
    assert tag == "COPY 1"
    with pytest.raises(ZeroDivisionError):
        async with admin.transaction() as tx:
            await tx.copy_records("t", schema=schema, columns=["n", "s"], records=[(4, "d")])
            raise ZeroDivisionError
    async with admin.transaction() as tx:
        await tx.copy_records("t", schema=schema, columns=["n", "s"], records=[(5, "e")])
        assert await tx.fetchval(f'SELECT count(*) FROM "{schema}".t') == 4
    rows = await admin.fetch(f'SELECT n, s FROM "{schema}".t ORDER BY n')
    assert [tuple(row) for row in rows] == [(1, "a"), (2, "b"), (3, "c"), (5, "e")]
