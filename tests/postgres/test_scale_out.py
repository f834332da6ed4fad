"""Members of one service in real processes on PostgreSQL: killed, frozen and cut off.

The scenario and its checks are in ``tests/_scale_out.py``: member processes
run a consumer and a consumer group while two publisher processes publish
keyed events; members are SIGKILLed at random and restarted, one is frozen
with SIGSTOP past its lease, and one is cut off from the server through a
TCP proxy (`LosingProxy` refusing and dropping its connections) for longer
than its lease: its claims fail, so it must stop handling in time, and none
of its writes may land once another member took its consumers over.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests._scale_out import Cut, run_scale_out, scale_seeds
from tests.postgres._proxy import open_proxy
from tests.postgres._server import wait_sessions_gone
from trioflow.stores.postgres._driver import Driver

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("seed", scale_seeds([1]))
async def test_members_killed_frozen_and_cut_off_share_a_group_safely(
    tmp_path: Path,
    seed: int,
    pg_url: str,
    make_url: Callable[..., str],
    schema: str,
    admin: Driver,
) -> None:
    prefix = f"tf-scale-{uuid.uuid4().hex[:12]}"
    store_url = make_url(schema=schema, poll_interval=0.2)

    def member_url(name: str, run: int) -> str:
        return make_url(schema=schema, poll_interval=0.2, application_name=f"{prefix}-{name}-{run}")

    async def settle(name: str, run: int) -> None:
        # A killed member's last statement may still commit: let it end first.
        await wait_sessions_gone(admin, f"{prefix}-{name}-{run}")

    async with open_proxy(pg_url) as proxy:

        def cut() -> None:
            proxy.refusing = True
            proxy.drop_all()

        def heal() -> None:
            proxy.refusing = False

        await run_scale_out(
            store_url,
            tmp_path,
            seed=seed,
            members=4,
            cut=Cut(
                member="m0",
                url=proxy.url(pg_url, schema=schema, poll_interval=0.2),
                cut=cut,
                heal=heal,
            ),
            member_url=member_url,
            settle=settle,
        )
