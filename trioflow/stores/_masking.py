"""Store URLs and DSNs shown without their secrets.

Whatever trioflow prints about a store URL (the PostgreSQL store's ``repr``,
error messages and logs; `store_from_url`'s errors) goes through `mask_dsn`;
text that may echo parts of a DSN (the driver's own error messages, values
quoted back) goes through `scrub`, which blots out the secret values
themselves.

`mask_dsn` cuts a URL into its parts as `urllib.parse.urlsplit` does, but
by text, without checking anything, so that a URL too malformed to parse is
masked as well as a good one. It then shows only what it recognises as no
secret, and masks the rest: a misspelt or damaged URL may hold a password
anywhere. Shown are the scheme; no userinfo (``***@``: a user name and
password, whatever they hold); host names (ASCII), IP addresses and socket
directories, with numeric ports;
a database name of letters, digits and ``._-%$~``; query options whose
names are known and not secret, with plain values (a word or number; a file
name), unless another part is odd (a damaged URL may hold a secret anywhere
after it). Masked are secret
options (libpq's ``password``, ``sslpassword`` and ``oauth_client_secret``),
the values of unknown options, whole options after a secret or bare one (the
rest of a password holding an unencoded ``&``), and any fragment. libpq's
``key=value`` form is masked key by key, the same way.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Collection, Iterable, Iterator
from typing import Final

__all__ = [
    "LIBPQ_OPTIONS",
    "SECRET_OPTIONS",
    "dsn_secrets",
    "is_plain_path",
    "mask_dsn",
    "scrub",
    "userinfo_is_ambiguous",
]

#: What a secret is replaced with.
MASK: Final = "***"

#: libpq connection options whose values are secrets (libpq's own display
#: character for them is ``*``).
SECRET_OPTIONS: Final = frozenset({"password", "sslpassword", "oauth_client_secret"})

#: libpq connection options that asyncpg understands, as URL query options.
LIBPQ_OPTIONS: Final = frozenset(
    {
        "host",
        "port",
        "user",
        "password",
        "dbname",
        "database",
        "passfile",
        "service",
        "sslmode",
        "sslcert",
        "sslkey",
        "sslrootcert",
        "sslnegotiation",
        "sslcrl",
        "sslpassword",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "target_session_attrs",
        "krbsrvname",
        "gsslib",
    }
)

# What URL parsers skip at the start of a URL.
_CONTROLS: Final = "".join(map(chr, range(33)))

#: Options whose values `mask_dsn` shows unless told otherwise.
_SHOWN_OPTIONS: Final = LIBPQ_OPTIONS - SECRET_OPTIONS

# What a URL's parts look like when they are what they seem; anything else
# is masked. A scheme (after control characters and spaces, which URL
# parsers skip); one host name, IP address or percent-encoded socket
# directory, with a port; a database name; an option's name, a plain value,
# a file name.
_CLEAN_SCHEME = re.compile(r"[\x00-\x20]*[A-Za-z][A-Za-z0-9+.-]*")
_CLEAN_HOST = re.compile(
    r"(\[[0-9A-Za-z:.%]*\]|[A-Za-z0-9._-]*|%2[Ff](?:[\w.~-]|%[0-9A-Fa-f]{2})*)(:[0-9]*)?"
)
_CLEAN_PATH = re.compile(r"(/(?:[\w.$~-]|%[0-9A-Fa-f]{2})*)?")
_CLEAN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CLEAN_VALUE = re.compile(r"[\w.-]*")
_CLEAN_FILE = re.compile(r"(?:[\w./+:,~-]|%[0-9A-Fa-f]{2})*")
# Parts of the names of secret options: an unknown option holding one is
# masked whole, its name too.
_SECRETISH = re.compile("pass|pwd|secret|key|token|cred", re.IGNORECASE)
#: Options whose values may be file names (host: a socket directory).
_FILE_OPTIONS: Final = frozenset({"host", "passfile", "sslcert", "sslkey", "sslrootcert", "sslcrl"})

# Every "key = value" pair of libpq's key/value form, overlapping ones too
# (so that a pair inside another's value is found); a value is a word or a
# single-quoted string with backslash escapes (unterminated: to the end).
_KEYWORD_PAIR = re.compile(
    r"(?<![A-Za-z0-9_])(?=([A-Za-z_][A-Za-z0-9_]*)\s*=\s*('(?:[^'\\]|\\.)*(?:'|\\?$)|\S*))"
)
# All of a libpq key/value string: pairs, and spaces around them.
_KEYWORD_DSN = re.compile(r"\s*(?:[A-Za-z_][A-Za-z0-9_]*\s*=\s*(?:'(?:[^'\\]|\\.)*'|[^\s']*)\s*)*")
# A secret option's name and "=" wherever they stand (glued to other text,
# in a damaged URL), and the value after them.
_SECRET_PAIR = re.compile(
    "(?=(" + "|".join(sorted(SECRET_OPTIONS)) + r")\s*=\s*([^\s&]*))", re.IGNORECASE
)


def mask_dsn(dsn: str, *, shown: Collection[str] = _SHOWN_OPTIONS) -> str:
    """Return ``dsn`` (a URL or libpq key/value string) with every secret replaced by ``***``.

    Never raises, whatever the text.

    Args:
        dsn: What to show.
        shown: Options whose values are shown (when of a plain shape); every other
            option's value is masked.
    """
    out: list[str] = []
    for text, secret in _pieces_of(dsn, shown):
        # Each mask once, however many secret pieces stand together.
        if not secret or (text == MASK and out[-1:] != [MASK]):
            out.append(text)
    return "".join(out)


def dsn_secrets(dsn: str, *, shown: Collection[str] = _SHOWN_OPTIONS) -> tuple[str, ...]:
    """The secret values in ``dsn``, longest first, in every form a message may quote them.

    What `scrub` blots out of text that may echo the DSN: what `mask_dsn`
    masks, but for a user name alone (no secret, and worth reading in a
    server's "role does not exist") and a fragment (which no driver reads).
    Also the pieces a reader may cut a masked text into (after each ``:`` or
    ``@`` of a userinfo; the name and value of an option masked whole), if
    longer than two characters; and each of them percent-decoded, unquoted
    and as ``repr()`` escapes it.
    """
    found: set[str] = set()
    pieces: set[str] = set()
    for text, secret in _pieces_of(dsn, shown, for_display=False):
        if secret and text != MASK:
            found.add(text)
            pieces.update(re.split(r"[:@]", text)[1:])
            pieces.update(text.partition(separator)[2] for separator in ":@")
            pieces.update(re.split(r"[=&]", text))
    found.update(piece for piece in pieces if len(piece) > 2)
    found.update(pair.group(2) for pair in _SECRET_PAIR.finditer(dsn))
    for value in list(found):
        decoded = {urllib.parse.unquote(value), urllib.parse.unquote_plus(value)}
        if value.startswith("'"):
            decoded.add(re.sub(r"\\(.)", r"\1", value[1:].removesuffix("'")))
        found.update(decoded)
        found.update(repr(text)[1:-1] for text in decoded)
    return tuple(sorted((secret for secret in found if secret), key=len, reverse=True))


def scrub(text: str, secrets: Iterable[str]) -> str:
    """Return ``text`` with every occurrence of each secret replaced by ``***``.

    Only for text that comes from elsewhere (a driver's message, a value
    quoted back): a very short secret blots out its letters wherever they
    appear.

    Args:
        text: Text that may echo a DSN (a driver's error message, say).
        secrets: From `dsn_secrets`, longest first, so that a secret holding
            another is blotted out whole.
    """
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def userinfo_is_ambiguous(url: str) -> bool:
    """Whether the ``@`` in ``url`` do not mark off one userinfo before its host.

    True when the authority (from ``://`` to the first ``/``, ``?`` or
    ``#``) holds several ``@``, or when one follows it: readers of URLs
    disagree about where such a userinfo ends (asyncpg cuts at the first
    ``@``, ``urllib`` at the last), and a password holding a ``/``, ``?``
    or ``#`` leaves a piece of itself in the path, query or fragment, where
    it may be quoted back. An ``@`` in the query (``?user=alice@example``)
    counts too: it cannot be told from a password holding a ``?``.
    """
    start = url.find("://")
    start = 0 if start < 0 else start + 3
    end = _part_end(url, start)
    return url.count("@", start, end) > 1 or "@" in url[end:]


def is_plain_path(path: str) -> bool:
    """Whether a URL's path is empty or one database name, its odd characters percent-encoded."""
    return bool(_CLEAN_PATH.fullmatch(path))


def _part_end(url: str, start: int, ends: str = "/?#") -> int:
    """Where the URL part starting at ``start`` ends: at the next of ``ends``."""
    return min((i for i in (url.find(c, start) for c in ends) if i >= 0), default=len(url))


def _pieces_of(
    dsn: str, shown: Collection[str], *, for_display: bool = True
) -> Iterator[tuple[str, bool]]:
    """``dsn`` in pieces, each with whether it is a secret.

    Each secret piece is followed by ``("***", True)``: the pieces that are
    no secret, joined with those, make the masked text. Unless
    ``for_display``, a userinfo that is only a user name and a fragment are
    left out.
    """
    # A URL starts with a scheme: here, anything without spaces, "=" or a
    # path's marks before the first ":". (URL parsers drop tabs and line
    # breaks; here they stay, and make the part holding them unclean.)
    scheme, colon, rest = dsn.partition(":")
    if not colon or re.search(r"[\s=/?#@'\"]", scheme.lstrip(_CONTROLS)):
        yield from _keyword_pieces(dsn, shown)
        return
    # Once a part is odd (damaged), the query may hold a secret in any
    # option, under any name: its values are all masked.
    odd = not _CLEAN_SCHEME.fullmatch(scheme)
    yield from _piece(scheme, odd)
    yield colon, False
    if rest.startswith("//"):
        yield "//", False
        rest = rest[2:]
        # The userinfo ends at the netloc's last "@"; with an "@" further on,
        # at that one (a password may hold "/", "?" or "#").
        at = rest.rfind("@")
        beyond = at >= _part_end(rest, 0)
        odd = odd or beyond
        # In a query or fragment, what follows the "@" may be a password's
        # tail (?password=a@b), not a host.
        tail = beyond and at > _part_end(rest, 0, "?#")
        if not beyond:
            at = rest.rfind("@", 0, _part_end(rest, 0))
        if at >= 0:
            userinfo, rest = rest[:at], rest[at + 1 :]
            # A user name alone is masked, but no secret to look for elsewhere.
            if for_display or re.search("[:@/?#]", userinfo):
                yield from _piece(userinfo, True)
            yield "@", False
        end = _part_end(rest, 0)
        hosts, rest = rest[:end], rest[end:]
        odd_hosts = tail or not all(_CLEAN_HOST.fullmatch(host) for host in hosts.split(","))
        odd = odd or odd_hosts
        yield from _piece(hosts, odd_hosts)
    end = _part_end(rest, 0, "?#")
    odd_path = not is_plain_path(rest[:end]) or bool(_SECRETISH.search(rest[:end]))
    odd = odd or odd_path
    yield from _piece(rest[:end], odd_path)
    query, hash_sign, fragment = rest[end:].partition("#")
    if query:
        yield "?", False
        yield from _query_pieces(query[1:], () if odd else shown)
    if hash_sign and for_display:
        yield hash_sign, False
        yield from _piece(fragment, bool(fragment))


def _piece(text: str, secret: bool) -> Iterator[tuple[str, bool]]:
    yield text, secret
    if secret:
        yield MASK, True


def _query_pieces(query: str, shown: Collection[str]) -> Iterator[tuple[str, bool]]:
    """The options of a query: shown, their values masked, or masked whole.

    After any option whose value is not shown (a secret, or a name not
    known), options up to the next known one are masked whole, names too:
    they may be the rest of a password holding an unencoded ``&``. So is an
    unknown option named like a secret (a misspelt ``password=`` may have
    lost its ``=`` and swallowed its value). The value of that next known
    option is masked too: it may have swallowed what followed a damaged
    secret option's name.
    """
    after_secret = False
    for index, option in enumerate(query.split("&")):
        if index:
            yield "&", False
        name, equals, value = option.partition("=")
        known = urllib.parse.unquote_plus(name)
        if known in shown:
            clean = _CLEAN_FILE if known in _FILE_OPTIONS else _CLEAN_VALUE
            masked = after_secret or not clean.fullmatch(value)
            after_secret = False
            yield name + equals, False
            yield from _piece(value, masked and bool(value))
        elif (
            after_secret or not equals or not _CLEAN_NAME.fullmatch(name) or _SECRETISH.search(name)
        ):
            after_secret = True
            yield from _piece(option, bool(option))
        else:
            after_secret = True
            yield name + equals, False
            yield from _piece(value, bool(value))


def _keyword_pieces(dsn: str, shown: Collection[str]) -> Iterator[tuple[str, bool]]:
    """libpq's ``key=value`` form, with the values of secret and unknown keys masked.

    Text that is not in that form either is masked whole.
    """
    if not _KEYWORD_DSN.fullmatch(dsn):
        yield from _piece(dsn, bool(dsn))
        return
    spans = [
        pair.span(2)
        for pair in _KEYWORD_PAIR.finditer(dsn)
        if pair.group(2) and pair.group(1).lower() not in shown
    ]
    spans += [pair.span(2) for pair in _SECRET_PAIR.finditer(dsn) if pair.group(2)]
    position = 0
    for start, end in _merged(spans):
        yield dsn[position:start], False
        yield from _piece(dsn[start:end], True)
        position = end
    yield dsn[position:], False


def _merged(spans: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """Overlapping or touching spans joined, in order."""
    current: tuple[int, int] | None = None
    for start, end in sorted(spans):
        if current is not None and start <= current[1]:
            current = (current[0], max(current[1], end))
            continue
        if current is not None:
            yield current
        current = (start, end)
    if current is not None:
        yield current
