"""One migrator at a time: replicas that start together and each run ``upgrade`` wait for
one another (Postgres: the advisory lock; SQLite: the write lock), and the later ones find
the database at head and do nothing. Real processes, started together, on SQLite (file)
and Postgres."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from llmstore import StoreConfig
from llmstore._db.schema import VERSION_TABLE
from llmstore._ops.backup import archive_revision
from llmstore.migrations._commands import MIGRATION_LOCK_ID, check, current, head_revision, upgrade
from llmstore.migrations._ops import DEFAULT_LOCK_TIMEOUT

from .data_support import assert_rows_intact, on_database, seed

pytestmark = pytest.mark.slow

REPLICAS = 4
HOLD_SECONDS = 2.0
_LOCK_TIMEOUT_SECONDS = float(DEFAULT_LOCK_TIMEOUT.removesuffix("s"))
TIMEOUT = 90.0
FIRST = "0001_projects"
BEFORE_HEAD = "0003_api_keys_ledger"

# A replica: import everything (the slow part) and say so, wait for the go file, then run
# the command line's ``upgrade`` and report when it started and ended.
WORKER = """
import sys, time
from pathlib import Path
from llmstore._cli import main as _cli
from llmstore.migrations import _commands as _migrations
_migrations.head_revision()
go = Path(sys.argv[1])
print("ready", flush=True)
deadline = time.monotonic() + 60
while not go.exists():
    if time.monotonic() > deadline:
        sys.exit("the go file never appeared")
    time.sleep(0.002)
