"""The lean trio-asyncio loop the PostgreSQL driver runs on: faster, and still asyncio.

trio-asyncio's own loop runs one asyncio callback per pass of trio's
scheduler; the lean loop runs every queued callback per wake-up. These tests
pin that (so an upgrade of trio-asyncio that changes the private methods the
lean loop overrides fails here, not in production) and that asyncio's
semantics hold: FIFO callbacks, timers, tasks, cancellation, stopping.
"""

from __future__ import annotations

import asyncio

import pytest
import trio
import trio_asyncio  # type: ignore[import-untyped]

from trioflow.stores._aio_loop import LeanLoop, open_lean_loop


async def _ran_after_a_few_passes(loop: asyncio.AbstractEventLoop) -> list[int]:
    ran: list[int] = []
    for index in range(100):
        loop.call_soon(ran.append, index)
    # Enough passes for the loop's task to wake and run, whatever order trio
    # picks among runnable tasks; far fewer than one per callback.
    for _ in range(5):
        await trio.lowlevel.checkpoint()
    return ran


async def test_every_queued_callback_runs_in_one_wake_up() -> None:
    async with open_lean_loop() as loop:
        assert type(loop) is LeanLoop
        assert await _ran_after_a_few_passes(loop) == list(range(100))


async def test_trio_asyncios_own_loop_runs_one_callback_per_pass() -> None:
    # The control: what the lean loop improves on.
    async with trio_asyncio.open_loop() as loop:
        assert len(await _ran_after_a_few_passes(loop)) < 100


async def test_callbacks_and_timers_keep_asyncios_order() -> None:
    async with open_lean_loop() as loop:
        order: list[str] = []
        loop.call_later(0.02, order.append, "late timer")
        loop.call_later(0.01, order.append, "early timer")
        loop.call_soon(order.append, "first")
        loop.call_soon(lambda: loop.call_soon(order.append, "queued by a callback"))
        loop.call_soon(order.append, "second")
        await trio.sleep(0.05)
        assert order == ["first", "second", "queued by a callback", "early timer", "late timer"]


async def test_cancelled_callbacks_do_not_run() -> None:
    async with open_lean_loop() as loop:
        ran: list[str] = []
        loop.call_soon(ran.append, "kept")
        loop.call_soon(ran.append, "dropped").cancel()
        loop.call_later(0.01, ran.append, "dropped timer").cancel()
        await trio.sleep(0.03)
        assert ran == ["kept"]


async def test_asyncio_tasks_run_and_cancel_from_trio() -> None:
    async with open_lean_loop() as loop:

        async def add(a: int, b: int) -> int:
            await asyncio.sleep(0.001)
            return a + b

        assert await loop.run_aio_coroutine(add(2, 3)) == 5

        cancelled = asyncio.Event()

        async def forever() -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        with trio.move_on_after(0.01) as scope:
            await loop.run_aio_coroutine(forever())
        assert scope.cancelled_caught
        assert cancelled.is_set()


async def test_sockets_are_read_through_the_lean_io_task() -> None:
    async with open_lean_loop() as loop:

        async def echo_once() -> bytes:
            async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                writer.write(await reader.readexactly(5))
                await writer.drain()
                writer.close()

            server = await asyncio.start_server(serve, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hello")
            data = await reader.readexactly(5)
            writer.close()
            server.close()
            await server.wait_closed()
            return data

        assert await loop.run_aio_coroutine(echo_once()) == b"hello"


async def test_an_exception_in_the_block_closes_the_loop() -> None:
    with pytest.raises(BaseExceptionGroup) as caught:
        async with open_lean_loop() as loop:
            loop.call_soon(lambda: None)
            raise ZeroDivisionError
    assert caught.value.subgroup(ZeroDivisionError) is not None
    assert loop.is_closed()


async def test_callbacks_are_checked_in_debug_mode_as_asyncio_does() -> None:
    async def not_a_callback() -> None:
        raise AssertionError("never called")

    async with open_lean_loop() as loop:
        loop.set_debug(True)
        with pytest.raises(TypeError, match="coroutines cannot be used with call_soon"):
            loop.call_soon(not_a_callback)
        with pytest.raises(TypeError, match="coroutines cannot be used with call_later"):
            loop.call_later(1, not_a_callback)
        loop.set_debug(False)
        # Unchecked, as in asyncio's own loop; cancelled before it could run.
        loop.call_soon(not_a_callback).cancel()
