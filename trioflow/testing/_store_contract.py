"""The store contract as a test suite: every backend subclasses `StoreContract`.

The tests check what `trioflow.stores.Store` promises and nothing more: they
allow holes in sequence numbers unless the subclass says it has none, and they
never depend on timing for correctness (only for giving up on a hung store).
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import math
import random
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, get_args

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .._dead_letters import (
    MAX_MESSAGE_LENGTH,
    MAX_TRACEBACK_LENGTH,
    DeadLetter,
    DeadLetterReason,
)
from .._errors import (
    ConfigurationError,
    ConsumerStateError,
    LeaseLostError,
    PrunedLogError,
    QueryError,
    StoreError,
)
from .._events import JSON, MAX_DATA_BYTES, MAX_DEPTH, Event, NewEvent, encode, new_ids
from .._leases import Lease
from ..stores._base import Appended, LogBounds, Store
from ..stores._transactions import StoreTransaction
from ..stores._url import store_from_url

# Text a store must keep exactly: any Unicode scalar value except NUL, which
# PostgreSQL's text and jsonb cannot hold (the contract does not settle NUL).
_chars = st.characters(codec="utf-8", exclude_characters="\x00")
_text = st.text(_chars, max_size=20)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text
)


def nested(depth: int, leaf: JSON = 0) -> JSON:
    """``leaf`` inside ``depth`` levels of alternating lists and dicts."""
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


_json: st.SearchStrategy[JSON] = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(_chars, max_size=8), children, max_size=4)
    ),
    max_leaves=12,
) | st.one_of(
    # What users publish at the edges of what trioflow accepts: values nested
    # as deeply as allowed, and large texts (non-ASCII ones too).
    st.builds(nested, st.integers(MAX_DEPTH - 3, MAX_DEPTH), _scalars),
    st.builds(lambda n, c: c * n, st.integers(100_000, 1_000_000), st.sampled_from('xé🎉\\"')),
)
_event_items = st.tuples(st.text(_chars, min_size=1, max_size=20), _json, st.none() | _text)

#: Pieces that turn a valid store URL into a malformed or odd one.
_URL_DAMAGE = st.sampled_from(
    [
        "[",
        "]",
        "[::1",
        "%",
        "%zz",
        "%00",
        "\x00",
        "?",
        "&",
        "=",
        "#",
        ":",
        "@",
        "/",
        "//",
        " ",
        "é",
        ":99999",
        ":-1",
        ":port",
        "?x=1",
        "&&",
        "?poll_interval=nan",
        "?poll_interval=-1",
        "?schema=",
        "?busy_timeout=1e999",
        "\n",
    ]
)

#: The tests that only make sense for a persistent store.
_PERSISTENCE_TESTS = frozenset(
    {
        "test_everything_survives_reopening",
        "test_dead_letters_survive_reopening",
        "test_pruning_and_resets_survive_reopening",
    }
)

#: The tests of `Store.transaction`, for stores that run transactions.
_TRANSACTION_TESTS = frozenset(
    {
        "test_a_transaction_commits_rows_cursors_and_events_together",
        "test_an_exception_rolls_everything_back",
        "test_a_cancelled_transaction_rolls_back",
        "test_queries_return_plain_rows_and_values",
        "test_a_refused_statement_is_a_query_error_naming_it",
        "test_fenced_cursor_commits_in_a_transaction",
        "test_dead_letters_discarded_in_a_transaction_go_with_it",
        "test_an_append_outside_waits_for_a_transaction_that_appended",
        "test_a_transaction_leaves_the_store_usable_when_a_statement_hangs",
    }
)

#: How far a store's clock may be from this process's (a store may use its own).
#: Loose, yet a unit error (milliseconds read as seconds, say) shows.
_CLOCK_SLACK = datetime.timedelta(minutes=5)
_HOUR = datetime.timedelta(hours=1)
_REASONS: tuple[DeadLetterReason, ...] = get_args(DeadLetterReason)
_FAILED_AT = datetime.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=datetime.UTC)


# Dead letters for the model-based test: few consumers and seqs, so that steps
# collide (the same letter recorded twice, requeued, discarded, forgotten).
_DEAD_LETTER_CONSUMERS = ("a", "b", "ü 🎉")
_times = st.datetimes(
    min_value=datetime.datetime(1900, 1, 1),
    max_value=datetime.datetime(2200, 1, 1),
    timezones=st.just(datetime.UTC),
)
_consumers = st.sampled_from(_DEAD_LETTER_CONSUMERS)
_letters = st.builds(
    DeadLetter,
    consumer=_consumers,
    seq=st.integers(1, 6),
    event_id=st.uuids(),
    type=st.text(_chars, min_size=1, max_size=20),
    attempts=st.integers(0, 2**31 - 1),
    first_failed_at=_times,
    last_failed_at=_times,
    reason=st.sampled_from(_REASONS),
    error_type=_text,
    message=st.text(_chars, max_size=200),
    traceback=st.text(_chars, max_size=200),
)
# Seqs to requeue or discard: some are letters, some are not.
_seq_lists = st.lists(st.integers(0, 8), max_size=5)


@attrs.frozen
class _Record:
    letter: DeadLetter
    cursor: int | None


@attrs.frozen
class _Requeue:
    consumer: str
    seqs: list[int]
    after: float


@attrs.frozen
class _Discard:
    consumer: str
    seqs: list[int]


@attrs.frozen
class _Forget:
    consumer: str


@attrs.frozen
class _Commit:
    consumer: str
    seq: int


_Step = _Record | _Requeue | _Discard | _Forget | _Commit


# Steps of the model-based pruning test: appends, cursor moves, resets,
# letters, forgets and prunes in any order, on a few consumers.
@attrs.frozen
class _Append:
    count: int


@attrs.frozen
class _Reset:
    consumer: str
    seq: int


@attrs.frozen
class _Prune:
    through: int
    limit: int


_PruneStep = _Append | _Commit | _Reset | _Record | _Discard | _Forget | _Prune
_prune_steps: st.SearchStrategy[_PruneStep] = st.one_of(
    st.builds(_Append, st.integers(1, 4)),
    st.builds(_Commit, _consumers, st.integers(0, 12)),
    st.builds(_Reset, _consumers, st.integers(-1, 13)),
    st.builds(_Record, _letters, st.none() | st.integers(0, 12)),
    st.builds(_Discard, _consumers, _seq_lists),
    st.builds(_Forget, _consumers),
    st.builds(_Prune, st.integers(0, 14), st.integers(1, 5)),
)
_steps: st.SearchStrategy[_Step] = st.one_of(
    st.builds(_Record, _letters, st.none() | st.integers(0, 10)),
    # 0: due at once; an hour: not due while the test runs.
    st.builds(_Requeue, _consumers, _seq_lists, st.sampled_from([0.0, 3600.0])),
    st.builds(_Discard, _consumers, _seq_lists),
    st.builds(_Forget, _consumers),
    st.builds(_Commit, _consumers, st.integers(0, 10)),
)


class StoreContract:
    """Tests every `Store` implementation must pass; subclass it once per backend.

    The name does not start with ``Test``, so pytest collects only the
    subclasses. A subclass implements `open_store` and `open_peer`, and sets
    the class flags that describe its backend::

        class TestSQLiteStore(StoreContract):
            seqs_without_holes = True

            @pytest.fixture(autouse=True)
            def _directory(self, tmp_path: pathlib.Path) -> None:
                self.directory = tmp_path
                self.files = itertools.count()

            @contextlib.asynccontextmanager
            async def open_store(self) -> AsyncIterator[Store]:
                store = SQLiteStore(self.directory / f"{next(self.files)}.db")
                async with store.open():
                    yield store

            @contextlib.asynccontextmanager
            async def open_peer(self, store: Store) -> AsyncIterator[Store]:
                assert isinstance(store, SQLiteStore)
                peer = SQLiteStore(store.path)
                async with peer.open():
                    yield peer

    Each test opens its stores itself (``async with self.open_store()``)
    rather than through a fixture: the property-based test needs a fresh store
    per example, and pytest-trio runs async fixtures defined on a class with
    an instance other than the test's. Pass anything a store needs (a
    temporary directory, a database URL) through a sync autouse fixture that
    sets attributes on ``self``, as above.

    The tests are marked ``trio``: they need the pytest-trio plugin and
    Hypothesis (``pip install trioflow[test]``).
    """

    pytestmark = pytest.mark.trio

    #: True when events, cursors and dead letters survive closing every handle
    #: and opening the store again (set False for a store that lives in memory).
    persistent: ClassVar[bool] = True

    #: True when the store runs transactions (`Store.transaction`); the
    #: transaction tests are skipped for one that does not (and check that it
    #: refuses with a ConfigurationError).
    transactions: ClassVar[bool] = False

    #: True when the store promises sequence numbers 1, 2, 3... without holes
    #: (the contract allows holes, so only such stores are checked for them).
    seqs_without_holes: ClassVar[bool] = False

    #: Seconds after which a test gives up waiting for the store (a hang).
    patience: ClassVar[float] = 10.0

    #: Valid URLs of this backend, for `store_from_url`. Damaged copies must
    #: raise a `trioflow.ConfigurationError`, never a bare built-in error, and
    #: the text ``s3cret`` (put it where the URL holds a secret) must never
    #: appear in a message or a repr. Empty: the backend has no URL.
    store_urls: ClassVar[Sequence[str]] = ()

    def open_store(self) -> contextlib.AbstractAsyncContextManager[Store]:
        """Return an async context manager yielding a fresh, empty, opened store.

        Called once per test, and once per example in property-based tests:
        every call must give a new, empty log. The store is closed on exit.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement open_store()")

    def open_peer(self, store: Store) -> contextlib.AbstractAsyncContextManager[Store]:
        """Return an async context manager yielding another handle on ``store``'s log.

        The peer stands for another process or machine using the same
        underlying log: an independent connection where the backend has
        connections, or ``store`` itself for a store shared by identity (the
        memory store). ``store`` may be open or already closed.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement open_peer()")

    @pytest.fixture(autouse=True)
    def _skip_what_the_store_lacks(self, request: pytest.FixtureRequest) -> None:
        # Skipped here, not inside the test: pytest-trio drops the reason of a
        # skip raised in a trio test.
        name = request.function.__name__
        if name in _PERSISTENCE_TESTS and not self.persistent:
            pytest.skip(f"{type(self).__name__}.persistent is False")
        if name in _TRANSACTION_TESTS and not self.transactions:
            pytest.skip(f"{type(self).__name__}.transactions is False")
        if name == "test_a_store_without_transactions_refuses_them" and self.transactions:
            pytest.skip(f"{type(self).__name__}.transactions is True")

    # -- the log ----------------------------------------------------------------

    async def test_empty_store(self) -> None:
        """A new store has head 0, no events and no cursors."""
        async with self.open_store() as store:
            assert await store.head() == 0
            assert list(await store.read(0, 10)) == []
            assert await store.load_cursors() == {}

    async def test_append_numbers_batches_after_the_prior_head(self) -> None:
        """Each batch gets increasing seqs above the head it reports as ``after``."""
        async with self.open_store() as store:
            highest = 0
            all_seqs: list[int] = []
            for size in (1, 3, 2, 5):
                head_before = await store.head()
                appended = await store.append(make_events(size))
                assert appended.after == head_before
                seqs = list(appended.seqs)
                assert len(seqs) == size
                assert seqs[0] > appended.after
                assert seqs[0] > highest
                assert_increasing(seqs)
                assert await store.head() == seqs[-1]
                highest = seqs[-1]
                all_seqs += seqs
            if self.seqs_without_holes:
                assert all_seqs == list(range(1, len(all_seqs) + 1))

    async def test_read_returns_a_batch_in_order(self) -> None:
        """A batch is read back in the order it was given, with the seqs it got."""
        async with self.open_store() as store:
            batch = make_events(50)
            appended = await store.append(batch)
            events = await store.read(0, 100)
            assert [event.id for event in events] == [new.id for new in batch]
            assert [event.seq for event in events] == list(appended.seqs)

    async def test_read_returns_the_appended_fields(self) -> None:
        """Every field survives the store: unicode, nested JSON, keys, created_at."""
        items: list[tuple[str, JSON, str | None]] = [
            ("order.créé", {"nested": {"list": [1, 2.5, None, {"x": []}]}, "é": "ü"}, None),
            ("t", None, "key-ü"),
            ("t", True, ""),
            ("t", 0, None),
            ("t", -1.5e-7, None),
            ("t", 2**53 + 1, None),
            ("t", "", None),
            ("t", "日本語 ✓ 🎉 \\ \" '\n\t", "🔑"),
            ("t", [[], {}, [{}], ""], None),
            ("x" * 255, {"k" * 100: "v" * 10_000}, "k" * 1024),
        ]
        ids = new_ids(len(items))
        batch = [encode(t, data, key, i) for (t, data, key), i in zip(items, ids, strict=True)]
        async with self.open_store() as store:
            before = datetime.datetime.now(datetime.UTC)
            appended = await store.append(batch)
            after = datetime.datetime.now(datetime.UTC)
            created_at = appended.created_at
            assert created_at.utcoffset() == datetime.timedelta(0)
            # Loose bounds: the store may use its own clock, but a unit error
            # (milliseconds read as microseconds, say) must show.
            slack = datetime.timedelta(minutes=5)
            assert before - slack <= created_at <= after + slack
            expected = [
                new.persisted(seq, created_at)
                for new, seq in zip(batch, appended.seqs, strict=True)
            ]
            events = list(await store.read(0, 100))
            assert events == expected
            for event in events:
                assert event.created_at.utcoffset() == datetime.timedelta(0)

    async def test_replayed_data_is_live_data_for_awkward_numbers_and_key_orders(self) -> None:
        """What a consumer is handed live and what a replay reads back are the same data,
        exactly: numbers keep their type, value and sign (1e23 stays a float, a
        20-digit integer an int, -0.0 negative), keys keep their order, and both
        are what `json` gives back for the data published.
        """
        items: list[JSON] = [
            1e23,
            -0.0,
            [0.0, -0.0, 1.0, -1.0, 0.1, 1e16, 1e22, 1e-7, 5e-324, 1.7976931348623157e308],
            [2**63 - 1, 2**63, 2**64 + 1, -(2**63) - 1, 10**30, -(10**40), 0, -1],
            [123456789.0, 9007199254740993, 2.5e-308, 1e300, 12345678901234567890.0],
            {"b": 1, "a": 2, "c": {"z": 0, "y": [], "x": {}}, "A": None, "": True, "é": False},
            {str(n): n for n in (10, 9, 2, 1, 100, 0)},
            {"nested": [{"y": 1.5, "x": -2.5e-10}, (1, 2.0, "3"), [True, None, "1e23"]]},
            "1e23",
            "",
            0,
            None,
        ]
        ids = new_ids(len(items))
        batch = [
            encode("t", data, None, event_id) for data, event_id in zip(items, ids, strict=True)
        ]
        async with self.open_store() as store:
            appended = await store.append(batch)
            live = appended.events or [
                new.persisted(seq, appended.created_at)
                for new, seq in zip(batch, appended.seqs, strict=True)
            ]
            replayed = list(await store.read(appended.after, len(items)))
            assert [event.seq for event in replayed] == list(appended.seqs)
            for data, live_event, replayed_event in zip(items, live, replayed, strict=True):
                expected = json.loads(json.dumps(data))
                assert_same_json(live_event.data, expected)
                assert_same_json(replayed_event.data, expected)
                assert replayed_event.size == live_event.size

    async def test_read_pages(self) -> None:
        """``read(after, limit)`` pages through the log, across batch boundaries."""
        async with self.open_store() as store:
            first = await store.append(make_events(4))
            second = await store.append(make_events(6))
            seqs = [*first.seqs, *second.seqs]

            async def page(after: int, limit: int) -> list[int]:
                events = await store.read(after, limit)
                assert len(events) <= limit
                return [event.seq for event in events]

            assert await page(0, 3) == seqs[:3]
            assert await page(seqs[2], 3) == seqs[3:6]
            assert await page(seqs[3], 1) == [seqs[4]]
            assert await page(seqs[8], 3) == [seqs[9]]
            assert await page(seqs[9], 3) == []
            assert await page(seqs[9] + 1000, 5) == []
            assert await page(0, 1) == [seqs[0]]
            assert await page(0, 1000) == seqs
            assert await page(0, 0) == []
            assert await read_all(store, limit=1) == await store.read(0, 1000)

    async def test_read_stops_at_max_bytes(self) -> None:
        """``max_bytes`` cuts a page before the event that would pass it, never before the first."""
        sizes = [10, 30, 5, 100, 2, 2]
        ids = new_ids(len(sizes))
        # A JSON string of n - 2 characters takes n bytes with its quotes.
        batch = [encode("t", "x" * (n - 2), None, i) for n, i in zip(sizes, ids, strict=True)]
        async with self.open_store() as store:
            appended = await store.append(batch)
            seqs = list(appended.seqs)

            async def page(after: int, limit: int, max_bytes: int | None) -> list[int]:
                events = await store.read(after, limit, max_bytes=max_bytes)
                assert [event.size for event in events] == [
                    sizes[seqs.index(event.seq)] for event in events
                ]
                return [event.seq for event in events]

            assert await page(0, 10, None) == seqs
            assert await page(0, 10, 10) == seqs[:1]
            assert await page(0, 10, 39) == seqs[:1]
            assert await page(0, 10, 40) == seqs[:2]
            assert await page(0, 10, 45) == seqs[:3]
            assert await page(0, 2, 1000) == seqs[:2]
            assert await page(seqs[0], 10, 1) == seqs[1:2]
            assert await page(seqs[2], 10, 50) == seqs[3:4]
            assert await page(seqs[3], 10, 4) == seqs[4:6]
            assert await page(seqs[3], 10, 3) == seqs[4:5]
            assert await page(0, 10, 0) == seqs[:1]

    async def test_data_at_the_publish_limits_reads_back_exactly(self) -> None:
        """Data as deep as `MAX_DEPTH` and as large as `MAX_DATA_BYTES` reads back equal.

        Every reader must be able to read whatever publishing accepted: a store
        must not add a level of nesting when it decodes, or fail on size.
        """
        items: list[JSON] = [
            nested(MAX_DEPTH),
            nested(MAX_DEPTH, "é"),
            [nested(MAX_DEPTH - 1)] * 50,
            "x" * (MAX_DATA_BYTES - 2),
        ]
        ids = new_ids(len(items))
        async with self.open_store() as store:
            for data, event_id in zip(items, ids, strict=True):
                await store.append([encode("t", data, None, event_id)])
            # Read back one by one, and then together: a store that decodes a
            # page at once must not fail (or nest deeper) because of it.
            for after, data in enumerate(items):
                (event,) = await store.read(after, 1)
                assert event.data == data
                assert event.id == ids[after]
            events = await store.read(0, 3)
            assert [event.data for event in events] == items[:3]
            (big,) = await store.read(3, 1)
            assert big.size == MAX_DATA_BYTES

    async def test_empty_append(self) -> None:
        """Appending no events commits nothing and reports the head as ``after``."""
        async with self.open_store() as store:
            empty = await store.append([])
            assert list(empty.seqs) == []
            assert empty.after == 0
            assert empty.created_at.utcoffset() == datetime.timedelta(0)
            appended = await store.append(make_events(2))
            empty = await store.append([])
            assert list(empty.seqs) == []
            assert empty.after == appended.seqs[-1]
            assert await store.head() == appended.seqs[-1]
            assert len(await store.read(0, 10)) == 2

    async def test_cancelled_append_commits_all_or_nothing(self) -> None:
        """An append cancelled at any point committed its whole batch or none of it."""
        async with self.open_store() as store:
            for delay in range(8):
                batch = make_events(300)
                head_before = await store.head()
                returned: Appended | None = None
                with trio.CancelScope() as scope:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(cancel_after_checkpoints, scope, delay)
                        returned = await store.append(batch)
                ids = [event.id for event in await read_all(store, after=head_before)]
                assert ids in ([], [new.id for new in batch]), f"cancelled after {delay}"
                if returned is not None:
                    assert ids == [new.id for new in batch]

    async def test_committed_batches_become_visible_whole(self) -> None:
        """Readers see a batch entirely or not at all, while appends are in flight."""
        async with self.open_store() as store, self.open_peer(store) as peer:
            batch_ends = {0}
            observed: list[int] = []
            writing = True

            async def write() -> None:
                nonlocal writing
                for _ in range(20):
                    appended = await peer.append(make_events(25))
                    batch_ends.add(appended.seqs[-1])
                writing = False

            with trio.fail_after(self.patience):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(write)
                    while writing:
                        observed.append(await store.head())
                        events = await store.read(0, 10_000)
                        observed.append(events[-1].seq if events else 0)
                        await trio.lowlevel.checkpoint()
            assert set(observed) <= batch_ends

    # -- cursors ----------------------------------------------------------------

    async def test_commit_cursors_inserts_and_moves_forward(self) -> None:
        """Cursors are inserted, moved forward, and kept when not named."""
        async with self.open_store() as store:
            assert await store.load_cursors() == {}
            await store.commit_cursors({"a": 1})
            assert await store.load_cursors() == {"a": 1}
            await store.commit_cursors({"a": 5, "b": 2, "consumer-ü/1": 0})
            assert await store.load_cursors() == {"a": 5, "b": 2, "consumer-ü/1": 0}
            await store.commit_cursors({"c": 3})
            assert await store.load_cursors() == {"a": 5, "b": 2, "consumer-ü/1": 0, "c": 3}
            await store.commit_cursors({})
            await store.commit_cursors({"a": 6, "c": 3})
            assert await store.load_cursors() == {"a": 6, "b": 2, "consumer-ü/1": 0, "c": 3}

    async def test_a_stored_cursor_never_moves_backwards(self) -> None:
        """A commit below the stored cursor is ignored, in a batch or alone, from any handle."""
        async with self.open_store() as store, self.open_peer(store) as peer:
            await store.commit_cursors({"a": 110, "b": 5})
            await store.commit_cursors({"a": 90, "b": 6})
            assert await store.load_cursors() == {"a": 110, "b": 6}
            await peer.commit_cursors({"a": 79})
            assert await store.load_cursors() == {"a": 110, "b": 6}
            assert await peer.load_cursors() == {"a": 110, "b": 6}
            await peer.commit_cursors({"a": 0, "b": 0})
            await store.commit_cursors({"a": 111})
            assert await peer.load_cursors() == {"a": 111, "b": 6}

    async def test_load_cursors_returns_a_copy(self) -> None:
        """Changing the returned dict does not change the store."""
        async with self.open_store() as store:
            await store.commit_cursors({"a": 1})
            cursors = await store.load_cursors()
            cursors["a"] = 99
            cursors["b"] = 1
            assert await store.load_cursors() == {"a": 1}

    async def test_cursors_are_shared_with_a_peer(self) -> None:
        """A cursor committed through one handle is loaded through another."""
        async with self.open_store() as store, self.open_peer(store) as peer:
            await store.commit_cursors({"a": 7})
            assert await peer.load_cursors() == {"a": 7}
            await peer.commit_cursors({"a": 8, "b": 1})
            assert await store.load_cursors() == {"a": 8, "b": 1}

    async def test_everything_survives_reopening(self) -> None:
        """Events and cursors are still there after every handle closed."""
        async with self.open_store() as store:
            first = await store.append(make_events(3))
            await store.commit_cursors({"a": first.seqs[1], "b": first.seqs[2]})
            expected = list(await store.read(0, 10))
        async with self.open_peer(store) as again:
            assert await again.load_cursors() == {"a": first.seqs[1], "b": first.seqs[2]}
            assert list(await again.read(0, 10)) == expected
            assert await again.head() == first.seqs[-1]
            second = await again.append(make_events(1))
            assert second.after == first.seqs[-1]
            assert second.seqs[0] > first.seqs[-1]

    # -- dead letters -------------------------------------------------------------

    async def test_dead_letters_read_back_exactly(self) -> None:
        """Every field of a dead letter survives the store: unicode, long texts, microseconds."""
        long_traceback = ("Traceback ü 🎉 \\ \" '\n\t" * MAX_TRACEBACK_LENGTH)[
            :MAX_TRACEBACK_LENGTH
        ]
        letters = [
            make_letter("a", 1),
            make_letter(
                "consumer-ü/1 🎉",
                2,
                type="order.créé",
                attempts=2**31 - 1,
                reason="not-retried",
                error_type="app.errors.Fehlerhaft_ß",
                message="日本語 ✓ 🎉 \\ \" '\n\t" * 100,
                traceback=long_traceback,
                # Before 1970, and on either side of a second: rounding shows.
                first_failed_at=datetime.datetime(
                    1969, 12, 31, 23, 59, 59, 999999, tzinfo=datetime.UTC
                ),
                last_failed_at=datetime.datetime(2100, 2, 3, 4, 5, 6, 1, tzinfo=datetime.UTC),
            ),
            make_letter(
                "b",
                2**53 + 1,
                type="x" * 255,
                attempts=0,
                reason="rejected",
                error_type="",
                message="m" * MAX_MESSAGE_LENGTH,
                traceback="",
            ),
            # Kept as given, a time to hand it back included.
            make_letter("b", 7, due_at=_FAILED_AT + datetime.timedelta(days=3650, microseconds=7)),
        ]
        async with self.open_store() as store:
            for letter in letters:
                await store.record_dead_letter(letter, cursor=None)
            got = await store.dead_letters()
            assert got == sorted(letters, key=lambda letter: (letter.consumer, letter.seq))
            assert await store.dead_letters(None) == got
            for letter in got:
                for moment in (letter.first_failed_at, letter.last_failed_at, letter.due_at):
                    assert moment is None or moment.utcoffset() == datetime.timedelta(0)
            assert {letter.reason for letter in got} == set(_REASONS)

    async def test_dead_letters_are_listed_by_consumer_then_seq(self) -> None:
        """All letters by consumer name (in code-point order), then seq; or one consumer's."""
        # Orders a locale collation would give otherwise ("a" before "B"), and
        # seqs a text sort would misplace (100 before 2).
        names = ["b", "B", "a", "é", "f", "a b", "ab", "Z", "🎉", "a\u0301"]
        keys = [(name, seq) for name in names for seq in (3, 1, 100, 2, 20)]
        random.Random(7).shuffle(keys)
        async with self.open_store() as store:
            for name, seq in keys:
                await store.record_dead_letter(make_letter(name, seq), cursor=None)
            assert [(got.consumer, got.seq) for got in await store.dead_letters()] == sorted(keys)
            for name in names:
                assert [(got.consumer, got.seq) for got in await store.dead_letters(name)] == [
                    (name, seq) for seq in (1, 2, 3, 20, 100)
                ]
            assert await store.dead_letters("nobody") == []
            assert await store.dead_letters("") == []

    async def test_dead_letter_counts_agree_with_the_letters(self) -> None:
        """Per consumer, as many as it has letters, as they are recorded, requeued,
        recorded again and discarded; consumers with none are left out."""
        names = ["b", "B", "a", "é", "a b", "🎉"]
        async with self.open_store() as store:
            assert await store.dead_letter_counts() == {}
            rng = random.Random(11)
            for step in range(60):
                name = rng.choice(names)
                seq = rng.randint(1, 12)
                action = rng.random()
                if action < 0.6:
                    await store.record_dead_letter(make_letter(name, seq), cursor=None)
                elif action < 0.8:
                    await store.requeue_dead_letters(name, [seq])
                else:
                    await store.discard_dead_letters(name, [seq])
                expected: dict[str, int] = {}
                for letter in await store.dead_letters():
                    expected[letter.consumer] = expected.get(letter.consumer, 0) + 1
                counts = await store.dead_letter_counts()
                assert counts == expected, f"after step {step}"
                # The default, for stores that do not count in their database.
                assert await Store.dead_letter_counts(store) == expected
            assert sum(counts.values()) > 0

    async def test_dead_letter_recorded_again_replaces_the_first(self) -> None:
        """One letter per consumer and seq: the last recorded, parked unless it says otherwise."""
        first = make_letter("a", 5)
        async with self.open_store() as store:
            await store.record_dead_letter(first, cursor=5)
            other = make_letter("b", 5)
            await store.record_dead_letter(other, cursor=5)
            assert await store.requeue_dead_letters("a", [5]) == [5]
            # Handed back, it failed again: its new round is recorded, parked.
            again = make_letter(
                "a",
                5,
                event_id=first.event_id,
                attempts=1,
                reason="rejected",
                message="again",
                first_failed_at=_FAILED_AT + _HOUR,
                last_failed_at=_FAILED_AT + _HOUR,
            )
            await store.record_dead_letter(again, cursor=None)
            assert await store.dead_letters() == [again, other]
            assert await store.due_dead_letters("a") == []
            # The same letter and cursor once more (a retried call) change nothing.
            await store.record_dead_letter(again, cursor=5)
            assert await store.dead_letters() == [again, other]
            assert await store.load_cursors() == {"a": 5, "b": 5}

    async def test_dead_letter_moves_its_consumers_cursor_forward_never_back(self) -> None:
        """``cursor`` moves the consumer's cursor forward only; None leaves it alone."""
        async with self.open_store() as store:
            await store.commit_cursors({"other": 4})
            await store.record_dead_letter(make_letter("a", 3), cursor=None)
            assert await store.load_cursors() == {"other": 4}
            await store.record_dead_letter(make_letter("a", 5), cursor=5)
            assert await store.load_cursors() == {"other": 4, "a": 5}
            # Past the letter: the consumer skipped events not of its types.
            await store.record_dead_letter(make_letter("a", 9), cursor=12)
            assert await store.load_cursors() == {"other": 4, "a": 12}
            await store.record_dead_letter(make_letter("a", 7), cursor=7)
            assert await store.load_cursors() == {"other": 4, "a": 12}
            await store.record_dead_letter(make_letter("a", 13), cursor=None)
            assert await store.load_cursors() == {"other": 4, "a": 12}
            await store.commit_cursors({"a": 10})
            assert await store.load_cursors() == {"other": 4, "a": 12}
            await store.record_dead_letter(make_letter("other", 2), cursor=2)
            assert await store.load_cursors() == {"other": 4, "a": 12}
            assert [got.seq for got in await store.dead_letters("a")] == [3, 5, 7, 9, 13]

    async def test_a_cancelled_dead_letter_records_its_cursor_too_or_nothing(self) -> None:
        """Cancelled at any of its checkpoints, ``record_dead_letter`` kept both, or neither."""
        async with self.open_store() as store:
            # Cancelled after 0, 1, 2... steps of the calling task, until one
            # call runs to its end: every point where it yields is tried.
            for steps in itertools.count():
                assert steps < 10_000, "record_dead_letter never returned"
                letter = make_letter("a", steps + 1)
                returned = False
                with trio.CancelScope() as scope, cancelled_after_steps(scope, steps):
                    await store.record_dead_letter(letter, cursor=letter.seq)
                    returned = True
                kept = letter in await store.dead_letters("a")
                moved = (await store.load_cursors()).get("a", 0) >= letter.seq
                assert kept == moved, f"cancelled after {steps}: letter {kept}, cursor {moved}"
                assert kept or not returned, f"returned after {steps} steps without the letter"
                if returned:
                    break

    async def test_a_peer_never_sees_a_dead_letters_cursor_without_the_letter(self) -> None:
        """While letters are recorded, a peer sees no cursor past a letter it cannot see."""
        # Many letters: how the two tasks' steps interleave is up to the scheduler
        # (trio shuffles), and a store that writes the two apart must be caught.
        total = 200
        async with self.open_store() as store, self.open_peer(store) as peer:
            recording = True

            async def record() -> None:
                nonlocal recording
                for seq in range(1, total + 1):
                    await store.record_dead_letter(make_letter("a", seq), cursor=seq)
                recording = False

            with trio.fail_after(self.patience):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(record)
                    while True:
                        # Noted first, so that the last look comes after the last letter.
                        last_look = not recording
                        # The cursor first: every letter up to it must be there after.
                        cursor = (await peer.load_cursors()).get("a", 0)
                        letters = {letter.seq for letter in await peer.dead_letters("a")}
                        missing = sorted(set(range(1, cursor + 1)) - letters)
                        assert not missing, f"cursor at {cursor}, letters {missing} not there"
                        if last_look:
                            break
                        await trio.lowlevel.checkpoint()
            assert (cursor, letters) == (total, set(range(1, total + 1)))

    async def test_requeue_dead_letters_returns_the_consumers_letters_it_found(self) -> None:
        """The seqs that are letters of that consumer, ascending and once; the rest ignored."""
        async with self.open_store() as store:
            letters = [make_letter("a", seq) for seq in (2, 4, 6, 8)]
            others = [make_letter("b", seq) for seq in (3, 4)]
            for letter in [*letters, *others]:
                await store.record_dead_letter(letter, cursor=None)
            found = await store.requeue_dead_letters("a", [8, 3, 4, 4, 100, -1, 0, 2, 8])
            assert found == [2, 4, 8]
            got = await store.dead_letters("a")
            assert [attrs.evolve(letter, due_at=None) for letter in got] == letters
            assert [letter.due_at is not None for letter in got] == [True, True, False, True]
            # Another consumer's letter of the same seq stays parked.
            assert await store.dead_letters("b") == others
            assert await store.requeue_dead_letters("a", []) == []
            assert await store.requeue_dead_letters("nobody", [2, 4]) == []
            assert await store.requeue_dead_letters("b", (4, 3)) == [3, 4]

    async def test_requeue_dead_letters_sets_due_at_by_the_store_clock(self) -> None:
        """``due_at`` is the store's time plus ``after``, aware UTC; requeuing again resets it."""
        async with self.open_store() as store:
            for seq in (1, 2):
                await store.record_dead_letter(make_letter("a", seq), cursor=seq)

            async def requeue(seq: int, after: float) -> datetime.datetime:
                before = datetime.datetime.now(datetime.UTC)
                assert await store.requeue_dead_letters("a", [seq], after=after) == [seq]
                until = datetime.datetime.now(datetime.UTC)
                (letter,) = [got for got in await store.dead_letters("a") if got.seq == seq]
                assert letter.due_at is not None
                assert letter.due_at.utcoffset() == datetime.timedelta(0)
                later = datetime.timedelta(seconds=after)
                assert before + later - _CLOCK_SLACK <= letter.due_at, (after, letter.due_at)
                assert letter.due_at <= until + later + _CLOCK_SLACK, (after, letter.due_at)
                return letter.due_at

            now = await requeue(1, 0.0)
            in_an_hour = await requeue(2, 3600.0)
            assert in_an_hour - now > _HOUR - _CLOCK_SLACK
            assert [letter.seq for letter in await store.due_dead_letters("a")] == [1]
            # Again: the new time replaces the old, earlier or later.
            await requeue(2, 0.0)
            await requeue(1, 3600.0)
            assert [letter.seq for letter in await store.due_dead_letters("a")] == [2]
            await requeue(2, 1.5)
            await requeue(1, 0)

    async def test_due_dead_letters_are_the_requeued_ones_whose_time_has_come(self) -> None:
        """Requeued letters due now, by seq: never parked ones, nor those due later."""
        async with self.open_store() as store:
            for seq in range(1, 7):
                await store.record_dead_letter(make_letter("a", seq), cursor=seq)
            await store.record_dead_letter(make_letter("b", 2), cursor=2)
            assert await store.due_dead_letters("a") == []
            await store.requeue_dead_letters("a", [5, 2], after=0)
            await store.requeue_dead_letters("a", [4], after=3600)
            await store.requeue_dead_letters("b", [2])
            everything = {(got.consumer, got.seq): got for got in await store.dead_letters()}
            due = await store.due_dead_letters("a")
            assert due == [everything["a", 2], everything["a", 5]]
            # Reading them changes nothing.
            assert await store.due_dead_letters("a") == due
            assert await store.due_dead_letters("b") == [everything["b", 2]]
            assert await store.due_dead_letters("nobody") == []
            assert await store.discard_dead_letters("a", [2]) == [2]
            assert await store.due_dead_letters("a") == [everything["a", 5]]
            # Recorded again, a due letter is parked again.
            await store.record_dead_letter(make_letter("a", 5), cursor=None)
            assert await store.due_dead_letters("a") == []

    async def test_earliest_due_at_of_requeued_dead_letters_is_the_least(self) -> None:
        """The least ``due_at`` of the consumer's letters that have one, come due or
        not; None while none is requeued; as its letters say, read exactly."""
        async with self.open_store() as store:
            assert await store.earliest_due_at("a") is None
            for seq in range(1, 7):
                await store.record_dead_letter(make_letter("a", seq), cursor=seq)
            await store.record_dead_letter(make_letter("b", 2), cursor=2)
            assert await store.earliest_due_at("a") is None
            await store.requeue_dead_letters("b", [2])
            assert await store.earliest_due_at("a") is None
            await store.requeue_dead_letters("a", [4], after=3600)
            await store.requeue_dead_letters("a", [2], after=60)

            async def expected(consumer: str) -> datetime.datetime | None:
                times = [got.due_at for got in await store.dead_letters(consumer)]
                return min((time for time in times if time is not None), default=None)

            due = await expected("a")
            assert due is not None
            assert await store.earliest_due_at("a") == due
            assert due.utcoffset() == datetime.timedelta(0)
            assert await store.earliest_due_at("b") == await expected("b")
            assert await store.earliest_due_at("nobody") is None
            # One come due already counts too.
            await store.requeue_dead_letters("a", [5], after=0)
            assert await store.earliest_due_at("a") == await expected("a") != due
            assert await store.discard_dead_letters("a", [5, 2]) == [2, 5]
            assert await store.earliest_due_at("a") == await expected("a")
            # Recorded again, a letter is parked again.
            await store.record_dead_letter(make_letter("a", 4), cursor=None)
            assert await store.earliest_due_at("a") is None

    async def test_discard_dead_letters_deletes_the_consumers_letters_it_found(self) -> None:
        """The seqs that existed, ascending and once; other consumers' letters stay."""
        async with self.open_store() as store:
            await store.append(make_events(5))
            for seq in (1, 2, 3, 4):
                await store.record_dead_letter(make_letter("a", seq), cursor=seq)
            others = [make_letter("b", seq) for seq in (2, 3)]
            for letter in others:
                await store.record_dead_letter(letter, cursor=3)
            await store.requeue_dead_letters("a", [1])
            assert await store.discard_dead_letters("a", [3, 9, 3, 1, -5, 0]) == [1, 3]
            assert [got.seq for got in await store.dead_letters("a")] == [2, 4]
            assert await store.dead_letters("b") == others
            assert await store.due_dead_letters("a") == []
            assert await store.discard_dead_letters("a", [1, 3]) == []
            assert await store.discard_dead_letters("a", []) == []
            assert await store.discard_dead_letters("nobody", [2]) == []
            # Cursors stay where the letters moved them.
            assert await store.load_cursors() == {"a": 4, "b": 3}
            assert await store.discard_dead_letters("b", (3, 2)) == [2, 3]
            assert [got.consumer for got in await store.dead_letters()] == ["a", "a"]

    async def test_forget_consumer_deletes_its_cursor_and_dead_letters_only(self) -> None:
        """The consumer's cursor and letters go, no one else's; it starts afresh."""
        names = ["a", "A", "ab", "a%", "_"]
        async with self.open_store() as store:
            await store.append(make_events(10))
            for number, name in enumerate(names):
                for seq in (2, 5, 8):
                    await store.record_dead_letter(make_letter(name, seq), cursor=seq + number)
            await store.requeue_dead_letters("a", [5])
            await store.requeue_dead_letters("A", [5])
            await store.commit_cursors({"b": 6})
            before = await store.dead_letters()
            await store.forget_consumer("a")
            assert await store.load_cursors() == {"A": 9, "ab": 10, "a%": 11, "_": 12, "b": 6}
            assert await store.dead_letters() == [got for got in before if got.consumer != "a"]
            assert await store.dead_letters("a") == []
            assert await store.due_dead_letters("a") == []
            assert [got.seq for got in await store.due_dead_letters("A")] == [5]
            # Nothing left to forget, or nothing ever known: no error.
            await store.forget_consumer("a")
            await store.forget_consumer("nobody")
            # The one way a cursor moves back: to none, then anywhere.
            await store.commit_cursors({"a": 1})
            assert (await store.load_cursors())["a"] == 1
            await store.forget_consumer("b")
            await store.record_dead_letter(make_letter("b", 3), cursor=3)
            assert (await store.load_cursors())["b"] == 3

    async def test_dead_letters_are_shared_with_a_peer(self) -> None:
        """What one handle records, requeues, discards or forgets, another sees."""
        async with self.open_store() as store, self.open_peer(store) as peer:
            await store.append(make_events(5))
            letters = [make_letter("a", seq) for seq in (1, 2, 3)]
            for letter in letters:
                await store.record_dead_letter(letter, cursor=letter.seq)
            assert await peer.dead_letters() == letters
            assert await peer.load_cursors() == {"a": 3}
            assert await peer.requeue_dead_letters("a", [1, 2, 4]) == [1, 2]
            assert [got.seq for got in await store.due_dead_letters("a")] == [1, 2]
            assert await store.discard_dead_letters("a", [2]) == [2]
            assert [got.seq for got in await peer.due_dead_letters("a")] == [1]
            assert [got.seq for got in await peer.dead_letters("a")] == [1, 3]
            await peer.record_dead_letter(make_letter("a", 4), cursor=4)
            assert await store.load_cursors() == {"a": 4}
            await peer.forget_consumer("a")
            assert await store.dead_letters() == []
            assert await store.load_cursors() == {}

    async def test_dead_letters_survive_reopening(self) -> None:
        """Letters, parked and requeued, and their cursors outlive every handle."""
        async with self.open_store() as store:
            appended = await store.append(make_events(6))
            seqs = list(appended.seqs)
            for seq in seqs[:4]:
                await store.record_dead_letter(make_letter("a", seq), cursor=seq)
            await store.record_dead_letter(make_letter("b", seqs[1]), cursor=seqs[5])
            await store.requeue_dead_letters("a", [seqs[0]])
            await store.requeue_dead_letters("a", [seqs[1]], after=3600)
            await store.forget_consumer("gone")
            expected = await store.dead_letters()
        async with self.open_peer(store) as again:
            assert await again.dead_letters() == expected
            assert await again.load_cursors() == {"a": seqs[3], "b": seqs[5]}
            assert await again.due_dead_letters("a") == expected[:1]
            await again.forget_consumer("b")
        async with self.open_peer(store) as third:
            assert await third.load_cursors() == {"a": seqs[3]}
            assert await third.dead_letters() == expected[:4]

    # -- leases and fenced writes ------------------------------------------------

    async def test_a_new_key_is_claimed_with_token_one_until_the_store_clock_plus_ttl(
        self,
    ) -> None:
        """The first claim of a key takes it, with token 1, expiring ``ttl`` from now."""
        async with self.open_store() as store:
            before = datetime.datetime.now(datetime.UTC)
            leases = await store.claim_leases("h1", ["b", "a", "a"], 30.0)
            after = datetime.datetime.now(datetime.UTC)
            assert [(x.key, x.holder, x.token) for x in leases] == [("a", "h1", 1), ("b", "h1", 1)]
            for lease in leases:
                assert lease.expires_at.utcoffset() == datetime.timedelta(0)
                offset = datetime.timedelta(seconds=30)
                assert before + offset - _CLOCK_SLACK <= lease.expires_at
                assert lease.expires_at <= after + offset + _CLOCK_SLACK
            assert await store.leases() == leases
            assert await store.claim_leases("h1", [], 30.0) == []

    async def test_a_renewal_keeps_the_token_and_moves_the_expiry(self) -> None:
        """The holder claiming its live lease again renews it: same token, later expiry."""
        async with self.open_store() as store:
            (first,) = await store.claim_leases("h1", ["a"], 1.0)
            (renewed,) = await store.claim_leases("h1", ["a"], 3600.0)
            assert (renewed.holder, renewed.token) == ("h1", first.token)
            assert renewed.expires_at > first.expires_at

    async def test_a_live_lease_stays_with_its_holder(self) -> None:
        """Another holder's claim of a live lease changes nothing and reports the holder."""
        async with self.open_store() as store, self.open_peer(store) as peer:
            (held,) = await store.claim_leases("h1", ["a"], 3600.0)
            got = await peer.claim_leases("h2", ["a", "b"], 3600.0)
            assert got[0] == held
            assert (got[1].key, got[1].holder, got[1].token) == ("b", "h2", 1)
            assert [(x.key, x.holder) for x in await store.leases()] == [("a", "h1"), ("b", "h2")]
            # The holder still renews it.
            (renewed,) = await store.claim_leases("h1", ["a"], 3600.0)
            assert (renewed.holder, renewed.token) == ("h1", held.token)

    async def test_a_lapsed_lease_goes_to_the_next_claimant_with_a_new_token(self) -> None:
        """Once its time is up, any claimant takes a lease, its old holder too, with a new token."""
        async with self.open_store() as store, self.open_peer(store) as peer:
            (first,) = await store.claim_leases("h1", ["a"], 0.05)
            await trio.sleep(0.3)
            assert await store.leases() == []
            (taken,) = await peer.claim_leases("h2", ["a"], 0.05)
            assert (taken.holder, taken.token) == ("h2", first.token + 1)
            await trio.sleep(0.3)
            (again,) = await peer.claim_leases("h2", ["a"], 3600.0)
            assert (again.holder, again.token) == ("h2", first.token + 2)
            # The first holder cannot take it back while it is live.
            (still,) = await store.claim_leases("h1", ["a"], 3600.0)
            assert still == again

    async def test_release_lapses_a_lease_at_once_and_keeps_its_token(self) -> None:
        """A released lease is free for the next claimant, whose token is a new one."""
        async with self.open_store() as store, self.open_peer(store) as peer:
            (held,) = await store.claim_leases("h1", ["a"], 3600.0)
            await store.claim_leases("h1", ["b"], 3600.0)
            # Only the holder's release counts; unknown keys are ignored.
            await peer.release_leases("h2", ["a", "nothing"])
            assert [x.key for x in await store.leases()] == ["a", "b"]
            await store.release_leases("h1", ["a", "nothing"])
            assert [x.key for x in await peer.leases()] == ["b"]
            (taken,) = await peer.claim_leases("h2", ["a"], 3600.0)
            assert (taken.holder, taken.token) == ("h2", held.token + 1)
            await store.release_leases("h1", [])

    async def test_forget_lapsed_leases_deletes_only_those_lapsed_long_enough(self) -> None:
        """Lapsed leases under the prefix, lapsed for at least the time given, are
        deleted (a new claim of one starts again at token 1); live ones, others'
        and keys merely alike are kept."""
        async with self.open_store() as store, self.open_peer(store) as peer:
            keys = ["g#member:a", "g#member:b", "g#member:c", "g#partitions", "h#member:a"]
            for key in keys:
                await store.claim_leases("h1", [key], 3600.0)
                await store.release_leases("h1", [key])
                await store.claim_leases("h1", [key], 3600.0)
            # Prefixes are text, not patterns: "_" and "%" match only themselves.
            await store.claim_leases("h1", ["g_#member:x", "g%#member:y"], 0.01)
            await store.release_leases("h1", ["g#member:a", "g#member:b", "g#partitions"])
            await store.release_leases("h1", ["h#member:a"])
            assert await peer.forget_lapsed_leases("g#member:", lapsed_for=3600.0) == 0
            await trio.sleep(0.3)
            assert await peer.forget_lapsed_leases("g#member:", lapsed_for=0.1) == 2
            assert await peer.forget_lapsed_leases("g#member:", lapsed_for=0.1) == 0
            assert await store.forget_lapsed_leases("g_", lapsed_for=0.0) == 1
            assert await store.forget_lapsed_leases("nothing", lapsed_for=0.0) == 0
            assert [x.key for x in await store.leases()] == ["g#member:c"]
            got = await peer.claim_leases("h2", [*keys, "g%#member:y"], 3600.0)
            assert [(x.key, x.holder, x.token) for x in got] == [
                ("g#member:a", "h2", 1),
                ("g#member:b", "h2", 1),
                ("g#member:c", "h1", 2),
                ("g#partitions", "h2", 3),
                ("g%#member:y", "h2", 2),
                ("h#member:a", "h2", 3),
            ]

    async def test_concurrent_claims_give_each_key_one_holder(self) -> None:
        """Holders racing for the same keys through their own handles: one wins each key."""
        async with (
            self.open_store() as store,
            self.open_peer(store) as p1,
            self.open_peer(store) as p2,
        ):
            handles = [store, p1, p2]
            results: dict[str, list[Any]] = {}

            async def claim(index: int) -> None:
                results[f"h{index}"] = await handles[index % 3].claim_leases(
                    f"h{index}", ["a", "b", "c"], 3600.0
                )

            with trio.fail_after(self.patience):
                async with trio.open_nursery() as nursery:
                    for index in range(6):
                        nursery.start_soon(claim, index)
            final = await store.leases()
            assert [x.key for x in final] == ["a", "b", "c"]
            for lease in final:
                assert lease.token == 1
                winners = [h for h, got in results.items() if _lease_of(got, lease.key).holder == h]
                assert winners == [lease.holder]
                # Every claimant was told who holds it.
                for got in results.values():
                    assert _lease_of(got, lease.key).holder in results

    async def test_fenced_cursor_commits_land_only_with_the_keys_token(self) -> None:
        """A fence that still holds lets its cursor land; a stale or unknown one does not."""
        async with self.open_store() as store, self.open_peer(store) as peer:
            (held,) = await store.claim_leases("h1", ["a"], 3600.0)
            assert await store.commit_cursors({"a": 5}, fences={"a": held.token}) == frozenset()
            refused = await store.commit_cursors(
                {"a": 9, "b": 3, "free": 4}, fences={"a": held.token + 1, "b": 1}
            )
            assert refused == frozenset({"a", "b"})
            assert await store.load_cursors() == {"a": 5, "free": 4}
            await store.release_leases("h1", ["a"])
            await peer.claim_leases("h2", ["a"], 3600.0)
            assert await store.commit_cursors({"a": 7}, fences={"a": held.token}) == {"a"}
            assert await peer.load_cursors() == {"a": 5, "free": 4}
            assert await peer.commit_cursors({"a": 6}, fences={"a": held.token + 1}) == set()
            assert await store.load_cursors() == {"a": 6, "free": 4}

    async def test_a_fence_holds_after_its_lease_lapsed_until_another_claim(self) -> None:
        """A write with the last token lands while nobody has claimed the lapsed lease."""
        async with self.open_store() as store, self.open_peer(store) as peer:
            (held,) = await store.claim_leases("h1", ["a"], 0.05)
            await trio.sleep(0.3)
            assert await store.commit_cursors({"a": 2}, fences={"a": held.token}) == set()
            await peer.claim_leases("h2", ["a"], 3600.0)
            assert await store.commit_cursors({"a": 3}, fences={"a": held.token}) == {"a"}
            assert await peer.load_cursors() == {"a": 2}

    async def test_a_fenced_dead_letter_with_a_stale_token_records_nothing(self) -> None:
        """A dead letter whose fence no longer holds raises LeaseLostError; nothing changes."""
        async with self.open_store() as store, self.open_peer(store) as peer:
            seqs = list((await store.append(make_events(3))).seqs)
            (held,) = await store.claim_leases("h1", ["a"], 3600.0)
            await store.record_dead_letter(
                make_letter("a", seqs[0]), cursor=seqs[0], fence=held.token
            )
            await store.release_leases("h1", ["a"])
            await peer.claim_leases("h2", ["a"], 3600.0)
            with pytest.raises(LeaseLostError) as raised:
                await store.record_dead_letter(
                    make_letter("a", seqs[1]), cursor=seqs[1], fence=held.token
                )
            assert raised.value.keys == {"a"}
            assert [x.seq for x in await peer.dead_letters()] == [seqs[0]]
            assert await peer.load_cursors() == {"a": seqs[0]}
            with pytest.raises(LeaseLostError):
                await store.record_dead_letter(make_letter("nobody", seqs[1]), cursor=1, fence=1)
            assert await peer.load_cursors() == {"a": seqs[0]}

    async def test_no_fenced_write_lands_after_a_claim_that_took_its_key(self) -> None:
        """A claimant that took a key over loads every cursor its old holder got to write.

        Old holder's fenced commits race the new claim through separate
        handles; whenever a commit was accepted, the claimant's load after its
        claim shows it (the check and the write are one with the claim's order).
        """
        async with self.open_store() as store, self.open_peer(store) as peer:
            token = (await store.claim_leases("old", ["a"], 0.001))[0].token
            for round_ in range(1, 31):
                accepted: list[bool] = []
                loaded: list[int] = []

                async def commit(seq: int, fence: int, accepted: list[bool]) -> None:
                    refused = await store.commit_cursors({"a": seq}, fences={"a": fence})
                    accepted.append("a" not in refused)

                async def take_over(loaded: list[int]) -> None:
                    await trio.sleep(0.002)
                    (lease,) = await peer.claim_leases("new", ["a"], 0.001)
                    if lease.holder == "new":
                        loaded.append((await peer.load_cursors()).get("a", 0))

                with trio.fail_after(self.patience):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(commit, round_, token, accepted)
                        nursery.start_soon(take_over, loaded)
                if accepted[0] and loaded:
                    assert loaded[0] == round_, f"round {round_}: a fenced write landed late"
                with trio.fail_after(self.patience):
                    while True:
                        await trio.sleep(0.002)
                        (lease,) = await store.claim_leases("old", ["a"], 0.001)
                        if lease.holder == "old":
                            token = lease.token
                            break

    async def test_leases_are_shared_with_a_peer_and_survive_reopening(self) -> None:
        """A peer sees every lease; tokens never repeat after the store is reopened."""
        async with self.open_store() as store:
            (held,) = await store.claim_leases("h1", ["a"], 3600.0)
            await store.release_leases("h1", ["a"])
            (again,) = await store.claim_leases("h1", ["a"], 3600.0)
            assert again.token == held.token + 1
            listed = await store.leases()
        if not self.persistent:
            return
        async with self.open_peer(store) as peer:
            assert await peer.leases() == listed
            await peer.release_leases("h1", ["a"])
            (third,) = await peer.claim_leases("h2", ["a"], 3600.0)
            assert third.token == held.token + 2

    # -- transactions ------------------------------------------------------------

    async def test_a_store_without_transactions_refuses_them(self) -> None:
        """A store that runs no transactions says so with a ConfigurationError."""
        async with self.open_store() as store:
            with pytest.raises(ConfigurationError, match="cannot run transactions"):
                async with store.transaction():
                    pass  # pragma: no cover

    async def test_a_transaction_commits_rows_cursors_and_events_together(self) -> None:
        """Rows, a cursor move and appended events of one transaction land together."""
        async with self.open_store() as store, self.open_peer(store) as peer:
            before = await store.append(make_events(1))
            async with store.transaction() as tx:
                await _create_table(tx)
                await tx.execute(
                    _sql(tx, "INSERT INTO contract_rows (id, v) VALUES (?, ?)"), 1, "a"
                )
                assert await tx.commit_cursors({"c": before.seqs[0]}) == frozenset()
                appended = await tx.append(make_events(2))
                assert appended.after == before.seqs[0]
                assert appended.seqs[0] > before.seqs[0]
                # Not visible to others before the commit.
                assert await peer.head() == before.seqs[0]
                assert "c" not in await peer.load_cursors()
            assert await peer.load_cursors() == {"c": before.seqs[0]}
            assert [e.seq for e in await read_all(peer)] == [before.seqs[0], *appended.seqs]
            assert await peer.head() == appended.seqs[-1]
            async with peer.transaction() as tx:
                assert await tx.fetch(_sql(tx, "SELECT id, v FROM contract_rows")) == [
                    {"id": 1, "v": "a"}
                ]

    async def test_an_exception_rolls_everything_back(self) -> None:
        """Leaving the block by an exception leaves no row, cursor or event, and no hole
        that holds up a reader: the next append reads back at once."""
        async with self.open_store() as store, self.open_peer(store) as peer:
            async with store.transaction() as tx:
                await _create_table(tx)
            with pytest.raises(RuntimeError, match="boom"):
                async with store.transaction() as tx:
                    await tx.execute(
                        _sql(tx, "INSERT INTO contract_rows (id, v) VALUES (?, ?)"), 1, "a"
                    )
                    await tx.commit_cursors({"c": 5})
                    await tx.append(make_events(3))
                    raise RuntimeError("boom")
            assert await peer.head() == 0
            assert await peer.load_cursors() == {}
            later = await peer.append(make_events(1))
            with trio.fail_after(self.patience):
                assert [e.seq for e in await read_all(store)] == list(later.seqs)
            async with store.transaction() as tx:
                assert await tx.fetchval(_sql(tx, "SELECT count(*) FROM contract_rows")) == 0

    async def test_a_cancelled_transaction_rolls_back(self) -> None:
        """Cancelling the block, even during a statement, commits nothing."""
        async with self.open_store() as store:
            async with store.transaction() as tx:
                await _create_table(tx)
            with trio.CancelScope() as scope:
                async with store.transaction() as tx:
                    await tx.execute(
                        _sql(tx, "INSERT INTO contract_rows (id, v) VALUES (?, ?)"), 1, "a"
                    )
                    await tx.append(make_events(1))
                    scope.cancel()
                    await tx.fetchval(_sql(tx, "SELECT count(*) FROM contract_rows"))
            assert scope.cancelled_caught
            assert await store.head() == 0
            async with store.transaction() as tx:
                assert await tx.fetchval(_sql(tx, "SELECT count(*) FROM contract_rows")) == 0

    async def test_queries_return_plain_rows_and_values(self) -> None:
        """fetch gives dicts, fetchrow one or None, fetchval a value or None."""
        async with self.open_store() as store, store.transaction() as tx:
            await _create_table(tx)
            await tx.executemany(
                _sql(tx, "INSERT INTO contract_rows (id, v) VALUES (?, ?)"),
                [(1, "a"), (2, "ü 🎉"), (3, None)],
            )
            query = _sql(tx, "SELECT id, v FROM contract_rows WHERE id >= ? ORDER BY id")
            assert await tx.fetch(query, 2) == [{"id": 2, "v": "ü 🎉"}, {"id": 3, "v": None}]
            assert await tx.fetchrow(query, 1) == {"id": 1, "v": "a"}
            assert await tx.fetchrow(query, 9) is None
            assert await tx.fetchval(query, 2) == 2
            assert await tx.fetchval(query, 9) is None
            assert await tx.fetch(query, 9) == []

    async def test_a_refused_statement_is_a_query_error_naming_it(self) -> None:
        """Bad SQL raises QueryError with the statement; the transaction rolls back whole."""
        async with self.open_store() as store:
            async with store.transaction() as tx:
                await _create_table(tx)
            with pytest.raises(QueryError) as raised:
                async with store.transaction() as tx:
                    await tx.execute(
                        _sql(tx, "INSERT INTO contract_rows (id, v) VALUES (?, ?)"), 1, "a"
                    )
                    await tx.append(make_events(1))
                    await tx.execute("SELEKT nonsense FROM contract_rows")
            assert "SELEKT nonsense" in str(raised.value)
            assert raised.value.query == "SELEKT nonsense FROM contract_rows"
            assert await store.head() == 0
            with pytest.raises(QueryError):
                async with store.transaction() as tx:
                    await tx.execute(
                        _sql(tx, "INSERT INTO contract_rows (id, v) VALUES (?, ?)"), 1, "a"
                    )
                    await tx.execute(
                        _sql(tx, "INSERT INTO contract_rows (id, v) VALUES (?, ?)"), 1, "b"
                    )
            async with store.transaction() as tx:
                assert await tx.fetchval(_sql(tx, "SELECT count(*) FROM contract_rows")) == 0

    async def test_fenced_cursor_commits_in_a_transaction(self) -> None:
        """A stale fence is refused in a transaction as outside one."""
        async with self.open_store() as store, self.open_peer(store) as peer:
            (held,) = await store.claim_leases("h1", ["a"], 3600.0)
            async with store.transaction() as tx:
                assert await tx.commit_cursors({"a": 3}, fences={"a": held.token}) == set()
            await store.release_leases("h1", ["a"])
            await peer.claim_leases("h2", ["a"], 3600.0)
            async with store.transaction() as tx:
                assert await tx.commit_cursors({"a": 4}, fences={"a": held.token}) == {"a"}
            assert await peer.load_cursors() == {"a": 3}

    async def test_dead_letters_discarded_in_a_transaction_go_with_it(self) -> None:
        """A letter discarded in a transaction stays if it rolls back, goes if it commits."""
        async with self.open_store() as store:
            seqs = list((await store.append(make_events(2))).seqs)
            for seq in seqs:
                await store.record_dead_letter(make_letter("a", seq), cursor=seq)
            with pytest.raises(RuntimeError):
                async with store.transaction() as tx:
                    assert await tx.discard_dead_letters("a", [seqs[0], 999]) == [seqs[0]]
                    raise RuntimeError("roll back")
            assert [x.seq for x in await store.dead_letters("a")] == seqs
            async with store.transaction() as tx:
                assert await tx.discard_dead_letters("a", [seqs[1]]) == [seqs[1]]
                assert await tx.discard_dead_letters("a", []) == []
            assert [x.seq for x in await store.dead_letters("a")] == seqs[:1]

    async def test_an_append_outside_waits_for_a_transaction_that_appended(self) -> None:
        """Readers never see a later event before an earlier one: an append through
        another handle after a transaction's append lands after it, however long the
        transaction stays open."""
        async with self.open_store() as store, self.open_peer(store) as peer:
            outside: list[Appended] = []

            async def append_outside() -> None:
                outside.append(await peer.append(make_events(1, "outside")))

            with trio.fail_after(self.patience):
                async with trio.open_nursery() as nursery, store.transaction() as tx:
                    inside = await tx.append(make_events(2, "inside"))
                    nursery.start_soon(append_outside)
                    await trio.sleep(0.3)
                    # Still uncommitted: nothing of it, nor after it, is readable.
                    assert await peer.read(0, 10) == []
            events = await read_all(peer)
            assert [e.type for e in events] == ["inside", "inside", "outside"]
            assert [e.seq for e in events][:2] == list(inside.seqs)
            assert outside[0].seqs[0] > inside.seqs[-1]

    async def test_a_transaction_leaves_the_store_usable_when_a_statement_hangs(self) -> None:
        """A transaction cancelled while a statement waits (here, for another
        transaction's lock) rolls back, and the store keeps working."""
        async with self.open_store() as store, self.open_peer(store) as peer:
            async with store.transaction() as tx:
                await _create_table(tx)
            with trio.fail_after(self.patience):
                async with peer.transaction() as holder:
                    await holder.append(make_events(1))
                    with trio.move_on_after(0.5):
                        async with store.transaction() as tx:
                            await tx.append(make_events(1))
            await store.append(make_events(1))
            assert len(await read_all(store)) == 2

    @settings(
        max_examples=30,
        deadline=None,
        # The same test runs once per backend subclass, on purpose.
        suppress_health_check=[HealthCheck.differing_executors],
    )
    @given(steps=st.lists(_steps, max_size=25))
    async def test_random_dead_letter_operations_match_a_model(self, steps: list[_Step]) -> None:
        """Records, requeues, discards, forgets and commits in any order, checked after each."""
        letters: dict[tuple[str, int], DeadLetter] = {}
        #: Per letter: "parked", "due" (requeued, due now) or "later" (in an hour).
        state: dict[tuple[str, int], str] = {}
        cursors: dict[str, int] = {}

        def forward(consumer: str, seq: int | None) -> None:
            if seq is not None and seq > cursors.get(consumer, -1):
                cursors[consumer] = seq

        def found(consumer: str, seqs: list[int]) -> list[int]:
            return sorted({seq for seq in seqs if (consumer, seq) in letters})

        async with self.open_store() as store:
            for number, step in enumerate(steps):
                match step:
                    case _Record(letter=letter, cursor=cursor):
                        await store.record_dead_letter(letter, cursor=cursor)
                        key = (letter.consumer, letter.seq)
                        letters[key], state[key] = letter, "parked"
                        forward(letter.consumer, cursor)
                    case _Requeue(consumer=consumer, seqs=seqs, after=after):
                        expected = found(consumer, seqs)
                        got = await store.requeue_dead_letters(consumer, seqs, after=after)
                        assert got == expected, f"step {number}"
                        for seq in expected:
                            state[consumer, seq] = "due" if after == 0 else "later"
                    case _Discard(consumer=consumer, seqs=seqs):
                        expected = found(consumer, seqs)
                        got = await store.discard_dead_letters(consumer, seqs)
                        assert got == expected, f"step {number}"
                        for seq in expected:
                            del letters[consumer, seq], state[consumer, seq]
                    case _Forget(consumer=consumer):
                        await store.forget_consumer(consumer)
                        cursors.pop(consumer, None)
                        for key in [key for key in letters if key[0] == consumer]:
                            del letters[key], state[key]
                    case _Commit(consumer=consumer, seq=seq):
                        await store.commit_cursors({consumer: seq})
                        forward(consumer, seq)
                where = f"after step {number}"
                everything = await store.dead_letters()
                by_key = {(got.consumer, got.seq): got for got in everything}
                assert [attrs.evolve(got, due_at=None) for got in everything] == [
                    letters[key] for key in sorted(letters)
                ], where
                assert {key: got.due_at is None for key, got in by_key.items()} == {
                    key: kind == "parked" for key, kind in state.items()
                }, where
                assert await store.load_cursors() == cursors, where
                for consumer in _DEAD_LETTER_CONSUMERS:
                    mine = [key for key in sorted(letters) if key[0] == consumer]
                    assert await store.dead_letters(consumer) == [by_key[key] for key in mine]
                    assert await store.due_dead_letters(consumer) == [
                        by_key[key] for key in mine if state[key] == "due"
                    ], where

    # -- retention: cursors, bounds, pruning ----------------------------------------

    async def test_log_bounds_of_an_empty_and_a_growing_log(self) -> None:
        """A new log has nothing stored (first = head + 1); appends move the head only."""
        async with self.open_store() as store:
            assert await store.log_bounds() == LogBounds(first=1, head=0, pruned_through=0)
            first = await store.append(make_events(3))
            last = await store.append(make_events(2))
            assert await store.log_bounds() == LogBounds(
                first=first.seqs[0], head=last.seqs[-1], pruned_through=0
            )

    async def test_cursors_lists_every_cursor_by_code_point_with_its_time(self) -> None:
        """`cursors` gives each stored cursor, in code-point order, with an aware UTC time."""
        async with self.open_store() as store, self.open_peer(store) as peer:
            assert await store.cursors() == []
            before = datetime.datetime.now(datetime.UTC)
            await store.commit_cursors({"b": 2, "é": 3, "a": 1, "Z": 0, "a-1": 4})
            await store.record_dead_letter(make_letter("ü 🎉", 1), cursor=5)
            listed = await peer.cursors()
            assert [(info.consumer, info.seq) for info in listed] == [
                ("Z", 0),
                ("a", 1),
                ("a-1", 4),
                ("b", 2),
                ("é", 3),
                ("ü 🎉", 5),
            ]
            for info in listed:
                if info.updated_at is not None:
                    assert info.updated_at.utcoffset() == datetime.timedelta(0)
                    assert abs(info.updated_at - before) < _CLOCK_SLACK
            await store.forget_consumer("b")
            assert [info.consumer for info in await store.cursors()] == [
                "Z",
                "a",
                "a-1",
                "é",
                "ü 🎉",
            ]

    async def test_set_cursor_moves_a_cursor_either_way_and_returns_the_previous(self) -> None:
        """A reset sets the cursor where it is told, backwards too, for every handle."""
        async with self.open_store() as store, self.open_peer(store) as peer:
            seqs = list((await store.append(make_events(10))).seqs)
            assert await store.set_cursor("a", seqs[4]) is None
            assert await peer.load_cursors() == {"a": seqs[4]}
            await store.commit_cursors({"a": seqs[7]})
            assert await peer.set_cursor("a", seqs[1]) == seqs[7]
            assert await store.load_cursors() == {"a": seqs[1]}
            # Then commits move it forward from there, never back.
            await store.commit_cursors({"a": 0})
            assert await store.load_cursors() == {"a": seqs[1]}
            await store.commit_cursors({"a": seqs[2]})
            assert await store.set_cursor("a", 0) == seqs[2]
            assert await store.set_cursor("a", seqs[-1]) == 0
            assert [(info.consumer, info.seq) for info in await peer.cursors()] == [("a", seqs[-1])]

    async def test_set_cursor_refuses_a_position_outside_the_log(self) -> None:
        """Below 0, past the head or behind the pruned log: refused, nothing changed."""
        async with self.open_store() as store:
            seqs = list((await store.append(make_events(6))).seqs)
            await store.commit_cursors({"a": seqs[3]})
            for wrong in (-1, seqs[-1] + 1):
                with pytest.raises(ConsumerStateError, match="'a'"):
                    await store.set_cursor("a", wrong)
            with pytest.raises(ConsumerStateError, match="'new'"):
                await store.set_cursor("new", seqs[-1] + 1)
            assert await store.prune(seqs[2], limit=10) == 3
            with pytest.raises(PrunedLogError, match=r"'a'.*pruned") as refused:
                await store.set_cursor("a", seqs[1])
            assert refused.value.consumers == {"a": seqs[1]}
            assert await store.load_cursors() == {"a": seqs[3]}
            assert await store.set_cursor("a", seqs[2]) == seqs[3]
            assert await store.load_cursors() == {"a": seqs[2]}

    async def test_prune_deletes_the_oldest_events_up_to_through_in_batches(self) -> None:
        """Each call deletes at most ``limit``, oldest first, never past ``through``."""
        async with self.open_store() as store:
            seqs = list((await store.append(make_events(10))).seqs)
            events = await read_all(store)
            assert await store.prune(seqs[5], limit=4) == 4
            assert await read_all(store) == events[4:]
            assert await store.log_bounds() == LogBounds(
                first=seqs[4], head=seqs[-1], pruned_through=seqs[3]
            )
            assert await store.prune(seqs[5], limit=4) == 2
            assert await store.prune(seqs[5], limit=4) == 0
            assert await read_all(store) == events[6:]
            assert list(await store.read(seqs[5], 2)) == events[6:8]
            assert await store.log_bounds() == LogBounds(
                first=seqs[6], head=seqs[-1], pruned_through=seqs[5]
            )
            # A bound below what is gone changes nothing.
            assert await store.prune(seqs[2], limit=4) == 0
            with pytest.raises(ValueError, match="limit"):
                await store.prune(seqs[-1], limit=0)
            assert await read_all(store) == events[6:]

    async def test_prune_keeps_every_event_a_cursor_needs(self) -> None:
        """No event above a stored cursor goes; a forgotten consumer holds nothing back."""
        async with self.open_store() as store, self.open_peer(store) as peer:
            seqs = list((await store.append(make_events(10))).seqs)
            events = await read_all(store)
            await store.commit_cursors({"slow": seqs[2], "fast": seqs[8]})
            assert await peer.prune(seqs[-1], limit=100) == 3
            assert await read_all(store) == events[3:]
            assert (await store.log_bounds()).pruned_through == seqs[2]
            # A consumer at 0 (a new one, say) holds everything left.
            await store.commit_cursors({"new": 0})
            assert await store.prune(seqs[-1], limit=100) == 0
            await store.forget_consumer("new")
            await store.forget_consumer("slow")
            assert await peer.prune(seqs[-1], limit=100) == 6
            assert await read_all(store) == events[9:]
            assert (await store.log_bounds()).pruned_through == seqs[8]

    async def test_prune_keeps_every_event_a_letter_refers_to(self) -> None:
        """A letter's event stays (requeueing reads it) until the letter is gone."""
        async with self.open_store() as store:
            seqs = list((await store.append(make_events(8))).seqs)
            events = await read_all(store)
            await store.record_dead_letter(make_letter("a", seqs[1]), cursor=seqs[5])
            await store.record_dead_letter(make_letter("b", seqs[3]), cursor=seqs[6])
            assert await store.prune(seqs[-1], limit=2) == 2
            assert await read_all(store) == [events[1], events[3], *events[4:]]
            assert await store.prune(seqs[-1], limit=100) == 2
            assert await read_all(store) == [events[1], events[3], *events[6:]]
            assert await store.log_bounds() == LogBounds(
                first=seqs[1], head=seqs[-1], pruned_through=seqs[5]
            )
            assert list(await store.read(seqs[1], 1)) == [events[3]]
            assert await store.discard_dead_letters("a", [seqs[1]]) == [seqs[1]]
            await store.forget_consumer("b")
            assert await store.prune(seqs[-1], limit=100) == 2
            assert await read_all(store) == events[6:]
            assert (await store.log_bounds()).first == seqs[6]

    async def test_pruning_every_event_keeps_the_head_and_the_numbering(self) -> None:
        """With the whole log pruned, the head stays and appends go on above it."""
        async with self.open_store() as store, self.open_peer(store) as peer:
            seqs = list((await store.append(make_events(5))).seqs)
            assert await store.prune(seqs[-1], limit=100) == 5
            for handle in (store, peer):
                assert await handle.head() == seqs[-1]
                assert await handle.log_bounds() == LogBounds(
                    first=seqs[-1] + 1, head=seqs[-1], pruned_through=seqs[-1]
                )
                assert list(await handle.read(0, 10)) == []
                with trio.fail_after(self.patience):
                    assert await handle.wait_for_append(0) == seqs[-1]
            assert await store.prune(seqs[-1] + 100, limit=100) == 0
            appended = await peer.append(make_events(2))
            assert appended.after == seqs[-1]
            assert appended.seqs[0] > seqs[-1]
            assert [event.seq for event in await read_all(store)] == list(appended.seqs)
            assert (await store.log_bounds()).first == appended.seqs[0]
            empty = await store.append([])
            assert empty.after == appended.seqs[-1]

    async def test_pruning_and_resets_survive_reopening(self) -> None:
        """The pruning mark, the events left and a reset cursor are all still there."""
        async with self.open_store() as store:
            seqs = list((await store.append(make_events(6))).seqs)
            await store.commit_cursors({"a": seqs[4]})
            await store.set_cursor("a", seqs[3])
            assert await store.prune(seqs[-1], limit=100) == 4
            bounds = await store.log_bounds()
            kept = await read_all(store)
        async with self.open_peer(store) as again:
            assert await again.log_bounds() == bounds
            assert await read_all(again) == kept
            assert await again.load_cursors() == {"a": seqs[3]}
            with pytest.raises(PrunedLogError):
                await again.set_cursor("a", seqs[2])
            appended = await again.append(make_events(1))
            assert appended.after == seqs[-1]

    async def test_seq_before_finds_the_last_event_committed_before_a_time(self) -> None:
        """For any time: the highest stored seq committed before it, as the events say."""
        async with self.open_store() as store:
            assert await store.seq_before(datetime.datetime.now(datetime.UTC)) == 0
            for size in (3, 1, 4, 1, 5, 9, 2, 6):
                await store.append(make_events(size))
                await trio.lowlevel.checkpoint()
            await self._check_seq_before(store)
            await store.commit_cursors({"a": 10})
            await store.record_dead_letter(make_letter("a", 3), cursor=None)
            await store.prune(10, limit=100)
            await self._check_seq_before(store)

    async def _check_seq_before(self, store: Store) -> None:
        events = await read_all(store)
        tick = datetime.timedelta(microseconds=1)
        times = {
            event.created_at + change for event in events for change in (-tick, 0 * tick, tick)
        }
        times |= {events[0].created_at - _HOUR, events[-1].created_at + _HOUR}
        for time in sorted(times):
            expected = max((event.seq for event in events if event.created_at < time), default=0)
            assert await store.seq_before(time) == expected, time

    async def test_a_reset_racing_a_prune_never_loses_an_event_it_needs(self) -> None:
        """Resets and prunes from two handles at once: every cursor's events stay readable.

        Rounds of a reset walking a cursor back while a prune keeps chasing it,
        with gaps and batch sizes that vary: a store that let a prune slip
        between a reset's check and its write leaves the cursor behind the
        pruned log in some round.
        """
        async with self.open_store() as store, self.open_peer(store) as peer:
            for round_number in range(12):
                seqs = list((await store.append(make_events(20 + round_number))).seqs)
                events = await read_all(store, after=seqs[0] - 1)
                await store.commit_cursors({"a": seqs[-1]})
                await self._race(store, peer, seqs, limit=1 + round_number % 3)
                cursor = (await store.load_cursors())["a"]
                where = f"round {round_number}, cursor {cursor}"
                assert (await store.log_bounds()).pruned_through <= cursor, where
                assert await read_all(store, after=cursor) == [
                    event for event in events if event.seq > cursor
                ], where
                # Past this round's events: the next round starts afresh.
                await store.set_cursor("a", seqs[-1])
                await store.prune(seqs[-1], limit=1000)

    async def _race(self, store: Store, peer: Store, seqs: list[int], *, limit: int) -> None:
        """Walk consumer a's cursor back through ``seqs`` (through ``peer``) while prunes
        of ``limit`` events keep chasing it (through ``store``), until a reset is refused."""
        reset_done = trio.Event()

        async def reset() -> None:
            try:
                for seq in reversed(seqs[:-1]):
                    await peer.set_cursor("a", seq)
            except PrunedLogError:
                pass
            finally:
                reset_done.set()

        async def prune() -> None:
            while not reset_done.is_set():
                await store.prune(seqs[-1], limit=limit)

        with trio.fail_after(self.patience):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reset)
                nursery.start_soon(prune)

    @settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=[HealthCheck.differing_executors],
    )
    @given(steps=st.lists(_prune_steps, max_size=30))
    async def test_random_pruning_never_deletes_what_a_cursor_or_letter_needs(
        self, steps: list[_PruneStep]
    ) -> None:
        """Any mix of appends, cursor moves, resets, letters and prunes, checked after each."""
        appended: list[Event] = []
        cursors: dict[str, int] = {}
        letters: set[tuple[str, int]] = set()
        pruned_through = 0
        highest = 0
        async with self.open_store() as store:
            for number, step in enumerate(steps):
                where = f"after step {number} ({step})"
                match step:
                    case _Append(count=count):
                        await store.append(make_events(count))
                        appended += await read_all(store, after=highest)
                        highest = appended[-1].seq
                    case _Commit(consumer=consumer, seq=seq):
                        # Flows never write a cursor below the pruned log: a
                        # consumer starts at or after it (or stops with
                        # PrunedLogError), and prunes stop at every cursor.
                        seq = max(min(seq, highest), pruned_through)
                        await store.commit_cursors({consumer: seq})
                        cursors[consumer] = max(seq, cursors.get(consumer, -1))
                    case _Reset(consumer=consumer, seq=seq):
                        if seq < 0 or seq > highest:
                            with pytest.raises(ConsumerStateError):
                                await store.set_cursor(consumer, seq)
                        elif seq < pruned_through:
                            with pytest.raises(PrunedLogError):
                                await store.set_cursor(consumer, seq)
                        else:
                            assert await store.set_cursor(consumer, seq) == cursors.get(consumer)
                            cursors[consumer] = seq
                    case _Record(letter=letter, cursor=cursor):
                        # The runtime records letters for events it read: stored ones.
                        present = {event.seq for event in await read_all(store)}
                        if letter.seq not in present:
                            continue
                        if cursor is not None:
                            cursor = max(min(cursor, highest), pruned_through)
                        await store.record_dead_letter(letter, cursor=cursor)
                        letters.add((letter.consumer, letter.seq))
                        if cursor is not None:
                            cursors[letter.consumer] = max(cursor, cursors.get(letter.consumer, -1))
                    case _Discard(consumer=consumer, seqs=seqs):
                        await store.discard_dead_letters(consumer, seqs)
                        letters -= {(consumer, seq) for seq in seqs}
                    case _Forget(consumer=consumer):
                        await store.forget_consumer(consumer)
                        cursors.pop(consumer, None)
                        letters = {key for key in letters if key[0] != consumer}
                    case _Prune(through=through, limit=limit):
                        before = await read_all(store)
                        deleted = await store.prune(through, limit=limit)
                        after = await read_all(store)
                        gone = [event for event in before if event not in after]
                        assert len(gone) == deleted <= limit, where
                        assert after == [event for event in before if event not in gone], where
                        bound = min([through, highest, *cursors.values()])
                        needed = {seq for _, seq in letters}
                        assert all(e.seq <= bound and e.seq not in needed for e in gone), where
                        # Oldest first: nothing prunable is left below what went.
                        if gone:
                            assert all(e.seq > gone[-1].seq or e.seq in needed for e in after), (
                                where
                            )
                            pruned_through = max(pruned_through, gone[-1].seq)
                        else:
                            assert not [
                                e for e in after if e.seq <= bound and e.seq not in needed
                            ], where
                # What every consumer replays from its cursor: everything after it.
                for consumer, cursor in cursors.items():
                    assert await read_all(store, after=cursor) == [
                        event for event in appended if event.seq > cursor
                    ], (where, consumer)
                stored = {event.seq: event for event in await read_all(store)}
                for _, seq in letters:
                    assert seq in stored, (where, seq)
                assert await store.head() == highest, where
                assert await store.log_bounds() == LogBounds(
                    first=min(stored, default=highest + 1),
                    head=highest,
                    pruned_through=pruned_through,
                ), where
                assert await store.load_cursors() == cursors, where

    # -- waiting and concurrency --------------------------------------------------

    async def test_wait_for_append_returns_when_head_is_already_past(self) -> None:
        """No wait when the head is already past ``after``."""
        async with self.open_store() as store:
            appended = await store.append(make_events(2))
            with trio.fail_after(self.patience):
                # It returns the head it read, past ``after``.
                assert await store.wait_for_append(0) == appended.seqs[-1]
                assert await store.wait_for_append(appended.seqs[0]) == appended.seqs[-1]

    async def test_wait_for_append_wakes_on_a_peer_append(self) -> None:
        """A waiter learns of an append made through another handle."""
        async with self.open_store() as store, self.open_peer(store) as peer:
            await self._check_wakes(waiter=store, appender=peer)

    async def test_wait_for_append_wakes_on_an_own_append(self) -> None:
        """A waiter learns of an append made through the same handle."""
        async with self.open_store() as store:
            await self._check_wakes(waiter=store, appender=store)

    async def _check_wakes(self, *, waiter: Store, appender: Store) -> None:
        start = await waiter.append(make_events(1))
        after = start.seqs[-1]
        woke_at: list[int] = []

        async def wait() -> None:
            # The contract allows early returns: loop as callers must.
            head = after
            while head <= after:
                head = await waiter.wait_for_append(after)
            woke_at.append(head)

        with trio.fail_after(self.patience):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked()
                assert woke_at == []
                appended = await appender.append(make_events(2))
        assert woke_at == [appended.seqs[-1]]

    async def test_concurrent_appends_from_two_handles(self) -> None:
        """Two writers interleave without repeated seqs; a tailing reader misses nothing."""
        rng = random.Random(1234)
        plans = [[rng.randint(1, 8) for _ in range(15)] for _ in range(2)]
        async with self.open_store() as store, self.open_peer(store) as peer:
            results: list[list[tuple[Appended, list[NewEvent]]]] = [[], []]
            tailed: list[Event] = []
            writers_done = trio.Event()

            async def write(handle: Store, plan: list[int], out: list[Any]) -> None:
                for size in plan:
                    batch = make_events(size)
                    out.append((await handle.append(batch), batch))
                    await trio.lowlevel.checkpoint()

            async def tail() -> None:
                position = 0
                limits = random.Random(5678)
                while True:
                    events = await store.read(position, limits.randint(1, 10))
                    if events:
                        tailed.extend(events)
                        position = events[-1].seq
                        continue
                    if writers_done.is_set() and position >= await store.head():
                        return
                    # Bounded, because nothing may be appended any more.
                    with trio.move_on_after(0.01):
                        await store.wait_for_append(position)

            with trio.fail_after(self.patience):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(tail)
                    async with trio.open_nursery() as writers:
                        writers.start_soon(write, store, plans[0], results[0])
                        writers.start_soon(write, peer, plans[1], results[1])
                    writers_done.set()

            by_seq: dict[int, NewEvent] = {}
            for writer_results in results:
                writer_seqs: list[int] = []
                for appended, batch in writer_results:
                    assert len(appended.seqs) == len(batch)
                    for seq, new in zip(appended.seqs, batch, strict=True):
                        assert seq not in by_seq, f"seq {seq} given twice"
                        by_seq[seq] = new
                    writer_seqs += appended.seqs
                # A writer's own batches are numbered in the order it appended.
                assert_increasing(writer_seqs)
            total = sum(map(sum, plans))
            assert len(by_seq) == total
            log = await read_all(store)
            assert [event.seq for event in log] == sorted(by_seq)
            assert [event.id for event in log] == [by_seq[seq].id for seq in sorted(by_seq)]
            # Gap-free reads: the tailing reader saw every event, in order.
            assert tailed == log
            if self.seqs_without_holes:
                assert sorted(by_seq) == list(range(1, total + 1))

    async def test_every_method_is_a_checkpoint(self) -> None:
        """Each method yields to the scheduler and honours a pending cancellation."""
        letter = make_letter("a", 1)
        async with self.open_store() as store:
            await store.append(make_events(1))
            calls: list[tuple[str, Any]] = [
                ("head", lambda: store.head()),
                ("read", lambda: store.read(0, 10)),
                ("read(limit=0)", lambda: store.read(0, 0)),
                ("load_cursors", lambda: store.load_cursors()),
                ("commit_cursors", lambda: store.commit_cursors({"a": 1})),
                ("commit_cursors({})", lambda: store.commit_cursors({})),
                ("append", lambda: store.append(make_events(1))),
                ("append([])", lambda: store.append([])),
                ("wait_for_append", lambda: store.wait_for_append(0)),
                ("record_dead_letter", lambda: store.record_dead_letter(letter, cursor=1)),
                ("record_dead_letter(None)", lambda: store.record_dead_letter(letter, cursor=None)),
                ("dead_letters", lambda: store.dead_letters()),
                ("dead_letters(consumer)", lambda: store.dead_letters("a")),
                ("dead_letter_counts", lambda: store.dead_letter_counts()),
                ("earliest_due_at", lambda: store.earliest_due_at("a")),
                ("requeue_dead_letters", lambda: store.requeue_dead_letters("a", [1])),
                ("requeue_dead_letters([])", lambda: store.requeue_dead_letters("a", [])),
                ("due_dead_letters", lambda: store.due_dead_letters("a")),
                ("discard_dead_letters", lambda: store.discard_dead_letters("a", [1])),
                ("discard_dead_letters([])", lambda: store.discard_dead_letters("a", [])),
                ("forget_consumer", lambda: store.forget_consumer("a")),
                ("claim_leases", lambda: store.claim_leases("h", ["a"], 60.0)),
                ("claim_leases([])", lambda: store.claim_leases("h", [], 60.0)),
                ("leases", lambda: store.leases()),
                (
                    "forget_lapsed_leases",
                    lambda: store.forget_lapsed_leases("x#member:", lapsed_for=0.0),
                ),
                (
                    "commit_cursors(fences)",
                    lambda: store.commit_cursors({"a": 1}, fences={"a": 1}),
                ),
                ("release_leases", lambda: store.release_leases("h", ["a"])),
                ("release_leases([])", lambda: store.release_leases("h", [])),
                ("cursors", lambda: store.cursors()),
                ("set_cursor", lambda: store.set_cursor("a", 1)),
                ("log_bounds", lambda: store.log_bounds()),
                ("seq_before", lambda: store.seq_before(datetime.datetime.now(datetime.UTC))),
                ("prune", lambda: store.prune(1, limit=10)),
                ("prune(nothing)", lambda: store.prune(0, limit=10)),
            ]
            for name, call in calls:
                with trio.fail_after(self.patience), trio.testing.assert_checkpoints():
                    await call()
                with trio.CancelScope() as scope:
                    scope.cancel()
                    await call()
                assert scope.cancelled_caught, f"{name} did not raise Cancelled"

    @settings(
        max_examples=200,
        deadline=None,
        suppress_health_check=[HealthCheck.differing_executors],
    )
    @given(data=st.data())
    async def test_damaged_store_urls_raise_configuration_errors(self, data: st.DataObject) -> None:
        """A malformed URL raises a `ConfigurationError` that keeps secrets out."""
        await trio.lowlevel.checkpoint()
        if not self.store_urls:
            return
        url = data.draw(st.sampled_from(self.store_urls), label="url")
        for _ in range(data.draw(st.integers(1, 3), label="damages")):
            at = data.draw(st.integers(0, len(url)), label="at")
            cut = data.draw(st.integers(0, 3), label="cut")
            url = url[:at] + data.draw(_URL_DAMAGE, label="damage") + url[at + cut :]
        try:
            store = store_from_url(url)
        except ConfigurationError as exc:
            assert "s3cret" not in str(exc), f"{url!r}: {exc}"
        else:
            assert "s3cret" not in repr(store), f"{url!r}: {store!r}"

    async def test_a_store_error_never_shows_a_secret(self) -> None:
        """Opening a store from a URL with a secret, where it cannot work, hides the secret."""
        for url in self.store_urls:
            if "s3cret" not in url:
                continue
            store = store_from_url(url)
            assert "s3cret" not in repr(store)
            assert "s3cret" not in str(store)
            try:
                with trio.fail_after(self.patience):
                    async with store.open():
                        pass
            except StoreError as exc:
                text = f"{exc} {exc.__cause__} {exc.__context__}"
                assert "s3cret" not in text, text

    @settings(
        max_examples=25,
        deadline=None,
        # The same test runs once per backend subclass, on purpose.
        suppress_health_check=[HealthCheck.differing_executors],
    )
    @given(
        batches=st.lists(st.lists(_event_items, max_size=12), max_size=6),
        page_sizes=st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=5),
    )
    async def test_random_batches_read_back_in_random_pages(
        self, batches: list[list[tuple[str, JSON, str | None]]], page_sizes: list[int]
    ) -> None:
        """Random batches of random events read back exactly, in any page size."""
        async with self.open_store() as store:
            expected: list[Event] = []
            for items in batches:
                ids = new_ids(len(items))
                batch = [
                    encode(t, data, key, i) for (t, data, key), i in zip(items, ids, strict=True)
                ]
                appended = await store.append(batch)
                assert len(appended.seqs) == len(batch)
                expected += [
                    new.persisted(seq, appended.created_at)
                    for new, seq in zip(batch, appended.seqs, strict=True)
                ]
            got: list[Event] = []
            position = 0
            for turn in range(len(expected) + 1):
                limit = page_sizes[turn % len(page_sizes)]
                page = await store.read(position, limit)
                assert len(page) <= limit
                if not page:
                    break
                got += page
                position = page[-1].seq
            assert got == expected
            assert await store.head() == (expected[-1].seq if expected else 0)


