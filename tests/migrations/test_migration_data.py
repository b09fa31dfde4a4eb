"""Data survives every revision: rows seeded at each revision reach head intact, and come
back down again, on SQLite (file) and Postgres.

For each revision R: an empty database is upgraded to R, every table that exists at R
gets the rows of ``SEEDS`` (plain Core inserts against the table as it is at R), the
database goes up to head and then down one revision at a time back to R, and at every
step each seeded table must hold exactly the seeded rows, column for column, in every
column that exists at that step.

A new revision adds one entry to ``SEEDS`` (rows for each table it creates: one with every
nullable column set, one with them unset), and, when it adds columns to an existing table
or drops some, to ``ADDED_COLUMNS`` / ``DROPPED_COLUMNS``. Rows a revision writes itself go
in ``REVISION_ROWS``. The tests fail, naming what is missing, until it does.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from llmstore import Store, StoreConfig, UsageRecord
from llmstore._db.schema import VERSION_TABLE, metadata
from llmstore.migrations._commands import current, downgrade, head_revision, scripts, upgrade
from llmstore.pytest_plugin import drop_schema, fresh_schema_name
from tests.helpers import require_postgres

T = TypeVar("T")
Row = dict[str, Any]

# --- the values: near the limits, unicode, offsets, JSON, ciphertext-looking text -----------

BIG = 2**63 - 1  # BigInteger's largest
SMALL = -(2**63)  # ... and smallest
INT32 = 2**31 - 1  # Integer's largest on Postgres
UTC = dt.UTC
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
NOW = dt.datetime(2026, 11, 22, 12, 34, 56, 789012, tzinfo=UTC)
# Not UTC: the instant must survive (llmstore stores UTC; the offset itself is not kept).
OFFSET = dt.datetime(2027, 3, 4, 5, 6, 7, 1, tzinfo=dt.timezone(-dt.timedelta(hours=9, minutes=30)))
Y2038 = dt.datetime(2038, 1, 19, 3, 14, 8, tzinfo=UTC)
LAST = dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)

UNICODE_200 = ("名前🦀é\u0301שׁ" * 40)[:200]  # CJK, astral, combining, Hebrew: 200 characters
TRICKY = 'it\'s "quoted"\n\ttab \\ backslash; DROP TABLE projects;--'
FERNET = "gAAAAAB" + base64.urlsafe_b64encode(bytes(range(256)) * 3).decode()
FERNET_2 = "gAAAAAB" + base64.urlsafe_b64encode(hashlib.sha512(b"two").digest()).decode()
DOCUMENT = {
    "unicode": "ünïcödé 🦀 中文",
    "big": BIG,
    "small": SMALL,
    "float": 0.1,
    "nested": {"list": [1, "two", None, True, False, 2.5], "empty": {}, "none": []},
    "null": None,
    "escaped": TRICKY,
}


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def uid(n: int) -> uuid.UUID:
    return uuid.UUID(int=n)


P1, P2, P3 = uid(1), uuid.UUID("ffffffff-ffff-4fff-bfff-ffffffffffff"), uid(3)
K1, K2 = uuid.UUID("6c6c6d73-746f-7265-8000-000000000001"), uid(2**64)

# --- what every revision seeds, by the revision that creates the table ----------------------

SEEDS: dict[str, dict[str, list[Row]]] = {
    "0001_projects": {
        "projects": [
            {
                "id": P1,
                "name": UNICODE_200,
                "api_key_encrypted": FERNET,
                "is_active": False,
                "created_at": EPOCH,
                "updated_at": OFFSET,
                "deactivated_at": LAST,
            },
            {
                "id": P2,
                "name": "plain",
                "api_key_encrypted": None,
                "is_active": True,
                "created_at": NOW,
                "updated_at": NOW,
                "deactivated_at": None,
            },
            {
                "id": P3,
                "name": TRICKY,
                "api_key_encrypted": "",
                "is_active": True,
                "created_at": Y2038,
                "updated_at": LAST,
                "deactivated_at": None,
            },
        ],
    },
    "0002_tokens_audit_providers": {
        "tokens": [
            {
                "id": uid(11),
                "project_id": P1,
                "secret_digest": digest("token one"),
                "prefix": "lk_0123456789abc",
                "name": "",
                "expires_at": Y2038,
                "is_active": False,
                "deactivated_at": OFFSET,
                "request_count": BIG,
                "max_requests": BIG,
                "cache_hit_count": BIG,
                "created_at": NOW,
                "last_used_at": LAST,
            },
            {
                "id": uid(12),
                "project_id": P2,
                "secret_digest": digest("token two"),
                "prefix": "lk_",
                "name": None,
                "expires_at": None,
                "is_active": True,
                "deactivated_at": None,
                "request_count": 0,
                "max_requests": None,
                "cache_hit_count": 0,
                "created_at": EPOCH,
                "last_used_at": None,
            },
        ],
        "audit_events": [
            {
                "id": uid(21),
                "seq": BIG,
                "timestamp": OFFSET,
                "action": "project.create",
                "actor": UNICODE_200,
                "outcome": "success",
                "project_id": P1,
                "token_id": uid(11),
                "request_id": "req-ünï-" + "x" * 190,
                "client_ip": "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",
                "event_metadata": DOCUMENT,
                "prev_hash": "0" * 64,
                "hash": digest("event one"),
            },
            {
                "id": uid(22),
                "seq": 1,
                "timestamp": EPOCH,
                "action": "token.revoke",
                "actor": "system",
                "outcome": "denied",
                "project_id": None,
                "token_id": None,
                "request_id": None,
                "client_ip": None,
                "event_metadata": None,
                "prev_hash": digest("event one"),
                "hash": digest("event two"),
            },
            {
                "id": uid(23),
                "seq": 2,
                "timestamp": LAST,
                "action": "x",
                "actor": TRICKY,
                "outcome": "failure",
                "project_id": uid(999),  # no foreign key: the log outlives its subjects
                "token_id": None,
                "request_id": "",
                "client_ip": "127.0.0.1",
                "event_metadata": [1, "two", None, True, {"k": []}],
                "prev_hash": digest("event two"),
                "hash": digest("event three"),
            },
        ],
        # One row only (CHECK id = 1): it replaces the genesis row of REVISION_ROWS.
        "audit_chain": [
            {
                "id": 1,
                "head_seq": BIG,
                "head_hash": digest("event three"),
                "head_timestamp": OFFSET,
                "anchor_seq": BIG - 1,
                "anchor_hash": digest("anchor"),
                "purged_at": LAST,
            },
        ],
        "provider_credentials": [
            {
                "id": uid(31),
                "project_id": P1,
                "scope": str(P1),
                "provider": "openai",
                "model": UNICODE_200,
                "base_url": "https://example.com/" + "ü" * 1980,
                "api_key_encrypted": FERNET_2,
                "is_active": True,
                "created_at": NOW,
                "updated_at": OFFSET,
            },
            {
                "id": uid(32),
                "project_id": None,
                "scope": "global",
                "provider": "anthropic",
                "model": "claude",
                "base_url": None,
                "api_key_encrypted": None,
                "is_active": True,
                "created_at": EPOCH,
                "updated_at": EPOCH,
            },
            {
                "id": uid(33),
                "project_id": P1,
                "scope": str(P1),
                "provider": "openai",
                "model": "old",
                "base_url": "",
                "api_key_encrypted": "",
                "is_active": False,
                "created_at": Y2038,
                "updated_at": LAST,
            },
        ],
    },
    "0003_api_keys_ledger": {
        "api_keys": [
            {
                "id": K1,
                "secret_digest": digest("key one"),
                "prefix": "sk-ünï🦀",
                "project_id": P1,
                "balance": BIG,
                "reserved": BIG,
                "total_deposited": BIG,
                "total_spent": BIG,
                "created_at": NOW,
                "last_used_at": LAST,
                "expires_at": Y2038,
                "key_metadata": DOCUMENT,
            },
            {
                "id": K2,
                "secret_digest": digest("key two"),
                "prefix": "sk-",
                "project_id": None,
                "balance": 0,
                "reserved": 0,
                "total_deposited": 0,
                "total_spent": 0,
                "created_at": EPOCH,
                "last_used_at": None,
                "expires_at": None,
                "key_metadata": None,
            },
        ],
        "ledger_entries": [
            {
                "id": BIG,
                "api_key_id": K1,
                "kind": "withdrawal_refund",
                "amount": SMALL,
                "balance_after": BIG,
                "description": ("ledger ✓ " * 60)[:500],
                "idempotency_key": "idem-" + "ß" * 195,
                "params_digest": digest("params"),
                "request_data": {"model": "gpt-4o", "tokens": BIG, "doc": DOCUMENT},
                "shortfall": BIG,
                "reservation_id": uid(41),
                "withdrawal_id": uid(51),
                "transfer_id": uid(61),
                "created_at": OFFSET,
            },
            {
                "id": 1,
                "api_key_id": K2,
                "kind": "deposit",
                "amount": 1,
                "balance_after": 0,
                "description": "",
                "idempotency_key": None,
                "params_digest": None,
                "request_data": None,
                "shortfall": 0,
                "reservation_id": None,
                "withdrawal_id": None,
                "transfer_id": None,
                "created_at": EPOCH,
            },
        ],
        "reservations": [
            {
                "id": uid(41),
                "api_key_id": K1,
                "amount": BIG,
                "status": "settled",
                "created_at": NOW,
                "expires_at": LAST,
                "settled_amount": BIG,
                "finished_at": OFFSET,
            },
            {
                "id": uid(42),
                "api_key_id": K2,
                "amount": 1,
                "status": "active",
                "created_at": EPOCH,
                "expires_at": Y2038,
                "settled_amount": None,
                "finished_at": None,
            },
        ],
        "withdrawals": [
            {
                "id": uid(51),
                "api_key_id": K1,
                "amount": BIG,
                "token_encrypted": FERNET,
                "mint_url": "https://mint.example/ünï?q=" + "a" * 1900,
                "status": "failed",
                "created_at": NOW,
                "completed_at": OFFSET,
                "error_message": ("erreur ⚠ " * 250)[:2000],
                "retry_count": INT32,
            },
            {
                "id": uid(52),
                "api_key_id": K2,
                "amount": 1,
                "token_encrypted": FERNET_2,
                "mint_url": "https://mint.example",
                "status": "pending",
                "created_at": EPOCH,
                "completed_at": None,
                "error_message": None,
                "retry_count": 0,
            },
        ],
    },
    "0004_usage_logs_receipts": {
        "usage_logs": [
            {
                "id": BIG,
                "created_at": OFFSET,
                "api_key_id": K1,
                "project_id": P1,
                "token_id": uid(11),
                "request_id": "req-" + "🦀" * 196,
                "alias": UNICODE_200,
                "profile": "fast",
                "provider": "openai",
                "model": "gpt-4o-2024-08-06",
                "origin": "https://app.example",
                "is_streaming": True,
                "success": False,
                "status_code": INT32,
                "response_time_ms": BIG,
                "time_to_first_token_ms": BIG,
                "time_to_last_token_ms": BIG,
                "tokens_per_second": 1.7976931348623157e308,
                "prompt_tokens": BIG,
                "completion_tokens": BIG,
                "cached_tokens": BIG,
                "total_tokens": BIG,
                "cost": BIG,
                "finish_reason": "length",
                "max_tokens": BIG,
                "temperature": 0.1,
                "top_p": 2.2250738585072014e-308,
                "message_count": INT32,
                "error_type": "RateLimitError",
                "error_message": ("429 ✗ " * 700)[:4000],
                "usage_metadata": DOCUMENT,
            },
            {
                "id": 1,
                "created_at": EPOCH,
                "api_key_id": None,
                "project_id": None,
                "token_id": None,
                "request_id": None,
                "alias": None,
                "profile": None,
                "provider": None,
                "model": None,
                "origin": None,
                "is_streaming": False,
                "success": True,
                "status_code": None,
                "response_time_ms": None,
                "time_to_first_token_ms": None,
                "time_to_last_token_ms": None,
                "tokens_per_second": None,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "cached_tokens": 0,
                "total_tokens": 0,
                "cost": 0,
                "finish_reason": None,
                "max_tokens": None,
                "temperature": None,
                "top_p": None,
                "message_count": None,
                "error_type": None,
                "error_message": None,
                "usage_metadata": None,
            },
        ],
        "usage_receipts": [
            {
                "id": uid(71),
                "usage_id": BIG,
                "payload": json.dumps(DOCUMENT, ensure_ascii=False, sort_keys=True),
                "signature": base64.b64encode(hashlib.sha512(b"sig").digest()).decode(),
                "public_key": base64.b64encode(hashlib.sha256(b"pub").digest()).decode(),
                "issued_at": OFFSET,
            },
            {
                "id": uid(72),
                "usage_id": 1,
                "payload": "{}",
                "signature": "",
                "public_key": "k",
                "issued_at": EPOCH,
            },
        ],
    },
    # Renames every table (RENAMED_TABLES) and creates none: the rows above, under the new
    # names, are its seeds.
    "0005_llmstore_prefix": {},
}

# Columns a revision adds to a table that already exists: revision -> table -> column ->
# the value existing rows get (the revision's documented default). Seed rows may also set
# the column (it is used from that revision on).
ADDED_COLUMNS: dict[str, dict[str, dict[str, Any]]] = {}

# Columns a revision drops: revision -> table -> column -> the value rows get back when
# the revision is downgraded (the seeded value is gone by then). Seeds keep the column for
# the revisions before.
DROPPED_COLUMNS: dict[str, dict[str, dict[str, Any]]] = {}

# Rows a revision writes itself when it creates a table (replaced by the seeds).
REVISION_ROWS: dict[str, dict[str, list[Row]]] = {
    "0002_tokens_audit_providers": {
        "audit_chain": [
            {
                "id": 1,
                "head_seq": 0,
                "head_hash": "0" * 64,
                "head_timestamp": None,
                "anchor_seq": 0,
                "anchor_hash": "0" * 64,
                "purged_at": None,
            }
        ],
    },
}

# Tables that hold at most one row: their nullable columns cannot be both set and unset.
SINGLE_ROW_TABLES = {"audit_chain", "llmstore_audit_chain"}

# Tables a revision renames, old name -> new name: seeds and documented rows keep the name
# of the revision that has them, and are looked for under the name of the revision checked.
RENAMED_TABLES: dict[str, dict[str, str]] = {
    "0005_llmstore_prefix": {
        name: f"llmstore_{name}"
        for name in (
            "projects",
            "tokens",
            "audit_events",
            "audit_chain",
            "provider_credentials",
            "api_keys",
            "ledger_entries",
            "reservations",
            "withdrawals",
            "usage_logs",
            "usage_receipts",
        )
    }
}


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


def _missing_seed_message(missing: list[str]) -> str:
    return (
        f"revision(s) {', '.join(missing)} have no entry in SEEDS of {__name__}: add rows for "
        "every table they create (and ADDED_COLUMNS / DROPPED_COLUMNS for columns they add "
        "or drop), so that the data tests cover them"
    )


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


def _added(table: str, column: str) -> tuple[bool, Any]:
    """Whether a revision adds ``table.column`` to existing rows, and the value they get."""
    for changes in ADDED_COLUMNS.values():
        if column in changes.get(table, {}):
            return True, changes[table][column]
    return False, None


def _explained_absence(table: str, column: str, revision: str) -> bool:
    """Whether a seed may name a column the table lacks at ``revision``: a later revision
    adds it, or an earlier one dropped it."""
    ordered = revisions()
    later = ordered[ordered.index(revision) + 1 :]
    return any(column in ADDED_COLUMNS.get(rev, {}).get(table, {}) for rev in later) or any(
        column in DROPPED_COLUMNS.get(rev, {}).get(table, {}) for rev in _upto(revision)
    )


def _restored(table: str, column: str, after: str) -> tuple[bool, Any]:
    """Whether a revision after ``after`` drops ``table.column``, and the value the column
    holds once that revision is downgraded."""
    ordered = revisions()
    for rev in ordered[ordered.index(after) + 1 :]:
        if column in DROPPED_COLUMNS.get(rev, {}).get(table, {}):
            return True, DROPPED_COLUMNS[rev][table][column]
    return False, None


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
                known, default = _added(table, column)
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
                known, default = _added(table, column)
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


# --- the tests -------------------------------------------------------------------------------


def test_every_revision_has_seed_rows() -> None:
    missing = [rev for rev in revisions() if rev not in SEEDS]
    assert not missing, _missing_seed_message(missing)
    unknown = set(SEEDS) | set(ADDED_COLUMNS) | set(DROPPED_COLUMNS) | set(REVISION_ROWS)
    assert unknown <= set(revisions()), f"no such revision(s): {unknown - set(revisions())}"
    created = [name_at(table, rev, head_revision()) for rev in revisions() for table in SEEDS[rev]]
    assert sorted(created) == sorted(metadata.tables), "SEEDS must cover every model table"


@pytest.mark.parametrize("revision", revisions())
async def test_rows_seeded_at_a_revision_survive_up_to_head_and_back(
    db_config: StoreConfig, revision: str
) -> None:
    assert revision in SEEDS, _missing_seed_message([revision])
    await upgrade(db_config, revision)
    seeded = await seed(db_config, revision)
    assert sum(len(rows) for rows in seeded.rows.values()) >= 2 * len(seeded.rows)
    await assert_rows_intact(db_config, seeded, revision, been_at_head=False)

    head = head_revision()
    assert await upgrade(db_config) == (revision, head)
    await assert_rows_intact(db_config, seeded, head)

    below_head = revisions()[revisions().index(revision) : -1]
    for step in reversed(below_head):
        await downgrade(db_config, step)
        await assert_rows_intact(db_config, seeded, step)
    # Back where it started: exactly the seeds, as written.
    assert await current(db_config) == revision

    # And up once more: each upgrade meets the rows its own downgrade left (rows seeded at
    # 0004 go 0004 -> 0005 -> 0004 -> 0005). Seeded at head: down one revision and up.
    if revision == head:
        below = revisions()[-2]
        await downgrade(db_config, below)
        await assert_rows_intact(db_config, seeded, below)
    assert await upgrade(db_config) == (revisions()[-2] if revision == head else revision, head)
    await assert_rows_intact(db_config, seeded, head)


# --- revision 0005: names and ids ----------------------------------------------------------

_RENAMING = "0005_llmstore_prefix"
_BEFORE_RENAMING = "0004_usage_logs_receipts"
_OLD_USAGE = sa.table(
    "usage_logs",
    sa.column("id", sa.BigInteger()),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("is_streaming", sa.Boolean()),
    sa.column("success", sa.Boolean()),
    sa.column("prompt_tokens", sa.BigInteger()),
    sa.column("completion_tokens", sa.BigInteger()),
    sa.column("cached_tokens", sa.BigInteger()),
    sa.column("total_tokens", sa.BigInteger()),
    sa.column("cost", sa.BigInteger()),
)


def _insert_and_purge_the_newest(conn: Connection) -> int:
    """Three usage rows at 0004, ids from the table's own counter; the newest is purged."""
    row = {
        "created_at": NOW,
        "is_streaming": False,
        "success": True,
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "cached_tokens": 0,
        "total_tokens": 2,
        "cost": 1,
    }
    ids: list[int] = [
        conn.execute(sa.insert(_OLD_USAGE).values(row).returning(_OLD_USAGE.c.id)).scalar_one()
        for _ in range(3)
    ]
    conn.execute(sa.delete(_OLD_USAGE).where(_OLD_USAGE.c.id == max(ids)))
    return max(ids)


