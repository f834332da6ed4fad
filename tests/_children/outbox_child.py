"""A process that publishes only in transactions (the outbox), some rolled back.

Run as ``python outbox_child.py URL NAME PLAN GO``, where PLAN is a JSON list
of blocks, each ``{"sleeps": [...], "roll_back": bool}``. Opens the flow,
prints ``ready``, waits until the file GO exists (so that several such
processes' transactions overlap), then runs each block in a
``flow.transaction()`` of its own: it sleeps each of the block's sleeps in
turn, publishing one event of type ``ob`` with data ``{"pub": "NAME.BLOCK",
"n": i}`` after each sleep but the last, and then leaves the block normally
(commit) or by an exception (rollback) as ``roll_back`` says. Exits 0.
"""

from __future__ import annotations

import json
import sys

import trio

import trioflow
from tests._children.publisher_child import wait_for_file


class RolledBack(Exception):
    """Raised in a block to roll it back."""


async def main(url: str, name: str, plan: list[dict[str, object]], go: str) -> None:
    app = trioflow.App(store=url)
    async with trioflow.open_flow(app) as flow:
        print("ready", flush=True)
        await wait_for_file(go)
        for number, block in enumerate(plan):
            sleeps = block["sleeps"]
            assert isinstance(sleeps, list)
            try:
                async with flow.transaction() as tx:
                    for i, pause in enumerate(sleeps):
                        await trio.sleep(pause)
                        if i < len(sleeps) - 1:
                            tx.publish("ob", {"pub": f"{name}.{number}", "n": i})
                    if block["roll_back"]:
                        raise RolledBack
            except RolledBack:
                pass


if __name__ == "__main__":
    url, name, plan, go = sys.argv[1:5]
    trio.run(main, url, name, json.loads(plan), go)
