"""Opening the store: schema creation and migration, versions, bad servers and roles."""

from __future__ import annotations

import datetime
import socket
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import trio

from tests.postgres._server import open_admin, with_options
from trioflow import (
    ConfigurationError,
    SchemaVersionError,
    StoreError,
    StoreUnavailableError,
)
from trioflow.stores import LogBounds
from trioflow.stores.postgres import SCHEMA_VERSION, PostgresStore, _schema
from trioflow.stores.postgres._driver import Driver
from trioflow.testing._store_contract import check_a_first_dead_letter, make_events, make_letter


async def version_rows(admin: Driver, schema: str) -> list[tuple[int, object]]:
    rows = await admin.fetch(f'SELECT version, migrated_at FROM "{schema}".schema_version')
    return [(row[0], row[1]) for row in rows]


async def test_first_open_creates_the_schema(store_url: str, schema: str, admin: Driver) -> None:
    store = PostgresStore.from_url(store_url)
    async with store.open():
        assert await store.head() == 0
    tables = await admin.fetch(
        "SELECT c.relname, c.relpersistence::text FROM pg_class c JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind = 'r' ORDER BY 1",
        schema,
    )
    assert [(row[0], row[1]) for row in tables] == [
        ("cursors", "p"),
        ("cursors_unlogged", "u"),
        ("dead_letters", "p"),
        ("events", "p"),
        ("leases", "p"),
        ("log_state", "p"),
        ("schema_version", "p"),
    ]
    assert [version for version, _ in await version_rows(admin, schema)] == [SCHEMA_VERSION]


async def test_opening_again_changes_nothing(store_url: str, schema: str, admin: Driver) -> None:
    store = PostgresStore.from_url(store_url)
    async with store.open():
        await store.append(make_events(3))
    before = await version_rows(admin, schema)
    for _ in range(2):
        async with store.open():
            assert await store.head() == 3
    assert await version_rows(admin, schema) == before


async def test_concurrent_first_opens_do_not_race(
    make_url: Callable[..., str], schema: str, admin: Driver
) -> None:
    url = make_url(schema=schema, pool_min_size=1, pool_max_size=2)
    opened: list[int] = []

    async def open_one() -> None:
        store = PostgresStore.from_url(url)
        async with store.open():
            opened.append(await store.head())

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(open_one)
    assert opened == [0] * 6
    assert [version for version, _ in await version_rows(admin, schema)] == [SCHEMA_VERSION]


