"""Encoding events: the fast codec accepts, refuses and gives back exactly what `json` does."""

from __future__ import annotations

import datetime
import decimal
import enum
import gc
import json
import pickle
import tracemalloc
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

import trioflow
from trioflow import _events
from trioflow._events import MAX_DEPTH, Event, decode_json, encode, new_ids
from trioflow.testing._store_contract import assert_same_json, nested

pytestmark = pytest.mark.skipif(
    _events._fast_encode is None, reason="the fast extra is not installed"
)

_chars = st.characters(codec="utf-8", exclude_characters="\x00")
_numbers = (
    st.integers()
    | st.integers(min_value=-(10**60), max_value=10**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([1e23, -0.0, 0.0, 5e-324, 1.7976931348623157e308, 1e16, 2**53 + 1])
)
_json = st.recursive(
    st.none() | st.booleans() | _numbers | st.text(_chars, max_size=10),
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(st.text(_chars, max_size=6), children, max_size=4)
    ),
    max_leaves=15,
)


@pytest.fixture
def stdlib_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """trioflow as it runs without the fast extra."""
    monkeypatch.setattr(_events, "_fast_encode", None)
    monkeypatch.setattr(_events, "_fast_decode", None)
    yield


def _encode_both(data: Any) -> tuple[_events.NewEvent | str, _events.NewEvent | str]:
    """``data`` encoded with the fast codec and with json alone (or the error message)."""
    event_id = uuid.uuid4()
    results: list[_events.NewEvent | str] = []
    for fast in (True, False):
        codec = (_events._fast_encode, _events._fast_decode)
        if not fast:
            _events._fast_encode = _events._fast_decode = None
        try:
            results.append(encode("t", data, None, event_id))
        except trioflow.InvalidEventError as exc:
            results.append(str(exc))
        finally:
            _events._fast_encode, _events._fast_decode = codec
    return results[0], results[1]


@given(data=_json)
def test_accepted_data_decodes_to_what_json_gives_back(data: Any) -> None:
    fast, plain = _encode_both(data)
    assert isinstance(fast, _events.NewEvent) and isinstance(plain, _events.NewEvent)
    expected = json.loads(json.dumps(data))
    for new in (fast, plain):
        assert_same_json(decode_json(new.payload), expected)
        assert_same_json(json.loads(new.payload), expected)
        assert_same_json(new.persisted(1, datetime.datetime.now(datetime.UTC)).data, expected)
        assert new.size == len(new.payload.encode())


class _Colour(enum.Enum):
    RED = 1


class _Level(enum.IntEnum):
    HIGH = 3


class _Name(enum.StrEnum):
    ADA = "ada"


@pytest.mark.parametrize(
    "data",
    [
        float("nan"),
        [1.0, float("inf")],
        {"x": -float("inf")},
        {1: "int key"},
        {"a": {2.5: "float key"}},
        {None: 1},
        {True: 1},
        uuid.UUID(int=7),
        datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC),
        datetime.date(2024, 1, 1),
        decimal.Decimal("1.5"),
        {1, 2},
        frozenset(),
        b"bytes",
        bytearray(b"x"),
        _Colour.RED,
        [object()],
        "\x00",
        {"k\x00": 1},
        "\ud800",
        {"\udfff": 1},
        nested(MAX_DEPTH + 1),
        [nested(MAX_DEPTH - 1, [[]])],
    ],
    ids=repr,
)
def test_refused_data_is_refused_with_the_same_message(data: Any) -> None:
    fast, plain = _encode_both(data)
    assert isinstance(plain, str), plain
    assert fast == plain


@pytest.mark.parametrize(
    "data",
    [
        (1, 2),
        {"a": (1, [2, (3,)])},
        _Level.HIGH,
        {"level": _Level.HIGH},
        _Name.ADA,
        {_Name.ADA: 1},
        nested(MAX_DEPTH),
        ["[{" * 100],
        "\\u0000",
        10**100,
        -(2**64),
    ],
    ids=repr,
)
def test_data_json_accepts_is_accepted_with_the_same_value(data: Any) -> None:
    fast, plain = _encode_both(data)
    assert isinstance(fast, _events.NewEvent) and isinstance(plain, _events.NewEvent)
    assert_same_json(decode_json(fast.payload), json.loads(plain.payload))


