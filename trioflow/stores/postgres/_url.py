"""The PostgreSQL store's URL: trioflow's options taken out of it, libpq's passed on.

``postgresql://user:password@host:port/db?schema=trioflow&pool_max_size=20``:
`parse_url` splits such a URL into the DSN asyncpg connects with and the
keyword arguments of `PostgresStore`, and refuses a malformed one without
quoting any secret it holds (see `trioflow.stores._masking`).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from typing import Final

import attrs

from ..._errors import UnknownStoreError
from .._masking import (
    LIBPQ_OPTIONS,
    SECRET_OPTIONS,
    dsn_secrets,
    is_plain_path,
    mask_dsn,
    scrub,
    userinfo_is_ambiguous,
)


def _optional_float(raw: str) -> float | None:
    return None if raw.lower() in ("", "none") else float(raw)


_URL_OPTIONS: Final[dict[str, Callable[[str], object]]] = {
    "schema": str,
    "pool_min_size": int,
    "pool_max_size": int,
    "poll_interval": float,
    "cursor_durability": str,
    "cursor_checkpoint_interval": float,
    "connect_timeout": float,
    "command_timeout": _optional_float,
    "cleanup_timeout": float,
    "statement_cache_size": int,
    "application_name": str,
}

_URL_OPTION_KINDS: Final = {
    "schema": "a schema name",
    "pool_min_size": "an integer",
    "pool_max_size": "an integer",
    "poll_interval": "seconds, for example 1.0",
    "cursor_durability": "sync, async or unlogged",
    "cursor_checkpoint_interval": "seconds, for example 5",
    "connect_timeout": "seconds, for example 10",
    "command_timeout": "seconds, or none",
    "cleanup_timeout": "seconds, for example 5",
    "statement_cache_size": "an integer",
    "application_name": "a name",
}

# Options of the URL's query string that asyncpg (like libpq) understands and
# that trioflow passes through unchanged.
_PASSTHROUGH_OPTIONS: Final = LIBPQ_OPTIONS

#: Options whose values messages show: trioflow's and libpq's, but the secrets.
_SHOWN_OPTIONS: Final = frozenset(_URL_OPTIONS) | (LIBPQ_OPTIONS - SECRET_OPTIONS)


def display(url: str) -> str:
    """``url`` (or a libpq key/value DSN) with its secrets masked, for messages."""
    return mask_dsn(url, shown=_SHOWN_OPTIONS)


@attrs.frozen(kw_only=True)
class ParsedUrl:
    """A store URL taken apart by `parse_url`.

    Attributes:
        dsn: What asyncpg connects with: the URL without trioflow's options.
        options: trioflow's options, converted: `PostgresStore`'s keyword arguments.
        display: The URL as given, its secrets masked.
        secrets: The secret values the URL holds, to blot out of messages.
    """

    dsn: str = attrs.field(repr=False)
    options: dict[str, object]
    display: str
    secrets: tuple[str, ...] = attrs.field(repr=False)

    def refuse(self, problem: str) -> UnknownStoreError:
        """The error for this URL: ``problem`` follows the masked URL."""
        return UnknownStoreError(f"store URL {self.display}{problem}")

    def quote(self, value: object) -> str:
        """``value`` as a message may quote it back, with the URL's secrets blotted out.

        A value quoted back (a schema name, say) may hold a piece of a
        password that a malformed URL put out of place.
        """
        return scrub(str(value), self.secrets)


def parse_url(url: str) -> ParsedUrl:
    """Take ``postgresql://user:password@host:port/db?options`` apart; see `PostgresStore.from_url`.

    Raises:
        UnknownStoreError: The URL is malformed or has an unknown or invalid
            option.
    """
    if not isinstance(url, str):
        raise UnknownStoreError(f"a PostgreSQL store URL must be a str, got {type(url).__name__}")
    parsed = ParsedUrl(
        dsn=url,
        options={},
        display=display(url),
        secrets=dsn_secrets(url, shown=_SHOWN_OPTIONS),
    )
    refuse, quote = parsed.refuse, parsed.quote
    if any(ord(char) < 32 or char == "\x7f" for char in url):
        # URL parsers drop some (tabs, line breaks) and keep others: what
        # is connected to would not be what is shown.
        raise refuse(" holds control characters (a line break, say); remove them")
    if userinfo_is_ambiguous(url):
        # Readers of URLs disagree about where such a userinfo ends: a
        # piece of the password could become the host, the database or an
        # option, and be quoted back.
        raise refuse(
            " is malformed: an '@', '/', '?' or '#' in the user name or password must be "
            "percent-encoded (%40, %2F, %3F, %23), and so must any other '@' (in the "
            "database name or an option's value)"
        )
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        raise refuse(f" is malformed: {_url_problem(exc)}") from None
    if parts.scheme.lower() not in ("postgresql", "postgres"):
        raise refuse(" is not a PostgreSQL URL; use postgresql://user@host/db")
    if parts.fragment:
        raise refuse(" has a #fragment; remove it")
    if not is_plain_path(parts.path):
        raise refuse(
            " is malformed: its path must be a database name, with characters other than "
            "letters, digits and ._-~$ percent-encoded (a space as %20)"
        )
    try:
        pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        if parts.query:
            raise refuse(": cannot parse the query string; use ?name=value&name=value") from None
        pairs = []
    options: dict[str, str] = {}
    for name, value in pairs:
        if name in options:
            raise refuse(f" gives option {quote(name)!r} twice")
        options[name] = value
    kwargs: dict[str, object] = {}
    for name, convert in _URL_OPTIONS.items():
        if name in options:
            raw = options.pop(name)
            try:
                kwargs[name] = convert(raw)
            except ValueError:
                raise refuse(
                    f": option {name}={quote(raw)!r} is not valid: "
                    f"expected {_URL_OPTION_KINDS[name]}"
                ) from None
    unknown = sorted(set(options) - _PASSTHROUGH_OPTIONS)
    if unknown:
        raise refuse(
            f": unknown option(s) {quote(', '.join(unknown))}; trioflow "
            f"knows {', '.join(sorted(_URL_OPTIONS))} and passes on "
            f"{', '.join(sorted(_PASSTHROUGH_OPTIONS))}"
        )
    dsn = urllib.parse.urlunsplit(
        ("postgresql", parts.netloc, parts.path, urllib.parse.urlencode(options), "")
    )
    return attrs.evolve(parsed, dsn=dsn, options=kwargs)


def _url_problem(error: ValueError) -> str:
    """What is wrong with a URL that `urllib.parse` refused, without quoting any of it."""
    text = str(error)
    if "Port" in text:
        return "the port is not a number from 0 to 65535"
    if "IPv6" in text:
        return "an IPv6 address needs both its brackets, as in postgresql://user@[::1]:5432/db"
    return "the host holds characters that are not allowed; percent-encode them"
