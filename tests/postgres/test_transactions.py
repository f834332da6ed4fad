"""Store transactions on PostgreSQL, beyond the contract: what is refused, when the
ordering lock is taken, and what a failure in the middle leaves behind (nothing)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import pytest
import trio

from tests.postgres._proxy import LosingProxy, open_proxy
from trioflow import OutcomeUnknownError, QueryError, StoreError, StoreUnavailableError
from trioflow.stores import StoreTransaction
from trioflow.stores.postgres import PostgresStore
from trioflow.stores.postgres._driver import Driver, StatementTimeoutError
from trioflow.testing._store_contract import make_events

pytestmark = pytest.mark.trio


@pytest.fixture
async def peer(store: PostgresStore, store_url: str) -> AsyncIterator[PostgresStore]:
    """Another store on the same schema: another process's view."""
    other = PostgresStore.from_url(store_url)
    async with other.open():
        yield other


async def make_table(store: PostgresStore) -> str:
    table = f'"{store.schema}".rows'
    async with store.transaction() as tx:
        await tx.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    return table


@contextlib.asynccontextmanager
async def proxied(pg_url: str, schema: str) -> AsyncIterator[tuple[LosingProxy, PostgresStore]]:
    """An open store that reaches the server through a `LosingProxy`."""
    async with open_proxy(pg_url) as proxy:
        store = PostgresStore.from_url(proxy.url(pg_url, schema=schema, poll_interval=0.2))
        async with store.open():
            yield proxy, store


async def count(admin: Driver, table: str) -> int:
    rows: int = await admin.fetchval(f"SELECT count(*) FROM {table}")
    return rows


@pytest.mark.parametrize(
    "statement",
    [
        "COMMIT",
        "commit and chain",
        "END",
        "ROLLBACK",
        "  /* comment */ -- line\n abort",
        "ROLLBACK TO SAVEPOINT a",
        "BEGIN",
        "START TRANSACTION",
        "SET search_path TO public",
        "SET SESSION statement_timeout = 0",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "RESET ALL",
        "DISCARD ALL",
        "LISTEN somewhere",
        "UNLISTEN *",
        "PREPARE TRANSACTION 'x'",
        "DEALLOCATE ALL",
    ],
)
async def test_statements_that_end_the_transaction_or_change_the_session_are_refused(
    store: PostgresStore, admin: Driver, statement: str
) -> None:
    table = await make_table(store)
    with pytest.raises(QueryError, match="not allowed in a trioflow transaction") as raised:
        async with store.transaction() as tx:
            await tx.execute(f"INSERT INTO {table} VALUES (1, 'a')")
            await tx.append(make_events(1))
            await tx.execute(statement)
    assert raised.value.query == statement
    assert await count(admin, table) == 0
    assert await store.head() == 0
    # The connection went back to the pool as it was: still READ COMMITTED, no
    # transaction left open.
    async with store.transaction() as tx:
        level = await tx.fetchval("SELECT current_setting('transaction_isolation')")
        assert level == "read committed"
    assert await store.append(make_events(1))


async def test_statements_that_last_until_the_commit_pass(store: PostgresStore) -> None:
    table = await make_table(store)
    async with store.transaction() as tx:
        await tx.execute("SET LOCAL statement_timeout = '10s'")
        await tx.execute("SET CONSTRAINTS ALL DEFERRED")
        await tx.execute("SAVEPOINT a")
        await tx.execute(f"INSERT INTO {table} VALUES (1, 'a')")
        await tx.execute("RELEASE SAVEPOINT a")
        assert await tx.fetchval(f"SELECT count(*) FROM {table}") == 1


async def test_several_statements_in_one_call_are_refused_by_the_server(
    store: PostgresStore, admin: Driver
) -> None:
    table = await make_table(store)
    query = f"INSERT INTO {table} VALUES (1, 'a'); COMMIT"
    with pytest.raises(QueryError, match="multiple commands") as raised:
        async with store.transaction() as tx:
            await tx.execute(query)
    assert raised.value.query == query
    assert await count(admin, table) == 0


