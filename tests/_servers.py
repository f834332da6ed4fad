"""What a test does when a server it needs (PostgreSQL, Redis, NATS) is missing."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def server_missing(message: str) -> NoReturn:
    """Skip the calling test with ``message``, or fail it when $CI is ``true``.

    On a developer's machine a missing server is a fact of that machine; in CI
    it is a broken set-up, and a skip there would hide every test that needs it.
    """
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true, so this fails instead of skipping)")
    pytest.skip(message)