started = time.time()
code = _cli.main(["upgrade", *sys.argv[2:]])
sys.stdout.flush()
print(f"times {started!r} {time.time()!r}", flush=True)
sys.exit(code)
"""


@dataclass(frozen=True)
class Replica:
    code: int
    line: str  # what ``upgrade`` printed
    stderr: str
    started: float
    ended: float


def _environ(config: StoreConfig, backup_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["DATABASE_URL"] = config.url.get_secret_value()
    env.pop("DATABASE_SCHEMA", None)
    if config.schema_name:
        env["DATABASE_SCHEMA"] = config.schema_name
    env["LLMSTORE_BACKUP_DIR"] = str(backup_dir)
    env["LLMSTORE_ENV"] = "dev"
    return env


@contextlib.contextmanager
def replicas(count: int, env: dict[str, str], go: Path) -> Iterator[list[subprocess.Popen[str]]]:
    """``count`` worker processes, each past its imports and waiting for ``go``."""
    processes: list[subprocess.Popen[str]] = []
    try:
        for _ in range(count):
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-c", WORKER, str(go)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for process in processes:
            assert process.stdout is not None
            first = process.stdout.readline().strip()
            if first != "ready":
                process.kill()
                _, err = process.communicate(timeout=TIMEOUT)
                pytest.fail(f"a replica did not start: {first!r} {err}")
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=TIMEOUT)


def _finish(processes: list[subprocess.Popen[str]]) -> list[Replica]:
    done = []
    for process in processes:
        out, err = process.communicate(timeout=TIMEOUT)
        lines = out.splitlines()
        times = [line for line in lines if line.startswith("times ")]
        assert len(times) == 1, f"exit {process.returncode}: {out!r} {err!r}"
        started, ended = (float(value) for value in times[0].split()[1:])
        printed = [line for line in lines if not line.startswith("times ")]
        assert process.returncode == 0, f"a replica failed ({process.returncode}): {err}"
        assert len(printed) == 1, f"one line expected from upgrade: {out!r}"
        done.append(Replica(process.returncode, printed[0], err, started, ended))
    return done


def run_together(config: StoreConfig, backup_dir: Path, go: Path) -> list[Replica]:
    with replicas(REPLICAS, _environ(config, backup_dir), go) as processes:
        go.touch()
        done = _finish(processes)
    # They raced: every one had begun before the first had finished.
    assert max(r.started for r in done) < min(r.ended for r in done), done
    return done


async def _version_rows(config: StoreConfig) -> list[str]:
    return await on_database(
        config,
        lambda conn: [
            row[0] for row in conn.exec_driver_sql(f"SELECT version_num FROM {VERSION_TABLE}")
        ],
    )


def _backup_folder(config: StoreConfig, tmp_path: Path) -> Path:
    if config.driver == "sqlite":
        return Path(config.sqlite_path or "").parent / "backups"
    return tmp_path / "dumps"


def _revision_in(backup: Path, config: StoreConfig) -> str | None:
    if config.driver == "postgresql":
        return archive_revision(backup)
    copy = sqlite3.connect(backup)
    try:
        return str(copy.execute(f"SELECT version_num FROM {VERSION_TABLE}").fetchone()[0])
    finally:
        copy.close()


async def test_replicas_upgrading_an_empty_database_migrate_once(
    db_config: StoreConfig, tmp_path: Path
) -> None:
    head = head_revision()
    done = await asyncio.to_thread(run_together, db_config, tmp_path / "dumps", tmp_path / "go")
    lines = [r.line for r in done]
    upgraded = [line for line in lines if line.endswith(f": upgraded from empty to {head}")]
    waited = [line for line in lines if line.endswith(f": already at {head}")]
    assert (len(upgraded), len(waited)) == (1, REPLICAS - 1), lines
    assert await current(db_config) == head
    assert await check(db_config) == []
    assert await _version_rows(db_config) == [head]
    assert not _backup_folder(db_config, tmp_path).exists()  # nothing to back up


async def test_replicas_upgrading_a_database_with_rows_back_it_up_once(
    db_config: StoreConfig, tmp_path: Path
) -> None:
    head = head_revision()
    await upgrade(db_config, BEFORE_HEAD)
    seeded = await seed(db_config, BEFORE_HEAD)
    folder = _backup_folder(db_config, tmp_path)
    done = await asyncio.to_thread(run_together, db_config, tmp_path / "dumps", tmp_path / "go")
    lines = [r.line for r in done]
    upgraded = [
        line for line in lines if f": upgraded from {BEFORE_HEAD} to {head} (backup: " in line
    ]
    waited = [line for line in lines if line.endswith(f": already at {head}")]
    assert (len(upgraded), len(waited)) == (1, REPLICAS - 1), lines
    backups = sorted(folder.iterdir())
    assert len(backups) == 1, backups
    assert upgraded[0].endswith(f"(backup: {backups[0]})")
    assert _revision_in(backups[0], db_config) == BEFORE_HEAD
    assert await _version_rows(db_config) == [head]
    await assert_rows_intact(db_config, seeded, head)


@contextlib.asynccontextmanager
async def migration_lock_held(config: StoreConfig) -> AsyncIterator[None]:
    """Hold what a migrator needs, from another connection: on Postgres the advisory lock at
    session level (which blocks session- and transaction-level takers alike), on SQLite the
    write lock."""
    if config.driver == "sqlite":
        holder = sqlite3.connect(config.sqlite_path or "", isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            yield
            holder.execute("ROLLBACK")
        finally:
            holder.close()
        return
    engine = create_async_engine(config.url.get_secret_value(), poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            lock = {"id": MIGRATION_LOCK_ID}
            await conn.execute(sa.text("SELECT pg_advisory_lock(:id)"), lock)
            try:
                yield
            finally:
                await conn.execute(sa.text("SELECT pg_advisory_unlock(:id)"), lock)
    finally:
        await engine.dispose()


async def test_a_replica_waits_for_the_migration_lock_and_then_upgrades(
    db_config: StoreConfig, tmp_path: Path
) -> None:
    head = head_revision()
    await upgrade(db_config, FIRST)
    go = tmp_path / "go"
    env = _environ(db_config, tmp_path / "dumps")
    with replicas(1, env, go) as processes:
        async with migration_lock_held(db_config):
            go.touch()
            # On Postgres, past the migration's lock timeout: waiting for another migrator
            # must not time out (the lock is taken before the timeout is set).
            postgres = db_config.driver == "postgresql"
            await asyncio.sleep(_LOCK_TIMEOUT_SECONDS + 0.5 if postgres else HOLD_SECONDS)
            still_waiting = processes[0].poll() is None
            released = time.time()
        [replica] = await asyncio.to_thread(_finish, processes)
    assert still_waiting, f"the replica did not wait for the lock: {replica}"
    assert replica.started < released < replica.ended
    assert f": upgraded from {FIRST} to {head}" in replica.line, replica.line
    assert await current(db_config) == head
    assert await _version_rows(db_config) == [head]
