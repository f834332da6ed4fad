"""Crash recovery and many processes, with real processes on PostgreSQL.

The same checks as tests/test_crash.py and tests/test_multiprocess.py make on
SQLite, on the test server (a fresh schema per test): flows in child processes
(``tests/_children``) are SIGKILLed at random moments and restarted, also
while their consumers dead-letter poison events, and with batch consumers;
three publisher processes and a consumer process share one schema. The
store, read directly, is the ground truth the children's logs are checked
against (see ``tests/_procs.py``).

Unlike SQLite, PostgreSQL finishes a statement whose client was killed: an
append in flight at the kill may still commit a moment later. Before reading
the store after a kill, the test waits until the killed child's server
sessions (tagged with an ``application_name`` per run) are gone.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from hypothesis import given

from tests._procs import (
    PROCESS_EXAMPLES,
    OutboxPlans,
    ProjectionState,
    Row,
    check_consumer_rows,
    check_crash_state,
    kill_at_random,
    outbox_plans,
    run_outbox_publishers,
    run_together,
    running,
    sigkill_batch_consumers,
    sigkill_projection,
    sigkill_while_dead_lettering,
    sigkill_while_recording_dead_letters,
)
from tests.postgres._server import open_admin, wait_sessions_gone
from trioflow.stores.postgres._driver import Driver

pytestmark = pytest.mark.slow

#: ``TRIOFLOW_CRASH_SEED=<n>`` reruns the crash test with one seed only.
SEEDS = [int(os.environ["TRIOFLOW_CRASH_SEED"])] if "TRIOFLOW_CRASH_SEED" in os.environ else [1, 2]
TOTAL = 2000
KILLS = 6
#: Mean seconds between a child's publish calls, so a run publishes a part only.
PACE = 0.02
#: Events the dead-lettering flow publishes over all its runs.
POISON_TOTAL = 1200


async def read_store(
    admin: Driver, schema: str
) -> tuple[list[tuple[int, str, int]], dict[str, int]]:
    """Return every event as (seq, type, counter), in seq order, and the (logged) cursors."""
    rows = await admin.fetch(f'SELECT seq, type, data FROM "{schema}".events ORDER BY seq')
    events = [(row[0], row[1], int(json.loads(row[2])["n"])) for row in rows]
    cursors = {
        row[0]: row[1] for row in await admin.fetch(f'SELECT consumer, seq FROM "{schema}".cursors')
    }
    return events, cursors


async def check_state(
    admin: Driver, schema: str, logs: Path, context: str, *, total: int | None = None
) -> None:
    events, cursors = await read_store(admin, schema)
    check_crash_state(events, cursors, logs, context, total=total, holes=True)


def tagged_runs(
    make_url: Callable[..., str], admin: Driver, name: str, **options: object
) -> tuple[Callable[[int], str], Callable[[int], Awaitable[None]]]:
    """A storm's ``child_url`` and ``settle``: run ``n`` opens a URL with
    ``options`` whose ``application_name`` tags it, and its settle waits until
    the sessions so tagged are gone."""
    prefix = f"tf-{name}-{uuid.uuid4().hex[:12]}"

    def child_url(run: int) -> str:
        return make_url(application_name=f"{prefix}-{run}", **options)

    async def settle(run: int) -> None:
        await wait_sessions_gone(admin, f"{prefix}-{run}")

    return child_url, settle


@pytest.mark.parametrize("seed", SEEDS)
async def test_sigkill_loses_nothing_and_redelivers_at_most_commit_every(
    tmp_path: Path, seed: int, make_url: Callable[..., str], schema: str, admin: Driver
) -> None:
    rng = random.Random(seed)
    logs = tmp_path / "logs"
    logs.mkdir()
    context = (
        f"seed {seed} (rerun: TRIOFLOW_CRASH_SEED={seed}); logs in {tmp_path}, schema {schema}"
    )
    prefix = f"tf-crash-{uuid.uuid4().hex[:12]}"
    for run in range(KILLS):
        tag = f"{prefix}-{run}"
        url = make_url(schema=schema, poll_interval=0.2, application_name=tag)
        stderr = tmp_path / f"run{run}.stderr"
        async with running(
            "crash_child.py", url, logs, TOTAL, rng.randrange(2**32), PACE, stderr=stderr
        ) as child:
            await kill_at_random(child, rng, ready=run == 0)
        await wait_sessions_gone(admin, tag)
        await check_state(admin, schema, logs, f"after kill {run}; {context}")
    async with running(
        "crash_child.py",
        make_url(schema=schema, poll_interval=0.2),
        logs,
        TOTAL,
        rng.randrange(2**32),
        PACE,
        "--finish",
        stderr=tmp_path / "final.stderr",
    ) as child:
        output = await child.finish(limit=120)
    assert output.split() == ["ready", "idle"], context
    await check_state(admin, schema, logs, f"after the final run; {context}", total=TOTAL)


async def test_three_publisher_processes_and_a_consumer_process(
    tmp_path: Path, make_url: Callable[..., str], schema: str, admin: Driver
) -> None:
    count = 700
    publishers = ("p1", "p2", "p3")
    # Notifications wake the consumer process; polling is only the fallback.
    url = make_url(schema=schema, poll_interval=1.0)
    logs = tmp_path / "logs"
    logs.mkdir()
    context = f"logs in {tmp_path}, schema {schema}"
    async with running(
        "consumer_child.py",
        url,
        logs,
        len(publishers) * count,
        stderr=tmp_path / "consumer.stderr",
    ) as consumer:
        # The consumer process creates the schema; the publishers open it after.
        await consumer.expect_line("ready", limit=30)
        await run_together(
            tmp_path,
            {
                name: ("publisher_child.py", url, name, count, seed)
                for seed, name in enumerate(publishers)
            },
        )
        await consumer.finish(limit=60)
    rows = await admin.fetch(f'SELECT seq, data FROM "{schema}".events ORDER BY seq')
    events: list[Row] = [
        (row[0], json.loads(row[1])["pub"], json.loads(row[1])["n"]) for row in rows
    ]
    assert len(events) == len(publishers) * count, context
    seqs = [seq for seq, _, _ in events]
    assert seqs == sorted(set(seqs)), context
    for name in publishers:
        counters = [n for _, pub, n in events if pub == name]
        assert counters == list(range(count)), f"{name}'s events out of order; {context}"
    # The publishers' appends interleaved: this was a test of concurrent writers.
    switches = sum(1 for a, b in itertools.pairwise(events) if a[1] != b[1])
    assert switches >= len(publishers), f"the publishers' events never interleaved; {context}"
    check_consumer_rows(logs, ("plain", "bounded"), events, context)


async def test_sigkill_while_recording_dead_letters_keeps_each_with_its_cursor(
    tmp_path: Path, make_url: Callable[..., str], schema: str, admin: Driver
) -> None:
    child_url, settle = tagged_runs(make_url, admin, "dead", schema=schema)

    await sigkill_while_recording_dead_letters(
        make_url(schema=schema), child_url, tmp_path, seed=1, settle=settle
    )


@pytest.mark.parametrize("seed", SEEDS)
async def test_sigkill_while_a_flow_dead_letters_poison_events_loses_none(
    tmp_path: Path, seed: int, make_url: Callable[..., str], schema: str, admin: Driver
) -> None:
    child_url, settle = tagged_runs(make_url, admin, "poison", schema=schema, poll_interval=0.2)

    await sigkill_while_dead_lettering(
        make_url(schema=schema),
        child_url,
        tmp_path,
        seed=seed,
        total=POISON_TOTAL,
        holes=True,
        kills=KILLS,
        settle=settle,
    )


@pytest.mark.parametrize("seed", SEEDS)
async def test_sigkill_among_batches_loses_nothing_and_redoes_at_most_commit_every_batches(
    tmp_path: Path, seed: int, make_url: Callable[..., str], schema: str, admin: Driver
) -> None:
    child_url, settle = tagged_runs(make_url, admin, "batches", schema=schema, poll_interval=0.2)

    await sigkill_batch_consumers(
        make_url(schema=schema), child_url, tmp_path, seed=seed, holes=True, settle=settle
    )


async def read_projection(admin: Driver, schema: str) -> ProjectionState:
    """What ``projection_child.py`` left in ``schema``."""
    rows = await admin.fetch(f'SELECT seq, type, data FROM "{schema}".events ORDER BY seq')
    cursor = await admin.fetchval(
        f"SELECT coalesce(max(seq), 0) FROM \"{schema}\".cursors WHERE consumer = 'projection'"
    )
    totals = await admin.fetchrow(f'SELECT total, handled FROM "{schema}".totals')
    effects = await admin.fetch(f'SELECT seq, amount FROM "{schema}".effects ORDER BY applied')
    orders = await admin.fetch(f'SELECT id, amount FROM "{schema}".orders')
    assert totals is not None
    return ProjectionState(
        events=[(row[0], row[1], json.loads(row[2])) for row in rows],
        cursor=cursor,
        effects=[(row[0], row[1]) for row in effects],
        totals=(totals[0], totals[1]),
        orders={row[0]: row[1] for row in orders},
    )


@pytest.mark.parametrize("commit_every", [1, 10])
async def test_sigkill_storm_on_a_transactional_projection_applies_each_event_once(
    tmp_path: Path, commit_every: int, make_url: Callable[..., str], schema: str, admin: Driver
) -> None:
    child_url, settle = tagged_runs(make_url, admin, "projection", schema=schema, poll_interval=0.2)

    await sigkill_projection(
        child_url,
        lambda: read_projection(admin, schema),
        tmp_path,
        seed=SEEDS[0],
        commit_every=commit_every,
        kills=8,
        tables=f'"{schema}".',
        settle=settle,
    )


@PROCESS_EXAMPLES
@given(plans=outbox_plans())
def test_outbox_processes_never_show_a_consumer_a_rolled_back_event_or_a_gap_filled_late(
    plans: OutboxPlans,
    tmp_path_factory: pytest.TempPathFactory,
    pg_url: str,
    make_url: Callable[..., str],
    new_schema: Callable[[], str],
) -> None:
    tmp_path = tmp_path_factory.mktemp("outbox")
    schema = new_schema()
    url = make_url(schema=schema, poll_interval=1.0)

    async def read() -> list[Row]:
        async with open_admin(pg_url) as admin:
            rows = await admin.fetch(f'SELECT seq, data FROM "{schema}".events ORDER BY seq')
        return [(row[0], json.loads(row[1])["pub"], json.loads(row[1])["n"]) for row in rows]

    # Notifications wake the consumer process; polling is only the fallback.
    trio.run(run_outbox_publishers, url, url, plans, tmp_path, read)
