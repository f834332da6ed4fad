"""The `trioflow` command end to end on PostgreSQL, in processes of its own.

The scenarios are those of ``tests/test_cli_processes.py`` (SQLite), from
``tests/_cli.py``.
"""

from __future__ import annotations

from pathlib import Path

from tests._cli import (
    check_prune_keeps_what_cursors_need,
    check_run_status_reset_and_stop,
    check_tail_follows,
    cli,
    one_error_line,
)


async def test_run_status_reset_and_graceful_stop(store_url: str, tmp_path: Path) -> None:
    await check_run_status_reset_and_stop(store_url, tmp_path)


async def test_tail_follows_new_events(store_url: str, tmp_path: Path) -> None:
    await check_tail_follows(store_url, tmp_path)


async def test_a_schema_never_created_is_not_created_by_looking_at_it(store_url: str) -> None:
    looked = await cli("status", "--store", store_url)
    assert looked.returncode == 3
    one_error_line(looked, "holds no trioflow store")
    pending = await cli("migrate", "--check", "--store", store_url)
    assert pending.returncode == 5, pending
    assert "schema version none: a migration to version" in pending.stdout
    migrated = await cli("migrate", "--store", store_url)
    assert migrated.returncode == 0, migrated
    assert "schema version none -> " in migrated.stdout
    assert (await cli("migrate", "--check", "--store", store_url)).returncode == 0


async def test_prune_keeps_what_cursors_need(store_url: str) -> None:
    await check_prune_keeps_what_cursors_need(store_url)
