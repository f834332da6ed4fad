"""The events every fan-out case publishes, built the same way in every process.

Imports nothing but the standard library, so that the hand-written asyncio
program (`benchmarks.asyncpg_fanout`, run in a subprocess) builds exactly the
data the trioflow cases publish without importing trio or trioflow.
"""

from __future__ import annotations

import json

#: The type of every event published.
EVENT_TYPE = "bench.fanout"
#: Size of each event's data, encoded as compact JSON.
DATA_BYTES = 200

Data = dict[str, object]


def make_data(count: int) -> list[Data]:
    """``count`` distinct order-like JSON objects of `DATA_BYTES` bytes each."""
    out: list[Data] = []
    for index in range(count):
        data: Data = {
            "order": index + 1,
            "customer": f"customer-{index % 9973:05d}",
            "currency": "EUR",
            "total_cents": 1999 + index % 5000,
            "items": [
                {"sku": f"sku-{index % 1000:05d}", "qty": 1 + index % 3, "price_cents": 1999},
                {"sku": f"sku-{(index * 7) % 1000:05d}", "qty": 1, "price_cents": 499},
            ],
            "note": "",
        }
        size = len(json.dumps(data, separators=(",", ":")))
        data["note"] = "x" * max(DATA_BYTES - size, 0)
        out.append(data)
    return out
