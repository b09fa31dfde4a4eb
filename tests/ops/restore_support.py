"""What the restore tests (``test_restore_*.py``) share: restoring and backing up off the
event loop, a seeded database with its snapshot and backup, the backups taken, SQL through
the migration connection, changes made after a backup, and llmstore's own rows."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Connection

from llmstore import Store, StoreConfig
from llmstore._db.schema import VERSION_TABLE, metadata
from llmstore._ops import restore as _restore
from llmstore._ops.backup import backup_database, backup_prefix
from llmstore._ops.restore import restore_database
from llmstore.migrations import _commands as _migrations
from llmstore.migrations._commands import upgrade
from tests.snapshots import Snapshot, seed, snapshot


async def _restore_file(config: StoreConfig, path: Path, **options: Any) -> _restore.Restored:
    return await asyncio.to_thread(restore_database, config, path, **options)


async def _backup_to(config: StoreConfig, path: Path) -> Path:
    return (await asyncio.to_thread(backup_database, config, path)).path


async def _seeded_backup(config: StoreConfig, tmp_path: Path) -> tuple[Snapshot, Path]:
    """A migrated database with a row in every table, its snapshot, and a backup of it."""
    await upgrade(config)
    await seed(config)
    saved = await snapshot(config)
    return saved, await _backup_to(config, tmp_path / "saved.backup")


def _backups_taken(config: StoreConfig) -> list[Path]:
    folder, _ = backup_prefix(config)
    return sorted(folder.glob("*.backup")) if folder.is_dir() else []


async def _execute(config: StoreConfig, *statements: str) -> None:
    schema = config.schema_name

    def run(conn: Connection) -> None:
        if schema is not None:
            conn.exec_driver_sql(f'SET LOCAL search_path TO "{schema}"')
        for statement in statements:
            conn.exec_driver_sql(statement)

    await _migrations.with_migration_connection(config, run)


async def _change_rows(config: StoreConfig) -> None:
    """An insert, an update and a delete, through the store."""
    async with Store(config) as store:
        seeded = await store.projects.get_by_name("seeded")
        await store.projects.create("added after the backup")
        await store.projects.update(seeded.id, name="renamed after the backup")
        for token in await store.tokens.list(seeded.id):
            await store.tokens.delete(token.id)


async def _own_rows(config: StoreConfig) -> Snapshot:
    return {name: rows for name, rows in (await snapshot(config)).items() if name in OWN}


OWN = {*metadata.tables, VERSION_TABLE}
