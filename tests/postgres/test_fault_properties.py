"""The fault property test on PostgreSQL: several flows, each with its own pool.

The scenarios of tests/test_fault_properties.py (random store faults in every
call of every flow, flows stopped and reopened), on a real server with the
real clock: delays are scaled down to milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import HealthCheck, given, settings

from tests.test_fault_properties import FaultScenario, check_fault_scenario, fault_scenarios
from tests.test_fault_properties import run_fault_scenario as run
from trioflow.stores.postgres import PostgresStore


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(scenario=fault_scenarios())
def test_store_faults_delay_delivery_but_never_lose_or_reorder(
    scenario: FaultScenario, make_url: Callable[..., str], new_schema: Callable[[], str]
) -> None:
    url = make_url(schema=new_schema(), poll_interval=0.05, pool_max_size=3)
    # One handle (one pool) per flow: each flow stands for a process.
    record, log = run(
        scenario, lambda: PostgresStore.from_url(url), time_scale=0.01, mock_clock=False
    )
    check_fault_scenario(scenario, record, log)
