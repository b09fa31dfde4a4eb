"""Restoring backups on both drivers: every row comes back and the database is backed up
first; a file that cannot be restored changes nothing; the command line guards prod and
says what to do next."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from llmstore import BackupError, Store, StoreConfig
from llmstore._cli.main import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from llmstore._db.schema import VERSION_TABLE, metadata
from llmstore.migrations import _commands as _migrations
from llmstore.migrations._commands import head_revision, upgrade
from tests.ops.restore_support import (
    _backup_to,
    _backups_taken,
    _change_rows,
    _execute,
    _restore_file,
    _seeded_backup,
)
from tests.snapshots import seed, snapshot

SECOND = "0002_tokens_audit_providers"


@pytest.fixture
def config(db_config: StoreConfig, tmp_path: Path) -> StoreConfig:
    """``db_config`` (a SQLite file, or a fresh Postgres schema) with its dumps in tmp_path."""
    return db_config.model_copy(update={"backup_dir": str(tmp_path / "dumps")})


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
