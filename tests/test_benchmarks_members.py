"""The failover and groups workloads run end to end on tiny inputs; their checks bite.

No timing is asserted: these only guard the code paths of ``python -m
benchmarks run failover`` and ``run groups``, and that a lost, repeated or
reordered event fails a run instead of giving a figure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import _members, failover, groups
from benchmarks.__main__ import main
from benchmarks._harness import BenchmarkFailed
from benchmarks._members import Handled, check_handled
from benchmarks._report import CaseResult, Metric, Report

# The fixture, by its name: it points the benchmarks at the PostgreSQL test server.
from tests.test_benchmarks_smoke import bench_postgres  # noqa: F401

FAILOVER = ["run", "failover", "--lease-ttl", "0.6", "--events", "5", "--rate", "200"]
FAILOVER += ["--timeout", "60"]
GROUPS = ["run", "groups", "--store", "postgres", "--events", "300", "--keys", "20"]
GROUPS += ["--partitions", "4", "--members", "1,2", "--lease-ttl", "1", "--repeat", "1"]
GROUPS += ["--timeout", "60"]


def _run(argv: list[str], out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Any, str]:
    # 1 would mean a correctness check failed: an event lost, repeated or reordered.
    assert main([*argv, "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "BENCHMARK FAILED" not in captured.err
    return json.loads(out.read_text(encoding="utf-8")), captured.out


@pytest.mark.parametrize(
    "store", ["sqlite", pytest.param("postgres", marks=[pytest.mark.postgres])]
)
def test_failover_runs_and_passes_its_checks(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    if store == "postgres":
        request.getfixturevalue("bench_postgres")
    argv = [*FAILOVER, "--store", store, "--repeat", "2"]
    report, table = _run(argv, tmp_path / "failover.json", capsys)
    results = {result["case"]: result for result in report["results"]}
    assert set(results) == {"kill@0.6", "graceful@0.6"}
    assert report["reference_case"] is None
    for case, result in results.items():
        assert len(result["runs"]) == 2
        handovers = [run["handover_s"] for run in result["runs"]]
        assert min(handovers) > 0
        assert result["max"]["handover_s"] == max(handovers)
        # The table shows the median and the max of the same figure.
        row = next(line for line in table.splitlines() if line.startswith(f"| {case} "))
        assert f"{max(handovers):.2f}" in row
    assert results["kill@0.6"]["median"]["bound_s"] == pytest.approx(0.8)
    assert results["graceful@0.6"]["median"]["bound_s"] == pytest.approx(0.2)
    # A graceful stop commits the owner's position: nothing is handled twice.
    assert results["graceful@0.6"]["max"]["rehandled"] == 0
    # No reference case: no ratio column.
    assert table.splitlines()[0].rstrip().endswith("| rehandled |")


@pytest.mark.postgres
@pytest.mark.usefixtures("bench_postgres")
def test_groups_runs_and_passes_its_checks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report, table = _run(GROUPS, tmp_path / "groups.json", capsys)
    results = {result["case"]: result for result in report["results"]}
    assert set(results) == {"plain", "group-1", "group-2"}
    assert report["reference_case"] == "plain"
    assert results["plain"]["params"]["partitions"] is None
    assert (
        results["group-2"]["params"] | {"members": 2, "partitions": 4}
        == (results["group-2"]["params"])
    )
    for result in results.values():
        assert result["events"] == 300
        assert result["median"]["drained_per_s"] > 0
    assert results["group-2"]["baseline_case"] == "group-1"
    assert results["group-2"]["ratio_to_baseline"]["drained_per_s"] > 0
    assert "| vs plain | vs 1 member |" in table


@pytest.mark.postgres
@pytest.mark.usefixtures("bench_postgres")
@pytest.mark.parametrize("workload", ["failover", "groups"])
def test_a_run_whose_log_lost_an_event_fails(
    workload: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    module = failover if workload == "failover" else groups
    read_log = _members.read_log

    def losing(path: Path) -> list[Handled]:
        handled = read_log(path)
        # The standby (or the first member) handled the last event published.
        return handled[:-1] if path.stem in ("standby", "member-0") else handled

    monkeypatch.setattr(module, "read_log", losing)
    if workload == "failover":
        argv = [*FAILOVER, "--store", "postgres", "--case", "graceful@0.6"]
    else:
        argv = [*GROUPS, "--members", "1", "--case", "plain"]
    assert main([*argv, "--repeat", "1"]) == 1
    assert "events never handled" in capsys.readouterr().err


def test_a_memory_store_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for workload in ("failover", "groups"):
        with pytest.raises(SystemExit) as exit_info:
            main(["run", workload, "--store", "memory"])
        assert exit_info.value.code == 2
        assert "runs processes on a shared store" in capsys.readouterr().err


def _log(*entries: tuple[int, str]) -> list[Handled]:
    return [(seq, key, at) for at, (seq, key) in enumerate(entries)]


def test_complete_logs_pass() -> None:
    logs = {"a": _log((1, "x"), (3, "x")), "b": _log((2, "y"), (4, "y"))}
    check_handled(logs, 4, once=True, what="x")
    # A killed owner's events handled again by the standby, each log in order.
    logs = {"owner": _log((1, "-"), (2, "-")), "standby": _log((2, "-"), (3, "-"))}
    check_handled(logs, 3, once=False, what="x")


@pytest.mark.parametrize(
    ("logs", "events", "once", "problem"),
    [
        ({"a": _log((1, "x"), (3, "x"))}, 3, False, "1 events never handled"),
        ({"a": _log((1, "x"), (2, "x"), (3, "x"))}, 2, True, "events outside 1..2"),
        ({"a": _log((1, "x"), (2, "x"), (2, "x"))}, 2, True, "1 events handled more than once"),
        ({"a": _log((2, "x"), (1, "x"))}, 2, False, "a: key 'x' handled seq 1 after 2"),
        # Each log in order, but key x went backwards between members.
        (
            {"a": [(1, "x", 20)], "b": [(2, "x", 10)]},
            2,
            True,
            "all members: key 'x' handled seq 1 after 2",
        ),
    ],
)
def test_a_lost_repeated_or_reordered_event_fails(
    logs: dict[str, list[Handled]], events: int, once: bool, problem: str
) -> None:
    with pytest.raises(BenchmarkFailed, match=problem):
        check_handled(logs, events, once=once, what="x")


def test_a_maximum_is_shown_for_metrics_that_ask_for_it() -> None:
    result = CaseResult(
        case="c",
        description="",
        store="s",
        consumers=1,
        events=1,
        params={},
        reference=False,
        runs=[{"t": 1.0}, {"t": 5.0}, {"t": 2.0}],
    )
    metrics = [
        Metric(key="t", label="med", unit="s"),
        Metric(key="t", label="max", unit="s", aggregate="max"),
    ]
    assert [result.summary(metric) for metric in metrics] == [2.0, 5.0]
    report = Report(
        workload="w",
        command="",
        started_at="",
        options={},
        metrics=metrics,
        ratio_metric="t",
        ratio_label="ratio",
        results=[result],
        machine={},
    )
    header, _, row = report.table().splitlines()
    # No reference case: no ratio column.
    assert [cell.strip() for cell in header.split("|")[1:-1]] == [
        *("case", "store", "K", "N", "med", "max")
    ]
    assert [cell.strip() for cell in row.split("|")[1:-1]] == ["c", "s", "1", "1", "2", "5"]
    summaries: Any = report.to_json()["results"]
    assert summaries[0]["max"] == {"t": 5.0}
