"""The failover workload: how long a standby takes to handle events once their owner is gone.

Each run starts two member processes (`benchmarks._member_child`) on a
fresh store shared by processes (the SQLite and PostgreSQL kinds), each
running the same consumer with ``App(lease_ttl=T)``: the first owns it, the
second stands by (both say so before anything else happens). This process
publishes a trickle of events, ``--rate`` a second, on a flow of its own.
Once the owner has been handling for N events' time (``--events`` / rate),
and after a further random wait within one claim interval (``T / 3``, so
that the stop falls anywhere in the owner's renewal cycle), the owner is
stopped:

``kill@T``
    SIGKILL: it releases nothing; the standby takes over once the lease has
    lapsed, within ``T + T / 3`` (``4 T / 3``, the bound).
``graceful@T``
    ``stop``: the owner leaves its flow gracefully, which releases the lease
    at once; the standby's next claim takes it, within ``T / 3``.

The figure is the **handover**: from the moment just before the signal (or
the ``stop``) was sent until the standby's handler returned for the first
time, both read from ``time.monotonic_ns()`` (CLOCK_MONOTONIC, one clock
for the machine). Then the trickle stops, the standby waits until its cursor
is at the head (``flow.wait_idle()``) and stops, and the run checks that
every event published was handled (by the owner or the standby, each log in
order; the events the killed owner handled after its last cursor commit are
handled again, and counted as ``rehandled``) and that the store's cursor is
at the head. The table shows the median and the maximum handover over the
runs, beside the bound.
"""

from __future__ import annotations

import argparse
import functools
import random
import tempfile
from collections.abc import Mapping
from pathlib import Path

import trio

import trioflow

from ._harness import Case, Options, Workload, positive_float
from ._members import (
    check_handled,
    check_stored_cursors,
    open_members,
    read_log,
    run_within,
    shared_kinds,
)
from ._report import Metric
from ._stores import StoreKind
from .latency import now_ns, shared_store_url

#: The consumer both members run.
CONSUMER = "failover"
#: The event type of the trickle.
EVENT_TYPE = "tick"
#: How the owner is stopped, by case id prefix: the bound as a share of lease_ttl.
STOPS: Mapping[str, float] = {"kill": 4 / 3, "graceful": 1 / 3}
#: The default lease_ttl: trioflow.App's.
DEFAULT_TTL = 6.0

Figures = Mapping[str, float]


async def _trickle(flow: trioflow.Flow, rate: float, stopping: trio.Event, sent: list[int]) -> None:
    """Publish one event every 1/``rate`` seconds until ``stopping`` (never mid-publish)."""
    start = trio.current_time()
    while not stopping.is_set():
        await flow.publish(EVENT_TYPE, {"n": len(sent)})
        sent.append(now_ns())
        with trio.move_on_at(start + len(sent) / rate):
            await stopping.wait()


async def _failover(
    url: str,
    directory: Path,
    *,
    stop: str,
    ttl: float,
    rate: float,
    events: int,
    child_timeout: float,
) -> tuple[int, int]:
    """One run on ``url``: returns the events published and when the owner was stopped."""
    app = trioflow.App(url, shutdown_grace=1.0)
    what = f"{stop}@{ttl:g}"
    # The flow opens first: it creates the store's schema before the members open it.
    async with (
        trioflow.open_flow(app) as flow,
        open_members(
            url, directory, consumer=CONSUMER, lease_ttl=ttl, child_timeout=child_timeout
        ) as group,
    ):
        owner = await group.start("owner")
        await group.wait_until(lambda: owner.owns == (CONSUMER,), "the first member to own it")
        standby = await group.start("standby")
        await group.wait_until(lambda: standby.owns == (), "the second member to stand by")
        stopping = trio.Event()
        sent: list[int] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_trickle, flow, rate, stopping, sent)
            await group.wait_until(lambda: owner.handling, "the owner to handle an event")
            # N events at the trickle's rate, then anywhere in the owner's renewal cycle.
            await trio.sleep(events / rate + random.uniform(0, ttl / 3))
            stopped_ns = now_ns()
            if stop == "kill":
                owner.kill()
            else:
                await owner.say("stop")
            await group.wait_until(lambda: standby.handling, "the standby to handle an event")
            stopping.set()
        await owner.wait_exit(status=-9 if stop == "kill" else 0)
        await standby.say("finish")
        await standby.wait_exit()
        await check_stored_cursors(app.store, [CONSUMER], len(sent), what=what)
    return len(sent), stopped_ns


