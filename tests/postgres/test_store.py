"""The PostgreSQL store's own behaviour: wake-ups, cursor durability modes, data fidelity."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
import trio
import trio.testing

from trioflow import StoreError, StoreUnavailableError
from trioflow._events import MAX_DEPTH, decode_json, encode
from trioflow.stores.postgres import PostgresStore
from trioflow.stores.postgres._driver import Driver
from trioflow.testing._store_contract import make_events

# Long enough that a test passing within it proves NOTIFY, not polling, woke it.
NO_POLLING = 60


async def wait_woken(store: PostgresStore, after: int) -> int:
    """Wait as a consumer does; return the head that ended the wait."""
    while (head := await store.head()) <= after:
        await store.wait_for_append(after)
    return head


async def test_own_appends_are_known_without_reading_the_head(
    store: PostgresStore, admin: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    heads = 0
    read_head = store.head
    head_read = trio.Event()

    async def counted_head() -> int:
        nonlocal heads
        heads += 1
        head = await read_head()
        head_read.set()
        return head

    monkeypatch.setattr(store, "head", counted_head)
    store.poll_interval = NO_POLLING
    after = (await store.append(make_events(1))).seqs[-1]
    # Let the append's own notification come back and the first read happen.
    with trio.move_on_after(0.3):
        await store.wait_for_append(after)
    heads = 0
    with trio.fail_after(NO_POLLING):
        for _ in range(5):
            appended = await store.append(make_events(2))
            assert await store.wait_for_append(after) == appended.seqs[-1]
            after = appended.seqs[-1]
        # Their notifications come back from our own pool: no wake, no read.
        with trio.move_on_after(0.3) as idle:
            await store.wait_for_append(after)
        assert idle.cancelled_caught
    assert heads == 0

    # Another backend's notification (another process appending) makes the
    # waiter read the head; the head has not moved, so it goes on waiting.
    woke: list[int] = []

    async def wait() -> None:
        woke.append(await store.wait_for_append(after))

    with trio.fail_after(NO_POLLING):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            head_read = trio.Event()
            await admin.execute("SELECT pg_notify($1, '')", f"{store.schema}_appended")
            await head_read.wait()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert (heads, woke) == (1, [])


async def test_another_process_s_notification_names_the_head(
    make_url: Callable[..., str], schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = make_url(schema=schema, poll_interval=NO_POLLING)
    waiter, writer = PostgresStore.from_url(url), PostgresStore.from_url(url)
    async with waiter.open(), writer.open():
        # Learn of the log as it is (a first wait reads the head), then
        # count the head reads.
        with trio.move_on_after(0.3):
            await waiter.wait_for_append(0)
        heads = 0
        read_head = waiter.head

        async def counted_head() -> int:
            nonlocal heads
            heads += 1
            return await read_head()

        monkeypatch.setattr(waiter, "head", counted_head)
        after = 0
        with trio.fail_after(NO_POLLING):
            for size in (1, 3, 2):
                woke: list[int] = []
                async with trio.open_nursery() as nursery:

                    async def wait(after: int = after, woke: list[int] = woke) -> None:
                        woke.append(await waiter.wait_for_append(after))

                    nursery.start_soon(wait)
                    await trio.testing.wait_all_tasks_blocked()
                    appended = await writer.append(make_events(size))
                # The notification's payload is the head: no read needed.
                assert woke == [appended.seqs[-1]]
                after = appended.seqs[-1]
    assert heads == 0


async def test_notify_wakes_a_waiter_in_another_store(
    make_url: Callable[..., str], schema: str
) -> None:
    url = make_url(schema=schema, poll_interval=NO_POLLING)
    waiter, writer = PostgresStore.from_url(url), PostgresStore.from_url(url)
    async with waiter.open(), writer.open():
        woke: list[int] = []

        async def wait() -> None:
            woke.append(await wait_woken(waiter, 0))

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked()
                await trio.sleep(0.1)
                assert woke == []
                appended = await writer.append(make_events(3))
        assert woke == [appended.seqs[-1]]


async def test_one_notification_per_batch(store: PostgresStore, admin: Driver) -> None:
    got: list[str] = []
    three = trio.Event()
    listening = trio.Event()

    def on_notify(pid: int, payload: str) -> None:
        got.append(payload)
        # Sent by the appending store's pool, not by the listener's.
        assert store._driver is not None and store._driver.is_pool_backend(pid)
        assert not admin.is_pool_backend(pid)
        if len(got) == 3:
            three.set()

    async with trio.open_nursery() as nursery:

        async def listen() -> None:
            await admin.listen(
                f"{store.schema}_appended",
                on_notify,
                on_listening=listening.set,
                ping_interval=5,
            )

        nursery.start_soon(listen)
        await listening.wait()
        last = [(await store.append(make_events(size))).seqs[-1] for size in (1, 500, 7)]
        await store.append([])
        with trio.fail_after(5):
            await three.wait()
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    # Each names its batch's last seq.
    assert got == [str(seq) for seq in last]


async def test_listen_reconnects_after_losing_its_connection(
    make_url: Callable[..., str], schema: str, admin: Driver
) -> None:
    tag = f"trioflow-test-{uuid.uuid4().hex[:12]}"
    url = make_url(schema=schema, poll_interval=NO_POLLING, application_name=tag)
    waiter, writer = PostgresStore.from_url(url), PostgresStore.from_url(url)
    listen_query = "application_name = $1 AND query LIKE 'LISTEN%'"
    async with waiter.open(), writer.open():
        killed = await admin.fetch(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE {listen_query}",
            tag,
        )
        assert len(killed) == 2
        with trio.fail_after(10):
            # Polling the server's view: there is nothing to wait on locally.
            while (  # noqa: ASYNC110
                await admin.fetchval(
                    f"SELECT count(*) FROM pg_stat_activity WHERE {listen_query}", tag
                )
                < 2
            ):
                await trio.sleep(0.05)
        head = await waiter.head()
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_woken, waiter, head)
                await trio.testing.wait_all_tasks_blocked()
                await writer.append(make_events(1))


async def test_fallback_polling_sees_appends_made_without_notify(
    make_url: Callable[..., str], schema: str, admin: Driver
) -> None:
    store = PostgresStore.from_url(make_url(schema=schema, poll_interval=0.1))
    async with store.open():
        await store.append(make_events(1))
        # An insert that bypasses the append function sends no notification.
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_woken, store, 1)
                await trio.testing.wait_all_tasks_blocked()
                await admin.execute(
                    f'INSERT INTO "{schema}".events (seq, id, type, data, created_at) '
                    "VALUES (2, gen_random_uuid(), 't', 'null', now())"
                )


@pytest.mark.parametrize("durability", ["sync", "async", "unlogged"])
async def test_cursor_modes_commit_and_load(
    make_url: Callable[..., str], schema: str, durability: str
) -> None:
    # Every commit writes the unlogged mode's logged checkpoint too.
    url = make_url(schema=schema, cursor_durability=durability, cursor_checkpoint_interval=1e-9)
    store = PostgresStore.from_url(url)
    async with store.open():
        await store.append(make_events(3))
        await store.commit_cursors({"a": 1, "b": 2})
        await store.commit_cursors({"a": 3})
        # Below the stored cursor: ignored, alone or in a batch.
        await store.commit_cursors({"b": 1})
        await store.commit_cursors({"a": 2, "b": 3})
        assert await store.load_cursors() == {"a": 3, "b": 3}
    async with store.open():
        assert await store.load_cursors() == {"a": 3, "b": 3}


async def test_unlogged_cursors_fall_back_to_their_checkpoint(
    make_url: Callable[..., str], schema: str, admin: Driver
) -> None:
    store = PostgresStore.from_url(
        make_url(schema=schema, cursor_durability="unlogged", cursor_checkpoint_interval=0.3)
    )
    async with store.open():
        await store.commit_cursors({"a": 5, "b": 1})  # first commit: checkpoint written
        await store.commit_cursors({"a": 9})  # within the interval: unlogged only
        assert await store.load_cursors() == {"a": 9, "b": 1}
        # What a server crash does to an unlogged table.
        await admin.execute(f'TRUNCATE "{schema}".cursors_unlogged')
        assert await store.load_cursors() == {"a": 5, "b": 1}
        await store.commit_cursors({"a": 10})
        await trio.sleep(0.35)
        await store.commit_cursors({"a": 12})  # interval passed: checkpoint again
        await store.commit_cursors({"a": 13})
        await admin.execute(f'TRUNCATE "{schema}".cursors_unlogged')
        assert await store.load_cursors() == {"a": 12, "b": 1}


async def test_an_unlogged_checkpoint_never_moves_backwards(
    make_url: Callable[..., str], schema: str, admin: Driver
) -> None:
    store = PostgresStore.from_url(
        make_url(schema=schema, cursor_durability="unlogged", cursor_checkpoint_interval=1e-9)
    )
    async with store.open():
        await store.append(make_events(9))
        await store.commit_cursors({"a": 9})
        await store.commit_cursors({"a": 5})  # a checkpoint is due: it must keep 9
        # What a server crash does to an unlogged table.
        await admin.execute(f'TRUNCATE "{schema}".cursors_unlogged')
        assert await store.load_cursors() == {"a": 9}


async def test_switching_cursor_modes_never_moves_a_cursor_back(
    make_url: Callable[..., str], schema: str
) -> None:
    durable = PostgresStore.from_url(make_url(schema=schema, cursor_durability="sync"))
    unlogged = PostgresStore.from_url(make_url(schema=schema, cursor_durability="unlogged"))
    async with durable.open():
        await durable.append(make_events(10))
        await durable.commit_cursors({"a": 10, "b": 2})
    async with unlogged.open():
        # A newer but lower unlogged copy does not hide the logged one, and
        # its first commit (a logged checkpoint) keeps the higher value.
        await unlogged.commit_cursors({"a": 4, "b": 7})
        assert await unlogged.load_cursors() == {"a": 10, "b": 7}
    async with durable.open():
        assert await durable.load_cursors() == {"a": 10, "b": 7}
        await durable.commit_cursors({"a": 2})
        assert await durable.load_cursors() == {"a": 10, "b": 7}


async def test_data_comes_back_exactly(store: PostgresStore) -> None:
    items = [
        {"b": 1, "a": 2, "c": {"z": 0, "y": 1}},
        1e23,
        -1.2345678901234567e300,
        5e-324,
        -0.0,
        2**64 + 1,
        [1.0, 1, "1"],
    ]
    batch = [encode("t", data, None, uuid.uuid4()) for data in items]
    await store.append(batch)
    events = await store.read(0, 100)
    for event, data in zip(events, items, strict=True):
        assert event.data == data
        assert repr(event.data) == repr(data)  # types and key order too


async def test_created_at_grows_with_seq(make_url: Callable[..., str], schema: str) -> None:
    url = make_url(schema=schema)
    stores = [PostgresStore.from_url(url) for _ in range(3)]
    async with stores[0].open(), stores[1].open(), stores[2].open():
        async with trio.open_nursery() as nursery:
            for store in stores:

                async def write(store: PostgresStore = store) -> None:
                    for _ in range(10):
                        await store.append(make_events(5))

                nursery.start_soon(write)
        events = await stores[0].read(0, 1000)
    assert len(events) == 150
    stamps = [event.created_at for event in events]
    assert stamps == sorted(stamps)


async def test_wait_for_append_rides_out_an_unavailable_server(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unavailable() -> int:
        raise StoreUnavailableError("server restarting")

    monkeypatch.setattr(store, "head", unavailable)
    store.poll_interval = 0.05
    with trio.fail_after(5):
        await store.wait_for_append(0)  # returns after a poll interval, no error


async def insert_raw(admin: Driver, schema: str, seq: int, data: str) -> None:
    """Store an event the way a tool other than trioflow might: any JSON PostgreSQL takes."""
    await admin.execute(
        f'INSERT INTO "{schema}".events (seq, id, type, data, created_at) '
        "VALUES ($1, gen_random_uuid(), 't', $2::json, now())",
        seq,
        data,
    )


async def test_an_event_python_cannot_decode_is_a_store_error_naming_it(
    store: PostgresStore, admin: Driver
) -> None:
    schema = store.schema
    await store.append(make_events(1))  # seq 1
    # PostgreSQL takes both; Python's json cannot: too deep for its recursion
    # limit, and more digits than int() converts.
    await insert_raw(admin, schema, 2, "[" * 5000 + "]" * 5000)
    await store.append(make_events(1))  # seq 3
    await insert_raw(admin, schema, 4, "9" * 5000)
    await store.append(make_events(1))  # seq 5
    for after, bad, cause in [(0, 2, RecursionError), (2, 4, ValueError)]:
        for max_bytes in (None, 10**6):
            with pytest.raises(StoreError) as info:
                await store.read(after, 10, max_bytes=max_bytes)
            assert type(info.value) is StoreError
            assert isinstance(info.value.__cause__, cause)
            message = str(info.value)
            assert f"event seq {bad} " in message
            assert f'DELETE FROM "{schema}".events WHERE seq = {bad}' in message
    # The events around them read as ever.
    assert [event.seq for event in await store.read(0, 1)] == [1]
    assert [event.seq for event in await store.read(2, 1)] == [3]
    assert [event.seq for event in await store.read(4, 10)] == [5]


def nested_text(depth: int) -> str:
    return "[" * depth + "]" * depth


def deepest(decodes: Callable[[str], object]) -> int:
    """The deepest nesting that ``decodes`` takes, found by bisection."""
    low, high = 1, 100_000
    while low < high:
        middle = (low + high + 1) // 2
        try:
            decodes(nested_text(middle))
        except (RecursionError, StoreError):
            high = middle - 1
        else:
            low = middle
    return low


def test_a_page_decodes_whatever_its_events_decode_alone() -> None:
    # Decoding a page as one array adds a level of nesting to every event:
    # an event that decodes alone must still decode in a page. Both are
    # measured against the same recursion limit, with the decoder called
    # from the same depth of the stack (each frame counts as a level). The
    # decoder is the store's: the fast one, falling back to json's.
    store = PostgresStore("postgresql://localhost/app")

    def alone(text: str) -> object:
        return decode(text)

    def decode(text: str) -> object:
        return decode_json(text)

    def in_a_page(text: str) -> object:
        row = (1, uuid.uuid4(), "t", None, text, None, len(text))
        return store._decode_page([row, (2, *row[1:4], "0", *row[5:])])  # type: ignore[list-item]

    depth = deepest(alone)
    assert depth >= MAX_DEPTH
    assert deepest(in_a_page) == depth


async def test_max_bytes_at_its_extremes(store: PostgresStore) -> None:
    appended = await store.append(make_events(3))
    seqs = list(appended.seqs)
    assert [event.seq for event in await store.read(0, 10, max_bytes=2**70)] == seqs
    assert [event.seq for event in await store.read(0, 10, max_bytes=-1)] == seqs[:1]
    assert [event.seq for event in await store.read(0, 0, max_bytes=10)] == []
