"""Storage backends, and the URL scheme that chooses one.

``memory://`` keeps everything in this process (tests, examples).
``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` is the
embedded default: one file, no server, shared safely by processes on one
machine. ``postgresql://user@host:5432/db`` is for production and for
processes on many machines.
"""

from __future__ import annotations

from .._events import NewEvent
from ._base import Appended, CursorInfo, LogBounds, SchemaStatus, Store, StoreWrapper
from ._transactions import ParamStyle, Row, StoreTransaction
from ._url import store_from_url

__all__ = [
    "Appended",
    "CursorInfo",
    "LogBounds",
    "NewEvent",
    "ParamStyle",
    "Row",
    "SchemaStatus",
    "Store",
    "StoreTransaction",
    "StoreWrapper",
    "store_from_url",
]
