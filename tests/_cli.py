"""The `trioflow` command end to end, in processes of its own, on any store URL.

`check_run_status_reset_and_stop` is the scenario of the issue's proof: it is
run on SQLite (``tests/test_cli_processes.py``) and on PostgreSQL
(``tests/postgres/test_cli.py``). The command runs as ``python -m trioflow``
from the repository, so ``examples.served_app:app`` imports.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

import trioflow
import trioflow.stores
from tests._procs import Child, child_environment, running_argv

ROOT = Path(__file__).resolve().parent.parent

#: Seconds a step may take before the test fails: a guard against a hang.
LIMIT = 60

#: The App the scenarios serve.
APP = "examples.served_app:app"


def cli_environment() -> dict[str, str]:
    env = child_environment()
    env.pop("TRIOFLOW_STORE", None)
    return env


def running_cli(*args: str, stderr: Path) -> contextlib.AbstractAsyncContextManager[Child]:
    """Run ``trioflow ARGS`` with stdout piped; kill it if still running on exit."""
    argv = [sys.executable, "-m", "trioflow", *args]
    return running_argv(argv, stderr=stderr, cwd=ROOT, env=cli_environment())


async def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``trioflow ARGS`` to its end; its status, stdout and stderr."""
    with trio.fail_after(LIMIT):
        done = await trio.run_process(
            [sys.executable, "-m", "trioflow", *args],
            cwd=ROOT,
            env=cli_environment(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


async def publish(url: str, *events: tuple[str, Any]) -> list[int]:
    """Publish ``events`` to the store ``url`` from this process; their seqs."""
    app = trioflow.App(store=url)
    async with trioflow.open_flow(app) as flow:
        return await flow.publish_many(events)


async def status_of(url: str) -> dict[str, dict[str, Any]]:
    """``trioflow status --json``: its rows, by consumer."""
    done = await cli("status", "--json", "--store", url)
    assert done.returncode == 0, done.stderr
    return {row["consumer"]: row for row in json.loads(done.stdout)["consumers"]}


async def audited(child: Child, until: int) -> list[int]:
    """The seqs of the ``audit`` lines ``trioflow run`` prints, up to ``until``."""
    seqs: list[int] = []
    while not seqs or seqs[-1] != until:
        line = await child.read_line(limit=LIMIT, what=f"audit line up to {until}")
        match = re.fullmatch(r"audit (\d+) \S+", line)
        assert match, line
        seqs.append(int(match[1]))
    return seqs


async def wait_logged(child: Child, text: str) -> None:
    """Wait until the child's stderr holds ``text``."""
    with trio.fail_after(LIMIT):
        while text not in child.stderr.read_text(errors="replace"):
            if child.process.poll() is not None:
                raise AssertionError(f"exited before logging {text!r}; {child.describe()}")
            await trio.sleep(0.05)


async def check_run_status_reset_and_stop(url: str, tmp_path: Path) -> None:
    """Serve the example App with ``trioflow run``, watch it with ``status``,
    reset its consumer while it runs (refused, then forced), stop it with SIGTERM.
    """
    await publish(url, *[("tick", {"n": n}) for n in range(1, 20)], ("order.paid", {"amount": -1}))
    async with running_cli("run", APP, "--store", url, stderr=tmp_path / "run.stderr") as served:
        assert await audited(served, 20) == list(range(1, 21))
        pid = served.process.pid
        rows = await status_of(url)
        assert set(rows) == {"audit", "billing/0", "billing/1", "billing/2", "billing/3"}
        assert all(f":{pid}:" in (row["owner"] or "") for row in rows.values()), rows
        letters = [row["dead_letters"] for name, row in rows.items() if name != "audit"]
        assert sorted(letters) == [0, 0, 0, 1], rows

        refused = await cli("consumers", "reset", "audit", "--to", "0", "--store", url)
        assert refused.returncode == 4, refused
        assert re.fullmatch(
            rf"trioflow: error: consumer 'audit' runs in a flow \(its lease is held: audit by "
            rf"\S+:{pid}:\S+\); stop the flow first, or pass --force .*\n",
            refused.stderr,
        ), refused.stderr

        forced = await cli("consumers", "reset", "audit", "--to", "0", "--force", "--store", url)
        assert forced.returncode == 0, forced
        assert re.fullmatch(r"audit: (none|\d+) -> 0\n", forced.stdout), forced.stdout
        # The running flow lost the consumer, took it back with a new token,
        # and handles the log again from the reset cursor, in order.
        again = await audited(served, 20)
        assert again[-20:] == list(range(1, 21)), again
        (seq,) = await publish(url, ("tick", {"n": 21}))
        assert await audited(served, seq) == [seq]

        served.process.send_signal(signal.SIGTERM)
        output = await served.finish(limit=LIMIT)
        assert output == ""
        assert "SIGTERM: stopping gracefully" in served.stderr.read_text()
    rows = await status_of(url)
    # Graceful: every position committed, every lease released.
    assert rows["audit"]["cursor"] == seq == rows["audit"]["head"], rows
    assert all(row["owner"] is None for row in rows.values()), rows


async def check_tail_follows(url: str, tmp_path: Path) -> None:
    """``trioflow tail --follow`` prints what is there, then what comes."""
    await publish(url, *[("tick", {"n": n}) for n in range(1, 4)])
    async with running_cli(
        "tail", "--follow", "--from", "2", "--store", url, stderr=tmp_path / "tail.stderr"
    ) as tail:
        lines = [json.loads(await tail.read_line(limit=LIMIT)) for _ in range(2)]
        assert [(e["seq"], e["data"]) for e in lines] == [(2, {"n": 2}), (3, {"n": 3})]
        await publish(url, ("later", {"n": 4}), ("later", [5]))
        lines = [json.loads(await tail.read_line(limit=LIMIT)) for _ in range(2)]
        assert [(e["seq"], e["type"], e["data"]) for e in lines] == [
            (4, "later", {"n": 4}),
            (5, "later", [5]),
        ]


def one_error_line(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """The command printed one error line holding ``fragments``, and nothing else."""
    assert done.stdout == ""
    assert re.fullmatch(r"trioflow: error: [^\n]+\n", done.stderr), done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, done.stderr


async def check_prune_keeps_what_cursors_need(url: str) -> None:
    """``trioflow prune`` refuses to pass a cursor, and deletes only what all passed."""
    await publish(url, *[("tick", {"n": n}) for n in range(1, 21)])
    store = trioflow.stores.store_from_url(url)
    async with store.open():
        await store.set_cursor("audit", 20)
        await store.set_cursor("laggard", 5)
    refused = await cli("prune", "--before", "21", "--store", url)
    assert refused.returncode == 4, refused
    one_error_line(refused, "would pass the cursors of consumer(s) 'laggard' (at 5)")
    passed = await cli("prune", "--before", "21", "--only-passed", "--store", url)
    assert (passed.returncode, passed.stdout) == (
        0,
        "deleted 5 event(s); the log holds seq 6 to 20\n",
    ), passed
    tail = await cli("tail", "--from", "1", "--last", "0", "--store", url)
    assert tail.returncode == 2, tail
    kept = await cli("tail", "--from", "1", "--store", url)
    assert [json.loads(line)["seq"] for line in kept.stdout.splitlines()] == list(range(6, 21))
