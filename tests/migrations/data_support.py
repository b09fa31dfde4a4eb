"""The data tests' machinery (``test_migration_data_*.py``, ``test_migration_lock.py``):
the revisions in order and the tables' names at each, SQL on the database as it is (without
llmstore's engines), seeding every table at a revision (from ``data_seeds``), and checking
that the seeded rows are intact at each step."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from llmstore import StoreConfig
from llmstore._db.schema import VERSION_TABLE, metadata
from llmstore.migrations._commands import current, scripts
from tests.migrations.data_seeds import (
    ADDED_COLUMNS,
    DROPPED_COLUMNS,
    RENAMED_TABLES,
    REVISION_ROWS,
    SEEDS,
    SINGLE_ROW_TABLES,
    _missing_seed_message,
)
from tests.migrations.data_values import UTC, Row

T = TypeVar("T")


def name_at(table: str, named_at: str, revision: str) -> str:
    """The name at ``revision`` of the table called ``table`` at ``named_at``."""
    ordered = revisions()
    start, end = ordered.index(named_at), ordered.index(revision)
    if end >= start:
        for rev in ordered[start + 1 : end + 1]:
            table = RENAMED_TABLES.get(rev, {}).get(table, table)
        return table
    for rev in reversed(ordered[end + 1 : start + 1]):
        back = {new: old for old, new in RENAMED_TABLES.get(rev, {}).items()}
        table = back.get(table, table)
    return table


def revisions() -> list[str]:
    """Every revision, oldest first."""
    return [script.revision for script in reversed(list(scripts().walk_revisions()))]


def _upto(revision: str) -> list[str]:
    ordered = revisions()
    return ordered[: ordered.index(revision) + 1]


# --- running SQL on the database as it is, without llmstore's engines -----------------------


async def on_database(config: StoreConfig, fn: Callable[[Connection], T]) -> T:
    """Run ``fn`` in one committed transaction; on Postgres with the test schema first."""
    if config.driver == "sqlite":

        def run() -> T:
            engine = sa.create_engine(f"sqlite:///{config.sqlite_path}", poolclass=NullPool)
            try:
                with engine.begin() as conn:
                    return fn(conn)
            finally:
                engine.dispose()

        return await asyncio.to_thread(run)
    engine = create_async_engine(config.url.get_secret_value(), poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            if config.schema_name:
                await conn.exec_driver_sql(f'SET LOCAL search_path TO "{config.schema_name}"')
            return await conn.run_sync(fn)
    finally:
        await engine.dispose()


@dataclass(frozen=True)
class Shape:
    """A table as it exists in the database: its columns (name -> nullable, reflected type)
    and its primary key."""

    columns: dict[str, tuple[bool, Any]]
    primary_key: tuple[str, ...]

    def core(self, name: str) -> sa.TableClause:
        """The table with the columns it has, typed as llmstore reads and writes them (UTC
        timestamps, JSON with NULL for None); a column the models lack keeps its reflected
        type."""
        model = metadata.tables.get(name, metadata.tables.get(f"llmstore_{name}"))
        return sa.table(
            name,
            *(
                sa.column(c, model.c[c].type if model is not None and c in model.c else kind)
                for c, (_, kind) in self.columns.items()
            ),
        )


def _shapes(conn: Connection, schema: str | None) -> dict[str, Shape]:
    inspector = sa.inspect(conn)
    shapes = {}
    for name in inspector.get_table_names(schema=schema):
        if name in ("alembic_version", VERSION_TABLE):
            continue
        columns = {
            c["name"]: (bool(c["nullable"]), c["type"])
            for c in inspector.get_columns(name, schema=schema)
        }
        primary = inspector.get_pk_constraint(name, schema=schema)["constrained_columns"]
        shapes[name] = Shape(columns, tuple(primary))
    return shapes


def _read(conn: Connection, name: str, shape: Shape) -> list[Row]:
    return [dict(row) for row in conn.execute(sa.select(shape.core(name))).mappings()]


# --- seeding and checking --------------------------------------------------------------------


def _changes(
    changes: Mapping[str, Mapping[str, Mapping[str, Any]]], rev: str, table: str, named_at: str
) -> Mapping[str, Any]:
    """What ``changes`` (``ADDED_COLUMNS`` or ``DROPPED_COLUMNS``, keyed by the table's name
    at the revision that changes it) says ``rev`` does to the columns of the table called
    ``table`` at ``named_at``."""
    return changes.get(rev, {}).get(name_at(table, named_at, rev), {})


def _added(table: str, column: str, named_at: str) -> tuple[bool, Any]:
    """Whether a revision adds ``table.column`` (``table`` named as at ``named_at``) to
    existing rows, and the value they get."""
    for rev in revisions():
        added = _changes(ADDED_COLUMNS, rev, table, named_at)
        if column in added:
            return True, added[column]
    return False, None


def _explained_absence(table: str, column: str, revision: str) -> bool:
    """Whether a seed may name a column the table lacks at ``revision``: a later revision
    adds it, or an earlier one dropped it."""
    ordered = revisions()
    later = ordered[ordered.index(revision) + 1 :]
    return any(column in _changes(ADDED_COLUMNS, rev, table, revision) for rev in later) or any(
        column in _changes(DROPPED_COLUMNS, rev, table, revision) for rev in _upto(revision)
    )


def _restored(table: str, column: str, after: str) -> tuple[bool, Any]:
    """Whether a revision after ``after`` drops ``table.column`` (``table`` named as at
    ``after``), and the value the column holds once that revision is downgraded."""
    ordered = revisions()
    for rev in ordered[ordered.index(after) + 1 :]:
        dropped = _changes(DROPPED_COLUMNS, rev, table, after)
        if column in dropped:
            return True, dropped[column]
    return False, None


def as_at(row: Row, table: str, named_at: str, revision: str) -> Row:
    """A seed row of the table called ``table`` at ``named_at``, with only the columns the
    table has at ``revision``: without those a later revision adds or an earlier one drops."""
    name = name_at(table, named_at, revision)
    return {c: v for c, v in row.items() if not _explained_absence(name, c, revision)}


@dataclass(frozen=True)
class Seeded:
    """What was inserted at ``revision``: table -> rows, with every column it had then."""

    revision: str
    rows: dict[str, list[Row]]


def _seed_rows(revision: str, shapes: Mapping[str, Shape]) -> dict[str, list[Row]]:
    """The seed rows of every revision up to ``revision``, with the columns the tables have
    at ``revision``; fails naming whatever the seeds lack."""
    wanted: dict[str, list[Row]] = {}
    for rev in _upto(revision):
        for table, rows in SEEDS[rev].items():
            wanted.setdefault(name_at(table, rev, revision), []).extend(rows)
    problems = [
        f"table {t} exists at {revision}, but SEEDS has no rows for it"
        for t in shapes
        if t not in wanted
    ]
    problems += [
        f"SEEDS has rows for {t}, missing at {revision}" for t in wanted if t not in shapes
    ]
    out: dict[str, list[Row]] = {}
    for table, rows in wanted.items():
        if table not in shapes:
            continue
        columns = shapes[table].columns
        completed = []
        for row in rows:
            values = {}
            for column in columns:
                known, default = _added(table, column, revision)
                if column not in row and not known:
                    problems.append(
                        f"a seed row of {table} has no value for column {column} (at "
                        f"{revision}): set it in SEEDS or document it in ADDED_COLUMNS"
                    )
                values[column] = row.get(column, default)
            problems += [
                f"a seed row of {table} names column {column}, which {table} lacks at "
                f"{revision} (and no ADDED_COLUMNS / DROPPED_COLUMNS entry says why)"
                for column in sorted(set(row) - set(columns))
                if not _explained_absence(table, column, revision)
            ]
            completed.append(values)
        for column, (nullable, _) in columns.items():
            if not nullable:
                continue
            if all(values[column] is None for values in completed):
                problems.append(f"no seed row of {table} sets nullable column {column}")
            if table not in SINGLE_ROW_TABLES and all(v[column] is not None for v in completed):
                problems.append(f"no seed row of {table} leaves nullable column {column} NULL")
        out[table] = completed
    assert not problems, "the seeds are incomplete:\n" + "\n".join(problems)
    return out


def after_downgrade(seeded: Seeded, to: str) -> Seeded:
    """What of the rows ``seeded`` a downgrade to ``to`` (a revision before the seeding)
    leaves, as if seeded at ``to``: the tables created after ``to`` are dropped with their
    rows, and so are the columns added after it (upgrading again brings them back empty and
    with their ``ADDED_COLUMNS`` value); a column dropped after ``to`` comes back with its
    ``DROPPED_COLUMNS`` value."""
    ordered = revisions()
    assert ordered.index(to) < ordered.index(seeded.revision), (to, seeded.revision)
    undone = ordered[ordered.index(to) + 1 : ordered.index(seeded.revision) + 1]
    rows: dict[str, list[Row]] = {}
    for rev in _upto(to):
        for created in SEEDS[rev]:
            table = name_at(created, rev, seeded.revision)
            gone: set[str] = set()
            back: dict[str, Any] = {}
            for step in reversed(undone):  # downgraded last to first
                gone |= set(_changes(ADDED_COLUMNS, step, table, seeded.revision))
                back.update(_changes(DROPPED_COLUMNS, step, table, seeded.revision))
            rows[name_at(created, rev, to)] = [
                {**{c: v for c, v in row.items() if c not in gone}, **back}
                for row in seeded.rows[table]
            ]
    return Seeded(to, rows)


def _documented_rows(table: str, upto: str, after: str | None = None) -> list[Row]:
    """The rows revisions up to ``upto`` (and after ``after``) write themselves into the
    table called ``table`` at ``upto``."""
    skipped = set(_upto(after)) if after is not None else set()
    return [
        row
        for rev in _upto(upto)
        if rev not in skipped
        for written, rows in REVISION_ROWS.get(rev, {}).items()
        if name_at(written, rev, upto) == table
        for row in rows
    ]


async def seed(config: StoreConfig, revision: str) -> Seeded:
    """Insert the seed rows into every table of the database, which is at ``revision``.

    Each table must hold only the rows its revision writes itself (``REVISION_ROWS``);
    those are replaced by the seeds.
    """
    assert revision in SEEDS, _missing_seed_message([revision])
    schema = config.schema_name

    def insert(conn: Connection) -> Seeded:
        shapes = _shapes(conn, schema)
        rows = _seed_rows(revision, shapes)
        for table, shape in shapes.items():
            differences = _differences(
                table, shape, _documented_rows(table, revision), _read(conn, table, shape)
            )
            assert not differences, f"before seeding at {revision}:\n" + "\n".join(differences)
        for table in reversed(list(rows)):
            conn.execute(sa.delete(sa.table(table)))
        for table, values in rows.items():
            conn.execute(sa.insert(shapes[table].core(table)), values)
        return Seeded(revision, rows)

    return await on_database(config, insert)


def _strict(value: Any) -> Any:
    """A value compared by type too: True is not 1, 1.0 is not 1, '1' is not 1."""
    if isinstance(value, dict | list):
        return ("json", json.dumps(value, sort_keys=True))
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            return ("naive datetime", value)
        return ("datetime", value.astimezone(UTC))
    return (type(value).__name__, value)


def _differences(table: str, shape: Shape, expected: list[Row], found: list[Row]) -> list[str]:
    def key(row: Row) -> tuple[Any, ...]:
        return tuple(str(row[c]) for c in shape.primary_key)

    wanted = {key(row): row for row in expected}
    have = {key(row): row for row in found}
    out = [f"{table}: row {k} is missing" for k in wanted.keys() - have.keys()]
    out += [f"{table}: unexpected row {have[k]!r}" for k in have.keys() - wanted.keys()]
    for k in wanted.keys() & have.keys():
        for column in shape.columns:
            want, got = wanted[k].get(column), have[k].get(column)
            if _strict(want) != _strict(got):
                out.append(f"{table} row {k}: {column} is {got!r}, expected {want!r}")
    return sorted(out)


def _expected_at(seeded: Seeded, table: str, shape: Shape, been_at_head: bool) -> list[Row]:
    """The seeded rows with the columns ``table`` has now: a column added after the seeding
    holds its documented default, and one dropped (and brought back by a downgrade) the
    value it is documented to come back with."""
    rows = []
    for row in seeded.rows[table]:
        values = {}
        for column in shape.columns:
            dropped, restored = _restored(table, column, seeded.revision)
            if column in row and dropped and been_at_head:
                values[column] = restored
            elif column in row:
                values[column] = row[column]
            else:
                known, default = _added(table, column, seeded.revision)
                assert known, (
                    f"{table}.{column} appeared after {seeded.revision} without an "
                    "ADDED_COLUMNS entry giving the value existing rows get"
                )
                values[column] = default
        rows.append(values)
    return rows


async def assert_rows_intact(
    config: StoreConfig, seeded: Seeded, at: str, *, been_at_head: bool = True
) -> None:
    """Every seeded table holds exactly the seeded rows, in every column it has now; the
    tables created after the seeding hold only what their revision writes itself."""
    schema = config.schema_name

    def compare(conn: Connection) -> list[str]:
        shapes = _shapes(conn, schema)
        out = []
        now = {name_at(table, seeded.revision, at): table for table in seeded.rows}
        for name, table in now.items():
            if name not in shapes:
                out.append(f"table {name} is gone")
                continue
            expected = _expected_at(seeded, table, shapes[name], been_at_head)
            out += _differences(name, shapes[name], expected, _read(conn, name, shapes[name]))
        for name in shapes.keys() - now.keys():
            documented = _documented_rows(name, at, after=seeded.revision)
            out += _differences(name, shapes[name], documented, _read(conn, name, shapes[name]))
        return out

    assert await current(config) == at
    differences = await on_database(config, compare)
    assert not differences, f"rows seeded at {seeded.revision}, now at {at}:\n" + "\n".join(
        differences[:30]
    )


# --- revision 0005: every table renamed ------------------------------------------------------

_RENAMING = "0005_llmstore_prefix"
_BEFORE_RENAMING = "0004_usage_logs_receipts"