def failover_run(
    kind: StoreKind, *, stop: str, ttl: float, rate: float, events: int, timeout: float
) -> Figures:
    """One run of case ``{stop}@{ttl}`` on a fresh store of ``kind``; its figures.

    Raises:
        BenchmarkFailed: An event was lost or reordered, a cursor is not at
            the head, a member failed, or the run timed out.
    """
    what = f"{stop}@{ttl:g} on {kind.name}"
    with shared_store_url(kind) as url, tempfile.TemporaryDirectory() as name:
        directory = Path(name)

        published, stopped_ns = run_within(
            timeout,
            what,
            functools.partial(
                _failover,
                url,
                directory,
                stop=stop,
                ttl=ttl,
                rate=rate,
                events=events,
                child_timeout=timeout,
            ),
        )
        owner, standby = read_log(directory / "owner.log"), read_log(directory / "standby.log")
    check_handled({"owner": owner, "standby": standby}, published, once=False, what=what)
    handover = (standby[0][2] - stopped_ns) / 1e9
    bound = STOPS[stop] * ttl
    return {
        "handover_s": handover,
        "bound_s": bound,
        "of_bound": handover / bound,
        "rehandled": len(owner) + len(standby) - published,
        "published": published,
    }


# --- the cases --------------------------------------------------------------------------


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lease-ttl",
        action="append",
        type=positive_float,
        metavar="SECONDS",
        help=f"the members' App(lease_ttl=...); repeat for several (default: {DEFAULT_TTL:g})",
    )
    parser.add_argument(
        "--rate",
        type=positive_float,
        default=100.0,
        metavar="R",
        help="the trickle published during a run, events/s (default: %(default)s)",
    )


def _cases(options: Options, args: argparse.Namespace) -> list[Case]:
    ttls: list[float] = list(dict.fromkeys(args.lease_ttl or [DEFAULT_TTL]))
    rate: float = args.rate
    kinds = shared_kinds(options.stores, "failover")
    cases = []
    for kind in kinds:
        for ttl in ttls:
            for stop, share in STOPS.items():
                description = (
                    f"an owner and a standby process, lease_ttl={ttl:g}; the owner is "
                    + ("SIGKILLed" if stop == "kill" else "stopped gracefully")
                    + f" after {options.events:,} events; bound {share * ttl:.2f}s"
                )
                cases.append(
                    Case(
                        id=f"{stop}@{ttl:g}",
                        description=description,
                        store=kind.name,
                        consumers=1,
                        events=options.events,
                        params={"lease_ttl": ttl, "stop": stop, "rate": rate},
                        run=functools.partial(
                            failover_run,
                            kind,
                            stop=stop,
                            ttl=ttl,
                            rate=rate,
                            events=options.events,
                            timeout=options.timeout,
                        ),
                    )
                )
    return cases


WORKLOAD = Workload(
    name="failover",
    summary=(
        "time from an owner's SIGKILL (or graceful stop) to its standby process handling "
        "events, median and max over runs, beside the lease's bound"
    ),
    metrics=(
        Metric(key="handover_s", label="median s", unit="s", decimals=2),
        Metric(key="handover_s", label="max s", unit="s", decimals=2, aggregate="max"),
        Metric(key="bound_s", label="bound s", unit="s", decimals=2),
        Metric(key="of_bound", label="max of bound", unit="ratio", decimals=2, aggregate="max"),
        Metric(key="rehandled", label="rehandled", unit="events", aggregate="max"),
    ),
    # No reference case: each case is compared with its bound, in the table.
    ratio_metric="handover_s",
    ratio_label="-",
    cases=_cases,
    add_arguments=_add_arguments,
    defaults={"events": 50, "consumers": 1, "repeat": 5},
    option_help={
        "events": "events the owner handles before it is stopped",
        "consumers": "not used: one consumer",
    },
)
