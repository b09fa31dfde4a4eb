"""prefix every object with llmstore_

Every table, index, constraint and sequence of llmstore's gets the ``llmstore_`` prefix,
so that a host application can keep its own tables (often named ``projects`` or
``api_keys`` too) in the same database or schema. The version table moves to
``llmstore_alembic_version`` outside the revisions (``llmstore._migrations``).

PostgreSQL renames in place: metadata only, no row is read or written. SQLite cannot
rename a constraint (its name lives in the table's CREATE statement) or an index, so each
table is rebuilt under its new name from its own CREATE statement with the names replaced,
its rows copied and its indexes created again, all inside the migration's transaction
(foreign keys are off there and checked before COMMIT).

Revision ID: 0005_llmstore_prefix
Revises: 0004_usage_logs_receipts
Create Date: 2026-12-03 00:00:00+00:00
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import sqlalchemy as sa
from alembic import op

from llmstore import MigrationError
from llmstore.migrations.ops import set_lock_timeout

revision: str = "0005_llmstore_prefix"
down_revision: str | None = "0004_usage_logs_receipts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PREFIX = "llmstore_"

# Written out as they were at revision 0004 (read from a database migrated to it).
TABLES = (
    "audit_chain",
    "audit_events",
    "projects",
    "usage_logs",
    "usage_receipts",
    "api_keys",
    "provider_credentials",
    "tokens",
    "ledger_entries",
    "reservations",
    "withdrawals",
)

CONSTRAINTS: Mapping[str, tuple[tuple[str, str], ...]] = {
    "audit_chain": (
        ("ck_audit_chain_single_row", "llmstore_audit_chain_single_row_check"),
        ("pk_audit_chain", "llmstore_audit_chain_pkey"),
    ),
    "audit_events": (
        ("ck_audit_events_outcome", "llmstore_audit_events_outcome_check"),
        ("pk_audit_events", "llmstore_audit_events_pkey"),
        ("uq_audit_events_prev_hash", "llmstore_audit_events_prev_hash_key"),
        ("uq_audit_events_seq", "llmstore_audit_events_seq_key"),
    ),
    "projects": (
        ("pk_projects", "llmstore_projects_pkey"),
        ("uq_projects_name", "llmstore_projects_name_key"),
    ),
    "usage_logs": (
        ("pk_usage_logs", "llmstore_usage_logs_pkey"),
        ("uq_usage_logs_request_id", "llmstore_usage_logs_request_id_key"),
    ),
    "usage_receipts": (("pk_usage_receipts", "llmstore_usage_receipts_pkey"),),
    "api_keys": (
        ("ck_api_keys_balance_not_negative", "llmstore_api_keys_balance_not_negative_check"),
        (
            "ck_api_keys_reserved_within_balance",
            "llmstore_api_keys_reserved_within_balance_check",
        ),
        ("ck_api_keys_totals_not_negative", "llmstore_api_keys_totals_not_negative_check"),
        ("fk_api_keys_project_id_projects", "llmstore_api_keys_project_id_fkey"),
        ("pk_api_keys", "llmstore_api_keys_pkey"),
        ("uq_api_keys_secret_digest", "llmstore_api_keys_secret_digest_key"),
    ),
    "provider_credentials": (
        (
            "ck_provider_credentials_scope_matches_project",
            "llmstore_provider_credentials_scope_matches_project_check",
        ),
        (
            "fk_provider_credentials_project_id_projects",
            "llmstore_provider_credentials_project_id_fkey",
        ),
        ("pk_provider_credentials", "llmstore_provider_credentials_pkey"),
    ),
    "tokens": (
        ("ck_tokens_max_requests_positive", "llmstore_tokens_max_requests_positive_check"),
        (
            "ck_tokens_request_count_not_negative",
            "llmstore_tokens_request_count_not_negative_check",
        ),
        ("fk_tokens_project_id_projects", "llmstore_tokens_project_id_fkey"),
        ("pk_tokens", "llmstore_tokens_pkey"),
        ("uq_tokens_project_id_name", "llmstore_tokens_project_id_name_key"),
        ("uq_tokens_secret_digest", "llmstore_tokens_secret_digest_key"),
    ),
    "ledger_entries": (
        (
            "ck_ledger_entries_balance_after_not_negative",
            "llmstore_ledger_entries_balance_after_not_negative_check",
        ),
        ("ck_ledger_entries_kind", "llmstore_ledger_entries_kind_check"),
        (
            "ck_ledger_entries_shortfall_not_negative",
            "llmstore_ledger_entries_shortfall_not_negative_check",
        ),
        ("fk_ledger_entries_api_key_id_api_keys", "llmstore_ledger_entries_api_key_id_fkey"),
        ("pk_ledger_entries", "llmstore_ledger_entries_pkey"),
        (
            "uq_ledger_entries_api_key_id_idempotency_key",
            "llmstore_ledger_entries_api_key_id_idempotency_key_key",
        ),
    ),
    "reservations": (
        ("ck_reservations_amount_positive", "llmstore_reservations_amount_positive_check"),
        ("ck_reservations_status", "llmstore_reservations_status_check"),
        ("fk_reservations_api_key_id_api_keys", "llmstore_reservations_api_key_id_fkey"),
        ("pk_reservations", "llmstore_reservations_pkey"),
    ),
    "withdrawals": (
        ("ck_withdrawals_amount_positive", "llmstore_withdrawals_amount_positive_check"),
        ("ck_withdrawals_status", "llmstore_withdrawals_status_check"),
        ("fk_withdrawals_api_key_id_api_keys", "llmstore_withdrawals_api_key_id_fkey"),
        ("pk_withdrawals", "llmstore_withdrawals_pkey"),
    ),
}

# The indexes that back no constraint.
INDEXES = (
    ("ix_api_keys_expires_at", "llmstore_api_keys_expires_at_idx"),
    ("ix_api_keys_project_id", "llmstore_api_keys_project_id_idx"),
    ("ix_audit_events_action_seq", "llmstore_audit_events_action_seq_idx"),
    ("ix_audit_events_actor_seq", "llmstore_audit_events_actor_seq_idx"),
    ("ix_audit_events_project_id_seq", "llmstore_audit_events_project_id_seq_idx"),
    ("ix_audit_events_timestamp", "llmstore_audit_events_timestamp_idx"),
    ("ix_ledger_entries_api_key_id_id", "llmstore_ledger_entries_api_key_id_id_idx"),
    ("ix_provider_credentials_project_id", "llmstore_provider_credentials_project_id_idx"),
    ("ix_reservations_api_key_id_status", "llmstore_reservations_api_key_id_status_idx"),
    ("ix_reservations_status_expires_at", "llmstore_reservations_status_expires_at_idx"),
    (
        "ix_usage_logs_api_key_id_created_at_id",
        "llmstore_usage_logs_api_key_id_created_at_id_idx",
    ),
    ("ix_usage_logs_created_at_id", "llmstore_usage_logs_created_at_id_idx"),
    ("ix_usage_logs_model_created_at", "llmstore_usage_logs_model_created_at_idx"),
    (
        "ix_usage_logs_project_id_created_at_id",
        "llmstore_usage_logs_project_id_created_at_id_idx",
    ),
    ("ix_usage_receipts_usage_id", "llmstore_usage_receipts_usage_id_idx"),
    ("ix_withdrawals_api_key_id_status", "llmstore_withdrawals_api_key_id_status_idx"),
    ("uq_provider_credentials_active_scope", "llmstore_provider_credentials_active_scope_key"),
)

# PostgreSQL's sequences of the two 64-bit id columns (SQLite keeps usage_logs' in
# sqlite_sequence, carried over below).
SEQUENCES = (
    ("ledger_entries_id_seq", "llmstore_ledger_entries_id_seq"),
    ("usage_logs_id_seq", "llmstore_usage_logs_id_seq"),
)


def upgrade() -> None:
    set_lock_timeout()
    _rename(forward=True)


def downgrade() -> None:
    set_lock_timeout()
    if not op.get_context().as_sql:
        _refuse_taken_names()
    _rename(forward=False)


def _refuse_taken_names() -> None:
    """The old names may be a host's own tables now (``api_keys`` often is): say so."""
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    taken = sorted(existing & set(TABLES))
    if taken:
        raise MigrationError(
            "downgrading below 0005 gives llmstore's tables their old names, and "
            f"{', '.join(taken)} already exist in this database; nothing was changed"
        )


