"""llmstore inside a host application that shares its database and has its own Alembic.

The host (``tests/embedding/host_app``) has ``users`` and ``api_keys`` tables and its own
history in ``alembic_version``, in the same SQLite file or the ``public`` schema of a
Postgres database of its own. Each side's upgrade runs in a process of its own, in either order
or at the same time, twice; neither side's autogenerate then finds anything to do.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import alembic.command
import alembic.config
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from llmstore import MigrationError, Store, generate_key, migrations
from llmstore._cli.main import EXIT_OK, main
from llmstore._db.schema import LEGACY_VERSION_TABLE, VERSION_TABLE
from llmstore.migrations._commands import head_revision
from tests.helpers import async_url, require_postgres

from .host_app import models

ROOT = Path(__file__).resolve().parents[2]
HOST_SCRIPTS = Path(__file__).resolve().parent / "host_app"
HOST_HEAD = "h001_users"
LEGACY_HEAD = "0004_usage_logs_receipts"
HOST_DATABASE = "llmstore_host_app"


def host_config(url: str) -> alembic.config.Config:
    config = alembic.config.Config()
    config.set_main_option("script_location", str(HOST_SCRIPTS))
    config.set_main_option("path_separator", "os")
    config.set_main_option("version_locations", str(HOST_SCRIPTS / "versions"))
    config.set_main_option("sqlalchemy.url", async_url(url))
    return config


def host_upgrade(url: str) -> None:
    """The host's own ``alembic upgrade head`` (run in a process of its own below)."""
    alembic.command.upgrade(host_config(url), "head")


