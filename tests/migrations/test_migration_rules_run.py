"""What the revision rules (``test_migration_rules.py``) call for, run on both drivers: the
concurrent index build and drop (a failed or crashed build, a revision committed on its
own), lock timeouts, and migrators that wait for one another during a concurrent build."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import sqlalchemy.ext.asyncio
from sqlalchemy.engine import Connection

from llmstore import MigrationError, StoreConfig, UsageRecord
from llmstore._db.schema import metadata
from llmstore._store import Store
from llmstore.migrations import _commands as _migrations
from llmstore.migrations import _schema as _migration_schema
from llmstore.migrations._commands import head_revision, migrate, upgrade
from llmstore.migrations._ops import DEFAULT_LOCK_TIMEOUT
from llmstore.pytest_plugin import drop_schema, fresh_schema_name
from tests.helpers import require_postgres
from tests.migrations.revisions import scripts_with

# --- the concurrent index build, run ---------------------------------------------------------

_INDEX = "ux_usage_logs_origin"
_BEFORE = head_revision()
_COMMITTED_ALONE = "a revision that builds or drops an index concurrently is committed on its own"
_REVISION = "0006_index_usage_origin"


def _index_revision(revision: str = _REVISION, down: str | None = None) -> str:
    return f'''"""A unique index on a table that exists: built concurrently."""

from llmstore.migrations.ops import (
    create_index_concurrently, drop_index_concurrently, set_lock_timeout,
)

revision = "{revision}"
down_revision = "{down or head_revision()}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    set_lock_timeout("10s")
    create_index_concurrently("{_INDEX}", "llmstore_usage_logs", ["origin"], unique=True)


def downgrade() -> None:
    set_lock_timeout()
    drop_index_concurrently("{_INDEX}", "llmstore_usage_logs")
'''


@contextlib.contextmanager
def index_scripts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, revisions: dict[str, str] | None = None
) -> Iterator[None]:
    """The scripts with the index revision (or ``revisions``), and models with the index."""
    models = sa.MetaData()
    for table in metadata.sorted_tables:
        table.to_metadata(models)
    sa.Index(_INDEX, models.tables["llmstore_usage_logs"].c.origin, unique=True)
    with (
        monkeypatch.context() as patch,
        scripts_with(tmp_path, revisions or {_REVISION: _index_revision()}),
    ):
        patch.setattr(_migration_schema, "metadata", models)
        yield


@pytest.fixture
async def postgres_config() -> AsyncIterator[StoreConfig]:
    url = require_postgres()
    schema = fresh_schema_name()
    yield StoreConfig.from_url(url, schema_name=schema)
    await drop_schema(url, schema)


async def _seed_origins(config: StoreConfig, *origins: str) -> None:
    """Usage rows at head, before the index revision exists."""
    await upgrade(config)
    async with Store(config) as store:
        await store.usage.record_many([UsageRecord(model="m", origin=o) for o in origins])


async def _index_state(config: StoreConfig) -> bool | None:
    """Whether the index is valid (True), invalid (False), or missing (None)."""

    def read(conn: Connection) -> bool | None:
        if conn.dialect.name == "sqlite":
            names = {index["name"] for index in sa.inspect(conn).get_indexes("llmstore_usage_logs")}
            return True if _INDEX in names else None
        value = conn.execute(
            sa.text(
                "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relname = :name AND n.nspname = :schema"
            ),
            {"name": _INDEX, "schema": config.schema_name},
        ).scalar()
        return None if value is None else bool(value)

    return await _migrations.with_migration_connection(config, read, write=False)


async def test_the_index_is_built_and_dropped_with_its_revision(
    db_config: StoreConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _seed_origins(db_config, "a", "b")
    with index_scripts(tmp_path, monkeypatch):
        done = await migrate(db_config, "head", downgrading=False, backup=False)
        assert (done.before, done.after) == (_BEFORE, _REVISION)
        assert await _index_state(db_config) is True
        assert await _migrations.check(db_config) == []
        await migrate(db_config, _BEFORE, downgrading=True, backup=False)
        assert await _index_state(db_config) is None


async def test_a_failed_build_leaves_the_previous_revision_and_no_index(
    db_config: StoreConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _seed_origins(db_config, "same", "same", "other")
    with index_scripts(tmp_path, monkeypatch):
        with pytest.raises(MigrationError) as raised:
            await migrate(db_config, "head", downgrading=False, backup=False)
        message = str(raised.value)
        assert f"failed at revision {_REVISION}" in message
        assert f"still at {_BEFORE}" in message
        assert await _migrations.current(db_config) == _BEFORE
        # Postgres drops the INVALID index the failed build left (a unique one would go on
        # refusing duplicates); SQLite rolls the plain build back with everything else.
        assert await _index_state(db_config) is None
        await _delete_one_duplicate(db_config)
        done = await migrate(db_config, "head", downgrading=False, backup=False)
        assert done.after == _REVISION
        assert await _index_state(db_config) is True


@pytest.mark.postgres
async def test_an_invalid_index_left_by_a_crash_is_reported_and_rebuilt(
    postgres_config: StoreConfig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await _seed_origins(postgres_config, "same", "same", "other")
    # What a build cut short (the process killed) leaves: an INVALID index of that name.
    engine = sa.ext.asyncio.create_async_engine(
        postgres_config.url.get_secret_value(), isolation_level="AUTOCOMMIT"
    )
    try:
        async with engine.connect() as conn:
            with pytest.raises(sa.exc.IntegrityError):
                await conn.exec_driver_sql(
                    f"CREATE UNIQUE INDEX CONCURRENTLY {_INDEX} ON "
                    f'"{postgres_config.schema_name}".llmstore_usage_logs (origin)'
                )
    finally:
        await engine.dispose()
    assert await _index_state(postgres_config) is False
    diffs = [diff.description for diff in await _migrations.check(postgres_config)]
    assert f"invalid index: {_INDEX} (a concurrent build failed; `upgrade` rebuilds it)" in diffs

    await _delete_one_duplicate(postgres_config)
    with index_scripts(tmp_path, monkeypatch), caplog.at_level(logging.WARNING, "llmstore"):
        done = await migrate(postgres_config, "head", downgrading=False, backup=False)
        assert done.after == _REVISION
        assert await _index_state(postgres_config) is True
        assert await _migrations.check(postgres_config) == []
    rebuilt = [r.getMessage() for r in caplog.records if "left invalid" in r.getMessage()]
    assert rebuilt == [f"index {_INDEX} was left invalid by a failed build: rebuilding it"]


async def _delete_one_duplicate(config: StoreConfig) -> None:
    schema = config.schema_name

    def delete(conn: Connection) -> None:
        table = sa.table("llmstore_usage_logs", sa.column("id"), sa.column("origin"), schema=schema)
        first = conn.execute(sa.select(sa.func.min(table.c.id)).where(table.c.origin == "same"))
        conn.execute(sa.delete(table).where(table.c.id == first.scalar_one()))

    await _migrations.with_migration_connection(config, delete)


def _failing(revision: str, down: str, *, failing_up: bool) -> str:
    fails = 'op.execute("SELECT * FROM no_such_table_so_this_revision_fails")'
    return f"""\"\"\"Fails on the way {"up" if failing_up else "down"}.\"\"\"

