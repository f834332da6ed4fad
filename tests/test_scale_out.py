"""Members of one service in real processes on SQLite: killed and frozen.

The scenario and its checks are in ``tests/_scale_out.py``: member processes
run a consumer and a consumer group on one SQLite file while two publisher
processes publish keyed events; members are SIGKILLed at random and
restarted, and one is frozen with SIGSTOP past its lease, then resumed. (A
SQLite store cannot be cut off from one process only: the PostgreSQL twin of
this test, tests/postgres/test_scale_out.py, does that through a proxy.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._procs import sqlite_url
from tests._scale_out import run_scale_out, scale_seeds

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("seed", scale_seeds([1]))
async def test_members_killed_and_frozen_share_a_group_safely(tmp_path: Path, seed: int) -> None:
    url = sqlite_url(tmp_path / "events.db", poll_interval=0.05)
    await run_scale_out(url, tmp_path, seed=seed, members=4, kills=5)