def query(url: str, sql: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    async def run() -> list[tuple[Any, ...]]:
        engine = create_async_engine(async_url(url), poolclass=NullPool)
        try:
            async with engine.begin() as conn:
                result = await conn.execute(sa.text(sql), params or {})
                return [tuple(row) for row in result] if result.returns_rows else []
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _tables(url: str) -> set[str]:
    if url.startswith("sqlite"):
        rows = query(url, "SELECT name FROM sqlite_master WHERE type = 'table'")
    else:
        rows = query(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {row[0] for row in rows}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database for the host and llmstore: a new SQLite file, or a new Postgres database
    (so that its ``public`` schema is theirs alone)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'host.db'}"
        return
    server = sa.make_url(require_postgres())
    admin = server.set(database="postgres").render_as_string(hide_password=False)

    async def recreate(drop_only: bool) -> None:
        engine = create_async_engine(
            async_url(admin), poolclass=NullPool, isolation_level="AUTOCOMMIT"
        )
        try:
            async with engine.connect() as conn:
                await conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{HOST_DATABASE}" (FORCE)')
                if not drop_only:
                    await conn.exec_driver_sql(f'CREATE DATABASE "{HOST_DATABASE}"')
        finally:
            await engine.dispose()

    asyncio.run(recreate(False))
    yield server.set(database=HOST_DATABASE).render_as_string(hide_password=False)
    asyncio.run(recreate(True))


@pytest.fixture(autouse=True)
def _no_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_SCHEMA", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("DB_DRIVER", raising=False)


def _processes(url: str, steps: list[str]) -> list[subprocess.Popen[str]]:
    commands = {
        "host": [
            sys.executable,
            "-c",
            "from tests.embedding.test_host_application import host_upgrade; "
            f"host_upgrade({url!r})",
        ],
        "llmstore": [sys.executable, "-m", "llmstore", "upgrade", "--url", url, "--no-backup"],
    }
    environ = {**os.environ, "PYTHONPATH": str(ROOT)}
    return [
        subprocess.Popen(
            commands[step],
            cwd=ROOT,
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for step in steps
    ]


def _wait(processes: list[subprocess.Popen[str]]) -> None:
    for process in processes:
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, output


@pytest.mark.slow
@pytest.mark.parametrize("order", ["host-first", "llmstore-first", "at-once"])
def test_the_host_and_llmstore_migrate_side_by_side(url: str, order: str) -> None:
    for round_ in range(2):
        if order == "at-once":
            _wait(_processes(url, ["host", "llmstore"]))
        else:
            for step in ["host", "llmstore"] if order == "host-first" else ["llmstore", "host"]:
                _wait(_processes(url, [step]))
        if round_ == 0:
            query(url, "INSERT INTO users (id, email) VALUES (1, 'a@example.com')")
            query(url, "INSERT INTO api_keys (id, user_id, label) VALUES (7, 1, 'host key')")

    # Each history is where it belongs, and nothing else is in it.
    assert query(url, f"SELECT version_num FROM {LEGACY_VERSION_TABLE}") == [(HOST_HEAD,)]
    assert query(url, f"SELECT version_num FROM {VERSION_TABLE}") == [(head_revision(),)]
    assert query(url, "SELECT id, user_id, label FROM api_keys") == [(7, 1, "host key")]
    assert {"users", "api_keys", "llmstore_api_keys", "llmstore_projects"} <= _tables(url)

    # Neither side's autogenerate finds anything to do.
    alembic.command.check(host_config(url))  # raises AutoGenerateDiffsDetected otherwise
    assert asyncio.run(migrations.check(url)) == []
    checked = subprocess.run(
        [sys.executable, "-m", "llmstore", "check", "--url", url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def _host_diffs(url: str, *, filtered: bool) -> list[Any]:
    async def run() -> list[Any]:
        engine = create_async_engine(async_url(url), poolclass=NullPool)
        opts: dict[str, Any] = {"include_object": migrations.include_object} if filtered else {}
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(
                    lambda sync: compare_metadata(
                        MigrationContext.configure(sync, opts=opts), models.metadata
                    )
                )
        finally:
            await engine.dispose()

    return asyncio.run(run())


def test_include_object_keeps_the_hosts_autogenerate_off_llmstores_tables(url: str) -> None:
    host_upgrade(url)
    assert asyncio.run(migrations.upgrade(url, backup=False)).after == head_revision()
    unfiltered = _host_diffs(url, filtered=False)
    # Without it the host would be told to drop every table of llmstore's.
    dropped = {diff[1].name for diff in unfiltered if diff[0] == "remove_table"}
    assert {"llmstore_projects", "llmstore_usage_logs", VERSION_TABLE} <= dropped
    assert _host_diffs(url, filtered=True) == []


@pytest.mark.parametrize("with_host", [True, False], ids=["host-history", "llmstore-only"])
def test_an_old_stamp_in_alembic_version_moves_and_only_llmstores_row(
    url: str, with_host: bool
) -> None:
    # As llmstore before revision 0005 left it: its tables unprefixed (so the host could
    # not have an api_keys table then) and its row in alembic_version, perhaps beside the
    # host's own.
    asyncio.run(migrations.upgrade(url, LEGACY_HEAD, backup=False))
    query(url, f"DROP TABLE {VERSION_TABLE}")
    query(
        url,
        f"CREATE TABLE {LEGACY_VERSION_TABLE} (version_num VARCHAR(32) NOT NULL PRIMARY KEY)",
    )
    for row in [LEGACY_HEAD, HOST_HEAD] if with_host else [LEGACY_HEAD]:
        query(url, f"INSERT INTO {LEGACY_VERSION_TABLE} VALUES (:v)", {"v": row})
    assert asyncio.run(migrations.current(url)) == LEGACY_HEAD

    done = asyncio.run(migrations.upgrade(url, backup=False))

    assert (done.before, done.after) == (LEGACY_HEAD, head_revision())
    assert query(url, f"SELECT version_num FROM {VERSION_TABLE}") == [(head_revision(),)]
    if with_host:
        assert query(url, f"SELECT version_num FROM {LEGACY_VERSION_TABLE}") == [(HOST_HEAD,)]
    else:
        assert LEGACY_VERSION_TABLE not in _tables(url)
    assert asyncio.run(migrations.check(url)) == []
    assert not {"projects", "api_keys", "usage_logs"} & _tables(url)


async def _store_round_trip(url: str) -> str:
    async with Store.from_url(url, encryption_keys=generate_key()) as store:
        project = await store.projects.create("inside the host", api_key="sk-upstream")
        return (await store.projects.get(project.id)).name


def test_a_store_works_beside_the_hosts_tables(url: str) -> None:
    host_upgrade(url)
    query(url, "INSERT INTO users (id, email) VALUES (1, 'a@example.com')")
    asyncio.run(migrations.upgrade(url, backup=False))
    assert asyncio.run(_store_round_trip(url)) == "inside the host"
    assert query(url, "SELECT id, email FROM users") == [(1, "a@example.com")]
    assert query(url, "SELECT count(*) FROM api_keys") == [(0,)]


def test_a_downgrade_below_0005_is_refused_while_the_host_holds_an_old_name(url: str) -> None:
    host_upgrade(url)
    query(url, "INSERT INTO users (id, email) VALUES (1, 'a@example.com')")
    query(url, "INSERT INTO api_keys (id, user_id, label) VALUES (7, 1, 'host key')")
    asyncio.run(migrations.upgrade(url, backup=False))
    with pytest.raises(MigrationError, match="api_keys already exist"):
        asyncio.run(migrations.downgrade(url, LEGACY_HEAD, backup=False))
    assert asyncio.run(migrations.current(url)) == head_revision()
    assert asyncio.run(migrations.check(url)) == []
    assert query(url, "SELECT id, user_id, label FROM api_keys") == [(7, 1, "host key")]


def _host_state(url: str) -> dict[str, Any]:
    """Every row of the host's tables and view, and the names of all its objects."""
    if url.startswith("sqlite"):
        names = query(url, "SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'llmstore%'")
    else:
        names = query(
            url,
            "SELECT c.relkind::text, c.relname FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE n.nspname = 'public' "
            "AND c.relname NOT LIKE 'llmstore%'",
        )
    state: dict[str, Any] = {"objects": sorted(names)}
    for table in ("users", "api_keys", LEGACY_VERSION_TABLE, "user_emails"):
        state[table] = sorted(query(url, f"SELECT * FROM {table}"))
    return state


def test_backup_restore_and_rotate_keys_leave_the_hosts_rows_alone(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_key, new_key = generate_key(), generate_key()
    monkeypatch.setenv("LLMSTORE_ENCRYPTION_KEYS", old_key)
    monkeypatch.setenv("LLMSTORE_BACKUP_DIR", str(tmp_path / "backups"))
    host_upgrade(url)
    query(url, "CREATE VIEW user_emails AS SELECT email FROM users")
    query(url, "CREATE INDEX ix_users_email_id ON users (email, id)")
    query(url, "INSERT INTO users (id, email) VALUES (1, 'a@example.com')")
    query(url, "INSERT INTO api_keys (id, user_id, label) VALUES (7, 1, 'host key')")
    asyncio.run(migrations.upgrade(url, backup=False))

    async def projects(*create: str) -> list[str]:
        async with Store.from_url(url, encryption_keys=old_key) as store:
            for name in create:
                await store.projects.create(name, api_key=f"sk-{name}")
            return sorted(p.name for p in await store.projects.list())

    assert asyncio.run(projects("backed up")) == ["backed up"]
    saved = tmp_path / "saved.backup"
    assert main(["backup", "--out", str(saved), "--url", url]) == EXIT_OK

    query(url, "UPDATE users SET email = 'changed@example.com' WHERE id = 1")
    query(url, "INSERT INTO api_keys (id, user_id, label) VALUES (8, 1, 'made since')")
    assert asyncio.run(projects("made since")) == ["backed up", "made since"]
    host = _host_state(url)
    assert host["api_keys"] == [(7, 1, "host key"), (8, 1, "made since")]

    assert main(["restore", str(saved), "--url", url]) == EXIT_OK
    assert _host_state(url) == host  # the host's rows as they were just before, not restored
    assert asyncio.run(projects()) == ["backed up"]

    monkeypatch.setenv("LLMSTORE_ENCRYPTION_KEYS", f"{new_key},{old_key}")
    assert main(["rotate-keys", "--url", url]) == EXIT_OK
    assert _host_state(url) == host
    assert asyncio.run(migrations.check(url)) == []
    alembic.command.upgrade(host_config(url), "head")  # the host's history is still whole
    assert query(url, f"SELECT version_num FROM {LEGACY_VERSION_TABLE}") == [(HOST_HEAD,)]
