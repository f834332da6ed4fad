"""Replay pages shared between consumers: one store read for all, never a wrong answer."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import trio
import trio.testing

import trioflow
from trioflow._pages import PageReader
from trioflow.stores.memory import MemoryStore
from trioflow.testing._store_contract import make_events


class SlowReads(MemoryStore):
    """Reads that take a while, noted; the first ``failures`` of them fail."""

    def __init__(self, failures: int = 0) -> None:
        super().__init__()
        self.reads: list[tuple[int, int]] = []
        self.failures = failures

    async def read(
        self, after: int, limit: int, *, max_bytes: int | None = None
    ) -> Sequence[trioflow.Event]:
        self.reads.append((after, limit))
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
    pages = PageReader(store, keep=100)
    got: list[list[int]] = []

    async def read(after: int, limit: int) -> None:
        got.append(seqs(await pages.read(after, limit)))

    async with store.open():
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(read, 0, 20)
        assert store.reads == [(0, 20)]
        assert got == [list(range(1, 21))] * 4

        # Positions inside a recent page are answered from it, up to its end.
        assert seqs(await pages.read(5, 3)) == [6, 7, 8]
        assert seqs(await pages.read(15, 20)) == [16, 17, 18, 19, 20]
        assert store.reads == [(0, 20)]
        # Its last event, or a position before it, goes to the store.
        assert seqs(await pages.read(20, 5)) == [21, 22, 23, 24, 25]
        assert store.reads == [(0, 20), (20, 5)]
        assert pages.shared == 5


async def test_only_keep_events_are_kept(autojump_clock: trio.testing.MockClock) -> None:
    store = await filled(SlowReads(), 50)
    pages = PageReader(store, keep=25)
    async with store.open():
        for after in (0, 10, 20, 30):
            await pages.read(after, 10)
        # Pages after 0 and 10 were dropped to keep at most 25 events.
        assert seqs(await pages.read(5, 3)) == [6, 7, 8]
        assert seqs(await pages.read(25, 3)) == [26, 27, 28]
        assert store.reads == [(0, 10), (10, 10), (20, 10), (30, 10), (5, 3)]


async def test_a_failed_read_fails_its_reader_and_the_others_read_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = await filled(SlowReads(failures=1), 10)
    pages = PageReader(store, keep=100)
    outcomes: list[object] = []

    async def read() -> None:
        try:
            outcomes.append(seqs(await pages.read(0, 5)))
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
    pages = PageReader(store, keep=100)
    async with store.open():
        assert list(await pages.read(0, 5)) == []
        assert list(await pages.read(0, 5)) == []
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


async def test_several_waiters_on_a_failed_read_read_once_more_together(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = await filled(SlowReads(failures=1), 10)
    pages = PageReader(store, keep=100)
    outcomes: list[object] = []

    async def read() -> None:
        try:
            outcomes.append(seqs(await pages.read(0, 5)))
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
