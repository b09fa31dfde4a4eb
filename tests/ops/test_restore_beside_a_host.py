"""Restoring beside a host application's objects: in a database llmstore shares with a
host (one SQLite file, or Postgres's ``public`` schema), backup, restore and rotate-keys
leave the host's tables, views, indexes, sequences and Alembic history alone; an archive
from before revision 0005 is refused."""

from __future__ import annotations

import asyncio
import re
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from llmstore import BackupError, Store, StoreConfig, generate_key
from llmstore._cli.main import EXIT_OK, main
from llmstore._db.schema import VERSION_TABLE
from llmstore._ops.backup import backup_database
from llmstore.migrations import _commands as _migrations
from llmstore.migrations._commands import head_revision, upgrade
from tests.helpers import require_postgres
from tests.ops.restore_support import (
    OWN,
    _backup_to,
    _backups_taken,
    _change_rows,
    _execute,
    _own_rows,
    _restore_file,
)
from tests.snapshots import seed, snapshot


@pytest.fixture
async def fresh_database(tmp_path: Path) -> AsyncIterator[StoreConfig]:
    """A config for a new Postgres database, with llmstore in its public schema."""
    url = sa.make_url(StoreConfig.from_url(require_postgres()).url.get_secret_value())
    name = f"llmstore_test_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(
        url.set(database="postgres"), poolclass=NullPool, isolation_level="AUTOCOMMIT"
    )
    try:
        async with admin.connect() as conn:
            await conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield StoreConfig.from_url(
            url.set(database=name).render_as_string(hide_password=False),
            encryption_keys=generate_key(),
            backup_dir=str(tmp_path / "dumps"),
        )
    finally:
        async with admin.connect() as conn:
            await conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.dispose()


@pytest.mark.postgres
async def test_postgres_public_schema_restores_only_llmstore_tables(
    fresh_database: StoreConfig, tmp_path: Path
) -> None:
    config = fresh_database
    await upgrade(config)
    await seed(config)
    host = (
        "CREATE TABLE host_notes (id serial PRIMARY KEY, note text)",
        "CREATE INDEX ix_host_notes_note ON host_notes (note)",
        "INSERT INTO host_notes (note) VALUES ('as backed up')",
    )
    await _execute(config, *host)
    saved = await snapshot(config)
    archive = await _backup_to(config, tmp_path / "whole-database.backup")
    await _execute(config, "UPDATE host_notes SET note = 'the host changed it since'")
    await _change_rows(config)

    done = await _restore_file(config, archive)
    assert done.backup is not None and done.revision == head_revision()
    restored = await snapshot(config)
    assert restored.pop("host_notes") == [("1", "the host changed it since")]
    saved.pop("host_notes")
    assert restored == saved

    # A host object that depends on llmstore's tables stops the restore; nothing changes.
    await _execute(
        config, "ALTER TABLE host_notes ADD COLUMN project_id uuid REFERENCES llmstore_projects"
    )
    await _change_rows(config)
    before = await snapshot(config)
    with pytest.raises(BackupError, match=r"psql failed: .*depend"):
        await _restore_file(config, archive)
    assert await snapshot(config) == before


# --- a host application's objects beside llmstore's --------------------------------------------

# A host's own tables (``api_keys`` is the name llmstore's table had before 0005), a view,
# an index, a trigger or sequence, and its own Alembic history in ``alembic_version``.
_HOST_SQLITE = (
    "CREATE TABLE users (id INTEGER PRIMARY KEY AUTOINCREMENT, email TEXT NOT NULL)",
    "CREATE TABLE api_keys (id INTEGER PRIMARY KEY, user_id INTEGER REFERENCES users (id), "
    "label TEXT)",
    "CREATE VIEW user_emails AS SELECT email FROM users",
    "CREATE INDEX ix_users_email ON users (email)",
    "CREATE TRIGGER users_label AFTER UPDATE ON users BEGIN "
    "UPDATE api_keys SET label = label || '*' WHERE user_id = NEW.id; END",
)
_HOST_POSTGRES = (
    "CREATE TABLE users (id serial PRIMARY KEY, email text NOT NULL)",
    "CREATE TABLE api_keys (id integer PRIMARY KEY, user_id integer REFERENCES users (id), "
    "label text)",
    "CREATE VIEW user_emails AS SELECT email FROM users",
    "CREATE INDEX ix_users_email ON users (email)",
    "CREATE SEQUENCE host_counter",
)
_HOST_ROWS = (
    "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)",
    "INSERT INTO alembic_version VALUES ('host_0001')",
    "INSERT INTO users (email) VALUES ('a@example.com'), ('b@example.com')",
    "INSERT INTO api_keys VALUES (7, 1, 'host key'), (8, 2, 'other key')",
)
_HOST_CHANGES = (
    "UPDATE users SET email = 'changed@example.com' WHERE id = 1",
    "DELETE FROM api_keys WHERE id = 8",
    "INSERT INTO users (email) VALUES ('c@example.com')",
    "INSERT INTO api_keys VALUES (9, 3, 'made since')",
    "UPDATE alembic_version SET version_num = 'host_0002'",
)


