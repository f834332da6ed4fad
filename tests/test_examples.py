"""The examples run as the README says, on the embedded SQLite default."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRIOFLOW_STORE"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_quickstart_resumes_from_cursors_on_the_second_run(tmp_path: Path) -> None:
    first = run_example("quickstart.py", tmp_path)
    assert (tmp_path / "trioflow.db").exists()
    assert "audit: cursor 3, lag 0, handled 3" in first
    assert "mailer: cursor 3, lag 0, handled 1" in first
    second = run_example("quickstart.py", tmp_path)
    # Only the three new events: both consumers resumed from their cursors.
    assert "audit: cursor 6, lag 0, handled 3" in second
    assert "mailer: cursor 6, lag 0, handled 1" in second
    assert "audit   #1 " not in second


def test_flaky_retries_in_place_dead_letters_the_poison_parcel_and_requeues_it(
    tmp_path: Path,
) -> None:
    lines = run_example("flaky.py", tmp_path).splitlines()
    assert (tmp_path / "trioflow.db").exists()
    handled = [line.split(":", 1)[1].strip() for line in lines if line.startswith("  shipping ")]
    # Each failure retried in place, before any later parcel; the poison
    # parcel given up on after three calls; requeued, it is handled last.
    assert handled == [
        "courier booked for 10115",
        "courier busy (retried in place)",
        "courier booked for 20095",
        *["postcode 99999 not served"] * 3,
        "courier busy (retried in place)",
        "courier booked for 80331",
        "courier booked for 99999",
    ], lines
    assert [line for line in lines if line.startswith("  shipping #3 ")][-1].startswith(
        "  shipping #3   parcel 3 (call 4)"
    ), lines
    assert "dead letters of 'shipping': 1" in lines
    assert (
        "  #3 exhausted after 3 attempts: __main__.CourierError: postcode 99999 is not served"
    ) in lines
    assert lines[-1] == "shipping: cursor 4, handled 4, failed calls 5, dead letters left 0"
    # A second run ships four new parcels; no dead letter is left over.
    again = run_example("flaky.py", tmp_path).splitlines()
    assert "  #7 exhausted after 3 attempts: " in "\n".join(again)
    assert again[-1] == "shipping: cursor 8, handled 4, failed calls 5, dead letters left 0"


@pytest.mark.slow
def test_service_stops_gracefully_on_sigterm(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRIOFLOW_STORE"}
    child = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "service.py")],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stderr is not None
        deadline = time.monotonic() + 60
        for line in child.stderr:
            if "metrics saw #1 " in line:
                break
            assert time.monotonic() < deadline, "the service never handled its first event"
        child.send_signal(signal.SIGTERM)
        _, rest = child.communicate(timeout=60)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 0, rest
    assert "got SIGTERM: stopping" in rest


def test_orders_counts_each_order_once_across_runs(tmp_path: Path) -> None:
    first = run_example("orders.py", tmp_path)
    assert "ada: total 38 from 2 order(s)" in first
    assert "bob: total 12 from 1 order(s)" in first
    assert "orders placed: 3" in first
    second = run_example("orders.py", tmp_path)
    assert "ada: total 76 from 4 order(s)" in second
    assert "bob: total 24 from 2 order(s)" in second
    assert "orders placed: 6" in second
