"""Backups of the database: before every upgrade and downgrade, and on demand.

SQLite: the online backup API copies the database page by page from one read transaction
held open for the whole copy, so the copy is one consistent snapshot and other connections
keep reading and writing meanwhile (WAL). The copy is checked with ``PRAGMA
integrity_check``, switched to a rollback journal (one self-contained file), fsynced, and
only then given its name: a file named ``*.backup`` is always complete.

Postgres: ``pg_dump`` in custom format, of the configured schema when there is one, else of
llmstore's own tables in ``public`` (``llmstore_*``, with their sequences and the version
table: a host's tables, views and sequences there are not llmstore's). A database still at
a revision before 0005 has llmstore's tables under their bare names: those of its revision
(``UNPREFIXED_TABLES``) and the version table holding llmstore's row are dumped instead, so
the backup taken before the upgrade to 0005 is whole. The password reaches ``pg_dump``
through ``PGPASSWORD``, never the command line. The archive is checked by listing it with
``pg_restore --list``.

Default names sort by time: ``<name>.YYYYMMDD_HHMMSS_mmm.backup``, in ``backups/`` beside
the SQLite file, or in ``LLMSTORE_BACKUP_DIR`` (default ``./backups``) for Postgres. After
each new default-named backup, those of the same database beyond the newest
``LLMSTORE_BACKUP_KEEP`` (default 10) are deleted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from llmstore._core.config import StoreConfig
from llmstore._core.errors import BackupError
from llmstore._core.files import fsync_directory
from llmstore._db.schema import LEGACY_VERSION_TABLE, TABLE_PREFIX, VERSION_TABLE
from llmstore._db.traits import traits
from llmstore.migrations._schema import is_known

SUFFIX = ".backup"
#: (done, total) in pages for SQLite; Postgres reports (0, None) then (bytes, bytes).
Progress = Callable[[int, int | None], object]
PAGES_PER_STEP = 1024
_PARTIAL = ".partial"

#: llmstore's tables at each revision before 0005, when they had bare names that a host's
#: tables may share. Fixed: those revisions never change.
_AT_0001 = ("projects",)
_AT_0002 = (*_AT_0001, "tokens", "audit_events", "audit_chain", "provider_credentials")
_AT_0003 = (*_AT_0002, "api_keys", "ledger_entries", "reservations", "withdrawals")
UNPREFIXED_TABLES: dict[str, tuple[str, ...]] = {
    "0001_projects": _AT_0001,
    "0002_tokens_audit_providers": _AT_0002,
    "0003_api_keys_ledger": _AT_0003,
    "0004_usage_logs_receipts": (*_AT_0003, "usage_logs", "usage_receipts"),
}


@dataclass(frozen=True)
class BackupFile:
    """A finished backup: where it is, the schema revision it holds, and its size."""

    path: Path
    revision: str | None
    size: int


def pg_dump_path() -> str | None:
    return shutil.which("pg_dump")


def backup_prefix(config: StoreConfig) -> tuple[Path, str]:
    """The folder of the database's default-named backups and their common name."""
    if traits(config.driver).single_file:
        if config.is_memory:
            raise BackupError("an in-memory database cannot be backed up")
        database = Path(config.sqlite_path or "")
        return database.parent / "backups", database.name
    url = sa.make_url(config.url.get_secret_value())
    name = url.database or "postgres"
    if config.schema_name:
        name = f"{name}.{config.schema_name}"
    return Path(config.backup_dir or "backups"), name


def default_path(config: StoreConfig, now: dt.datetime) -> Path:
    folder, name = backup_prefix(config)
    stamp = now.astimezone(dt.UTC).strftime("%Y%m%d_%H%M%S_") + f"{now.microsecond // 1000:03d}"
    return folder / f"{name}.{stamp}{SUFFIX}"


def backup_database(
    config: StoreConfig, out: str | os.PathLike[str] | None = None, progress: Progress | None = None
) -> BackupFile:
    """Back the database up into ``out`` (never overwritten) or a new default-named file.

    Raises BackupError, leaving no file behind, when the copy cannot be made or checked.
    Blocking: call it from a thread.
    """
    target = None if out is None else Path(os.fspath(out))
    if target is not None and (target.exists() or target.is_symlink()):
        raise BackupError(f"{str(target)!r} already exists; a backup never overwrites a file")
    now = dt.datetime.now(dt.UTC)
    final = target or default_path(config, now)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackupError(f"cannot create the backup folder {str(final.parent)!r}: {exc}") from None
    partial = final.with_name(final.name + _PARTIAL)
    try:
        if traits(config.driver).single_file:
            revision = _sqlite_copy(config, partial, progress)
        else:
            revision = _pg_dump(config, partial, progress)
        _fsync(partial)
        final = _publish(partial, final, fixed=target is not None)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    if target is None:
        prune(config)
    return BackupFile(path=final, revision=revision, size=final.stat().st_size)


