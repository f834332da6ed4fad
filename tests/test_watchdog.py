"""The blocking watchdog: a step that holds the event loop is reported, once, by name.

Handlers here block with real ``time.sleep`` calls of a few tens of
milliseconds against a smaller threshold; every assertion is on the log.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest
import trio

import trioflow
from trioflow import _watchdog
from trioflow._watchdog import BlockingWatchdog, consumer_task_name
from trioflow.stores.memory import MemoryStore

THRESHOLD = 0.025
#: How long the handlers here block (or wait without blocking): twice the threshold.
BLOCK = 2 * THRESHOLD


def make_app(store: MemoryStore | None = None, **options: object) -> trioflow.App:
    options.setdefault("blocking_warning", THRESHOLD)
    return trioflow.App(MemoryStore() if store is None else store, **options)  # type: ignore[arg-type]


def blocking(caplog: pytest.LogCaptureFixture, culprit: str) -> list[str]:
    """The watchdog's warnings about ``culprit`` (such as ``"consumer 'mailer'"``)."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "trioflow"
        and record.levelno == logging.WARNING
        and record.getMessage().startswith(f"{culprit} blocked the event loop")
    ]


def blocker(app: trioflow.App, name: str = "mailer") -> None:
    @app.consumer(name)
    async def handle(event: trioflow.Event) -> None:
        time.sleep(BLOCK)  # noqa: ASYNC251 - the blocking call under test
        # A step per event: handlers that never yield handle a whole batch in one.
        await trio.lowlevel.checkpoint()


async def run(app: trioflow.App, events: int = 1) -> None:
    """Run a flow of ``app`` until it has handled ``events`` new events."""
    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("order.created", {"id": i}) for i in range(events)])
        await flow.wait_idle()


async def test_a_blocking_handler_gets_one_warning_naming_its_consumer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_app()
    blocker(app)
    await run(app)
    (warning,) = blocking(caplog, "consumer 'mailer'")
    assert "in one step: its handler made a blocking call" in warning
    assert "`await trio.to_thread.run_sync(...)`" in warning


async def wait_in_trio(seconds: float) -> None:
    await trio.sleep(seconds)


async def wait_in_a_thread(seconds: float) -> None:
    await trio.to_thread.run_sync(time.sleep, seconds)


@pytest.mark.parametrize("wait", [wait_in_trio, wait_in_a_thread])
async def test_a_handler_that_awaits_as_long_gets_no_warning(
    caplog: pytest.LogCaptureFixture, wait: Callable[[float], Awaitable[None]]
) -> None:
    app = make_app()
    blocker(app)

    @app.consumer("patient")
    async def patient(event: trioflow.Event) -> None:
        await wait(BLOCK)

    await run(app)
    assert blocking(caplog, "consumer 'patient'") == []
    # The watchdog was watching: the consumer that blocked, beside it, was named.
    assert len(blocking(caplog, "consumer 'mailer'")) == 1


async def test_a_task_started_by_a_handler_is_blamed_on_its_consumer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_app()

    async def resize() -> None:
        time.sleep(BLOCK)  # noqa: ASYNC251 - the blocking call under test

    @app.consumer("thumbnails")
    async def thumbnails(event: trioflow.Event) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(resize, name="resize")

    await run(app)
    assert len(blocking(caplog, "consumer 'thumbnails'")) == 1
    assert blocking(caplog, "task 'resize'") == []


async def block_a_step(name: str) -> None:
    """Run one step that blocks, in a task named ``name``."""

    async def block() -> None:
        time.sleep(BLOCK)  # noqa: ASYNC251 - the blocking call under test

    async with trio.open_nursery() as nursery:
        nursery.start_soon(block, name=name)


async def test_another_task_that_blocks_is_named(caplog: pytest.LogCaptureFixture) -> None:
    app = make_app()
    async with trioflow.open_flow(app) as flow:
        await block_a_step("publisher")
        await flow.publish("order.created")
    (warning,) = blocking(caplog, "task 'publisher'")
    assert "holding up every consumer" in warning


async def test_a_handler_that_blocks_on_every_event_gets_one_warning_and_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_app()
    blocker(app)
    await run(app, events=3)
    # One warning, and, as the flow stopped, the steps the rate limit left out.
    first, summary = blocking(caplog, "consumer 'mailer'")
    assert "blocked the event loop for" in first
    assert "blocked the event loop in 2 more steps since its last warning" in summary


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """Set ``now[0]`` to the time `time.perf_counter` gives the watchdog."""
    now = [0.0]
    monkeypatch.setattr(_watchdog, "perf_counter", lambda: now[0])
    yield now


