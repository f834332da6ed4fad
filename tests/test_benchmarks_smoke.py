"""The benchmark harness runs end to end on tiny inputs, and its correctness check bites.

No timing is asserted: these only guard the code path that
``python -m benchmarks run fanout`` takes.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
from pathlib import Path

import pytest
import trio

import trioflow
from benchmarks import _readers, asyncpg_fanout, fanout
from benchmarks.__main__ import main
from benchmarks._effects import effect_problems
from benchmarks._harness import BenchmarkFailed
from benchmarks._stores import POSTGRES_URL_VARIABLE, STORES, fresh_postgres_schema
from tests._servers import server_missing

FLOW_CASES = ("publish-many", "publish-many-commit1", "batch", "publish-tasks")
#: The cases of transactional consumers, on the stores that run transactions.
TX_CASES = ("tx", "tx-commit1")
POSTGRES_STORES = ("postgres", "postgres-async", "postgres-unlogged")


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_fanout_runs_and_passes_its_check(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if store == "sqlite":
        pytest.importorskip("trioflow.stores.sqlite")
    out = tmp_path / "fanout.json"
    argv = ["run", "fanout", "--store", store, "--events", "200", "--consumers", "2"]
    argv += ["--repeat", "1", "--publishers", "8", "--batch-size", "64", "--json", str(out)]

    # 1 would mean a correctness check failed: an event lost, repeated or reordered.
    assert main(argv) == 0

    captured = capsys.readouterr()
    assert "BENCHMARK FAILED" not in captured.err
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["command"] == "python -m benchmarks " + " ".join(argv)
    assert report["reference_case"] == "raw"
    assert {"python", "trio", "cpu_count"} <= set(report["machine"])
    ran = {(result["case"], result["store"]) for result in report["results"]}
    cases = FLOW_CASES + (TX_CASES if store == "sqlite" else ())
    assert ran == {("raw", None), ("raw-batch", None)} | {(case, store) for case in cases}
    for result in report["results"]:
        assert (result["consumers"], result["events"], len(result["runs"])) == (2, 200, 1)
        assert result["median"]["delivered_per_s"] > 0
        assert result["median"]["publish_per_s"] > 0
        assert f"| {result['case']} " in captured.out


def test_case_selection_keeps_the_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fanout.json"
    argv = ["run", "fanout", "--events", "50", "--repeat", "1", "--case", "publish-tasks"]
    assert main([*argv, "--json", str(out)]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert [result["case"] for result in report["results"]] == ["raw", "publish-tasks"]
    assert report["results"][0]["ratio_to_reference"]["delivered_per_s"] == 1.0

    with pytest.raises(SystemExit) as exit_info:
        main(["run", "fanout", "--case", "no-such-case"])
    assert exit_info.value.code == 2
    assert "unknown case no-such-case" in capsys.readouterr().err


async def test_check_catches_lost_repeated_and_reordered_events() -> None:
    events = fanout.make_events(fanout.make_data(5))
    feeds = {
        "complete": [1, 2, 3, 4, 5],
        "lost": [1, 2, 4, 5],
        "repeated": [1, 2, 2, 3, 4, 5],
        "reordered": [1, 3, 2, 4, 5],
        "short": [1, 2, 3, 4],
    }
    tallies = {name: fanout.Tally() for name in feeds}
    for name, seqs in feeds.items():
        for seq in seqs:
            await tallies[name].handle(events[seq - 1])

    fanout.check_tallies([tallies["complete"]], 5, what="complete")
    for name in feeds.keys() - {"complete"}:
        with pytest.raises(BenchmarkFailed, match=r"consumer 1 handled"):
            fanout.check_tallies([tallies["complete"], tallies[name]], 5, what=name)


def test_a_run_that_never_finishes_fails() -> None:
    with pytest.raises(BenchmarkFailed, match=r"timed out after 0.05s.*consumer 0 handled 0"):
        fanout._run_within(0.05, [fanout.Tally()], 1, "stuck", trio.sleep_forever)


@pytest.fixture
def bench_postgres(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the benchmarks at the PostgreSQL test server; skip (fail if CI=true) without one."""
    if not os.environ.get(POSTGRES_URL_VARIABLE) and os.environ.get("TRIOFLOW_TEST_POSTGRES_URL"):
        monkeypatch.setenv(POSTGRES_URL_VARIABLE, os.environ["TRIOFLOW_TEST_POSTGRES_URL"])
    problem = STORES["postgres"].unavailable()
    if problem is not None:
        server_missing(f"PostgreSQL benchmark server unavailable: {problem}")


