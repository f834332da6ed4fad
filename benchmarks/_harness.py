"""What every workload is made of, and how its cases are run and repeated.

A `Workload` turns the command-line options into a list of `Case` values. A
case is one thing to time: its ``run`` builds fresh state, measures, checks
that nothing was lost, and returns its figures. `run_cases` runs every case
``repeat`` times, interleaved (case A, B, C, then A, B, C again) so that
drift of the machine during the run affects every case alike.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import attrs

from ._gc import GCTimer
from ._progress import ProgressBar
from ._report import CaseResult, Comparison, Metric
from ._stores import StoreKind

#: The directory holding the ``benchmarks`` package: where its programs start.
ROOT = Path(__file__).resolve().parent.parent


class BenchmarkFailed(Exception):
    """A case did not do what it measured: events lost, duplicated, reordered, or late.

    Its figures mean nothing; the run stops with this message.
    """


def run_program(
    argv: Sequence[str],
    *,
    what: str,
    timeout: float,
    env: Mapping[str, str] | None = None,
    stdin: str | None = None,
    check_status: int | None = None,
) -> dict[str, float]:
    """Run a benchmark program (``python -m ...``) from the repository root; return its figures.

    The program prints one JSON object on stdout: its figures, and perhaps a
    list of ``problems``, which is left out.

    Args:
        argv: The command, from ``sys.executable`` on.
        what: The run, as failure messages name it.
        timeout: Seconds before the program is killed and the run fails.
        env: Variables to add to this process's environment (secrets go here,
            not on the command line, where the process list would show them).
        stdin: Text to feed the program.
        check_status: The exit status with which the program says its own
            correctness check failed: its stderr is then the whole message.

    Raises:
        BenchmarkFailed: The program timed out or exited with another status than 0.
    """
    try:
        done = subprocess.run(
            argv,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchmarkFailed(f"{what} timed out after {timeout:g}s") from None
    if done.returncode != 0:
        detail = "\n".join(done.stderr.strip().splitlines()[-20:])
        if done.returncode == check_status:
            raise BenchmarkFailed(detail)
        raise BenchmarkFailed(f"{what} failed (exit status {done.returncode}): {detail}")
    figures = json.loads(done.stdout)
    return {key: float(value) for key, value in figures.items() if key != "problems"}


@attrs.frozen(kw_only=True)
class Options:
    """The options every workload takes (``python -m benchmarks run --help``).

    Attributes:
        events: Events (N) per run of a case.
        consumers: Consumers (K) per flow.
        repeat: Runs of each case; the table shows medians.
        stores: The stores to run the store-backed cases on.
        timeout: Seconds one run may take before it counts as failed.
        progress: Prints a line of progress on stderr (above the progress
            bar, if one is drawn): for cases that do long work in one run.
    """

    events: int
    consumers: int
    repeat: int
    stores: Sequence[StoreKind]
    timeout: float
    progress: Callable[[str], None] = attrs.field(default=lambda line: print(line, file=sys.stderr))


@attrs.frozen(kw_only=True)
class Case:
    """One measurement, repeated ``--repeat`` times.

    Attributes:
        id: Short and stable: what ``--case`` selects and the table shows.
        description: What it does, in a sentence.
        store: The store kind it runs on, or None for a baseline.
        consumers: Consumers (or receiving tasks) it feeds.
        events: Events published (or objects sent) per run.
        run: Does one run and returns its figures by metric key; raises
            `BenchmarkFailed` if the run's correctness check fails.
        params: Its other settings, recorded in the JSON file.
        reference: The baseline the ratios are taken against (one per workload).
        baseline: The id of a case on the same store whose figures this
            case's are also divided by (the workload's ``baseline_label``
            column), or None.
        compared: The ids of the cases it is compared with in the workload's
            other columns of ratios, by `Comparison` key: cases on the same
            store or on none (peers), with as many consumers or none.
    """

    id: str
    description: str
    store: str | None
    consumers: int
    events: int
    run: Callable[[], Mapping[str, float]]
    params: Mapping[str, object] = attrs.field(factory=dict)
    reference: bool = False
    baseline: str | None = None
    compared: Mapping[str, str] = attrs.field(factory=dict)


def positive_int(text: str) -> int:
    """An argparse ``type``: an int >= 1 (``100_000`` is accepted)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_ints(text: str) -> list[int]:
    """An argparse ``type``: a comma-separated list of ints >= 1, such as ``1,4,16``."""
    return [positive_int(part) for part in text.split(",")]


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return value


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """A workload with no options of its own."""