async def test_the_ordering_lock_is_taken_at_the_append_not_before(
    store: PostgresStore, peer: PostgresStore
) -> None:
    table = await make_table(store)
    waited: list[float] = []

    async def publish_outside() -> None:
        start = trio.current_time()
        await peer.append(make_events(1, "outside"))
        waited.append(trio.current_time() - start)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, store.transaction() as tx:
            await tx.execute(f"INSERT INTO {table} VALUES (1, 'a')")
            # While the user's statements run, others publish without waiting.
            nursery.start_soon(publish_outside)
            await tx.execute("SELECT pg_sleep(0.5)")
            assert len(waited) == 1
            assert waited[0] < 0.4, waited
            inside = await tx.append(make_events(1, "inside"))
            # From the append on, they wait for the commit.
            nursery.start_soon(publish_outside)
            await trio.sleep(0.5)
            assert len(waited) == 1
    assert waited[1] >= 0.5, waited
    events = await peer.read(0, 10)
    assert [event.type for event in events] == ["outside", "inside", "outside"]
    assert events[1].seq == inside.seqs[0]


async def test_a_refused_statement_in_the_middle_rolls_everything_back(
    store: PostgresStore, peer: PostgresStore, admin: Driver
) -> None:
    table = await make_table(store)
    with pytest.raises(QueryError) as raised:
        async with store.transaction() as tx:
            await tx.execute(f"INSERT INTO {table} VALUES (1, 'a')")
            await tx.commit_cursors({"c": 1})
            await tx.append(make_events(2))
            with pytest.raises(QueryError, match="UniqueViolationError"):
                await tx.execute(f"INSERT INTO {table} VALUES ($1, $2)", 1, "b")
            # Caught, yet PostgreSQL aborted the transaction: later
            # statements are refused and the block rolls back at its end.
            with pytest.raises(QueryError, match="an earlier statement of this transaction"):
                await tx.fetchval("SELECT 1")
    assert "was rolled back, nothing of it was committed" in str(raised.value)
    assert "VALUES ($1, $2)" in raised.value.query
    assert await count(admin, table) == 0
    assert await peer.load_cursors() == {}
    assert await peer.head() == 0
    # No hole a reader waits on: the next append is read at once.
    later = await peer.append(make_events(1))
    with trio.fail_after(5):
        assert [event.seq for event in await store.read(0, 10)] == list(later.seqs)


async def test_a_type_error_in_the_arguments_is_a_query_error(store: PostgresStore) -> None:
    table = await make_table(store)
    with pytest.raises(QueryError, match="invalid input for query argument"):
        async with store.transaction() as tx:
            await tx.execute(f"INSERT INTO {table} VALUES ($1, $2)", "one", "a")
    with pytest.raises(QueryError, match="expects 2 arguments"):
        async with store.transaction() as tx:
            await tx.execute(f"INSERT INTO {table} VALUES ($1, $2)", 1)


async def test_a_killed_connection_in_the_middle_leaves_nothing(
    pg_url: str, schema: str, admin: Driver
) -> None:
    async with proxied(pg_url, schema) as (proxy, store):
        table = await make_table(store)
        with trio.fail_after(10), pytest.raises(StoreUnavailableError):
            async with store.transaction() as tx:
                await tx.execute(f"INSERT INTO {table} VALUES (1, 'a')")
                await tx.commit_cursors({"c": 1})
                await tx.append(make_events(2))
                proxy.drop_all()
                await tx.fetchval("SELECT 1")
        # The server ended the transaction with its session: nothing is left.
        with trio.fail_after(10):
            # Polling the server's view: there is nothing to wait on locally.
            while await admin.fetchval(  # noqa: ASYNC110
                "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'"
                " AND query LIKE '%' || $1 || '%'",
                schema,
            ):
                await trio.sleep(0.05)
        assert await count(admin, table) == 0
        assert await admin.fetchval(f'SELECT count(*) FROM "{schema}".events') == 0
        # The store goes on, on new connections.
        appended = await store.append(make_events(1))
        assert [event.seq for event in await store.read(0, 10)] == list(appended.seqs)


