"""One measured run in a fresh process, so that the process's peak memory is that run's own.

``python -m benchmarks._rss_child MODULE`` reads a JSON object of parameters
on stdin, calls ``MODULE.run_measured(params)`` (a workload's module, which
sets up, runs once, checks and returns its figures, among them
``setup_rss_mib``, the resident set size after set-up), and prints the
figures as one JSON object on stdout, with the peak resident set size
added. Exit status 1, with the reason on stderr, when the run's correctness
check failed (`BenchmarkFailed`).

The peak is the kernel's high-water mark of this process's own address
space (``VmHWM`` in ``/proc/self/status``). ``getrusage(RUSAGE_SELF).ru_maxrss``
is recorded too (``ru_maxrss_mib``) but not used where ``VmHWM`` exists:
Linux carries the parent's high-water mark over into ``ru_maxrss`` when the
child is started by ``fork``/``vfork`` and ``exec``, so a child of a large
parent would report the parent's peak, not its own.
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import sys
from collections.abc import Mapping, Sequence

from ._harness import BenchmarkFailed, run_program

#: Bytes per MiB, and per KiB (the unit of /proc and of Linux's ru_maxrss).
_MIB = 1024 * 1024
_KIB = 1024
#: Seconds the child may take beyond its run's own deadline (start-up, set-up).
_SETUP_SECONDS = 120.0


def _status_kib(field: str) -> float | None:
    """A ``kB`` field of ``/proc/self/status`` (Linux), or None where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name == field:
                    return float(value.split()[0])
    except OSError:
        pass
    return None


def ru_maxrss_mib() -> float:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in MiB (KiB on Linux, bytes on macOS)."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / _MIB if sys.platform == "darwin" else maxrss / _KIB


def current_rss_mib() -> float:
    """This process's resident set size now, in MiB.

    Where ``/proc`` is missing, the peak so far (`ru_maxrss_mib`), which is the
    same figure when it is taken right after set-up, set-up being the largest
    the process has been by then.
    """
    kib = _status_kib("VmRSS")
    return ru_maxrss_mib() if kib is None else kib / _KIB


def peak_rss_mib() -> float:
    """This process's peak resident set size, in MiB (see the module docstring)."""
    kib = _status_kib("VmHWM")
    return ru_maxrss_mib() if kib is None else kib / _KIB


def measure_in_child(
    module: str, params: Mapping[str, object], *, timeout: float, what: str
) -> dict[str, float]:
    """Run ``module.run_measured(params)`` in a fresh process; return its figures.

    Args:
        module: The workload module, such as ``"benchmarks.slow_consumer"``.
        params: Its parameters, as JSON.
        timeout: The run's own deadline; the child gets a margin for set-up.
        what: The run, as failure messages name it.

    Raises:
        BenchmarkFailed: The child's check failed, it crashed, or it timed out.
    """
    return run_program(
        [sys.executable, "-m", "benchmarks._rss_child", module],
        what=f"{what} (in its subprocess)",
        timeout=timeout + _SETUP_SECONDS,
        stdin=json.dumps(dict(params)),
        # `main` exits 1 with the check's own message.
        check_status=1,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run one measured run; print its figures as JSON; return 1 if its check failed."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks._rss_child",
        description="One measured run of a workload in this fresh process (parameters on stdin).",
    )
    parser.add_argument("module", help="the workload module defining run_measured(params)")
    args = parser.parse_args(argv)
    params = json.load(sys.stdin)
    run_measured = importlib.import_module(args.module).run_measured
    try:
        figures: dict[str, float] = run_measured(params)
    except BenchmarkFailed as exc:
        print(exc, file=sys.stderr, flush=True)
        return 1
    peak = peak_rss_mib()
    figures |= {
        "peak_rss_mib": peak,
        "rss_growth_mib": peak - figures["setup_rss_mib"],
        "ru_maxrss_mib": ru_maxrss_mib(),
    }
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