def test_decode_falls_back_to_json_for_what_the_fast_decoder_refuses() -> None:
    # Texts trioflow never writes, but a row written by hand may hold.
    for text in ["1e400", '"\\ud800"', "-1e999", "[1.7976931348623159e308]"]:
        assert repr(decode_json(text)) == repr(json.loads(text))
    with pytest.raises(ValueError):
        decode_json("[1,")


@pytest.mark.usefixtures("stdlib_only")
def test_without_the_fast_codec_data_still_reads_back_exactly() -> None:
    data = {"b": 1e23, "a": [-0.0, 2**70], "c": (1, 2)}
    new = encode("t", data, None, uuid.uuid4())
    assert_same_json(decode_json(new.payload), json.loads(json.dumps(data)))
    with pytest.raises(trioflow.InvalidEventError, match="not str"):
        encode("t", {1: 2}, None, uuid.uuid4())


def test_new_ids_are_random_version_4_uuids() -> None:
    ids = new_ids(1000)
    assert len(set(ids)) == 1000
    for made in ids[:50]:
        assert made.version == 4
        assert made.variant == uuid.RFC_4122
        assert made == uuid.UUID(str(made))
        assert made == uuid.UUID(bytes=made.bytes, version=4)
        assert hash(made) == hash(uuid.UUID(int=made.int))
        assert pickle.loads(pickle.dumps(made)) == made


def test_a_live_event_decodes_its_data_once_until_it_is_forgotten() -> None:
    new = encode("t", {"a": [1, 2.5]}, "k", uuid.uuid4())
    now = datetime.datetime.now(datetime.UTC)
    event = new.persisted(3, now)
    first = event.data
    assert first == {"a": [1, 2.5]}
    assert event.data is first
    replayed = Event(seq=3, id=new.id, type="t", data={"a": [1, 2.5]}, key="k", created_at=now)
    assert replayed == event
    assert replayed.size == event.size == new.size
    assert hash(replayed) == hash(event)
    assert pickle.loads(pickle.dumps(event)) == event
    assert repr(event) == repr(replayed)
    with pytest.raises(AttributeError):
        setattr(event, "seq", 4)  # noqa: B010
    # Far behind the head: decoded anew, equal, and not kept.
    event.forget_data()
    again = event.data
    assert again == first and again is not first
    assert event.data is not again
    # A replayed event has no text to decode again: it keeps its data.
    replayed.forget_data()
    assert replayed.data is replayed.data


@pytest.mark.parametrize("reads_data", [False, True], ids=["untouched", "read-by-others"])
async def test_a_lagging_consumer_holds_little_more_than_each_events_json_text(
    monkeypatch: pytest.MonkeyPatch, reads_data: bool
) -> None:
    """An event held for a consumer far behind costs its 200 bytes of JSON and at
    most 500 more, whether or not the consumers that keep up read its data."""
    monkeypatch.setattr("trioflow._dispatch.DECODED_KEPT", 100)
    app = trioflow.App("memory://")
    gate, caught_up = trio.Event(), trio.Event()
    handled = 0
    count = 3000

    @app.consumer("lagging")
    async def lagging(event: trioflow.Event) -> None:
        await gate.wait()

    @app.consumer("keeping-up")
    async def keeping_up(event: trioflow.Event) -> None:
        nonlocal handled
        if reads_data:
            assert event.data["n"] == event.seq - 2
        handled += 1
        if handled == count + 1:
            caught_up.set()

    # Built before measuring, as a publisher's own values are: 200 bytes of JSON each.
    items = [("t", {"n": n, "pad": "x" * (185 - len(str(n)))}) for n in range(count)]
    assert len(json.dumps(items[0][1], separators=(",", ":"))) == 200
    async with trioflow.open_flow(app) as flow:
        await flow.publish("t", {"n": -1})
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for start in range(0, count, 1000):
                await flow.publish_many(items[start : start + 1000])
            await caught_up.wait()
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        gate.set()
    # The memory store keeps every event too (in the same objects): this is
    # the whole cost of holding them.
    assert held / count <= 200 + 500
