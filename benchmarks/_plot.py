"""PNG plots of a results file: ``python -m benchmarks plot FILE.json``, or ``run ... --plot DIR``.

Plots are drawn from the JSON file alone (see `benchmarks._report.Report.to_json`),
so any saved run can be drawn again. For every figure in the table's columns:

``<workload>-<figure>.png``
    One bar per case (the median over the runs, with a line from the lowest
    to the highest run), grouped by store and consumer count: in each group
    the trioflow cases, then the cases they are compared with there (the
    hand-written program and its ceilings, the peers), so that each stands
    beside what it is measured against. Cases with no store (the reference,
    the peers) also have a group of their own. The reference case is a
    dashed line across every group. Each bar is labelled with its figure and
    its ratios, as the table's columns give them (``1.10x asyncpg``); the
    scale is logarithmic when the figures span a factor of 10 or more, so
    that a ceiling far above the rest (``raw-batch``) does not flatten them.
``<workload>-<figure>-by-consumers.png``
    When the run swept ``--consumers``: the median against the consumer
    count, one line per case and store; a case that feeds no consumers (the
    COPY writer alone) is a dashed horizontal line.

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
#: The span of figures (largest over smallest) from which an axis is logarithmic.
LOG_SPAN = 10.0
#: Bar colours by role (`_role`), and their legend entries, in legend order.
COLOURS = {
    "trioflow": ("tab:blue", "trioflow (and its store's own API)"),
    "baseline": ("tab:orange", "hand-written program (and its ceilings)"),
    "peer": ("tab:green", "peer (another system)"),
    "reference": ("tab:gray", "reference (dashed line), other cases with no store"),
}
#: Short forms of units that a metric's label may already contain ("p99 ms").
_UNIT_WORDS = {"events/s": {"ev/s"}, "s": {"seconds"}}

Result = Mapping[str, Any]


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


def axis_label(metric: Mapping[str, Any]) -> str:
    """The metric's label with its unit said once: ``p99 ms`` -> ``p99 (ms)``."""
    unit: str = metric["unit"]
    words = [
        word
        for word in metric["label"].split()
        if word != unit and word not in _UNIT_WORDS.get(unit, ())
    ]
    return f"{' '.join(words) or metric['label']} ({unit})"


def _spans_magnitudes(values: Sequence[float], factor: float = LOG_SPAN) -> bool:
    """Whether ``values`` are all positive and span ``factor`` times or more: a log scale then."""
    return bool(values) and min(values) > 0 and max(values) >= factor * min(values)


def _format(value: float, decimals: int) -> str:
    return f"{value:,.{decimals}f}"


def _role(result: Result, compared: set[str]) -> str:
    """How a case is drawn: trioflow, a hand-written program, a peer, or the reference."""
    if result["reference"]:
        return "reference"
    if result["store"] is None:
        return "peer" if result["case"] in compared else "reference"
    return "baseline" if "program" in result["params"] else "trioflow"


def _compared_ids(result: Result) -> set[str]:
    """The ids of the cases ``result`` is divided by in the table's columns."""
    ids = {entry["case"] for entry in result.get("comparisons", {}).values()}
    if result.get("baseline_case") and result["baseline_case"] != result["case"]:
        ids.add(result["baseline_case"])
    return ids


def _ratios(report: Mapping[str, Any], result: Result, key: str) -> list[str]:
    """``result``'s figure ``key`` over that of each case it is compared with, as ``1.10x asyncpg``.

    The cases are the table's: the reference (with as many consumers), the
    baseline (on the same store) and the comparisons on this figure.
    """
    results: Sequence[Result] = report["results"]
    others: list[Result | None] = []
    references = [other for other in results if other["reference"]]
    # A case that feeds no consumers has no reference: references go by consumer count.
    if references and not result["reference"] and result["consumers"]:
        # Several references (latency's one per rate): the one with as many
        # consumers and the most settings in common.
        params = result["params"]
        others.append(
            max(
                references,
                key=lambda other: (
                    other["consumers"] == result["consumers"],
                    sum(other["params"].get(name) == value for name, value in params.items()),
                ),
            )
        )
    baseline = result.get("baseline_case")
    if baseline and baseline != result["case"]:
        others.append(
            next(
                (
                    other
                    for other in results
                    if other["case"] == baseline
                    and other["store"] == result["store"]
                    and other["consumers"] == result["consumers"]
                ),
                None,
            )
        )
    shown = []
    for index, other in enumerate(others):
        if other is None or not other["median"].get(key) or other in others[:index]:
            continue
        # Named by its store too where that is another store (recovery's memory read).
        where = other["store"] not in (None, result["store"])
        name = f"{other['case']} ({other['store']})" if where else other["case"]
        shown.append(f"{result['median'][key] / other['median'][key]:.2f}x {name}")
    for entry in result.get("comparisons", {}).values():
        if entry["metric"] == key and entry["case"] != result["case"] and entry["ratio"]:
            shown.append(f"{entry['ratio']:.2f}x {entry['case']}")
    return shown


