"""Replay pages shared between consumers: one store read for all, never a wrong answer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest
import trio
import trio.testing

import trioflow
from trioflow._events import encode, new_ids
from trioflow._pages import PageReader
from trioflow.stores.memory import MemoryStore
from trioflow.testing._store_contract import make_events

#: A byte budget never reached by these small events.
UNBOUNDED = 2**62


class SlowReads(MemoryStore):
    """Reads that take a while, noted; the first ``failures`` of them fail."""

    def __init__(self, failures: int = 0) -> None:
        super().__init__()
        self.reads: list[tuple[int, int]] = []
        self.budgets: list[int | None] = []
        self.failures = failures

    async def read(
        self, after: int, limit: int, *, max_bytes: int | None = None
    ) -> Sequence[trioflow.Event]:
        self.reads.append((after, limit))
        self.budgets.append(max_bytes)
        await trio.sleep(0.01)
        if self.failures:
            self.failures -= 1
            raise trioflow.StoreError("read failed")
        return await super().read(after, limit, max_bytes=max_bytes)


async def filled(store: SlowReads, count: int) -> SlowReads:
    async with store.open():
        await store.append(make_events(count))
    return store


def seqs(page: Sequence[trioflow.Event]) -> list[int]:
    return [event.seq for event in page]


async def test_readers_of_one_position_share_one_store_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = await filled(SlowReads(), 50)
    pages = PageReader(store, keep=100, keep_bytes=UNBOUNDED)
    got: list[list[int]] = []

    async def read(after: int, limit: int) -> None:
        got.append(seqs(await pages.read(after, limit, max_bytes=UNBOUNDED)))

    async with store.open():
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(read, 0, 20)
        assert store.reads == [(0, 20)]
        assert got == [list(range(1, 21))] * 4

        # Positions inside a recent page are answered from it, up to its end.
        assert seqs(await pages.read(5, 3, max_bytes=UNBOUNDED)) == [6, 7, 8]
        assert seqs(await pages.read(15, 20, max_bytes=UNBOUNDED)) == [16, 17, 18, 19, 20]
        assert store.reads == [(0, 20)]
        # Its last event, or a position before it, goes to the store.
        assert seqs(await pages.read(20, 5, max_bytes=UNBOUNDED)) == [21, 22, 23, 24, 25]
        assert store.reads == [(0, 20), (20, 5)]
        assert pages.shared == 5


async def test_only_keep_events_are_kept(autojump_clock: trio.testing.MockClock) -> None:
    store = await filled(SlowReads(), 50)
    pages = PageReader(store, keep=25, keep_bytes=UNBOUNDED)
    async with store.open():
        for after in (0, 10, 20, 30):
            await pages.read(after, 10, max_bytes=UNBOUNDED)
        # Pages after 0 and 10 were dropped to keep at most 25 events.
        assert seqs(await pages.read(5, 3, max_bytes=UNBOUNDED)) == [6, 7, 8]
        assert seqs(await pages.read(25, 3, max_bytes=UNBOUNDED)) == [26, 27, 28]
        assert store.reads == [(0, 10), (10, 10), (20, 10), (30, 10), (5, 3)]


async def test_splits_by_partition_hold_no_event_of_a_page_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = await filled(SlowReads(), 50)
    pages = PageReader(store, keep=25, keep_bytes=UNBOUNDED)
    async with store.open():
        for after in (0, 10, 20, 30, 40):
            page = await pages.read(after, 10, max_bytes=UNBOUNDED)
            buckets = pages.split(page, 4)
            assert sorted(seqs([e for bucket in buckets for e in bucket])) == seqs(page)
            assert pages.split(page, 4) is buckets
            # The two pages kept (20 events), and nothing else.
            assert pages.held() == min(after + 10, 20)
        # A page read again once dropped is kept in place of the oldest, and its split.
        page = await pages.read(0, 10, max_bytes=UNBOUNDED)
        assert pages.held() == 20
        assert sum(map(len, pages.split(page, 4))) == 10
        assert pages.held() == 20


async def test_kept_pages_are_let_go_once_no_replay_is_under_way(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = await filled(SlowReads(), 50)
    pages = PageReader(store, keep=100, keep_bytes=UNBOUNDED)
    async with store.open():
        with pages.replaying():
            with pages.replaying():
                pages.split(await pages.read(0, 10, max_bytes=UNBOUNDED), 4)
            # Another replay is still under way: the page is kept for it.
            assert pages.held() == 10
            assert seqs(await pages.read(5, 3, max_bytes=UNBOUNDED)) == [6, 7, 8]
            assert len(store.reads) == 1
        assert pages.held() == 0
        with pages.replaying():
            assert seqs(await pages.read(5, 3, max_bytes=UNBOUNDED)) == [6, 7, 8]
        assert len(store.reads) == 2


async def test_a_failed_read_fails_its_reader_and_the_others_read_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = await filled(SlowReads(failures=1), 10)
    pages = PageReader(store, keep=100, keep_bytes=UNBOUNDED)
    outcomes: list[object] = []

    async def read() -> None:
        try:
            outcomes.append(seqs(await pages.read(0, 5, max_bytes=UNBOUNDED)))
        except trioflow.StoreError as exc:
            outcomes.append(str(exc))

    async with store.open(), trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(read)
    assert outcomes == ["read failed", [1, 2, 3, 4, 5]]
    assert store.reads == [(0, 5), (0, 5)]


async def test_an_empty_store_is_read_each_time() -> None:
    store = MemoryStore()
    pages = PageReader(store, keep=100, keep_bytes=UNBOUNDED)
    async with store.open():
        assert list(await pages.read(0, 5, max_bytes=UNBOUNDED)) == []
        assert list(await pages.read(0, 5, max_bytes=UNBOUNDED)) == []
        assert pages.shared == 0


@pytest.mark.parametrize("consumers", [2, 4])
async def test_consumers_replaying_together_read_each_event_once(
    consumers: int, autojump_clock: trio.testing.MockClock
) -> None:
    store = await filled(SlowReads(), 500)
    app = trioflow.App(store, page_size=50)
    seen: dict[str, list[int]] = {}
    for index in range(consumers):
        name = f"c{index}"
        seen[name] = []

        @app.consumer(name)
        async def handle(event: trioflow.Event, log: list[int] = seen[name]) -> None:
            log.append(event.seq)

    async with trioflow.open_flow(app) as flow:
        await flow.wait_idle()
    for log in seen.values():
        assert log == list(range(1, 501))
    replay_reads = [after for after, _ in store.reads if after < 500]
    # Every position read from the store once, whatever the number of consumers.
    assert replay_reads == sorted(set(replay_reads))


class SlowStarts(SlowReads):
    """Each consumer's start (its cursor load) takes longer than the last one's."""

    def __init__(self) -> None:
        super().__init__()
        self.loads = 0

    async def load_cursors(self) -> dict[str, int]:
        self.loads += 1
        await trio.sleep(0.05 * self.loads)
        return await super().load_cursors()


async def test_consumers_starting_one_after_another_still_replay_together(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = SlowStarts()
    async with store.open():
        await store.append(make_events(500))
    app = trioflow.App(store, page_size=50)
    seen: dict[str, list[int]] = {f"c{index}": [] for index in range(4)}
    for name, log in seen.items():

        @app.consumer(name)
        async def handle(event: trioflow.Event, log: list[int] = log) -> None:
            log.append(event.seq)

    async with trioflow.open_flow(app) as flow:
        await flow.wait_idle()
    assert all(log == list(range(1, 501)) for log in seen.values())
    # The first consumer started 0.5 s before the last: time for it to
    # replay every page alone, had it not waited for the others.
    replay_reads = [after for after, _ in store.reads if after < 500]
    assert replay_reads == sorted(set(replay_reads))


async def test_several_waiters_on_a_failed_read_read_once_more_together(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = await filled(SlowReads(failures=1), 10)
    pages = PageReader(store, keep=100, keep_bytes=UNBOUNDED)
    outcomes: list[object] = []

    async def read() -> None:
        try:
            outcomes.append(seqs(await pages.read(0, 5, max_bytes=UNBOUNDED)))
        except trioflow.StoreError as exc:
            outcomes.append(str(exc))

    async with store.open(), trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(3):
            nursery.start_soon(read)
    assert outcomes == ["read failed", *[[1, 2, 3, 4, 5]] * 3]
    # One read failed; the three waiting readers shared the one that followed.
    assert store.reads == [(0, 5), (0, 5)]


async def test_pages_and_what_is_kept_are_bounded_by_bytes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = SlowReads()
    async with store.open():
        # 30 events of 100 bytes each (a 98-character JSON string).
        await store.append([encode("t", "x" * 98, None, event_id) for event_id in new_ids(30)])
    pages = PageReader(store, keep=1000, keep_bytes=1000)
    async with store.open():
        assert seqs(await pages.read(0, 100, max_bytes=450)) == [1, 2, 3, 4]
        assert store.budgets == [450]
        # Served from the kept page, cut to the budget asked for.
        assert seqs(await pages.read(1, 100, max_bytes=250)) == [2, 3]
        assert seqs(await pages.read(0, 100, max_bytes=10)) == [1]
        assert len(store.reads) == 1
        for after in (4, 8, 12):
            await pages.read(after, 100, max_bytes=450)
        # Four pages of 400 bytes were read; at most 1000 bytes are kept, so
        # the two oldest were dropped and a read after 0 goes to the store.
        assert seqs(await pages.read(13, 100, max_bytes=450)) == [14, 15, 16]
        assert seqs(await pages.read(9, 100, max_bytes=450)) == [10, 11, 12]
        assert len(store.reads) == 4
        assert seqs(await pages.read(1, 100, max_bytes=450)) == [2, 3, 4, 5]
        assert store.reads[4:] == [(1, 100)]


async def test_a_replay_of_large_events_reads_pages_within_page_bytes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = SlowReads()
    big = "x" * (1024 * 1024 - 2)
    async with trioflow.open_flow(trioflow.App(store)) as flow:
        await flow.publish_many([("a", big)] * 40)
    app = trioflow.App(store, page_bytes=4 * 1024 * 1024)
    seen: list[int] = []

    @app.consumer("c")
    async def handle(event: trioflow.Event) -> None:
        seen.append(event.seq)

    async with store.open():
        log = [event async for event in _all_events(store)]
    assert all(event.size == 1024 * 1024 for event in log)
    store.reads.clear()
    store.budgets.clear()
    async with trioflow.open_flow(app) as flow:
        await flow.wait_idle()
    assert seen == list(range(1, 41))
    # Every read asked for at most 4 MiB: pages of 4 events, not 1,000.
    assert set(store.budgets) == {4 * 1024 * 1024}
    assert 10 <= len(store.reads) <= 12


async def _all_events(store: MemoryStore) -> AsyncIterator[trioflow.Event]:
    after = 0
    while page := await store.read(after, 1000):
        for event in page:
            yield event
        after = page[-1].seq