def _pairs(forward: bool) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """(table renames, (table after, constraint, new constraint) renames) one way or back."""
    tables = [(name, PREFIX + name) for name in TABLES]
    constraints = [
        (PREFIX + table, old, new) for table in TABLES for old, new in CONSTRAINTS[table]
    ]
    if forward:
        return tables, constraints
    return (
        [(new, old) for old, new in tables],
        [(table[len(PREFIX) :], new, old) for table, old, new in constraints],
    )


def _rename(*, forward: bool) -> None:
    tables, constraints = _pairs(forward)
    indexes = list(INDEXES) if forward else [(new, old) for old, new in INDEXES]
    sequences = list(SEQUENCES) if forward else [(new, old) for old, new in SEQUENCES]
    context = op.get_context()
    if context.dialect.name == "sqlite":
        if context.as_sql:
            raise MigrationError(
                "revision 0005 rebuilds SQLite tables from their own CREATE statements, "
                "which --sql cannot read: run it against the database"
            )
        names = dict(tables) | {old: new for _, old, new in constraints} | dict(indexes)
        _rebuild_sqlite(dict(tables), names)
        return
    for old, new in tables:
        op.rename_table(old, new)
    for table, old, new in constraints:  # a primary or unique key's index follows it
        op.execute(f'ALTER TABLE "{table}" RENAME CONSTRAINT "{old}" TO "{new}"')
    for old, new in indexes:
        op.execute(f'ALTER INDEX "{old}" RENAME TO "{new}"')
    for old, new in sequences:
        op.execute(f'ALTER SEQUENCE "{old}" RENAME TO "{new}"')


