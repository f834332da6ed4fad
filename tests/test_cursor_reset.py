"""A running flow honours an operator's reset of a consumer's cursor.

``trioflow consumers reset --force`` (and ``remove --force``) take the
consumer's lease over, move (or delete) its stored cursor and release the
lease: the flow running the consumer loses it, takes it back under a new token
and goes on from the stored cursor, not from the position it had reached.
"""

from __future__ import annotations

from typing import cast

import attrs
import pytest
import trio

import trioflow
from trioflow._cursors import CursorProgress, CursorWriter
from trioflow._ownership import LeaseKeeper
from trioflow.stores.memory import MemoryStore


@attrs.define
class Handled:
    """The seqs a consumer handled, in order, and a way to wait for more."""

    seqs: list[int] = attrs.Factory(list)
    _changed: trio.Event = attrs.Factory(trio.Event)

    def add(self, seq: int) -> None:
        self.seqs.append(seq)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, count: int) -> None:
        with trio.fail_after(30):  # a guard against a hang, not a measure
            while len(self.seqs) < count:
                await self._changed.wait()


def recording_app(store: MemoryStore, handled: Handled) -> trioflow.App:
    app = trioflow.App(store=store, lease_ttl=0.3, commit_every=1)

    @app.consumer("audit")
    async def audit(event: trioflow.Event) -> None:
        handled.add(event.seq)

    return app


@pytest.mark.parametrize(
    ("change", "again"),
    [("reset", [3, 4, 5]), ("remove", [1, 2, 3, 4, 5])],
    ids=["reset-to-2", "removed"],
)
async def test_a_running_flow_goes_on_from_its_cursor_moved_back_or_forgotten(
    change: str, again: list[int]
) -> None:
    store, handled = MemoryStore(), Handled()
    async with trioflow.open_flow(recording_app(store, handled)) as flow:
        await flow.publish_many([("t", {"n": n}) for n in range(5)])
        await flow.wait_idle()
        # What the command does with --force while a flow owns the consumer.
        (lease,) = [lease for lease in await store.leases() if lease.key == "audit"]
        await store.release_leases(lease.holder, ["audit"])
        (taken,) = await store.claim_leases("operator", ["audit"], 30)
        assert taken.holder == "operator"
        if change == "reset":
            assert await store.set_cursor("audit", 2) == 5
        else:
            await store.forget_consumer("audit")
        await store.release_leases("operator", ["audit"])
        await handled.wait_for(5 + len(again))
        await flow.wait_idle()
        assert flow.statistics().consumers["audit"].cursor == 5
    assert handled.seqs == [1, 2, 3, 4, 5, *again]
    assert await store.load_cursors() == {"audit": 5}


@attrs.define
class Tokens:
    """The lease keeper as the cursor writer sees it: the token this flow holds now."""

    current: int | None

    def token(self, key: str) -> int | None:
        return self.current

    def lost(self, key: str, token: int) -> None:
        raise AssertionError(f"the writer blamed the current ownership ({token}) for a stale write")


async def test_a_position_reached_before_the_takeover_never_lands_after_it() -> None:
    store = MemoryStore()
    async with store.open():
        (first,) = await store.claim_leases("flow", ["audit"], 30)
        tokens = Tokens(first.token)
        writer = CursorWriter(store=store, leases=cast(LeaseKeeper, tokens))
        progress = CursorProgress("audit")
        await writer.commit_first(progress, 0, 0)
        # Reached under the first ownership; not written yet when the lease passes on.
        writer.request(progress, 5, 5)
        await store.release_leases("flow", ["audit"])
        await store.claim_leases("operator", ["audit"], 30)
        await store.release_leases("operator", ["audit"])
        (again,) = await store.claim_leases("flow", ["audit"], 30)
        tokens.current = again.token
        await writer._write()
        assert await store.load_cursors() == {"audit": 0}
        # A position reached under the new ownership lands.
        writer.request(progress, 3, 3)
        await writer._write()
        assert await store.load_cursors() == {"audit": 3}
