"""Events and the values that describe them."""

from __future__ import annotations

import datetime
import json
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, TypeAlias

from ._errors import InvalidEventError

try:
    import msgspec
except ImportError:  # pragma: no cover - the `fast` extra is not installed
    msgspec = None  # type: ignore[assignment]

#: What an event's ``data`` may hold: anything that round-trips through JSON.
JSON: TypeAlias = Any

#: Longest event type and key accepted, in characters.
MAX_TYPE_LENGTH = 255
MAX_KEY_LENGTH = 1024
#: Deepest nesting of lists and dicts accepted in an event's data. Every
#: reader must be able to decode what was published: deeper values exhaust
#: Python's recursion limit in JSON decoders (and in handlers walking them).
#: 128, as serde_json's default; Ruby's JSON stops at 100.
MAX_DEPTH = 128
#: Largest event data accepted: its JSON text, in UTF-8 bytes.
MAX_DATA_BYTES = 64 * 1024 * 1024


#: A consumer that holds more live events than this in memory, or more bytes
#: of their JSON text than `DECODED_KEPT_BYTES`, lags. While one does, the
#: dispatcher keeps the events it fanned out last, at most this many and that
#: much, and drops the decoded data of older ones (`Event.forget_data`).
DECODED_KEPT = 4096
DECODED_KEPT_BYTES = 4 * 1024 * 1024

#: Stands for "not decoded yet" in `Event`'s data slot (data may be None).
_UNDECODED: Final[Any] = type("_Undecoded", (), {"__repr__": lambda self: "<undecoded>"})()
#: Stands for "decoded anew whenever asked for" (`Event.forget_data`).
_FORGOTTEN: Final[Any] = type("_Forgotten", (), {"__repr__": lambda self: "<forgotten>"})()


class Event:
    """One persisted event, as every consumer receives it.

    Events are frozen values: their attributes are read-only. One `Event`
    object stands for one event in the whole flow: every consumer receives
    the same one.

    Attributes:
        seq: The sequence number the store gave the event. Sequence numbers grow
            strictly in the order events were committed; they may have holes
            (a store may skip a number) but never go back.
        id: A unique identifier, generated when the event was published.
        type: The event type, for example ``"order.created"``.
        data: The event's JSON value, decoded (as the store will replay it).
            Treat it as read-only. An event fanned out live keeps its JSON
            text and decodes it when ``data`` is first asked for; consumers
            that keep up share that one decoded object. Once the event is
            far behind the head of the stream (`DECODED_KEPT`) while a
            consumer lags, the decoded value is dropped, so a consumer that
            lags holds a few hundred bytes per event, and its handler gets an
            equal value decoded anew.
        key: An optional key (for example a customer id), or None.
        created_at: When the event was committed, an aware UTC datetime.
        size: The size of ``data`` as the store keeps it: its JSON text, in
            UTF-8 bytes. Replay pages and bounded buffers are limited by it.
            Computed from ``data`` when not given.
    """

    __slots__ = ("_created_at", "_data", "_id", "_key", "_payload", "_seq", "_size", "_type")

    _seq: int
    _id: uuid.UUID
    _type: str
    _data: JSON
    _payload: str | None
    _key: str | None
    _created_at: datetime.datetime
    _size: int

    def __init__(
        self,
        *,
        seq: int,
        id: uuid.UUID,
        type: str,
        data: JSON,
        key: str | None,
        created_at: datetime.datetime,
        size: int | None = None,
    ) -> None:
        self._seq = seq
        self._id = id
        self._type = type
        self._data = data
        self._payload = None
        self._key = key
        self._created_at = created_at
        self._size = utf8_size(_encoder.encode(data)) if size is None else size

    @classmethod
    def _lazy(
        cls,
        seq: int,
        event_id: uuid.UUID,
        event_type: str,
        payload: str,
        key: str | None,
        created_at: datetime.datetime,
        size: int,
    ) -> Event:
        """An event holding its JSON text, decoded when ``data`` is first asked for.

        Only for text `encode` produced (so it decodes): its data was checked then.
        """
        event = _new_object(cls)
        event._seq = seq
        event._id = event_id
        event._type = event_type
        event._data = _UNDECODED
        event._payload = payload
        event._key = key
        event._created_at = created_at
        event._size = size
        return event

    @property
    def seq(self) -> int:
        return self._seq

    @property
    def id(self) -> uuid.UUID:
        return self._id

    @property
    def type(self) -> str:
        return self._type

    @property
    def data(self) -> JSON:
        data = self._data
        if data is _UNDECODED:
            payload = self._payload
            assert payload is not None
            # Kept while the event is recent (`forget_data`): consumers that
            # keep up share this one object.
            data = self._data = decode_json(payload)
        elif data is _FORGOTTEN:
            payload = self._payload
            assert payload is not None
            data = decode_json(payload)
        return data

    def forget_data(self) -> None:
        """Drop the decoded ``data`` of an event that keeps its JSON text (a live one).

        The dispatcher calls it once the event is well behind the head of the
        stream: a consumer that lags behind then holds the text, not the
        decoded value (several times larger), and its handler decodes the
        text again (an equal value, not kept) whenever it asks for ``data``.
        """
        if self._payload is not None:
            self._data = _FORGOTTEN

    @property
    def key(self) -> str | None:
        return self._key

    @property
    def created_at(self) -> datetime.datetime:
        return self._created_at

    @property
    def size(self) -> int:
        return self._size

    def _fields(self) -> tuple[object, ...]:
        return (self._seq, self._id, self._type, self.data, self._key, self._created_at, self._size)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Event)
        return self._fields() == other._fields()

    def __ne__(self, other: object) -> bool:
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    def __hash__(self) -> int:
        # Not the data (a dict or list is unhashable): equal events still hash alike.
        return hash((self._seq, self._id, self._type, self._key, self._created_at, self._size))

    def __repr__(self) -> str:
        return (
            f"Event(seq={self._seq!r}, id={self._id!r}, type={self._type!r}, "
            f"data={self.data!r}, key={self._key!r}, created_at={self._created_at!r})"
        )

    def __reduce__(self) -> tuple[Callable[..., Event], tuple[object, ...]]:
        return (_rebuild_event, self._fields())


