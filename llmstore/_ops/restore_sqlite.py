"""Restoring a SQLite backup into a live file: llmstore's objects only, in one transaction.

A host application may keep its own tables, views, indexes and triggers in the same file;
copying the whole backup over it would put their old contents back. So the live file keeps
everything that is not llmstore's, and inside one ``BEGIN IMMEDIATE`` transaction:

* llmstore's tables (``llmstore_*`` and its version table) are dropped, children first;
* they are created again from the backup's own statements, parents first, their rows
  copied from the backup (attached read-only), then their indexes and triggers;
* their ``sqlite_sequence`` entries (the AUTOINCREMENT high-water marks) come from the
  backup too;
* ``PRAGMA foreign_key_check`` (of the references to and from llmstore's tables: a host's
  own dangling rows elsewhere are not this restore's business) and ``PRAGMA
  integrity_check`` run before COMMIT.

Any failure rolls it all back: the live file is as it was. Other connections read the old
rows until COMMIT and the restored ones after; writers wait for it up to the busy timeout.
Foreign keys are off on this connection (SQLite's default), so that tables can be dropped
and refilled in any state. No page is copied, so the backup's page size does not matter:
the live file keeps its own (a WAL file could not change it anyway). A host's view or
trigger that names one of llmstore's tables keeps working: SQLite resolves the name when
it runs, and the table is back under it by COMMIT.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from llmstore._core.config import StoreConfig, ensure_parent
from llmstore._core.errors import BackupError
from llmstore._db.schema import TABLE_PREFIX, VERSION_TABLE, metadata

#: ``progress(done, total)`` in tables.
TableProgress = Callable[[int, int | None], object]


def is_own(name: str) -> bool:
    """Whether a table is llmstore's: prefixed (its version table included)."""
    return name.startswith(TABLE_PREFIX)


def _order(names: set[str]) -> list[str]:
    """Parents first: the models' order, then any other of llmstore's tables by name."""
    known = [table.name for table in metadata.sorted_tables if table.name in names]
    return known + sorted(names - set(known))


def restore_own_tables(
    config: StoreConfig, backup: Path, progress: TableProgress | None = None
) -> None:
    """Replace llmstore's tables in the live database with those of ``backup``."""
    live = config.sqlite_path or ""
    ensure_parent(live)
    try:
        conn = sqlite3.connect(
            Path(live).resolve().as_uri(),
            timeout=config.busy_timeout,
            isolation_level=None,
            uri=True,
        )
    except sqlite3.Error as exc:
        raise BackupError(f"cannot open {live!r}: {exc}; nothing was restored") from None
    try:
        conn.execute("PRAGMA journal_mode = WAL")  # a new file; an existing one keeps WAL
        conn.execute("ATTACH DATABASE ? AS backup", (f"{backup.resolve().as_uri()}?mode=ro",))
        conn.execute("BEGIN IMMEDIATE")
        try:
            _replace(conn, progress)
            problems = [row[0] for row in conn.execute("PRAGMA main.integrity_check")]
            if problems != ["ok"]:
                raise BackupError(
                    f"the restored tables failed their integrity check: {problems[0]}"
                )
            broken = _broken_references(conn)
            if broken:
                table, parent = broken[0]
                raise BackupError(
                    f"the restored tables break a foreign key reference ({table} to {parent})"
                )
            conn.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back already (a full disk, an interrupt): then there is
            # nothing left to undo, and a second ROLLBACK would hide the first error.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise BackupError(
            f"could not restore {str(backup)!r}: {type(exc).__name__}: {exc}; "
            "the database was left as it was"
        ) from None
    finally:
        conn.close()


def _replace(conn: sqlite3.Connection, progress: TableProgress | None) -> None:
    def objects(schema: str, kind: str) -> dict[str, tuple[str, str]]:
        rows = conn.execute(
            f"SELECT name, tbl_name, sql FROM {schema}.sqlite_master "
            "WHERE type = ? AND sql IS NOT NULL",
            (kind,),
        )
        return {name: (table, sql) for name, table, sql in rows if is_own(table)}

    tables = objects("backup", "table")
    if VERSION_TABLE not in tables:
        raise BackupError("the backup holds no llmstore version table")
    indexes = objects("backup", "index")
    triggers = objects("backup", "trigger")
    for name in reversed(_order(set(objects("main", "table")))):
        conn.execute(f"DROP TABLE main.{_quoted(name)}")  # its indexes and triggers go with it
    order = _order(set(tables))
    for done, name in enumerate(order, start=1):
        conn.execute(tables[name][1])
        conn.execute(f"INSERT INTO main.{_quoted(name)} SELECT * FROM backup.{_quoted(name)}")
        if progress is not None:
            progress(done, len(order))
    for _, sql in [*indexes.values(), *triggers.values()]:
        conn.execute(sql)
    _copy_sequences(conn, set(tables))


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _broken_references(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    """(child, parent) of each row whose foreign key to or from llmstore's tables dangles.

    Checked table by table, llmstore's and those of the host that refer to them only: the
    rest of the file, its dangling rows or foreign keys SQLite cannot check, is the host's.
    """
    names = [
        row[0] for row in conn.execute("SELECT name FROM main.sqlite_master WHERE type = 'table'")
    ]
    checked = [
        name
        for name in names
        if is_own(name)
        or any(
            is_own(key[2]) for key in conn.execute(f"PRAGMA main.foreign_key_list({_quoted(name)})")
        )
    ]
    return [
        (table, parent)
        for name in checked
        for table, _, parent, _ in conn.execute(f"PRAGMA main.foreign_key_check({_quoted(name)})")
        if is_own(table) or is_own(parent)
    ]


def _copy_sequences(conn: sqlite3.Connection, tables: set[str]) -> None:
    """The backup's AUTOINCREMENT high-water marks: a purged row's id never comes back."""

    def has_sequences(schema: str) -> bool:
        found = conn.execute(
            f"SELECT 1 FROM {schema}.sqlite_master WHERE name = 'sqlite_sequence'"
        ).fetchone()
        return found is not None

    if not has_sequences("backup"):
        return
    rows = [
        (name, seq)
        for name, seq in conn.execute("SELECT name, seq FROM backup.sqlite_sequence")
        if name in tables
    ]
    if rows and has_sequences("main"):
        conn.executemany("DELETE FROM main.sqlite_sequence WHERE name = ?", [(n,) for n, _ in rows])
        conn.executemany("INSERT INTO main.sqlite_sequence (name, seq) VALUES (?, ?)", rows)