async def test_after_its_quiet_period_a_culprit_is_warned_again_with_the_count(
    caplog: pytest.LogCaptureFixture, fake_clock: list[float]
) -> None:
    tasks: list[trio.lowlevel.Task] = []

    async def consumer_task() -> None:
        tasks.append(trio.lowlevel.current_task())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consumer_task, name=consumer_task_name("mailer"))
    (task,) = tasks
    # Not installed: driven by hand, against the fake clock.
    watchdog = BlockingWatchdog(threshold=1.0, every=60.0)

    def step(at: float, held: float) -> None:
        fake_clock[0] = at
        watchdog.after_io_wait(0)
        fake_clock[0] = at + held
        watchdog.after_task_step(task)

    step(at=0, held=0.5)
    assert blocking(caplog, "consumer 'mailer'") == []
    step(at=10, held=2)
    step(at=20, held=3)
    step(at=30, held=4)
    assert len(blocking(caplog, "consumer 'mailer'")) == 1
    step(at=80, held=2)
    first, second = blocking(caplog, "consumer 'mailer'")
    assert "for 2.00 s" in first
    assert "for 2.00 s" in second
    assert "(and in 2 more steps since its last warning, the longest 4.00 s)" in second
    watchdog.report_suppressed()
    assert len(blocking(caplog, "consumer 'mailer'")) == 2


async def test_a_garbage_collection_is_not_blamed_on_the_step_it_interrupts(
    caplog: pytest.LogCaptureFixture, fake_clock: list[float]
) -> None:
    watchdog = BlockingWatchdog(threshold=1.0)
    task = trio.lowlevel.current_task()
    fake_clock[0] = 0.0
    watchdog.after_io_wait(0)
    fake_clock[0] = 0.2
    watchdog.collecting("start", {})
    fake_clock[0] = 1.7
    watchdog.collecting("stop", {})
    fake_clock[0] = 1.9
    watchdog.after_task_step(task)
    assert caplog.messages == []
    fake_clock[0] = 3.4
    watchdog.after_task_step(task)
    (warning,) = caplog.messages
    assert warning.startswith(f"task {task.name!r} blocked the event loop for 1.50 s")


def watchdog_of_this_run() -> BlockingWatchdog | None:
    return _watchdog._RUN_WATCHDOG.get()


def assert_removed(watchdog: BlockingWatchdog) -> None:
    assert watchdog_of_this_run() is None
    assert watchdog.collecting not in gc.callbacks
    with pytest.raises(KeyError):
        trio.lowlevel.remove_instrument(watchdog)


@pytest.mark.parametrize("error", [None, RuntimeError("the block failed")])
async def test_the_instrument_is_removed_when_the_flow_ends(
    caplog: pytest.LogCaptureFixture, error: Exception | None
) -> None:
    app = make_app()
    watchdog = None
    try:
        async with trioflow.open_flow(app):
            watchdog = watchdog_of_this_run()
            assert watchdog is not None
            assert watchdog.collecting in gc.callbacks
            await block_a_step("inside")
            if error is not None:
                raise error
    except RuntimeError as exc:
        assert exc is error
    else:
        assert error is None
    assert watchdog is not None
    assert_removed(watchdog)
    await block_a_step("after")
    assert len(blocking(caplog, "task 'inside'")) == 1
    assert blocking(caplog, "task 'after'") == []


async def test_flows_running_together_report_a_step_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryStore()
    first, second = make_app(store), make_app(store)
    blocker(first)
    async with trioflow.open_flow(first) as flow:
        watchdog = watchdog_of_this_run()
        async with trioflow.open_flow(second):
            assert watchdog_of_this_run() is watchdog
            await flow.publish("order.created")
            await flow.wait_idle()
            await block_a_step("publisher")
        # The first flow still watches.
        await block_a_step("reporter")
    assert watchdog is not None
    assert_removed(watchdog)
    assert len(blocking(caplog, "consumer 'mailer'")) == 1
    assert len(blocking(caplog, "task 'publisher'")) == 1
    assert len(blocking(caplog, "task 'reporter'")) == 1


async def test_the_lowest_threshold_of_the_flows_running_applies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryStore()
    lenient, strict = make_app(store, blocking_warning=10.0), make_app(store)
    async with trioflow.open_flow(lenient):
        await block_a_step("before")
        async with trioflow.open_flow(strict):
            await block_a_step("during")
        await block_a_step("after")
    assert blocking(caplog, "task 'before'") == []
    assert len(blocking(caplog, "task 'during'")) == 1
    assert blocking(caplog, "task 'after'") == []


async def test_none_turns_the_watchdog_off(caplog: pytest.LogCaptureFixture) -> None:
    app = make_app(blocking_warning=None)
    blocker(app)
    async with trioflow.open_flow(app) as flow:
        assert watchdog_of_this_run() is None
        await flow.publish("order.created")
        await flow.wait_idle()
    assert blocking(caplog, "consumer 'mailer'") == []


def test_the_threshold_defaults_to_a_tenth_of_a_second() -> None:
    assert trioflow.App("memory://").blocking_warning == 0.1


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), "0.1", True])
def test_an_invalid_threshold_is_refused(value: object) -> None:
    with pytest.raises(trioflow.ConfigurationError, match=r"blocking_warning .*or None"):
        trioflow.App("memory://", blocking_warning=value)  # type: ignore[arg-type]
