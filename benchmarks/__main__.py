"""The command line: ``python -m benchmarks run WORKLOAD [options]``, ``python -m benchmarks list``.

Progress goes to stderr, one line per run of a case; the results table goes
to stdout; ``--json FILE`` saves every figure with the machine and command.
Exit status: 0 done, 1 a correctness check failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from ._harness import (
    BenchmarkFailed,
    Case,
    Options,
    Workload,
    positive_float,
    positive_int,
    positive_ints,
    run_cases,
    select_cases,
)
from ._peers import peers_named, select_peers
from ._plot import PlotUnavailable, plot_report, require_pyplot
from ._progress import ProgressBar
from ._report import Report, machine_info, utc_now
from ._stores import STORES, postgres_server_version

#: Every workload, by name: the module whose ``WORKLOAD`` defines it. A module
#: that needs an optional package (a peer's client) imports it in its cases,
#: so that listing the workloads never requires it.
WORKLOADS: dict[str, str] = {
    "fanout": "benchmarks.fanout",
    "scenarios": "benchmarks.scenarios",
    "slow-consumer": "benchmarks.slow_consumer",
    "recovery": "benchmarks.recovery",
    "latency": "benchmarks.latency",
    "failover": "benchmarks.failover",
    "groups": "benchmarks.groups",
}


def load_workload(name: str) -> Workload:
    """Import the workload ``name`` from `WORKLOADS`."""
    workload = importlib.import_module(WORKLOADS[name]).WORKLOAD
    if not isinstance(workload, Workload) or workload.name != name:
        raise TypeError(f"{WORKLOADS[name]}.WORKLOAD is not the Workload named {name!r}")
    return workload


def _add_common_arguments(parser: argparse.ArgumentParser, workload: Workload) -> None:
    defaults = {"events": 100_000, "consumers": 4, "repeat": 3, **workload.defaults}
    meaning = {
        "events": "events per run of each case",
        "consumers": "consumers per flow; a list such as 1,4,16 runs every case at each",
        "repeat": "runs of each case; the table shows medians",
        **workload.option_help,
    }
    parser.add_argument(
        "--store",
        action="append",
        choices=sorted(STORES),
        help="store to run the trioflow cases on; repeat for several (default: memory)",
    )
    parser.add_argument(
        "--events",
        type=positive_int,
        default=defaults["events"],
        metavar="N",
        help=f"{meaning['events']} (default: {defaults['events']:,})",
    )
    parser.add_argument(
        "--consumers",
        type=positive_ints,
        default=[defaults["consumers"]],
        metavar="K[,K...]",
        help=f"{meaning['consumers']} (default: {defaults['consumers']})",
    )
    parser.add_argument(
        "--repeat",
        type=positive_int,
        default=defaults["repeat"],
        metavar="R",
        help=f"{meaning['repeat']} (default: {defaults['repeat']})",
    )
    parser.add_argument(
        "--case",
        action="append",
        metavar="ID",
        help="run only this case (repeatable); the reference case always runs",
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=600.0,
        metavar="SECONDS",
        help="fail a run that takes longer than this (default: %(default)s)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        metavar="FILE",
        help="also write every figure, the machine and the command to FILE",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="DIR",
        help="also draw the figures as PNG files in DIR (needs the bench extra: matplotlib)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser for ``python -m benchmarks``, with every workload's own options."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmarks for trioflow, measured against in-process baselines.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("list", help="list the workloads and stores")
    plot = commands.add_parser("plot", help="draw a results file (--json) as PNG files")
    plot.add_argument("file", type=Path, metavar="FILE.json", help="a file written by run --json")
    plot.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="where to write the PNG files (default: beside FILE.json)",
    )
    run = commands.add_parser("run", help="run a workload and print its results table")
    workloads = run.add_subparsers(dest="workload", required=True, metavar="WORKLOAD")
    for name in WORKLOADS:
        workload = load_workload(name)
        sub = workloads.add_parser(name, help=workload.summary, description=workload.summary)
        _add_common_arguments(sub, workload)
        workload.add_arguments(sub)
    return parser


def check_command_line(argv: Sequence[str]) -> argparse.Namespace:
    """Check ``argv`` as `main` would before it measures, measuring nothing.

    For command lines shown in the documentation: the options must parse, and
    every ``--case`` must name a case of the workload, with every store and
    peer asked for, reachable here or not (no server is asked). Bad usage exits
    as `main` does: status 2, argparse's message on stderr.

    Returns:
        The parsed arguments.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run" and args.case:
        workload = load_workload(args.workload)
        stores = [STORES[name] for name in dict.fromkeys(args.store or ["memory"])]
        tiny = Options(events=1, consumers=1, repeat=1, stores=stores, timeout=args.timeout)
        # A peer's case asks its server when built; its id is known without.
        peers = peers_named(getattr(args, "peer", None) or ())
        without_peers = argparse.Namespace(**{**vars(args), "peer": None})
        known = {case.id for case in workload.cases(tiny, without_peers)}
        known |= {peer.case for peer in peers}
        unknown = sorted(set(args.case) - known)
        if unknown:
            parser.error(
                f"unknown case {', '.join(unknown)}; this run has: {', '.join(sorted(known))}"
            )
    return args


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _build_cases(
    workload: Workload, options: Options, sweep: Sequence[int], args: argparse.Namespace
) -> list[Case]:
    """The workload's cases for every consumer count in ``sweep``, in that order.

    A case that feeds no consumers (K=0: a program that only writes) is the
    same at every count: it runs once, with the first.

    Raises:
        ValueError: ``--case`` names a case the workload does not have.
    """
    cases: list[Case] = []
    for consumers in sweep:
        each = attrs.evolve(options, consumers=consumers)
        cases.extend(select_cases(workload.cases(each, args), args.case))
    alone: set[tuple[str, str | None]] = set()
    once: list[Case] = []
    for case in cases:
        if case.consumers == 0:
            if (case.id, case.store) in alone:
                continue
            alone.add((case.id, case.store))
        once.append(case)
    return once


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: this process's); return the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(arguments)
    if args.command == "list":
        width = max(map(len, [*WORKLOADS, *STORES]))
        print("workloads:")
        for name in WORKLOADS:
            print(f"  {name:{width}} {load_workload(name).summary}")
        print("stores:")
        for kind in STORES.values():
            reason = kind.unavailable()
            print(
                f"  {kind.name:{width}} {kind.summary}"
                + (f" [unavailable: {reason}]" if reason else "")
            )
        return 0

    if args.command == "plot":
        try:
            report = json.loads(args.file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            parser.error(f"cannot read {args.file}: {exc}")
        return _plot(report, args.out or args.file.parent)

    if args.plot is not None:
        # Fail before measuring, not after.
        try:
            require_pyplot()
        except PlotUnavailable as exc:
            parser.error(str(exc))
    workload = load_workload(args.workload)
    stores = []
    skipped: dict[str, str] = {}
    for kind in (STORES[name] for name in dict.fromkeys(args.store or ["memory"])):
        reason = kind.unavailable()
        if reason is None:
            stores.append(kind)
        elif kind.server:
            # A server that is not running is a fact of this machine, not a
            # mistake in the command: measure the rest.
            skipped[kind.name] = reason
            _progress(f"skipping store {kind.name!r}: {reason}")
        else:
            parser.error(f"store {kind.name!r} is unavailable: {reason}")
    # Peers (--peer: other systems on the same workload) are skipped as a store
    # whose server is down is; the workload gets the names of those that can run.
    skipped_peers: dict[str, str] = {}
    if getattr(args, "peer", None):
        args.peer, skipped_peers = select_peers(args.peer)
        for name, reason in skipped_peers.items():
            _progress(f"skipping peer {name!r}: {reason}")
    sweep: list[int] = list(dict.fromkeys(args.consumers))
    bar = ProgressBar(total=0)
    options = Options(
        events=args.events,
        consumers=sweep[0],
        repeat=args.repeat,
        stores=stores,
        timeout=args.timeout,
        progress=bar.note,
    )
    try:
        cases = _build_cases(workload, options, sweep, args)
    except ValueError as exc:
        parser.error(str(exc))
    command = shlex.join(["python", "-m", "benchmarks", *arguments])
    started_at = utc_now()
    bar.total = len(cases) * options.repeat
    bar.note(
        f"{command}: {len(cases)} cases x {options.repeat} runs, "
        f"N={options.events:,}, K={','.join(map(str, sweep))}"
    )
    try:
        results = run_cases(workload, cases, repeat=options.repeat, progress=bar)
    except BenchmarkFailed as exc:
        bar.note(f"BENCHMARK FAILED: {exc}")
        return 1
    finally:
        bar.close()
    report = Report(
        workload=workload.name,
        command=command,
        started_at=started_at,
        options={
            key: str(value) if isinstance(value, Path) else value
            for key, value in vars(args).items()
            if key not in ("command", "workload")
        }
        | {"store": [kind.name for kind in stores]},
        metrics=workload.metrics,
        ratio_metric=workload.ratio_metric,
        ratio_label=workload.ratio_label,
        baseline_label=workload.baseline_label,
        comparisons=workload.comparisons,
        results=results,
        machine=machine_info()
        | (
            {"postgresql": postgres_server_version()}
            if any(kind.family == "postgres" for kind in stores)
            else {}
        ),
        skipped=skipped,
        skipped_peers=skipped_peers,
    )
    print(report.table(), flush=True)
    if args.json is not None:
        report.write_json(args.json)
        _progress(f"wrote {args.json}")
    if args.plot is not None:
        return _plot(report.to_json(), args.plot)
    return 0


def _plot(report: dict[str, Any], directory: Path) -> int:
    try:
        paths = plot_report(report, directory)
    except PlotUnavailable as exc:
        _progress(str(exc))
        return 2
    for path in paths:
        _progress(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
