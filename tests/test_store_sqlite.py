"""What the SQLite store does beyond the store contract: URLs, files, locking, processes."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pathlib
import random
import sqlite3
import stat
import subprocess
import sys
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import trio
import trio.testing

import trioflow
from tests._procs import Child, running
from trioflow._errors import (
    ConfigurationError,
    QueryError,
    SchemaVersionError,
    StoreError,
    StoreUnavailableError,
    UnknownStoreError,
)
from trioflow._events import Event, NewEvent, encode, new_ids
from trioflow.stores import store_from_url
from trioflow.stores.sqlite import _MIGRATIONS, SCHEMA_VERSION, SQLiteStore
from trioflow.testing._store_contract import check_a_first_dead_letter, make_letter


def make_events(count: int) -> list[NewEvent]:
    ids = new_ids(count)
    return [encode("test.event", {"n": n}, None, ids[n]) for n in range(count)]


def recording_app(store: SQLiteStore) -> tuple[trioflow.App, list[int]]:
    """An App on ``store`` whose one consumer, "audit", notes the seq of every event."""
    app = trioflow.App(store)
    handled: list[int] = []

    @app.consumer("audit")
    async def audit(event: trioflow.Event) -> None:
        await trio.lowlevel.checkpoint()
        handled.append(event.seq)

    return app, handled


async def read_everything(store: SQLiteStore) -> list[Event]:
    events: list[Event] = []
    while page := await store.read(events[-1].seq if events else 0, 1000):
        events += page
    return events


def write_raw(path: pathlib.Path, statement: str, *parameters: object) -> None:
    """Run one statement on the file with plain sqlite3, as another program would."""
    raw = sqlite3.connect(path, isolation_level=None)
    try:
        raw.execute(statement, parameters)
    finally:
        raw.close()


# -- URLs and options ----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "path", "synchronous", "poll_interval", "busy_timeout"),
    [
        ("sqlite:///trioflow.db", "trioflow.db", "full", 0.1, 30.0),
        ("sqlite:///data/app.db", "data/app.db", "full", 0.1, 30.0),
        ("sqlite:////var/lib/app.db", "/var/lib/app.db", "full", 0.1, 30.0),
        ("sqlite:///with%20space%23.db", "with space#.db", "full", 0.1, 30.0),
        ("sqlite:///app.db?", "app.db", "full", 0.1, 30.0),
        (
            "sqlite:///app.db?synchronous=normal&poll_interval=0.05",
            "app.db",
            "normal",
            0.05,
            30.0,
        ),
        ("SQLite:///app.db?synchronous=NORMAL&busy_timeout=0", "app.db", "normal", 0.1, 0.0),
        ("sqlite:///app.db?busy_timeout=2.5&poll_interval=1", "app.db", "full", 1.0, 2.5),
    ],
)
@pytest.mark.parametrize("parse", [SQLiteStore.from_url, store_from_url])
def test_url(
    parse: Callable[[str], object],
    url: str,
    path: str,
    synchronous: str,
    poll_interval: float,
    busy_timeout: float,
) -> None:
    store = parse(url)
    assert isinstance(store, SQLiteStore)
    assert store.path == path
    assert store.synchronous == synchronous
    assert store.poll_interval == poll_interval
    assert store.busy_timeout == busy_timeout


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://", "three slashes"),
        ("sqlite:app.db", "three slashes"),
        ("sqlite://host/app.db", "three slashes"),
        ("sqlite:///", "names no file"),
        ("sqlite:///?synchronous=full", "names no file"),
        ("sqlite:///app.db#part", "percent-encode"),
        ("sqlite:///:memory:", "MemoryStore"),
        ("sqlite:///app.db?journal_mode=wal", "unknown option 'journal_mode'.*accepted"),
        ("sqlite:///app.db?synchronous=off", "synchronous must be full or normal"),
        ("sqlite:///app.db?synchronous=full&synchronous=normal", "given twice"),
        ("sqlite:///app.db?poll_interval", "cannot parse the query"),
        ("sqlite:///app.db?poll_interval=", "must be numbers"),
        ("sqlite:///app.db?poll_interval=fast", "must be numbers"),
        ("sqlite:///app.db?poll_interval=0", r"poll_interval must be .* > 0"),
        ("sqlite:///app.db?poll_interval=nan", "poll_interval must be a finite number"),
        ("sqlite:///app.db?poll_interval=inf", "poll_interval must be a finite number"),
        ("sqlite:///app.db?busy_timeout=-1", r"busy_timeout must be .* >= 0"),
        ("sqlite:///%00x.db", "NUL"),
        ("sqlite:///x\x00.db", "NUL"),
        ("sqlite:///data%2F%00/x.db?synchronous=normal", "NUL"),
        ("sqlite:///\ud800.db", "cannot be encoded"),
        ("sqlite://[/x.db", "malformed"),
        ("sqlite://[x]/e.db", "malformed"),
    ],
)
@pytest.mark.parametrize("parse", [SQLiteStore.from_url, store_from_url])
def test_bad_url(parse: Callable[[str], object], url: str, message: str) -> None:
    with pytest.raises(UnknownStoreError, match=message) as caught:
        parse(url)
    text = str(caught.value)
    # The URL is named; where it cannot be parsed, the part a password could
    # sit in is masked, and the rest is named.
    assert repr(url) in text or ("***" in text and url.rsplit("/", 1)[-1] in text), text


def test_from_url_rejects_another_scheme() -> None:
    with pytest.raises(UnknownStoreError, match="not a sqlite: URL"):
        SQLiteStore.from_url("memory://")
    with pytest.raises(UnknownStoreError, match="must be a str"):
        SQLiteStore.from_url(b"sqlite:///app.db")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"path": ""}, "non-empty"),
        ({"path": ":memory:"}, "MemoryStore"),
        ({"path": "a.db", "synchronous": "off"}, "'full' or 'normal'"),
        ({"path": "a.db", "poll_interval": 0}, "poll_interval"),
        ({"path": "a.db", "poll_interval": True}, "poll_interval"),
        ({"path": "a.db", "busy_timeout": -0.5}, "busy_timeout"),
        ({"path": "a.db", "busy_timeout": float("inf")}, "busy_timeout"),
        ({"path": "a\x00.db"}, "NUL"),
        ({"path": pathlib.Path("dir\x00") / "a.db"}, "NUL"),
        ({"path": "\ud800.db"}, "cannot be encoded"),
    ],
)
def test_bad_options(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        SQLiteStore(**kwargs)  # type: ignore[arg-type]


def test_an_app_refuses_a_nul_in_the_path() -> None:
    # sqlite3 would only fail at open, with a bare ValueError.
    with pytest.raises(UnknownStoreError, match="NUL"):
        trioflow.App("sqlite:///%00x.db")


async def test_relative_url_is_relative_to_the_working_directory(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    async with (store := SQLiteStore.from_url("sqlite:///relative.db")).open():
        await store.append(make_events(1))
    assert (tmp_path / "relative.db").is_file()


async def test_absolute_url(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "absolute.db"
    url = "sqlite:///" + path.as_posix()
    assert url.startswith("sqlite:////")
    async with (store := SQLiteStore.from_url(url)).open():
        await store.append(make_events(1))
    assert path.is_file()


# -- opening -----------------------------------------------------------------


async def test_pragmas(tmp_path: pathlib.Path) -> None:
    for synchronous, level in (("full", 2), ("normal", 1)):
        path = tmp_path / f"{synchronous}.db"
        store = SQLiteStore(path, synchronous=synchronous, busy_timeout=1.5)  # type: ignore[arg-type]
        async with store.open():
            for connection in (store._writer, store._reader):
                assert connection is not None
                assert connection.execute("PRAGMA synchronous").fetchall() == [(level,)]
                assert connection.execute("PRAGMA busy_timeout").fetchall() == [(1500,)]
                assert connection.execute("PRAGMA journal_mode").fetchall() == [("wal",)]
        # WAL mode is a property of the file: another connection sees it too.
        with sqlite3.connect(path) as raw:
            assert raw.execute("PRAGMA journal_mode").fetchall() == [("wal",)]
            tables = raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
            assert sorted(tables) == [
                ("trioflow_cursors",),
                ("trioflow_dead_letters",),
                ("trioflow_events",),
                ("trioflow_leases",),
                ("trioflow_schema",),
                ("trioflow_sequence",),
            ]
            assert raw.execute("SELECT version FROM trioflow_schema").fetchall() == [
                (SCHEMA_VERSION,)
            ]
        raw.close()


def set_schema_version(path: pathlib.Path, version: int) -> None:
    write_raw(path, "UPDATE trioflow_schema SET version = ?", version)


async def test_newer_schema_version(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "t.db"
    store = SQLiteStore(path)
    async with store.open():
        await store.append(make_events(2))
    set_schema_version(path, SCHEMA_VERSION + 1)
    with pytest.raises(SchemaVersionError, match=r"newer trioflow.*upgrade trioflow"):
        async with store.open():
            pytest.fail("opened a store with a newer schema")
    # A failed open leaves the instance closed and reusable.
    set_schema_version(path, SCHEMA_VERSION)
    async with store.open():
        assert await store.head() == 2


async def test_unknown_schema_version(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "t.db"
    async with SQLiteStore(path).open():
        pass
    set_schema_version(path, 0)
    with pytest.raises(SchemaVersionError, match="not written by trioflow"):
        async with SQLiteStore(path).open():
            pass


async def test_file_that_is_not_a_database(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "notes.db"
    content = b"these are my notes, not a database\n" * 200
    path.write_bytes(content)
    with pytest.raises(StoreUnavailableError, match="not a SQLite database") as caught:
        async with SQLiteStore(path).open():
            pass
    assert str(path) in str(caught.value)
    assert path.read_bytes() == content


async def test_missing_directory(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "missing" / "t.db"
    with pytest.raises(StoreUnavailableError, match="does not exist") as caught:
        async with SQLiteStore(path).open():
            pass
    assert str(path.parent) in str(caught.value)
    assert not path.parent.exists()


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, under which SQLite would create files 0644."""
    before = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(before)