async def test_ids_go_on_counting_through_the_rename_and_back(db_config: StoreConfig) -> None:
    """SQLite's AUTOINCREMENT mark and Postgres's sequence survive 0004 -> 0005 -> 0004
    -> 0005: the id of a purged row never comes back (a receipt may name it)."""
    await upgrade(db_config, _BEFORE_RENAMING)
    purged = await on_database(db_config, _insert_and_purge_the_newest)
    await upgrade(db_config)
    async with Store(db_config) as store:
        first = (await store.usage.record(UsageRecord(cost=1))).ids[0]
    assert first is not None and first > purged
    await downgrade(db_config, _BEFORE_RENAMING)
    again = await on_database(db_config, _insert_and_purge_the_newest)
    assert again > first
    await upgrade(db_config)
    async with Store(db_config) as store:
        last = (await store.usage.record(UsageRecord(cost=1))).ids[0]
        assert last is not None and last > again


_OLD_KEYS = sa.table(
    "api_keys",
    *(
        sa.column(name, metadata.tables["llmstore_api_keys"].c[name].type)
        for name in SEEDS["0003_api_keys_ledger"]["api_keys"][1]
    ),
)
_OLD_LEDGER = sa.table(
    "ledger_entries",
    sa.column("id", sa.BigInteger()),
    sa.column("api_key_id", sa.Uuid()),
    sa.column("kind", sa.String()),
    sa.column("amount", sa.BigInteger()),
    sa.column("balance_after", sa.BigInteger()),
    sa.column("description", sa.String()),
    sa.column("shortfall", sa.BigInteger()),
    sa.column("created_at", sa.DateTime(timezone=True)),
)