@attrs.frozen(kw_only=True)
class Workload:
    """A kind of benchmark: ``python -m benchmarks run NAME``.

    Attributes:
        name: What the command line calls it.
        summary: One line for ``--help``.
        metrics: The figures its table shows, in column order.
        ratio_metric: The figure whose ratio to the reference case is shown.
        ratio_label: The header of that ratio's column.
        baseline_label: The header of the column dividing ``ratio_metric``
            by that of each case's ``baseline`` case; shown when a case has one.
        cases: Builds the cases to run from the common options and the
            parsed command line (for the workload's own options).
        add_arguments: Adds the workload's own options to its parser.
        defaults: This workload's defaults for the common options ``events``,
            ``consumers`` and ``repeat``, where they differ from 100,000, 4 and 3.
        option_help: What the common options mean for this workload, where
            that differs (shown by ``--help``).
        comparisons: Its other columns of ratios (`Case.compared` names the
            cases each case is compared with), shown where some case has one.
    """

    name: str
    summary: str
    metrics: Sequence[Metric]
    ratio_metric: str
    ratio_label: str
    cases: Callable[[Options, argparse.Namespace], Sequence[Case]]
    add_arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
    baseline_label: str = "vs baseline"
    defaults: Mapping[str, int] = attrs.field(factory=dict)
    option_help: Mapping[str, str] = attrs.field(factory=dict)
    comparisons: Sequence[Comparison] = ()


def select_cases(cases: Sequence[Case], wanted: Sequence[str] | None) -> list[Case]:
    """Keep the cases named in ``wanted`` (all if None), the reference, and those they are
    compared with.

    Raises:
        ValueError: A name in ``wanted`` is not one of the cases' ids.
    """
    if wanted is None:
        return list(cases)
    known = {case.id for case in cases}
    unknown = sorted(set(wanted) - known)
    if unknown:
        raise ValueError(
            f"unknown case {', '.join(unknown)}; this workload has: {', '.join(sorted(known))}"
        )
    baselines = {case.baseline for case in cases if case.id in wanted}
    baselines |= {other for case in cases if case.id in wanted for other in case.compared.values()}
    return [case for case in cases if case.reference or case.id in wanted or case.id in baselines]


def run_cases(
    workload: Workload,
    cases: Sequence[Case],
    *,
    repeat: int,
    progress: ProgressBar,
) -> list[CaseResult]:
    """Run every case ``repeat`` times, interleaved; report each run to ``progress``.

    Raises:
        BenchmarkFailed: A run's correctness check failed.
    """
    runs: list[list[Mapping[str, float]]] = [[] for _ in cases]
    # The cases' inputs (events built in advance) live through every run: keep
    # them out of the collector's way, so that a run pays only for its own heap.
    gc.collect()
    gc.freeze()
    try:
        total = repeat * len(cases)
        done = 0
        for attempt in range(1, repeat + 1):
            for case, case_runs in zip(cases, runs, strict=True):
                where = f"{case.store or 'no store'}, K={case.consumers}, N={case.events:,}"
                progress.start(f"{workload.name} {case.id} ({where}) run {attempt}/{repeat}")
                # Garbage left by the previous run is not this run's cost.
                gc.collect()
                with GCTimer() as collecting:
                    measured = case.run()
                # A case run in a subprocess reports its own gc_s.
                figures = {"gc_s": collecting.seconds, **measured}
                case_runs.append(figures)
                done += 1
                shown = "  ".join(
                    f"{metric.label} {figures[metric.key]:,.{metric.decimals}f}"
                    for metric in workload.metrics
                    if metric.key in figures
                )
                progress.advance(
                    f"[{done}/{total}] {workload.name} {case.id} ({where}) "
                    f"run {attempt}/{repeat}: {shown}"
                )
    finally:
        gc.unfreeze()
    return [
        CaseResult(
            case=case.id,
            description=case.description,
            store=case.store,
            consumers=case.consumers,
            events=case.events,
            params=case.params,
            reference=case.reference,
            baseline=case.baseline,
            compared=case.compared,
            runs=case_runs,
        )
        for case, case_runs in zip(cases, runs, strict=True)
    ]
