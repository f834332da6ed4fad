"""The harness around every workload: consumer sweeps, plots and the progress bar.

No timing is asserted; these guard what ``python -m benchmarks`` prints and writes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from benchmarks.__main__ import main
from benchmarks._progress import ProgressBar, format_duration
from benchmarks._report import CaseResult, Comparison, Metric, Report


def _run(tmp_path: Path, *extra: str) -> dict[str, object]:
    out = tmp_path / "fanout.json"
    argv = ["run", "fanout", "--events", "60", "--repeat", "2", "--case", "publish-many"]
    argv += ["--batch-size", "16", "--json", str(out), *extra]
    assert main(argv) == 0
    report: dict[str, object] = json.loads(out.read_text(encoding="utf-8"))
    return report


def test_a_consumer_sweep_runs_every_case_at_each_count_against_its_own_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _run(tmp_path, "--consumers", "1,3")

    results = report["results"]
    assert isinstance(results, list)
    ran = [(result["case"], result["consumers"]) for result in results]
    assert ran == [("raw", 1), ("publish-many", 1), ("raw", 3), ("publish-many", 3)]
    for result in results:
        if result["case"] == "raw":
            # Each count's reference is divided by itself, not by the other count's.
            assert result["ratio_to_reference"]["delivered_per_s"] == 1.0
        assert len(result["runs"]) == 2
    table = capsys.readouterr().out
    assert "| publish-many | memory |   1 |" in table
    assert "| publish-many | memory |   3 |" in table


def test_bad_consumer_counts_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for value in ("0", "4,x", ""):
        with pytest.raises(SystemExit) as exit_info:
            main(["run", "fanout", "--consumers", value])
        assert exit_info.value.code == 2
    assert "--consumers" in capsys.readouterr().err


def test_plots_are_drawn_after_a_run_and_again_from_the_json_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _run(tmp_path, "--consumers", "1,2", "--plot", str(tmp_path / "plots"))

    names = {
        "fanout-delivered-per-s.png",
        "fanout-delivered-per-s-by-consumers.png",
        "fanout-publish-per-s.png",
        "fanout-publish-per-s-by-consumers.png",
    }
    drawn = {path.name for path in (tmp_path / "plots").iterdir()}
    assert drawn == names
    for name in names:
        assert (tmp_path / "plots" / name).read_bytes().startswith(b"\x89PNG")

    assert main(["plot", str(tmp_path / "fanout.json"), "--out", str(tmp_path / "again")]) == 0
    assert {path.name for path in (tmp_path / "again").iterdir()} == names
    assert f"wrote {tmp_path / 'again'}" in capsys.readouterr().err


def test_a_run_without_a_sweep_draws_no_sweep_plot(tmp_path: Path) -> None:
    _run(tmp_path, "--plot", str(tmp_path / "plots"))
    drawn = {path.name for path in (tmp_path / "plots").iterdir()}
    assert drawn == {"fanout-delivered-per-s.png", "fanout-publish-per-s.png"}


def test_plotting_an_unreadable_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(tmp_path / "missing.json")])
    assert exit_info.value.code == 2
    assert "cannot read" in capsys.readouterr().err


def test_the_bar_is_redrawn_below_every_message_on_a_terminal() -> None:
    stream = io.StringIO()
    bar = ProgressBar(total=4, stream=stream, live=True)
    bar.start("fanout raw run 1/2")
    bar.advance("[1/4] raw: 100 ev/s")
    bar.note("filling the backlog: 50%")
    bar.close()

    text = stream.getvalue()
    # Each message is printed on a cleared line; the bar is drawn after it.
    assert text.count("\r\x1b[K") == 3
    lines = text.split("\r\x1b[K")
    assert lines[0].startswith("[........................] 0/4 runs")
    assert lines[0].endswith("now: fanout raw run 1/2")
    assert lines[1].startswith("[1/4] raw: 100 ev/s\n[######..................] 1/4 runs")
    assert "left" in lines[1]
    assert lines[2].startswith("filling the backlog: 50%\n[######")
    assert lines[3] == ""


def test_without_a_terminal_only_the_messages_are_written() -> None:
    stream = io.StringIO()
    bar = ProgressBar(total=2, stream=stream)
    bar.start("fanout raw run 1/1")
    bar.advance("[1/2] raw: done")
    bar.advance("[2/2] publish-many: done")
    bar.close()
    assert stream.getvalue() == "[1/2] raw: done\n[2/2] publish-many: done\n"


@pytest.mark.parametrize(
    ("seconds", "shown"), [(0, "0s"), (12.4, "12s"), (185, "3m05s"), (3725, "1h02m")]
)
def test_durations_read_at_a_glance(seconds: float, shown: str) -> None:
    assert format_duration(seconds) == shown


def test_a_workload_sets_its_own_defaults_for_the_common_options() -> None:
    from benchmarks.__main__ import build_parser

    parser = build_parser()
    recovery = parser.parse_args(["run", "recovery"])
    fanout = parser.parse_args(["run", "fanout"])
    scenarios = parser.parse_args(["run", "scenarios"])
    assert (recovery.events, recovery.consumers, recovery.repeat) == (1_000_000, [4], 3)
    assert (fanout.events, fanout.consumers, fanout.repeat) == (100_000, [4], 3)
    assert scenarios.repeat == 1
    # The command line still wins.
    assert parser.parse_args(["run", "recovery", "--events", "50"]).events == 50


@pytest.mark.parametrize(
    ("values", "log"),
    [([0.1, 0.5], False), ([0.1, 1.0], True), ([0.0, 1000.0], False), ([], False)],
)
def test_figures_spanning_a_factor_of_10_are_drawn_on_a_log_scale(
    values: list[float], log: bool
) -> None:
    from benchmarks._plot import _spans_magnitudes

    assert _spans_magnitudes(values) is log


def test_a_program_s_figures_come_back_and_its_failures_fail_the_run() -> None:
    import sys

    from benchmarks._harness import BenchmarkFailed, run_program

    def python(code: str) -> list[str]:
        return [sys.executable, "-c", code]

    printed = 'import json, os; print(json.dumps({"a": 1, "b": 2.5, "problems": []}))'
    assert run_program(python(printed), what="ok", timeout=60) == {"a": 1.0, "b": 2.5}
    echoed = (
        'import json, os, sys; print(json.dumps({"n": int(os.environ["N"] + sys.stdin.read())}))'
    )
    assert run_program(python(echoed), what="ok", timeout=60, env={"N": "4"}, stdin="2") == {
        "n": 42.0
    }

    failing = (
        'import sys; print("first", file=sys.stderr); print("why", file=sys.stderr); sys.exit(3)'
    )
    with pytest.raises(BenchmarkFailed, match=r"^prog failed \(exit status 3\): first\nwhy$"):
        run_program(python(failing), what="prog", timeout=60)
    # A program's own check failing: its message, alone.
    with pytest.raises(BenchmarkFailed, match=r"^first\nwhy$"):
        run_program(python(failing), what="prog", timeout=60, check_status=3)
    with pytest.raises(BenchmarkFailed, match=r"^prog timed out after 0.5s$"):
        run_program(python("import time; time.sleep(30)"), what="prog", timeout=0.5)


def _compared_report() -> Report:
    def result(case: str, store: str | None, consumers: int, **runs: float) -> CaseResult:
        compared = {"copy": "copy", "peer": "peer"} if case == "flow" else {}
        return CaseResult(
            case=case,
            description="",
            store=store,
            consumers=consumers,
            events=10,
            # Settings of every kind, as the peers' server and client are.
            params={"server": {"version": "7"}} if case == "peer" else {},
            reference=case == "raw",
            runs=[runs],
            compared=compared,
        )

    return Report(
        workload="fanout",
        command="",
        started_at="",
        options={},
        metrics=[
            Metric(key="publish_per_s", label="publish ev/s", unit="events/s"),
            Metric(key="delivered_per_s", label="delivered ev/s", unit="events/s"),
        ],
        ratio_metric="delivered_per_s",
        ratio_label="vs raw",
        machine={},
        comparisons=[
            Comparison(key="copy", label="publish vs COPY", metric="publish_per_s"),
            Comparison(key="peer", label="vs peer", metric="delivered_per_s"),
            Comparison(key="unused", label="vs nothing", metric="delivered_per_s"),
        ],
        results=[
            result("raw", None, 4, publish_per_s=10.0, delivered_per_s=40.0),
            # A writer alone: no consumers, nothing delivered.
            result("copy", "pg", 0, publish_per_s=50.0),
            result("flow", "pg", 4, publish_per_s=20.0, delivered_per_s=80.0),
            result("peer", None, 4, publish_per_s=5.0, delivered_per_s=20.0),
        ],
    )


def test_a_comparison_is_a_column_of_ratios_to_a_case_on_the_same_store_or_none() -> None:
    report = _compared_report()
    lines = report.table().splitlines()
    assert lines[0].split("|")[-4:-1] == [" vs raw ", " publish vs COPY ", " vs peer "]
    assert [cell.strip() for cell in lines[3].split("|")[1:-1]] == [
        "copy",
        "pg",
        "0",
        "10",
        "50",
        "-",
        "-",
        "-",
        "-",
    ]
    assert [cell.strip() for cell in lines[4].split("|")[-4:-1]] == ["2.00", "0.40", "4.00"]
    flow = report.to_json()["results"][2]  # type: ignore[index]
    assert flow["comparisons"] == {
        "copy": {"case": "copy", "metric": "publish_per_s", "ratio": 0.4},
        "peer": {"case": "peer", "metric": "delivered_per_s", "ratio": 4.0},
    }


def test_a_case_with_no_consumers_runs_once_in_a_sweep() -> None:
    import argparse

    from benchmarks.__main__ import _build_cases
    from benchmarks._harness import Case, Options, Workload

    def cases(options: Options, args: argparse.Namespace) -> list[Case]:
        def case(id: str, consumers: int) -> Case:
            return Case(id=id, description="", store="pg", consumers=consumers, events=1, run=dict)

        return [case("flow", options.consumers), case("writer", 0)]

    workload = Workload(
        name="w", summary="", metrics=(), ratio_metric="", ratio_label="", cases=cases
    )
    options = Options(events=1, consumers=1, repeat=1, stores=[], timeout=1.0)
    built = _build_cases(workload, options, [1, 4], argparse.Namespace(case=None))
    assert [(case.id, case.consumers) for case in built] == [
        ("flow", 1),
        ("writer", 0),
        ("flow", 4),
    ]


@pytest.mark.parametrize(
    ("label", "unit", "shown"),
    [
        ("delivered ev/s", "events/s", "delivered (events/s)"),
        ("p99 ms", "ms", "p99 (ms)"),
        ("p99 ms median", "ms", "p99 median (ms)"),
        ("seconds", "s", "seconds (s)"),
        ("peak MiB", "MiB", "peak (MiB)"),
        ("rehandled", "events", "rehandled (events)"),
    ],
)
def test_an_axis_says_its_unit_once(label: str, unit: str, shown: str) -> None:
    from benchmarks._plot import axis_label

    assert axis_label({"label": label, "unit": unit}) == shown


def test_a_bar_stands_beside_what_it_is_compared_with_labelled_with_the_ratios(
    tmp_path: Path,
) -> None:
    from benchmarks._plot import _groups, _ratios, plot_report

    report = _compared_report().to_json()
    results = report["results"]
    assert isinstance(results, list)
    groups = dict(_groups(results, "publish_per_s", sweep=False))
    # The writer alone (K=0) and the peer stand in the store's group, beside the flow.
    assert [r["case"] for r in groups["pg"]] == ["flow", "copy", "peer"]
    assert [r["case"] for r in groups["no store"]] == ["raw", "peer"]
    assert _ratios(report, results[2], "publish_per_s") == ["2.00x raw", "0.40x copy"]
    assert _ratios(report, results[2], "delivered_per_s") == ["2.00x raw", "4.00x peer"]
    names = {path.name for path in plot_report(report, tmp_path)}
    assert names == {"fanout-publish-per-s.png", "fanout-delivered-per-s.png"}