def modes(path: pathlib.Path) -> dict[str, int]:
    """The permission bits of the database file and of its -wal and -shm files."""
    return {
        suffix: stat.S_IMODE(os.stat(f"{path}{suffix}").st_mode) for suffix in ("", "-wal", "-shm")
    }


@pytest.mark.usefixtures("umask_022")
async def test_a_new_file_is_readable_by_its_owner_only(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "t.db"
    store = SQLiteStore(path)
    async with store.open():
        await store.append(make_events(1))
        # SQLite gives the -wal and -shm files the database file's mode.
        assert modes(path) == {"": 0o600, "-wal": 0o600, "-shm": 0o600}


@pytest.mark.usefixtures("umask_022")
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o660])
async def test_an_existing_file_keeps_its_mode(tmp_path: pathlib.Path, mode: int) -> None:
    path = tmp_path / "t.db"
    path.touch()
    path.chmod(mode)
    store = SQLiteStore(path)
    async with store.open():
        await store.append(make_events(1))
        assert modes(path) == {"": mode, "-wal": mode, "-shm": mode}
    async with store.open():
        assert await store.head() == 1


async def test_a_relative_path_when_the_working_directory_is_gone(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with pytest.raises(StoreUnavailableError, match="opening the database failed"):
        async with SQLiteStore("relative.db").open():
            pass


async def test_open_twice(tmp_path: pathlib.Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    async with store.open():
        with pytest.raises(ConfigurationError, match="already open"):
            async with store.open():
                pass
        # The failed second open did not close the first.
        await store.append(make_events(1))
    async with store.open():
        assert await store.head() == 1


async def test_use_when_closed(tmp_path: pathlib.Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    with pytest.raises(StoreError, match="not open"):
        await store.head()
    async with store.open():
        pass
    with pytest.raises(StoreError, match="not open"):
        await store.append(make_events(1))
    assert store._writer is None
    assert store._reader is None


async def test_closed_when_the_block_is_cancelled(tmp_path: pathlib.Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    with trio.CancelScope() as scope:
        async with store.open():
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert store._writer is None
    # And it can be opened again.
    async with store.open():
        assert await store.head() == 0


# -- sequence numbers and schema versions ------------------------------------------

#: The schema trioflow 0.1 wrote (version 1), exactly as it created it. A copy on
#: purpose: the store's migrations may change, the files users have do not.
_VERSION_1_SCHEMA = (
    """
    CREATE TABLE trioflow_schema (
        singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
        version INTEGER NOT NULL
    )
    """,
    """
    CREATE TABLE trioflow_events (
        seq INTEGER PRIMARY KEY,
        id BLOB(16) UNIQUE NOT NULL,
        type TEXT NOT NULL,
        key TEXT,
        data TEXT NOT NULL,
        created_at INTEGER NOT NULL
    )
    """,
    """
    CREATE TABLE trioflow_cursors (
        consumer TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    )
    """,
    "INSERT INTO trioflow_schema (singleton, version) VALUES (1, 1)",
)


def make_version_1_file(path: pathlib.Path, events: int, cursors: dict[str, int]) -> None:
    """A file as trioflow 0.1 left it: WAL mode, events 1..``events``, ``cursors``."""
    raw = sqlite3.connect(path, isolation_level=None)
    try:
        raw.execute("PRAGMA journal_mode = WAL")
        raw.execute("BEGIN IMMEDIATE")
        for statement in _VERSION_1_SCHEMA:
            raw.execute(statement)
        raw.executemany(
            "INSERT INTO trioflow_events (seq, id, type, key, data, created_at)"
            " VALUES (?, ?, 'old.event', NULL, ?, 1700000000000000)",
            [(n, new_ids(1)[0].bytes, json.dumps({"n": n})) for n in range(1, events + 1)],
        )
        raw.executemany(
            "INSERT INTO trioflow_cursors (consumer, seq, updated_at) VALUES (?, ?, 0)",
            cursors.items(),
        )
        raw.execute("COMMIT")
    finally:
        raw.close()


def make_version_2_file(path: pathlib.Path, events: int, cursors: dict[str, int]) -> None:
    """A file as trioflow left it at version 2: version 1's, migrated as version 2 did.

    Migration steps never change once released, so step 2 is what every
    version-2 file went through.
    """
    make_version_1_file(path, events, cursors)
    migrate_raw(path, 2)


def make_version_3_file(path: pathlib.Path, events: int, cursors: dict[str, int]) -> None:
    """A file as trioflow left it at version 3 (dead letters, no leases)."""
    make_version_2_file(path, events, cursors)
    migrate_raw(path, 3)


def migrate_raw(path: pathlib.Path, version: int) -> None:
    """Run the released migration step to ``version``, as that version did."""
    raw = sqlite3.connect(path, isolation_level=None)
    try:
        raw.execute("BEGIN IMMEDIATE")
        for statement in _MIGRATIONS[version]:
            raw.execute(statement)
        raw.execute("UPDATE trioflow_schema SET version = ?", (version,))
        raw.execute("COMMIT")
    finally:
        raw.close()


def make_version_4_file(path: pathlib.Path, events: int, cursors: dict[str, int]) -> None:
    """A file as trioflow left it at version 4 (leases, no pruning mark)."""
    make_version_3_file(path, events, cursors)
    migrate_raw(path, 4)


#: The files of every released version before this one, as users have them.
OLD_FILES = {
    1: make_version_1_file,
    2: make_version_2_file,
    3: make_version_3_file,
    4: make_version_4_file,
}


def read_raw(path: pathlib.Path, query: str) -> list[tuple[object, ...]]:
    raw = sqlite3.connect(path)
    try:
        return raw.execute(query).fetchall()
    finally:
        raw.close()


async def test_seqs_are_never_reused_after_the_newest_events_are_deleted(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "t.db"
    store = SQLiteStore(path)
    async with store.open():
        await store.append(make_events(10))
        write_raw(path, "DELETE FROM trioflow_events WHERE seq > 5")
        assert await store.head() == 5
        appended = await store.append(make_events(2))
        assert appended.after == 5
        assert list(appended.seqs) == [11, 12]
        assert await store.head() == 12
        write_raw(path, "DELETE FROM trioflow_events")
        assert list((await store.append(make_events(1))).seqs) == [13]
    # The high-water mark is in the file: it outlives the store's handles.
    write_raw(path, "DELETE FROM trioflow_events")
    async with store.open():
        assert await store.head() == 0
        assert list((await store.append(make_events(1))).seqs) == [14]
        assert [event.seq for event in await read_everything(store)] == [14]


@pytest.mark.parametrize("seed", range(5))
async def test_no_deletion_makes_a_number_be_given_twice(tmp_path: pathlib.Path, seed: int) -> None:
    rng = random.Random(seed)
    path = tmp_path / "t.db"
    store = SQLiteStore(path)
    given: list[int] = []
    async with store.open():
        for _ in range(40):
            appended = await store.append(make_events(rng.randint(1, 5)))
            assert appended.seqs[0] == max(given, default=0) + 1, f"seed {seed}"
            given += appended.seqs
            # Deleted as another program, or a future prune, would: the oldest
            # events, the newest, a range between, everything; several
            # statements in one transaction, or one.
            statements = rng.choice(
                [
                    ["DELETE FROM trioflow_events WHERE seq <= ?"],
                    ["DELETE FROM trioflow_events WHERE seq > ?"],
                    ["DELETE FROM trioflow_events WHERE seq BETWEEN ? - 3 AND ?"],
                    ["DELETE FROM trioflow_events WHERE seq < ?", "DELETE FROM trioflow_events"],
                    [],
                ]
            )
            at = rng.randint(0, given[-1])
            raw = sqlite3.connect(path, isolation_level=None)
            try:
                raw.execute("BEGIN")
                for statement in statements:
                    raw.execute(statement, (at,) * statement.count("?"))
                raw.execute("COMMIT")
            finally:
                raw.close()


async def test_a_consumer_past_deleted_events_handles_the_next_ones(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "t.db"
    app, handled = recording_app(SQLiteStore(path))
    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("t", n) for n in range(10)])
        await flow.wait_idle()
    write_raw(path, "DELETE FROM trioflow_events WHERE seq > 5")
    async with trioflow.open_flow(app) as flow:
        seqs = await flow.publish_many([("t", 10), ("t", 11)])
        await flow.wait_idle()
        audit_stats = flow.statistics().consumers["audit"]
    assert seqs == [11, 12]
    assert handled == list(range(1, 13))
    assert (audit_stats.cursor, audit_stats.lag) == (12, 0)


@pytest.mark.parametrize("version", sorted(OLD_FILES))
async def test_an_old_file_is_migrated_in_place(tmp_path: pathlib.Path, version: int) -> None:
    path = tmp_path / "old.db"
    OLD_FILES[version](path, 7, {"audit": 7, "mailer": 3})
    old_events = read_raw(path, "SELECT * FROM trioflow_events ORDER BY seq")
    store = SQLiteStore(path)
    async with store.open():
        assert await store.head() == 7
        assert await store.load_cursors() == {"audit": 7, "mailer": 3}
        events = await read_everything(store)
        assert [(event.seq, event.data) for event in events] == [(n, {"n": n}) for n in range(1, 8)]
        await check_a_first_dead_letter(store, "mailer", 5)
        assert list((await store.append(make_events(1))).seqs) == [8]
    assert read_raw(path, "SELECT version FROM trioflow_schema") == [(SCHEMA_VERSION,)]
    assert read_raw(path, "SELECT high_water FROM trioflow_sequence") == [(7,)]
    assert read_raw(path, "SELECT * FROM trioflow_events WHERE seq <= 7") == old_events
    assert read_raw(
        path, "SELECT name FROM sqlite_master WHERE tbl_name = 'trioflow_dead_letters' ORDER BY 1"
    ) == [
        ("sqlite_autoindex_trioflow_dead_letters_1",),
        ("trioflow_dead_letters",),
        ("trioflow_dead_letters_due",),
    ]
    # Numbering continues above every number given, before and after.
    write_raw(path, "DELETE FROM trioflow_events WHERE seq > 2")
    async with store.open():
        assert list((await store.append(make_events(1))).seqs) == [9]
        (lease,) = await store.claim_leases("h1", ["mailer"], 60.0)
        assert (lease.holder, lease.token) == ("h1", 1)
        assert await store.commit_cursors({"mailer": 9}, fences={"mailer": 1}) == set()


async def test_a_version_3_file_keeps_its_dead_letters_and_gets_the_leases_table(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "old.db"
    make_version_3_file(path, 5, {"audit": 5, "mailer": 2})
    write_raw(
        path,
        "INSERT INTO trioflow_dead_letters VALUES"
        " ('mailer', 3, ?, 'old.event', 5, 1700000000000000, 1700000000000001, 'exhausted',"
        " 'builtins.OSError', 'down', 'Traceback ...', NULL)",
        new_ids(1)[0].bytes,
    )
    before = {
        table: read_raw(path, f"SELECT * FROM {table} ORDER BY 1, 2")
        for table in ("trioflow_events", "trioflow_cursors", "trioflow_dead_letters")
    }
    store = SQLiteStore(path)
    async with store.open():
        assert [(x.consumer, x.seq, x.message) for x in await store.dead_letters()] == [
            ("mailer", 3, "down")
        ]
        assert await store.leases() == []
    assert read_raw(path, "SELECT version FROM trioflow_schema") == [(SCHEMA_VERSION,)]
    for table, rows in before.items():
        assert read_raw(path, f"SELECT * FROM {table} ORDER BY 1, 2") == rows, table
    assert read_raw(path, "SELECT * FROM trioflow_leases") == []


async def test_a_failed_leases_migration_leaves_the_file_at_version_3(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "old.db"
    make_version_3_file(path, 2, {"audit": 2})
    # Another program's table, where version 4 puts its own.
    write_raw(path, "CREATE TABLE trioflow_leases (note TEXT)")
    with pytest.raises(StoreError, match="already exists"):
        async with SQLiteStore(path).open():
            pass
    assert read_raw(path, "SELECT version FROM trioflow_schema") == [(3,)]
    write_raw(path, "DROP TABLE trioflow_leases")
    async with SQLiteStore(path).open():
        pass
    assert read_raw(path, "SELECT version FROM trioflow_schema") == [(SCHEMA_VERSION,)]


async def test_a_failed_migration_leaves_the_file_at_its_version(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "old.db"
    make_version_2_file(path, 2, {"audit": 2})
    # Another program's table, where version 3 puts its own.
    write_raw(path, "CREATE TABLE trioflow_dead_letters (note TEXT)")
    write_raw(path, "INSERT INTO trioflow_dead_letters VALUES ('mine')")
    with pytest.raises(StoreError, match="already exists") as caught:
        async with SQLiteStore(path).open():
            pass
    assert not isinstance(caught.value, StoreUnavailableError)
    assert read_raw(path, "SELECT version FROM trioflow_schema") == [(2,)]
    assert read_raw(path, "SELECT * FROM trioflow_dead_letters") == [("mine",)]
    assert read_raw(path, "SELECT 1 FROM sqlite_master WHERE name LIKE '%_due'") == []
    write_raw(path, "DROP TABLE trioflow_dead_letters")
    async with SQLiteStore(path).open():
        pass
    assert read_raw(path, "SELECT version FROM trioflow_schema") == [(SCHEMA_VERSION,)]


@pytest.mark.parametrize("version", sorted(OLD_FILES))
async def test_migration_waits_for_the_write_lock(tmp_path: pathlib.Path, version: int) -> None:
    path = tmp_path / "old.db"
    OLD_FILES[version](path, 3, {})
    raw = sqlite3.connect(path, isolation_level=None)
    try:
        raw.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailableError, match="locked"):
            async with SQLiteStore(path, busy_timeout=0.05).open():
                pass
        assert raw.execute("SELECT version FROM trioflow_schema").fetchall() == [(version,)]
        raw.execute("ROLLBACK")
    finally:
        raw.close()
    async with SQLiteStore(path).open():
        pass
    assert read_raw(path, "SELECT high_water FROM trioflow_sequence") == [(3,)]


# Opens the store named on the command line once "go" comes on stdin, and
# prints the number its first append got, having dead-lettered it.
_MIGRATOR = """
import sys
import trio
from trioflow._events import encode, new_ids
from trioflow.stores.sqlite import SQLiteStore
from tests._procs import Child, running
from trioflow.testing._store_contract import check_a_first_dead_letter, make_letter

async def main(path):
    print("ready", flush=True)
    await trio.to_thread.run_sync(sys.stdin.readline)
    async with (store := SQLiteStore(path)).open():
        appended = await store.append([encode("new", None, None, new_ids(1)[0])])
        seq = appended.seqs[0]
        await store.record_dead_letter(make_letter("mailer", seq), cursor=seq)
    print(seq, flush=True)

trio.run(main, sys.argv[1])
"""


@pytest.mark.slow
@pytest.mark.parametrize("version", sorted(OLD_FILES))
def test_processes_opening_an_old_file_at_once_migrate_it_once(
    tmp_path: pathlib.Path, version: int
) -> None:
    path = tmp_path / "old.db"
    OLD_FILES[version](path, 5, {"audit": 5})
    outputs = run_together([[str(path)]] * 4, _MIGRATOR)
    assert sorted(int(stdout.split()[-1]) for stdout in outputs) == [6, 7, 8, 9]
    assert read_raw(path, "SELECT version FROM trioflow_schema") == [(SCHEMA_VERSION,)]
    assert read_raw(path, "SELECT high_water FROM trioflow_sequence") == [(5,)]
    assert read_raw(path, "SELECT consumer, seq FROM trioflow_cursors ORDER BY 1") == [
        ("audit", 5),
        ("mailer", 9),
    ]
    assert read_raw(path, "SELECT seq FROM trioflow_dead_letters ORDER BY 1") == [
        (6,),
        (7,),
        (8,),
        (9,),
    ]


async def test_cursors_past_the_high_water_mark_are_refused_at_open(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "t.db"
    store = SQLiteStore(path)
    async with store.open():
        await store.append(make_events(5))
        await store.commit_cursors({"audit": 9, "mailer": 3, "billing": 7})
    with pytest.raises(StoreError) as caught:
        async with store.open():
            pytest.fail("opened a file whose cursors are past its high-water mark")
    message = str(caught.value)
    assert not isinstance(caught.value, StoreUnavailableError)
    for part in (str(path), "'audit' (at 9), 'billing' (at 7) are past 5,", "reset or replaced"):
        assert part in message
    assert "mailer" not in message
    # What the message says to do, if this is the right file.
    fix = "UPDATE trioflow_sequence SET high_water = 9"
    assert f"`{fix}`" in message
    write_raw(path, fix)
    async with store.open():
        assert list((await store.append(make_events(1))).seqs) == [10]


async def test_a_version_1_file_with_cursors_past_its_events_is_refused(
    tmp_path: pathlib.Path,
) -> None:
    # Under version 1, deleting the newest events made numbering restart
    # below the cursors: the consumers would have skipped the next events.
    path = tmp_path / "old.db"
    make_version_1_file(path, 5, {"audit": 8, "mailer": 5})
    with pytest.raises(StoreError, match=r"'audit' \(at 8\) are past 5,"):
        async with SQLiteStore(path).open():
            pass
    # The migration itself was committed; only the open was refused.
    assert read_raw(path, "SELECT version FROM trioflow_schema") == [(SCHEMA_VERSION,)]


# -- the file deleted or replaced under a running flow -----------------------------


def delete_file(path: pathlib.Path) -> None:
    path.unlink()


def delete_with_its_wal(path: pathlib.Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        pathlib.Path(f"{path}{suffix}").unlink()


def move_another_over(path: pathlib.Path) -> None:
    other = path.with_name("other.db")
    make_version_1_file(other, 3, {})
    other.replace(path)


@pytest.mark.parametrize(
    ("change", "what"),
    [
        (delete_file, "deleted or moved away"),
        (delete_with_its_wal, "deleted or moved away"),
        (move_another_over, "replaced by another file"),
    ],
)
async def test_a_flow_stops_writing_when_its_file_is_deleted_or_replaced(
    tmp_path: pathlib.Path, change: Callable[[pathlib.Path], None], what: str
) -> None:
    path = tmp_path / "events.db"
    app, handled = recording_app(SQLiteStore(path, poll_interval=0.01))
    async with trioflow.open_flow(app) as flow:
        assert await flow.publish("before") == 1
        await flow.wait_idle()
        change(path)
        for publish in (
            lambda: flow.publish("after"),
            lambda: flow.publish_many([("after", 1), ("after", 2)]),
        ):
            with pytest.raises(StoreError, match=what) as caught:
                await publish()
            message = str(caught.value)
            assert str(path) in message
            assert "not in the file" in message
            assert "Stop every process" in message
    assert handled == [1]


async def test_polls_and_cursor_commits_notice_a_deleted_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "events.db"
    store = SQLiteStore(path)
    async with store.open():
        await store.append(make_events(2))
        moved = tmp_path / "moved.db"
        path.rename(moved)
        with pytest.raises(StoreError, match="deleted or moved away"):
            await store.wait_for_append(0)
        with pytest.raises(StoreError, match="deleted or moved away"):
            await store.commit_cursors({"audit": 2})
        with pytest.raises(StoreError, match="deleted or moved away"):
            await store.append(make_events(1))
        for write in (
            store.record_dead_letter(make_letter("audit", 2), cursor=2),
            store.requeue_dead_letters("audit", [2]),
            store.discard_dead_letters("audit", [2]),
            store.forget_consumer("audit"),
            store.claim_leases("h1", ["audit"], 60.0),
            store.release_leases("h1", ["audit"]),
            store.commit_cursors({"audit": 2}, fences={"audit": 1}),
        ):
            with pytest.raises(StoreError, match="deleted or moved away"):
                await write
        # Reads still come from the file that was opened.
        assert len(await store.read(0, 10)) == 2
        # Moved back, it is the store's file again.
        moved.rename(path)
        assert await store.wait_for_append(0) == 2
        assert list((await store.append(make_events(1))).seqs) == [3]
        await store.commit_cursors({"audit": 3})
    async with store.open():
        assert await store.head() == 3
        assert await store.load_cursors() == {"audit": 3}


@pytest.mark.parametrize(
    ("change", "what"),
    [(delete_file, "deleted or moved away"), (move_another_over, "replaced by another file")],
)
async def test_claims_notice_a_deleted_or_replaced_file(
    tmp_path: pathlib.Path, change: Callable[[pathlib.Path], None], what: str
) -> None:
    path = tmp_path / "events.db"
    store = SQLiteStore(path)
    async with store.open():
        (held,) = await store.claim_leases("h1", ["audit"], 60.0)
        change(path)
        with pytest.raises(StoreError, match=what):
            await store.claim_leases("h1", ["audit"], 60.0)
        with pytest.raises(StoreError, match=what):
            await store.claim_leases("h2", ["billing"], 60.0)
        with pytest.raises(StoreError, match=what):
            await store.record_dead_letter(make_letter("audit", 1), cursor=1, fence=held.token)


# -- errors and locking --------------------------------------------------------


async def test_locked_database(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "t.db"
    store = SQLiteStore(path, busy_timeout=0.05)
    async with store.open():
        raw = sqlite3.connect(path, isolation_level=None)
        try:
            raw.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreUnavailableError, match=r"locked.*busy_timeout") as caught:
                await store.append(make_events(3))
            assert str(path) in str(caught.value)
            with pytest.raises(StoreUnavailableError, match="locked"):
                await store.commit_cursors({"a": 1})
            # WAL: reads go on while another connection holds the write lock.
            assert await store.head() == 0
            raw.execute("ROLLBACK")
        finally:
            raw.close()
        appended = await store.append(make_events(2))
        assert list(appended.seqs) == [1, 2]
        assert await store.load_cursors() == {}


async def test_reads_see_only_committed_events(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "t.db"
    store = SQLiteStore(path)
    async with store.open():
        raw = sqlite3.connect(path, isolation_level=None)
        try:
            raw.execute("BEGIN IMMEDIATE")
            raw.execute(
                "INSERT INTO trioflow_events (seq, id, type, key, data, created_at)"
                " VALUES (1, ?, 't', NULL, '{}', 0)",
                (new_ids(1)[0].bytes,),
            )
            assert await store.head() == 0
            assert list(await store.read(0, 10)) == []
            raw.execute("COMMIT")
        finally:
            raw.close()
        assert await store.head() == 1
        [event] = await store.read(0, 10)
        assert event.data == {}
        assert event.created_at.timestamp() == 0


class PollLog(SQLiteStore):
    """Notes when the head is read, and reports ``fake_head`` instead of reading it.

    (The real read runs in a thread, during which a MockClock would jump.)
    """

    polls: list[float]
    fake_head: int

    async def head(self) -> int:
        self.polls.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        return self.fake_head


async def test_polls_for_other_processes_start_fast_and_back_off(
    tmp_path: pathlib.Path, autojump_clock: trio.testing.MockClock
) -> None:
    store = PollLog(tmp_path / "t.db", poll_interval=0.1)
    store.polls, store.fake_head = [], 0
    async with store.open():
        with trio.move_on_after(1):
            await store.wait_for_append(0)
        gaps = [round(later - earlier, 6) for earlier, later in itertools.pairwise(store.polls)]
        # 5 ms after the call, doubling up to poll_interval.
        assert gaps[:6] == [0.005, 0.01, 0.02, 0.04, 0.08, 0.1]
        assert set(gaps[5:]) == {0.1}

        # Another process's commit is seen at the next poll; the next wait
        # starts fast again.
        store.polls, store.fake_head = [], 1
        await store.wait_for_append(0)
        assert len(store.polls) == 1
        store.polls = []
        with trio.move_on_after(0.02):
            await store.wait_for_append(1)
        assert [round(at - store.polls[0], 6) for at in store.polls] == [0, 0.005, 0.015]


class HeadReads(SQLiteStore):
    """Counts its head reads."""

    reads = 0

    async def head(self) -> int:
        self.reads += 1
        return await super().head()


async def test_the_flows_own_appends_cost_no_head_read(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No poll falls within the test: every read counted is one an append caused.
    monkeypatch.setattr("trioflow.stores.sqlite._store._FIRST_POLL", 3600.0)
    store = HeadReads(tmp_path / "t.db", poll_interval=3600.0)
    app = trioflow.App(store)
    seen: list[int] = []

    @app.consumer("c")
    async def note(event: trioflow.Event) -> None:
        seen.append(event.seq)

    async with trioflow.open_flow(app) as flow:
        await flow.wait_idle()
        before = store.reads
        for number in range(20):
            await flow.publish("t", number)
            await trio.sleep(0.001)
        await flow.publish_many([("t", number) for number in range(5)])
        await trio.sleep(0.01)
        assert store.reads - before == 0
        await flow.wait_idle()
    assert seen == list(range(1, 26))


async def test_duplicate_event_id_rolls_back_the_batch(tmp_path: pathlib.Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    async with store.open():
        first = make_events(2)
        await store.append(first)
        with pytest.raises(StoreError, match="UNIQUE") as caught:
            await store.append([*make_events(3), first[1]])
        assert not isinstance(caught.value, StoreUnavailableError)
        assert isinstance(caught.value.__cause__, sqlite3.IntegrityError)
        assert await store.head() == 2
        assert [event.id for event in await read_everything(store)] == [e.id for e in first]


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("data", "not json"),
        # Deeper than any JSON decoder's recursion allows: RecursionError.
        ("data", "[" * 5000 + "]" * 5000),
        ("data", '{"a": [1, 2}'),
        ("data", b"\x80 not text"),
        ("id", b"too short"),
        ("created_at", "yesterday"),
        ("created_at", 2**62),
    ],
)
async def test_an_undecodable_event_is_a_store_error_naming_its_seq(
    tmp_path: pathlib.Path, column: str, value: object
) -> None:
    path = tmp_path / "t.db"
    store = SQLiteStore(path)
    async with store.open():
        await store.append(make_events(3))
        write_raw(path, f"UPDATE trioflow_events SET {column} = ? WHERE seq = 2", value)
        for after, limit in ((0, 10), (1, 1), (1, 5)):
            with pytest.raises(StoreError, match="event 2 cannot be decoded") as caught:
                await store.read(after, limit)
            assert str(path) in str(caught.value)
            assert not isinstance(caught.value, StoreUnavailableError)
        # The events around it still read.
        assert [event.seq for event in await store.read(0, 1)] == [1]
        assert [event.seq for event in await store.read(2, 10)] == [3]


@pytest.mark.parametrize(
    "damage",
    [("event_id", b"short"), ("event_id", "text"), ("first_failed_at", "soon"), ("due_at", 2**62)],
)
async def test_an_undecodable_dead_letter_is_a_store_error_naming_it(
    tmp_path: pathlib.Path, damage: tuple[str, object]
) -> None:
    column, value = damage
    store = SQLiteStore(tmp_path / "letters.db")
    async with store.open():
        for seq in (1, 2):
            await store.record_dead_letter(make_letter("audit", seq), cursor=seq)
        change = f"UPDATE trioflow_dead_letters SET {column} = ? WHERE seq = 2"
        write_raw(pathlib.Path(store.path), change, value)
        for lookup in (store.dead_letters(), store.dead_letters("audit")):
            with pytest.raises(StoreError, match="letter of consumer 'audit' at seq 2 cannot"):
                await lookup
        assert [letter.seq for letter in await store.dead_letters("nobody")] == []
        # Discarding it is the way out.
        assert await store.discard_dead_letters("audit", [2]) == [2]
        assert [letter.seq for letter in await store.dead_letters()] == [1]


async def test_event_size_is_the_stored_text_in_utf8_bytes(tmp_path: pathlib.Path) -> None:
    # Written by another program: not the compact form trioflow writes.
    text = ' { "é" : [1, 2] } '
    path = tmp_path / "t.db"
    store = SQLiteStore(path)
    async with store.open():
        write_raw(
            path,
            "INSERT INTO trioflow_events (seq, id, type, key, data, created_at)"
            " VALUES (1, ?, 't', NULL, ?, 0)",
            new_ids(1)[0].bytes,
            text,
        )
        [event] = await store.read(0, 10)
        assert event.data == {"é": [1, 2]}
        assert event.size == len(text.encode()) == 19


async def test_a_page_bounded_by_bytes_stops_reading_rows(tmp_path: pathlib.Path) -> None:
    megabyte = 1_000_000
    ids = new_ids(20)
    store = SQLiteStore(tmp_path / "t.db")
    async with store.open():
        await store.append([encode("big", "x" * megabyte, None, ids[n]) for n in range(20)])
        tracemalloc.start()
        try:
            page = await store.read(0, 20, max_bytes=2 * megabyte + 100)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert [event.seq for event in page] == [1, 2]
    # Two events kept (text and decoded value each), at most the next row's
    # text looked at and dropped: nowhere near the 20 MB of the whole page.
    assert peak < 6 * megabyte, f"peak {peak:,} bytes"


async def test_large_arguments_are_clamped(tmp_path: pathlib.Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    async with store.open():
        await store.append(make_events(3))
        assert len(await store.read(-(2**70), 2**70)) == 3
        assert list(await store.read(2**70, 10)) == []
        assert list(await store.read(0, -1)) == []
        await store.record_dead_letter(make_letter("audit", 2), cursor=None)
        # No letter can have a seq SQLite cannot hold: such seqs are none of them.
        for change in (store.requeue_dead_letters, store.discard_dead_letters):
            assert await change("audit", [2**63, 2, -(2**70)]) == [2]
        with pytest.raises(StoreError, match="SQLite keeps integers") as caught:
            await store.record_dead_letter(make_letter("audit", 2**64), cursor=2**64)
        assert "consumer 'audit' at seq 18446744073709551616" in str(caught.value)
        assert await store.dead_letters() == []


def test_repr(tmp_path: pathlib.Path) -> None:
    store = SQLiteStore("app.db", synchronous="normal")
    assert repr(store) == "SQLiteStore('app.db', synchronous='normal')"


# -- transactions -----------------------------------------------------------------


async def create_rows_table(store: SQLiteStore) -> None:
    async with store.transaction() as tx:
        await tx.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY)")


async def count_rows(store: SQLiteStore) -> int:
    async with store.transaction() as tx:
        count: int = await tx.fetchval("SELECT count(*) FROM rows")
        return count


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        ("COMMIT", "BEGIN, COMMIT, END and ROLLBACK are trioflow's"),
        ("  /* done */ end transaction", "BEGIN, COMMIT, END and ROLLBACK are trioflow's"),
        ("ROLLBACK", "BEGIN, COMMIT, END and ROLLBACK are trioflow's"),
        ("BEGIN IMMEDIATE", "BEGIN, COMMIT, END and ROLLBACK are trioflow's"),
        ("SAVEPOINT s", "SAVEPOINT, RELEASE and ROLLBACK TO are refused"),
        ("RELEASE s", "SAVEPOINT, RELEASE and ROLLBACK TO are refused"),
        ("ATTACH ':memory:' AS other", "ATTACH and DETACH are refused"),
        ("DETACH main", "ATTACH and DETACH are refused"),
        ("PRAGMA journal_mode = DELETE", "PRAGMA journal_mode is refused"),
        ("PRAGMA query_only = ON", "PRAGMA query_only is refused"),
        ("pragma Busy_Timeout = 1", "PRAGMA busy_timeout is refused"),
        ("PRAGMA wal_checkpoint", "PRAGMA wal_checkpoint is refused"),
        ("VACUUM", "cannot VACUUM from within a transaction"),
        ("SELECT 1; COMMIT", "one statement at a time"),
    ],
)
async def test_a_transaction_refuses_statements_that_would_end_or_escape_it(
    tmp_path: pathlib.Path, statement: str, message: str
) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    async with store.open():
        await create_rows_table(store)
        with pytest.raises(QueryError, match=message) as caught:
            async with store.transaction() as tx:
                await tx.execute("INSERT INTO rows (id) VALUES (1)")
                await tx.append(make_events(1))
                await tx.execute(statement)
        assert caught.value.query == statement
        assert await count_rows(store) == 0
        assert await store.head() == 0
        # The store's own writes still commit, and no pragma stuck.
        assert list((await store.append(make_events(1))).seqs) == [1]
        assert read_raw(tmp_path / "t.db", "PRAGMA journal_mode") == [("wal",)]


async def test_a_transaction_runs_pragmas_that_read_and_defer_foreign_keys(
    tmp_path: pathlib.Path,
) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    async with store.open():
        await create_rows_table(store)
        async with store.transaction() as tx:
            assert [row["name"] for row in await tx.fetch("PRAGMA table_info(rows)")] == ["id"]
            assert await tx.fetchval("SELECT count(*) FROM pragma_table_info('rows')") == 1
            assert await tx.fetchval("PRAGMA user_version") is not None
            await tx.execute("PRAGMA defer_foreign_keys = ON")


async def test_a_query_error_shortens_a_long_statement(tmp_path: pathlib.Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    statement = "SELECT " + " + ".join(["no_such_column"] * 200)
    async with store.open():
        with pytest.raises(QueryError, match="no such column") as caught:
            async with store.transaction() as tx:
                await tx.fetch(statement)
        assert caught.value.query == statement
        assert f"({len(statement)} characters)" in str(caught.value)
        assert len(str(caught.value)) < 600


async def test_after_a_failed_statement_the_transaction_only_rolls_back(
    tmp_path: pathlib.Path,
) -> None:
    """A caught QueryError does not let the block commit what came before it."""
    store = SQLiteStore(tmp_path / "t.db")
    async with store.open():
        await create_rows_table(store)
        with pytest.raises(QueryError, match="rolled back, not committed") as caught:
            async with store.transaction() as tx:
                await tx.execute("INSERT INTO rows (id) VALUES (1)")
                with pytest.raises(QueryError, match="UNIQUE constraint failed"):
                    await tx.execute("INSERT INTO rows (id) VALUES (1)")
                with pytest.raises(QueryError, match="can only roll back"):
                    await tx.execute("INSERT INTO rows (id) VALUES (2)")
                with pytest.raises(QueryError, match="can only roll back"):
                    await tx.append(make_events(1))
        assert caught.value.query == "INSERT INTO rows (id) VALUES (1)"
        assert await count_rows(store) == 0
        with pytest.raises(StoreError, match="has ended"):
            await tx.fetch("SELECT 1")
        batch = make_events(1)
        await store.append(batch)
        with pytest.raises(StoreError, match="rolled back, not committed"):
            async with store.transaction() as tx:
                await tx.execute("INSERT INTO rows (id) VALUES (1)")
                with pytest.raises(StoreError, match="UNIQUE constraint failed"):
                    await tx.append(batch)
        assert await count_rows(store) == 0


async def test_a_write_of_the_store_inside_its_transaction_is_refused(
    tmp_path: pathlib.Path,
) -> None:
    """It would wait for the transaction, which waits for it."""
    store = SQLiteStore(tmp_path / "t.db")
    async with store.open():
        async with store.transaction() as tx:
            with pytest.raises(ConfigurationError, match="append inside a transaction"):
                await store.append(make_events(1))
            with pytest.raises(ConfigurationError, match="a transaction inside a transaction"):
                async with store.transaction():
                    pass  # pragma: no cover
            await tx.append(make_events(1))
        assert await store.head() == 1


async def test_a_long_statement_is_interrupted_when_cancelled(tmp_path: pathlib.Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    endless = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT max(i) FROM n"
    async with store.open():
        start = trio.current_time()
        with trio.move_on_after(0.2) as scope:
            async with store.transaction() as tx:
                await tx.append(make_events(1))
                await tx.fetchval(endless)
        assert scope.cancelled_caught
        assert trio.current_time() - start < 2
        assert await store.head() == 0
        assert list((await store.append(make_events(1))).seqs) == [1]


async def test_waiting_for_another_connections_lock_ends_when_cancelled(
    tmp_path: pathlib.Path,
) -> None:
    """The wait for the write lock is cancellable, bounded by busy_timeout, and leaves
    the writer its busy_timeout for the store's own writes."""
    path = tmp_path / "t.db"
    async with SQLiteStore(path, busy_timeout=0.2).open():
        pass
    store = SQLiteStore(path, busy_timeout=30)
    async with store.open():
        raw = sqlite3.connect(path, isolation_level=None)
        try:
            raw.execute("BEGIN IMMEDIATE")
            start = trio.current_time()
            with trio.move_on_after(0.2) as scope:
                async with store.transaction():
                    pass  # pragma: no cover
            assert scope.cancelled_caught
            assert trio.current_time() - start < 1

            async def release_soon() -> None:
                await trio.sleep(0.3)
                raw.execute("ROLLBACK")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(release_soon)
                assert list((await store.append(make_events(1))).seqs) == [1]
        finally:
            raw.close()
    impatient = SQLiteStore(path, busy_timeout=0.1)
    async with impatient.open():
        raw = sqlite3.connect(path, isolation_level=None)
        try:
            raw.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreUnavailableError, match=r"transaction.*busy_timeout=0.1"):
                async with impatient.transaction():
                    pass  # pragma: no cover
            raw.execute("ROLLBACK")
        finally:
            raw.close()
        async with impatient.transaction() as tx:
            await tx.append(make_events(1))
        assert await impatient.head() == 2


async def test_a_commit_wakes_this_stores_waiters(tmp_path: pathlib.Path) -> None:
    """Waiters learn of a transaction's events at its commit, not at their next poll."""
    store = SQLiteStore(tmp_path / "t.db", poll_interval=60)
    woken: list[tuple[int, float]] = []

    async def wait() -> None:
        head = await store.wait_for_append(0)
        woken.append((head, trio.current_time()))

    async with store.open(), trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        async with store.transaction() as tx:
            appended = await tx.append(make_events(2))
            # Long enough that the waiter's polls are over a second apart.
            await trio.sleep(1.5)
            assert woken == []
        committed = trio.current_time()
    ((head, at),) = woken
    assert head == appended.seqs[-1]
    assert at - committed < 0.5


@contextlib.asynccontextmanager
async def store_and_child(
    tmp_path: pathlib.Path, mode: str
) -> AsyncIterator[tuple[SQLiteStore, Child]]:
    """An open store on a new file with the table ``rows``, and a ready
    ``transaction_child.py`` in ``mode`` on the same file."""
    path = tmp_path / "t.db"
    store = SQLiteStore(path)
    async with store.open():
        await create_rows_table(store)
        async with running(
            "transaction_child.py", path, mode, stderr=tmp_path / "stderr", stdin=mode == "append"
        ) as child:
            await child.expect_line("ready", limit=30)
            yield store, child


@pytest.mark.slow
async def test_another_processs_append_waits_for_a_transaction_and_lands_after(
    tmp_path: pathlib.Path,
) -> None:
    async with store_and_child(tmp_path, "append") as (store, child):
        async with store.transaction() as tx:
            inside = await tx.append(make_events(2))
            await tx.execute("INSERT INTO rows (id) VALUES (1)")
            await child.send_line("go")
            # The child waits for the write lock (its busy_timeout is 30 s).
            with trio.move_on_after(1) as waited:
                await child.read_line(limit=2)
            assert waited.cancelled_caught
        assert await child.read_line(limit=30) == str(inside.seqs[-1] + 1)
        await child.finish(limit=30)
        events = await read_everything(store)
    assert [event.type for event in events] == ["test.event", "test.event", "child"]


@pytest.mark.slow
async def test_a_process_killed_in_a_transaction_leaves_nothing_of_it(
    tmp_path: pathlib.Path,
) -> None:
    async with store_and_child(tmp_path, "hold") as (store, child):
        await child.expect_line("inside", limit=30)
        assert await store.head() == 0
        await child.kill(limit=30)
        assert await store.head() == 0
        assert await store.load_cursors() == {}
        assert await count_rows(store) == 0
        # Nothing was held: the lock is free, and the numbers start at 1.
        with trio.fail_after(5):
            assert list((await store.append(make_events(1))).seqs) == [1]


# -- several processes -----------------------------------------------------------

# One writer process: opens the store, says "ready", waits for "go" on stdin
# (so both writers start together), appends its events in batches of random
# size, pausing briefly in between as an application would, then prints the
# sequence numbers it was given as JSON.
_WRITER = """
import json, random, sys
import trio
from trioflow._events import encode, new_ids
from trioflow.stores.sqlite import SCHEMA_VERSION, SQLiteStore

async def main(path, writer, total):
    rng = random.Random(writer)
    store = SQLiteStore(path)
    seqs = []
    async with store.open():
        print("ready", flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)
        written = 0
        while written < total:
            size = min(rng.randint(1, 20), total - written)
            ids = new_ids(size)
            batch = [
                encode("test.write", {"writer": writer, "n": written + i}, str(writer), ids[i])
                for i in range(size)
            ]
            appended = await store.append(batch)
            seqs.extend(appended.seqs)
            written += size
            # Room for the other writer: SQLite's lock is not fair, and a
            # writer that re-locks at once would starve a sleeping waiter.
            await trio.sleep(rng.random() * 0.002)
    print(json.dumps(seqs), flush=True)

trio.run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
"""


def run_together(arguments: list[list[str]], script: str) -> list[str]:
    """Run ``script`` once per argument list, released at once; return their stdouts.

    Each child prints "ready", waits for a line on stdin, does its work and
    exits; a child that fails fails the test with its stderr.
    """
    children = [
        subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in arguments
    ]
    try:
        for child in children:
            assert child.stdout is not None
            line = child.stdout.readline()
            assert line == "ready\n", child.communicate(timeout=60)[1]
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        outputs = [child.communicate(timeout=120) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    for child, (_, stderr) in zip(children, outputs, strict=True):
        assert child.returncode == 0, stderr
    return [stdout for stdout, _ in outputs]


@pytest.mark.slow
def test_two_processes_append_to_one_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "shared.db"
    per_writer = 500
    outputs = run_together(
        [[str(path), str(writer), str(per_writer)] for writer in (0, 1)], _WRITER
    )
    reported = [json.loads(stdout.splitlines()[-1]) for stdout in outputs]

    async def read_back() -> list[Event]:
        store = SQLiteStore(path)
        async with store.open():
            return await read_everything(store)

    events = trio.run(read_back)
    assert [event.seq for event in events] == list(range(1, 2 * per_writer + 1))
    assert len({event.id for event in events}) == 2 * per_writer
    for writer in (0, 1):
        mine = [event for event in events if event.data["writer"] == writer]
        assert [event.data["n"] for event in mine] == list(range(per_writer))
        assert [event.seq for event in mine] == reported[writer]
        assert {event.key for event in mine} == {str(writer)}


async def test_opening_a_new_file_waits_for_a_writer_holding_it(tmp_path: pathlib.Path) -> None:
    """Switching a new file to WAL mode waits for other connections, up to busy_timeout.

    SQLite fails that switch at once, without its busy handler, while another
    connection holds the file's write lock in rollback-journal mode (as
    another process opening the same new file does, creating the schema):
    processes opening one new file together failed with "database is locked".
    """
    path = tmp_path / "new.db"
    other = sqlite3.connect(path, isolation_level=None)
    try:
        # A write transaction on the file, still in rollback-journal mode.
        other.execute("BEGIN IMMEDIATE")

        async def release_soon() -> None:
            await trio.sleep(0.2)
            other.execute("COMMIT")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(release_soon)
            async with SQLiteStore(path, busy_timeout=30).open():
                pass
    finally:
        other.close()
    store = SQLiteStore(path)
    async with store.open():
        assert await store.head() == 0


# -- leases across processes -------------------------------------------------------

# Claims "audit" for an hour as holder "child", then prints its lease as JSON.
_CLAIMER = """
import json, sys
import trio
from trioflow.stores.sqlite import SQLiteStore

async def main(path):
    print("ready", flush=True)
    await trio.to_thread.run_sync(sys.stdin.readline)
    async with (store := SQLiteStore(path)).open():
        (lease,) = await store.claim_leases("child", ["audit"], 3600.0)
    print(json.dumps([lease.holder, lease.token, lease.expires_at.isoformat()]), flush=True)

trio.run(main, sys.argv[1])
"""


@pytest.mark.slow
def test_a_lease_claimed_in_another_process_is_seen_here(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "shared.db"
    (output,) = run_together([[str(path)]], _CLAIMER)
    holder, token, expires_at = json.loads(output.splitlines()[-1])

    async def check() -> None:
        store = SQLiteStore(path)
        async with store.open():
            (seen,) = await store.leases()
            assert (seen.key, seen.holder, seen.token) == ("audit", "child", 1)
            assert seen.expires_at.isoformat() == expires_at
            # Live and another's: a claim here leaves it alone.
            assert await store.claim_leases("parent", ["audit"], 60.0) == [seen]
            assert await store.commit_cursors({"audit": 1}, fences={"audit": 2}) == {"audit"}
            assert await store.commit_cursors({"audit": 1}, fences={"audit": token}) == set()

    assert (holder, token) == ("child", 1)
    trio.run(check)


# Claims keys "a", "b" and "c" with a lease of 2 ms, again and again, as holder
# argv[2]; prints every (key, token) it was given as JSON.
_RACER = """
import json, sys
import trio
from trioflow.stores.sqlite import SQLiteStore

async def main(path, holder, rounds):
    store = SQLiteStore(path)
    won = []
    async with store.open():
        print("ready", flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)
        for _ in range(rounds):
            for lease in await store.claim_leases(holder, ["a", "b", "c"], 0.002):
                if lease.holder == holder:
                    won.append([lease.key, lease.token])
            await trio.sleep(0.001)
    print(json.dumps(won), flush=True)

trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]))
"""


@pytest.mark.slow
def test_processes_racing_for_leases_never_share_a_token(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "shared.db"
    holders = ["p0", "p1", "p2"]
    outputs = run_together([[str(path), holder, "150"] for holder in holders], _RACER)
    holders_of: dict[tuple[str, int], set[str]] = {}
    for holder, stdout in zip(holders, outputs, strict=True):
        for key, token in json.loads(stdout.splitlines()[-1]):
            holders_of.setdefault((key, token), set()).add(holder)
    shared = {won: names for won, names in holders_of.items() if len(names) > 1}
    assert not shared, f"one lease given to several processes: {shared}"
    # The leases did change hands (or lapse and get taken again) meanwhile.
    assert max(token for _, token in holders_of) > 1


def pragma(path: pathlib.Path, name: str) -> int:
    """The value of ``PRAGMA name`` on the file, read with plain sqlite3."""
    ((value,),) = read_raw(path, f"PRAGMA {name}")
    assert isinstance(value, int)
    return value


async def test_pruning_gives_the_space_back_on_a_new_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "new.db"
    store = SQLiteStore(path)
    async with store.open():
        assert pragma(path, "auto_vacuum") == 2  # INCREMENTAL
        for _ in range(10):
            await store.append(make_events(500))
        full = pragma(path, "page_count")
        assert await store.prune(4500, limit=5000) == 4500
        # The freed pages went back to the file system, not to the free list.
        assert pragma(path, "freelist_count") == 0
        assert pragma(path, "page_count") < full / 2


async def test_an_old_file_keeps_its_vacuum_mode_and_reuses_pruned_space(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "old.db"
    make_version_4_file(path, 3000, {"audit": 3000})
    store = SQLiteStore(path)
    async with store.open():
        assert pragma(path, "auto_vacuum") == 0  # NONE: never rewritten
        full = pragma(path, "page_count")
        assert await store.prune(2500, limit=5000) == 2500
        assert pragma(path, "freelist_count") > 0
        await store.append(make_events(2000))
        # New events went into the freed pages: the file did not grow.
        assert pragma(path, "page_count") <= full
