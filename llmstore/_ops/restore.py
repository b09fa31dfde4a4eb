"""Restoring a backup: all or nothing, after checking the file and backing up what is there.

Nothing is written until the file is known to be a whole backup of the right kind, at a
revision this code knows:

* SQLite: a database that passes ``PRAGMA integrity_check``. Postgres: a custom-format
  archive that ``pg_restore --list`` reads, holding llmstore's tables in the configured
  schema (``public`` without one), and read through once to the end.
* llmstore's revision, read from its version table (or its row in a host's
  ``alembic_version``, never the host's rows), names a revision of this code. A file
  without one (a database never migrated, or not llmstore's) is refused, and so is an
  unknown revision (a backup made by a newer llmstore): it could not be used, or even
  downgraded, by this code.
* Backups before revision 0005 (``UNPREFIXED_TABLES``) are refused: their tables have
  bare names (``projects``, ``api_keys``, ...) that a host's tables may have, in the live
  database or inside the backup (an older llmstore dumped the whole database), and a
  restore cannot tell them apart without guessing. Such a backup goes back by hand into a
  database of its own, is upgraded there, and that database's backup is restored. A live
  database still before 0005 is refused too: llmstore's tables there have the bare names a
  restore would leave behind; ``upgrade`` first.

Then the current database is backed up (``backup_database``, default name, so retention
applies), unless it holds no table; if that fails, nothing is restored. Then:

* SQLite: llmstore's tables only (with their indexes, triggers and AUTOINCREMENT marks) are
  replaced, in one write transaction checked before COMMIT (``_restore_sqlite``); a host's
  tables, views, indexes, triggers and rows in the same file are left as they are, and so
  is the file's page size.
* Postgres: one ``psql`` transaction drops llmstore's own tables (never the schema, which
  keeps its owner and grants; never with CASCADE, so what depends on them stops it) and
  loads ``pg_restore``'s script. Without a configured schema only the archive's entries
  that belong to llmstore's tables are loaded (``_own_entries``): a host's tables, views,
  sequences and indexes in ``public``, even in an archive that holds them, are neither
  dropped nor loaded. COMMIT is sent only after pg_restore has finished: psql's own
  ``--single-transaction`` commits whatever it has read when its input ends, even a
  script cut short, so it is not used. Any failure, of either program or of this
  process, leaves the database as it was.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from llmstore._core.config import StoreConfig
from llmstore._core.errors import BackupError
from llmstore._db.schema import VERSION_TABLE, metadata
from llmstore._db.traits import traits
from llmstore.migrations import _commands as _migrations
from llmstore.migrations._commands import MIGRATION_LOCK_ID

from .backup import (
    UNPREFIXED_TABLES,
    BackupFile,
    Progress,
    archive_revision,
    backup_database,
    libpq_target,
    pg_revision,
    pg_tool,
    run_tool,
    sqlite_revision,
)
from .restore_sqlite import restore_own_tables

#: ``progress(stage, done, total)``; stages are "checking" (Postgres), "backing up" and
#: "restoring"; done and total count tables (SQLite) or bytes of SQL (Postgres), total None
#: while unknown.
RestoreProgress = Callable[[str, int, int | None], object]

#: llmstore's tables: all that a restore into ``public`` drops and loads.
OWN_TABLES = frozenset({*metadata.tables, VERSION_TABLE})
_CHUNK = 1 << 16


@dataclass(frozen=True)
class Restored:
    """A finished restore: the file, the revision the database is at now, and the backup of
    the database as it was before (None when it held nothing)."""

    path: Path
    revision: str
    backup: BackupFile | None


def restore_database(
    config: StoreConfig, source: str | os.PathLike[str], *, progress: RestoreProgress | None = None
) -> Restored:
    """Replace the database's contents with the backup at ``source``.

    Raises BackupError, with the database left as it was, when the file is not a backup
    this code can restore, when the current database cannot be backed up first, or when
    the restore fails. Blocking: call it from a thread in async code.
    """
    path = Path(os.fspath(source))
    if config.is_memory:
        raise BackupError("an in-memory database cannot be restored into")
    if not path.is_file():
        raise BackupError(f"there is no backup file at {str(path)!r}")
    if traits(config.driver).single_file:
        return _restore_sqlite(config, path, progress)
    return _restore_postgres(config, path, progress)


def _known_revision(path: Path, revision: str | None) -> str:
    if revision is None:
        raise BackupError(
            f"{str(path)!r} holds no llmstore schema revision (a database never migrated, "
            "or not an llmstore backup); nothing was restored"
        )
    if revision in UNPREFIXED_TABLES:
        raise BackupError(
            f"{str(path)!r} is at revision {revision}, made before llmstore's tables got "
            "their llmstore_ names (revision 0005), so its tables could be taken for your "
            "application's: put it back by hand into a database of its own (copy the SQLite "
            "file; pg_restore the archive into an empty database), run `python -m llmstore "
            "upgrade` there, back that up and restore the new backup; nothing was restored"
        )
    if not _migrations.is_known(revision):
        raise BackupError(
            f"{str(path)!r} is at revision {revision!r}, unknown to this version of llmstore "
            f"(newest: {_migrations.head_revision()}): restore it with the llmstore that "
            "made it; nothing was restored"
        )
    return revision


def _refuse_unprefixed_live(revision: str | None) -> None:
    """A live database still before 0005 has llmstore's tables under the bare names, which
    a restore of prefixed ones would leave behind beside them: it is upgraded first."""
    if revision in UNPREFIXED_TABLES:
        raise BackupError(
            f"the database is at revision {revision}, before llmstore's tables got their "
            "llmstore_ names: run `python -m llmstore upgrade` first; nothing was restored"
        )


def _stage(progress: RestoreProgress | None, stage: str) -> Progress | None:
    if progress is None:
        return None
    return lambda done, total: progress(stage, done, total)


def _backup_first(
    config: StoreConfig, holds_data: bool, progress: RestoreProgress | None
) -> BackupFile | None:
    if not holds_data:
        return None
    try:
        return backup_database(config, progress=_stage(progress, "backing up"))
    except BackupError as exc:
        raise BackupError(
            f"the current database could not be backed up, so nothing was restored: {exc}"
        ) from exc


@contextlib.contextmanager
def _naming(made: BackupFile | None) -> Iterator[None]:
    """A failure past this point names the backup just taken."""
    try:
        yield
    except BackupError as exc:
        if made is None:
            raise
        raise BackupError(f"{exc} (the backup taken first: {made.path})") from exc


# --- SQLite ----------------------------------------------------------------------------------


def _restore_sqlite(config: StoreConfig, path: Path, progress: RestoreProgress | None) -> Restored:
    live = Path(config.sqlite_path or "")
    if live.exists() and live.samefile(path):
        raise BackupError(f"{str(path)!r} is the database itself")
    if not live.exists() and Path(f"{live}-wal").exists():
        raise BackupError(f"{str(live)!r} is missing but its -wal file is not: move it away first")
    revision = _read_sqlite_backup(path)
    _refuse_unprefixed_live(_live_sqlite_revision(config, live))
    made = _backup_first(config, _sqlite_holds_tables(config, live), progress)
    with _naming(made):
        restore_own_tables(config, path, _stage(progress, "restoring"))
    return Restored(path, revision, made)


def _open_read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)


def _read_sqlite_backup(path: Path) -> str:
    """The backup's revision, once it has passed its integrity check."""
    try:
        conn = _open_read_only(path)
        try:
            problems = [row[0] for row in conn.execute("PRAGMA integrity_check")]
            revision = sqlite_revision(conn)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise BackupError(f"{str(path)!r} is not a SQLite backup: {exc}") from None
    if problems != ["ok"]:
        raise BackupError(f"{str(path)!r} failed its integrity check: {problems[0]}")
    return _known_revision(path, revision)