async def make_version_1_schema(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A schema as trioflow left it at version 1, with events and cursors.

    Made by this trioflow stopped at version 1: a migration never changes once
    released, so that is what version 1 created.
    """
    with monkeypatch.context() as patch:
        patch.setattr(_schema, "SCHEMA_VERSION", 1)
        store = PostgresStore.from_url(url)
        async with store.open():
            await store.append(make_events(5))
            await store.commit_cursors({"billing": 5, "audit": 2})


async def make_version_2_schema(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A schema as trioflow left it at version 2: events, cursors and a dead letter."""
    with monkeypatch.context() as patch:
        patch.setattr(_schema, "SCHEMA_VERSION", 2)
        store = PostgresStore.from_url(url)
        async with store.open():
            await store.append(make_events(5))
            await store.commit_cursors({"billing": 5, "audit": 2})
            await store.record_dead_letter(make_letter("audit", 3), cursor=3)


async def make_version_3_schema(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A schema as trioflow left it at version 3: events, cursors, a letter and a lease."""
    with monkeypatch.context() as patch:
        patch.setattr(_schema, "SCHEMA_VERSION", 3)
        store = PostgresStore.from_url(url)
        async with store.open():
            await store.append(make_events(5))
            await store.commit_cursors({"billing": 5, "audit": 2})
            await store.record_dead_letter(make_letter("audit", 1), cursor=3)
            await store.claim_leases("h1", ["billing"], 3600.0)


async def test_a_version_4_schema_is_upgraded_to_notify_the_last_seq(
    store_url: str, schema: str, admin: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    payloads: list[str] = []
    listening, three = trio.Event(), trio.Event()

    def on_notify(_pid: int, payload: str) -> None:
        payloads.append(payload)
        if len(payloads) == 3:
            three.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: admin.listen(
                f"{schema}_appended",
                on_notify,
                on_listening=listening.set,
                ping_interval=5,
            )
        )
        await listening.wait()
        # A process of the previous version, open before the upgrade and
        # still appending after it.
        old = PostgresStore.from_url(store_url)
        monkeypatch.setattr(_schema, "SCHEMA_VERSION", 4)
        async with old.open():
            monkeypatch.undo()
            await old.append(make_events(3))
            ((version, _),) = await version_rows(admin, schema)
            assert version == 4
            new = PostgresStore.from_url(store_url)
            async with new.open():
                await old.append(make_events(2))
                await new.append(make_events(1))
                # Each sees the other's events, and the upgraded function numbers on.
                assert [event.seq for event in await old.read(0, 10)] == [1, 2, 3, 4, 5, 6]
                assert await new.head() == 6
        with trio.fail_after(5):
            await three.wait()
        nursery.cancel_scope.cancel()
    # Version 4's function notified with an empty payload; version 5's with
    # the batch's last seq, whichever process called it.
    assert payloads == ["", "5", "6"]
    ((version, _),) = await version_rows(admin, schema)
    assert version == SCHEMA_VERSION == 5


async def test_a_version_3_schema_is_upgraded_in_place_and_can_be_pruned(
    store_url: str, schema: str, admin: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    await make_version_3_schema(store_url, monkeypatch)
    (old,) = await version_rows(admin, schema)
    assert old[0] == 3
    assert await admin.fetchval("SELECT to_regclass($1)", f'"{schema}".log_state') is None
    leases = await admin.fetch(f'SELECT * FROM "{schema}".leases ORDER BY 1')
    store = PostgresStore.from_url(store_url)
    async with store.open():
        assert await store.log_bounds() == LogBounds(first=1, head=5, pruned_through=0)
        # The letter's event 1 stays; 2 and 3 go (audit is at 3).
        assert await store.prune(5, limit=100) == 2
        assert [event.seq for event in await store.read(0, 10)] == [1, 4, 5]
        await store.discard_dead_letters("audit", [1])
        await store.commit_cursors({"audit": 5})
        assert await store.prune(5, limit=100) == 3
        assert await store.log_bounds() == LogBounds(first=6, head=5, pruned_through=5)
        # The replaced append function numbers on above the pruned log.
        appended = await store.append(make_events(1))
        assert (appended.after, list(appended.seqs)) == (5, [6])
    ((version, _),) = await version_rows(admin, schema)
    assert version == SCHEMA_VERSION == 5
    assert await admin.fetch(f'SELECT * FROM "{schema}".leases ORDER BY 1') == leases


async def test_a_version_2_schema_is_upgraded_in_place(
    store_url: str, schema: str, admin: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    await make_version_2_schema(store_url, monkeypatch)
    (old,) = await version_rows(admin, schema)
    assert old[0] == 2
    assert await admin.fetchval("SELECT to_regclass($1)", f'"{schema}".leases') is None
    kept = {
        table: await admin.fetch(f'SELECT * FROM "{schema}".{table} ORDER BY 1, 2')
        for table in ("events", "cursors", "dead_letters")
    }
    store = PostgresStore.from_url(store_url)
    async with store.open():
        assert await store.load_cursors() == {"billing": 5, "audit": 3}
        assert [letter.seq for letter in await store.dead_letters("audit")] == [3]
        (lease,) = await store.claim_leases("h1", ["billing"], 3600.0)
        assert (lease.holder, lease.token) == ("h1", 1)
        assert await store.commit_cursors({"billing": 6}, fences={"billing": 1}) == set()
        assert await store.commit_cursors({"billing": 7}, fences={"billing": 2}) == {"billing"}
    ((version, migrated_at),) = await version_rows(admin, schema)
    assert version == SCHEMA_VERSION == 5
    before = old[1]
    assert isinstance(before, datetime.datetime) and isinstance(migrated_at, datetime.datetime)
    assert migrated_at > before
    for table in ("events", "dead_letters"):
        assert await admin.fetch(f'SELECT * FROM "{schema}".{table} ORDER BY 1, 2') == kept[table]
    # A trioflow still at version 2 refuses the upgraded schema.
    with monkeypatch.context() as patch:
        patch.setattr(_schema, "SCHEMA_VERSION", 2)
        with pytest.raises(SchemaVersionError, match="upgrade trioflow"):
            async with PostgresStore.from_url(store_url).open():
                pass  # pragma: no cover


async def test_a_version_1_schema_is_upgraded_in_place(
    store_url: str, schema: str, admin: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    await make_version_1_schema(store_url, monkeypatch)
    (old,) = await version_rows(admin, schema)
    assert old[0] == 1
    assert await admin.fetchval("SELECT to_regclass($1)", f'"{schema}".dead_letters') is None
    events = await admin.fetch(f'SELECT * FROM "{schema}".events ORDER BY seq')
    store = PostgresStore.from_url(store_url)
    async with store.open():
        assert await store.load_cursors() == {"billing": 5, "audit": 2}
        await check_a_first_dead_letter(store, "audit", 3)
        assert list((await store.append(make_events(1))).seqs) == [6]
    ((version, migrated_at),) = await version_rows(admin, schema)
    assert version == SCHEMA_VERSION == 5
    before = old[1]
    assert isinstance(before, datetime.datetime) and isinstance(migrated_at, datetime.datetime)
    assert migrated_at > before
    assert (
        await admin.fetch(f'SELECT * FROM "{schema}".events WHERE seq <= 5 ORDER BY seq') == events
    )
    # A trioflow still at version 1 refuses the upgraded schema.
    with monkeypatch.context() as patch:
        patch.setattr(_schema, "SCHEMA_VERSION", 1)
        with pytest.raises(SchemaVersionError, match="upgrade trioflow"):
            async with PostgresStore.from_url(store_url).open():
                pass  # pragma: no cover


@pytest.mark.parametrize("old_version", [1, 2])
async def test_concurrent_opens_upgrade_an_old_schema_once(
    make_url: Callable[..., str],
    schema: str,
    admin: Driver,
    monkeypatch: pytest.MonkeyPatch,
    old_version: int,
) -> None:
    url = make_url(schema=schema, pool_min_size=1, pool_max_size=2)
    make_old = {1: make_version_1_schema, 2: make_version_2_schema}[old_version]
    await make_old(url, monkeypatch)

    async def open_one(consumer: str) -> None:
        store = PostgresStore.from_url(url)
        async with store.open():
            await store.record_dead_letter(make_letter(consumer, 1), cursor=1)
            await store.claim_leases(consumer, [consumer], 3600.0)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for number in range(6):
                nursery.start_soon(open_one, f"c{number}")
    assert [version for version, _ in await version_rows(admin, schema)] == [SCHEMA_VERSION]
    assert await admin.fetchval(f'SELECT count(*) FROM "{schema}".dead_letters') == 6 + (
        old_version == 2
    )
    assert await admin.fetchval(f'SELECT count(*) FROM "{schema}".leases') == 6


async def test_a_newer_schema_is_refused(store_url: str, schema: str, admin: Driver) -> None:
    async with PostgresStore.from_url(store_url).open():
        pass
    await admin.execute(f'UPDATE "{schema}".schema_version SET version = $1', SCHEMA_VERSION + 1)
    with pytest.raises(SchemaVersionError, match="upgrade trioflow"):
        async with PostgresStore.from_url(store_url).open():
            pass  # pragma: no cover


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_unreachable_server() -> None:
    port = free_port()
    store = PostgresStore.from_url(f"postgresql://postgres@127.0.0.1:{port}/test")
    with pytest.raises(StoreUnavailableError, match=rf"cannot connect to PostgreSQL.*:{port}"):
        async with store.open():
            pass  # pragma: no cover


async def test_connect_timeout() -> None:
    # A listening socket that never answers: the connection attempt hangs.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        store = PostgresStore.from_url(
            f"postgresql://postgres@127.0.0.1:{port}/test?connect_timeout=0.3"
        )
        with trio.fail_after(5), pytest.raises(StoreUnavailableError, match="did not answer"):
            async with store.open():
                pass  # pragma: no cover


async def test_missing_database(make_url: Callable[..., str]) -> None:
    url = make_url().replace("/test", f"/no_such_db_{uuid.uuid4().hex[:8]}", 1)
    if "no_such_db" not in url:
        pytest.skip("the test URL's database is not called test")
    with pytest.raises(StoreUnavailableError, match=r"does not exist.*create the database"):
        async with PostgresStore.from_url(url).open():
            pass  # pragma: no cover


async def test_unknown_role(pg_url: str) -> None:
    url = pg_url.replace("postgres@", f"no_such_role_{uuid.uuid4().hex[:8]}@", 1)
    if "no_such_role" not in url:
        pytest.skip("the test URL's user is not postgres")
    with pytest.raises(StoreUnavailableError, match="refused the login"):
        async with PostgresStore.from_url(url).open():
            pass  # pragma: no cover


@pytest.fixture
async def weak_role(admin: Driver) -> object:
    """A login role without the right to create schemas (dropped afterwards)."""
    if not await admin.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
        pytest.skip("needs a superuser on the test server to create a role")
    role = f"tf_weak_{uuid.uuid4().hex[:8]}"
    await admin.execute(f'CREATE ROLE "{role}" LOGIN')
    yield role
    await admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
    )
    await admin.execute(f'DROP OWNED BY "{role}"')
    await admin.execute(f'DROP ROLE "{role}"')


async def test_no_permission_to_create_the_schema(
    make_url: Callable[..., str], schema: str, weak_role: str
) -> None:
    url = make_url(schema=schema).replace("postgres@", f"{weak_role}@", 1)
    if weak_role not in url:
        pytest.skip("the test URL's user is not postgres")
    with pytest.raises(StoreError, match=r"cannot create or migrate.*permission denied") as info:
        async with PostgresStore.from_url(url).open():
            pass  # pragma: no cover
    assert not isinstance(info.value, StoreUnavailableError)


async def test_a_schema_made_by_an_administrator_is_used(
    make_url: Callable[..., str], schema: str, weak_role: str, admin: Driver
) -> None:
    url = make_url(schema=schema).replace("postgres@", f"{weak_role}@", 1)
    if weak_role not in url:
        pytest.skip("the test URL's user is not postgres")
    await admin.execute(f'CREATE SCHEMA "{schema}" AUTHORIZATION "{weak_role}"')
    store = PostgresStore.from_url(url)
    async with store.open():
        appended = await store.append(make_events(2))
        assert list(appended.seqs) == [1, 2]


async def test_tables_that_are_not_ours_are_not_adopted(
    store_url: str, schema: str, admin: Driver
) -> None:
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    await admin.execute(f'CREATE TABLE "{schema}".events (x int)')
    with pytest.raises(StoreError, match=r"cannot create or migrate.*already exists"):
        async with PostgresStore.from_url(store_url).open():
            pass  # pragma: no cover
    # Nothing was left half-made.
    assert await admin.fetchval("SELECT to_regclass($1)", f'"{schema}".schema_version') is None


async def test_open_twice_at_once_is_refused(store: PostgresStore) -> None:
    with pytest.raises(ConfigurationError, match="already open"):
        async with store.open():
            pass  # pragma: no cover
    assert await store.head() == 0


async def test_methods_outside_open_fail_clearly(store_url: str) -> None:
    store = PostgresStore.from_url(store_url)
    with pytest.raises(StoreError, match="not open"):
        await store.head()
    async with store.open():
        pass
    with pytest.raises(StoreError, match="not open"):
        await store.append(make_events(1))


async def test_the_blocks_own_exception_comes_out_unchanged(store_url: str) -> None:
    store = PostgresStore.from_url(store_url)
    error = LookupError("mine")
    with pytest.raises(LookupError) as info:
        async with store.open():
            raise error
    assert info.value is error
    # And the instance can be opened again afterwards.
    async with store.open():
        assert await store.head() == 0


async def test_cancelling_the_block_closes_promptly(store_url: str) -> None:
    store = PostgresStore.from_url(store_url)
    start = trio.current_time()
    with trio.move_on_after(0.5) as scope:
        async with store.open():
            await store.wait_for_append(0)
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert trio.current_time() - start < 2.5


async def test_appends_work_for_a_role_defaulting_to_serializable(
    make_url: Callable[..., str], schema: str, weak_role: str, admin: Driver
) -> None:
    url = make_url(schema=schema).replace("postgres@", f"{weak_role}@", 1)
    if weak_role not in url:
        pytest.skip("the test URL's user is not postgres")
    await admin.execute(
        f'ALTER ROLE "{weak_role}" SET default_transaction_isolation = serializable'
    )
    await admin.execute(f'CREATE SCHEMA "{schema}" AUTHORIZATION "{weak_role}"')
    stores = [PostgresStore.from_url(url) for _ in range(3)]
    async with stores[0].open(), stores[1].open(), stores[2].open():
        heads: list[tuple[int, int]] = []

        async def write(store: PostgresStore) -> None:
            for _ in range(10):
                appended = await store.append(make_events(3))
                heads.append((appended.after, appended.seqs[0]))

        async with trio.open_nursery() as nursery:
            for store in stores:
                nursery.start_soon(write, store)
        # The head read under the lock is fresh: each batch follows the last.
        assert sorted(heads) == [(3 * n, 3 * n + 1) for n in range(30)]


@pytest.fixture
async def latin1_url(pg_url: str, admin: Driver) -> AsyncIterator[str]:
    """The URL of a new, empty LATIN1 database (dropped afterwards)."""
    if not await admin.fetchval(
        "SELECT rolsuper OR rolcreatedb FROM pg_roles WHERE rolname = current_user"
    ):
        pytest.skip("needs a role that may create databases on the test server")
    name = f"tf_test_latin1_{uuid.uuid4().hex[:12]}"
    await admin.execute(
        f"CREATE DATABASE \"{name}\" ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' "
        "TEMPLATE template0"
    )
    try:
        yield urllib.parse.urlunsplit(urllib.parse.urlsplit(pg_url)._replace(path=f"/{name}"))
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def refusal(store: PostgresStore) -> str:
    """The message of the StoreError that opening ``store`` raises."""
    with pytest.raises(StoreError) as info:
        async with store.open():
            pass  # pragma: no cover
    return str(info.value)


async def test_a_database_that_is_not_utf8_is_refused(latin1_url: str, schema: str) -> None:
    message = await refusal(PostgresStore.from_url(with_options(latin1_url, schema=schema)))
    assert "uses the LATIN1 encoding" in message
    assert "ENCODING 'UTF8'" in message
    assert latin1_url.rpartition("/")[2] in message
    # Refused before anything was created in it.
    async with open_admin(latin1_url) as driver:
        assert not await driver.fetchval(
            "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = $1)", schema
        )


async def five_events_read_by_billing(store: PostgresStore) -> None:
    """Append five events, and commit consumer billing's cursor at the last."""
    async with store.open():
        await store.append(make_events(5))
        await store.commit_cursors({"billing": 5})


async def test_a_log_reset_under_its_cursors_is_refused(
    make_url: Callable[..., str], schema: str, admin: Driver
) -> None:
    store = PostgresStore.from_url(make_url(schema=schema))
    await five_events_read_by_billing(store)
    unlogged = PostgresStore.from_url(make_url(schema=schema, cursor_durability="unlogged"))
    async with unlogged.open():
        await unlogged.commit_cursors({"audit": 3})
    # What restoring an old backup of the log, or recreating it, does.
    await admin.execute(f'TRUNCATE "{schema}".events')
    await admin.execute(f'ALTER SEQUENCE "{schema}".events_seq RESTART')
    message = await refusal(store)
    assert "its high-water mark is 0" in message
    assert "'billing' at 5, 'audit' at 3" in message
    assert "remove those cursors" in message
    assert "wrong database or schema" in message
    # Nothing was changed: removing the cursors lets the store open.
    await admin.execute(f'DELETE FROM "{schema}".cursors')
    await admin.execute(f'DELETE FROM "{schema}".cursors_unlogged')
    async with store.open():
        assert await store.load_cursors() == {}


@pytest.mark.parametrize(
    "change",
    [
        # A sequence reset alone: the events above it keep the numbering up.
        'ALTER SEQUENCE "{schema}".events_seq RESTART',
        # Consumed events pruned: the sequence keeps how far the log went.
        'DELETE FROM "{schema}".events',
    ],
    ids=["sequence-reset", "events-deleted"],
)
async def test_a_log_that_did_not_go_back_opens(
    make_url: Callable[..., str], schema: str, admin: Driver, change: str
) -> None:
    store = PostgresStore.from_url(make_url(schema=schema))
    await five_events_read_by_billing(store)
    await admin.execute(change.format(schema=schema))
    async with store.open():
        assert await store.load_cursors() == {"billing": 5}
        assert list((await store.append(make_events(1))).seqs) == [6]
