"""Parsing and validating ``postgresql://`` store URLs (no server needed)."""

from __future__ import annotations

import pytest

from trioflow import ConfigurationError, UnknownStoreError
from trioflow.stores import store_from_url
from trioflow.stores.postgres import PostgresStore


def test_defaults() -> None:
    store = PostgresStore.from_url("postgresql://alice@db.example:5433/app")
    assert store.schema == "trioflow"
    assert store.cursor_durability == "sync"
    assert store.poll_interval == 1.0
    config = store._config
    assert config.dsn == "postgresql://alice@db.example:5433/app"
    assert (config.min_size, config.max_size) == (1, 10)
    assert config.statement_cache_size == 100
    assert config.command_timeout is None
    assert config.server_settings["application_name"] == "trioflow"


def test_trioflow_options_are_taken_out_and_the_rest_passed_on() -> None:
    store = PostgresStore.from_url(
        "postgres://alice:s3cret@db.example/app?schema=orders_v2&pool_min_size=0"
        "&pool_max_size=20&sslmode=require&poll_interval=0.5"
        "&cursor_durability=unlogged&cursor_checkpoint_interval=2&connect_timeout=3"
        "&command_timeout=30&cleanup_timeout=1&statement_cache_size=0"
        "&application_name=billing&target_session_attrs=read-write"
    )
    assert store.schema == "orders_v2"
    assert store.cursor_durability == "unlogged"
    assert store.poll_interval == 0.5
    assert store._checkpoint_interval == 2.0
    config = store._config
    assert config.dsn == (
        "postgresql://alice:s3cret@db.example/app?sslmode=require&target_session_attrs=read-write"
    )
    assert (config.min_size, config.max_size) == (0, 20)
    assert (config.connect_timeout, config.command_timeout, config.cleanup_timeout) == (
        3.0,
        30.0,
        1.0,
    )
    assert config.statement_cache_size == 0
    assert config.server_settings["application_name"] == "billing"


def test_store_from_url_builds_a_postgres_store() -> None:
    store = store_from_url("postgresql://alice@localhost/app?schema=x")
    assert isinstance(store, PostgresStore)
    assert store.schema == "x"


def test_password_is_never_shown() -> None:
    store = PostgresStore.from_url("postgresql://alice:s3cret@localhost/app")
    assert "s3cret" not in repr(store)
    assert "s3cret" not in store._config.display
    with pytest.raises(UnknownStoreError) as info:
        PostgresStore.from_url("postgresql://alice:s3cret@localhost/app?password=other&bogus=1")
    assert "s3cret" not in str(info.value)
    assert "other" not in str(info.value)
    keyword_form = PostgresStore("host=db user=alice password='s3 cret' dbname=app")
    assert "s3" not in repr(keyword_form)
    assert "password=***" in repr(keyword_form)


@pytest.mark.parametrize(
    "schema",
    [
        "",
        "Trioflow",
        "trio-flow",
        "1abc",
        'x"; DROP TABLE y; --',
        "x y",
        "a" * 49,
        "pg_catalog",
        "pg_anything",
        "information_schema",
        "schéma",
    ],
)
def test_invalid_schema_names_are_refused(schema: str) -> None:
    with pytest.raises(UnknownStoreError, match="schema"):
        PostgresStore.from_url(f"postgresql://localhost/app?schema={schema}")
    with pytest.raises(ConfigurationError, match="schema"):
        PostgresStore("postgresql://localhost/app", schema=schema)


@pytest.mark.parametrize("schema", ["a", "_", "trioflow", "orders_2024", "select", "a" * 48])
def test_valid_schema_names(schema: str) -> None:
    assert PostgresStore.from_url(f"postgresql://localhost/app?schema={schema}").schema == schema


@pytest.mark.parametrize(
    ("query", "match"),
    [
        ("pool_max_size=ten", "pool_max_size='ten' is not valid: expected an integer"),
        ("pool_min_size=5&pool_max_size=2", "pool sizes"),
        ("pool_max_size=0", "pool sizes"),
        ("poll_interval=0", "poll_interval must be a positive number"),
        ("poll_interval=nan", "poll_interval must be a positive number"),
        ("connect_timeout=-1", "connect_timeout must be a positive number"),
        ("command_timeout=inf", "command_timeout must be a positive number"),
        ("cursor_durability=fast", "cursor_durability must be one of sync, async, unlogged"),
        ("statement_cache_size=-1", "statement_cache_size must be >= 0"),
        ("schema=a&schema=b", "gives option 'schema' twice"),
        ("pool_size=3", "unknown option.*pool_size"),
        ("options=-c%20x=1", "unknown option.*options"),
    ],
)
def test_invalid_options_are_refused(query: str, match: str) -> None:
    with pytest.raises(UnknownStoreError, match=match):
        PostgresStore.from_url(f"postgresql://localhost/app?{query}")


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("mysql://localhost/app", "not a PostgreSQL URL"),
        ("postgresql://localhost:notaport/app", "malformed"),
        ("postgresql://localhost/app#frag", "fragment"),
    ],
)
def test_malformed_urls_are_refused(url: str, match: str) -> None:
    with pytest.raises(UnknownStoreError, match=match):
        PostgresStore.from_url(url)


def test_command_timeout_none() -> None:
    assert (
        PostgresStore.from_url("postgresql://h/d?command_timeout=none")._config.command_timeout
        is None
    )


def test_constructor_validates_too() -> None:
    with pytest.raises(ConfigurationError, match="DSN"):
        PostgresStore("")
    with pytest.raises(ConfigurationError, match="cleanup_timeout"):
        PostgresStore("postgresql://h/d", cleanup_timeout=0)
