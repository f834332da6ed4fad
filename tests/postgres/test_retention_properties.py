"""The property of pruning (tests/test_retention_properties.py) on PostgreSQL.

Each example runs on a schema of its own: a fresh log, numbered by the
server's sequence, pruned by the store's transactions.
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import HealthCheck, given, settings

from tests.test_retention_properties import Case, cases, check_case
from trioflow.stores.postgres import PostgresStore


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cases)
def test_pruning_keeps_what_cursors_and_letters_need(
    case: Case, make_url: Callable[..., str], new_schema: Callable[[], str]
) -> None:
    url = make_url(schema=new_schema(), poll_interval=0.2)
    check_case(case, lambda: PostgresStore.from_url(url))
