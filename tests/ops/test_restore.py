"""Restoring backups on both drivers: every row comes back, the database is backed up first,
and a file that cannot be restored, or a restore that fails halfway, changes nothing."""

from __future__ import annotations

import asyncio
import re
import sqlite3
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
from llmstore._cli.main import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from llmstore._db.schema import VERSION_TABLE, metadata
from llmstore._ops import restore as _restore
from llmstore._ops.backup import backup_database, backup_prefix
from llmstore._ops.restore import restore_database
from llmstore.migrations import _commands as _migrations
from llmstore.migrations._commands import head_revision, upgrade
from llmstore.pytest_plugin import drop_schema, fresh_schema_name
from tests.helpers import require_postgres
from tests.snapshots import Snapshot, seed, snapshot

SECOND = "0002_tokens_audit_providers"


@pytest.fixture
def config(db_config: StoreConfig, tmp_path: Path) -> StoreConfig:
    """``db_config`` (a SQLite file, or a fresh Postgres schema) with its dumps in tmp_path."""
    return db_config.model_copy(update={"backup_dir": str(tmp_path / "dumps")})


@pytest.fixture
async def pg_config(tmp_path: Path) -> AsyncIterator[StoreConfig]:
    url = require_postgres()
    schema = fresh_schema_name()
    yield StoreConfig.from_url(
        url, schema_name=schema, encryption_keys=generate_key(), backup_dir=str(tmp_path / "d")
    )
    await drop_schema(url, schema)


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


# --- both drivers ----------------------------------------------------------------------------


async def test_restore_brings_back_every_row_and_backs_up_first(
    config: StoreConfig, tmp_path: Path
) -> None:
    saved, archive = await _seeded_backup(config, tmp_path)
    assert all(saved[name] for name in metadata.tables), "a table was left empty"
    await _change_rows(config)
    changed = await snapshot(config)
    assert changed != saved

    steps: list[tuple[str, int, int | None]] = []
    done = await _restore_file(config, archive, progress=lambda *step: steps.append(step))
    assert done.path == archive and done.revision == head_revision()
    assert await snapshot(config) == saved
    assert await _migrations.current(config) == head_revision()
    assert done.backup is not None and done.backup.revision == head_revision()
    assert _backups_taken(config) == [done.backup.path]  # a default name: retention applies
    stages = [stage for stage, _, _ in steps]
    assert "backing up" in stages and stages[-1] == "restoring"
    assert steps[-1][1] == steps[-1][2]

    # The backup taken first holds the database as it was: restoring it brings that back.
    undone = await _restore_file(config, done.backup.path)
    assert undone.revision == head_revision()
    assert await snapshot(config) == changed


async def test_refusals_change_nothing_and_take_no_backup(
    config: StoreConfig, tmp_path: Path
) -> None:
    await upgrade(config)
    await seed(config)
    good = await _backup_to(config, tmp_path / "good.backup")
    await _execute(config, f"UPDATE {VERSION_TABLE} SET version_num = 'ffff'")
    newer = await _backup_to(config, tmp_path / "newer.backup")
    await _execute(config, f"UPDATE {VERSION_TABLE} SET version_num = '{head_revision()}'")
    await _change_rows(config)
    before = await snapshot(config)

    garbage = tmp_path / "garbage.backup"
    garbage.write_bytes(b"not a backup\n" * 1000)
    truncated = tmp_path / "truncated.backup"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    sqlite = config.driver == "sqlite"
    not_a_backup = "not a SQLite backup" if sqlite else "not a pg_dump custom-format archive"
    cases = [
        (newer, rf"at revision 'ffff', unknown to .* \(newest: {re.escape(head_revision())}\)"),
        (garbage, not_a_backup),
        (truncated, "not a SQLite backup|integrity check" if sqlite else "pg_restore failed"),
        (tmp_path / "missing.backup", "there is no backup file at"),
    ]
    for path, refusal in cases:
        with pytest.raises(BackupError, match=refusal):
            await _restore_file(config, path)
        assert await snapshot(config) == before, path.name
    assert _backups_taken(config) == []


async def test_the_cli_restores_guards_prod_and_says_what_to_do_next(
    config: StoreConfig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = config.url.get_secret_value()
    if config.schema_name:
        monkeypatch.setenv("DATABASE_SCHEMA", config.schema_name)
        # Trust authentication ignores it; it must never be printed.
        url = url.replace("postgres@", "postgres:hunter2-secret@", 1)
    args = ["--url", url]
    saved = tmp_path / "saved.backup"
    assert await asyncio.to_thread(main, ["upgrade", *args]) == EXIT_OK
    assert await asyncio.to_thread(main, ["backup", "--out", str(saved), *args]) == EXIT_OK
    async with Store(config) as store:
        await store.projects.create("made after the backup")
    printed = capsys.readouterr()

    restore = ["restore", str(saved), *args]
    assert await asyncio.to_thread(main, [*restore, "--env", "prod"]) == EXIT_USAGE
    refused = capsys.readouterr()
    assert "needs --yes" in refused.err
    async with Store(config) as store:
        assert [p.name for p in await store.projects.list()] == ["made after the backup"]

    assert await asyncio.to_thread(main, [*restore, "--env", "prod", "--yes"]) == EXIT_OK
    restored = capsys.readouterr()
    line = restored.out.strip()
    assert f": restored revision {head_revision()} from {saved} " in line
    assert "(backup of the previous database: " in line and "upgrade" not in line
    previous = Path(line.rsplit("(backup of the previous database: ", 1)[1].rstrip(")"))
    assert previous.is_file()
    assert await _migrations.current(config) == head_revision()

    assert await asyncio.to_thread(main, ["restore", str(previous), *args]) == EXIT_OK
    behind = capsys.readouterr()
    assert f"restored revision {head_revision()} from {previous} " in behind.out
    async with Store(config) as store:
        assert [p.name for p in await store.projects.list()] == ["made after the backup"]

    # Before revision 0005 the tables had the bare names a host's may have: such a backup
    # is refused, and so is restoring into a database still at such a revision.
    old = tmp_path / "old.backup"
    assert await asyncio.to_thread(main, ["downgrade", SECOND, *args]) == EXIT_OK
    assert await asyncio.to_thread(main, ["backup", "--out", str(old), *args]) == EXIT_OK
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["restore", str(old), *args]) == EXIT_FAILED
    assert "made before llmstore's tables got their llmstore_ names" in capsys.readouterr().err
    assert await asyncio.to_thread(main, ["restore", str(saved), *args]) == EXIT_FAILED
    assert "run `python -m llmstore upgrade` first" in capsys.readouterr().err
    assert await _migrations.current(config) == SECOND

    junk = tmp_path / "junk.backup"
    junk.write_text("junk")
    assert await asyncio.to_thread(main, ["restore", str(junk), *args]) == EXIT_FAILED
    failed = capsys.readouterr()
    assert failed.err.startswith("llmstore: error: ") and str(junk) in failed.err
    for output in (printed, refused, restored, behind, failed):
        assert "hunter2" not in output.out + output.err


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


async def _own_rows(config: StoreConfig) -> Snapshot:
    return {name: rows for name, rows in (await snapshot(config)).items() if name in OWN}


OWN = {*metadata.tables, VERSION_TABLE}


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
