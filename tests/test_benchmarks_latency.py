"""The latency workload runs end to end on tiny inputs, in and across processes; its checks bite.

No timing is asserted: these only guard the code path that
``python -m benchmarks run latency`` takes.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest

import trioflow
from benchmarks import asyncpg_latency, latency
from benchmarks.__main__ import main
from benchmarks._data import Data, make_data
from benchmarks._harness import BenchmarkFailed
from benchmarks._stores import STORES, fresh_postgres_schema
from benchmarks.fanout import make_events

# The fixture, by its name: it points the benchmarks at the PostgreSQL test server.
from tests.test_benchmarks_smoke import bench_postgres  # noqa: F401

FIGURES = {"p50_ms", "p99_ms", "p999_ms", "max_ms", "achieved_per_s", "p99_vs_raw", "samples"}


def _run(
    argv: list[str], out: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[dict[str, Any], str]:
    # 1 would mean a correctness check failed: an event lost, repeated or reordered.
    assert main([*argv, "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "BENCHMARK FAILED" not in captured.err
    return json.loads(out.read_text(encoding="utf-8")), captured.out


def _check_layout(
    report: dict[str, Any],
    store: str,
    *,
    cross_process: bool,
    table: str,
    hand_written: bool = False,
) -> None:
    results = {(result["case"], result["store"]): result for result in report["results"]}
    expected = {("raw@200", None), ("in-process@200", store)}
    if cross_process:
        expected.add(("cross-process@200", store))
    if hand_written:
        expected.add(("asyncpg@200", store))
    assert set(results) == expected
    assert report["reference_case"] == "raw@200"
    for (case, _), result in results.items():
        # --events 1000 capped by --rate 200 * --seconds 0.15: 30 events a run.
        assert (result["consumers"], result["events"], len(result["runs"])) == (2, 30, 1)
        assert set(result["median"]) >= FIGURES
        # Two consumers, 30 events each, the first 5 of each left out (--warmup 5).
        assert result["median"]["samples"] == 2 * (30 - 5)
        assert 0 < result["median"]["p50_ms"] <= result["median"]["p99_ms"]
        assert result["median"]["p99_ms"] <= result["median"]["p999_ms"]
        assert result["median"]["p999_ms"] <= result["median"]["max_ms"]
        assert result["ratio_to_reference"]["p99_vs_raw"] > 0
        assert result["params"]["warmup"] == 5
        assert f"| {case} " in table
    assert results["raw@200", None]["median"]["p99_vs_raw"] == 1.0
    assert results["in-process@200", store]["params"]["process"] == "same"
    if cross_process:
        cross = results["cross-process@200", store]
        assert cross["params"]["process"] == "child"
        assert cross["baseline_case"] == "in-process@200"
        assert cross["ratio_to_baseline"]["p99_vs_raw"] > 0
        assert "| vs in-process |" in table
    for case in ["in-process@200", "cross-process@200"][: 2 if cross_process else 1]:
        comparisons = results[case, store]["comparisons"]
        if not hand_written:
            assert comparisons == {}
            continue
        # trioflow's p99 and p99.9 over the hand-written program's, at the same rate.
        assert comparisons["asyncpg"]["case"] == "asyncpg@200"
        assert comparisons["asyncpg"]["metric"] == "p99_ms"
        assert comparisons["asyncpg_p999"]["metric"] == "p999_ms"
        ours, theirs = results[case, store]["median"], results["asyncpg@200", store]["median"]
        assert comparisons["asyncpg"]["ratio"] == ours["p99_ms"] / theirs["p99_ms"]
        assert comparisons["asyncpg_p999"]["ratio"] == ours["p999_ms"] / theirs["p999_ms"]
    if hand_written:
        assert results["asyncpg@200", store]["params"]["program"] == "benchmarks.asyncpg_latency"
        assert "| p99 vs asyncpg | p99.9 vs asyncpg |" in table
    else:
        assert "vs asyncpg" not in table


ARGV = ["run", "latency", "--events", "1000", "--consumers", "2", "--repeat", "1"]
ARGV += ["--rate", "200", "--seconds", "0.15", "--warmup", "5", "--timeout", "60"]


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_latency_runs_and_passes_its_checks(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if store == "sqlite":
        pytest.importorskip("trioflow.stores.sqlite")
    report, table = _run([*ARGV, "--store", store], tmp_path / "latency.json", capsys)
    # The memory store lives in one process: no cross-process case for it.
    _check_layout(report, store, cross_process=store != "memory", table=table)


@pytest.mark.postgres
@pytest.mark.usefixtures("bench_postgres")
def test_latency_runs_on_postgres(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report, table = _run([*ARGV, "--store", "postgres"], tmp_path / "latency.json", capsys)
    _check_layout(report, "postgres", cross_process=True, table=table, hand_written=True)
    assert report["machine"]["postgresql"]


def test_await_mode_and_poll_interval_are_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("trioflow.stores.sqlite")
    argv = [*ARGV, "--store", "sqlite", "--publish", "await", "--poll-interval", "0.02"]
    argv += ["--case", "cross-process@200"]
    report, _ = _run(argv, tmp_path / "latency.json", capsys)
    results = {result["case"]: result for result in report["results"]}
    # The cross-process case keeps its raw reference and the in-process case it is compared with.
    assert set(results) == {"raw@200", "in-process@200", "cross-process@200"}
    assert results["cross-process@200"]["params"]["publish"] == "await"
    assert results["cross-process@200"]["params"]["poll_interval"] == 0.02


def test_gc_freeze_runs_twins_compared_with_the_unfrozen_cases(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("trioflow.stores.sqlite")
    argv = [*ARGV, "--store", "sqlite", "--gc-freeze", "--case", "cross-process+gc-freeze@200"]
    report, table = _run(argv, tmp_path / "latency.json", capsys)
    results = {result["case"]: result for result in report["results"]}
    assert {"raw@200", "in-process+gc-freeze@200", "cross-process@200"} <= set(results)
    frozen = results["cross-process+gc-freeze@200"]
    assert frozen["params"]["gc_freeze"]
    assert "gc_freeze" not in results["cross-process@200"]["params"]
    assert frozen["baseline_case"] == "in-process+gc-freeze@200"
    assert frozen["comparisons"]["unfrozen"]["case"] == "cross-process@200"
    assert frozen["comparisons"]["unfrozen_p999"]["metric"] == "p999_ms"
    assert "| p99 vs unfrozen | p99.9 vs unfrozen |" in table
    # The in-process twin froze this process for its run only.
    assert gc.get_freeze_count() == 0


def test_a_warmup_as_long_as_a_run_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", "latency", "--events", "30", "--rate", "1000", "--warmup", "30"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "--warmup must be" in capsys.readouterr().err


def test_percentiles_are_nearest_rank() -> None:
    ordered = list(range(1, 101))
    assert latency.percentile(ordered, 0.5) == 50
    assert latency.percentile(ordered, 0.99) == 99
    assert latency.percentile(ordered, 0.999) == 100
    assert latency.percentile([7], 0.001) == 7


async def _fed(seqs: list[int], events: list[trioflow.Event]) -> latency.LatencyTally:
    tally = latency.LatencyTally()
    for seq in seqs:
        await tally.handle(events[seq - 1])
    return tally


PACING = latency.Pacing(events=5, rate=1000.0, seconds=0.004, late=0.0)


@pytest.mark.parametrize(
    "seqs", [[1, 2, 4, 5], [1, 2, 2, 3, 4, 5], [1, 3, 2, 4, 5], [1, 2, 3, 4]], ids=str
)
async def test_a_consumer_that_missed_repeated_or_reordered_an_event_fails(
    seqs: list[int],
) -> None:
    data = make_data(5)
    for item in data:
        item[latency.STAMP] = latency.now_ns()
    events = make_events(data)
    complete = await _fed([1, 2, 3, 4, 5], events)
    assert latency.summarize([complete], PACING, warmup=0, what="x")["samples"] == 5

    wrong = await _fed(seqs, events)
    with pytest.raises(BenchmarkFailed, match=r"consumer 1 handled"):
        latency.summarize([complete, wrong], PACING, warmup=0, what="x")

    # The child's report goes through the same check.
    tallies, cursors, _ = latency.read_child_report(
        latency.child_report([complete, wrong], {"consumer-0": 5, "consumer-1": 5})
    )
    assert tallies[1].samples == wrong.samples
    latency.check_cursors(cursors, 5, what="x")
    with pytest.raises(BenchmarkFailed, match=r"consumer 1 handled"):
        latency.summarize(tallies, PACING, warmup=0, what="x")


def test_a_cursor_short_of_n_fails() -> None:
    with pytest.raises(BenchmarkFailed, match=r"committed cursors \{'consumer-1': 4\}"):
        latency.check_cursors({"consumer-0": 5, "consumer-1": 4}, 5, what="x")


def test_an_event_never_published_fails_the_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stamped = latency._stamped_publish

    def losing(flow: trioflow.Flow, stamps: dict[int, int]) -> Callable[[Data], Awaitable[None]]:
        publish = stamped(flow, stamps)

        async def lose_the_third(item: Data) -> None:
            if item["order"] != 3:
                await publish(item)

        return lose_the_third

    monkeypatch.setattr(latency, "_stamped_publish", losing)
    argv = ["run", "latency", "--events", "10", "--consumers", "2", "--repeat", "1"]
    assert main([*argv, "--rate", "1000"]) == 1
    assert "BENCHMARK FAILED: trioflow in-process@1000 on memory" in capsys.readouterr().err


def test_a_cross_process_run_that_times_out_kills_the_child() -> None:
    pytest.importorskip("trioflow.stores.sqlite")
    # 100 events at 1 event/s cannot be done within the 2 s allowed.
    plan = latency._Plan(rate=1.0, data=make_data(100), spawn=True)
    for item in plan.data:
        item[latency.STAMP] = 0
    with pytest.raises(BenchmarkFailed, match=r"timed out after 2s; child process \d+ killed") as e:
        latency._cross_process_run(
            STORES["sqlite"],
            plan,
            consumers=1,
            timeout=2.0,
            warmup=0,
            poll_interval=None,
            what="stuck",
        )
    pid = int(str(e.value).rsplit("process ", 1)[1].split()[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_child_that_failed_is_reported_with_its_stderr() -> None:
    crashed = latency._ChildRun(
        said=b"",
        completed=subprocess.CompletedProcess(["child"], 1, None, b"Traceback\nStoreError: no"),
    )
    assert "said b'', not 'ready', and exited with status 1: Traceback\nStoreError: no" in str(
        crashed.failure("x")
    )
    pacing = latency.Pacing(events=1, rate=1.0, seconds=0.0, late=0.0)
    failed = attrs.evolve(crashed, pacing=pacing)
    assert "exited with status 1" in str(failed.failure("x"))
    ok = attrs.evolve(
        failed, completed=subprocess.CompletedProcess(["child"], 0, None, b""), said=b"ready"
    )
    assert ok.failure("x") is None


@pytest.mark.postgres
@pytest.mark.usefixtures("bench_postgres")
@pytest.mark.parametrize("skipped", [None, 3])
def test_the_hand_written_program_fails_when_a_reader_skips_an_event(
    skipped: int | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[asyncpg_latency.LatencyTally] = []

    class Skipping(asyncpg_latency.LatencyTally):
        """The second reader's handler is not called for seq ``skipped``."""

        async def handle(self, order: int, data: object) -> None:
            if order != skipped or self is not made[1]:
                await super().handle(order, data)

    def make() -> asyncpg_latency.LatencyTally:
        made.append(Skipping())
        return made[-1]

    monkeypatch.setattr(asyncpg_latency, "LatencyTally", make)
    out = tmp_path / "samples.json"
    argv = ["--events", "10", "--readers", "2", "--rate", "500", f"--out={out}"]
    with fresh_postgres_schema() as (url, schema):
        args = asyncpg_latency.build_parser().parse_args(
            [*argv, f"--url={url}", f"--schema={schema}"]
        )
        outcome = asyncio.run(asyncpg_latency.run(args))
    # The program's own check (its exit status), then the harness's on its samples.
    tallies, cursors, stages = latency.read_child_report(out.read_text(encoding="utf-8"))
    seconds = outcome["publish_s"]
    assert isinstance(seconds, float)
    pacing = latency.Pacing(events=10, rate=500.0, seconds=seconds, late=0.0)
    latency.check_cursors(cursors, 10, what="x")
    assert stages is not None
    assert len(stages["stamps"]) == 10
    if skipped is None:
        assert outcome["problems"] == []
        assert latency.summarize(tallies, pacing, warmup=0, what="x")["samples"] == 20
    else:
        assert outcome["problems"] == [
            "reader 1 handled 9 events ending at 10 with 1 out of order (expected 1..10 in order)"
        ]
        with pytest.raises(BenchmarkFailed, match=r"but consumer 1 handled 9 events"):
            latency.summarize(tallies, pacing, warmup=0, what="x")


