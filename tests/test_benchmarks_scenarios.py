"""The scenarios workload runs end to end on tiny scenarios, is reproducible, and its check bites.

No timing is asserted: these only guard the code path that
``python -m benchmarks run scenarios`` takes, the generation of its
scenarios, and the delivery check that fails it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import attrs
import pytest

import trioflow
from benchmarks import scenarios
from benchmarks.__main__ import main
from benchmarks._harness import BenchmarkFailed
from benchmarks._scenario_plans import ConsumerPlan, Scenario, generate, prepare
from benchmarks._stores import STORES
from tests.test_benchmarks_smoke import bench_postgres as bench_postgres

#: Tiny scenarios: at most 30 events and 3 consumers each.
TINY = ["--scenarios", "3", "--seed", "1", "--events", "30", "--consumers", "3"]


def _run(store: str, tmp_path: Path, *extra: str) -> tuple[int, dict[str, object]]:
    out = tmp_path / "scenarios.json"
    status = main(["run", "scenarios", "--store", store, *TINY, *extra, "--json", str(out)])
    report = json.loads(out.read_text(encoding="utf-8")) if out.exists() else {}
    return status, report


def _check_report(report: dict[str, object], store: str, stderr: str, stdout: str) -> None:
    assert report["reference_case"] == "raw"
    results = report["results"]
    assert isinstance(results, list)
    assert [(result["case"], result["store"]) for result in results] == [
        ("raw", None),
        ("trioflow", store),
        ("batch", store),
    ]
    for result in results:
        (run,) = result["runs"]
        assert run["scenarios"] == 3
        assert run["delivered_per_s_min"] <= run["delivered_per_s_median"]
        assert run["delivered_per_s_median"] <= run["delivered_per_s_max"]
        assert run["p99_ms_min"] <= run["p99_ms_max"]
        params = result["params"]
        assert (params["seed"], params["scenarios"]) == (1, 3)
        assert [s["number"] for s in params["scenario_params"]] == [1, 2, 3]
        for scenario in params["scenario_params"]:
            assert scenario["events"] <= 30
            assert 1 <= len(scenario["consumers"]) <= 3
            number = scenario["number"]
            assert run[f"s{number:02d}.delivered_per_s"] > 0
            assert run[f"s{number:02d}.p99_ms"] >= run[f"s{number:02d}.p50_ms"]
        assert f"| {result['case']} " in stdout
    raw, *flows = results
    assert raw["runs"][0]["failures"] == 0
    for flow in flows:
        # Every planned failure was raised once and redelivered exactly once,
        # but for the last failure of each event given up on as a dead letter.
        assert (
            flow["runs"][0]["redeliveries"] + flow["runs"][0]["dead_letters"]
            == flow["runs"][0]["failures"]
        )
        assert flow["runs"][0]["rewound"] == 0
    assert flows[1]["params"]["consumer_batch"] == 100
    for label in ("raw", f"trioflow on {store}", f"batch on {store}"):
        assert sum(f"  {label} scenario " in line for line in stderr.splitlines()) == 3


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_scenarios_run_and_pass_their_check(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if store == "sqlite":
        pytest.importorskip("trioflow.stores.sqlite")

    status, report = _run(store, tmp_path)

    captured = capsys.readouterr()
    # 1 would mean a scenario broke the delivery guarantees.
    assert status == 0, captured.err
    assert "BENCHMARK FAILED" not in captured.err
    _check_report(report, store, captured.err, captured.out)


@pytest.mark.postgres
@pytest.mark.usefixtures("bench_postgres")
def test_scenarios_on_postgres(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, report = _run("postgres", tmp_path)

    captured = capsys.readouterr()
    assert status == 0, captured.err
    _check_report(report, "postgres", captured.err, captured.out)
    machine = report["machine"]
    assert isinstance(machine, dict) and machine["postgresql"]


def test_the_same_seed_gives_the_same_scenarios() -> None:
    first = generate(7, 4)

    assert first == generate(7, 4)
    # Scenario i does not depend on how many were asked for.
    assert generate(7, 2) == first[:2]
    assert generate(8, 4) != first
    assert [scenario.number for scenario in first] == [1, 2, 3, 4]
    for scenario in first:
        assert 1 <= len(scenario.consumers) <= 16
        one, again = prepare(scenario), prepare(scenario)
        assert (one.types, one.data, one.sleeps, one.failing) == (
            again.types,
            again.data,
            again.sleeps,
            again.failing,
        )


def test_only_runs_one_scenario_and_rejects_a_missing_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, report = _run("memory", tmp_path, "--only", "2")

    assert status == 0
    results = report["results"]
    assert isinstance(results, list)
    for result in results:
        assert [s["number"] for s in result["params"]["scenario_params"]] == [2]
        assert "s02.delivered_per_s" in result["runs"][0]
        assert "s01.delivered_per_s" not in result["runs"][0]

    with pytest.raises(SystemExit) as exit_info:
        main(["run", "scenarios", "--scenarios", "3", "--only", "4"])
    assert exit_info.value.code == 2
    assert "there are only 3 scenarios" in capsys.readouterr().err


# --- the check ---------------------------------------------------------------------------

EXPECTED = [2, 3, 5, 8, 9]


@pytest.mark.parametrize(
    ("log", "max_rewind", "problem"),
    [
        ([2, 3, 8, 9], 0, r"given seq 8 where seq 5 was due"),
        ([2, 5, 3, 8, 9], 0, r"given seq 5 where seq 3 was due"),
        ([2, 3, 3, 5, 8, 9], 0, r"seq 3 where seq 5 was due, without a failure"),
        ([2, 3, 4, 5, 8, 9], 0, r"given seq 4, not one of its events"),
        ([2, 3, 5, 8], 0, r"handled 4 of its 5 events; seq 9 and 0 more never came"),
        ([2, 3, -5], 0, r"handled 2 of its 5 events; seq 5 and 2 more"),
        # A restart that goes back further than the cursor allows...
        ([2, 3, -5, 3, 5, 8, 9], 0, r"failing on seq 5 it resumed at seq 3 .* 1 of its handled"),
        ([2, 3, -5, 2, 3, 5, 8, 9], 1, r"resumed at seq 2 .* 2 of its handled events back"),
        # ...or past the failed event.
        ([2, 3, -5, 8, 9], 0, r"failing on seq 5 it resumed at seq 8 .* skipping 1"),
    ],
)
def test_check_log_catches_lost_reordered_and_misplaced_redeliveries(
    log: list[int], max_rewind: int, problem: str
) -> None:
    check = scenarios.check_log(log, EXPECTED, max_rewind=max_rewind)
    assert check.problem is not None
    assert re.search(problem, check.problem), check.problem


def test_check_log_accepts_redelivery_from_the_cursor() -> None:
    clean = scenarios.check_log(EXPECTED, EXPECTED, max_rewind=0)
    assert clean == scenarios.LogCheck(
        handled=5, failures=0, redeliveries=0, rewound=0, problem=None
    )

    failed_twice = scenarios.check_log([2, -3, -3, 3, 5, -8, 8, 9], EXPECTED, max_rewind=0)
    assert failed_twice == scenarios.LogCheck(
        handled=5, failures=3, redeliveries=3, rewound=0, problem=None
    )

    # From an older cursor (a failed cursor commit): allowed up to max_rewind.
    rewound = scenarios.check_log([2, 3, -5, 2, 3, 5, 8, 9], EXPECTED, max_rewind=2)
    assert rewound == scenarios.LogCheck(
        handled=7, failures=1, redeliveries=3, rewound=2, problem=None
    )


def test_check_log_goes_past_dead_letters_and_nothing_else() -> None:
    # Given up on after two attempts each: seq 3 midway, seq 9 at the end.
    lettered = scenarios.check_log(
        [2, -3, -3, 5, 8, -9, -9], EXPECTED, max_rewind=0, lettered=frozenset({3, 9})
    )
    assert lettered == scenarios.LogCheck(
        handled=3, failures=4, redeliveries=2, rewound=0, problem=None, dead_lettered=2
    )
    # Past an event that failed and is not a dead letter...
    skipped = scenarios.check_log([2, -3, 5, 8, 9], EXPECTED, max_rewind=0, lettered=frozenset({5}))
    assert skipped.problem is not None
    assert re.search(r"failing on seq 3 it resumed at seq 5 .* skipping 1", skipped.problem)
    # ...or past a dead letter it never failed on.
    unfailed = scenarios.check_log([2, 5, 8, 9], EXPECTED, max_rewind=0, lettered=frozenset({3}))
    assert unfailed.problem is not None
    assert "given seq 5 where seq 3 was due" in unfailed.problem


@pytest.mark.parametrize(
    ("on_exhausted", "wrong", "right", "problem"),
    [
        (
            "dead-letter",
            scenarios.GivenUp(planned=[3, 8], letters={3: 2}),
            scenarios.GivenUp(planned=[3, 8], letters={3: 2, 8: 2}),
            r"dead-letter at seqs \[3\], planned \[3, 8\]",
        ),
        (
            "dead-letter",
            scenarios.GivenUp(planned=[3], letters={3: 1}),
            scenarios.GivenUp(planned=[3], letters={3: 2}),
            r"dead letter 3 after 1 attempts, not 2",
        ),
        (
            "halt",
            scenarios.GivenUp(planned=[3, 8], halts=[(3, 2)]),
            scenarios.GivenUp(planned=[3, 8], halts=[(3, 2), (8, 5)]),
            r"halt at seqs \[3\], planned \[3, 8\]",
        ),
        (
            "halt",
            scenarios.GivenUp(planned=[3], halts=[(3, 3)]),
            scenarios.GivenUp(planned=[3], halts=[(3, 2)]),
            r"halted at seq 3 with its cursor at 3, not before it",
        ),
        (
            "halt",
            scenarios.GivenUp(planned=[3], letters={3: 2}, halts=[(3, 2)]),
            scenarios.GivenUp(planned=[3], halts=[(3, 2)]),
            r"dead-letter at seqs \[3\], planned \[\]",
        ),
        (
            "retry-forever",
            scenarios.GivenUp(halts=[(3, 2)]),
            scenarios.GivenUp(),
            r"halt at seqs \[3\], planned \[\]",
        ),
    ],
)
def test_dead_letters_and_halts_must_be_as_planned(
    on_exhausted: trioflow.OnExhausted,
    wrong: scenarios.GivenUp,
    right: scenarios.GivenUp,
    problem: str,
) -> None:
    plan = attrs.evolve(_plan(), on_exhausted=on_exhausted, attempts=2)

    assert re.search(problem, "\n".join(wrong.problems(plan))), wrong.problems(plan)
    assert right.problems(plan) == []


def _plan(
    *, failure_rate: float = 0.0, types: tuple[str, ...] | None = None, commit_every: int = 10
) -> ConsumerPlan:
    return ConsumerPlan(
        slowdown="none",
        delay_s=0.0,
        pause_chance=0.0,
        failure_rate=failure_rate,
        types=types,
        buffer=None,
        commit_every=commit_every,
        salt=0,
    )


def _scenario(*plans: ConsumerPlan) -> Scenario:
    return Scenario(
        number=4,
        events=5,
        event_bytes=24,
        batch_size=2,
        publish_interval_s=0.0,
        consumers=plans,
        salt=0,
    )


def _recorder(log: Sequence[int], planned: int = 0) -> scenarios.Recorder:
    recorder = scenarios.Recorder([0.0] * 5, frozenset(range(planned)))
    recorder.entries.extend(log)
    return recorder


def test_a_broken_consumer_log_fails_the_benchmark_with_the_scenario() -> None:
    scenario = _scenario(_plan(), _plan(failure_rate=0.05, commit_every=3))
    good = [1, 2, 3, 4, 5]
    # The second consumer failed on seq 4, then resumed from seq 2: further
    # back than its cursor (its position, committed before the restart).
    bad = [1, 2, 3, -4, 2, 3, 4, 5]

    with pytest.raises(BenchmarkFailed) as failed:
        scenarios.check_consumers(
            scenario,
            [good, good],
            [_recorder(good), _recorder(bad, planned=1)],
            max_rewinds=[0, 0],
            what="trioflow on memory",
            reproduce="python -m benchmarks run scenarios --only 4",
        )

    message = str(failed.value)
    assert message.startswith("trioflow on memory: scenario 4 broke the delivery guarantees")
    assert "consumer c02 (no sleep, fail 5.0%, commit 3): after failing on seq 4" in message
    assert "consumer c01" not in message
    assert f"scenario: {scenario!r}" in message
    assert "run it alone: python -m benchmarks run scenarios --only 4" in message

    # The same log passes where a failed cursor commit allows going back 3 events.
    checks = scenarios.check_consumers(
        scenario,
        [good, good],
        [_recorder(good), _recorder(bad, planned=1)],
        max_rewinds=[0, 3],
        what="trioflow on memory",
        reproduce="",
    )
    assert [check.rewound for check in checks] == [0, 2]


def test_overlapping_calls_and_unplanned_failures_fail_the_benchmark() -> None:
    scenario = _scenario(_plan())
    overlapping = _recorder([1, 2, 3, 4, 5])
    overlapping.overlaps = 1
    with pytest.raises(BenchmarkFailed, match=r"1 calls started before the previous one"):
        scenarios.check_consumers(
            scenario, [[1, 2, 3, 4, 5]], [overlapping], max_rewinds=[0], what="x", reproduce=""
        )
    unplanned = _recorder([1, -2, 2, 3, 4, 5], planned=0)
    with pytest.raises(BenchmarkFailed, match=r"raised 1 times, 0 planned"):
        scenarios.check_consumers(
            scenario, [[1, 2, 3, 4, 5]], [unplanned], max_rewinds=[0], what="x", reproduce=""
        )


class _Forgetful(scenarios.Recorder):
    """A handler log that forgets the second event it handles: as if it were lost."""

    forgot = False

    async def handle(self, event: trioflow.Event) -> None:
        await super().handle(event)
        if not self.forgot and len(self.entries) == 2 and self.entries[-1] > 0:
            self.forgot = True
            self.entries.pop()
            self.done_at.pop()


def test_a_lost_event_fails_the_run_and_says_how_to_reproduce(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(scenarios, "Recorder", _Forgetful)

    status, _ = _run("memory", tmp_path, "--case", "trioflow")

    assert status == 1
    err = capsys.readouterr().err
    assert "BENCHMARK FAILED: raw channels: scenario 1 broke the delivery guarantees" in err
    assert "  scenario: Scenario(number=1, " in err
    assert "run it alone: python -m benchmarks run scenarios --store memory --case raw" in err
    assert "--only 1" in err


def test_a_scenario_that_never_finishes_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _ = _run("memory", tmp_path, "--timeout", "0.001")

    assert status == 1
    assert "scenario 1 did not finish within" in capsys.readouterr().err


#: What a test running one scenario says to reproduce it.
SETTINGS = scenarios._Settings(seed=1, count=4, max_events=30, max_consumers=16, timeout=60.0)


@pytest.mark.parametrize(
    ("batch", "case", "what"), [(None, "trioflow", "trioflow"), (4, "batch", "batch consumers")]
)
def test_trioflow_runs_are_checked_too(
    monkeypatch: pytest.MonkeyPatch, batch: int | None, case: str, what: str
) -> None:
    monkeypatch.setattr(scenarios, "Recorder", _Forgetful)
    scenario = attrs.evolve(_scenario(_plan(), _plan(types=("order.paid",))), events=6)

    with pytest.raises(BenchmarkFailed) as failed:
        scenarios._flow_scenario(
            STORES["memory"], scenario, prepare(scenario), 60.0, SETTINGS, batch=batch
        )

    message = str(failed.value)
    assert message.startswith(f"{what} on memory: scenario 4 broke the delivery guarantees")
    assert "consumer c01 (no sleep, commit 10): call 2 was given seq 3 where seq 2 was due" in (
        message
    )
    assert f"--store memory --case {case} --seed 1 --scenarios 4 --events 30 --only 4" in message


def _policy_scenario() -> Scenario:
    """Consumers that dead-letter, halt and retry forever, with failures and poison events."""
    return attrs.evolve(
        _scenario(
            attrs.evolve(
                _plan(failure_rate=0.1),
                on_exhausted="dead-letter",
                attempts=2,
                timeout=1.0,
                poison_rate=0.2,
            ),
            attrs.evolve(
                _plan(failure_rate=0.1, commit_every=1),
                on_exhausted="halt",
                attempts=1,
                poison_rate=0.2,
            ),
            attrs.evolve(_plan(failure_rate=0.2), attempts=3),
        ),
        events=40,
    )


@pytest.mark.parametrize("batch", [None, 5])
def test_trioflow_runs_dead_letter_and_halt_as_planned(batch: int | None) -> None:
    scenario = _policy_scenario()
    prepared = prepare(scenario)
    letters, halts = (prepared.given_up(number, scenario.consumers[number]) for number in (0, 1))
    assert letters and halts and prepared.failing[2], "the draw plans no letter, halt or failure"

    figures = scenarios._flow_scenario(
        STORES["memory"], scenario, prepared, 60.0, SETTINGS, batch=batch
    )

    assert (figures.dead_letters, figures.halts) == (len(letters), len(halts))
    assert figures.store_errors == figures.rewound == 0


def test_a_lost_dead_letter_fails_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_letters(self: trioflow.Flow, consumer: str | None = None) -> list[object]:
        return []

    monkeypatch.setattr(trioflow.Flow, "dead_letters", no_letters)
    scenario = _policy_scenario()

    with pytest.raises(BenchmarkFailed) as failed:
        scenarios._flow_scenario(STORES["memory"], scenario, prepare(scenario), 60.0, SETTINGS)

    message = str(failed.value)
    assert re.search(r"consumer c01 \(.*\): after failing on seq \d+ .* skipping 1", message)
    assert re.search(r"consumer c01 \(.*\): dead-letter at seqs \[\], planned \[\d+", message)
    assert "consumer c02" not in message