def prune(config: StoreConfig) -> list[Path]:
    """Delete the database's default-named backups beyond the newest ``backup_keep``."""
    folder, name = backup_prefix(config)
    if not folder.is_dir():
        return []
    ours = sorted(
        path
        for path in folder.iterdir()
        if path.name.startswith(f"{name}.")
        and path.name.endswith(SUFFIX)
        and _is_stamp(path.name[len(name) + 1 : -len(SUFFIX)])
    )
    removed = ours[: max(0, len(ours) - config.backup_keep)]
    for path in removed:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return removed


def _is_stamp(text: str) -> bool:
    try:
        dt.datetime.strptime(text[:15], "%Y%m%d_%H%M%S")
    except ValueError:
        return False
    return len(text) == 19 and text[15] == "_" and text[16:].isdigit()


def _publish(partial: Path, final: Path, *, fixed: bool) -> Path:
    """Give the finished copy its name without replacing a file; the next free millisecond
    if a default name is taken."""
    for _ in range(1000):
        try:
            os.link(partial, final)
        except FileExistsError:
            if fixed:
                raise BackupError(f"{str(final)!r} already exists") from None
            final = _next_name(final)
            continue
        except OSError as exc:
            raise BackupError(f"cannot name the backup {str(final)!r}: {exc}") from None
        fsync_directory(final.parent)
        return final
    raise BackupError(f"no free backup name near {str(final)!r}")


def _next_name(path: Path) -> Path:
    stem = path.name[: -len(SUFFIX)]
    head, millis = stem[:-3], int(stem[-3:])
    return path.with_name(f"{head}{(millis + 1) % 1000:03d}{SUFFIX}")


# --- SQLite ----------------------------------------------------------------------------------


def _sqlite_copy(config: StoreConfig, partial: Path, progress: Progress | None) -> str | None:
    path = config.sqlite_path or ""
    if not Path(path).is_file():
        raise BackupError(f"there is no database file at {path!r} to back up")
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()
    source = sqlite3.connect(path, timeout=config.busy_timeout, isolation_level=None)
    try:
        copy = sqlite3.connect(partial, isolation_level=None)
        try:
            # One read transaction for the whole copy: every step reads the same snapshot,
            # so writers elsewhere neither restart the copy nor leave it inconsistent.
            source.execute("BEGIN")
            revision = sqlite_revision(source)

            def report(status: int, remaining: int, total: int) -> None:
                if progress is not None:
                    progress(total - remaining, total)

            source.backup(copy, pages=PAGES_PER_STEP, progress=report)
            source.execute("COMMIT")
            problems = [row[0] for row in copy.execute("PRAGMA integrity_check")]
            if problems != ["ok"]:
                raise BackupError(f"the backup copy failed its integrity check: {problems[0]}")
            copy.execute("PRAGMA journal_mode=DELETE")
        finally:
            copy.close()
    except sqlite3.Error as exc:
        raise BackupError(f"could not back up {path!r}: {type(exc).__name__}: {exc}") from None
    finally:
        source.close()
    return revision


def sqlite_revision(conn: sqlite3.Connection) -> str | None:
    """llmstore's revision in a SQLite database: in its own version table, or (before
    revision 0005) its row in ``alembic_version``, where a host's own rows may be too."""
    rows: dict[str, list[str]] = {}
    for table in (VERSION_TABLE, LEGACY_VERSION_TABLE):
        try:
            rows[table] = [str(row[0]) for row in conn.execute(f"SELECT version_num FROM {table}")]
        except sqlite3.OperationalError:
            rows[table] = []  # no such table
    return _own_revision(rows)


def _own_revision(rows: dict[str, list[str]]) -> str | None:
    if rows.get(VERSION_TABLE):
        return rows[VERSION_TABLE][0]
    legacy = [revision for revision in rows.get(LEGACY_VERSION_TABLE, []) if is_known(revision)]
    return legacy[0] if legacy else None


# --- Postgres --------------------------------------------------------------------------------


def libpq_target(config: StoreConfig) -> tuple[str, dict[str, str]]:
    """The database as a libpq URL without its password, and the environment carrying it."""
    url = sa.make_url(config.url.get_secret_value())
    environ = dict(os.environ)
    if url.password is not None:
        environ["PGPASSWORD"] = str(url.password)
    plain = sa.engine.URL.create(
        url.get_backend_name(),  # libpq's own scheme, without SQLAlchemy's driver
        username=url.username,
        host=url.host,
        port=url.port,
        database=url.database,
        query={k: v for k, v in url.query.items() if k in ("sslmode", "sslrootcert")},
    )
    return plain.render_as_string(hide_password=False), environ


