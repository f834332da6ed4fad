"""The slow-consumer and recovery workloads run end to end on tiny inputs, and their checks bite.

No timing is asserted: these only guard the code paths that ``python -m
benchmarks run slow-consumer`` and ``run recovery`` take, the layout of
their JSON files, and that a lost, repeated or reordered event fails them.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

import trioflow
from benchmarks import fanout, recovery, slow_consumer
from benchmarks.__main__ import build_parser, main
from benchmarks._data import EVENT_TYPE, make_data
from benchmarks._harness import BenchmarkFailed
from benchmarks._rss_child import current_rss_mib, measure_in_child
from benchmarks._stores import StoreKind
from trioflow._events import NewEvent
from trioflow.stores import Appended, Store
from trioflow.stores.memory import MemoryStore

from .test_benchmarks_smoke import bench_postgres as bench_postgres

#: Bytes a planted child run allocates after set-up (see `run_measured`).
_PLANTED_MIB = 64


def run_measured(params: Mapping[str, Any]) -> dict[str, float]:
    """A planted workload run for `benchmarks._rss_child`: fails, or grows by a known amount."""
    if params.get("fail"):
        raise BenchmarkFailed("planted failure: consumer 0 handled 1 events")
    setup = current_rss_mib()
    grown = bytearray(_PLANTED_MIB * 1024 * 1024)
    # Touch every page, so that it is resident, not only reserved.
    grown[::4096] = b"x" * len(grown[::4096])
    return {"setup_rss_mib": setup, "grown": len(grown)}


def _stores(*names: str) -> list[str]:
    if "sqlite" in names:
        pytest.importorskip("trioflow.stores.sqlite")
    return [option for name in names for option in ("--store", name)]


def _slow_argv(out: Path, *stores: str) -> list[str]:
    return [
        *["run", "slow-consumer", *_stores(*stores), "--events", "300", "--consumers", "3"],
        *["--repeat", "1", "--handler-us", "5", "--slowdown", "10", "--buffer", "64"],
        *["--batch-size", "32", "--json", str(out)],
    ]


def _recovery_argv(out: Path, *stores: str) -> list[str]:
    return [
        *["run", "recovery", *_stores(*stores), "--events", "300", "--consumers", "2"],
        *["--repeat", "1", "--fill-batch", "64", "--page-size", "50", "--commit-every", "10"],
        *["--json", str(out)],
    ]


def _check_slow_report(out: Path, stores: Sequence[str], table: str) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    assert report["workload"] == "slow-consumer"
    assert report["reference_case"] == "raw"
    results = {(result["case"], result["store"]): result for result in report["results"]}
    expected = {("raw", None)} | {(case, s) for s in stores for case in ("unbounded", "bounded")}
    assert set(results) == expected
    for (case, store), result in results.items():
        assert (result["consumers"], result["events"], len(result["runs"])) == (3, 300, 1)
        run = result["runs"][0]
        assert run["fast_per_s"] > 0
        assert run["fast_s"] == pytest.approx(run["handled_s"] + run["commit_lag_s"])
        assert 0 <= run["slow_handled"] <= 300
        # Measured in the run's own process: its peak, and what it grew by after set-up.
        assert run["peak_rss_mib"] >= run["setup_rss_mib"] > 0
        assert run["rss_growth_mib"] == pytest.approx(run["peak_rss_mib"] - run["setup_rss_mib"])
        assert set(result["ratio_to_reference"]) >= {"fast_per_s", "peak_rss_mib"}
        assert result["params"]["buffer"] == (64 if case == "bounded" else None)
        assert result["params"]["handler_us"] == 5
        assert f"| {case} " in table
        if store is not None:
            assert run["slow_buffered"] >= 0
    assert "| fast vs raw |" in table
    return report


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_slow_consumer_runs_and_passes_its_check(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "slow.json"
    argv = _slow_argv(out, store)

    # 1 would mean a correctness check failed.
    assert main(argv) == 0

    captured = capsys.readouterr()
    assert "BENCHMARK FAILED" not in captured.err
    report = _check_slow_report(out, [store], captured.out)
    assert report["command"] == "python -m benchmarks " + " ".join(argv)


def test_slow_consumer_needs_a_fast_consumer(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "slow-consumer", "--consumers", "1"])
    assert exit_info.value.code == 2
    assert "--consumers 2 or more" in capsys.readouterr().err


async def test_slow_consumer_check_catches_gaps_repeats_and_reordering() -> None:
    events = fanout.make_events(make_data(4))
    feeds = {
        "none": [],
        "prefix": [1, 2, 3],
        "gap": [1, 3],
        "repeated": [1, 2, 2],
        "reordered": [2, 1],
        "late start": [2, 3],
    }
    tallies: dict[str, fanout.Tally] = {}
    for name, seqs in feeds.items():
        tallies[name] = tally = fanout.Tally()
        for event in (events[seq - 1] for seq in seqs):
            await tally.handle(event)

    for name in ("none", "prefix"):
        slow_consumer.check_prefix(tallies[name], what=name)
    for name in feeds.keys() - {"none", "prefix"}:
        with pytest.raises(
            BenchmarkFailed, match=r"expected the slow consumer to handle seqs 1\.\.m"
        ):
            slow_consumer.check_prefix(tallies[name], what=name)


class _LossyLiveStore(MemoryStore):
    """Stores every event, but hands the flow its appended batches without seq 3."""

    async def append(self, events: Sequence[NewEvent]) -> Appended:
        appended = await super().append(events)
        assert appended.events is not None
        return attrs.evolve(appended, events=[e for e in appended.events if e.seq != 3])


def test_slow_consumer_fails_when_the_fast_consumers_lose_an_event() -> None:
    spec = slow_consumer.RunSpec(
        case="unbounded",
        store="memory",
        events=20,
        consumers=2,
        handler_us=1,
        slowdown=2,
        buffer=None,
        batch_size=5,
        commit_every=10,
        timeout=1.0,
    )
    items = [(EVENT_TYPE, item) for item in make_data(spec.events)]
    batches = [items[start : start + 5] for start in range(0, spec.events, 5)]
    fast, slow = spec.tallies()
    run = functools.partial(slow_consumer._flow_run, spec, _LossyLiveStore(), batches, fast, slow)

    # The fast consumer never reaches 20 events: the deadline ends the run, and the check says why.
    with pytest.raises(BenchmarkFailed, match=r"timed out after 1s.*consumer 0 handled 19 events"):
        fanout._run_within(spec.timeout, fast, spec.events, spec.what, run)


def test_a_run_in_a_subprocess_reports_its_own_memory_and_its_failures() -> None:
    figures = measure_in_child(__name__, {}, timeout=60, what="planted run")
    assert figures["grown"] == _PLANTED_MIB * 1024 * 1024
    assert figures["rss_growth_mib"] >= _PLANTED_MIB * 0.9
    assert figures["rss_growth_mib"] == pytest.approx(
        figures["peak_rss_mib"] - figures["setup_rss_mib"]
    )

    with pytest.raises(BenchmarkFailed, match=r"planted failure: consumer 0 handled 1 events"):
        measure_in_child(__name__, {"fail": True}, timeout=60, what="planted run")


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_recovery_runs_and_passes_its_check(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "recovery.json"
    argv = _recovery_argv(out, store)

    assert main(argv) == 0

    captured = capsys.readouterr()
    assert "BENCHMARK FAILED" not in captured.err
    # Filling the backlog reports its progress.
    assert f"recovery replay on {store}: backlog 300 of 300 events (100%" in captured.err
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["workload"] == "recovery"
    assert report["reference_case"] == "store-read"
    results = {(result["case"], result["store"]): result for result in report["results"]}
    assert set(results) == {
        ("store-read", "memory"),
        ("store-read", store),
        ("replay", store),
        ("batch", store),
    }
    # The memory store's read is the one reference, and it runs first.
    assert [r["reference"] for r in report["results"]] == [True] + [False] * (len(results) - 1)
    for result in results.values():
        assert (result["consumers"], result["events"], len(result["runs"])) == (2, 300, 1)
        run = result["runs"][0]
        assert run["replay_per_s"] > 0
        assert run["delivered_per_s"] == pytest.approx(2 * run["replay_per_s"])
        assert run["replay_s"] >= run["open_s"] >= 0
        assert run["fill_s"] > 0
        assert result["params"]["fill_batch"] == 64
    replay = results["replay", store]
    assert replay["baseline_case"] == "store-read"
    assert replay["ratio_to_baseline"]["delivered_per_s"] > 0
    assert replay["params"]["commit_every"] == 10
    batch = results["batch", store]
    assert batch["baseline_case"] == "store-read"
    assert batch["params"]["consumer_batch"] == batch["params"]["page_size"]
    assert "| vs memory read | vs store read |" in captured.out


def test_recovery_defaults_to_a_backlog_of_a_million_events() -> None:
    parser = build_parser()
    assert parser.parse_args(["run", "recovery"]).events == 1_000_000
    assert parser.parse_args(["run", "recovery", "--events", "500"]).events == 500
    # The other workloads keep the common default.
    assert parser.parse_args(["run", "slow-consumer"]).events == 100_000


class _LossyReadStore(MemoryStore):
    """Appends every event, but its reads leave out seq 3."""

    async def read(
        self, after: int, limit: int, *, max_bytes: int | None = None
    ) -> Sequence[trioflow.Event]:
        return [
            event
            for event in await super().read(after, limit, max_bytes=max_bytes)
            if event.seq != 3
        ]


class _ForgetfulStore(MemoryStore):
    """Commits every cursor one event short."""

    async def commit_cursors(
        self, cursors: Mapping[str, int], *, fences: Mapping[str, int] | None = None
    ) -> frozenset[str]:
        return await super().commit_cursors(
            {name: max(seq - 1, 0) for name, seq in cursors.items()}, fences=fences
        )


def _kind(store_class: type[Store]) -> StoreKind:
    @contextlib.contextmanager
    def fresh() -> Iterator[Store]:
        yield store_class()

    return StoreKind(name="faulty", summary="a faulty memory store", fresh=fresh, family="memory")


@pytest.mark.parametrize(
    ("store_class", "measure", "problem"),
    [
        (_LossyReadStore, "read", r"consumer 0 handled 19 events ending at seq 20 with 1 out"),
        (_LossyReadStore, "replay", r"consumer 0 handled 19 events ending at seq 20 with 1 out"),
        (_LossyReadStore, "batch", r"consumer 0 handled 19 events ending at seq 20 with 1 out"),
        (_ForgetfulStore, "read", r"committed cursors \{'consumer-0': 19, 'consumer-1': 19\}"),
    ],
)
def test_recovery_fails_when_a_consumer_misses_an_event_or_its_cursor(
    store_class: type[Store], measure: str, problem: str
) -> None:
    backlog = recovery.Backlog(
        events=20,
        consumers=2,
        items=[(EVENT_TYPE, item) for item in make_data(8)],
        progress=lambda line: None,
    )
    measures: dict[str, recovery.Measure] = {
        "read": functools.partial(recovery.read_backlog, page_size=6),
        "replay": functools.partial(recovery.replay, commit_every=5, page_size=6),
        "batch": functools.partial(recovery.replay, commit_every=5, page_size=6, batch=6),
    }
    with pytest.raises(BenchmarkFailed, match=problem):
        recovery.run_once(_kind(store_class), backlog, measures[measure], what=measure, timeout=30)


@pytest.mark.postgres
@pytest.mark.usefixtures("bench_postgres")
def test_slow_consumer_and_recovery_on_postgres(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slow_out, recovery_out = tmp_path / "slow.json", tmp_path / "recovery.json"

    assert main(_slow_argv(slow_out, "postgres")) == 0
    assert main(_recovery_argv(recovery_out, "postgres")) == 0

    captured = capsys.readouterr()
    assert "BENCHMARK FAILED" not in captured.err
    _check_slow_report(slow_out, ["postgres"], captured.out)
    report = json.loads(recovery_out.read_text(encoding="utf-8"))
    assert report["machine"]["postgresql"]
    ran = {(result["case"], result["store"]) for result in report["results"]}
    assert ran == {
        ("store-read", "memory"),
        ("store-read", "postgres"),
        ("replay", "postgres"),
        ("batch", "postgres"),
    }