@pytest.mark.postgres
@pytest.mark.usefixtures("bench_postgres")
def test_stages_split_the_latency_in_and_across_processes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*ARGV, "--store", "postgres", "--stages"]
    report, _ = _run(argv, tmp_path / "latency.json", capsys)
    results = {result["case"]: result for result in report["results"]}
    in_process = {"queue", "append", "deliver"}
    across = {"queue", "append_notify", "poll", "read", "deliver"}
    # The hand-written program's commit wait, commit, and notification with the read.
    cases = [("in-process@200", in_process), ("cross-process@200", across)]
    for case, stages in [*cases, ("asyncpg@200", in_process)]:
        figures = results[case]["median"]
        assert results[case]["params"]["stages"]
        for stage in stages:
            assert figures[f"{stage}_p50_ms"] >= 0
            assert figures[f"{stage}_tail_ms"] >= 0
        assert {"gc_tail_ms", "gc_pause_max_ms"} <= set(figures)
    assert "queue_p50_ms" not in results["raw@200"]["median"]


def test_a_stage_breakdown_adds_up_to_each_delivery() -> None:
    from benchmarks._stages import breakdown

    ms = 1_000_000
    # Three events: published at 0, 1 and 2 ms; appended together from 3 to 5 ms;
    # the consumers' process notified at 6 ms, read from 7 to 8 ms, handled at 9 ms,
    # but event 3 at 30 ms (the tail, with a 2 ms collection in it). A 10 ms
    # collection before the first publish is not the measurement's.
    stamps = {1: 0, 2: 1 * ms, 3: 2 * ms}
    samples = [[9 * ms, 8 * ms, 28 * ms]]
    figures = breakdown(
        stamps=stamps,
        samples=samples,
        warmup=0,
        appends=[(3 * ms, 5 * ms, 1, 3)],
        reads=[(7 * ms, 8 * ms, 1, 3)],
        wakes=[(6 * ms, 3)],
        pauses=[(-40 * ms, -30 * ms), (20 * ms, 22 * ms)],
    )
    assert figures["queue_p50_ms"] == 2
    assert figures["append_notify_p50_ms"] == 3
    assert (figures["poll_p50_ms"], figures["read_p50_ms"]) == (1, 1)
    assert figures["deliver_p50_ms"] == 1
    # The tail (at or above the p99) is event 3 alone.
    assert (figures["queue_tail_ms"], figures["deliver_tail_ms"]) == (1, 22)
    assert (figures["gc_tail_ms"], figures["gc_pause_max_ms"]) == (2, 2)

    in_process = breakdown(
        stamps=stamps, samples=samples, warmup=1, appends=[(3 * ms, 5 * ms, 1, 3)]
    )
    assert (in_process["append_p50_ms"], in_process["deliver_tail_ms"]) == (2, 25)
