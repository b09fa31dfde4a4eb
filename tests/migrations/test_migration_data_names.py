"""Revision 0005 names every object ``llmstore_``: a database upgraded through it has the
objects, by name and by what they cover, of one created at head from the models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore import StoreConfig
from llmstore._db.schema import VERSION_TABLE, metadata
from llmstore.migrations._commands import upgrade
from llmstore.pytest_plugin import drop_schema, fresh_schema_name
from tests.helpers import require_postgres
from tests.migrations.data_support import _BEFORE_RENAMING, on_database


def _object_names(conn: Connection, schema: str | None) -> dict[str, list[str]]:
    if conn.dialect.name == "sqlite":
        rows = conn.exec_driver_sql(
            "SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
        )
        names: dict[str, list[str]] = {}
        for kind, name in rows:
            names.setdefault(kind, []).append(name)
        inspector = sa.inspect(conn)
        for table in inspector.get_table_names():
            constraints = [
                inspector.get_pk_constraint(table)["name"],
                *(c["name"] for c in inspector.get_unique_constraints(table)),
                *(c["name"] for c in inspector.get_foreign_keys(table)),
                *(c["name"] for c in inspector.get_check_constraints(table)),
            ]
            names.setdefault("constraint", []).extend(c for c in constraints if c)
        return names
    rows = conn.execute(
        sa.text(
            "SELECT CASE c.relkind WHEN 'r' THEN 'table' WHEN 'i' THEN 'index' "
            "WHEN 'S' THEN 'sequence' ELSE c.relkind::text END, c.relname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = current_schema() "
            "UNION ALL SELECT 'constraint', k.conname FROM pg_constraint k "
            "JOIN pg_namespace n ON n.oid = k.connamespace WHERE n.nspname = current_schema()"
        )
    )
    names = {}
    for kind, name in rows:
        names.setdefault(kind, []).append(name)
    return names


@pytest.mark.parametrize("way", ["from empty", "through the revisions"])
async def test_every_object_is_named_llmstore_(db_config: StoreConfig, way: str) -> None:
    if way == "through the revisions":
        await upgrade(db_config, _BEFORE_RENAMING)
    await upgrade(db_config)
    names = await on_database(db_config, lambda conn: _object_names(conn, db_config.schema_name))
    assert {"table", "index", "constraint"} <= set(names)
    if db_config.driver == "postgresql":
        assert sorted(names["sequence"]) == [
            "llmstore_ledger_entries_id_seq",
            "llmstore_usage_logs_id_seq",
        ]
    unprefixed = {
        kind: [name for name in found if not name.startswith("llmstore_")]
        for kind, found in names.items()
    }
    assert all(not found for found in unprefixed.values()), unprefixed
    # Both ways give the same objects.
    assert set(names["table"]) == set(metadata.tables) | {VERSION_TABLE}


def _described(conn: Connection, schema: str | None) -> dict[str, Any]:
    """Every table of the database as reflected, with what each object is named and what
    it covers: columns (and their defaults, so a sequence's name), keys, foreign keys,
    checks and indexes; Postgres's sequences, SQLite's AUTOINCREMENT tables."""
    inspector = sa.inspect(conn)

    def plain(value: Any) -> Any:
        """A reflected default or WHERE as text, its schema left out (the two differ)."""
        text = str(value) if isinstance(value, sa.TextClause) else value
        return text.replace(f'"{schema}".', "") if schema and isinstance(text, str) else text

    out: dict[str, Any] = {}
    for table in sorted(inspector.get_table_names(schema=schema)):
        out[table] = {
            "columns": [
                (c["name"], str(c["type"]), c["nullable"], plain(c.get("default")))
                for c in inspector.get_columns(table, schema=schema)
            ],
            "primary key": inspector.get_pk_constraint(table, schema=schema),
            "unique": sorted(
                (u["name"], tuple(u["column_names"]))
                for u in inspector.get_unique_constraints(table, schema=schema)
            ),
            "foreign keys": sorted(
                (
                    f["name"],
                    tuple(f["constrained_columns"]),
                    f["referred_table"],
                    tuple(f["referred_columns"]),
                    sorted(f["options"].items()),
                )
                for f in inspector.get_foreign_keys(table, schema=schema)
            ),
            "checks": sorted(
                (c["name"], c["sqltext"])
                for c in inspector.get_check_constraints(table, schema=schema)
            ),
            "indexes": sorted(
                (
                    i["name"],
                    tuple(i["column_names"]),
                    i["unique"],
                    sorted((k, plain(v)) for k, v in i.get("dialect_options", {}).items()),
                )
                for i in inspector.get_indexes(table, schema=schema)
            ),
        }
    if conn.dialect.name == "sqlite":
        autoincrement = conn.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND sql LIKE '%AUTOINCREMENT%'"
        )
        out["(the database)"] = {"AUTOINCREMENT tables": sorted(autoincrement.scalars())}
    else:
        out["(the database)"] = {"sequences": sorted(inspector.get_sequence_names(schema=schema))}
    return out


async def test_through_the_revisions_gives_the_objects_the_models_give(
    db_config: StoreConfig, tmp_path: Path
) -> None:
    """A database upgraded from 0004 through 0005 has the objects, by name and by what they
    cover, of one created at head from the models: a later revision that names one finds
    it whichever way the database came."""
    await upgrade(db_config, _BEFORE_RENAMING)
    await upgrade(db_config)
    schema = None if db_config.driver == "sqlite" else fresh_schema_name()
    models = (
        StoreConfig.from_url(f"sqlite:///{tmp_path / 'from-the-models.db'}")
        if schema is None
        else StoreConfig.from_url(require_postgres(), schema_name=schema)
    )
    try:
        await upgrade(models)
        through = await on_database(db_config, lambda c: _described(c, db_config.schema_name))
        made = await on_database(models, lambda c: _described(c, schema))
    finally:
        if schema is not None:
            await drop_schema(require_postgres(), schema)
    assert set(through) == set(made) and set(metadata.tables) <= set(through)
    different = [
        f"{table} {part}: {through[table][part]!r} through the revisions, "
        f"{made[table][part]!r} from the models"
        for table in sorted(made)
        for part in made[table]
        if through[table][part] != made[table][part]
    ]
    assert not different, "\n".join(different)
