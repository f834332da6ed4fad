"""trioflow's benchmark harness: ``python -m benchmarks run WORKLOAD [options]``.

Every case of a workload runs in this one process, in the same run as the
workload's baseline, so that its figures can be read as ratios to that
baseline rather than as absolute numbers that depend on the machine.

Layout (modules only depend downwards)::

    __main__.py   the command line; the registry of workloads by name
    fanout.py     a workload (one module each): the cases it runs and checks
    _stores.py    the registry of stores a case can run on, fresh per run
    _harness.py   Workload, Case, Sample: repeating cases, medians, progress
    _report.py    results table, JSON file, machine description
"""