from alembic import op

revision = "{revision}"
down_revision = "{down}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    {fails if failing_up else "pass"}


def downgrade() -> None:
    {"pass" if failing_up else fails}
"""


async def test_a_concurrent_index_revision_commits_as_soon_as_it_is_stamped(
    db_config: StoreConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await upgrade(db_config, "0003_api_keys_ledger")
    scripts = {
        _REVISION: _index_revision(),
        "0007_fails": _failing("0007_fails", _REVISION, failing_up=True),
    }
    with index_scripts(tmp_path, monkeypatch, scripts), pytest.raises(MigrationError) as raised:
        await migrate(db_config, "head", downgrading=False, backup=False)
    message = str(raised.value)
    assert "failed at revision 0007_fails" in message
    if db_config.driver == "postgresql":
        assert f"now at {_REVISION}: {_COMMITTED_ALONE}" in message
        assert await _migrations.current(db_config) == _REVISION
        assert await _index_state(db_config) is True  # the revision with its index
    else:
        assert "still at 0003_api_keys_ledger" in message
        assert await _migrations.current(db_config) == "0003_api_keys_ledger"


async def test_a_failed_downgrade_after_a_concurrent_drop_leaves_a_whole_revision(
    db_config: StoreConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Down from 0006 (the index) through 0005 (fails going down): never 0006 without its
    index, which no later upgrade would put back."""
    await upgrade(db_config)
    scripts = {
        "0006_fails_down": _failing("0006_fails_down", _BEFORE, failing_up=False),
        "0007_index": _index_revision("0007_index", "0006_fails_down"),
    }
    with index_scripts(tmp_path, monkeypatch, scripts):
        await migrate(db_config, "head", downgrading=False, backup=False)
        assert await _index_state(db_config) is True
        with pytest.raises(MigrationError) as raised:
            await migrate(db_config, _BEFORE, downgrading=True, backup=False)
        message = str(raised.value)
        assert "downgrade failed at revision 0006_fails_down" in message
        if db_config.driver == "postgresql":
            assert f"now at 0006_fails_down: {_COMMITTED_ALONE}" in message
            assert await _migrations.current(db_config) == "0006_fails_down"
            assert await _index_state(db_config) is None
        else:
            assert "still at 0007_index" in message
            assert await _migrations.current(db_config) == "0007_index"
            assert await _index_state(db_config) is True


