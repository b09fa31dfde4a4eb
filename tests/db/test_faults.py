"""Faults the store must come back from on every driver: a COMMIT that fails, a full disk,
a transaction cancelled while another process holds SQLite's write lock, connections the
server terminated, a read-only database, and a store used from the wrong event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from llmstore import (
    DatabaseUnavailableError,
    EventLoopError,
    LlmstoreError,
    Store,
    StoreConfig,
    UsageRecord,
    generate_key,
)
from llmstore._db.schema import projects, tokens, usage_logs
from llmstore.pytest_plugin import run_sql
from tests.helpers import execute, qualified, require_postgres, terminate_backends

# --- helpers -------------------------------------------------------------------------------


async def _everything_works(store: Store, marker: str) -> None:
    """Every kind of write the issue names succeeds at the first try."""
    key = (await store.api_keys.create(1_000)).key
    await store.api_keys.charge(key.id, 10)
    hold = await store.api_keys.reserve(key.id, 100)
    await store.api_keys.settle(hold.id, 40)
    result = await store.usage.record_many([UsageRecord(model=marker, cost=1) for _ in range(3)])
    assert result.written == 3
    async with store.transaction() as tx:
        project = await tx.projects.create(f"{marker}-project")
        await tx.api_keys.deposit(key.id, 5)
    assert (await store.projects.get(project.id)).name == f"{marker}-project"
    after = await store.api_keys.get(key.id)
    assert (after.balance, after.reserved) == (1_000 - 10 - 40 + 5, 0)
    assert (await store.api_keys.verify()).ok


async def _refuse_token_updates_at_commit(store: Store) -> uuid.UUID:
    """A token whose updates succeed and whose COMMIT fails, made with the driver's own
    means: on SQLite a trigger adds a row that breaks a deferred foreign key, which SQLite
    checks at COMMIT (and keeps the transaction open when it fails); Postgres runs a
    deferred constraint trigger there."""
    project = await store.projects.create(f"p-{uuid.uuid4().hex[:6]}")
    token = (await store.tokens.create(project.id)).token
    if store.driver == "sqlite":
        statements = [
            f"CREATE TABLE refuse_at_commit (project_id REFERENCES {projects.name}(id) "
            "DEFERRABLE INITIALLY DEFERRED)",
            f"CREATE TRIGGER refuse_at_commit AFTER UPDATE ON {tokens.name} "
            "BEGIN INSERT INTO refuse_at_commit VALUES ('no such project'); END",
        ]
    else:
        function = qualified(store, "refuse_at_commit")
        statements = [
            f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql "
            "AS $$ BEGIN RAISE EXCEPTION 'refused at commit'; END $$",
            f"CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER UPDATE ON "
            f"{qualified(store, tokens.name)} DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
            f"EXECUTE FUNCTION {function}()",
        ]
    await execute(store, *statements)
    return token.id


def _rename(token_id: uuid.UUID) -> Callable[[Connection], None]:
    def rename(conn: Connection) -> None:
        conn.execute(tokens.update().where(tokens.c.id == token_id).values(name="doomed"))

    return rename


# --- a COMMIT that fails -------------------------------------------------------------------


async def test_a_failed_commit_leaves_the_store_usable(store: Store) -> None:
    doomed = _rename(await _refuse_token_updates_at_commit(store))
    for _ in range(2):
        with pytest.raises(LlmstoreError):
            await run_sql(store, doomed, write=True)
    names = await run_sql(
        store, lambda conn: conn.execute(sa.select(tokens.c.name)).scalars().all(), write=True
    )
    assert "doomed" not in names  # nothing of the failed unit was kept
    await _everything_works(store, "after-commit-failure")


async def test_a_failed_commit_of_a_transaction_leaves_the_store_usable(store: Store) -> None:
    token_id = await _refuse_token_updates_at_commit(store)
    with pytest.raises(LlmstoreError):
        async with store.transaction() as tx:
            await tx.tokens.update(token_id, name="doomed")
    assert (await store.tokens.get(token_id)).name != "doomed"
    await _everything_works(store, "after-transaction-commit-failure")


# --- a full disk ---------------------------------------------------------------------------


@contextlib.contextmanager
def _small_disk(path: Path, size: str = "4m") -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path``: a disk that really fills up. Needs root."""
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        path.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder: Path) -> Path:
    """Write a ballast file until the disk has no room left."""
    ballast = folder / "ballast"
    descriptor = os.open(ballast, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (65536, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(descriptor, b"\0" * size)
    finally:
        os.close(descriptor)
    return ballast


def _marked(marker: str, count: int) -> list[UsageRecord]:
    return [UsageRecord(model="m", metadata={"m": marker, "i": i}) for i in range(count)]


async def test_a_full_disk_fails_writes_cleanly_and_every_row_lands_once_space_returns(
    tmp_path: Path,
) -> None:
    with _small_disk(tmp_path / "disk") as disk:
        url = f"sqlite:///{disk / 'llmstore.db'}"
        async with Store.from_url(url, encryption_keys=generate_key(), auto_upgrade=True) as store:
            key = (await store.api_keys.create(10_000)).key
            ballast = _fill(disk)
            # Each write fails on its own, with an llmstore error; none wedges the store.
            for _ in range(3):
                with pytest.raises(LlmstoreError):
                    await store.usage.record_many(_marked("big", 200))
                with pytest.raises(LlmstoreError):
                    async with store.transaction() as tx:
                        await tx.usage.record_many(_marked("tx", 200))
            writer = store.usage.writer(max_batch=50, flush_interval=0.01, max_pending=1_000)
            records = _marked("writer", 300)
            for record in records:
                await writer.put(record)
            deadline = time.monotonic() + 30
            while writer.stats.failed_attempts < 3:
                assert time.monotonic() < deadline, "the writer never met the full disk"
                await asyncio.sleep(0.01)
            assert writer.stats.rejected == 0  # a full disk is no reason to refuse rows
            ballast.unlink()
            await writer.close()  # retries until the database takes every batch
            stats = writer.stats
            assert (stats.written, stats.rejected, stats.pending) == (300, 0, 0)
            stored = await run_sql(
                store,
                lambda conn: conn.execute(sa.select(usage_logs.c.usage_metadata)).scalars().all(),
                write=True,
            )
            markers = sorted(row["i"] for row in stored if row and row["m"] == "writer")
            assert markers == list(range(300))  # each row exactly once
            assert not [row for row in stored if row and row["m"] in ("big", "tx")]
            await store.api_keys.charge(key.id, 1)
            await _everything_works(store, "after-full-disk")
            assert (await store.health_check()).driver == "sqlite"


@contextlib.contextmanager
def _read_only_view(folder: Path, view: Path) -> Iterator[Path]:
    """``folder`` seen read-only at ``view`` (a read-only bind mount). Needs root."""
    view.mkdir()
    done = subprocess.run(["mount", "--bind", str(folder), str(view)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True)
        yield view
    finally:
        subprocess.run(["umount", "-l", str(view)], check=False)


async def test_a_read_only_file_makes_the_health_check_fail(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    writable = f"sqlite:///{folder / 'llmstore.db'}"
    async with Store.from_url(writable, auto_upgrade=True) as keeper:
        await keeper.projects.create("before")  # keeps the WAL and its index open
        with _read_only_view(folder, tmp_path / "read-only") as view:
            async with Store.from_url(f"sqlite:///{view / 'llmstore.db'}") as store:
                assert [p.name for p in await store.projects.list()] == ["before"]
                with pytest.raises(DatabaseUnavailableError, match="read-only"):
                    await store.health_check()
                with pytest.raises(DatabaseUnavailableError, match="read-only"):
                    await store.projects.create("nowhere")
        await keeper.health_check()
        assert [p.name for p in await keeper.projects.list()] == ["before"]


# --- cancelling while another process holds SQLite's write lock ----------------------------

_HOLD_WRITE_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("held", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""


@contextlib.contextmanager
def _write_lock_held_by_another_process(path: Path) -> Iterator[subprocess.Popen[str]]:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_WRITE_LOCK, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        assert holder.stdin is not None and holder.stdout is not None
        with contextlib.suppress(BrokenPipeError):
            holder.stdin.write("\n")
            holder.stdin.close()
        holder.wait(timeout=30)
        holder.stdout.close()


@contextlib.asynccontextmanager
async def _sqlite_store(kind: str, path: Path) -> AsyncIterator[Store]:
    """llmstore's own SQLite engine, or a host application's aiosqlite engine."""
    async with Store.from_url(f"sqlite:///{path}", auto_upgrade=True):
        pass  # migrated
    if kind == "own":
        async with Store.from_url(f"sqlite:///{path}", busy_timeout=10) as store:
            yield store
        return
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}", connect_args={"timeout": 10})
    try:
        async with Store.from_engine(engine) as store:
            yield store
    finally:
        await engine.dispose()


async def _in_a_transaction(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.projects.create("cancelled-in-transaction")


async def _alone(store: Store) -> None:
    await store.projects.create("cancelled-alone")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["own", "host-aiosqlite"])
@pytest.mark.parametrize("operation", [_in_a_transaction, _alone], ids=["transaction", "alone"])
async def test_cancelling_while_another_process_holds_the_write_lock_takes_effect_at_once(
    kind: str, operation: Callable[[Store], Awaitable[None]], tmp_path: Path
) -> None:
    path = tmp_path / "llmstore.db"
    async with _sqlite_store(kind, path) as store:
        with _write_lock_held_by_another_process(path):
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await operation(store)
            late = time.monotonic() - started - 0.3
            assert late < 0.1, f"the cancellation took effect {late:.3f} s late"
        # The lock is free again: the store works, and the cancelled work left nothing.
        async with store.transaction() as tx:
            await tx.projects.create("after")
        names = {project.name for project in await store.projects.list()}
        assert "after" in names
        assert "cancelled-in-transaction" not in names


# --- connections the server terminated (a restart, a failover) -----------------------------


@contextlib.asynccontextmanager
async def _own_database() -> AsyncIterator[str]:
    """A database of its own, so that every backend in it is the test's to terminate."""
    url = require_postgres()
    name = f"llmstore_fault_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        target = sa.make_url(StoreConfig.from_url(url).url.get_secret_value()).set(database=name)
        yield target.render_as_string(hide_password=False)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _terminate_all(database_url: str) -> int:
    """Terminate every backend of the database and wait until they are gone."""
    name = sa.make_url(database_url).database
    admin = await asyncpg.connect(require_postgres())
    try:
        rows = await admin.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", name)
    finally:
        await admin.close()
    terminated = await terminate_backends(pid for (pid,) in rows)
    await asyncio.sleep(0.05)  # the client side sees the closed sockets
    return terminated


@pytest.mark.postgres
async def test_after_every_connection_is_terminated_the_next_calls_succeed() -> None:
    async with (
        _own_database() as url,
        Store.from_url(url, encryption_keys=generate_key(), auto_upgrade=True) as store,
    ):
        project = await store.projects.create("p")
        issued = await store.tokens.create(project.id)
        key = (await store.api_keys.create(1_000)).key
        # Fill the pool and the lean path's held connections.
        await asyncio.gather(*(store.projects.get(project.id) for _ in range(6)))
        await asyncio.gather(*(store.tokens.use(issued.secret) for _ in range(6)))
        await asyncio.gather(*(store.api_keys.charge(key.id, 1) for _ in range(6)))
        for round_ in range(2):
            assert await _terminate_all(url) >= 2
            # Each call is the first on its path since the restart, and must succeed.
            assert (await store.projects.get(project.id)).name == "p"
            assert (await store.tokens.use(issued.secret)).request_count == 7 + round_
            await store.api_keys.charge(key.id, 1)
            async with store.transaction() as tx:
                await tx.api_keys.deposit(key.id, 1)
            await store.health_check()
            async with store.usage.writer(flush_interval=0.01) as writer:
                await writer.put(UsageRecord(model=f"after-restart-{round_}"))
            assert writer.stats.failed_attempts == 0
        assert (await store.api_keys.get(key.id)).balance == 1_000 - 6 - 2 + 2
        assert (await store.api_keys.verify()).ok


@pytest.mark.postgres
async def test_a_read_only_postgres_makes_the_health_check_fail() -> None:
    async with (
        _own_database() as url,
        Store.from_url(url, encryption_keys=generate_key(), auto_upgrade=True) as store,
    ):
        await store.health_check()
        name = sa.make_url(url).database
        admin = await asyncpg.connect(require_postgres())
        try:
            await admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
            await _terminate_all(url)  # new connections get the setting
            with pytest.raises(DatabaseUnavailableError, match="read-only"):
                await store.health_check()
            await admin.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
            await _terminate_all(url)
        finally:
            await admin.close()
        await store.health_check()


# --- the wrong event loop ------------------------------------------------------------------


async def test_a_store_used_from_another_event_loop_says_so(store: Store) -> None:
    project = await store.projects.create("home")
    errors: list[BaseException] = []

    def elsewhere() -> None:
        async def use() -> None:
            for call in (
                lambda: store.projects.get(project.id),
                lambda: store.projects.create("away"),
                lambda: store.health_check(),
                lambda: store.close(),
            ):
                try:
                    await call()
                except BaseException as exc:
                    errors.append(exc)

        asyncio.run(use())

    thread = threading.Thread(target=elsewhere)
    thread.start()
    await asyncio.to_thread(thread.join)
    assert [type(error) for error in errors] == [EventLoopError] * 4
    # Nothing was closed or written from there: the store goes on in its own loop.
    assert (await store.projects.get(project.id)).name == "home"
    assert [p.name for p in await store.projects.list()] == ["home"]