# -- helpers ---------------------------------------------------------------------


def make_letter(consumer: str, seq: int, **changes: Any) -> DeadLetter:
    """A parked dead letter of ``consumer`` for event ``seq``; ``changes`` replace fields."""
    letter = DeadLetter(
        consumer=consumer,
        seq=seq,
        event_id=uuid.uuid4(),
        type="test.event",
        attempts=3,
        first_failed_at=_FAILED_AT,
        last_failed_at=_FAILED_AT + datetime.timedelta(seconds=2, microseconds=1),
        reason="exhausted",
        error_type="builtins.ValueError",
        message=f"event {seq} is not valid",
        traceback='Traceback (most recent call last):\n  File "app.py", line 1\nValueError\n',
    )
    return attrs.evolve(letter, **changes)


async def check_a_first_dead_letter(store: Store, consumer: str, seq: int) -> None:
    """Check that ``store`` has no dead letter yet, and keeps one recorded with its cursor."""
    cursors = await store.load_cursors()
    assert await store.dead_letters() == []
    letter = make_letter(consumer, seq)
    await store.record_dead_letter(letter, cursor=seq)
    assert await store.dead_letters() == [letter]
    assert await store.load_cursors() == {**cursors, consumer: max(seq, cursors.get(consumer, seq))}


