"""PNG plots of a results file: ``python -m benchmarks plot FILE.json``, or ``run ... --plot DIR``.

Plots are drawn from the JSON file alone (see `benchmarks._report.Report.to_json`),
so any saved run can be drawn again. For every figure in the table's columns:

``<workload>-<figure>.png``
    One bar per case, store and consumer count: the median over the runs,
    with a line from the lowest to the highest run; on a log scale when the
    figures span a factor of 100 or more.
``<workload>-<figure>-by-consumers.png``
    When the run swept ``--consumers``: the median against the consumer
    count, one line per case and store.

matplotlib comes with the ``bench`` extra (``pip install '.[bench]'``); it is
imported only here, and only when plotting.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: What to install when matplotlib is missing.
INSTALL_HINT = "pip install '.[bench]' (matplotlib draws the plots)"


class PlotUnavailable(Exception):
    """matplotlib is not installed; the message says how to install it."""


def require_pyplot() -> Any:
    """matplotlib's pyplot, drawing to files.

    Raises:
        PlotUnavailable: matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable(f"plotting needs matplotlib: {INSTALL_HINT}") from None
    # No display is needed (or wanted) to write files.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _label(result: Mapping[str, Any], sweep: bool) -> str:
    label = f"{result['case']} ({result['store'] or 'no store'})"
    return f"{label}, K={result['consumers']}" if sweep else label


def _spans_magnitudes(values: Sequence[float]) -> bool:
    """Whether ``values`` are all positive and span 100 times or more: a log scale then."""
    return bool(values) and min(values) > 0 and max(values) >= 100 * min(values)


def plot_report(report: Mapping[str, Any], directory: Path) -> list[Path]:
    """Draw ``report`` (a parsed results file) as PNG files in ``directory``; return their paths.

    Raises:
        PlotUnavailable: matplotlib is not installed.
    """
    plt = require_pyplot()
    from matplotlib.ticker import FuncFormatter

    # 1,234,567 rather than 1.2e6: the same figures the table shows.
    thousands = FuncFormatter(
        lambda value, _: (
            f"{value:,.0f}" if value == int(value) or abs(value) >= 10 else f"{value:.2f}"
        )
    )
    directory.mkdir(parents=True, exist_ok=True)
    results: Sequence[Mapping[str, Any]] = report["results"]
    workload = report["workload"]
    counts = sorted({result["consumers"] for result in results})
    sweep = len(counts) > 1
    written = []
    drawn: set[str] = set()
    for metric in report["metrics"]:
        key, title = metric["key"], f"{metric['label']} ({metric['unit']})"
        shown = [result for result in results if key in result["median"]]
        # A figure shown twice in the table (its median and its max) is one chart:
        # the bar is the median, its line reaches the max.
        if not shown or key in drawn:
            continue
        drawn.add(key)
        medians = [result["median"][key] for result in shown]
        lows = [min(run[key] for run in result["runs"]) for result in shown]
        highs = [max(run[key] for run in result["runs"]) for result in shown]
        figure, axes = plt.subplots(figsize=(9, 1.2 + 0.38 * len(shown)))
        positions = list(range(len(shown)))
        axes.barh(
            positions,
            medians,
            xerr=[
                [median - low for median, low in zip(medians, lows, strict=True)],
                [high - median for median, high in zip(medians, highs, strict=True)],
            ],
            color=["tab:gray" if result["reference"] else "tab:blue" for result in shown],
            capsize=3,
        )
        if _spans_magnitudes(lows + highs):
            axes.set_xscale("log")
        axes.set_yticks(positions, [_label(result, sweep) for result in shown])
        axes.invert_yaxis()
        runs = len(shown[0]["runs"])
        axes.set_xlabel(
            f"{title}, median of {runs} run{'s' if runs != 1 else ''} (bar: lowest to highest)"
        )
        axes.set_title(f"{workload}: {metric['label']}", loc="left")
        axes.grid(axis="x", alpha=0.3)
        axes.xaxis.set_major_formatter(thousands)
        figure.tight_layout()
        path = directory / f"{_slug(workload)}-{_slug(key)}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)

        if sweep:
            figure, axes = plt.subplots(figsize=(7, 4.5))
            lines: dict[tuple[str, str | None], list[tuple[int, float]]] = {}
            for result in shown:
                lines.setdefault((result["case"], result["store"]), []).append(
                    (result["consumers"], result["median"][key])
                )
            for (case, store), points in lines.items():
                points.sort()
                axes.plot(
                    [k for k, _ in points],
                    [value for _, value in points],
                    marker="o",
                    label=f"{case} ({store or 'no store'})",
                )
            axes.set_xscale("log", base=2)
            if _spans_magnitudes([value for points in lines.values() for _, value in points]):
                axes.set_yscale("log")
            axes.set_xticks(counts, [str(k) for k in counts])
            axes.set_xlabel("consumers (K)")
            axes.set_ylabel(title)
            axes.set_title(f"{workload}: {metric['label']} by consumer count", loc="left")
            axes.grid(alpha=0.3)
            axes.yaxis.set_major_formatter(thousands)
            axes.legend(fontsize="small")
            figure.tight_layout()
            path = directory / f"{_slug(workload)}-{_slug(key)}-by-consumers.png"
            figure.savefig(path, dpi=110)
            plt.close(figure)
            written.append(path)
    return written