def _live_sqlite_revision(config: StoreConfig, live: Path) -> str | None:
    if not live.exists():
        return None
    try:
        conn = sqlite3.connect(live, timeout=config.busy_timeout)
        try:
            return sqlite_revision(conn)
        finally:
            conn.close()
    except sqlite3.Error:
        return None  # unreadable: _sqlite_holds_tables says so


def _sqlite_holds_tables(config: StoreConfig, live: Path) -> bool:
    if not live.exists():
        return False
    try:
        conn = sqlite3.connect(live, timeout=config.busy_timeout)
        try:
            row = conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'")
            return int(row.fetchone()[0]) > 0
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise BackupError(
            f"cannot read the current database {str(live)!r}, so nothing was restored: {exc}; "
            "to restore over a damaged database, move it (with its -wal and -shm files) away"
        ) from None


# --- Postgres --------------------------------------------------------------------------------

# A line of ``pg_restore --list`` for an object in public that may belong to a table.
_ENTRY = re.compile(
    r"^\d+; \d+ \d+ (?P<kind>TABLE DATA|TABLE|FK CONSTRAINT|CONSTRAINT|DEFAULT|TRIGGER|INDEX"
    r"|SEQUENCE OWNED BY|SEQUENCE SET|SEQUENCE|ACL|COMMENT) public (?P<tag>.+) \S+$"
)
# Statements of the archive's script that tie an index or a sequence to its table.
_INDEX_ON = re.compile(r"CREATE (?:UNIQUE )?INDEX (\S+) ON (?:ONLY )?public\.(\S+) ")
_SEQUENCE_OF = re.compile(r"ALTER SEQUENCE public\.(\S+) OWNED BY public\.([^.\s]+)\.")
_IDENTITY = re.compile(
    r"ALTER TABLE (?:ONLY )?public\.(\S+) ALTER COLUMN \S+ ADD GENERATED [^;]*?"
    r"SEQUENCE NAME public\.([^\s;]+)"
)


