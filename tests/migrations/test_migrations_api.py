"""``llmstore.migrations``: the CLI's migration commands for a host's own start-up code."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from llmstore import (
    ConfigError,
    LlmstoreError,
    MigrationError,
    Store,
    StoreConfig,
    ValidationError,
    migrations,
)
from llmstore._db.schema import VERSION_TABLE, metadata
from llmstore.migrations._commands import head_revision
from tests.helpers import async_url

FIRST = "0001_projects"


@pytest.fixture
async def host_engine(
    db_config: StoreConfig, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[AsyncEngine]:
    """The host's own engine (pooled, as a host has it) on the test's database."""
    if db_config.schema_name is not None:  # an engine carries no schema: the environment's
        monkeypatch.setenv("DATABASE_SCHEMA", db_config.schema_name)
    engine = create_async_engine(
        async_url(db_config.url.get_secret_value()), pool_size=1, max_overflow=0
    )
    yield engine
    await engine.dispose()


async def _settings(engine: AsyncEngine) -> tuple[Any, ...]:
    async with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            return ((await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar(),)
        search_path = (await conn.exec_driver_sql("SHOW search_path")).scalar()
        timeout = (await conn.exec_driver_sql("SHOW lock_timeout")).scalar()
        return search_path, timeout


@pytest.mark.parametrize("kind", ["url", "config"])
async def test_every_command_on_a_url_or_a_config(
    db_config: StoreConfig, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    target: str | StoreConfig = db_config
    if kind == "url":  # the rest of the configuration from the environment
        target = db_config.url.get_secret_value()
        if db_config.schema_name is not None:
            monkeypatch.setenv("DATABASE_SCHEMA", db_config.schema_name)
        if db_config.backup_dir is not None:
            monkeypatch.setenv("LLMSTORE_BACKUP_DIR", db_config.backup_dir)
    assert await migrations.current(target) is None
    done = await migrations.upgrade(target, FIRST)
    assert (done.before, done.after) == (None, FIRST)
    assert done.backup is None and done.backup_skipped == "the database is empty"

    upgraded = await migrations.upgrade(target)
    assert (upgraded.before, upgraded.after) == (FIRST, head_revision())
    assert upgraded.backup is not None and upgraded.backup.is_file()
    assert await migrations.current(target) == head_revision()
    assert await migrations.check(target) == []

    again = await migrations.upgrade(target)
    assert (again.before, again.after, again.backup_skipped) == (
        head_revision(),
        head_revision(),
        "nothing to do",
    )
    down = await migrations.downgrade(target, "base", backup=False)
    assert (down.before, down.after, down.backup) == (head_revision(), None, None)
    assert await migrations.current(target) is None


async def test_a_host_engine_is_lent_not_disposed_and_keeps_its_settings(
    host_engine: AsyncEngine, db_config: StoreConfig
) -> None:
    before = await _settings(host_engine)
    done = await migrations.upgrade(host_engine, backup=False)
    assert done.after == head_revision()
    assert await migrations.current(host_engine) == head_revision()
    assert await migrations.check(host_engine) == []
    assert await _settings(host_engine) == before
    # The same pool: the store opened on the host's engine finds the schema at head.
    async with Store(db_config, engine=host_engine) as store:
        assert (await store.projects.create("lent")).name == "lent"
    before = await _settings(host_engine)  # a store turns SQLite's foreign keys on
    await migrations.downgrade(host_engine, FIRST, backup=False)
    assert await migrations.current(host_engine) == FIRST
    assert await _settings(host_engine) == before


async def test_check_reports_drift_in_llmstores_objects_only(
    host_engine: AsyncEngine, db_config: StoreConfig
) -> None:
    await migrations.upgrade(host_engine, backup=False)
    schema = db_config.schema_name
    prefix = "" if schema is None else f'"{schema}".'
    async with host_engine.begin() as conn:
        await conn.exec_driver_sql(f"CREATE TABLE {prefix}my_app_users (id INTEGER PRIMARY KEY)")
        await conn.exec_driver_sql(f"CREATE INDEX my_app_users_id ON {prefix}my_app_users (id)")
    assert await migrations.check(host_engine) == []
    async with host_engine.begin() as conn:
        await conn.exec_driver_sql(f"DROP INDEX {prefix}llmstore_usage_logs_model_created_at_idx")
    drift = await migrations.check(host_engine)
    assert drift == ["add_index: llmstore_usage_logs_model_created_at_idx"], drift


async def test_a_mistyped_revision_is_refused_before_any_backup(
    db_config: StoreConfig, tmp_path: Path
) -> None:
    await migrations.upgrade(db_config, FIRST)
    backups = sorted(tmp_path.rglob("*.backup"))
    with pytest.raises(MigrationError, match="unknown revision '0002_typo'"):
        await migrations.upgrade(db_config, "0002_typo")
    with pytest.raises(MigrationError, match="unknown revision"):
        await migrations.downgrade(db_config, "nope")
    assert sorted(tmp_path.rglob("*.backup")) == backups
    assert await migrations.current(db_config) == FIRST


@pytest.mark.parametrize(
    "target", [None, 42, b"sqlite://", object(), sa.create_engine("sqlite://")]
)
async def test_a_target_that_is_not_a_url_config_or_async_engine(target: object) -> None:
    with pytest.raises(ConfigError, match="a migration target is"):
        await migrations.upgrade(target)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        await migrations.current(target)  # type: ignore[arg-type]


@pytest.mark.parametrize("revision", [None, 5, "", "x" * 201])
async def test_bad_arguments_are_llmstore_errors(db_config: StoreConfig, revision: object) -> None:
    with pytest.raises(ValidationError):
        await migrations.upgrade(db_config, revision)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="backup must be True or False"):
        await migrations.upgrade(db_config, backup="yes")  # type: ignore[arg-type]
    with pytest.raises(LlmstoreError):
        await migrations.upgrade("mysql://nobody@localhost/db")
    assert await migrations.current(db_config) is None


def test_include_object_hides_llmstores_objects_from_the_host() -> None:
    projects = metadata.tables["llmstore_projects"]
    index = next(iter(metadata.tables["llmstore_usage_logs"].indexes))
    host = sa.Table("users", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True))
    verdicts = {
        ("table", "llmstore_projects"): migrations.include_object(
            projects, "llmstore_projects", "table", False, None
        ),
        ("table", VERSION_TABLE): migrations.include_object(
            None, VERSION_TABLE, "table", True, None
        ),
        ("index", index.name): migrations.include_object(index, index.name, "index", False, None),
        ("column", "name"): migrations.include_object(
            projects.c.name, "name", "column", False, None
        ),
        ("table", "users"): migrations.include_object(host, "users", "table", False, None),
        ("column", "id"): migrations.include_object(host.c.id, "id", "column", False, None),
        ("table", "alembic_version"): migrations.include_object(
            None, "alembic_version", "table", True, None
        ),
    }
    assert verdicts == {
        ("table", "llmstore_projects"): False,
        ("table", VERSION_TABLE): False,
        ("index", index.name): False,
        ("column", "name"): False,
        ("table", "users"): True,
        ("column", "id"): True,
        ("table", "alembic_version"): True,
    }


async def _all_rows(config: StoreConfig) -> dict[str, list[tuple[Any, ...]]]:
    engine = create_async_engine(async_url(config.url.get_secret_value()))
    try:
        async with engine.connect() as conn:
            if config.schema_name is not None:
                await conn.exec_driver_sql(f'SET search_path TO "{config.schema_name}"')
            rows = {}
            for table in metadata.sorted_tables:
                result = await conn.execute(sa.select(table))
                rows[table.name] = sorted(tuple(row) for row in result)
            return rows
    finally:
        await engine.dispose()


async def test_a_database_made_from_the_models_holds_what_the_revisions_leave(
    db_config: StoreConfig, tmp_path: Path
) -> None:
    # Through the revisions: to the last one before head from empty, then the rest.
    await migrations.upgrade(db_config, "0004_usage_logs_receipts", backup=False)
    await migrations.upgrade(db_config, backup=False)
    through_revisions = await _all_rows(db_config)
    await migrations.downgrade(db_config, "base", backup=False)
    made = await migrations.upgrade(db_config, backup=False)  # empty to head: the models
    assert made.before is None
    assert await _all_rows(db_config) == through_revisions
    assert through_revisions["llmstore_audit_chain"]  # the genesis row, both ways
    assert await migrations.check(db_config) == []
