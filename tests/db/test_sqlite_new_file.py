"""A new SQLite file that another connection holds locked while llmstore opens it.

A new file is in rollback-journal mode until someone switches it to WAL; while another
connection holds its write lock, SQLite refuses the switch at once ("database is locked")
without calling the busy handler. llmstore waits for the lock as it does for any other
(up to the busy timeout) instead of failing, as replicas that start together on a new
file used to, now and then.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from llmstore import DatabaseUnavailableError, Store


def _hold_write_lock(path: Path) -> sqlite3.Connection:
    other = sqlite3.connect(path, isolation_level=None, timeout=0, check_same_thread=False)
    other.execute("CREATE TABLE host_thing (x INTEGER)")
    other.execute("BEGIN IMMEDIATE")  # still rollback-journal mode: the switch must wait
    return other


async def test_a_new_file_locked_by_another_connection_is_opened_once_it_is_free(
    tmp_path: Path,
) -> None:
    path = tmp_path / "new.db"
    other = _hold_write_lock(path)
    release = threading.Timer(0.3, other.execute, ("COMMIT",))
    release.start()
    started = time.monotonic()
    try:
        async with Store.from_url(f"sqlite:///{path}", auto_upgrade=True) as store:
            project = await store.projects.create("after the lock")
            assert (await store.projects.get(project.id)).name == "after the lock"
    finally:
        release.join()
        other.close()
    assert time.monotonic() - started >= 0.3  # it waited for the lock, it did not skip it
    with sqlite3.connect(path) as check:
        assert check.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_a_new_file_locked_past_the_busy_timeout_is_reported_as_unavailable(
    tmp_path: Path,
) -> None:
    path = tmp_path / "new.db"
    other = _hold_write_lock(path)
    try:
        store = Store.from_url(f"sqlite:///{path}", auto_upgrade=True, busy_timeout=0.2)
        with pytest.raises(DatabaseUnavailableError, match="locked"):
            await store.open()
    finally:
        other.close()
