"""Migrations on both drivers: one head, base to head and back, models match the DDL."""

from __future__ import annotations

import importlib.util

import pytest
import sqlalchemy as sa
from alembic import command

from llmstore import MigrationError, Store, StoreConfig
from llmstore._db.schema import VERSION_TABLE, metadata
from llmstore.migrations._commands import (
    alembic_config,
    check,
    current,
    downgrade,
    head_revision,
    scripts,
    upgrade,
    with_migration_connection,
)


def test_single_head() -> None:
    assert len(scripts().get_heads()) == 1
    assert head_revision() == scripts().get_heads()[0]


def test_every_revision_can_go_down() -> None:
    for script in scripts().walk_revisions():
        spec = importlib.util.spec_from_file_location("revision", script.path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert callable(module.upgrade), script.revision
        assert callable(module.downgrade), script.revision


async def _tables(config: StoreConfig) -> set[str]:
    return await with_migration_connection(
        config,
        lambda conn: set(sa.inspect(conn).get_table_names(schema=config.schema_name)),
        write=False,
    )


async def test_upgrade_from_empty_to_head_matches_the_models(db_config: StoreConfig) -> None:
    assert await current(db_config) is None
    before, after = await upgrade(db_config)
    assert (before, after) == (None, head_revision())
    assert await current(db_config) == head_revision()
    assert await check(db_config) == []
    assert await _tables(db_config) == set(metadata.tables) | {VERSION_TABLE}


async def test_upgrade_twice_is_a_no_op(db_config: StoreConfig) -> None:
    await upgrade(db_config)
    assert await upgrade(db_config) == (head_revision(), head_revision())


async def test_head_to_base_and_back(db_config: StoreConfig) -> None:
    await upgrade(db_config)
    async with Store(db_config) as store:
        await store.projects.create("survives?")
    assert await downgrade(db_config, "base") == (head_revision(), None)
    assert await _tables(db_config) <= {VERSION_TABLE}
    assert await current(db_config) is None
    await upgrade(db_config)
    assert await check(db_config) == []
    async with Store(db_config) as store:
        assert await store.projects.list() == []


async def test_check_reports_drift(db_config: StoreConfig) -> None:
    await upgrade(db_config)
    ddl = f"ALTER TABLE {_qualified(db_config)} ADD COLUMN stray INTEGER"
    await with_migration_connection(db_config, lambda conn: conn.exec_driver_sql(ddl))
    diffs = await check(db_config)
    assert len(diffs) == 1
    assert "remove_column" in diffs[0].description


def _qualified(config: StoreConfig) -> str:
    name = metadata.tables["llmstore_projects"].name
    return f'"{config.schema_name}".{name}' if config.schema_name else name


async def test_unknown_target_revision_is_a_migration_error(db_config: StoreConfig) -> None:
    with pytest.raises(MigrationError):
        await upgrade(db_config, "does_not_exist")
    assert await current(db_config) is None


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///offline.db", "CREATE TABLE llmstore_projects"),
        ("postgresql://u@h/db", "CREATE TABLE llmstore_projects"),
    ],
)
def test_offline_sql(url: str, expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = StoreConfig.from_url(url)
    command.upgrade(alembic_config(url=config.url.get_secret_value()), "head", sql=True)
    output = capsys.readouterr().out
    assert expected in output
    assert head_revision() in output