def _insert_and_purge_the_newest_entry(conn: Connection) -> int:
    """Three ledger entries at 0004, ids from the sequence; the newest is deleted."""
    row = {
        "api_key_id": K2,
        "kind": "deposit",
        "amount": 1,
        "balance_after": 0,
        "description": "",
        "shortfall": 0,
        "created_at": NOW,
    }
    ids: list[int] = [
        conn.execute(sa.insert(_OLD_LEDGER).values(row).returning(_OLD_LEDGER.c.id)).scalar_one()
        for _ in range(3)
    ]
    conn.execute(sa.delete(_OLD_LEDGER).where(_OLD_LEDGER.c.id == max(ids)))
    return max(ids)


def _serial_sequences(conn: Connection) -> dict[str, tuple[str, int]]:
    """By table: its id column's sequence (pg_get_serial_sequence, without the schema) and
    that sequence's last value."""
    out = {}
    for table in ("ledger_entries", "usage_logs"):
        name = next(n for n in (f"llmstore_{table}", table) if sa.inspect(conn).has_table(n))
        qualified = conn.execute(
            sa.text("SELECT pg_get_serial_sequence(:table, 'id')"), {"table": name}
        ).scalar_one()
        sequence = qualified.rsplit(".", 1)[-1]
        last = conn.execute(
            sa.text(
                "SELECT last_value FROM pg_sequences "
                "WHERE schemaname = current_schema() AND sequencename = :name"
            ),
            {"name": sequence},
        ).scalar_one()
        out[name] = (sequence, last)
    return out


