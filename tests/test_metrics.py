"""Metrics and health: the flow's histograms and counters, `Flow.readiness`, and
`trioflow.metrics` scraped over real HTTP while a flow runs.

Timing figures are checked under an autojump `MockClock`, where a delay is
exact; the HTTP tests run on the real clock and check values, never times.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import re
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import hypothesis
import hypothesis.strategies as st
import prometheus_client
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

import trioflow
import trioflow.metrics
from tests._procs import sqlite_url
from trioflow._histograms import FOLD_AT, SECONDS_BUCKETS, Histogram
from trioflow.stores import Store
from trioflow.stores.memory import MemoryStore
from trioflow.testing import FaultyStore

ROOT = Path(__file__).resolve().parent.parent

#: A sample: its name and labels (``le`` as a float, so 1 and 1.0 are one bound).
Key = tuple[str, frozenset[tuple[str, str | float]]]


async def no_op(event: trioflow.Event) -> None:
    pass


# -- histograms ---------------------------------------------------------------------------


async def test_a_histogram_counts_each_value_in_the_first_bucket_at_or_above_it() -> None:
    histogram = Histogram((1.0, 2.0, 5.0))
    for value in (0.5, 1.0, 1.5, 5.0, 7.0, 0.0):
        histogram.observe(value)
    snapshot = histogram.snapshot()
    assert snapshot.counts == (3, 1, 1, 1)
    assert (snapshot.count, snapshot.sum) == (6, 15.0)
    assert snapshot.cumulative() == [(1.0, 3), (2.0, 4), (5.0, 5), (float("inf"), 6)]
    # A snapshot is a value: later observations do not change it.
    histogram.observe(3.0)
    assert snapshot.count == 6
    assert histogram.snapshot().counts == (3, 1, 2, 1)
    for bad in ((), (2.0, 1.0), (1.0, 1.0), (1.0, float("inf"))):
        with pytest.raises(ValueError, match="strictly increasing"):
            Histogram(bad)
    await trio.lowlevel.checkpoint()


def naive_counts(bounds: tuple[float, ...], values: list[float]) -> tuple[int, ...]:
    counts = [0] * (len(bounds) + 1)
    for value in values:
        counts[next((i for i, bound in enumerate(bounds) if value <= bound), len(bounds))] += 1
    return tuple(counts)


@hypothesis.given(
    values=st.lists(st.floats(min_value=0, max_value=100), max_size=60),
    split=st.integers(min_value=0, max_value=60),
)
def test_snapshots_count_as_one_comparison_per_value_would(values: list[float], split: int) -> None:
    bounds = (0.5, 1.0, 2.5, 10.0, 50.0)
    histogram = Histogram(bounds)
    for value in values[:split]:
        histogram.observe(value)
    first = histogram.snapshot()
    assert first.counts == naive_counts(bounds, values[:split])
    for value in values[split:]:
        histogram.observe(value)
    snapshot = histogram.snapshot()
    assert snapshot.counts == naive_counts(bounds, values)
    assert snapshot.count == len(values)
    assert snapshot.sum == pytest.approx(sum(values))


def test_many_observations_between_snapshots_are_all_counted() -> None:
    values = [(i % 97) / 10 for i in range(3 * FOLD_AT + 5)]
    histogram = Histogram(SECONDS_BUCKETS)
    for value in values:
        histogram.observe(value)
    snapshot = histogram.snapshot()
    assert snapshot.counts == naive_counts(SECONDS_BUCKETS, values)
    assert snapshot.sum == pytest.approx(sum(values))


def bucket_of(snapshot: trioflow.HistogramSnapshot, bound: float) -> int:
    """Observations in the bucket whose upper bound is ``bound`` (not cumulative)."""
    return snapshot.counts[snapshot.bounds.index(bound)]


async def test_handler_durations_retries_and_failures_are_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = trioflow.App(MemoryStore())
    attempts: dict[int, int] = {}

    @app.consumer("c", retry=trioflow.Retry(attempts=5, initial=1.0, jitter=0))
    async def handle(event: trioflow.Event) -> None:
        attempts[event.seq] = attempts.get(event.seq, 0) + 1
        await trio.sleep(0.3)
        if event.seq == 2 and attempts[2] <= 2:
            raise RuntimeError("not yet")

    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", i) for i in range(3)])
        await flow.wait_idle()
        stats = flow.statistics().consumers["c"]
    # Five calls of 0.3 s: three events, two of them retries of seq 2.
    assert (stats.processed, stats.failures, stats.retries, stats.redelivered) == (3, 2, 2, 0)
    durations = stats.handler_duration
    assert durations.count == 5
    assert durations.sum == pytest.approx(1.5)
    assert bucket_of(durations, 0.5) == 5


async def test_a_timed_out_handler_call_is_timed_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = trioflow.App(MemoryStore())

    @app.consumer("c", timeout=2.0, retry=trioflow.Retry(attempts=1), on_exhausted="dead-letter")
    async def handle(event: trioflow.Event) -> None:
        await trio.sleep(10)

    async with trioflow.open_flow(app) as flow:
        await flow.publish("a")
        await flow.wait_idle()
        stats = flow.statistics().consumers["c"]
    assert (stats.processed, stats.failures, stats.retries, stats.dead_lettered) == (0, 1, 0, 1)
    assert stats.handler_duration.count == 1
    assert stats.handler_duration.sum == pytest.approx(2.0)
    assert bucket_of(stats.handler_duration, 2.5) == 1


async def test_requeued_dead_letters_count_as_redelivered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = trioflow.App(MemoryStore())
    broken = {2}

    @app.consumer("c", retry=trioflow.Retry(attempts=1), on_exhausted="dead-letter")
    async def handle(event: trioflow.Event) -> None:
        if event.seq in broken:
            raise RuntimeError("down")

    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", i) for i in range(3)])
        await flow.wait_idle()
        assert flow.statistics().consumers["c"].redelivered == 0
        broken.clear()
        await flow.requeue("c", [2])
        await flow.wait_idle()
        stats = flow.statistics().consumers["c"]
    assert (stats.processed, stats.dead_lettered, stats.redelivered) == (3, 1, 1)
    assert stats.handler_duration.count == 4


async def test_publish_latency_and_batch_sizes_are_those_of_the_group_commits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FaultyStore()
    app = trioflow.App(store)
    async with trioflow.open_flow(app) as flow:
        await flow.publish_many([("a", i) for i in range(7)])
        store.delay_next("append", 0.7)
        async with trio.open_nursery() as nursery:
            # Sent while the first append (of one) hangs: the other two wait
            # and are committed together, 0.7 s after they were published.
            for i in range(3):
                nursery.start_soon(flow.publish, "b", i)
                await trio.testing.wait_all_tasks_blocked()
        stats = flow.statistics()
    assert stats.published == 10
    batches = stats.batch_size
    assert (batches.count, batches.sum) == (3, 10)
    assert (bucket_of(batches, 1), bucket_of(batches, 2), bucket_of(batches, 10)) == (1, 1, 1)
    latency = stats.publish_latency
    # One publish_many, at once; three publishes, each committed 0.7 s after
    # it was made (the first by the slow append, the others right after it).
    assert latency.count == 4
    assert latency.sum == pytest.approx(2.1)
    assert (bucket_of(latency, 0.0001), bucket_of(latency, 1.0)) == (1, 3)


async def test_cursor_commit_latency_and_store_errors_by_operation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FaultyStore()
    app = trioflow.App(store)
    app.consumer("c")(no_op)
    async with trioflow.open_flow(app) as flow:
        before = flow.statistics()
        assert set(before.store_errors.values()) == {0}
        assert {"append", "read", "commit_cursors", "claim_leases"} <= set(before.store_errors)
        store.fail_next("append", times=2)
        for _ in range(2):
            with pytest.raises(trioflow.StoreUnavailableError):
                await flow.publish("a")
        store.delay_next("commit_cursors", 0.4)
        await flow.publish("a")
        await flow.wait_idle()
        stats = flow.statistics()
    assert stats.store_errors["append"] == 2
    assert sum(stats.store_errors.values()) == 2
    commits = stats.cursor_commit_latency
    # The first cursor (at start-up) and the delayed write at least; on the
    # memory store no other write takes time.
    assert commits.count >= 2
    assert commits.sum == pytest.approx(0.4)
    assert bucket_of(commits, 0.5) == 1


# -- readiness ----------------------------------------------------------------------------


async def test_readiness_follows_the_store(autojump_clock: trio.testing.MockClock) -> None:
    store = FaultyStore()
    app = trioflow.App(store)
    app.consumer("c")(no_op)
    async with trioflow.open_flow(app) as flow:
        assert await flow.readiness() == trioflow.Readiness(ready=True, reasons=())
        # A call failed, and the store fails when asked: not ready.
        store.fail_next("append")
        with pytest.raises(trioflow.StoreError):
            await flow.publish("a")
        store.fail_next("head")
        readiness = await flow.readiness()
        assert not readiness.ready
        assert readiness.reasons == ("the store failed: injected failure of head",)
        # It answers again: ready.
        assert (await flow.readiness()).ready
        # A store that hangs past the timeout: not ready, after the timeout.
        store.fail_next("append")
        with pytest.raises(trioflow.StoreError):
            await flow.publish("a")
        store.delay_next("head", 60)
        start = trio.current_time()
        readiness = await flow.readiness(store_timeout=1.5)
        assert trio.current_time() - start == pytest.approx(1.5)
        assert readiness.reasons == ("the store did not answer within 1.5s",)
        await flow.publish("a")
        assert (await flow.readiness()).ready
    # A stopped flow is not ready.
    readiness = await flow.readiness()
    assert readiness.reasons[0] == "the flow is stopping"


async def test_readiness_asks_a_quiet_store_and_only_a_quiet_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # No consumer: nothing calls the store unless asked.
    store = FaultyStore()
    async with trioflow.open_flow(trioflow.App(store)) as flow:
        heads = store.calls["head"]
        assert (await flow.readiness()).ready
        assert store.calls["head"] == heads
        await trio.sleep(trioflow._flow.STORE_ANSWERED_RECENTLY + 1)
        assert (await flow.readiness()).ready
        assert store.calls["head"] == heads + 1
        # That answer counts for a while.
        assert (await flow.readiness()).ready
        assert store.calls["head"] == heads + 1
        await trio.sleep(trioflow._flow.STORE_ANSWERED_RECENTLY + 1)
        store.fail_next("head")
        readiness = await flow.readiness()
        assert store.calls["head"] == heads + 2
        assert readiness.reasons == ("the store failed: injected failure of head",)


async def test_a_standby_is_ready_and_a_lapsed_lease_is_not(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shared = MemoryStore()
    store = FaultyStore(shared)
    app_a, app_b = trioflow.App(store), trioflow.App(shared)
    app_a.consumer("c")(no_op)
    app_b.consumer("c")(no_op)
    async with trioflow.open_flow(app_a) as flow_a, trioflow.open_flow(app_b) as flow_b:
        stats = flow_b.statistics().consumers["c"]
        assert (stats.owned, stats.owner) == (False, flow_a.statistics().holder)
        assert (await flow_a.readiness()).ready
        assert (await flow_b.readiness()).ready
        # A cannot renew its lease: once it lapses, A runs the consumer no
        # more, and does not know who does until a claim answers.
        store.fail_next("claim_leases", times=10**6)
        await trio.sleep(app_a.lease_ttl + 1)
        assert not flow_a.statistics().consumers["c"].owned
        readiness = await flow_a.readiness()
        assert readiness.reasons == (
            "consumer 'c' is neither run by this flow nor known to be run by another (its "
            "lease lapsed, or its next owner is not yet known)",
        )
        store.fail_next("claim_leases", times=0)


# -- over HTTP ----------------------------------------------------------------------------


async def http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as it is to the server and read the answer until it closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


async def get(port: int, path: str, *, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    return await http(
        port, f"{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode()
    )


@attrs.frozen
class Served:
    flow: trioflow.Flow
    port: int


@contextlib.asynccontextmanager
async def serving(app: trioflow.App) -> AsyncIterator[Served]:
    async with trioflow.open_flow(app) as flow, trio.open_nursery() as nursery:
        port = await nursery.start(
            functools.partial(trioflow.metrics.serve_metrics, flow, port=0, host="127.0.0.1")
        )
        yield Served(flow, port)
        nursery.cancel_scope.cancel()


def expected_samples(stats: trioflow.FlowStatistics) -> dict[Key, float]:
    """Every sample of the trioflow metrics, as `Flow.statistics` says they should be."""
    samples: dict[Key, float] = {}

    def add(name: str, value: float, **labels: str | float) -> None:
        samples[name, frozenset(labels.items())] = float(value)

    def histogram(name: str, snapshot: trioflow.HistogramSnapshot, **labels: str) -> None:
        total = 0
        for bound, count in zip((*snapshot.bounds, float("inf")), snapshot.counts, strict=True):
            total += count
            add(f"{name}_bucket", total, le=float(bound), **labels)
        add(f"{name}_count", snapshot.count, **labels)
        add(f"{name}_sum", snapshot.sum, **labels)

    add("trioflow_flow_info", 1, holder=stats.holder)
    add("trioflow_head", stats.head)
    add("trioflow_published_total", stats.published)
    for operation, count in stats.store_errors.items():
        add("trioflow_store_errors_total", count, operation=operation)
    histogram("trioflow_publish_latency_seconds", stats.publish_latency)
    histogram("trioflow_publish_batch_size", stats.batch_size)
    histogram("trioflow_cursor_commit_latency_seconds", stats.cursor_commit_latency)
    for name, c in stats.consumers.items():
        add("trioflow_consumer_lag", c.lag, consumer=name)
        add("trioflow_consumer_position", c.position, consumer=name)
        add("trioflow_consumer_cursor", c.cursor, consumer=name)
        add("trioflow_consumer_buffered_events", c.buffered, consumer=name)
        add("trioflow_consumer_buffered_bytes", c.buffered_bytes, consumer=name)
        add("trioflow_consumer_attached", c.attached, consumer=name)
        add("trioflow_consumer_owned", c.owned, consumer=name)
        add("trioflow_consumer_halted", c.halted, consumer=name)
        add("trioflow_consumer_stalled", c.stall is not None, consumer=name)
        add("trioflow_consumer_handled_total", c.processed, consumer=name)
        add("trioflow_consumer_failures_total", c.failures, consumer=name)
        add("trioflow_consumer_retries_total", c.retries, consumer=name)
        add("trioflow_consumer_redelivered_total", c.redelivered, consumer=name)
        add("trioflow_consumer_restarts_total", c.restarts, consumer=name)
        add("trioflow_consumer_dead_letters_total", c.dead_lettered, consumer=name)
        histogram("trioflow_consumer_handler_duration_seconds", c.handler_duration, consumer=name)
    return samples


def scraped_samples(text: str) -> dict[Key, float]:
    """The trioflow samples of a scrape (the process' own are left out)."""
    return {
        (
            sample.name,
            frozenset(
                (name, float(value) if name == "le" else value)
                for name, value in sample.labels.items()
            ),
        ): sample.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("trioflow_")
        for sample in family.samples
    }


def stores(tmp_path: Path) -> Mapping[str, Callable[[], Store | str]]:
    return {"memory": MemoryStore, "sqlite": lambda: sqlite_url(tmp_path / "events.db")}


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_scraped_metrics_match_the_statistics_while_the_flow_runs(
    kind: str, tmp_path: Path
) -> None:
    app = trioflow.App(stores(tmp_path)[kind](), commit_interval=0.05)
    entered, release = trio.Event(), trio.Event()

    @app.consumer("held", types={"a"}, buffer=100)
    async def held(event: trioflow.Event) -> None:
        entered.set()
        await release.wait()

    @app.consumer(
        "failing", retry=trioflow.Retry(attempts=2, initial=0.01), on_exhausted="dead-letter"
    )
    async def failing(event: trioflow.Event) -> None:
        if event.seq % 3 == 0:
            raise RuntimeError("every third")

    app.consumer("fast")(no_op)
    app.consumer("group", partitions=2)(no_op)

    async with serving(app) as served:
        flow = served.flow
        await flow.publish("a", {"i": 0})
        await entered.wait()
        # "held" is in its first event; the next ones wait in its channel.
        await flow.publish_many([("a", {"i": i}) for i in range(1, 12)])
        for i in range(5):
            await flow.publish("b", {"i": i}, key=f"k{i}")
        # Until every other consumer has committed all 17: then nothing moves.
        # (wait_idle would wait for "held" too; nothing else says when: poll.)
        while any(  # noqa: ASYNC110
            c.cursor < 17 for name, c in flow.statistics().consumers.items() if name != "held"
        ):
            await trio.sleep(0.01)
        status, headers, body = await get(served.port, "/metrics")
        stats = flow.statistics()
        assert status == 200
        assert headers["content-type"] == prometheus_client.CONTENT_TYPE_PLAIN_0_0_4
        assert scraped_samples(body.decode()) == expected_samples(stats)
        held_stats = stats.consumers["held"]
        assert (held_stats.lag, held_stats.buffered, held_stats.processed) == (17, 11, 0)
        assert held_stats.handler_duration.count == 0
        failing_stats = stats.consumers["failing"]
        assert (failing_stats.dead_lettered, failing_stats.retries) == (5, 5)
        assert {"group/0", "group/1"} <= set(stats.consumers)
        assert (stats.published, stats.batch_size.count, stats.batch_size.sum) == (17, 7, 17)
        # The process's own metrics are there too.
        assert b"\nprocess_cpu_seconds_total " in body

        release.set()
        await flow.wait_idle()
        _, _, body = await get(served.port, "/metrics")
        stats = flow.statistics()
        assert scraped_samples(body.decode()) == expected_samples(stats)
        assert stats.consumers["held"].processed == 12
        assert stats.consumers["held"].handler_duration.count == 12


async def test_health_checks_answer_and_readiness_follows_the_store() -> None:
    store = FaultyStore()
    app = trioflow.App(store)
    app.consumer("c")(no_op)
    async with serving(app) as served:
        assert await get(served.port, "/livez") == (
            200,
            {
                "content-type": "text/plain; charset=utf-8",
                "content-length": "6",
                "cache-control": "no-store",
                "connection": "close",
            },
            b"alive\n",
        )
        status, _, body = await get(served.port, "/readyz")
        assert (status, body) == (200, b"ready\n")
        store.fail_next("append")
        with pytest.raises(trioflow.StoreError):
            await served.flow.publish("a")
        store.fail_next("head")
        status, headers, body = await get(served.port, "/readyz")
        assert status == 503
        assert headers["content-type"] == "text/plain; charset=utf-8"
        assert body.startswith(b"not ready:\nthe store failed: ")
        assert sum(served.flow.statistics().store_errors.values()) == 2
        status, _, body = await get(served.port, "/readyz")
        assert (status, body) == (200, b"ready\n")
        status, headers, body = await get(served.port, "/readyz", method="HEAD")
        assert (status, headers["content-length"], body) == (200, "6", b"")


async def test_bad_requests_are_answered_and_never_disturb_the_flow() -> None:
    app = trioflow.App(MemoryStore())
    seen: list[int] = []

    @app.consumer("c")
    async def handle(event: trioflow.Event) -> None:
        seen.append(event.seq)

    async with serving(app) as served:
        port = served.port
        status, _, body = await get(port, "/nowhere")
        assert (status, body) == (404, b"not found: try /metrics, /livez or /readyz\n")
        status, headers, _ = await get(port, "/metrics", method="POST")
        assert (status, headers["allow"]) == (405, "GET, HEAD")
        status, _, body = await http(port, b"this is not HTTP\r\n\r\n")
        assert status == 400
        assert body.startswith(b"bad request: ")
        huge = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
        status, _, _ = await http(port, huge)
        assert status == 431
        # A client that leaves mid-request.
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /metr")
        await stream.aclose()
        # Two requests on one kept-alive connection.
        status, _, body = await http(
            port,
            b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        assert (status, body.count(b"alive\n"), body.count(b"HTTP/1.1 200 OK")) == (200, 2, 1)
        await served.flow.publish("a")
        await served.flow.wait_idle()
        assert seen == [1]
        assert (await get(port, "/livez"))[0] == 200


async def test_a_failure_to_collect_is_a_500_and_the_server_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    app = trioflow.App(MemoryStore())
    async with serving(app) as served:

        def broken() -> trioflow.FlowStatistics:
            raise RuntimeError("broken statistics")

        monkeypatch.setattr(served.flow, "statistics", broken)
        status, _, body = await get(served.port, "/metrics")
        assert (status, body) == (500, b"internal error: see the log\n")
        assert "broken statistics" in caplog.text
        monkeypatch.undo()
        assert (await get(served.port, "/metrics"))[0] == 200


async def test_a_silent_client_is_dropped_after_the_request_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = trioflow.App(MemoryStore())
    async with serving(app) as served:
        stream = await trio.open_tcp_stream("127.0.0.1", served.port)
        start = trio.current_time()
        await stream.send_all(b"GET /livez HTTP/1.1\r\n")
        assert await stream.receive_some() == b""
        assert trio.current_time() - start >= trioflow.metrics.REQUEST_TIMEOUT
        await stream.aclose()


async def test_the_collector_serves_any_registry_and_threads() -> None:
    app = trioflow.App(MemoryStore())
    app.consumer("c")(no_op)
    async with trioflow.open_flow(app) as flow:
        await flow.publish("a")
        await flow.wait_idle()
        registry = prometheus_client.CollectorRegistry()
        collector = trioflow.metrics.FlowCollector(flow)
        registry.register(collector)
        with pytest.raises(ValueError, match="Duplicated timeseries"):
            registry.register(trioflow.metrics.FlowCollector(flow))
        here = prometheus_client.generate_latest(registry).decode()
        # From a thread of the process, as prometheus_client's own server does.
        there = await trio.to_thread.run_sync(prometheus_client.generate_latest, registry)
        expected = expected_samples(flow.statistics())
        assert scraped_samples(here) == scraped_samples(there.decode()) == expected
    with pytest.raises(trioflow.ConfigurationError, match=r"needs a trioflow\.Flow"):
        trioflow.metrics.FlowCollector(app)  # type: ignore[arg-type]


async def test_without_the_extra_importing_metrics_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "trioflow.metrics")
    with pytest.raises(
        trioflow.ConfigurationError, match=re.escape("pip install 'trioflow[metrics]'")
    ):
        importlib.import_module("trioflow.metrics")
    await trio.lowlevel.checkpoint()


# -- the docs -----------------------------------------------------------------------------


def yaml() -> Any:
    # PyYAML ships no type hints.
    return importlib.import_module("yaml")


def operations_doc() -> str:
    return (ROOT / "docs" / "operations.md").read_text()


async def test_the_docs_name_every_metric_and_no_other() -> None:
    app = trioflow.App(MemoryStore())
    app.consumer("c")(no_op)
    async with trioflow.open_flow(app) as flow:
        registry = prometheus_client.CollectorRegistry()
        registry.register(trioflow.metrics.FlowCollector(flow))
        suffixes = {"counter": "_total", "info": "_info"}
        families = {family.name + suffixes.get(family.type, "") for family in registry.collect()}
    doc = operations_doc()
    table = set(re.findall(r"^\| `(trioflow_\w+)`", doc, re.MULTILINE))
    assert table == families
    # Every metric an alert rule or example uses exists (a histogram by its series).
    series = {
        name
        for family in families
        for name in (family, f"{family}_bucket", f"{family}_count", f"{family}_sum")
    }
    rules = [
        block for block in re.findall(r"```yaml\n(.*?)```", doc, re.DOTALL) if "groups:" in block
    ]
    assert rules
    for block in rules:
        for group in yaml().safe_load(block)["groups"]:
            for rule in group["rules"]:
                used = set(re.findall(r"\btrioflow_\w+", rule["expr"]))
                assert used, rule
                assert used <= series, rule
