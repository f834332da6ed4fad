"""The `trioflow` command end to end on SQLite, in processes of its own.

The same scenarios run on PostgreSQL in ``tests/postgres/test_cli.py``.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import trio

from tests._cli import (
    APP,
    LIMIT,
    audited,
    check_prune_keeps_what_cursors_need,
    check_run_status_reset_and_stop,
    check_tail_follows,
    cli,
    one_error_line,
    publish,
    running_cli,
    wait_logged,
)
from tests._procs import sqlite_url


async def test_run_status_reset_and_graceful_stop(tmp_path: Path) -> None:
    await check_run_status_reset_and_stop(sqlite_url(tmp_path / "events.db"), tmp_path)


async def test_tail_follows_new_events(tmp_path: Path) -> None:
    await check_tail_follows(sqlite_url(tmp_path / "events.db"), tmp_path)


async def test_a_second_signal_stops_at_once(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "events.db")
    # The handler takes an hour on this event; the App's grace is 30 s.
    await publish(url, ("slow", {"pause": 3600}))
    async with running_cli("run", APP, "--store", url, stderr=tmp_path / "run.stderr") as served:
        assert await audited(served, 1) == [1]
        served.process.send_signal(signal.SIGTERM)
        await wait_logged(served, "SIGTERM: stopping gracefully")
        served.process.send_signal(signal.SIGTERM)
        with trio.fail_after(LIMIT):
            await served.process.wait()
        assert served.process.returncode == 128 + signal.SIGTERM, served.describe()
        assert "SIGTERM again: stopping at once" in served.stderr.read_text()


async def test_run_exits_with_a_one_line_reason_when_the_store_cannot_open(
    tmp_path: Path,
) -> None:
    done = await cli("run", APP, "--store", sqlite_url(tmp_path / "no-such-dir" / "e.db"))
    assert done.returncode == 3, done
    # The log may say more; the last line is the reason.
    assert done.stderr.splitlines()[-1].startswith("trioflow: error: "), done.stderr
    assert "no-such-dir" in done.stderr.splitlines()[-1]


async def test_unreachable_stores_and_bad_arguments_in_a_process(tmp_path: Path) -> None:
    unreachable = await cli("status", "--store", "postgresql://ann:pw-123@127.0.0.1:1/db")
    assert unreachable.returncode == 3
    one_error_line(unreachable, "***@127.0.0.1:1")
    assert "pw-123" not in unreachable.stderr
    bad = await cli("consumers", "reset", "audit", "--to", "yesterday", "--store", "memory://")
    assert bad.returncode == 2
    one_error_line(bad, "--to 'yesterday'")


async def test_run_serves_metrics_on_the_port_asked_for(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "events.db")
    await publish(url, ("tick", {}))
    args = ("run", APP, "--store", url, "--metrics-port", "0")
    async with running_cli(*args, stderr=tmp_path / "run.stderr") as served:
        assert await audited(served, 1) == [1]
        await wait_logged(served, "serving metrics and health checks on port ")
        logged = served.stderr.read_text()
        port = int(re.search(r"on port (\d+)", logged)[1])  # type: ignore[index]
        with trio.fail_after(LIMIT):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(
                    b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                answer = b""
                while chunk := await stream.receive_some():
                    answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        assert b'consumer="audit"' in answer
        served.process.send_signal(signal.SIGTERM)
        await served.finish(limit=LIMIT)


async def test_prune_keeps_what_cursors_need(tmp_path: Path) -> None:
    await check_prune_keeps_what_cursors_need(sqlite_url(tmp_path / "events.db"))


async def test_status_watch_prints_a_document_per_refresh(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "events.db")
    await publish(url, ("tick", {}))
    args = ("status", "--watch", "--json", "--interval", "0.1", "--store", url)
    async with running_cli(*args, stderr=tmp_path / "status.stderr") as watching:
        first = json.loads(await watching.read_line(limit=LIMIT))
        assert first == {"head": 1, "consumers": []}
        await publish(url, ("tick", {}))
        with trio.fail_after(LIMIT):
            while json.loads(await watching.read_line(limit=LIMIT))["head"] != 2:
                pass


async def test_status_watch_without_a_terminal_prints_a_table_per_refresh(tmp_path: Path) -> None:
    # A terminal's table is redrawn in place; a pipe or a log gets each one.
    url = sqlite_url(tmp_path / "events.db")
    await publish(url, ("tick", {}))
    args = ("status", "--watch", "--interval", "0.1", "--store", url)
    async with running_cli(*args, stderr=tmp_path / "status.stderr") as watching:
        assert (await watching.read_line(limit=LIMIT)).strip() == "0 consumer(s), head 1"
        await publish(url, ("tick", {}))
        with trio.fail_after(LIMIT):
            while (await watching.read_line(limit=LIMIT)).strip() != "0 consumer(s), head 2":
                pass
