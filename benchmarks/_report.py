"""Results: the table printed on stdout, the JSON file, the machine they came from."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import sqlite3
import statistics
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import attrs

#: Bumped when the JSON layout changes incompatibly, so plotting scripts can tell.
JSON_FORMAT = 1


@attrs.frozen(kw_only=True)
class Metric:
    """One figure a workload measures on every run of a case.

    Attributes:
        key: Its name in the JSON file, such as ``"delivered_per_s"``.
        label: Its column header in the results table.
        unit: What it counts, such as ``"events/s"``.
        decimals: Digits after the point in the table.
        aggregate: How the table sums up its runs: ``"median"``, or ``"max"``
            for a bound that a single slow run matters to (a failover time).
    """

    key: str
    label: str
    unit: str
    decimals: int = 0
    aggregate: Literal["median", "max"] = "median"


@attrs.frozen(kw_only=True)
class Comparison:
    """A column of ratios beside the workload's own: a case's figure over another case's.

    A case names the case it is compared with under `key` (`CaseResult.compared`);
    that case ran in the same run, on the same store or on none (a peer), with
    as many consumers or with none (a program that only writes).

    Attributes:
        key: Its name in the JSON file, such as ``"copy"``.
        label: Its column header, such as ``"publish vs COPY"``.
        metric: The figure divided, such as ``"publish_per_s"``.
    """

    key: str
    label: str
    metric: str


@attrs.frozen(kw_only=True)
class CaseResult:
    """Every run of one case, and what was measured on each.

    Attributes:
        case: The case's short id, as ``--case`` selects it.
        description: What the case does, in a sentence.
        store: The store it ran on, or None for a baseline with no store.
        consumers: Consumers (or receiving tasks) fed by the case.
        events: Events published (or objects sent) per run.
        params: The case's other settings, for the JSON file.
        reference: Whether this is the baseline the ratios are taken against.
        baseline: The id of the case on the same store it is also compared
            with, or None.
        runs: One mapping of metric key to value per run, in run order.
        compared: The ids of the cases it is compared with, by `Comparison` key.
    """

    case: str
    description: str
    store: str | None
    consumers: int
    events: int
    params: Mapping[str, object]
    reference: bool
    runs: Sequence[Mapping[str, float]]
    baseline: str | None = None
    compared: Mapping[str, str] = attrs.field(factory=dict)

    def figures(self) -> list[str]:
        """The figures measured on every run, sorted."""
        if not self.runs:
            return []
        return sorted(set(self.runs[0]).intersection(*self.runs[1:]))

    def median(self, key: str) -> float:
        """The median over the runs of the figure ``key``."""
        return float(statistics.median(run[key] for run in self.runs))

    def has(self, key: str) -> bool:
        """Whether every run measured the figure ``key`` (a writer alone delivers nothing)."""
        return bool(self.runs) and all(key in run for run in self.runs)

    def summary(self, metric: Metric) -> float:
        """The figure ``metric`` as the table shows it: its median or its max over the runs."""
        if metric.aggregate == "max":
            return max(run[metric.key] for run in self.runs)
        return self.median(metric.key)


@attrs.frozen(kw_only=True)
class Report:
    """What one ``python -m benchmarks run`` measured, ready to print or save.

    Attributes:
        workload: The workload's name.
        command: The command line that produced it, as typed.
        started_at: When the run started, ISO 8601 in UTC.
        options: Every option the run used (defaults included).
        metrics: The figures shown in the table, in column order.
        ratio_metric: The figure whose ratio to the reference case is shown.
        ratio_label: The ratio column's header.
        baseline_label: The header of the column comparing cases with their
            ``baseline`` case (shown when some case has one).
        results: One entry per case, in the order the cases ran.
        machine: Where it ran (see `machine_info`).
        comparisons: The workload's other columns of ratios, shown when some
            case has a baseline for them.
    """

    workload: str
    command: str
    started_at: str
    options: Mapping[str, object]
    metrics: Sequence[Metric]
    ratio_metric: str
    ratio_label: str
    results: Sequence[CaseResult]
    machine: Mapping[str, object]
    baseline_label: str = "vs baseline"
    #: Stores asked for but skipped (their server was unreachable), with why.
    skipped: Mapping[str, str] = attrs.field(factory=dict)
    #: Peers asked for but skipped (client not installed, server unreachable), with why.
    skipped_peers: Mapping[str, str] = attrs.field(factory=dict)
    comparisons: Sequence[Comparison] = ()

    @property
    def reference(self) -> CaseResult | None:
        """The baseline case the ratios are taken against, if it ran."""
        return next((result for result in self.results if result.reference), None)

    def reference_for(self, result: CaseResult) -> CaseResult | None:
        """The reference case with as many consumers as ``result`` (a ``--consumers`` sweep
        runs one per count), else the first one."""
        return next(
            (
                other
                for other in self.results
                if other.reference and other.consumers == result.consumers
            ),
            self.reference,
        )

    def ratio(self, result: CaseResult, key: str) -> float | None:
        """The median of ``key`` for ``result`` over that of its reference case."""
        return _ratio(result, self.reference_for(result), key)

    def baseline_of(self, result: CaseResult) -> CaseResult | None:
        """The case ``result`` is compared with (its ``baseline``, on its store), if it ran."""
        if result.baseline is None:
            return None
        return next(
            (
                other
                for other in self.results
                if other.case == result.baseline
                and other.store == result.store
                and other.consumers == result.consumers
            ),
            None,
        )

    def baseline_ratio(self, result: CaseResult, key: str) -> float | None:
        """The median of ``key`` for ``result`` over that of its baseline case."""
        return _ratio(result, self.baseline_of(result), key)

    def compared_with(self, result: CaseResult, comparison: Comparison) -> CaseResult | None:
        """The case ``result`` is compared with under ``comparison``, if it ran.

        It ran on ``result``'s store or on none, with as many consumers or none.
        """
        case = result.compared.get(comparison.key)
        return next(
            (
                other
                for other in self.results
                if other.case == case
                and other.store in (result.store, None)
                and other.consumers in (result.consumers, 0)
            ),
            None,
        )

    def comparison_ratio(self, result: CaseResult, comparison: Comparison) -> float | None:
        """``comparison``'s figure for ``result`` over that of the case it is compared with."""
        return _ratio(result, self.compared_with(result, comparison), comparison.metric)

    def shown_comparisons(self) -> list[Comparison]:
        """The comparisons some case of this run has a ratio for: the table's extra columns."""
        return [
            comparison
            for comparison in self.comparisons
            if any(self.comparison_ratio(result, comparison) for result in self.results)
        ]

    def table(self) -> str:
        """The results as a Markdown table: medians (or maxima), and the ratios to the baselines.

        A workload without a reference case has no ratio column.
        """
        with_reference = self.reference is not None
        with_baselines = any(result.baseline is not None for result in self.results)
        comparisons = self.shown_comparisons()
        header = ["case", "store", "K", "N", *(m.label for m in self.metrics)]
        if with_reference:
            header.append(self.ratio_label)
        if with_baselines:
            header.append(self.baseline_label)
        header += [comparison.label for comparison in comparisons]
        rows = [header]
        for result in self.results:
            ratios = [self.ratio(result, self.ratio_metric)] if with_reference else []
            if with_baselines:
                ratios.append(self.baseline_ratio(result, self.ratio_metric))
            ratios += [self.comparison_ratio(result, comparison) for comparison in comparisons]
            rows.append(
                [
                    result.case,
                    result.store or "-",
                    str(result.consumers),
                    f"{result.events:,}",
                    *(
                        f"{result.summary(m):,.{m.decimals}f}" if result.has(m.key) else "-"
                        for m in self.metrics
                    ),
                    *("-" if ratio is None else f"{ratio:.2f}" for ratio in ratios),
                ]
            )
        # Markdown wants three characters in every cell of the rule below the header.
        widths = [max(3, *(len(row[i]) for row in rows)) for i in range(len(header))]
        # Text columns left-aligned, figures right-aligned (as Markdown's "---:").
        left = {0, 1}
        lines = []
        for index, row in enumerate(rows):
            cells = [
                cell.ljust(width) if i in left else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            ]
            lines.append("| " + " | ".join(cells) + " |")
            if index == 0:
                rules = [
                    "-" * width if i in left else "-" * (width - 1) + ":"
                    for i, width in enumerate(widths)
                ]
                lines.append("| " + " | ".join(rules) + " |")
        return "\n".join(lines)

    def to_json(self) -> dict[str, object]:
        """Every figure of every run, the medians and ratios, and where it ran."""
        return {
            "format": JSON_FORMAT,
            "workload": self.workload,
            "command": self.command,
            "started_at": self.started_at,
            "options": dict(self.options),
            "machine": dict(self.machine),
            "metrics": [attrs.asdict(metric) for metric in self.metrics],
            "ratio_metric": self.ratio_metric,
            "reference_case": None if self.reference is None else self.reference.case,
            "skipped_stores": dict(self.skipped),
            "skipped_peers": dict(self.skipped_peers),
            "comparisons": [attrs.asdict(comparison) for comparison in self.comparisons],
            "results": [
                {
                    "case": result.case,
                    "description": result.description,
                    "store": result.store,
                    "consumers": result.consumers,
                    "events": result.events,
                    "params": dict(result.params),
                    "reference": result.reference,
                    "runs": [dict(run) for run in result.runs],
                    "median": {key: result.median(key) for key in result.figures()},
                    "max": {key: max(run[key] for run in result.runs) for key in result.figures()},
                    "ratio_to_reference": {
                        key: self.ratio(result, key)
                        for key in result.figures()
                        if (reference := self.reference_for(result)) is not None
                        and key in reference.figures()
                    },
                    "baseline_case": result.baseline,
                    "ratio_to_baseline": {
                        key: self.baseline_ratio(result, key)
                        for key in result.figures()
                        if (baseline := self.baseline_of(result)) is not None
                        and key in baseline.figures()
                    },
                    "comparisons": {
                        comparison.key: {
                            "case": other.case,
                            "metric": comparison.metric,
                            "ratio": self.comparison_ratio(result, comparison),
                        }
                        for comparison in self.comparisons
                        if (other := self.compared_with(result, comparison)) is not None
                    },
                }
                for result in self.results
            ],
        }

    def write_json(self, path: Path) -> None:
        """Write `to_json` to ``path`` (its directory is created if missing)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")


def _ratio(result: CaseResult, base: CaseResult | None, key: str) -> float | None:
    """The median of ``key`` for ``result`` over ``base``'s; None where either lacks it."""
    if base is None or not (result.has(key) and base.has(key)):
        return None
    divisor = base.median(key)
    return result.median(key) / divisor if divisor else None


def utc_now() -> str:
    """The current time, ISO 8601 in UTC, to the second."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def machine_info() -> dict[str, object]:
    """Describe this machine and software, so figures can be compared across runs.

    Nothing identifying is recorded: no host name, user or file path.
    """
    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "trio": _version("trio"),
        "trioflow": _version("trioflow"),
        "attrs": _version("attrs"),
        "asyncpg": _version("asyncpg"),
        "trio_asyncio": _version("trio-asyncio"),
        "sqlite": sqlite3.sqlite_version,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(affinity(0)) if affinity is not None else os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "git_revision": _git_revision(),
    }


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name":
                return value.strip()
    return platform.processor() or None


def _git_revision() -> str | None:
    """The checkout's commit, with ``+dirty`` if it has uncommitted changes; None outside git."""
    here = Path(__file__).resolve().parent
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return revision + ("+dirty" if dirty else "")
