"""``sqlite:`` URLs: the file and the options they name."""

from __future__ import annotations

import urllib.parse
from typing import Literal, TypedDict

from ..._errors import UnknownStoreError

URL_OPTIONS = "synchronous=full|normal, poll_interval=<seconds > 0>, busy_timeout=<seconds >= 0>"
URL_FORMS = "sqlite:///relative/path.db or sqlite:////absolute/path.db"


class URLOptions(TypedDict, total=False):
    """The store options a URL sets (the others keep their defaults)."""

    synchronous: Literal["full", "normal"]
    poll_interval: float
    busy_timeout: float


def parse_url(url: str) -> tuple[str, URLOptions]:
    """The path a ``sqlite:`` URL names and the options its query sets.

    The options are not checked here beyond their types: the store checks them.

    Raises:
        UnknownStoreError: The URL is not a valid SQLite store URL.
    """
    if not isinstance(url, str):
        raise UnknownStoreError(f"a store URL must be a str, got {url!r}; use {URL_FORMS}")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        # An unbalanced or misplaced "[" or "]", read as an IPv6 host.
        raise UnknownStoreError(
            f"SQLite store URL {url!r} is malformed (a '[' or ']' before the path?); "
            f"use {URL_FORMS}"
        ) from None
    if parts.scheme.lower() != "sqlite":
        raise UnknownStoreError(f"store URL {url!r} is not a sqlite: URL; use {URL_FORMS}")
    if parts.netloc or not parts.path.startswith("/"):
        raise UnknownStoreError(
            f"SQLite store URL {url!r}: a SQLite URL has no host and starts with three "
            f"slashes; use {URL_FORMS}"
        )
    if parts.fragment:
        raise UnknownStoreError(
            f"SQLite store URL {url!r} has a #fragment; percent-encode '#' in the path as %23"
        )
    path = urllib.parse.unquote(parts.path[1:])
    if not path:
        raise UnknownStoreError(f"SQLite store URL {url!r} names no file; use {URL_FORMS}")
    try:
        pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise UnknownStoreError(
            f"SQLite store URL {url!r}: cannot parse the query; accepted: {URL_OPTIONS}"
        ) from None
    options: dict[str, str] = {}
    for name, value in pairs:
        if name not in ("synchronous", "poll_interval", "busy_timeout"):
            raise UnknownStoreError(
                f"SQLite store URL {url!r}: unknown option {name!r}; accepted: {URL_OPTIONS}"
            )
        if name in options:
            raise UnknownStoreError(
                f"SQLite store URL {url!r}: option {name!r} is given twice; give it once"
            )
        options[name] = value
    parsed: URLOptions = {}
    raw_synchronous = options.get("synchronous", "full").lower()
    if raw_synchronous == "full":
        parsed["synchronous"] = "full"
    elif raw_synchronous == "normal":
        parsed["synchronous"] = "normal"
    else:
        raise UnknownStoreError(
            f"SQLite store URL {url!r}: synchronous must be full or normal, "
            f"got {options['synchronous']!r}"
        )
    try:
        if "poll_interval" in options:
            parsed["poll_interval"] = float(options["poll_interval"])
        if "busy_timeout" in options:
            parsed["busy_timeout"] = float(options["busy_timeout"])
    except ValueError:
        raise UnknownStoreError(
            f"SQLite store URL {url!r}: poll_interval and busy_timeout must be numbers of "
            f"seconds; accepted: {URL_OPTIONS}"
        ) from None
    return path, parsed