@pytest.mark.postgres
@pytest.mark.usefixtures("bench_postgres")
def test_fanout_on_postgres_runs_next_to_the_hand_written_program(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fanout.json"
    argv = ["run", "fanout", "--events", "200", "--consumers", "2", "--repeat", "1"]
    argv += ["--publishers", "8", "--batch-size", "64", "--commit-every", "10"]
    for store in POSTGRES_STORES:
        argv += ["--store", store]

    assert main([*argv, "--json", str(out)]) == 0

    captured = capsys.readouterr()
    assert "BENCHMARK FAILED" not in captured.err
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["machine"]["postgresql"]
    results = {(result["case"], result["store"]): result for result in report["results"]}
    for store in POSTGRES_STORES:
        for case, baseline in [
            ("asyncpg", "asyncpg"),
            ("asyncpg-commit1", "asyncpg-commit1"),
            ("publish-many", "asyncpg"),
            ("publish-tasks", "asyncpg"),
            ("publish-many-commit1", "asyncpg-commit1"),
            ("batch", "asyncpg"),
            ("asyncpg-tx", "asyncpg-tx"),
            ("tx", "asyncpg-tx"),
            ("asyncpg-tx-commit1", "asyncpg-tx-commit1"),
            ("tx-commit1", "asyncpg-tx-commit1"),
        ]:
            result = results[case, store]
            assert result["baseline_case"] == baseline
            assert result["ratio_to_baseline"]["delivered_per_s"] > 0
            assert (result["consumers"], result["events"], len(result["runs"])) == (2, 200, 1)
        durability = STORES[store].options["cursor_durability"]
        assert results["asyncpg", store]["params"]["cursor_durability"] == durability
        assert results["asyncpg", store]["params"]["commit_every"] == 10
        assert results["asyncpg-commit1", store]["params"]["commit_every"] == 1
        # A transaction's cursor is as durable as its commit, whatever the store's option.
        for case, every in [("asyncpg-tx", 10), ("asyncpg-tx-commit1", 1)]:
            params = results[case, store]["params"]
            assert (params["cursor_durability"], params["commit_every"]) == ("sync", every)
            assert params["transactional"]
        assert results["tx-commit1", store]["params"]["commit_every"] == 1
        assert results["batch", store]["params"]["consumer_batch"] == 1000
        # The ceilings: the COPY writer alone (no consumers, no delivered figure) and
        # the bytes-only readers, each the 1.00 of its own column.
        copy, raw_readers = results["copy", store], results["asyncpg-bytes", store]
        assert (copy["consumers"], copy["params"]["readers"]) == (0, 0)
        assert "delivered_per_s" not in copy["median"]
        assert copy["median"]["publish_per_s"] > 0
        assert copy["comparisons"]["copy"]["ratio"] == 1.0
        assert raw_readers["params"]["bytes_only"]
        assert raw_readers["comparisons"]["bytes"]["ratio"] == 1.0
        for case in ("publish-many", "publish-tasks"):
            comparisons = results[case, store]["comparisons"]
            assert comparisons["copy"]["case"] == "copy"
            assert comparisons["copy"]["metric"] == "publish_per_s"
            assert comparisons["copy"]["ratio"] > 0
            assert comparisons["bytes"]["case"] == "asyncpg-bytes"
            assert comparisons["bytes"]["ratio"] > 0
    assert "| vs hand-written |" in captured.out
    assert "| publish vs COPY | vs bytes-only |" in captured.out
    assert "| asyncpg-commit1      | postgres-unlogged |" in captured.out


@pytest.mark.postgres
@pytest.mark.usefixtures("bench_postgres")
def test_the_bytes_only_readers_are_handed_the_data_undecoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    given: list[object] = []

    async def note(self: object, order: int, data: object) -> None:
        given.append(data)

    monkeypatch.setattr(_readers.Tally, "handle", note)
    argv = ["--events", "10", "--readers", "2", "--batch-size", "4", "--bytes-only"]
    with fresh_postgres_schema() as (url, schema):
        args = asyncpg_fanout.build_parser().parse_args(
            [*argv, f"--url={url}", f"--schema={schema}"]
        )
        asyncio.run(asyncpg_fanout.run(args))
    assert len(given) == 20
    first = given[0]
    assert isinstance(first, bytes)
    assert all(isinstance(data, bytes) for data in given)
    assert json.loads(first) == fanout.make_data(1)[0]


def test_the_effect_row_check_wants_one_row_per_event() -> None:
    def count(total: int, seqs: int, low: int, high: int) -> dict[str, int]:
        return {"total": total, "seqs": seqs, "low": low, "high": high}

    assert effect_problems([count(5, 5, 1, 5)], 5) == []
    for wrong in [count(4, 4, 1, 5), count(6, 5, 1, 5), count(5, 5, 2, 6), count(0, 0, 0, 0)]:
        problems = effect_problems([count(5, 5, 1, 5), wrong], 5)
        assert len(problems) == 1
        assert problems[0].startswith("effect table 1 holds")


class _PlantedEffects(fanout.EffectWriter):
    """Inserts seq 3's effect row ``copies`` times (0: none), every other row once."""

    def __init__(self, tally: fanout.Tally, table: str, *, copies: int) -> None:
        super().__init__(tally, table)
        self.copies = copies

    async def handle(self, event: trioflow.Event, tx: trioflow.Transaction) -> None:
        await self.tally.handle(event)
        for _ in range(self.copies if event.seq == 3 else 1):
            await tx.execute(self.insert, event.seq, event.data["total_cents"])


@pytest.mark.parametrize("copies", [1, 0, 2])
def test_a_transactional_case_fails_when_an_effect_row_is_missing_or_doubled(
    copies: int,
) -> None:
    pytest.importorskip("trioflow.stores.sqlite")
    items = [(fanout.EVENT_TYPE, item) for item in fanout.make_data(10)]
    variant = fanout._FlowVariant(
        id="tx", description="", commit_every=4, batches=[items], transactional=True
    )
    planted = functools.partial(_PlantedEffects, copies=copies)
    tallies = [fanout.Tally(), fanout.Tally()]
    with STORES["sqlite"].fresh() as store:
        run = functools.partial(fanout._flow_run, store, variant, tallies, "planted", planted)
        if copies == 1:
            assert fanout._run_within(60, tallies, 10, "planted", run)["delivered_per_s"] > 0
        else:
            # Every consumer's handler is planted; the message names each table.
            with pytest.raises(BenchmarkFailed, match=r"planted: effect table 0 holds .*; effect"):
                fanout._run_within(60, tallies, 10, "planted", run)


@pytest.mark.postgres
@pytest.mark.usefixtures("bench_postgres")
@pytest.mark.parametrize("copies", [1, 0, 2])
def test_the_hand_written_effect_check_fails_when_a_row_is_missing_or_doubled(
    copies: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    def planted(table: str, paramstyle: str) -> str:
        # seq 3's row inserted `copies` times, every other row once.
        return (
            f"INSERT INTO {table} (seq, total_cents) SELECT $1, $2 FROM generate_series(1, "
            f"CASE WHEN $1 = 3 THEN {copies} ELSE 1 END)"
        )

    monkeypatch.setattr(asyncpg_fanout, "insert_sql", planted)
    argv = ["--events", "10", "--readers", "2", "--batch-size", "4", "--commit-every", "3"]
    with fresh_postgres_schema() as (url, schema):
        args = asyncpg_fanout.build_parser().parse_args(
            [*argv, "--effects", f"--url={url}", f"--schema={schema}"]
        )
        outcome = asyncio.run(asyncpg_fanout.run(args))
    problems = outcome["problems"]
    assert isinstance(problems, list)
    if copies == 1:
        assert problems == []
    else:
        assert [problem.split(" holds")[0] for problem in problems] == [
            "effect table 0",
            "effect table 1",
        ]


def test_an_unreachable_postgres_server_is_skipped_with_a_line_saying_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("trioflow.stores.postgres")
    # Port 1 on the loopback interface: nothing listens there, the refusal is immediate.
    monkeypatch.setenv(POSTGRES_URL_VARIABLE, "postgresql://postgres@127.0.0.1:1/test")
    out = tmp_path / "fanout.json"
    argv = ["run", "fanout", "--store", "memory", "--store", "postgres", "--events", "50"]
    argv += ["--repeat", "1", "--case", "publish-many", "--json", str(out)]

    assert main(argv) == 0

    captured = capsys.readouterr()
    assert "skipping store 'postgres': cannot connect to PostgreSQL" in captured.err
    assert POSTGRES_URL_VARIABLE in captured.err
    report = json.loads(out.read_text(encoding="utf-8"))
    assert set(report["skipped_stores"]) == {"postgres"}
    assert {result["store"] for result in report["results"]} == {None, "memory"}
    assert "vs hand-written" not in captured.out
