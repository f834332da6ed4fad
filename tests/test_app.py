"""Defining an App and its consumers: every mistake is caught before anything runs."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

import trioflow
from trioflow.stores.memory import MemoryStore
from trioflow.stores.sqlite import SQLiteStore


async def noop(event: trioflow.Event) -> None:
    pass


def test_bare_decorator_uses_the_function_name() -> None:
    app = trioflow.App("memory://")

    @app.consumer
    async def audit_log(event: trioflow.Event) -> None:
        pass

    assert list(app.consumers) == ["audit_log"]
    assert app.consumers["audit_log"].handler is audit_log


def test_decorator_records_options_and_returns_the_function() -> None:
    app = trioflow.App("memory://", commit_every=7)
    decorated = app.consumer("m", types=["x", "y"], start="latest", buffer=5)(noop)
    spec = app.consumers["m"]
    assert decorated is noop
    assert (spec.types, spec.start, spec.buffer, spec.commit_every) == (
        frozenset({"x", "y"}),
        "latest",
        5,
        7,
    )
    assert app.consumer("n", commit_every=1)(noop) is noop
    assert app.consumers["n"].commit_every == 1


def test_async_callables_of_every_shape_are_accepted() -> None:
    class Handler:
        async def __call__(self, event: trioflow.Event) -> None:
            pass

    async def with_option(event: trioflow.Event, option: int) -> None:
        pass

    app = trioflow.App("memory://")
    app.consumer("instance")(Handler())
    app.consumer("partial")(functools.partial(with_option, option=1))
    assert set(app.consumers) == {"instance", "partial"}


@pytest.mark.parametrize("name", ["", "-leading-dash", "has space", "x" * 129, "naïve", 7])
def test_invalid_consumer_names_are_refused(name: object) -> None:
    app = trioflow.App("memory://")
    with pytest.raises(trioflow.ConfigurationError, match="invalid consumer name"):
        app.consumer(name)(noop)  # type: ignore[call-overload]


def test_duplicate_consumer_names_are_refused() -> None:
    app = trioflow.App("memory://")
    app.consumer("dup")(noop)
    with pytest.raises(trioflow.ConfigurationError, match="already registered"):
        app.consumer("dup")(noop)


def test_a_non_async_handler_is_refused() -> None:
    app = trioflow.App("memory://")

    def sync_handler(event: trioflow.Event) -> None:
        pass

    with pytest.raises(trioflow.ConfigurationError, match="not an async function"):
        app.consumer("sync")(sync_handler)  # type: ignore[type-var]
    assert app.consumers == {}


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"types": "order.created"}, "not the str"),
        ({"types": [""]}, "event type"),
        ({"start": "middle"}, "start must be"),
        ({"buffer": 0}, "buffer must be"),
        ({"buffer": 2.5}, "buffer must be"),
        ({"commit_every": 0}, "commit_every must be"),
    ],
)
def test_invalid_consumer_options_are_refused(options: dict[str, object], match: str) -> None:
    app = trioflow.App("memory://")
    with pytest.raises(trioflow.ConfigurationError, match=match):
        app.consumer("c", **options)(noop)  # type: ignore[call-overload]
    assert app.consumers == {}


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"commit_every": 0}, "commit_every"),
        ({"commit_interval": -1}, "commit_interval"),
        ({"poll_interval": 0}, "poll_interval"),
        ({"page_size": 0}, "page_size"),
        ({"max_batch": True}, "max_batch"),
        ({"shutdown_grace": float("inf")}, "shutdown_grace"),
        ({"restart": 5}, "RestartPolicy"),
    ],
)
def test_invalid_app_options_are_refused(options: dict[str, object], match: str) -> None:
    with pytest.raises(trioflow.ConfigurationError, match=match):
        trioflow.App("memory://", **options)  # type: ignore[arg-type]


def test_restart_policy_validates_and_caps() -> None:
    policy = trioflow.RestartPolicy(initial=0.5, maximum=3.0, multiplier=3.0)
    assert [policy.delay(n) for n in range(1, 5)] == [0.5, 1.5, 3.0, 3.0]
    with pytest.raises(trioflow.ConfigurationError, match="initial"):
        trioflow.RestartPolicy(initial=-1)
    with pytest.raises(trioflow.ConfigurationError, match="multiplier"):
        trioflow.RestartPolicy(multiplier=0.5)


@pytest.mark.parametrize(
    "url", ["redis://localhost", "events.db", "sqlite:", "memory://somewhere", "", "kafka://x"]
)
def test_unknown_store_urls_are_refused(url: str) -> None:
    with pytest.raises(trioflow.UnknownStoreError):
        trioflow.App(url)


def test_default_store_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TRIOFLOW_STORE", "memory://")
    assert isinstance(trioflow.App().store, MemoryStore)
    monkeypatch.delenv("TRIOFLOW_STORE")
    monkeypatch.chdir(tmp_path)
    store = trioflow.App().store
    assert isinstance(store, SQLiteStore)
    assert str(store.path).endswith("trioflow.db")


def test_a_store_instance_is_used_as_given() -> None:
    store = MemoryStore()
    assert trioflow.App(store).store is store


def test_use_store_points_the_app_at_another_store_with_its_options() -> None:
    app = trioflow.App(store="memory://", poll_interval=0.5)
    before = app.store
    app.use_store("memory://")
    assert app.store is not before
    assert app.store.poll_interval == 0.5


def test_use_store_refuses_a_store_its_transactional_consumers_cannot_use(
    tmp_path: Path,
) -> None:
    app = trioflow.App(store=f"sqlite:///{tmp_path}/app.db")

    @app.consumer("projection", transactional=True)
    async def project(event: trioflow.Event, tx: trioflow.Transaction) -> None:
        pass

    kept = app.store
    with pytest.raises(trioflow.ConfigurationError, match="'projection' are transactional"):
        app.use_store("memory://")
    assert app.store is kept
    with pytest.raises(trioflow.UnknownStoreError):
        app.use_store("nowhere://")


async def test_use_store_refuses_while_the_app_runs() -> None:
    app = trioflow.App(store="memory://")
    async with trioflow.open_flow(app):
        with pytest.raises(trioflow.ConfigurationError, match="runs a flow"):
            app.use_store("memory://")