def _restore_postgres(
    config: StoreConfig, path: Path, progress: RestoreProgress | None
) -> Restored:
    schema = config.schema_name or "public"
    restore = pg_tool("pg_restore")
    try:
        listing = run_tool([restore, "--list", str(path)], dict(os.environ), "pg_restore")
    except BackupError as exc:
        raise BackupError(f"{str(path)!r} is not a pg_dump custom-format archive: {exc}") from None
    held = set(re.findall(rf"^\d+; \d+ \d+ TABLE (\S+) {VERSION_TABLE} ", listing, re.MULTILINE))
    if schema not in held:
        # An archive of an older llmstore has its revision in alembic_version: say that.
        old = archive_revision(path, listing=listing, schema=schema)
        if old in UNPREFIXED_TABLES:
            _known_revision(path, old)  # raises, saying so
        raise BackupError(
            f"{str(path)!r} holds no llmstore tables in schema {schema!r} (it holds "
            f"{', '.join(sorted(held)) or 'none'}): restoring it would write elsewhere"
        )
    revision = _known_revision(path, archive_revision(path, schema=schema))
    _refuse_unprefixed_live(pg_revision(config)[0])
    with tempfile.TemporaryDirectory(prefix="llmstore-restore-") as tmp:
        command = [restore, "--no-owner", f"--schema={schema}", "--file=-"]
        if config.schema_name is None:
            chosen = Path(tmp) / "entries.list"
            chosen.write_text(_own_entries(listing, path))
            command.append(f"--use-list={chosen}")
        command.append(str(path))
        checking = _stage(progress, "checking")
        if checking is not None:
            checking(0, None)
        size = _stream(command, lambda chunk: None)  # the whole archive reads, and its size
        made = _backup_first(config, _pg_holds_tables(config), progress)
        with _naming(made):
            _load(config, command, size, _stage(progress, "restoring"))
    return Restored(path, revision, made)


def _own_entries(listing: str, path: Path) -> str:
    """The entries of ``public`` that belong to llmstore's tables, as a ``--use-list``."""
    script = run_tool(
        [pg_tool("pg_restore"), "--schema-only", "--schema=public", "--file=-", str(path)],
        dict(os.environ),
        "pg_restore",
    )
    table_of = {name: name for name in OWN_TABLES}
    table_of.update(_INDEX_ON.findall(script) + _SEQUENCE_OF.findall(script))
    table_of.update((sequence, table) for table, sequence in _IDENTITY.findall(script))
    kept = []
    for line in listing.splitlines():
        entry = _ENTRY.match(line)
        if entry is None:
            continue
        words = entry["tag"].split(" ")  # ACL and COMMENT tags: "TABLE name", "COLUMN t.c"
        name = words[-1] if entry["kind"] in ("ACL", "COMMENT") else words[0]
        if table_of.get(name.split(".")[0]) in OWN_TABLES:
            kept.append(line)
    return "\n".join(kept) + "\n"