def _groups(results: Sequence[Result], key: str, sweep: bool) -> list[tuple[str, list[Result]]]:
    """The bar chart's groups, in run order: cases with no store, then one per store (and K).

    A store's group holds its cases, then the cases they are compared with
    that ran on no store or with no consumers (the peers, the COPY writer).
    """
    shown = [result for result in results if key in result["median"]]
    groups: dict[tuple[str | None, int], list[Result]] = {}
    for result in shown:
        if result["store"] is not None and result["consumers"] == 0:
            continue  # a writer alone: placed beside the cases compared with it
        place = (result["store"], result["consumers"] if sweep else 0)
        groups.setdefault(place, []).append(result)
    for (store, consumers), members in groups.items():
        if store is None:
            continue
        wanted = set().union(*(_compared_ids(member) for member in members))
        members.extend(
            other
            for other in shown
            if other["case"] in wanted
            and other not in members
            and other["store"] in (store, None)
            and other["consumers"] in ((consumers, 0) if sweep else (other["consumers"],))
        )
    titled = []
    for (store, consumers), members in groups.items():
        title = store or "no store"
        titled.append((f"{title}, K={consumers}" if sweep else title, members))
    return titled


def plot_report(report: Mapping[str, Any], directory: Path) -> list[Path]:
    """Draw ``report`` (a parsed results file) as PNG files in ``directory``; return their paths.

    Raises:
        PlotUnavailable: matplotlib is not installed.
    """
    plt = require_pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    results: Sequence[Result] = report["results"]
    counts = sorted({result["consumers"] for result in results if result["consumers"]})
    sweep = len(counts) > 1
    written = []
    drawn: set[str] = set()
    for metric in report["metrics"]:
        key = metric["key"]
        # A figure shown twice in the table (its median and its max) is one chart:
        # the bar is the median, its line reaches the max.
        if key in drawn or not any(key in result["median"] for result in results):
            continue
        drawn.add(key)
        written.append(_bars(plt, report, metric, _groups(results, key, sweep), directory))
        if sweep:
            written.append(_by_consumers(plt, report, metric, counts, directory))
    return written


def _number(value: float) -> str:
    # 1,234,567 rather than 1.2e6: the same figures the table shows.
    return f"{value:,.0f}" if value == int(value) or abs(value) >= 10 else f"{value:.2g}"


def _thousands() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _: _number(value))


def _twos_and_fives() -> Any:
    """Labels for a log axis's minor ticks: 2 and 5 times a power of ten, no others."""
    from matplotlib.ticker import FuncFormatter

    def label(value: float, _: object) -> str:
        leading = f"{value:e}"[0]
        return _number(value) if leading in "25" else ""

    return FuncFormatter(label)


