"""The raw way's tables: llmstore's own, under other names, generated from its schema.

Each ``raw_*`` table is llmstore's ``llmstore_*`` table compiled for the dialect
(``CREATE TABLE`` and its ``CREATE INDEX`` statements) with the prefix ``llmstore_``
renamed ``raw_`` throughout: the same columns, types, keys, unique and check constraints,
foreign keys (to the other ``raw_*`` tables), indexes and, on SQLite, ``AUTOINCREMENT``
ids. A change to llmstore's schema reaches the raw tables by itself.

llmstore exposes no ``MetaData``: this is the one module of the benchmarks that imports a
private one of llmstore's (``llmstore._db.schema``), for its ``metadata`` alone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.schema import CreateIndex, CreateTable

from llmstore._db.schema import metadata as llmstore_metadata

from .common import Driver

LLMSTORE_PREFIX: Final = "llmstore_"
RAW_PREFIX: Final = "raw_"

#: The tables the raw way uses (without the prefix), each after the ones it references.
RAW_TABLES: Final = (
    "projects",
    "tokens",
    "api_keys",
    "ledger_entries",
    "reservations",
    "usage_logs",
    "budgets",
    "budget_periods",
    "budget_crossings",
    "rate_limits",
    "rate_windows",
    "admissions",
    "admission_budgets",
    "admission_windows",
)

#: llmstore's naming convention for constraints and indexes, shared by the ORM's tables.
NAMING_CONVENTION: Final[Mapping[str, str]] = {
    str(key): str(value) for key, value in llmstore_metadata.naming_convention.items()
}

_PREFIXED: Final = re.compile(rf"\b{LLMSTORE_PREFIX}")


def llmstore_table(name: str) -> sa.Table:
    """llmstore's table ``llmstore_<name>``."""
    return llmstore_metadata.tables[LLMSTORE_PREFIX + name]


#: ``raw_usage_logs``'s columns after its id, in the table's order (what a bulk write sends).
USAGE_COLUMN_NAMES: Final = tuple(
    column.name for column in llmstore_table("usage_logs").columns if not column.primary_key
)


def _dialect(driver: Driver) -> Dialect:
    if driver == "sqlite":
        return sqlite.dialect()
    return postgresql.dialect()  # type: ignore[no-untyped-call]


def raw_ddl(driver: Driver) -> tuple[str, ...]:
    """The raw tables' DDL as ``driver``'s database receives it: one statement per string,
    to run in order."""
    dialect = _dialect(driver)
    statements: list[str] = []
    for name in RAW_TABLES:
        table = llmstore_table(name)
        statements.append(str(CreateTable(table).compile(dialect=dialect)))
        for index in sorted(table.indexes, key=lambda index: str(index.name)):
            statements.append(str(CreateIndex(index).compile(dialect=dialect)))
    renamed = tuple(_PREFIXED.sub(RAW_PREFIX, statement).strip() for statement in statements)
    left = [statement for statement in renamed if LLMSTORE_PREFIX in statement]
    if left:
        raise RuntimeError(f"a raw table still names one of llmstore's: {left[0]}")
    return renamed
