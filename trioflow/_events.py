"""Events and the values that describe them."""

from __future__ import annotations

import datetime
import json
import os
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, TypeAlias

import attrs

from ._errors import InvalidEventError

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


@attrs.frozen(kw_only=True, slots=True, weakref_slot=False)
class Event:
    """One persisted event, as every consumer receives it.

    Attributes:
        seq: The sequence number the store gave the event. Sequence numbers grow
            strictly in the order events were committed; they may have holes
            (a store may skip a number) but never go back.
        id: A unique identifier, generated when the event was published.
        type: The event type, for example ``"order.created"``.
        data: The event's JSON value, decoded (as the store will replay it).
            Every consumer receives the same object: treat it as read-only.
        key: An optional key (for example a customer id), or None.
        created_at: When the event was committed, an aware UTC datetime.
        size: The size of ``data`` as the store keeps it: its JSON text, in
            UTF-8 bytes. Replay pages and bounded buffers are limited by it.
            Computed from ``data`` when not given.
    """

    seq: int
    id: uuid.UUID
    type: str
    data: JSON
    key: str | None
    created_at: datetime.datetime
    size: int = attrs.field(repr=False)

    @size.default
    def _size_of_data(self) -> int:
        return utf8_size(_encoder.encode(self.data))


@attrs.frozen(kw_only=True, slots=True, weakref_slot=False)
class NewEvent:
    """An event checked and encoded, on its way into a store.

    Attributes:
        id: The event's unique identifier.
        type: The event type.
        key: The key, or None.
        payload: ``data`` encoded as compact JSON text: what the store keeps.
        data: ``payload`` decoded again, the exact value replay will produce.
        size: ``payload``'s length in UTF-8 bytes.
    """

    id: uuid.UUID
    type: str
    key: str | None
    payload: str
    data: JSON
    size: int

    def persisted(self, seq: int, created_at: datetime.datetime) -> Event:
        """Return the `Event` this becomes once the store gave it ``seq``."""
        return Event(
            seq=seq,
            id=self.id,
            type=self.type,
            data=self.data,
            key=self.key,
            created_at=created_at,
            size=self.size,
        )


_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_decode = json.JSONDecoder().decode


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
    return event_type


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
    return NewEvent(id=event_id, type=event_type, key=key, payload=payload, data=decoded, size=size)


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
    return [uuid.UUID(bytes=raw[i : i + 16], version=4) for i in range(0, 16 * count, 16)]


def encode_many(items: Iterable[Sequence[Any]]) -> list[NewEvent]:
    """Check and encode ``(type, data)`` or ``(type, data, key)`` items, all or none."""
    if isinstance(items, str | bytes | dict) or not isinstance(items, Iterable):
        raise InvalidEventError(
            "publish_many takes an iterable of (type, data) or (type, data, key) tuples, "
            f"got {_short_repr(items)}"
        )
    materialised = list(items)
    ids = new_ids(len(materialised))
    out: list[NewEvent] = []
    for index, item in enumerate(materialised):
        if (
            type(item) is not tuple
            and (isinstance(item, str | bytes) or not isinstance(item, Sequence))
        ) or not 1 <= len(item) <= 3:
            raise InvalidEventError(
                f"item {index} of publish_many must be a (type, data) or (type, data, key) "
                f"tuple, got {_short_repr(item)}"
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
