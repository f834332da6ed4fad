"""How long other publishers wait for a PostgreSQL store transaction that appends.

``python -m benchmarks.transaction_lock --url postgresql://... [--open-ms 0,50,200]``

A stand-alone measurement (not a `python -m benchmarks` workload: it times
waits, not throughput). For each N, a store transaction stays open N ms with
the user's work (a statement, then a sleep) either *before* its append (the
order the runtime uses: the append comes last) or *after* it; meanwhile
another store on the same schema (another process's view) appends one event,
starting just after the transaction began (before) or just after its append
(after). The table gives that publisher's median and worst latency, and the
same append with no transaction open as the baseline. The ordering lock is
taken by the append, so only the time after it is a wait for others.
"""

from __future__ import annotations

import argparse
import statistics
import uuid
from collections.abc import Sequence

import trio

from trioflow.stores.postgres import PostgresStore
from trioflow.testing._store_contract import make_events


async def _publish(peer: PostgresStore, started: list[float], took: list[float]) -> None:
    start = trio.current_time()
    started.append(start)
    await peer.append(make_events(1, "outside"))
    took.append(trio.current_time() - start)


async def _one(store: PostgresStore, peer: PostgresStore, open_s: float, when: str) -> float:
    """The outside publisher's latency, in seconds, for one transaction."""
    took: list[float] = []
    started: list[float] = []
    async with trio.open_nursery() as nursery:
        if when == "none":
            nursery.start_soon(_publish, peer, started, took)
        else:
            async with store.transaction() as tx:
                await tx.fetchval("SELECT 1")
                if when == "before":
                    nursery.start_soon(_publish, peer, started, took)
                    await trio.sleep(open_s)
                    await tx.append(make_events(1, "inside"))
                else:
                    await tx.append(make_events(1, "inside"))
                    nursery.start_soon(_publish, peer, started, took)
                    await trio.sleep(open_s)
    return took[0]


async def _main(url: str, opens_ms: Sequence[int], repeat: int) -> None:
    schema = f"tf_bench_tx_{uuid.uuid4().hex[:8]}"
    store = PostgresStore.from_url(f"{url}{'&' if '?' in url else '?'}schema={schema}")
    peer = PostgresStore.from_url(f"{url}{'&' if '?' in url else '?'}schema={schema}")
    try:
        async with store.open(), peer.open():
            for _ in range(5):  # warm both pools and statement caches
                await _one(store, peer, 0.0, "after")
            print(f"{'open ms':>8} {'append':>7} {'median ms':>10} {'max ms':>8}")
            baseline = [await _one(store, peer, 0.0, "none") for _ in range(repeat)]
            print(
                f"{'-':>8} {'none':>7} {statistics.median(baseline) * 1e3:10.2f} "
                f"{max(baseline) * 1e3:8.2f}"
            )
            for open_ms in opens_ms:
                for when in ("before", "after"):
                    waits = [await _one(store, peer, open_ms / 1e3, when) for _ in range(repeat)]
                    print(
                        f"{open_ms:>8} {when:>7} {statistics.median(waits) * 1e3:10.2f} "
                        f"{max(waits) * 1e3:8.2f}"
                    )
            async with store.transaction() as tx:
                await tx.execute(f'DROP SCHEMA "{schema}" CASCADE')
    except BaseException:
        print(f"(schema {schema} may be left behind)")
        raise


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="a postgresql:// URL (no schema option)")
    parser.add_argument("--open-ms", default="0,50,200", help="comma-separated N values")
    parser.add_argument("--repeat", type=int, default=20, help="transactions per row")
    args = parser.parse_args(argv)
    opens = [int(value) for value in args.open_ms.split(",")]
    trio.run(_main, args.url, opens, args.repeat)


if __name__ == "__main__":
    main()
