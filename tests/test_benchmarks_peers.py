"""The fan-out workload's peers (``--peer``) run, are skipped when absent, and fail when wrong.

No timing is asserted. A peer whose server cannot be reached is skipped with
the reason, except with ``CI=true``, where it fails the test instead. A peer
whose client is not installed (``pip install '.[bench]'``) is skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import attrs
import pytest

from benchmarks import fanout, nats_fanout, redis_fanout
from benchmarks.__main__ import main
from benchmarks._harness import BenchmarkFailed, Options
from benchmarks._peers import PEERS, Outcome, PeerKind, Tally, order_problems
from tests._servers import server_missing

PROGRAMS: dict[str, ModuleType] = {"redis": redis_fanout, "nats": nats_fanout}
ROOT = Path(__file__).resolve().parent.parent


def reachable_peer(name: str) -> PeerKind:
    """``PEERS[name]``; skip if its client is missing, skip (fail if CI=true) if its server is."""
    peer = PEERS[name]
    if importlib.util.find_spec(peer.package) is None:
        pytest.skip(f"{peer.distribution} is not installed (pip install '.[bench]')")
    problem = peer.unavailable()
    if problem is not None:
        server_missing(f"{peer.title} benchmark server unavailable: {problem}")
    return peer


@pytest.mark.parametrize("name", sorted(PEERS))
def test_a_peer_runs_next_to_trioflow_and_passes_its_check(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    peer = reachable_peer(name)
    out = tmp_path / "fanout.json"
    argv = ["run", "fanout", "--peer", name, "--case", peer.case, "--events", "200"]
    argv += ["--consumers", "2", "--repeat", "1", "--batch-size", "64", "--commit-every", "10"]

    # 1 would mean the program's check failed: an event lost, repeated or reordered.
    assert main([*argv, "--json", str(out)]) == 0

    captured = capsys.readouterr()
    assert "BENCHMARK FAILED" not in captured.err
    assert f"| {peer.case} " in captured.out
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["skipped_peers"] == {}
    assert report["options"]["peer"] == [name]
    results = {result["case"]: result for result in report["results"]}
    assert set(results) == {"raw", peer.case}
    result = results[peer.case]
    assert (result["store"], result["consumers"], result["events"]) == (None, 2, 200)
    assert result["params"]["program"] == peer.program
    assert (result["params"]["batch_size"], result["params"]["commit_every"]) == (64, 10)
    assert result["params"]["server"] and result["params"]["client"]
    for figure in ("publish_per_s", "delivered_per_s", "publish_s", "delivered_s", "gc_s"):
        assert result["median"][figure] > 0
    assert result["ratio_to_reference"]["delivered_per_s"] > 0


@pytest.mark.parametrize("name", sorted(PEERS))
def test_a_program_out_of_time_gives_up_and_fails(name: str) -> None:
    peer = reachable_peer(name)
    # A deadline already past when the run starts: the writer and the readers
    # stop before their first round trip, whatever the machine's speed.
    command = [sys.executable, "-m", peer.program, "--events", "10", "--readers", "1"]
    done = subprocess.run(
        [*command, "--timeout", "1e-9"], cwd=ROOT, capture_output=True, text=True, check=False
    )

    assert done.returncode == 1, done.stderr
    assert "gave up after 1e-09s (--timeout); reader 0 handled 0 events" in done.stderr


def test_an_unreachable_peer_is_skipped_with_a_line_saying_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Port 1 on the loopback interface: nothing listens there, the refusal is immediate.
    monkeypatch.setenv(PEERS["redis"].url_variable, "redis://127.0.0.1:1/0")
    monkeypatch.setenv(PEERS["nats"].url_variable, "nats://127.0.0.1:1")
    out = tmp_path / "fanout.json"
    argv = ["run", "fanout", "--peer", "all", "--events", "50", "--repeat", "1"]
    argv += ["--case", "publish-many", "--json", str(out)]

    assert main(argv) == 0

    err = capsys.readouterr().err
    for peer in PEERS.values():
        line = next(line for line in err.splitlines() if f"skipping peer {peer.name!r}: " in line)
        if importlib.util.find_spec(peer.package) is None:
            assert f"{peer.distribution}, is not installed" in line
        else:
            assert f"cannot connect to {peer.title.split()[0]} at " in line
            assert "127.0.0.1:1" in line
            assert peer.url_variable in line
    report = json.loads(out.read_text(encoding="utf-8"))
    assert set(report["skipped_peers"]) == set(PEERS)
    assert report["options"]["peer"] == []
    assert {result["case"] for result in report["results"]} == {"raw", "publish-many"}


def test_a_peer_whose_client_is_missing_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # None in sys.modules makes the package unimportable, as if not installed.
    monkeypatch.setitem(sys.modules, "nats", None)
    out = tmp_path / "fanout.json"
    argv = ["run", "fanout", "--peer", "nats", "--events", "50", "--repeat", "1"]
    argv += ["--case", "publish-many", "--json", str(out)]

    assert main(argv) == 0

    assert "skipping peer 'nats': its client, nats-py, is not installed" in capsys.readouterr().err
    report = json.loads(out.read_text(encoding="utf-8"))
    assert set(report["skipped_peers"]) == {"nats"}


def test_listing_and_importing_need_no_peer_client() -> None:
    script = (
        "import sys\n"
        "sys.modules.update(redis=None, nats=None)\n"
        "from benchmarks import nats_fanout, redis_fanout\n"
        "from benchmarks.__main__ import main\n"
        "sys.exit(main(['list']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "fanout" in done.stdout


async def test_the_order_check_catches_lost_repeated_and_reordered_events() -> None:
    feeds = {
        "complete": [1, 2, 3, 4, 5],
        "lost": [1, 2, 4, 5],
        "repeated": [1, 2, 2, 3, 4, 5],
        "reordered": [1, 3, 2, 4, 5],
        "short": [1, 2, 3, 4],
    }
    tallies = {name: Tally() for name in feeds}
    for name, orders in feeds.items():
        for order in orders:
            await tallies[name].handle(order, {"order": order})

    assert order_problems([tallies["complete"]], 5) == []
    for name in feeds.keys() - {"complete"}:
        problems = order_problems([tallies["complete"], tallies[name]], 5)
        assert len(problems) == 1
        assert problems[0].startswith("reader 1 handled ")


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_a_program_whose_check_fails_exits_non_zero(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def lossy_run(args: argparse.Namespace) -> Outcome:
        tally = Tally()
        await tally.handle(2, {"order": 2})
        return {"publish_per_s": 1.0, "problems": order_problems([tally], args.events)}

    monkeypatch.setattr(PROGRAMS[name], "run", lossy_run)

    assert PROGRAMS[name].main(["--events", "2"]) == 1

    captured = capsys.readouterr()
    assert "reader 0 handled 1 events ending at 2 with 1 out of order" in captured.err
    assert json.loads(captured.out)["problems"]


def test_a_failing_program_fails_the_benchmark() -> None:
    # A program that exits non-zero (here: one that does not exist), as one
    # whose check failed does: the harness must not take its figures.
    peer = attrs.evolve(PEERS["redis"], program="benchmarks._no_such_peer_program")
    options = Options(events=10, consumers=1, repeat=1, stores=[], timeout=30.0)
    case = fanout._peer_case(peer, options, batch_size=10, commit_every=10)

    assert case.id == "redis-streams"
    assert case.store is None
    with pytest.raises(BenchmarkFailed, match=r"Redis program \(redis-streams\) failed"):
        case.run()
