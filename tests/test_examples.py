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