@pytest.fixture(params=["sqlite-file", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> StoreConfig:
    """A database llmstore shares with a host: one SQLite file, or the ``public`` schema of
    a new Postgres database."""
    if request.param == "postgres":
        config: StoreConfig = request.getfixturevalue("fresh_database")
        return config
    return StoreConfig.from_url(f"sqlite:///{tmp_path / 'app.db'}", encryption_keys=generate_key())


async def _beside_the_host(config: StoreConfig) -> None:
    """llmstore at head, seeded, beside a host's tables, view, index and Alembic history."""
    await upgrade(config)
    await seed(config)
    host = _HOST_SQLITE if config.driver == "sqlite" else _HOST_POSTGRES
    await _execute(config, *host, *_HOST_ROWS)


async def _host_state(config: StoreConfig) -> dict[str, Any]:
    """Every object of the host's, with its definition, and every value of its rows."""

    def read(conn: Connection) -> dict[str, Any]:
        if conn.dialect.name == "sqlite":
            catalog = "SELECT type, name, tbl_name, sql FROM sqlite_master"
            sequence = "SELECT name, seq FROM sqlite_sequence WHERE name = 'users'"
        else:
            catalog = (
                "SELECT c.relkind::text, c.relname, pg_get_viewdef(c.oid) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'"
            )
            sequence = "SELECT last_value, is_called FROM host_counter"
        state: dict[str, Any] = {
            "objects": sorted(
                tuple(row)
                for row in conn.exec_driver_sql(catalog)
                if not row[1].startswith("llmstore_") and row[1] != "sqlite_sequence"
            ),
            "sequence": conn.exec_driver_sql(sequence).all(),
        }
        for table in ("users", "api_keys", "alembic_version", "user_emails"):
            state[table] = sorted(conn.exec_driver_sql(f"SELECT * FROM {table}").all())
        return state

    return await _migrations.with_migration_connection(config, read, write=False)


def _archived_names(archive: Path) -> set[str]:
    """The names of the objects a Postgres archive holds in ``public``."""
    listing = subprocess.run(
        ["pg_restore", "--list", str(archive)], capture_output=True, text=True, check=True
    ).stdout
    return set(re.findall(r"^\d+; \d+ \d+ [A-Z ]+? public (\S+) ", listing, re.MULTILINE))


async def test_backup_restore_and_rotate_keys_leave_a_hosts_objects_and_rows_alone(
    shared: StoreConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = shared
    await _beside_the_host(config)
    url = ["--url", config.url.get_secret_value()]
    saved = await _own_rows(config)
    archive = tmp_path / "saved.backup"
    assert await asyncio.to_thread(main, ["backup", "--out", str(archive), *url]) == EXIT_OK
    if config.driver == "postgresql":
        # Without DATABASE_SCHEMA the archive holds llmstore's objects only.
        names = await asyncio.to_thread(_archived_names, archive)
        assert names >= OWN and {n for n in names if n.endswith("_seq")}
        assert all(name.startswith("llmstore_") for name in names), names

    await _change_rows(config)
    await _execute(config, *_HOST_CHANGES)
    if config.driver == "postgresql":
        await _execute(config, "SELECT setval('host_counter', 41)")
    host = await _host_state(config)
    label = "host key*" if config.driver == "sqlite" else "host key"  # the host's trigger
    assert host["api_keys"] == [(7, 1, label), (9, 3, "made since")]
    assert host["alembic_version"] == [("host_0002",)]

    assert await asyncio.to_thread(main, ["restore", str(archive), *url]) == EXIT_OK
    assert await _own_rows(config) == saved
    assert await _host_state(config) == host  # as just before the restore, not as backed up
    assert await _migrations.current(config) == head_revision()

    # rotate-keys re-encrypts llmstore's secrets and nothing of the host's.
    old_key, new_key = config.encryption_keys[0].get_secret_value(), generate_key()
    monkeypatch.setenv("LLMSTORE_ENCRYPTION_KEYS", f"{new_key},{old_key}")
    assert await asyncio.to_thread(main, ["rotate-keys", *url]) == EXIT_OK
    assert await _host_state(config) == host
    async with Store(config.model_copy(update={"encryption_keys": (SecretStr(new_key),)})) as store:
        project = await store.projects.get_by_name("seeded")
        assert await store.projects.reveal_api_key(project.id) == "sk-upstream-secret"


@pytest.mark.postgres
async def test_an_archive_of_the_whole_database_restores_llmstores_objects_only(
    fresh_database: StoreConfig, tmp_path: Path
) -> None:
    # As an older llmstore made them without DATABASE_SCHEMA: the host's tables included.
    config = fresh_database
    await _beside_the_host(config)
    saved = await _own_rows(config)
    archive = tmp_path / "whole.backup"
    target = config.url.get_secret_value().replace("+asyncpg", "")
    dump = ["pg_dump", "--format=custom", f"--file={archive}", target]
    await asyncio.to_thread(subprocess.run, dump, check=True)
    assert {"users", "api_keys", "user_emails", "host_counter"} <= _archived_names(archive)
    await _change_rows(config)
    await _execute(config, *_HOST_CHANGES, "SELECT setval('host_counter', 41)")
    host = await _host_state(config)

    await _restore_file(config, archive)
    assert await _own_rows(config) == saved
    assert await _host_state(config) == host


LEGACY = "0004_usage_logs_receipts"


async def test_a_backup_from_before_0005_is_refused_and_changes_nothing(
    shared: StoreConfig, tmp_path: Path
) -> None:
    # As an older llmstore left a database: bare table names, its revision in
    # alembic_version beside the host's own row.
    config = shared.model_copy(update={"backup_dir": str(tmp_path / "dumps")})
    postgres = config.driver == "postgresql"
    await upgrade(config, LEGACY)
    stamp = [f"ALTER TABLE {VERSION_TABLE} RENAME TO alembic_version"]
    if postgres:
        stamp.append(f"ALTER INDEX {VERSION_TABLE}_pkc RENAME TO alembic_version_pkc")
    await _execute(
        config,
        *stamp,
        "INSERT INTO alembic_version VALUES ('host_0001')",
        "CREATE TABLE users (id integer PRIMARY KEY, email text)",
        "INSERT INTO users VALUES (1, 'a@example.com')",
    )
    old = await asyncio.to_thread(backup_database, config, tmp_path / "old.backup")
    assert old.revision == LEGACY  # llmstore's row, never the host's
    if postgres:
        # The bare names of llmstore's tables at 0004 and the version table; not the host's.
        names = _archived_names(old.path)
        assert {"projects", "api_keys", "usage_logs", "alembic_version"} <= names
        assert "users" not in names

    # The upgrade to 0005 backs up first, on Postgres too (those bare names, not llmstore_*).
    done = await _migrations.migrate(config, "head", downgrading=False, backup=True)
    assert done.backup is not None and done.backup.revision == LEGACY
    await _execute(
        config,
        "CREATE TABLE api_keys (id integer PRIMARY KEY, label text)",
        "INSERT INTO api_keys VALUES (7, 'host key')",
    )
    async with Store(config) as store:
        await store.projects.create("made at head")
    before = await snapshot(config)
    taken = _backups_taken(config)

    for path in (old.path, done.backup.path):
        with pytest.raises(BackupError, match="made before llmstore's tables got their llmstore_"):
            await _restore_file(config, path)
    assert await snapshot(config) == before
    assert _backups_taken(config) == taken
