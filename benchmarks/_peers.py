"""The peers: other systems measured on the fan-out workload, in the same run as trioflow.

A peer is a message log with durable per-reader positions, driven by a
hand-written asyncio program in a subprocess (as the hand-written asyncpg
program is), doing the fan-out workload's job: publish N events of about 200
bytes in batches, deliver every event to each of K readers in order, decode
it, call a no-op handler, and durably acknowledge it. ``--peer NAME`` asks
for one (see `PEERS`); each needs its client library (``pip install
'.[bench]'``) and a reachable server, or it is skipped with a line saying why.

This module imports nothing but the standard library and attrs, because two
kinds of process use it: the harness (where ``python -m benchmarks list``
must work without the peers' clients) and the peer programs themselves,
asyncio processes that must not import trio. The first part is the
harness's (the registry and the reachability probe); the second is shared by
the programs (the handler, the order check, the command line).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import json
import os
import subprocess
import sys
import urllib.parse
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from ._readers import Outcome as Outcome
from ._readers import Tally as Tally
from ._readers import figures as figures
from ._readers import order_problems as order_problems
from ._readers import report

#: What ``--peer`` takes to mean every peer.
ALL_PEERS = "all"
#: Seconds a probe (a subprocess connecting once) may take.
PROBE_TIMEOUT = 30.0
#: Seconds the programs wait for a server to accept a connection.
CONNECT_TIMEOUT = 5.0
#: The directory holding the ``benchmarks`` package: where the programs start.
_ROOT = Path(__file__).resolve().parent.parent


@attrs.frozen(kw_only=True)
class Probe:
    """What a peer program's ``--probe`` found out about its server.

    Attributes:
        problem: Why the peer cannot run here, or None.
        server: The server's version and durability settings, as far as the
            client may ask (recorded with the results).
        client: The client library's version and options.
    """

    problem: str | None
    server: Mapping[str, object] = attrs.field(factory=dict)
    client: Mapping[str, object] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class PeerKind:
    """A system the fan-out workload also runs on, through its own program.

    Attributes:
        name: The name ``--peer`` takes.
        case: The id of its case in the results.
        title: The system's name in messages, such as ``"Redis"``.
        program: The module run as ``python -m PROGRAM`` in a subprocess.
        package: The client's import name, looked for without importing it.
        distribution: The client's name on PyPI, for the message when missing.
        url_variable: The environment variable naming the server.
        default_url: The server used when that variable is not set.
    """

    name: str
    case: str
    title: str
    program: str
    package: str
    distribution: str
    url_variable: str
    default_url: str

    def url(self) -> str:
        """The server to measure: ``$url_variable``, or `default_url`."""
        return os.environ.get(self.url_variable) or self.default_url

    def probe(self) -> Probe:
        """Ask the program to connect to `url` once (asked once per URL, then remembered)."""
        if importlib.util.find_spec(self.package) is None:
            return Probe(
                problem=f"its client, {self.distribution}, is not installed "
                "(pip install '.[bench]')"
            )
        probe = _probe(self.program, self.url_variable, self.url())
        if probe.problem is None:
            return probe
        return attrs.evolve(
            probe,
            problem=f"{probe.problem} (the benchmarks use ${self.url_variable}, "
            f"default {self.default_url})",
        )

    def unavailable(self) -> str | None:
        """Why this peer cannot run here (client missing, server unreachable), or None."""
        return self.probe().problem


PEERS: dict[str, PeerKind] = {
    peer.name: peer
    for peer in (
        PeerKind(
            name="redis",
            case="redis-streams",
            title="Redis",
            program="benchmarks.redis_fanout",
            package="redis",
            distribution="redis",
            url_variable="TRIOFLOW_BENCH_REDIS_URL",
            default_url="redis://127.0.0.1:6379/0",
        ),
        PeerKind(
            name="nats",
            case="nats-jetstream",
            title="NATS JetStream",
            program="benchmarks.nats_fanout",
            package="nats",
            distribution="nats-py",
            url_variable="TRIOFLOW_BENCH_NATS_URL",
            default_url="nats://127.0.0.1:4222",
        ),
    )
}


def peers_named(names: Sequence[str]) -> list[PeerKind]:
    """The peers ``names`` asks for (``all``: every one), each once, in `PEERS` order."""
    wanted = set(PEERS) if ALL_PEERS in names else set(names)
    return [peer for name, peer in PEERS.items() if name in wanted]


def select_peers(names: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The names of the peers asked for that can run here, and why each other one cannot."""
    available: list[str] = []
    skipped: dict[str, str] = {}
    for peer in peers_named(names):
        reason = peer.unavailable()
        if reason is None:
            available.append(peer.name)
        else:
            skipped[peer.name] = reason
    return available, skipped


@functools.cache
def _probe(program: str, url_variable: str, url: str) -> Probe:
    try:
        done = subprocess.run(
            [sys.executable, "-m", program, "--probe"],
            cwd=_ROOT,
            # In the environment, not on the command line, where a password
            # in the URL would show in the process list.
            env={**os.environ, url_variable: url},
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Probe(problem=f"{masked(url)} did not answer within {PROBE_TIMEOUT:g}s")
    try:
        answer = json.loads(done.stdout)
        return Probe(problem=answer["problem"], server=answer["server"], client=answer["client"])
    except (ValueError, KeyError, TypeError):
        lines = done.stderr.strip().splitlines() or ["no output"]
        return Probe(
            problem=f"{program} --probe failed (exit status {done.returncode}): {lines[-1]}"
        )


# --- shared by the peer programs (asyncio, in subprocesses) ---------------------------


def masked(url: str) -> str:
    """``url`` with any password replaced by ``***``, fit for messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def program_parser(peer: PeerKind, description: str) -> argparse.ArgumentParser:
    """The command line every peer program takes (``python -m PROGRAM --help``)."""
    parser = argparse.ArgumentParser(prog=f"python -m {peer.program}", description=description)
    parser.add_argument(
        "--url",
        default=peer.url(),
        help=f"the server (default: ${peer.url_variable}, else {peer.default_url})",
    )
    parser.add_argument(
        "--probe",
        action="store_true",
        help="only connect once and print, as JSON, whether the peer can run and its versions",
    )
    parser.add_argument(
        "--name",
        default=f"tf_bench_{os.urandom(8).hex()}",
        help="the stream to create, use and delete (default: a new random name)",
    )
    parser.add_argument("--events", type=_positive_int, default=100_000, metavar="N")
    parser.add_argument("--readers", type=_positive_int, default=4, metavar="K")
    parser.add_argument("--batch-size", type=_positive_int, default=1000, metavar="B")
    parser.add_argument("--page-size", type=_positive_int, default=1000, metavar="P")
    parser.add_argument("--commit-every", type=_positive_int, default=100, metavar="C")
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="give up (and fail) after this long; the stream is deleted all the same",
    )
    return parser


def program_main(
    argv: Sequence[str] | None,
    parser: argparse.ArgumentParser,
    *,
    run: Callable[[argparse.Namespace], Coroutine[Any, Any, Outcome]],
    probe: Callable[[str], Coroutine[Any, Any, Probe]],
) -> int:
    """Probe, or run once; print the outcome as JSON; return 1 if the check failed."""
    args = parser.parse_args(argv)
    if args.probe:
        found = asyncio.run(probe(args.url))
        print(json.dumps(attrs.asdict(found)), flush=True)
        return 0
    return report(asyncio.run(run(args)))