def _revision(upgrade: str) -> str:
    return f'''"""A revision after head, written by a test."""

import sqlalchemy as sa
from alembic import op

from llmstore.migrations._ops import set_lock_timeout

revision = "{_REVISION}"
down_revision = "{head_revision()}"
branch_labels = None
depends_on = None


def upgrade() -> None:
{upgrade}


def downgrade() -> None:
    set_lock_timeout()
'''


@pytest.mark.postgres
async def test_a_revision_waiting_for_a_lock_gives_up_after_its_timeout(
    tmp_path: Path, postgres_config: StoreConfig
) -> None:
    await upgrade(postgres_config)
    alter = _revision(
        '    set_lock_timeout("300ms")\n'
        '    op.add_column("llmstore_projects", sa.Column("note", sa.Text()))'
    )
    blocker = sa.ext.asyncio.create_async_engine(postgres_config.url.get_secret_value())
    try:
        async with blocker.connect() as conn:
            # An open read holds projects' ACCESS SHARE lock; ALTER TABLE needs ACCESS EXCLUSIVE.
            schema = postgres_config.schema_name
            await conn.exec_driver_sql(f'SELECT count(*) FROM "{schema}".llmstore_projects')
            with (
                scripts_with(tmp_path, {_REVISION: alter}),
                pytest.raises(MigrationError, match="lock timeout") as raised,
            ):
                started = time.monotonic()
                await migrate(postgres_config, "head", downgrading=False, backup=False)
            assert time.monotonic() - started < 10
            await conn.rollback()
    finally:
        await blocker.dispose()
    assert f"failed at revision {_REVISION}" in str(raised.value)
    assert await _migrations.current(postgres_config) == _BEFORE


_REQUIRE_DEFAULT_TIMEOUT = f"""    op.execute(
        "DO $$ BEGIN IF current_setting('lock_timeout') <> '{DEFAULT_LOCK_TIMEOUT}' THEN "
        "RAISE EXCEPTION 'lock_timeout is %', current_setting('lock_timeout'); END IF; END $$"
    )"""


@pytest.mark.postgres
async def test_every_revision_runs_under_the_default_lock_timeout(
    tmp_path: Path, postgres_config: StoreConfig
) -> None:
    await upgrade(postgres_config)
    other = _revision(f'    set_lock_timeout("2s")\n{_REQUIRE_DEFAULT_TIMEOUT}')
    with (
        scripts_with(tmp_path / "other", {_REVISION: other}),
        pytest.raises(MigrationError, match="lock_timeout is 2s"),
    ):
        await migrate(postgres_config, "head", downgrading=False, backup=False)
    default = _revision(_REQUIRE_DEFAULT_TIMEOUT)
    with scripts_with(tmp_path / "default", {_REVISION: default}):
        done = await migrate(postgres_config, "head", downgrading=False, backup=False)
    assert done.after == _REVISION


@pytest.mark.postgres
async def test_a_migrator_waiting_for_the_lock_does_not_deadlock_a_concurrent_build(
    postgres_config: StoreConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second migrator waiting inside pg_advisory_lock() would hold a snapshot that
    CREATE INDEX CONCURRENTLY waits for; it polls instead, so both finish."""
    await _seed_origins(postgres_config, *(f"origin {n}" for n in range(2000)))
    with index_scripts(tmp_path, monkeypatch):
        runs = [migrate(postgres_config, "head", downgrading=False, backup=False) for _ in range(3)]
        done = await asyncio.gather(*runs)
    # One of them migrates; the others find the head already there.
    assert collections.Counter((d.before, d.after) for d in done) == {
        (_BEFORE, _REVISION): 1,
        (_REVISION, _REVISION): 2,
    }
    assert await _index_state(postgres_config) is True
