"""Leases: which flow owns a consumer for now, as its store says.

A lease is a row in the store per *key* (a consumer's name): the flow that
holds it (its ``holder`` id), until when (``expires_at``, by the store's
clock) and its fencing ``token``. The token grows every time the lease passes
to another holder or is taken again after it lapsed, and every write an owner
makes for that key carries it: the store refuses a write whose token is no
longer the key's, so an owner that was paused or cut off past its lease can
never move a cursor once another flow has taken over.
"""

from __future__ import annotations

import datetime
import os
import secrets
import socket

import attrs


@attrs.frozen(kw_only=True, slots=True)
class Lease:
    """A consumer's lease as the store last said.

    Attributes:
        key: What it is a lease on: a consumer's name.
        holder: The flow holding it (``host:pid:random``, `new_holder_id`).
        token: Its fencing token: grows every time the lease passes to another
            holder or is taken again after it lapsed; never repeats for a key.
        expires_at: When it lapses unless renewed, by the store's clock (aware UTC).
    """

    key: str
    holder: str
    token: int
    expires_at: datetime.datetime


def new_holder_id() -> str:
    """A flow's holder id: its host and process, and a random part of its own."""
    host = socket.gethostname().split(".")[0][:64] or "host"
    return f"{host}:{os.getpid()}:{secrets.token_hex(4)}"