def _rebuild_event(
    seq: int,
    event_id: uuid.UUID,
    event_type: str,
    data: JSON,
    key: str | None,
    created_at: datetime.datetime,
    size: int,
) -> Event:
    return Event(
        seq=seq, id=event_id, type=event_type, data=data, key=key, created_at=created_at, size=size
    )


_new_object = object.__new__


class NewEvent:
    """An event checked and encoded, on its way into a store.

    Attributes:
        id: The event's unique identifier.
        type: The event type.
        key: The key, or None.
        payload: ``data`` encoded as compact JSON text: what the store keeps.
        data: ``payload`` decoded, the exact value replay will produce
            (decoded when asked for: the live path hands consumers the text).
        size: ``payload``'s length in UTF-8 bytes.
    """

    __slots__ = ("id", "key", "payload", "size", "type")

    def __init__(self, id: uuid.UUID, type: str, key: str | None, payload: str, size: int) -> None:
        self.id = id
        self.type = type
        self.key = key
        self.payload = payload
        self.size = size

    @property
    def data(self) -> JSON:
        return decode_json(self.payload)

    def persisted(self, seq: int, created_at: datetime.datetime) -> Event:
        """Return the `Event` this becomes once the store gave it ``seq``."""
        return Event._lazy(seq, self.id, self.type, self.payload, self.key, created_at, self.size)

    def __repr__(self) -> str:
        return (
            f"NewEvent(id={self.id!r}, type={self.type!r}, key={self.key!r}, "
            f"payload={self.payload!r}, size={self.size!r})"
        )


_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_decode = json.JSONDecoder().decode

# The fast codec (the `fast` extra, msgspec), when installed. Its decoder gives
# back exactly what `json` does for every text trioflow writes (floats such as
# 1e23 and -0.0, integers of any size, key order); for what it refuses (texts
# trioflow never writes, such as 1e400 or a lone surrogate escape) `json` has
# the last word. Its encoder is used only where its output decodes back equal
# to the data given: anything else takes the `json` path, so what publishing
# accepts and refuses, and why, does not depend on it.
_fast_encode: Callable[[object], bytes] | None = None
_fast_decode: Callable[[bytes | str], Any] | None = None
if msgspec is not None:
    _fast_encode = msgspec.json.Encoder().encode
    _fast_decode = msgspec.json.Decoder().decode


def decode_json(text: str) -> JSON:
    """Decode JSON text that a store keeps, exactly as `json.loads` would.

    Raises:
        ValueError, RecursionError: As `json.loads` does.
    """
    if _fast_decode is not None:
        try:
            return _fast_decode(text)
        except Exception:
            pass
    return _decode(text)


