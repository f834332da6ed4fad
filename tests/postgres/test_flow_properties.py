"""The runtime's property test, end to end on PostgreSQL.

The same random scenarios as tests/test_properties.py (random batches,
slowdowns, handler failures, buffer bounds, flows stopped and reopened), on
a real server with the real clock: delays are scaled down to milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import HealthCheck, given, settings

from tests.test_properties import Scenario, check_scenario, run_scenario, scenarios
from trioflow.stores.postgres import PostgresStore


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(scenario=scenarios())
def test_every_consumer_handles_every_event_once_in_order(
    scenario: Scenario, make_url: Callable[..., str], new_schema: Callable[[], str]
) -> None:
    store = PostgresStore.from_url(make_url(schema=new_schema(), poll_interval=0.2))
    check_scenario(scenario, *run_scenario(scenario, store, time_scale=0.005, mock_clock=False))
