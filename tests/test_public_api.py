"""The public surface: what `import trioflow` offers, and how it reports itself."""

from __future__ import annotations

import datetime
import inspect
import typing

import attrs
import trio

import trioflow
import trioflow.metrics


def test_all_is_sorted_and_complete() -> None:
    # Sorted as ruff's RUF022 sorts it: constants, then classes, then functions.
    assert trioflow.__all__ == sorted(
        trioflow.__all__, key=lambda name: (not name.isupper(), not name[0].isupper(), name)
    )
    public = {name for name in dir(trioflow) if not name.startswith("_")}
    # Submodules are reachable but not part of the surface.
    public -= {"stores", "testing", "metrics", "cli"}
    assert public == set(trioflow.__all__)


def test_public_names_report_the_public_module() -> None:
    for name in trioflow.__all__:
        obj = getattr(trioflow, name)
        if isinstance(obj, int):
            continue  # the limits, MAX_DEPTH and MAX_DATA_BYTES
        if typing.get_origin(obj) is typing.Literal:
            # The option values (OnExhausted, Overflow, StartFrom): aliases, no module.
            assert set(typing.get_args(obj)) <= {
                "earliest",
                "latest",
                "catch-up",
                "block",
                "retry-forever",
                "dead-letter",
                "halt",
            }, name
            continue
        assert obj.__module__ == "trioflow", name
    assert repr(trioflow.Event).endswith("trioflow.Event'>")


def test_every_error_derives_from_the_root() -> None:
    errors = [getattr(trioflow, n) for n in trioflow.__all__ if n.endswith("Error")]
    assert errors
    for error in errors:
        assert issubclass(error, trioflow.TrioflowError)
    assert issubclass(trioflow.UnknownStoreError, trioflow.ConfigurationError)
    assert issubclass(trioflow.SchemaVersionError, trioflow.StoreError)
    assert issubclass(trioflow.StoreUnavailableError, trioflow.StoreError)


def test_the_publish_limits_are_public() -> None:
    assert trioflow.MAX_DEPTH == 128
    assert trioflow.MAX_DATA_BYTES == 64 * 1024 * 1024


def test_leases_are_public() -> None:
    lease = trioflow.Lease(
        key="c", holder="h", token=1, expires_at=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    )
    assert lease.token == 1
    assert issubclass(trioflow.LeaseLostError, trioflow.TrioflowError)
    assert not issubclass(trioflow.LeaseLostError, trioflow.StoreError)
    assert trioflow.LeaseLostError("x", keys=frozenset({"c"})).keys == {"c"}
    assert "lease_ttl" in inspect.signature(trioflow.App).parameters


def test_retention_is_public() -> None:
    import trioflow.stores

    assert issubclass(trioflow.PrunedLogError, trioflow.ConsumerStateError)
    assert trioflow.PrunedLogError("x", consumers={"a": 1}).consumers == {"a": 1}
    assert "retention" in inspect.signature(trioflow.App).parameters
    for name in ("Retention", "PrunePlan", "PruneProgress", "PruneResult"):
        assert getattr(trioflow, name).__module__ == "trioflow"
    assert set(inspect.signature(trioflow.plan_prune).parameters) == {
        "store",
        "before",
        "older_than",
        "now",
    }
    for name in ("CursorInfo", "LogBounds"):
        assert name in trioflow.stores.__all__
    store_api = trioflow.stores.Store
    for method in ("cursors", "set_cursor", "log_bounds", "seq_before", "prune"):
        assert method in store_api.__abstractmethods__, method


def test_the_command_is_a_click_group_with_its_exit_statuses() -> None:
    import trioflow.cli

    assert trioflow.cli.__all__ == ["ExitCode", "cli", "main"]
    assert sorted(trioflow.cli.cli.commands) == [
        "consumers",
        "dead-letters",
        "migrate",
        "prune",
        "run",
        "status",
        "tail",
    ]
    assert [(code.name, int(code)) for code in trioflow.cli.ExitCode] == [
        ("OK", 0),
        ("FAILED", 1),
        ("USAGE", 2),
        ("UNAVAILABLE", 3),
        ("REFUSED", 4),
        ("PENDING", 5),
    ]


def test_the_metrics_module_offers_a_collector_and_serve_metrics() -> None:
    assert trioflow.metrics.__all__ == ["FlowCollector", "serve_metrics"]
    # `trioflow run --metrics-port` calls it so.
    parameters = inspect.signature(trioflow.metrics.serve_metrics).parameters
    assert [(p.name, p.kind, p.default) for p in parameters.values()] == [
        ("flow", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
        ("port", inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.empty),
        ("host", inspect.Parameter.KEYWORD_ONLY, "0.0.0.0"),
        ("task_status", inspect.Parameter.KEYWORD_ONLY, trio.TASK_STATUS_IGNORED),
    ]
    fields = {field.name for field in attrs.fields(trioflow.FlowStatistics)}
    assert {"publish_latency", "batch_size", "cursor_commit_latency", "store_errors"} <= fields
    assert {"retries", "redelivered", "handler_duration"} <= {
        field.name for field in attrs.fields(trioflow.ConsumerStatistics)
    }


def test_batch_consumers_are_public() -> None:
    assert issubclass(trioflow.BatchError, trioflow.TrioflowError)
    assert not issubclass(trioflow.BatchError, trioflow.StoreError)
    error = trioflow.BatchError(2, ValueError("x"))
    assert (error.index, type(error.cause)) == (2, ValueError)
    consumer = inspect.signature(trioflow.App.consumer).parameters
    assert consumer["batch"].kind is inspect.Parameter.KEYWORD_ONLY
    assert consumer["max_wait"].default is None
    assert "batch" in inspect.signature(trioflow.Flow.add_consumer).parameters