async def test_a_lost_commit_answer_is_settled_by_the_events_appended(
    pg_url: str, schema: str, admin: Driver
) -> None:
    async with proxied(pg_url, schema) as (proxy, store):
        table = await make_table(store)
        with trio.fail_after(20):
            async with store.transaction() as tx:
                await tx.execute(f"INSERT INTO {table} VALUES (1, 'a')")
                appended = await tx.append(make_events(2))
                proxy.lose_answer_to(b"COMMIT")
        assert proxy.answers_lost == 1
        assert [event.seq for event in await store.read(0, 10)] == list(appended.seqs)
        assert await count(admin, table) == 1
        # Lost before it reached the server: checked, and not committed.
        with trio.fail_after(20), pytest.raises(StoreUnavailableError, match="not committed"):
            async with store.transaction() as tx:
                await tx.execute(f"INSERT INTO {table} VALUES (2, 'b')")
                await tx.append(make_events(1))
                proxy.lose_request_with(b"COMMIT")
        assert await count(admin, table) == 1
        # Nothing appended, nothing to look for: the outcome is unknown.
        with trio.fail_after(20), pytest.raises(OutcomeUnknownError, match="appended no event"):
            async with store.transaction() as tx:
                await tx.execute(f"INSERT INTO {table} VALUES (3, 'c')")
                proxy.lose_answer_to(b"COMMIT")
        assert await count(admin, table) == 2


async def test_a_timeout_names_the_transactions_statement(
    make_url: Callable[..., str], schema: str, admin: Driver
) -> None:
    store = PostgresStore.from_url(make_url(schema=schema, command_timeout=0.5))
    async with store.open():
        table = await make_table(store)
        with trio.fail_after(10), pytest.raises(StatementTimeoutError) as raised:
            async with store.transaction() as tx:
                await tx.execute(f"INSERT INTO {table} VALUES (1, 'a')")
                await tx.fetchval("SELECT pg_sleep(5) AS slow_statement")
        assert "the transaction's statement 'SELECT pg_sleep(5) AS slow_statement'" in str(
            raised.value
        )
        assert await count(admin, table) == 0
        assert await store.append(make_events(1))


async def test_waiters_learn_of_the_events_at_the_commit(
    store: PostgresStore, peer: PostgresStore
) -> None:
    heads: dict[str, int] = {}

    async def wait(name: str, on: PostgresStore) -> None:
        heads[name] = await on.wait_for_append(0)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait, "here", store)
            nursery.start_soon(wait, "there", peer)
            await trio.testing.wait_all_tasks_blocked()
            async with store.transaction() as tx:
                appended = await tx.append(make_events(2))
                await trio.sleep(0.3)
                assert heads == {}
    assert heads == {"here": appended.seqs[-1], "there": appended.seqs[-1]}


async def test_cursor_commits_in_a_transaction_are_logged_whatever_the_durability(
    make_url: Callable[..., str], schema: str, admin: Driver
) -> None:
    store = PostgresStore.from_url(make_url(schema=schema, cursor_durability="unlogged"))
    async with store.open():
        async with store.transaction() as tx:
            await tx.commit_cursors({"c": 7})
        assert await admin.fetchval(f'SELECT seq FROM "{schema}".cursors') == 7
        assert await store.load_cursors() == {"c": 7}


async def test_a_transaction_is_not_usable_after_its_block(store: PostgresStore) -> None:
    async with store.transaction() as tx:
        kept: StoreTransaction = tx
    with pytest.raises(StoreError, match="has ended"):
        await kept.fetchval("SELECT 1")


async def test_rows_come_back_as_plain_dicts(store: PostgresStore) -> None:
    async with store.transaction() as tx:
        row = await tx.fetchrow("SELECT 1 AS a, 'x'::text AS b, NULL::int AS c")
    assert row == {"a": 1, "b": "x", "c": None}
    assert type(row) is dict
