"""Restoring Postgres backups into a schema: an archive of another schema is refused, a
restore that fails inside psql or is interrupted halfway changes nothing, and the schema
keeps its grants and what depends on it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Connection

from llmstore import BackupError, StoreConfig, generate_key
from llmstore._ops import restore as _restore
from llmstore.migrations import _commands as _migrations
from llmstore.migrations._commands import upgrade
from llmstore.pytest_plugin import drop_schema, fresh_schema_name
from tests.helpers import require_postgres
from tests.ops.restore_support import (
    _backup_to,
    _backups_taken,
    _change_rows,
    _execute,
    _restore_file,
    _seeded_backup,
)
from tests.snapshots import seed, snapshot


@pytest.fixture
async def pg_config(tmp_path: Path) -> AsyncIterator[StoreConfig]:
    url = require_postgres()
    schema = fresh_schema_name()
    yield StoreConfig.from_url(
        url, schema_name=schema, encryption_keys=generate_key(), backup_dir=str(tmp_path / "d")
    )
    await drop_schema(url, schema)


# --- Postgres --------------------------------------------------------------------------------


@pytest.mark.postgres
async def test_postgres_refuses_an_archive_of_another_schema(
    pg_config: StoreConfig, tmp_path: Path
) -> None:
    await upgrade(pg_config)
    other = pg_config.model_copy(update={"schema_name": fresh_schema_name()})
    try:
        await upgrade(other)
        archive = await _backup_to(other, tmp_path / "other.backup")
        with pytest.raises(BackupError, match="would write elsewhere"):
            await _restore_file(pg_config, archive)
    finally:
        await drop_schema(require_postgres(), other.schema_name or "")
    assert _backups_taken(pg_config) == []


@pytest.mark.postgres
async def test_a_postgres_restore_failing_inside_psql_rolls_everything_back(
    pg_config: StoreConfig, tmp_path: Path
) -> None:
    await upgrade(pg_config)
    await seed(pg_config)
    # The archive needs a type from another schema, which is gone when it is restored:
    # psql fails after llmstore's tables were dropped and most of them loaded again.
    elsewhere = fresh_schema_name()
    await _execute(
        pg_config,
        f'CREATE SCHEMA "{elsewhere}"',
        f"CREATE TYPE \"{elsewhere}\".mood AS ENUM ('fine')",
        f'CREATE TABLE zz_extra (mood "{elsewhere}".mood)',
    )
    archive = await _backup_to(pg_config, tmp_path / "needs-a-type.backup")
    await _execute(pg_config, "DROP TABLE zz_extra", f'DROP SCHEMA "{elsewhere}" CASCADE')
    await _change_rows(pg_config)
    before = await snapshot(pg_config)
    with pytest.raises(
        BackupError, match=r"psql failed: .*does not exist.*\(the backup taken first: "
    ):
        await _restore_file(pg_config, archive)
    assert await snapshot(pg_config) == before
    assert len(_backups_taken(pg_config)) == 1


class _Interrupted(Exception):
    pass


@pytest.mark.postgres
async def test_a_postgres_restore_interrupted_halfway_changes_nothing(
    pg_config: StoreConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved, archive = await _seeded_backup(pg_config, tmp_path)
    await _change_rows(pg_config)
    before = await snapshot(pg_config)
    monkeypatch.setattr(_restore, "_CHUNK", 256)

    def stop_halfway(stage: str, done: int, total: int | None) -> None:
        if stage == "restoring" and total and done > total // 2:
            raise _Interrupted  # as if llmstore died with psql's transaction open

    with pytest.raises(_Interrupted):
        await _restore_file(pg_config, archive, progress=stop_halfway)
    assert await snapshot(pg_config) == before
    # Nothing was left holding a lock: the same restore then goes through.
    await _restore_file(pg_config, archive)
    assert await snapshot(pg_config) == saved


@pytest.mark.postgres
async def test_a_postgres_restore_keeps_the_schema_its_grants_and_what_depends_on_it(
    pg_config: StoreConfig, tmp_path: Path
) -> None:
    schema = pg_config.schema_name
    await upgrade(pg_config)
    await seed(pg_config)
    archive = await _backup_to(pg_config, tmp_path / "saved.backup")
    role, elsewhere = fresh_schema_name(), fresh_schema_name()
    await _execute(
        pg_config, f'CREATE ROLE "{role}" NOLOGIN', f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"'
    )

    def usage_granted(conn: Connection) -> bool:
        query = f"SELECT has_schema_privilege('{role}', '{schema}', 'USAGE')"
        return bool(conn.exec_driver_sql(query).scalar())

    try:
        await _restore_file(pg_config, archive)
        assert await _migrations.with_migration_connection(pg_config, usage_granted, write=False)

        # A view of the proxy's own, in another schema, on llmstore's table: the restore
        # refuses rather than drop it, and changes nothing.
        await _execute(
            pg_config,
            f'CREATE SCHEMA "{elsewhere}"',
            f'CREATE VIEW "{elsewhere}".names AS SELECT name FROM "{schema}".llmstore_projects',
        )
        before = await snapshot(pg_config)
        with pytest.raises(BackupError, match="depend"):
            await _restore_file(pg_config, archive)
        assert await snapshot(pg_config) == before
        await _execute(pg_config, f'SELECT count(*) FROM "{elsewhere}".names')
    finally:
        await _execute(
            pg_config,
            f'DROP SCHEMA IF EXISTS "{elsewhere}" CASCADE',
            f'DROP OWNED BY "{role}"',
            f'DROP ROLE "{role}"',
        )
