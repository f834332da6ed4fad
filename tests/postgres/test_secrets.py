"""Secrets in store URLs never show: not in a repr, an error, a traceback or a log."""

from __future__ import annotations

import logging
import traceback
import uuid
from collections.abc import Callable

import asyncpg
import pytest
import trio

import trioflow
from trioflow import TrioflowError, UnknownStoreError
from trioflow.stores import store_from_url
from trioflow.stores._masking import mask_dsn
from trioflow.stores.postgres import PostgresStore
from trioflow.stores.postgres._driver import Driver, exception_chain

SECRET = "s3cret"

#: Every place a URL can carry a secret, and forms a secret can take there.
URLS_WITH_SECRETS = [
    f"postgresql://alice:{SECRET}@db.example:5433/app",
    f"postgresql://alice:{SECRET}%21@db.example/app",  # percent-encoded "!"
    f"postgresql://alice@db.example/app?password={SECRET}",
    f"postgresql://alice@db.example/app?sslmode=require&sslpassword={SECRET}&sslkey=k.pem",
    f"postgres://alice:x@db.example/app?password={SECRET}&sslpassword={SECRET}&schema=orders",
]

#: libpq's key/value form, which the constructor accepts as a DSN.
KEYWORD_DSNS = [
    f"host=db user=alice password={SECRET} dbname=app",
    f"host=db user=alice password='{SECRET} with spaces' dbname=app",
    f"host=db sslpassword={SECRET} sslmode=require",
    f"host=db oauth_client_secret={SECRET}",
    f"host=db user=alice pasword={SECRET}",  # misspelt: still hidden
]


def full_text(error: BaseException) -> str:
    """Everything a traceback of ``error`` shows, and the text of every exception chained to it."""
    texts = ["".join(traceback.format_exception(error))]
    texts += [f"{exc} {exc!r}" for exc in exception_chain(error)]
    return "\n".join(texts)


class Watch(logging.Handler):
    """A log handler that sets a trio event once a message holds some text."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.seen = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


@pytest.mark.parametrize("url", URLS_WITH_SECRETS)
def test_a_url_shows_no_secret(url: str) -> None:
    store = PostgresStore.from_url(url)
    assert SECRET not in repr(store)
    assert SECRET not in str(store)
    assert SECRET not in repr(store._config)
    assert SECRET not in store._config.display
    assert "db.example" in repr(store)
    # The URL itself still reaches the driver whole.
    assert SECRET in store._config.dsn


@pytest.mark.parametrize("dsn", KEYWORD_DSNS)
def test_a_keyword_dsn_shows_no_secret(dsn: str) -> None:
    store = PostgresStore(dsn)
    assert SECRET not in repr(store)
    assert SECRET not in repr(store._config)
    assert "host=db" in repr(store)


@pytest.mark.parametrize(
    "url",
    [
        *(url + "&bogus=1" if "?" in url else url + "?bogus=1" for url in URLS_WITH_SECRETS),
        f"postgresql://alice:{SECRET}@db.example/app?pool_max_size=ten",
        f"postgresql://alice:{SECRET}@db.example/app?schema=Not-Valid",
        f"postgresql://alice:{SECRET}@db.example/app#fragment",
        f"postgresql://alice:{SECRET}@db.example:99999/app",
        f"mysql://alice:{SECRET}@db.example/app",
    ],
)
def test_errors_about_a_url_show_no_secret(url: str) -> None:
    with pytest.raises(UnknownStoreError) as info:
        store_from_url(url)
    assert SECRET not in str(info.value)
    assert "db.example" in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgres://u@[::1/db",
        f"postgres://u:{SECRET}@[::1/db",
        f"postgresql://u:{SECRET}@[::1/db?sslpassword={SECRET}&password={SECRET}",
        f"postgresql://u:{SECRET}@::1]/db",
    ],
)
def test_a_url_that_cannot_be_parsed_is_refused_without_its_secret(url: str) -> None:
    for make in (PostgresStore.from_url, store_from_url, trioflow.App):
        with pytest.raises(UnknownStoreError, match="IPv6 address needs both its brackets") as info:
            make(url)
        assert SECRET not in str(info.value)
        assert SECRET not in mask_dsn(url)


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://alice:{SECRET}@cret@db.example/app",  # an "@" in the password
        f"postgresql://alice:{SECRET}/x@db.example/app",  # a "/" in the password
        f"postgresql://alice:{SECRET}?x@db.example/app",  # a "?" in the password
        f"postgresql://alice:{SECRET}#x@db.example/app",  # a "#" in the password
    ],
)
def test_a_password_with_unencoded_delimiters_is_refused_and_hidden(url: str) -> None:
    # Readers of URLs disagree about where such a password ends: a piece of
    # it could be taken for the host or the database, and quoted back.
    with pytest.raises(UnknownStoreError, match="must be percent-encoded") as info:
        store_from_url(url)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    "error",
    [
        lambda dsn: asyncpg.InterfaceError(f"cannot use {dsn}"),
        lambda dsn: asyncpg.exceptions.ClientConfigurationError(f"invalid DSN {dsn!r}"),
        lambda dsn: ConnectionRefusedError(111, f"refused by {dsn}"),
        lambda dsn: OSError(2, "No such file", dsn),
        lambda dsn: ValueError(f"bad value in {dsn}"),
    ],
)
async def test_a_driver_error_echoing_the_url_shows_no_secret(
    monkeypatch: pytest.MonkeyPatch, error: Callable[[str], Exception]
) -> None:
    async def connect(dsn: str, **_: object) -> object:
        try:
            raise KeyError(f"an earlier failure, with {dsn}")
        except KeyError:
            # Chained, as asyncpg's own errors often are.
            raise error(dsn) from None

    monkeypatch.setattr(asyncpg, "connect", connect)
    store = PostgresStore.from_url(
        f"postgresql://alice:{SECRET}@127.0.0.1/app?sslpassword={SECRET}&sslmode=disable"
    )
    # A StoreError, or a ConfigurationError for an option asyncpg refuses.
    with pytest.raises(TrioflowError) as info:
        async with store.open():
            pass  # pragma: no cover
    assert SECRET not in full_text(info.value)
    assert "127.0.0.1" in str(info.value)


async def test_logs_show_no_secret(
    make_url: Callable[..., str],
    schema: str,
    admin: Driver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The test server ignores these (trust authentication, no SSL).
    tag = f"trioflow-test-{uuid.uuid4().hex[:12]}"
    url = make_url(
        schema=schema,
        application_name=tag,
        password=SECRET,
        sslpassword=SECRET,
        sslmode="disable",
    )
    store = PostgresStore.from_url(url)
    caplog.set_level(logging.DEBUG, logger="trioflow")
    watch = Watch("LISTEN connection failed")
    logging.getLogger("trioflow").addHandler(watch)
    try:
        async with store.open():
            # Losing the LISTEN connection is logged, naming the server.
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = $1 AND query LIKE 'LISTEN%'",
                tag,
            )
            with trio.fail_after(10):
                await watch.seen.wait()
    finally:
        logging.getLogger("trioflow").removeHandler(watch)
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "LISTEN connection failed" in text
    assert SECRET not in text