async def _create_table(tx: StoreTransaction) -> None:
    await tx.execute("CREATE TABLE IF NOT EXISTS contract_rows (id INTEGER PRIMARY KEY, v TEXT)")


def _sql(tx: StoreTransaction, query: str) -> str:
    """``query`` with ``?`` parameters, in ``tx``'s parameter style."""
    if tx.paramstyle == "?":
        return query
    parts = query.split("?")
    return "".join(f"{part}${index}" for index, part in enumerate(parts[:-1], 1)) + parts[-1]


def _lease_of(leases: Sequence[Lease], key: str) -> Lease:
    (lease,) = [lease for lease in leases if lease.key == key]
    return lease


def assert_same_json(got: JSON, expected: JSON) -> None:
    """Assert ``got`` is ``expected`` to the last bit: the same types (1.0 is not 1), the
    same floats (-0.0 is not 0.0), dict keys in the same order."""
    assert type(got) is type(expected), (got, expected)
    if isinstance(expected, dict):
        assert list(got) == list(expected), (got, expected)
        for key, value in expected.items():
            assert_same_json(got[key], value)
    elif isinstance(expected, list):
        assert len(got) == len(expected), (got, expected)
        for got_item, expected_item in zip(got, expected, strict=True):
            assert_same_json(got_item, expected_item)
    elif isinstance(expected, float):
        assert got == expected and math.copysign(1.0, got) == math.copysign(1.0, expected), (
            got,
            expected,
        )
    else:
        assert got == expected, (got, expected)