@pytest.mark.postgres
async def test_postgres_sequences_are_renamed_with_their_tables_and_go_on() -> None:
    """Both id sequences follow their tables through 0004 -> 0005 -> 0004 -> 0005, still
    owned by the id column and at the value they had: no ledger entry or usage row gets
    the id of one deleted before the migration."""
    url, schema = require_postgres(), fresh_schema_name()
    config = StoreConfig.from_url(url, schema_name=schema)
    try:
        await upgrade(config, _BEFORE_RENAMING)
        await on_database(
            config,
            lambda conn: conn.execute(
                sa.insert(_OLD_KEYS), SEEDS["0003_api_keys_ledger"]["api_keys"][1]
            ),
        )
        entry = await on_database(config, _insert_and_purge_the_newest_entry)
        usage = await on_database(config, _insert_and_purge_the_newest)
        old = {
            "ledger_entries": ("ledger_entries_id_seq", entry),
            "usage_logs": ("usage_logs_id_seq", usage),
        }
        assert await on_database(config, _serial_sequences) == old

        await upgrade(config)
        new = {f"llmstore_{table}": (f"llmstore_{seq}", last) for table, (seq, last) in old.items()}
        assert await on_database(config, _serial_sequences) == new
        async with Store(config) as store:
            deposited = await store.api_keys.deposit(K2, 1)
            recorded = (await store.usage.record(UsageRecord(cost=1))).ids[0]
        assert recorded is not None
        assert (deposited.id, recorded) == (entry + 1, usage + 1)

        await downgrade(config, _BEFORE_RENAMING)
        again = {
            "ledger_entries": ("ledger_entries_id_seq", deposited.id),
            "usage_logs": ("usage_logs_id_seq", recorded),
        }
        assert await on_database(config, _serial_sequences) == again
        entry = await on_database(config, _insert_and_purge_the_newest_entry)
        usage = await on_database(config, _insert_and_purge_the_newest)
        assert (entry, usage) == (deposited.id + 3, recorded + 3)

        await upgrade(config)
        async with Store(config) as store:
            assert (await store.api_keys.deposit(K2, 1)).id == entry + 1
            assert (await store.usage.record(UsageRecord(cost=1))).ids[0] == usage + 1
    finally:
        await drop_schema(url, schema)


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
