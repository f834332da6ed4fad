"""Server faults under a running flow: lost answers, crashes and restarts of PostgreSQL.

The ambiguous case of every database write: the connection dies while the
append's commit is in flight, so the append may have committed although the
caller saw no answer. The store must then find out (and return the real
sequence numbers), or say that it failed and nothing was persisted, or, only
when it cannot reach the server to check, say that the outcome is unknown.
It is made on purpose two ways:

* a proxy between the store and the test server (``_proxy.py``) loses one
  answer or one request (and plays a server ending its idle sessions);
* on a throwaway cluster (``_cluster.py``), a synchronous standby that never
  comes holds a commit that is already flushed, until the server is stopped.

Then, on the throwaway cluster, the server is stopped with ``-m immediate`` (a
crash, with recovery at the next start) and ``-m fast`` under a flow that
publishes continuously. The flow must ride it out: every publish returns a
sequence number (and the event is in the store) or raises a `StoreError` that
does not lie, publishing works again afterwards, and consumers handle every
event in order, handling again only what the guarantees allow.

Real time throughout; every wait is bounded and waits for a condition, none
asserts how long something took.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio

import trioflow
from tests._procs import (
    check_consumer_log,
    check_projection_state,
    check_runs,
    running,
    split_runs,
)
from tests.postgres._cluster import Cluster, StopMode
from tests.postgres._proxy import LosingProxy, open_proxy
from tests.postgres.test_crash import read_projection
from trioflow.stores.postgres import PostgresStore
from trioflow.stores.postgres._driver import Driver, DriverConfig, open_driver
from trioflow.testing._store_contract import make_events, read_all

#: Consumer name -> (commit_every, types or None).
CONSUMERS: dict[str, tuple[int, frozenset[str] | None]] = {
    "every": (1, None),
    # Bounded and now and then slow: it falls behind, detaches and catches up
    # from the store, faults or not.
    "batched": (20, None),
    "filtered": (7, frozenset({"t.a"})),
}
BUFFERS = {"batched": 16}
TYPES = ("t.a", "t.b", "t.c")
#: Mean seconds between one publisher's calls.
PACE = 0.015
#: How long the server stays down in each fault. Nothing asserts on it.
OUTAGE = 0.5


@asynccontextmanager
async def open_admin(url: str) -> AsyncIterator[Driver]:
    """A plain driver, for set-up and inspection."""
    config = DriverConfig(dsn=url, display=url, min_size=1, max_size=2, connect_timeout=5.0)
    async with open_driver(config) as driver:
        yield driver


def says_unknown(error: BaseException) -> bool:
    """Whether an error says that the outcome of the write is unknown."""
    return isinstance(error, trioflow.OutcomeUnknownError) and "unknown" in str(error)


# -- the ambiguous commit, made on purpose -------------------------------------------------


@asynccontextmanager
async def proxied_store(
    pg_url: str, schema: str, **options: object
) -> AsyncIterator[tuple[LosingProxy, PostgresStore]]:
    async with open_proxy(pg_url) as proxy:
        store = PostgresStore.from_url(proxy.url(pg_url, schema=schema, **options))
        async with store.open():
            yield proxy, store


async def test_an_append_whose_answer_was_lost_returns_the_seqs_it_got(
    pg_url: str, schema: str
) -> None:
    async with proxied_store(pg_url, schema) as (proxy, store):
        await store.append(make_events(2))
        proxy.lose_answer_to(b"lost.answer")
        batch = make_events(3, "lost.answer")
        with trio.fail_after(30):
            appended = await store.append(batch)
        assert proxy.answers_lost == 1
        assert appended.after == 2
        assert list(appended.seqs) == [3, 4, 5]
        events = await read_all(store)
        assert [(e.seq, e.id) for e in events[2:]] == [
            (seq, new.id) for seq, new in zip(appended.seqs, batch, strict=True)
        ]
        assert {e.created_at for e in events[2:]} == {appended.created_at}
        # The store goes on as usual.
        assert list((await store.append(make_events(1))).seqs) == [6]


async def test_an_append_whose_request_was_lost_says_nothing_was_persisted(
    pg_url: str, schema: str
) -> None:
    async with proxied_store(pg_url, schema) as (proxy, store):
        await store.append(make_events(2))
        proxy.lose_request_with(b"lost.request")
        with trio.fail_after(30), pytest.raises(trioflow.StoreUnavailableError) as caught:
            await store.append(make_events(3, "lost.request"))
        assert not says_unknown(caught.value), caught.value
        assert "nothing was persisted" in str(caught.value)
        assert [e.type for e in await read_all(store)] == ["test.event"] * 2
        assert list((await store.append(make_events(1))).seqs) == [3]


async def test_an_append_in_doubt_with_the_server_out_of_reach_says_the_outcome_is_unknown(
    pg_url: str, schema: str
) -> None:
    async with proxied_store(pg_url, schema, connect_timeout=1) as (proxy, store):
        await store.append(make_events(2))
        proxy.lose_answer_to(b"lost.answer", then_refuse=True)
        batch = make_events(3, "lost.answer")
        with trio.fail_after(30), pytest.raises(trioflow.OutcomeUnknownError) as caught:
            await store.append(batch)
        assert says_unknown(caught.value), caught.value
        assert str(batch[0].id) in str(caught.value)
        proxy.refusing = False
        # It had committed: "unknown" was the honest answer.
        assert [e.id for e in await read_all(store)][2:] == [new.id for new in batch]
        assert list((await store.append(make_events(1))).seqs) == [6]


async def test_pooled_sessions_the_server_ended_are_replaced_not_reported(
    pg_url: str, schema: str
) -> None:
    # A server shutting down sends its idle sessions a FATAL error, then
    # closes them; until the close arrives the pooled connections look open.
    async with proxied_store(pg_url, schema) as (proxy, store):
        await store.append(make_events(2))
        await proxy.end_idle_sessions()
        assert list((await store.append(make_events(1))).seqs) == [3]
        await proxy.end_idle_sessions()
        assert await store.head() == 3


async def test_a_publish_whose_answer_was_lost_returns_and_is_delivered_once(
    pg_url: str, schema: str
) -> None:
    async with open_proxy(pg_url) as proxy:
        app = trioflow.App(store=proxy.url(pg_url, schema=schema, poll_interval=0.2))
        handled: list[tuple[int, str]] = []

        @app.consumer("all")
        async def handle(event: trioflow.Event) -> None:
            handled.append((event.seq, event.type))

        with trio.fail_after(30):
            async with trioflow.open_flow(app) as flow:
                await flow.publish("before")
                proxy.lose_answer_to(b"lost.answer")
                seqs = await flow.publish_many([("lost.answer", {"i": i}) for i in range(3)])
                assert proxy.answers_lost == 1
                seqs.append(await flow.publish("after"))
                await flow.wait_idle()
    assert seqs == [2, 3, 4, 5]
    assert handled == [(1, "before")] + [(seq, "lost.answer") for seq in seqs[:3]] + [(5, "after")]


@asynccontextmanager
async def standby_that_never_comes(cluster: Cluster) -> AsyncIterator[None]:
    """Make every commit on the cluster wait for a synchronous standby that never comes."""
    async with open_admin(cluster.url()) as admin:
        await admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
        await admin.execute("SELECT pg_reload_conf()")
    try:
        yield
    finally:
        # Leave the cluster as it was for the next test, whatever happened.
        with trio.CancelScope(shield=True), trio.fail_after(30):
            if not cluster.running:
                await cluster.start()
            async with open_admin(cluster.url()) as admin:
                await admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
                await admin.execute("SELECT pg_reload_conf()")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["immediate", "fast"])
async def test_a_publish_committed_when_the_server_went_down_returns_its_seqs(
    cluster: Cluster, mode: StopMode
) -> None:
    # With a synchronous standby that never comes, PostgreSQL commits locally
    # (the commit is flushed, and survives a crash), then waits for the
    # standby before it answers: the answer never comes, the commit stays.
    schema = f"tf_faults_{uuid.uuid4().hex[:12]}"
    app = trioflow.App(store=cluster.url(schema=schema, poll_interval=0.2, connect_timeout=10))
    handled: list[tuple[int, str]] = []

    @app.consumer("all")
    async def handle(event: trioflow.Event) -> None:
        handled.append((event.seq, event.type))

    result: list[int] = []
    with trio.fail_after(60):
        async with trioflow.open_flow(app) as flow:
            await flow.publish("before")
            await flow.wait_idle()
            async with (
                open_admin(cluster.url()) as admin,
                standby_that_never_comes(cluster),
                trio.open_nursery() as nursery,
            ):

                async def publish() -> None:
                    items = [("committed", {"i": i}) for i in range(3)]
                    result.extend(await flow.publish_many(items))

                nursery.start_soon(publish)
                while not await admin.fetchval(  # noqa: ASYNC110 (the server's view)
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
                ):
                    await trio.sleep(0.02)
                # Takes effect at the restart; the waiting commit keeps waiting.
                await admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
                await cluster.stop(mode)
                await cluster.start()
            await flow.wait_idle()
    assert result == [2, 3, 4]
    assert handled == [(1, "before")] + [(seq, "committed") for seq in result]


# -- a flow through server crashes and restarts --------------------------------------------


@attrs.define(eq=False)
class Call:
    """One publish or publish_many call, and how it ended."""

    publisher: str
    number: int
    size: int
    #: Faults survived when the call started.
    phase: int
    seqs: list[int] | None = None
    error: trioflow.StoreError | None = None


@attrs.define(eq=False)
class Record:
    """What the publishers and consumers did; wakes `wait_until` on every change."""

    handled: dict[str, list[int]] = attrs.Factory(lambda: {name: [] for name in CONSUMERS})
    calls: list[Call] = attrs.Factory(list)
    phase: int = 0
    _changed: trio.Event = attrs.Factory(trio.Event)

    def note(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, condition: Callable[[], bool], what: str, *, limit: float) -> None:
        with trio.move_on_after(limit):
            while not condition():
                await self._changed.wait()
            return
        pytest.fail(f"waited {limit}s for {what}; calls: {self.summary()}")

    def summary(self) -> str:
        failed = [call for call in self.calls if call.error is not None]
        return (
            f"{len(self.calls)} calls, {len(failed)} failed "
            f"({sum(says_unknown(call.error) for call in failed if call.error)} unknown); "
            f"handled: { {name: len(seqs) for name, seqs in self.handled.items()} }"
        )

    async def wait_for_progress(self, *, limit: float = 30) -> None:
        """Wait until a publish started since the last fault returned, and every
        consumer handled 50 events more."""
        phase = self.phase
        marks = {name: len(seqs) for name, seqs in self.handled.items()}

        def progressed() -> bool:
            published = any(c.phase == phase and c.seqs is not None for c in self.calls)
            return published and all(
                len(seqs) >= marks[name] + 50 for name, seqs in self.handled.items()
            )

        await self.wait_until(progressed, f"progress after {phase} fault(s)", limit=limit)


def make_app(url: str, record: Record) -> trioflow.App:
    app = trioflow.App(
        store=url,
        commit_interval=0.2,
        restart=trioflow.RestartPolicy(initial=0.05, maximum=0.5),
        shutdown_grace=5.0,
    )
    for name, (commit_every, types) in CONSUMERS.items():

        async def handle(event: trioflow.Event, name: str = name) -> None:
            if name in BUFFERS and event.seq % 40 == 0:
                await trio.sleep(0.02)
            record.handled[name].append(event.seq)
            record.note()

        app.consumer(name, commit_every=commit_every, types=types, buffer=BUFFERS.get(name))(handle)
    return app


async def publish_continuously(
    flow: trioflow.Flow, name: str, record: Record, rng: random.Random, stop: trio.Event
) -> None:
    """Publish until ``stop``: single events and batches, recording how each call ended."""
    number = 0
    while not stop.is_set():
        size = 1 if rng.random() < 0.4 else rng.randint(2, 12)
        items = [(rng.choice(TYPES), {"pub": name, "call": number, "i": i}) for i in range(size)]
        call = Call(publisher=name, number=number, size=size, phase=record.phase)
        try:
            if size == 1:
                call.seqs = [await flow.publish(*items[0])]
            else:
                call.seqs = await flow.publish_many(items)
        except trioflow.StoreError as exc:
            # Anything else (FlowClosedError, a crash of the flow) fails the test.
            call.error = exc
        record.calls.append(call)
        record.note()
        number += 1
        await trio.sleep(rng.uniform(0, 2 * PACE))


@attrs.frozen
class Stored:
    seq: int
    type: str
    publisher: str
    call: int
    i: int


async def read_events(cluster: Cluster, schema: str) -> list[Stored]:
    async with open_admin(cluster.url()) as admin:
        rows = await admin.fetch(f'SELECT seq, type, data FROM "{schema}".events ORDER BY seq')
    events = []
    for seq, event_type, data in rows:
        fields = json.loads(data)
        events.append(Stored(seq, event_type, fields["pub"], fields["call"], fields["i"]))
    return events


async def read_cursors(admin: Driver, schema: str, table: str) -> dict[str, int]:
    rows = await admin.fetch(f'SELECT consumer, seq FROM "{schema}".{table}')
    return {row[0]: row[1] for row in rows}


async def wait_for_checkpoints(cluster: Cluster, schema: str) -> None:
    """Wait until every consumer has a logged cursor (a checkpoint) past 0."""
    with trio.fail_after(30):
        async with open_admin(cluster.url()) as admin:
            while True:
                cursors = await read_cursors(admin, schema, "cursors")
                if len(cursors) == len(CONSUMERS) and min(cursors.values()) > 0:
                    return
                # Polling the server's view: there is nothing to wait on locally.
                await trio.sleep(0.05)


def check_publishes(record: Record, events: list[Stored]) -> None:
    """Every call returned seqs that hold its events, or raised an error that does not lie."""
    by_call: dict[tuple[str, int], list[Stored]] = {}
    for event in events:
        by_call.setdefault((event.publisher, event.call), []).append(event)
    calls = {(call.publisher, call.number): call for call in record.calls}
    phantoms = sorted(set(by_call) - set(calls))
    assert not phantoms, f"events of calls never made: {phantoms[:10]}"
    lies = []
    for key, call in calls.items():
        stored = by_call.get(key, [])
        if call.seqs is not None:
            returned = list(zip(call.seqs, range(call.size), strict=True))
            assert [(e.seq, e.i) for e in stored] == returned, (
                f"call {key} returned seqs {call.seqs}; the store holds {stored}"
            )
        elif stored:
            assert [e.i for e in stored] == list(range(call.size)), (
                f"call {key} was persisted in part: {stored}"
            )
            if call.error is None or not says_unknown(call.error):
                lies.append((key, str(call.error), [e.seq for e in stored]))
    assert not lies, f"publishes raised an error but their events were committed: {lies}"
    for publisher in {call.publisher for call in record.calls}:
        order = [(e.call, e.i) for e in events if e.publisher == publisher]
        assert order == sorted(order), f"{publisher}'s events are out of publish order"


def check_consumers(
    record: Record,
    events: list[Stored],
    cursors: Mapping[str, int],
    statistics: trioflow.FlowStatistics,
) -> None:
    """Every event handled in order; handled again only after a restart, at most commit_every."""
    head = events[-1].seq
    assert dict(cursors) == dict.fromkeys(CONSUMERS, head), f"cursors {cursors}, head {head}"
    for name, (commit_every, types) in CONSUMERS.items():
        expected = [e.seq for e in events if types is None or e.type in types]
        runs = split_runs(record.handled[name])
        stats = statistics.consumers[name]
        where = f"consumer {name!r} (commit_every={commit_every}), {stats}"
        assert len(runs) <= stats.restarts + 1, f"handled events again without a restart; {where}"
        check_consumer_log(runs, expected, cursors[name], commit_every, where)
        missing = sorted(set(expected) - set(record.handled[name]))
        assert not missing, f"never handled {missing[:20]}; {where}"


@pytest.mark.slow
async def test_a_flow_rides_out_immediate_and_fast_restarts(cluster: Cluster) -> None:
    schema = f"tf_faults_{uuid.uuid4().hex[:12]}"
    # connect_timeout bounds how long an append in doubt looks for its outcome:
    # longer than the outage, so that it finds it.
    url = cluster.url(schema=schema, poll_interval=0.2, connect_timeout=5, pool_max_size=4)
    record = Record()
    stop = trio.Event()
    with trio.fail_after(120):
        async with trioflow.open_flow(make_app(url, record)) as flow:
            async with trio.open_nursery() as nursery:
                for number, publisher in enumerate(("p1", "p2")):
                    rng = random.Random(number)
                    nursery.start_soon(publish_continuously, flow, publisher, record, rng, stop)
                for mode in ("immediate", "fast"):
                    await record.wait_for_progress()
                    await cluster.stop(mode)
                    await trio.sleep(OUTAGE)
                    await cluster.start()
                    record.phase += 1
                # Publishing works again, and consumers go on.
                await record.wait_for_progress()
                stop.set()
            await flow.wait_idle()
            statistics = flow.statistics()
    events = await read_events(cluster, schema)
    async with open_admin(cluster.url()) as admin:
        cursors = await read_cursors(admin, schema, "cursors")
    check_publishes(record, events)
    check_consumers(record, events, cursors, statistics)
    failures = sum(call.error is not None for call in record.calls) + sum(
        consumer.failures for consumer in statistics.consumers.values()
    )
    assert failures, "the faults never reached the flow: no publish or consumer failed"
    errors = {f"{type(call.error).__name__}: {call.error}" for call in record.calls if call.error}
    restarts = {name: c.restarts for name, c in statistics.consumers.items()}
    print(f"{record.summary()}; restarts: {restarts}; errors: {sorted(errors)}")


@pytest.mark.slow
async def test_unlogged_cursors_resume_from_the_logged_checkpoint_after_a_crash(
    cluster: Cluster,
) -> None:
    schema = f"tf_faults_{uuid.uuid4().hex[:12]}"
    url = cluster.url(
        schema=schema,
        poll_interval=0.2,
        connect_timeout=2,
        pool_max_size=4,
        cursor_durability="unlogged",
        cursor_checkpoint_interval=0.3,
    )
    record = Record()
    stop = trio.Event()
    with trio.fail_after(120):
        async with (
            trioflow.open_flow(make_app(url, record)) as flow,
            trio.open_nursery() as nursery,
        ):
            for number, publisher in enumerate(("p1", "p2")):
                rng = random.Random(10 + number)
                nursery.start_soon(publish_continuously, flow, publisher, record, rng, stop)
            # A crash under the running flow: it rides it out.
            await record.wait_for_progress()
            async with open_admin(cluster.url()) as admin:
                floor = await read_cursors(admin, schema, "cursors")
            await cluster.stop("immediate")
            await trio.sleep(OUTAGE)
            await cluster.start()
            record.phase += 1
            await record.wait_for_progress()
            # Every consumer has a logged checkpoint past the start...
            await wait_for_checkpoints(cluster, schema)
            # ...when the server crashes again, and the flow stops while it is down:
            # its last cursors go nowhere, and the unlogged ones are lost.
            await cluster.stop("immediate")
            stop.set()
    await cluster.start()
    async with open_admin(cluster.url()) as admin:
        assert await read_cursors(admin, schema, "cursors_unlogged") == {}, (
            "crash recovery did not empty the unlogged cursor table"
        )
        checkpoints = await read_cursors(admin, schema, "cursors")
    marks = {name: len(seqs) for name, seqs in record.handled.items()}
    record.phase += 1
    with trio.fail_after(60):
        async with trioflow.open_flow(make_app(url, record)) as flow:
            items = [("t.a", {"pub": "p3", "call": 0, "i": i}) for i in range(5)]
            seqs = await flow.publish_many(items)
            record.calls.append(Call("p3", 0, len(items), record.phase, seqs=seqs))
            await flow.wait_idle()
            statistics = flow.statistics()
    events = await read_events(cluster, schema)
    async with open_admin(cluster.url()) as admin:
        cursors = await read_cursors(admin, schema, "cursors_unlogged")
    check_publishes(record, events)
    head = events[-1].seq
    assert cursors == dict.fromkeys(CONSUMERS, head), f"cursors {cursors}, head {head}"
    for name, (_, types) in CONSUMERS.items():
        expected = [e.seq for e in events if types is None or e.type in types]
        handled = record.handled[name]
        where = f"consumer {name!r} (checkpoint {checkpoints[name]}, floor {floor.get(name)})"
        again_by_run = check_runs(split_runs(handled), expected, where)
        missing = sorted(set(expected) - set(handled))
        assert not missing, f"never handled {missing[:20]}; {where}"
        # Replay is bounded by the logged checkpoint: nothing at or below the
        # checkpoint seen before the first crash was handled twice...
        again = [seq for run in again_by_run for seq in run]
        assert all(seq > floor.get(name, 0) for seq in again), f"handled again: {again}; {where}"
        # ...and the second flow resumed exactly from the logged checkpoint.
        resumed = handled[marks[name]]
        assert resumed == min(seq for seq in expected if seq > checkpoints[name]), (
            f"the second flow resumed at {resumed}; {where}"
        )
    print(f"{record.summary()}; checkpoints {checkpoints}, floor {floor}, {statistics}")


@pytest.mark.slow
async def test_a_transactional_projection_and_an_outbox_ride_out_server_crashes(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The server is killed (``-m immediate``) twice under a process running a
    transactional projection and an outbox: each event's effect applied once, with
    its cursor; every order with its event, none rolled back; nothing lost."""
    schema = f"tf_faults_{uuid.uuid4().hex[:12]}"
    url = cluster.url(schema=schema, poll_interval=0.2, connect_timeout=5, pool_max_size=4)
    logs = tmp_path / "logs"
    logs.mkdir()
    rng = random.Random(7)
    context = f"logs in {tmp_path}"
    with trio.fail_after(240):
        async with running(
            "projection_child.py",
            url,
            logs,
            1,
            rng.randrange(2**32),
            0.05,
            "--finish",
            "--ride-out",
            f'--tables="{schema}".',
            stderr=tmp_path / "child.stderr",
        ) as child:
            await child.expect_line("ready", limit=60)
            for _ in range(2):
                await trio.sleep(rng.uniform(0.5, 1.5))
                await cluster.stop("immediate")
                await trio.sleep(OUTAGE)
                await cluster.start()
            output = await child.finish(limit=180)
    assert output.split() == ["idle"], context
    async with open_admin(cluster.url()) as admin:
        state = await read_projection(admin, schema)
    check_projection_state(state, logs, context, final=True)
    assert state.effects, f"the projection applied nothing; {context}"