def utf8_size(text: str) -> int:
    """``len(text.encode())``, without encoding ASCII text (the common case)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def data_depth(value: JSON) -> int:
    """How deeply lists and dicts nest in ``value`` (0 for a scalar), without recursion."""
    deepest = 0
    stack: list[tuple[JSON, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[JSON] = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in children)
    return deepest


def check_type(event_type: object) -> str:
    """Return ``event_type`` if it is a valid event type, else raise InvalidEventError."""
    if type(event_type) is str and event_type in _valid_types:
        return event_type
    if (
        not isinstance(event_type, str)
        or not event_type
        or len(event_type) > MAX_TYPE_LENGTH
        or "\x00" in event_type
        or not _is_unicode(event_type)
    ):
        raise InvalidEventError(
            f"event type must be a non-empty str of at most {MAX_TYPE_LENGTH} characters "
            f"of valid Unicode without NUL, got {event_type!r}"
        )
    if len(_valid_types) < _VALID_TYPES_KEPT and type(event_type) is str:
        _valid_types.add(event_type)
    return event_type


#: Event types found valid: an application publishes few, over and over.
#: Only exact `str`s, so a hit is the same check; bounded, so that types
#: made up per event cannot grow it without end.
_valid_types: set[str] = set()
_VALID_TYPES_KEPT: Final = 4096


def encode(event_type: object, data: JSON, key: object, event_id: uuid.UUID) -> NewEvent:
    """Check one event and encode its data; raise InvalidEventError if it is unfit.

    ``data`` must be JSON-serialisable without loss of meaning: no NaN or
    infinity, no objects JSON does not know. Tuples become lists and dict keys
    must be strings, so that what consumers see live is exactly what a replay
    from the store produces.
    """
    check_type(event_type)
    assert isinstance(event_type, str)
    if key is not None and (
        not isinstance(key, str)
        or len(key) > MAX_KEY_LENGTH
        or "\x00" in key
        or not _is_unicode(key)
    ):
        raise InvalidEventError(
            f"event key must be None or a str of at most {MAX_KEY_LENGTH} characters "
            f"of valid Unicode without NUL, got {key!r}"
        )
    if _fast_encode is not None:
        new = _encode_fast(event_type, data, key, event_id)
        if new is not None:
            return new
    return _encode_checked(event_type, data, key, event_id)


def _encode_fast(
    event_type: str, data: JSON, key: str | None, event_id: uuid.UUID
) -> NewEvent | None:
    """Encode ``data`` with the fast codec if that is certainly faithful; else None.

    Faithful means: the text decodes back equal to ``data`` (so nothing was
    lost or turned into something else: not a NaN into null, a UUID or a
    datetime into a string, an int key into a str), it is shallow enough, has
    no NUL and is within `MAX_DATA_BYTES`. Anything else is left to
    `_encode_checked`, which accepts or refuses it exactly as before.
    """
    assert _fast_encode is not None and _fast_decode is not None
    try:
        raw = _fast_encode(data)
    except Exception:
        return None
    size = len(raw)
    if size > MAX_DATA_BYTES or raw.count(b"[") + raw.count(b"{") > MAX_DEPTH or b"\\u0000" in raw:
        return None
    try:
        if _fast_decode(raw) != data:
            return None
    except Exception:
        return None
    return NewEvent(event_id, event_type, key, raw.decode(), size)


def _encode_checked(event_type: str, data: JSON, key: str | None, event_id: uuid.UUID) -> NewEvent:
    """`encode`'s data, with the standard library's codec: every check, every message."""
    try:
        payload = _encoder.encode(data)
    except RecursionError:
        raise _too_deep(event_type) from None
    except (TypeError, ValueError) as exc:
        raise InvalidEventError(
            f"data of event {event_type!r} is not JSON-serialisable ({exc}); "
            "publish only dicts with str keys, lists, str, int, finite float, bool and None"
        ) from None
    # Every level of nesting opens a bracket, so a payload with few brackets
    # (almost all of them) cannot be too deep: count them in C first.
    if payload.count("[") + payload.count("{") > MAX_DEPTH and data_depth(data) > MAX_DEPTH:
        raise _too_deep(event_type)
    if "\\u0000" in payload and _has_nul(data):
        raise InvalidEventError(
            f"data of event {event_type!r} holds a NUL character (\\u0000), which stores "
            "such as PostgreSQL cannot keep; remove it or encode the value (base64, say)"
        )
    if payload.isascii():
        size = len(payload)
    else:
        try:
            size = len(payload.encode())
        except UnicodeEncodeError:
            raise InvalidEventError(
                f"data of event {event_type!r} holds a lone surrogate, which is not valid "
                "Unicode and no store can keep; decode text with errors='replace' or encode it"
            ) from None
    if size > MAX_DATA_BYTES:
        raise InvalidEventError(
            f"data of event {event_type!r} is {size:,} bytes as JSON, over the limit of "
            f"{MAX_DATA_BYTES:,}; store large payloads elsewhere (a file or object store) "
            "and publish a reference to them"
        )
    decoded = _decode(payload)
    # Equal means nothing changed on the way through JSON (the common case,
    # checked in C); only when they differ is it worth finding out whether
    # the difference is harmless (tuples) or not (non-str keys).
    if decoded != data and not _same_keys(data, decoded):
        raise InvalidEventError(
            f"data of event {event_type!r} has dict keys that are not str; JSON would turn "
            "them into strings and a replay would differ from live delivery: use str keys"
        )
    return NewEvent(event_id, event_type, key, payload, size)


def _too_deep(event_type: str) -> InvalidEventError:
    return InvalidEventError(
        f"data of event {event_type!r} nests lists and dicts more than {MAX_DEPTH} levels "
        "deep, which not every reader could decode; flatten it"
    )


def _is_unicode(text: str) -> bool:
    """False for text holding lone surrogates (not encodable as UTF-8)."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _has_nul(value: JSON) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_nul(v) for v in value)
    return False