def make_events(count: int, event_type: str = "test.event") -> list[NewEvent]:
    """Return ``count`` new events of one type, with data ``{"n": 0}``, ``{"n": 1}``..."""
    ids = new_ids(count)
    return [encode(event_type, {"n": n}, None, ids[n]) for n in range(count)]


async def read_all(store: Store, *, after: int = 0, limit: int = 1000) -> list[Event]:
    """Read every event after ``after``, ``limit`` at a time."""
    events: list[Event] = []
    while page := await store.read(after, limit):
        events += page
        after = page[-1].seq
    return events


def assert_increasing(seqs: Sequence[int]) -> None:
    """Fail unless ``seqs`` is strictly increasing."""
    for earlier, later in itertools.pairwise(seqs):
        assert earlier < later, f"sequence numbers not increasing: {earlier} then {later}"


@attrs.define(eq=False)
class _CancelAfterSteps(trio.abc.Instrument):
    """Cancels ``scope`` after ``steps`` steps of ``task`` (runs between two yields)."""

    task: trio.lowlevel.Task
    scope: trio.CancelScope
    steps: int

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps -= 1
            if self.steps == 0:
                self.scope.cancel()


@contextlib.contextmanager
def cancelled_after_steps(scope: trio.CancelScope, steps: int) -> Iterator[None]:
    """Cancel ``scope`` once this task has yielded ``steps`` times in the block (0: now).

    The cancellation lands at the task's next checkpoint, whatever the other
    tasks do: looping over ``steps`` tries every point where a call yields.
    """
    if steps <= 0:
        scope.cancel()
        yield
        return
    instrument = _CancelAfterSteps(trio.lowlevel.current_task(), scope, steps)
    trio.lowlevel.add_instrument(instrument)
    try:
        yield
    finally:
        trio.lowlevel.remove_instrument(instrument)


async def cancel_after_checkpoints(scope: trio.CancelScope, count: int) -> None:
    """Cancel ``scope`` once this task has passed ``count`` checkpoints."""
    for _ in range(count):
        await trio.lowlevel.checkpoint()
    scope.cancel()
