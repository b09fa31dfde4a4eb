"""Restoring SQLite backups: into a new file and under an open store, from another page
size, refusing memory, the database itself and an unmigrated file; triggers on llmstore's
tables kept and a host's dangling references ignored."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from llmstore import BackupError, Store, StoreConfig, generate_key
from llmstore._ops.restore import restore_database
from llmstore.migrations._commands import head_revision, upgrade
from tests.ops.restore_support import (
    _backup_to,
    _backups_taken,
    _change_rows,
    _execute,
    _own_rows,
    _restore_file,
    _seeded_backup,
)
from tests.snapshots import seed, snapshot

# --- SQLite ----------------------------------------------------------------------------------


@pytest.fixture
def sqlite_config(tmp_path: Path) -> StoreConfig:
    return StoreConfig.from_url(
        f"sqlite:///{tmp_path / 'live' / 'proxy.db'}", encryption_keys=generate_key()
    )


async def test_sqlite_restore_into_a_new_file_and_under_an_open_store(
    sqlite_config: StoreConfig, tmp_path: Path
) -> None:
    saved, archive = await _seeded_backup(sqlite_config, tmp_path)

    # Into a file that does not exist yet: nothing to back up.
    elsewhere = sqlite_config.model_copy(
        update={"url": StoreConfig.from_url(f"sqlite:///{tmp_path / 'new' / 'x.db'}").url}
    )
    done = await _restore_file(elsewhere, archive)
    assert done.backup is None and done.revision == head_revision()
    assert await snapshot(elsewhere) == saved
    assert _journal_mode(elsewhere) == "wal"

    # Under an open store: it sees the restored rows, and goes on writing.
    async with Store(sqlite_config) as store:
        await store.projects.create("made while open")
        assert len(await store.projects.list()) == 2
        done = await _restore_file(sqlite_config, archive)
        assert [p.name for p in await store.projects.list()] == ["seeded"]
        await store.projects.create("made after the restore")
        assert len(await store.projects.list()) == 2
    assert done.backup is not None
    assert _journal_mode(sqlite_config) == "wal"
    copy = sqlite3.connect(done.backup.path)
    try:
        names = {row[0] for row in copy.execute("SELECT name FROM llmstore_projects")}
    finally:
        copy.close()
    assert names == {"seeded", "made while open"}


async def test_sqlite_restore_of_another_page_size_keeps_the_live_one(
    sqlite_config: StoreConfig, tmp_path: Path
) -> None:
    saved, archive = await _seeded_backup(sqlite_config, tmp_path)
    conn = sqlite3.connect(archive, isolation_level=None)
    try:
        conn.execute("PRAGMA page_size = 8192")
        conn.execute("VACUUM")
        assert conn.execute("PRAGMA page_size").fetchone() == (8192,)
    finally:
        conn.close()
    await _change_rows(sqlite_config)
    await _restore_file(sqlite_config, archive)
    assert await snapshot(sqlite_config) == saved
    live = sqlite3.connect(sqlite_config.sqlite_path or "")
    try:
        assert live.execute("PRAGMA page_size").fetchone() == (4096,)
        assert live.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        live.close()


async def test_sqlite_refuses_memory_itself_and_an_unmigrated_file(
    sqlite_config: StoreConfig, tmp_path: Path
) -> None:
    await upgrade(sqlite_config)
    archive = await _backup_to(sqlite_config, tmp_path / "saved.backup")
    with pytest.raises(BackupError, match="in-memory database cannot be restored into"):
        restore_database(StoreConfig.from_url("sqlite:///:memory:"), archive)
    with pytest.raises(BackupError, match="is the database itself"):
        await _restore_file(sqlite_config, Path(sqlite_config.sqlite_path or ""))
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.close()
    with pytest.raises(BackupError, match="holds no llmstore schema revision"):
        await _restore_file(sqlite_config, other)
    assert _backups_taken(sqlite_config) == []


def _journal_mode(config: StoreConfig) -> str:
    conn = sqlite3.connect(config.sqlite_path or "")
    try:
        return str(conn.execute("PRAGMA journal_mode").fetchone()[0])
    finally:
        conn.close()


async def test_sqlite_restore_keeps_triggers_on_llmstores_tables_and_ignores_a_hosts_orphans(
    sqlite_config: StoreConfig, tmp_path: Path
) -> None:
    await upgrade(sqlite_config)
    await _execute(
        sqlite_config,
        "CREATE TABLE project_log (name TEXT)",
        "CREATE TRIGGER log_project AFTER INSERT ON llmstore_projects BEGIN "
        "INSERT INTO project_log VALUES (NEW.name); END",
        # The host's own dangling reference, with foreign keys off as SQLite's default.
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, user_id INTEGER REFERENCES users (id))",
        "INSERT INTO orders VALUES (1, 99)",
    )
    await seed(sqlite_config)
    saved = await _own_rows(sqlite_config)
    archive = await _backup_to(sqlite_config, tmp_path / "saved.backup")
    await _change_rows(sqlite_config)
    await _restore_file(sqlite_config, archive)
    assert await _own_rows(sqlite_config) == saved
    async with Store(sqlite_config) as store:
        await store.projects.create("logged by the trigger")
    logged = await snapshot(sqlite_config)
    assert ("logged by the trigger",) in logged["project_log"]
    assert logged["orders"] == [("1", "99")]