def _pg_holds_tables(config: StoreConfig) -> bool:
    target, environ = libpq_target(config)
    query = "SELECT count(*) FROM pg_catalog.pg_tables WHERE schemaname = "
    if config.schema_name is not None:
        query += f"'{config.schema_name}'"  # letters, digits and underscores (StoreConfig)
    else:
        query += f"'public' AND tablename IN ({', '.join(map(repr, sorted(OWN_TABLES)))})"
    psql = [pg_tool("psql"), "--no-psqlrc", "--quiet", "--tuples-only", "--no-align"]
    count = run_tool([*psql, f"--command={query}", target], environ, "psql")
    return int(count.strip() or 0) > 0


def _prelude(config: StoreConfig) -> bytes:
    """Opens the transaction, shuts migrations out, and drops what the archive replaces."""
    # Tried, not waited for: a statement waiting for the lock would hold a snapshot that a
    # migration's concurrent index build waits for, a deadlock.
    lines = [
        "BEGIN;",
        f"DO $$ BEGIN IF NOT pg_try_advisory_xact_lock({MIGRATION_LOCK_ID}) THEN RAISE "
        "EXCEPTION 'a migration is running on this database: restore once it has finished'; "
        "END IF; END $$;",
    ]
    schema = config.schema_name or "public"
    if config.schema_name is not None:
        # Kept, not dropped and made anew: with its owner and the grants proxies rely on.
        lines.append(f'CREATE SCHEMA IF NOT EXISTS "{schema}";')
    # Only llmstore's own tables (with their indexes, constraints and sequences), never
    # CASCADE: whatever else depends on them, here or in another schema, stops the restore.
    tables = ", ".join(f'"{schema}"."{name}"' for name in sorted(OWN_TABLES))
    lines.append(f"DROP TABLE IF EXISTS {tables};")
    return ("\n".join(lines) + "\n").encode()


def _load(config: StoreConfig, command: list[str], size: int, progress: Progress | None) -> None:
    """Pipe pg_restore's script into psql between the prelude and COMMIT."""
    target, environ = libpq_target(config)
    prelude, commit = _prelude(config), b"COMMIT;\n"
    total = len(prelude) + size + len(commit)
    psql = [pg_tool("psql"), "--no-psqlrc", "--quiet", "--set=ON_ERROR_STOP=1", target]
    with tempfile.TemporaryFile() as errors:
        try:
            loader = subprocess.Popen(
                psql, env=environ, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors
            )
        except OSError as exc:
            raise BackupError(f"could not run psql: {exc}") from None
        assert loader.stdin is not None
        sent = 0

        def send(chunk: bytes) -> None:
            nonlocal sent
            assert loader.stdin is not None
            loader.stdin.write(chunk)
            sent += len(chunk)
            if progress is not None:
                progress(sent, total)

        try:
            send(prelude)
            if _stream(command, send) != size:
                raise BackupError(f"{command[-1]!r} changed while it was being restored")
            send(commit)
        except BrokenPipeError:
            pass  # psql stopped at an error, which it reported: below
        except BaseException:
            loader.kill()  # before its input ends: it never sees the end, so never commits
            raise
        finally:
            with contextlib.suppress(OSError):
                loader.stdin.close()
            code = loader.wait()
        if code != 0 or sent != total:
            raise BackupError(
                f"psql failed: {_reason(errors)}; nothing was restored, the database was "
                "left as it was"
            )


def _stream(command: list[str], sink: Callable[[bytes], object]) -> int:
    """Run ``command`` (pg_restore), passing its output to ``sink``; the bytes passed."""
    with tempfile.TemporaryFile() as errors:
        try:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors)
        except OSError as exc:
            raise BackupError(f"could not run pg_restore: {exc}") from None
        assert process.stdout is not None
        passed = 0
        try:
            while chunk := process.stdout.read(_CHUNK):
                sink(chunk)
                passed += len(chunk)
        except BaseException:
            process.kill()
            raise
        finally:
            process.stdout.close()
            process.wait()
        if process.returncode != 0:
            raise BackupError(f"pg_restore failed: {_reason(errors)}")
    return passed


def _reason(errors: IO[bytes]) -> str:
    """The first error line a program wrote, else its last line."""
    errors.seek(0)
    lines = [line.strip() for line in errors.read().decode(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    failing = [line for line in lines if "ERROR:" in line or "FATAL:" in line or "error:" in line]
    return (failing or lines or ["no message"])[0]