def _same_keys(original: JSON, decoded: JSON) -> bool:
    """True when every dict in ``original`` has only str keys (checked against ``decoded``)."""
    if isinstance(original, dict):
        if not all(type(k) is str for k in original):
            return False
        return all(_same_keys(v, decoded[k]) for k, v in original.items())
    if isinstance(original, list | tuple):
        return all(_same_keys(o, d) for o, d in zip(original, decoded, strict=True))
    return True


def new_ids(count: int) -> list[uuid.UUID]:
    """Return ``count`` random (version 4) UUIDs, drawing the randomness in one call."""
    raw = os.urandom(16 * count)
    # What uuid.UUID(bytes=..., version=4) makes, without its checks and
    # conversions (a third of the cost of publishing a small event).
    ids: list[uuid.UUID] = []
    add = ids.append
    from_bytes = int.from_bytes
    for start in range(0, 16 * count, 16):
        made = _new_object(_UUID)
        _set_attribute(made, "int", from_bytes(raw[start : start + 16]) & _V4_CLEAR | _V4_SET)
        _set_attribute(made, "is_safe", _UNKNOWN_SAFETY)
        add(made)
    return ids


_UUID = uuid.UUID
_set_attribute = object.__setattr__
_UNKNOWN_SAFETY = uuid.SafeUUID.unknown
# The version (4, bits 76-79) and the RFC 4122 variant (bits 62-63).
_V4_CLEAR: Final = ~((0xF000 << 64) | (0xC000 << 48))
_V4_SET: Final = (4 << 76) | (0x8000 << 48)


#: Events `publish_many` encodes between two checkpoints: encoding takes a few
#: microseconds an event, so a large batch must not hold the loop in one step.
ENCODE_CHUNK = 1000


def check_items(items: object) -> list[Sequence[Any]]:
    """Return ``publish_many``'s argument as a list, or raise InvalidEventError."""
    if isinstance(items, str | bytes | dict) or not isinstance(items, Iterable):
        raise InvalidEventError(
            "publish_many takes an iterable of (type, data) or (type, data, key) tuples, "
            f"got {_short_repr(items)}"
        )
    return list(items)


def encode_many(items: Sequence[Sequence[Any]], *, first: int = 0) -> list[NewEvent]:
    """Check and encode ``(type, data)`` or ``(type, data, key)`` items, all or none.

    ``first`` is the index of ``items[0]`` in the whole call, for messages.
    """
    ids = new_ids(len(items))
    out: list[NewEvent] = []
    for index, item in enumerate(items):
        if (
            type(item) is not tuple
            and (isinstance(item, str | bytes) or not isinstance(item, Sequence))
        ) or not 1 <= len(item) <= 3:
            raise InvalidEventError(
                f"item {first + index} of publish_many must be a (type, data) or "
                f"(type, data, key) tuple, got {_short_repr(item)}"
            )
        event_type = item[0]
        data = item[1] if len(item) > 1 else None
        key = item[2] if len(item) > 2 else None
        out.append(encode(event_type, data, key, ids[index]))
    return out


def _short_repr(value: object, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters for an error message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
