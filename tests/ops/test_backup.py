"""Backups before upgrades and downgrades, and on demand; a failing revision rolls the whole
command back on both drivers, with data in every table."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore import (
    BackupError,
    MigrationError,
    StoreConfig,
    ValidationError,
)
from llmstore._cli.main import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from llmstore._db.schema import LEGACY_VERSION_TABLE, VERSION_TABLE, metadata
from llmstore._ops.backup import (
    UNPREFIXED_TABLES,
    archive_revision,
    backup_database,
    backup_prefix,
    prune,
    sqlite_revision,
)
from llmstore.migrations import _commands as _migrations
from llmstore.migrations._commands import head_revision, migrate, upgrade
from llmstore.pytest_plugin import drop_schema, fresh_schema_name
from tests.helpers import require_postgres
from tests.migrations.revisions import scripts_with
from tests.snapshots import seed, snapshot

FIRST = "0001_projects"
_PROJECTS_0001 = sa.table(
    "projects",
    sa.column("id", sa.Uuid()),
    sa.column("name", sa.String()),
    sa.column("is_active", sa.Boolean()),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("updated_at", sa.DateTime(timezone=True)),
)
STAMP = re.compile(r"\.\d{8}_\d{6}_\d{3}\.backup$")


def _with(config: StoreConfig, **update: Any) -> StoreConfig:
    return config.model_copy(update=update)


async def _insert_project(config: StoreConfig, name: str) -> None:
    """A project row at revision 0001, below head, where no Store opens."""
    schema = config.schema_name

    def insert(conn: Connection) -> None:
        if schema is not None:
            conn.exec_driver_sql(f'SET LOCAL search_path TO "{schema}"')
        now = dt.datetime.now(dt.UTC)
        conn.execute(
            sa.insert(_PROJECTS_0001).values(
                id=uuid.uuid4(), name=name, is_active=True, created_at=now, updated_at=now
            )
        )

    await _migrations.with_migration_connection(config, insert)


def failing_scripts(tmp_path: Path) -> contextlib.AbstractContextManager[Path]:
    """llmstore's migration scripts plus a revision after head that changes data in several
    tables, creates one, and then fails."""
    return scripts_with(
        tmp_path,
        {
            "0099_fails": f'''"""A revision that fails halfway."""

import sqlalchemy as sa
from alembic import op

revision = "0099_fails"
down_revision = "{head_revision()}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("half_done", sa.Column("id", sa.Integer, primary_key=True))
    op.execute("UPDATE llmstore_projects SET name = 'changed by a failing revision'")
    op.execute("DELETE FROM llmstore_usage_receipts")
    op.execute("DELETE FROM llmstore_usage_logs")
    op.execute("SELECT * FROM no_such_table_so_this_revision_fails")


def downgrade() -> None:
    op.drop_table("half_done")
'''
        },
    )


# --- a failing revision ----------------------------------------------------------------------


async def test_a_failing_revision_leaves_every_row_as_it_was(
    db_config: StoreConfig, tmp_path: Path
) -> None:
    await upgrade(db_config)
    await seed(db_config)
    before = await snapshot(db_config)
    assert all(before[name] for name in metadata.tables), "a table was left empty"
    with failing_scripts(tmp_path), pytest.raises(MigrationError) as raised:
        await migrate(db_config, "head", downgrading=False, backup=True)
    message = str(raised.value)
    assert "failed at revision 0099_fails" in message
    assert f"still at {head_revision()}" in message
    assert "the backup taken before it is " in message
    backup = Path(message.rsplit("the backup taken before it is ", 1)[1])
    assert backup.is_file()
    assert await snapshot(db_config) == before
    assert await _migrations.current(db_config) == head_revision()


async def test_a_failure_after_several_revisions_undoes_them_all(
    db_config: StoreConfig, tmp_path: Path
) -> None:
    await upgrade(db_config, FIRST)
    with (
        failing_scripts(tmp_path),
        pytest.raises(MigrationError, match=r"failed at revision 0099_fails.*still at 0001"),
    ):
        await migrate(db_config, "head", downgrading=False, backup=False)
    assert await _migrations.current(db_config) == FIRST
    tables = set((await snapshot(db_config)).keys())
    assert not {"api_keys", "usage_logs", "llmstore_usage_logs", "half_done"} & tables


# --- llmstore's revision and tables beside a host's --------------------------------------------


async def test_the_bare_table_names_of_each_revision_before_0005(tmp_path: Path) -> None:
    # UNPREFIXED_TABLES says which bare names were llmstore's: checked against the revisions.
    config = StoreConfig.from_url(f"sqlite:///{tmp_path / 'old.db'}")
    assert all(_migrations.is_known(revision) for revision in UNPREFIXED_TABLES)
    for revision, tables in UNPREFIXED_TABLES.items():
        await upgrade(config, revision)
        conn = sqlite3.connect(config.sqlite_path or "")
        try:
            names = {
                row[0]
                for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
        finally:
            conn.close()
        assert names - {VERSION_TABLE, "sqlite_sequence"} == set(tables), revision
    await upgrade(config)
    assert head_revision() not in UNPREFIXED_TABLES


def test_sqlite_revision_never_takes_a_hosts_row_for_llmstores(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "shared.db")
    try:
        conn.execute(f"CREATE TABLE {LEGACY_VERSION_TABLE} (version_num TEXT PRIMARY KEY)")
        conn.execute(f"INSERT INTO {LEGACY_VERSION_TABLE} VALUES ('a1b2c3d4e5f6')")
        assert sqlite_revision(conn) is None  # the host's history only
        conn.execute(f"INSERT INTO {LEGACY_VERSION_TABLE} VALUES ('0003_api_keys_ledger')")
        assert sqlite_revision(conn) == "0003_api_keys_ledger"  # stamped by an older llmstore
        conn.execute(f"CREATE TABLE {VERSION_TABLE} (version_num TEXT PRIMARY KEY)")
        conn.execute(f"INSERT INTO {VERSION_TABLE} VALUES ('{head_revision()}')")
        assert sqlite_revision(conn) == head_revision()  # its own table comes first
    finally:
        conn.close()


# --- SQLite backups --------------------------------------------------------------------------


@pytest.fixture
def sqlite_config(tmp_path: Path) -> StoreConfig:
    return StoreConfig.from_url(f"sqlite:///{tmp_path / 'data' / 'proxy.db'}", backup_keep=3)


async def test_sqlite_upgrade_backs_up_first_into_the_backups_folder(
    sqlite_config: StoreConfig,
) -> None:
    await upgrade(sqlite_config, FIRST)
    await _insert_project(sqlite_config, "kept in the backup")
    done = await migrate(sqlite_config, "head", downgrading=False, backup=True)
    assert done.before == FIRST and done.after == head_revision()
    assert done.backup is not None
    path = done.backup.path
    assert path.parent == Path(sqlite_config.sqlite_path or "").parent / "backups"
    assert path.name.startswith("proxy.db.") and STAMP.search(path.name)
    assert done.backup.revision == FIRST
    copy = sqlite3.connect(path)
    try:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert copy.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        assert copy.execute("SELECT name FROM projects").fetchall() == [("kept in the backup",)]
        assert copy.execute(f"SELECT version_num FROM {VERSION_TABLE}").fetchone() == (FIRST,)
    finally:
        copy.close()
    # At head already: nothing to do, so no backup.
    again = await migrate(sqlite_config, "head", downgrading=False, backup=True)
    assert again.backup is None and again.backup_skipped == "nothing to do"


@pytest.mark.parametrize("target", ["0009_nope", "zzzz+1", "head_typo"])
async def test_an_unknown_target_revision_makes_no_backup(
    db_config: StoreConfig, tmp_path: Path, target: str
) -> None:
    config = _with(db_config, backup_dir=str(tmp_path / "pg-backups"))
    await upgrade(config, FIRST)
    await _insert_project(config, "worth a backup")
    folder, _ = backup_prefix(config)
    for downgrading in (False, True):
        with pytest.raises(MigrationError, match=f"unknown revision '{re.escape(target)}'"):
            await migrate(config, target, downgrading=downgrading, backup=True)
    for wrong in (5, "", "x" * 201, None):
        with pytest.raises(ValidationError, match="target revision"):
            await migrate(config, wrong, downgrading=False, backup=True)  # type: ignore[arg-type]
    assert not folder.exists() or not list(folder.iterdir())  # no backup was pushed out
    assert (await migrate(config, "head", downgrading=False, backup=False)).after == (
        head_revision()
    )


async def test_only_the_newest_backups_are_kept(sqlite_config: StoreConfig) -> None:
    await upgrade(sqlite_config)
    made = [await asyncio.to_thread(backup_database, sqlite_config) for _ in range(5)]
    folder = made[0].path.parent
    kept = sorted(path.name for path in folder.iterdir())
    assert kept == sorted(m.path.name for m in made[-3:])
    (folder / "notes.txt").write_text("not a backup")
    (folder / "proxy.db.manual.backup").write_text("not one of ours by name")
    assert prune(_with(sqlite_config, backup_keep=1)) == [m.path for m in made[-3:-1]]
    assert (folder / "notes.txt").exists() and (folder / "proxy.db.manual.backup").exists()


async def test_a_backup_never_overwrites_and_refuses_what_it_cannot_copy(
    sqlite_config: StoreConfig, tmp_path: Path
) -> None:
    with pytest.raises(BackupError, match="no database file"):
        await asyncio.to_thread(backup_database, sqlite_config)
    await upgrade(sqlite_config)
    taken = tmp_path / "taken.backup"
    taken.write_text("mine")
    with pytest.raises(BackupError, match="already exists"):
        await asyncio.to_thread(backup_database, sqlite_config, taken)
    assert taken.read_text() == "mine"
    with pytest.raises(BackupError, match="in-memory"):
        backup_database(StoreConfig.from_url("sqlite:///:memory:"))
    assert not list(tmp_path.glob("**/*.partial"))


def test_writers_keep_writing_while_sqlite_is_backed_up(sqlite_config: StoreConfig) -> None:
    asyncio.run(upgrade(sqlite_config))
    path = sqlite_config.sqlite_path or ""
    setup = sqlite3.connect(path)
    setup.execute("CREATE TABLE scratch (n INTEGER, pad TEXT)")
    setup.executemany("INSERT INTO scratch VALUES (?, ?)", ((i, "x" * 500) for i in range(40_000)))
    setup.commit()
    setup.close()
    # Another process writes all along, one committed row at a time.
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            f"c = sqlite3.connect({path!r}, timeout=30)\n"
            "print('ready', flush=True)\n"
            "end = time.monotonic() + 20\n"
            "while time.monotonic() < end:\n"
            "    c.execute(\"INSERT INTO scratch VALUES (-1, 'w')\"); c.commit()\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        steps: list[tuple[int, int | None]] = []
        first = _count_written(path)
        made = backup_database(sqlite_config, None, lambda d, t: steps.append((d, t)))
        during = _count_written(path) - first
    finally:
        writer.kill()
        writer.wait()
        if writer.stdout is not None:
            writer.stdout.close()
    assert len(steps) > 3  # copied in several steps, none restarted by the writer
    assert steps[-1][0] == steps[-1][1]
    copy = sqlite3.connect(made.path)
    try:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert copy.execute("SELECT count(*) FROM scratch WHERE n >= 0").fetchone() == (40_000,)
    finally:
        copy.close()
    assert during > 0  # the writer went on committing while the copy was made


def _count_written(path: str) -> int:
    conn = sqlite3.connect(path, timeout=30)
    try:
        return int(conn.execute("SELECT count(*) FROM scratch WHERE n = -1").fetchone()[0])
    finally:
        conn.close()


async def test_prod_stops_an_upgrade_whose_backup_fails_and_dev_goes_on(
    db_config: StoreConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A file where the backups folder should be: no backup can be made, on either driver.
    if db_config.driver == "sqlite":
        blocker = Path(db_config.sqlite_path or "").parent / "backups"
        config = db_config
    else:
        blocker = tmp_path / "not-a-folder"
        config = _with(db_config, backup_dir=str(blocker / "dumps"))
    await upgrade(config, FIRST)
    blocker.write_text("a file where the backups folder should be")
    prod = _with(config, env="prod")
    with pytest.raises(MigrationError, match="no backup could be made, so nothing was changed"):
        await migrate(prod, "head", downgrading=False, backup=True)
    assert await _migrations.current(config) == FIRST
    done = await migrate(config, "head", downgrading=False, backup=True)
    assert done.after == head_revision() and done.backup is None
    assert done.backup_skipped is not None and "backup folder" in done.backup_skipped
    assert "going on without a backup" in caplog.text


# --- Postgres backups ------------------------------------------------------------------------


@pytest.fixture
async def pg_config(tmp_path: Path) -> AsyncIterator[StoreConfig]:
    url = require_postgres()
    schema = fresh_schema_name()
    yield StoreConfig.from_url(
        url, schema_name=schema, backup_dir=str(tmp_path / "dumps"), backup_keep=2
    )
    await drop_schema(url, schema)


@pytest.mark.postgres
async def test_postgres_upgrade_dumps_the_schema_first(pg_config: StoreConfig) -> None:
    await upgrade(pg_config, FIRST)
    await _insert_project(pg_config, "dumped")
    done = await migrate(pg_config, "head", downgrading=False, backup=True)
    assert done.backup is not None
    path = done.backup.path
    assert path.parent == Path(pg_config.backup_dir or "")
    database = sa.make_url(pg_config.url.get_secret_value()).database
    assert path.name.startswith(f"{database}.{pg_config.schema_name}.") and STAMP.search(path.name)
    assert done.backup.revision == FIRST == archive_revision(path)
    restore = ["pg_restore", "--data-only", "--table=projects", "--file=-", str(path)]
    done_restore = await asyncio.to_thread(
        subprocess.run, restore, capture_output=True, text=True, check=True
    )
    assert "dumped" in done_restore.stdout
    assert "sk-" not in path.read_bytes().decode("latin-1")  # secrets stay encrypted


@pytest.mark.postgres
def test_postgres_without_pg_dump_refuses_unless_told_no_backup(
    pg_config: StoreConfig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    asyncio.run(upgrade(pg_config, FIRST))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    monkeypatch.setenv("DATABASE_SCHEMA", pg_config.schema_name or "")
    args = ["--url", pg_config.url.get_secret_value()]
    assert main(["upgrade", *args]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "pg_dump is not on the PATH" in err and "--no-backup" in err
    assert asyncio.run(_migrations.current(pg_config)) == FIRST
    assert main(["upgrade", "--no-backup", *args]) == EXIT_OK
    assert asyncio.run(_migrations.current(pg_config)) == head_revision()


# --- the command line ------------------------------------------------------------------------


def test_cli_backup_and_the_prod_downgrade_guard(
    db_config: StoreConfig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if db_config.schema_name:
        monkeypatch.setenv("DATABASE_SCHEMA", db_config.schema_name)
    args = ["--url", db_config.url.get_secret_value()]
    assert main(["upgrade", *args]) == EXIT_OK
    out = tmp_path / "manual.backup"
    assert main(["backup", "--out", str(out), *args]) == EXIT_OK
    line = capsys.readouterr().out
    assert f"backed up at revision {head_revision()} to {out}" in line
    assert out.is_file()
    assert main(["backup", "--out", str(out), *args]) == EXIT_FAILED
    assert "already exists" in capsys.readouterr().err
    assert main(["downgrade", FIRST, "--env", "prod", *args]) == EXIT_USAGE
    assert "needs --yes" in capsys.readouterr().err
    assert asyncio.run(_migrations.current(db_config)) == head_revision()
    assert main(["downgrade", FIRST, "--env", "prod", "--yes", *args]) == EXIT_OK
    assert "(backup: " in capsys.readouterr().out
    assert asyncio.run(_migrations.current(db_config)) == FIRST
