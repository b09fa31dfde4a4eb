"""Fixtures for llmstore's own tests: every store test runs on SQLite (file and memory)
and on Postgres (a fresh schema per test)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from llmstore import Store, StoreConfig, generate_key
from llmstore.pytest_plugin import drop_schema, fresh_schema_name
from tests.head_schemas import postgres_schema_at_head, sqlite_file_at_head
from tests.helpers import require_postgres

DRIVERS = ["sqlite-file", "sqlite-memory", "postgres"]
DATABASE_DRIVERS = ["sqlite-file", "postgres"]


@pytest.fixture(autouse=True)
def _backups_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Postgres backups default to ./backups: never the checkout's.
    monkeypatch.setenv("LLMSTORE_BACKUP_DIR", str(tmp_path / "pg-backups"))


def _param(name: str) -> object:
    return pytest.param(name, marks=pytest.mark.postgres) if name == "postgres" else name


@pytest.fixture(params=[_param(name) for name in DATABASE_DRIVERS])
async def db_config(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreConfig]:
    """A config for an empty, never-migrated database: a new SQLite file or Postgres schema."""
    key = generate_key()
    if request.param == "postgres":
        url = require_postgres()
        schema = fresh_schema_name()
        # from_url reads no LLMSTORE_BACKUP_DIR: backups go to tmp_path, not ./backups.
        backups = str(tmp_path / "pg-backups")
        yield StoreConfig.from_url(url, schema_name=schema, encryption_keys=key, backup_dir=backups)
        await drop_schema(url, schema)
    else:
        yield StoreConfig.from_url(f"sqlite:///{tmp_path / 'llmstore.db'}", encryption_keys=key)


@pytest.fixture
def schema_env(db_config: StoreConfig, monkeypatch: pytest.MonkeyPatch) -> StoreConfig:
    """``db_config``, with its Postgres schema (if any) in ``DATABASE_SCHEMA``, as the
    command line reads it."""
    if db_config.schema_name:
        monkeypatch.setenv("DATABASE_SCHEMA", db_config.schema_name)
    return db_config


@pytest.fixture(params=[_param(name) for name in DRIVERS])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An open store at the head schema, with an encryption key (made from a template:
    ``tests/head_schemas.py``)."""
    key = generate_key()
    if request.param == "sqlite-memory":
        async with Store.from_url("sqlite:///:memory:", encryption_keys=key) as memory:
            yield memory
        return
    if request.param == "postgres":
        url = require_postgres()
        schema = fresh_schema_name()
        await postgres_schema_at_head(url, schema)
        async with Store.from_url(url, schema_name=schema, encryption_keys=key) as pg:
            yield pg
        await drop_schema(url, schema)
        return
    path = tmp_path / "llmstore.db"
    await sqlite_file_at_head(path)
    async with Store.from_url(f"sqlite:///{path}", encryption_keys=key) as db:
        yield db
