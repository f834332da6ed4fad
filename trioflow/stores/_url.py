"""Choosing a store from a URL."""

from __future__ import annotations

import os
import urllib.parse

from .._errors import UnknownStoreError
from ._base import Store

#: The store used when an App names none and $TRIOFLOW_STORE is unset.
DEFAULT_STORE_URL = "sqlite:///trioflow.db"

_SCHEMES = "memory://, sqlite:///relative.db, sqlite:////absolute.db, postgresql://user@host/db"


def default_store_url() -> str:
    """Return $TRIOFLOW_STORE if set and non-empty, else `DEFAULT_STORE_URL`."""
    return os.environ.get("TRIOFLOW_STORE") or DEFAULT_STORE_URL


def store_from_url(url: str) -> Store:
    """Build (but do not open) the store a URL names.

    Raises:
        UnknownStoreError: The URL's scheme or form is not one trioflow knows.
    """
    if not isinstance(url, str):
        raise UnknownStoreError(f"a store URL must be a str, got {url!r}; use one of {_SCHEMES}")
    try:
        scheme = urllib.parse.urlsplit(url).scheme.lower()
    except ValueError:
        # An unbalanced "[" in the host, say. The URL may hold a password:
        # name only its scheme.
        scheme = url.partition(":")[0].lower()
        if scheme not in ("postgresql", "postgres"):
            raise UnknownStoreError(
                f"store URL {url!r} is malformed (an unbalanced '[' or ']'?); use one of {_SCHEMES}"
            ) from None
    if scheme == "memory":
        from .memory import MemoryStore

        if url.rstrip("/") != "memory:":
            raise UnknownStoreError(
                f"store URL {url!r}: a memory store takes no path; use memory://"
            )
        return MemoryStore()
    if scheme == "sqlite":
        from .sqlite import SQLiteStore

        return SQLiteStore.from_url(url)
    if scheme in ("postgresql", "postgres"):
        try:
            from .postgres import PostgresStore  # type: ignore[import-not-found, unused-ignore]
        except ImportError:
            raise UnknownStoreError(
                f"store URL {url!r}: the PostgreSQL store is not available in this version "
                "of trioflow; use a sqlite:/// or memory:// store"
            ) from None
        store: Store = PostgresStore.from_url(url)
        return store
    raise UnknownStoreError(f"unknown store URL {url!r}; use one of {_SCHEMES}")