def _pg_dump(config: StoreConfig, partial: Path, progress: Progress | None) -> str | None:
    program = pg_dump_path()
    if program is None:
        raise BackupError(
            "pg_dump is not on the PATH: install the PostgreSQL client tools, "
            "or pass --no-backup to go on without a backup"
        )
    target, environ = libpq_target(config)
    command = [program, "--format=custom", "--no-password", f"--file={partial}", target]
    if config.schema_name:
        command.insert(-1, f"--schema={config.schema_name}")
    else:
        # public is shared with the host: llmstore's tables only (pg_dump adds the
        # sequences they own). Patterns of pg_dump's own, never a shell's.
        command[-1:-1] = [f"--table=public.{name}" for name in _public_tables(config)]
    if progress is not None:
        progress(0, None)
    try:
        run_tool(command, environ, "pg_dump")
    except BackupError as exc:
        if config.schema_name is None and "no matching tables" in str(exc):
            raise BackupError(
                "public holds no llmstore tables: there is nothing to back up"
            ) from None
        raise
    listed = run_tool([pg_tool("pg_restore"), "--list", str(partial)], environ, "pg_restore")
    size = partial.stat().st_size
    if progress is not None:
        progress(size, size)
    return archive_revision(partial, listing=listed)


def pg_revision(config: StoreConfig) -> tuple[str | None, str | None]:
    """llmstore's revision in the live Postgres database (its schema, else ``public``) and
    the version table holding it, read through ``psql``; (None, None) if it has none."""
    schema = config.schema_name or "public"  # letters, digits and underscores (StoreConfig)
    tables = ", ".join(f"'{name}'" for name in (VERSION_TABLE, LEGACY_VERSION_TABLE))
    present = _psql(
        config,
        "SELECT c.relname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n "
        f"ON n.oid = c.relnamespace WHERE n.nspname = '{schema}' AND c.relkind IN ('r', 'p') "
        f"AND c.relname IN ({tables})",
    )
    rows = {
        table: _psql(config, f'SELECT version_num FROM "{schema}"."{table}"')
        for table in (VERSION_TABLE, LEGACY_VERSION_TABLE)
        if table in present
    }
    revision = _own_revision(rows)
    if revision is None:
        return None, None
    return revision, VERSION_TABLE if rows.get(VERSION_TABLE) else LEGACY_VERSION_TABLE


def _public_tables(config: StoreConfig) -> list[str]:
    """What ``pg_dump`` takes from ``public``: llmstore's tables at the live revision."""
    revision, version_table = pg_revision(config)
    if revision in UNPREFIXED_TABLES and version_table is not None:
        # Exact names: at these revisions a host may have tables of the other bare names.
        return [*UNPREFIXED_TABLES[revision], version_table]
    return [f"{TABLE_PREFIX}*"]


def _psql(config: StoreConfig, query: str) -> list[str]:
    target, environ = libpq_target(config)
    psql = [pg_tool("psql"), "--no-psqlrc", "--quiet", "--tuples-only", "--no-align"]
    output = run_tool(
        [*psql, "--set=ON_ERROR_STOP=1", f"--command={query}", target], environ, "psql"
    )
    return [line for line in output.splitlines() if line]


def archive_revision(
    path: Path, *, listing: str | None = None, schema: str | None = None
) -> str | None:
    """llmstore's revision in a Postgres archive, read from the data of its version table
    (or, in an archive made before revision 0005, its row in ``alembic_version``), the one
    in ``schema`` when given."""
    if listing is not None and "TABLE DATA" not in listing:
        return None
    command = [pg_tool("pg_restore"), "--data-only", "--file=-"]
    command += [f"--table={table}" for table in (VERSION_TABLE, LEGACY_VERSION_TABLE)]
    if schema is not None:
        command.append(f"--schema={schema}")
    command.append(str(path))
    rows: dict[str, list[str]] = {}
    table = None
    for line in run_tool(command, dict(os.environ), "pg_restore").splitlines():
        if table is None:
            copied = _COPY.match(line)
            if copied is not None:
                table = copied.group("table")
                rows.setdefault(table, [])
        elif line == "\\.":
            table = None
        else:
            rows[table].append(line.strip())
    return _own_revision(rows)


# COPY public.llmstore_alembic_version (version_num) FROM stdin;  (names quoted if need be)
_COPY = re.compile(r'COPY (?:"?[^".]+"?\.)?"?(?P<table>[^" ]+)"? \(version_num\) FROM stdin;')


def pg_tool(name: str) -> str:
    """The PostgreSQL client program ``name`` (pg_restore, psql), beside pg_dump if any."""
    return _sibling(pg_dump_path() or name, name)


def _sibling(program: str, name: str) -> str:
    candidate = Path(program).with_name(name)
    return str(candidate) if candidate.is_file() else (shutil.which(name) or name)


def run_tool(command: list[str], environ: dict[str, str], what: str) -> str:
    try:
        done = subprocess.run(command, env=environ, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise BackupError(f"could not run {what}: {exc}") from None
    if done.returncode != 0:
        raise BackupError(f"{what} failed: {tool_error(done.stderr, what) or done.returncode}")
    return done.stdout


def tool_error(stderr: str, what: str) -> str:
    """A client tool's error as one line: the first error and the lines that go with it
    (libpq puts its hint on the next line), without the tool's own prefix."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    first = next((i for i, line in enumerate(lines) if "error:" in line), 0)
    text = " ".join(lines[first : first + 3])
    for prefix in (f"{what}: error: ", f"{what}: "):
        text = text.removeprefix(prefix)
    return text[:500]


# --- files -----------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    with path.open("rb") as file:
        os.fsync(file.fileno())