def _rebuild_sqlite(tables: Mapping[str, str], names: Mapping[str, str]) -> None:
    """Rebuild each table under its new name, from its own SQL with every name replaced.

    The names are whole words of ``[a-z_]``, matched longest first, so that ``tokens``
    is never found inside ``prompt_tokens`` nor ``projects`` inside ``pk_projects``.
    """
    conn = op.get_bind()
    pattern = re.compile(
        r"\b(" + "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True)) + r")\b"
    )

    def renamed(sql: str) -> str:
        return pattern.sub(lambda match: names[match.group(1)], sql)

    def statements(kind: str, table: str) -> list[str]:
        return list(
            conn.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE type = ? AND tbl_name = ? "
                "AND sql IS NOT NULL ORDER BY name",
                (kind, table),
            ).scalars()
        )

    has_sequences = conn.exec_driver_sql(
        "SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'"
    ).first()
    sequences = {
        old: conn.exec_driver_sql("SELECT seq FROM sqlite_sequence WHERE name = ?", (old,)).scalar()
        for old in tables
        if has_sequences
    }
    indexes = [sql for old in tables for sql in statements("index", old)]
    # Parents first (the order of ``tables``), so that the rows meet their foreign keys
    # even where they are on; dropped children first, so that no ON DELETE action runs.
    for old, new in tables.items():
        (create,) = statements("table", old)
        conn.exec_driver_sql(renamed(create))
        conn.exec_driver_sql(f'INSERT INTO "{new}" SELECT * FROM "{old}"')
    for old in reversed(list(tables)):
        conn.exec_driver_sql(f'DROP TABLE "{old}"')
    for sql in indexes:
        conn.exec_driver_sql(renamed(sql))
    # AUTOINCREMENT never reuses an id, even of a purged row: carry the high-water mark over.
    for old, seq in sequences.items():
        if seq is not None:
            conn.exec_driver_sql(
                "UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = ?", (seq, tables[old])
            )
            conn.exec_driver_sql(
                "INSERT INTO sqlite_sequence (name, seq) SELECT ?, ? WHERE NOT EXISTS "
                "(SELECT 1 FROM sqlite_sequence WHERE name = ?)",
                (tables[old], seq, tables[old]),
            )