def _bars(
    plt: Any,
    report: Mapping[str, Any],
    metric: Mapping[str, Any],
    groups: Sequence[tuple[str, Sequence[Result]]],
    directory: Path,
) -> Path:
    key, decimals = metric["key"], metric["decimals"]
    compared = set().union(*(_compared_ids(r) for _, members in groups for r in members))
    rows: list[Result] = [result for _, members in groups for result in members]
    # One blank row per group for its title.
    height = 1.0 + 0.34 * (len(rows) + 1.3 * len(groups))
    figure, axes = plt.subplots(figsize=(12, height))
    position = 0.0
    ticks: list[float] = []
    labels: list[str] = []
    values = []
    roles_seen: set[str] = set()
    references = [r for r in rows if r["reference"]]
    for title, members in groups:
        # The reference with as many consumers, as a line across the group.
        reference = next(
            (r for r in references if r["consumers"] == members[0]["consumers"]),
            references[0] if references else None,
        )
        if reference is not None:
            axes.vlines(
                reference["median"][key],
                position + 0.5,
                position + len(members) + 0.5,
                colors="tab:gray",
                linestyles="--",
                linewidth=1,
            )
        axes.text(
            0.0,
            position - 0.1,
            title,
            transform=axes.get_yaxis_transform(),
            ha="right",
            va="center",
            fontweight="bold",
            fontsize="small",
        )
        position += 1.0
        for result in members:
            runs = [run[key] for run in result["runs"] if key in run]
            median = result["median"][key]
            role = _role(result, compared)
            roles_seen.add(role)
            axes.barh(
                position,
                median,
                xerr=[[median - min(runs)], [max(runs) - median]],
                color=COLOURS[role][0],
                capsize=2,
                height=0.75,
            )
            text = "   ".join([_format(median, decimals), *_ratios(report, result, key)])
            axes.annotate(
                text,
                (max(runs), position),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize="x-small",
            )
            ticks.append(position)
            labels.append(result["case"])
            values += runs
            position += 1.0
        position += 0.3
    log = _spans_magnitudes(values)
    if log:
        axes.set_xscale("log")
        axes.set_xlim(min(values) / 1.5, max(values) * 25)
    else:
        axes.set_xlim(0, max(values) * 1.55)
    axes.set_yticks(ticks, labels)
    axes.set_ylim(position, -1.0)
    axes.tick_params(axis="y", labelsize="small")
    axes.set_xlabel(
        f"{axis_label(metric)}: median of {len(rows[0]['runs'])} run(s), line from lowest to "
        f"highest; labels: the median, and its ratio to each case it is compared with"
        + (" (log scale)" if log else ""),
        fontsize="small",
    )
    axes.set_title(f"{report['workload']}: {axis_label(metric)}", loc="left", pad=18)
    axes.grid(axis="x", alpha=0.3)
    axes.xaxis.set_major_formatter(_thousands())
    if log:
        axes.xaxis.set_minor_formatter(_twos_and_fives())
        axes.tick_params(axis="x", which="minor", labelsize="x-small")
    from matplotlib.patches import Patch

    axes.legend(
        handles=[
            Patch(color=colour, label=label)
            for role, (colour, label) in COLOURS.items()
            if role in roles_seen
        ],
        fontsize="x-small",
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        ncol=len(roles_seen),
        frameon=False,
    )
    figure.tight_layout()
    path = directory / f"{_slug(report['workload'])}-{_slug(key)}.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _by_consumers(
    plt: Any,
    report: Mapping[str, Any],
    metric: Mapping[str, Any],
    counts: Sequence[int],
    directory: Path,
) -> Path:
    key = metric["key"]
    figure, axes = plt.subplots(figsize=(8, 5))
    lines: dict[tuple[str, str | None], list[tuple[int, float]]] = {}
    for result in report["results"]:
        if key in result["median"]:
            lines.setdefault((result["case"], result["store"]), []).append(
                (result["consumers"], result["median"][key])
            )
    compared = set().union(*(_compared_ids(result) for result in report["results"]))
    roles = {(r["case"], r["store"]): _role(r, compared) for r in report["results"]}
    # Solid: trioflow; dashed: what it is compared with; dotted: the peers; gray: the reference.
    styles = {"trioflow": "-", "baseline": "--", "peer": ":", "reference": "-."}
    for (case, store), points in lines.items():
        points.sort()
        label = f"{case} ({store or 'no store'})"
        role = roles[case, store]
        colour = "tab:gray" if role == "reference" else None
        if [k for k, _ in points] == [0]:
            # Feeds no consumers: the same at every K.
            axes.axhline(points[0][1], linestyle="--", linewidth=1, color="black", label=label)
            continue
        axes.plot(
            [k for k, _ in points],
            [v for _, v in points],
            marker="o",
            linestyle=styles[role],
            color=colour,
            label=label,
        )
    axes.set_xscale("log", base=2)
    if _spans_magnitudes([value for points in lines.values() for _, value in points]):
        axes.set_yscale("log")
    axes.set_xticks(counts, [str(k) for k in counts])
    axes.set_xlabel("consumers (K)")
    axes.set_ylabel(axis_label(metric))
    axes.set_title(f"{report['workload']}: {axis_label(metric)} by consumer count", loc="left")
    axes.grid(alpha=0.3)
    axes.yaxis.set_major_formatter(_thousands())
    axes.yaxis.set_minor_formatter(_twos_and_fives())
    axes.tick_params(axis="y", which="minor", labelsize="x-small")
    axes.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    path = directory / f"{_slug(report['workload'])}-{_slug(key)}-by-consumers.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
