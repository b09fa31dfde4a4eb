"""The schema: one ``MetaData`` that the migrations are checked against."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal, get_args

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

#: Every object of llmstore's is named ``llmstore_...``: a host application keeps its own
#: tables (often called ``projects`` or ``api_keys`` too) in the same database or schema.
TABLE_PREFIX = "llmstore_"
#: Alembic's version table of llmstore's own history, so that a host's ``alembic_version``
#: (its own history) never meets a revision of llmstore's.
VERSION_TABLE = "llmstore_alembic_version"
#: Where llmstore's revision was kept before revision 0005.
LEGACY_VERSION_TABLE = "alembic_version"

# The suffixes are PostgreSQL's own (pkey, key, fkey, idx, check), after the table's name.
NAMING_CONVENTION = {
    "ix": "%(table_name)s_%(column_0_N_name)s_idx",
    "uq": "%(table_name)s_%(column_0_N_name)s_key",
    "ck": "%(table_name)s_%(constraint_name)s_check",
    "fk": "%(table_name)s_%(column_0_name)s_fkey",
    "pk": "%(table_name)s_pkey",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

# JSON columns store Python None as SQL NULL (not the JSON text 'null'), so that
# "IS NULL" finds them.
Json = sa.JSON(none_as_null=True)


class UTCDateTime(sa.TypeDecorator[dt.datetime]):
    """A timezone-aware UTC timestamp on both drivers.

    SQLite has no time zones: values are stored as naive UTC text, which sorts in time
    order, and come back marked UTC. A naive datetime is refused rather than guessed at.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, dt.datetime) or value.tzinfo is None:
            raise TypeError("timestamps must be timezone-aware datetimes")
        utc: dt.datetime = value.astimezone(dt.UTC)
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        assert isinstance(value, dt.datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        utc: dt.datetime = value.astimezone(dt.UTC)
        return utc


def reference(name: str, table: str, *, ondelete: str, nullable: bool) -> sa.Column[Any]:
    """A UUID column referencing ``table``'s id."""
    return sa.Column(
        name, sa.Uuid(), sa.ForeignKey(f"{table}.id", ondelete=ondelete), nullable=nullable
    )


projects = sa.Table(
    "llmstore_projects",
    metadata,
    sa.Column("id", sa.Uuid(), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    # Fernet ciphertext of the upstream provider key; never the plaintext.
    sa.Column("api_key_encrypted", sa.Text(), nullable=True),
    sa.Column("is_active", sa.Boolean(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Column("deactivated_at", UTCDateTime(), nullable=True),
    sa.UniqueConstraint("name"),
)


tokens = sa.Table(
    "llmstore_tokens",
    metadata,
    sa.Column("id", sa.Uuid(), primary_key=True),
    reference("project_id", "llmstore_projects", ondelete="CASCADE", nullable=False),
    # SHA-256 (or HMAC-SHA256 under LLMSTORE_TOKEN_PEPPER) of the secret, hex; never the secret.
    sa.Column("secret_digest", sa.String(64), nullable=False),
    sa.Column("prefix", sa.String(16), nullable=False),
    sa.Column("name", sa.String(200), nullable=True),
    sa.Column("expires_at", UTCDateTime(), nullable=True),
    sa.Column("is_active", sa.Boolean(), nullable=False),
    sa.Column("deactivated_at", UTCDateTime(), nullable=True),
    sa.Column("request_count", sa.BigInteger(), nullable=False),
    sa.Column("max_requests", sa.BigInteger(), nullable=True),
    sa.Column("cache_hit_count", sa.BigInteger(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("last_used_at", UTCDateTime(), nullable=True),
    sa.UniqueConstraint("secret_digest"),
    sa.UniqueConstraint("project_id", "name"),
    sa.CheckConstraint("request_count >= 0", name="request_count_not_negative"),
    sa.CheckConstraint("max_requests IS NULL OR max_requests > 0", name="max_requests_positive"),
)

audit_events = sa.Table(
    "llmstore_audit_events",
    metadata,
    sa.Column("id", sa.Uuid(), primary_key=True),
    # Position in the hash chain: 1, 2, 3, ... with no gaps while nothing is purged.
    sa.Column("seq", sa.BigInteger(), nullable=False),
    sa.Column("timestamp", UTCDateTime(), nullable=False),
    sa.Column("action", sa.String(100), nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    # No foreign keys: the log outlives the projects and tokens it mentions.
    sa.Column("project_id", sa.Uuid(), nullable=True),
    sa.Column("token_id", sa.Uuid(), nullable=True),
    sa.Column("request_id", sa.String(200), nullable=True),
    sa.Column("client_ip", sa.String(45), nullable=True),
    sa.Column("event_metadata", Json, nullable=True),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.UniqueConstraint("seq"),
    sa.UniqueConstraint("prev_hash"),
    sa.CheckConstraint("outcome IN ('success', 'failure', 'denied')", name="outcome"),
    sa.Index(None, "timestamp"),
    sa.Index(None, "action", "seq"),
    sa.Index(None, "actor", "seq"),
    sa.Index(None, "project_id", "seq"),
)

# One row: the head of the audit chain (serialises appends) and the anchor that
# purge() leaves, from which the remaining chain is verified.
audit_chain = sa.Table(
    "llmstore_audit_chain",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("head_seq", sa.BigInteger(), nullable=False),
    sa.Column("head_hash", sa.String(64), nullable=False),
    sa.Column("head_timestamp", UTCDateTime(), nullable=True),
    sa.Column("anchor_seq", sa.BigInteger(), nullable=False),
    sa.Column("anchor_hash", sa.String(64), nullable=False),
    sa.Column("purged_at", UTCDateTime(), nullable=True),
    sa.CheckConstraint("id = 1", name="single_row"),
)

#: The rows a new database starts with (revision 0002 inserts the same): the chain's genesis.
GENESIS_HASH = "0" * 64
INITIAL_ROWS: dict[str, list[dict[str, Any]]] = {
    "llmstore_audit_chain": [
        {
            "id": 1,
            "head_seq": 0,
            "head_hash": GENESIS_HASH,
            "anchor_seq": 0,
            "anchor_hash": GENESIS_HASH,
        }
    ]
}

provider_credentials = sa.Table(
    "llmstore_provider_credentials",
    metadata,
    sa.Column("id", sa.Uuid(), primary_key=True),
    reference("project_id", "llmstore_projects", ondelete="CASCADE", nullable=True),
    # The project id as text, or "global": one column the partial unique index can cover.
    sa.Column("scope", sa.String(36), nullable=False),
    sa.Column("provider", sa.String(50), nullable=False),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("base_url", sa.String(2000), nullable=True),
    sa.Column("api_key_encrypted", sa.Text(), nullable=True),
    sa.Column("is_active", sa.Boolean(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.CheckConstraint("(project_id IS NULL) = (scope = 'global')", name="scope_matches_project"),
    sa.Index(
        "llmstore_provider_credentials_active_scope_key",
        "scope",
        unique=True,
        sqlite_where=sa.text("is_active"),
        postgresql_where=sa.text("is_active"),
    ),
    sa.Index(None, "project_id"),
)


api_keys = sa.Table(
    "llmstore_api_keys",
    metadata,
    sa.Column("id", sa.Uuid(), primary_key=True),
    # SHA-256 (or HMAC-SHA256 under LLMSTORE_TOKEN_PEPPER) of the secret, hex; never the secret.
    sa.Column("secret_digest", sa.String(64), nullable=False),
    sa.Column("prefix", sa.String(16), nullable=False),
    # Money outlives projects: deleting a project detaches its keys.
    reference("project_id", "llmstore_projects", ondelete="SET NULL", nullable=True),
    # Integer minor units (millisatoshis, cents, ...). reserved is held out of balance.
    sa.Column("balance", sa.BigInteger(), nullable=False),
    sa.Column("reserved", sa.BigInteger(), nullable=False),
    sa.Column("total_deposited", sa.BigInteger(), nullable=False),
    sa.Column("total_spent", sa.BigInteger(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("last_used_at", UTCDateTime(), nullable=True),
    sa.Column("expires_at", UTCDateTime(), nullable=True),
    sa.Column("key_metadata", Json, nullable=True),
    # Added by revision 0006: a deactivated key is refused (reason "inactive").
    sa.Column("is_active", sa.Boolean(), nullable=False, server_default=sa.true()),
    sa.Column("deactivated_at", UTCDateTime(), nullable=True),
    sa.UniqueConstraint("secret_digest"),
    sa.CheckConstraint("balance >= 0", name="balance_not_negative"),
    sa.CheckConstraint("reserved >= 0 AND reserved <= balance", name="reserved_within_balance"),
    sa.CheckConstraint("total_deposited >= 0 AND total_spent >= 0", name="totals_not_negative"),
    sa.Index(None, "project_id"),
    sa.Index(None, "expires_at"),
)

#: What moved a key's balance; the ledger's CHECK constraint and ``LedgerEntry.kind``.
LedgerKind = Literal[
    "deposit",
    "charge",
    "settlement",
    "transfer_in",
    "transfer_out",
    "withdrawal",
    "withdrawal_refund",
]
LEDGER_KINDS: tuple[LedgerKind, ...] = get_args(LedgerKind)

ledger_entries = sa.Table(
    "llmstore_ledger_entries",
    metadata,
    # 64-bit and increasing: newest first is id order, and pages stay cheap at any depth.
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    reference("api_key_id", "llmstore_api_keys", ondelete="CASCADE", nullable=False),
    sa.Column("kind", sa.String(20), nullable=False),
    # Signed: credits are positive, debits negative.
    sa.Column("amount", sa.BigInteger(), nullable=False),
    sa.Column("balance_after", sa.BigInteger(), nullable=False),
    sa.Column("description", sa.String(500), nullable=False),
    sa.Column("idempotency_key", sa.String(200), nullable=True),
    # SHA-256 of the operation's parameters, to tell a replay from a reused key.
    sa.Column("params_digest", sa.String(64), nullable=True),
    sa.Column("request_data", Json, nullable=True),
    # What a settlement could not collect (the key could not cover the actual cost).
    sa.Column("shortfall", sa.BigInteger(), nullable=False),
    sa.Column("reservation_id", sa.Uuid(), nullable=True),
    sa.Column("withdrawal_id", sa.Uuid(), nullable=True),
    # Both entries of a transfer share it.
    sa.Column("transfer_id", sa.Uuid(), nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.UniqueConstraint("api_key_id", "idempotency_key"),
    sa.CheckConstraint(
        "kind IN (" + ", ".join(f"'{kind}'" for kind in LEDGER_KINDS) + ")", name="kind"
    ),
    sa.CheckConstraint("balance_after >= 0", name="balance_after_not_negative"),
    sa.CheckConstraint("shortfall >= 0", name="shortfall_not_negative"),
    sa.Index(None, "api_key_id", "id"),
)

reservations = sa.Table(
    "llmstore_reservations",
    metadata,
    sa.Column("id", sa.Uuid(), primary_key=True),
    reference("api_key_id", "llmstore_api_keys", ondelete="CASCADE", nullable=False),
    sa.Column("amount", sa.BigInteger(), nullable=False),
    sa.Column("status", sa.String(10), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("expires_at", UTCDateTime(), nullable=False),
    sa.Column("settled_amount", sa.BigInteger(), nullable=True),
    sa.Column("finished_at", UTCDateTime(), nullable=True),
    sa.CheckConstraint("amount > 0", name="amount_positive"),
    sa.CheckConstraint("status IN ('active', 'settled', 'released', 'expired')", name="status"),
    sa.Index(None, "api_key_id", "status"),
    sa.Index(None, "status", "expires_at"),
)

withdrawals = sa.Table(
    "llmstore_withdrawals",
    metadata,
    sa.Column("id", sa.Uuid(), primary_key=True),
    reference("api_key_id", "llmstore_api_keys", ondelete="CASCADE", nullable=False),
    sa.Column("amount", sa.BigInteger(), nullable=False),
    # Fernet ciphertext of the eCash token; never the token.
    sa.Column("token_encrypted", sa.Text(), nullable=False),
    sa.Column("mint_url", sa.String(2000), nullable=False),
    sa.Column("status", sa.String(10), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("completed_at", UTCDateTime(), nullable=True),
    sa.Column("error_message", sa.String(2000), nullable=True),
    sa.Column("retry_count", sa.Integer(), nullable=False),
    sa.CheckConstraint("amount > 0", name="amount_positive"),
    sa.CheckConstraint("status IN ('pending', 'completed', 'failed')", name="status"),
    sa.Index(None, "api_key_id", "status"),
)

usage_logs = sa.Table(
    "llmstore_usage_logs",
    metadata,
    # 64-bit and increasing. No foreign keys: usage outlives the keys, projects and tokens
    # it names (accounting keeps it), and bulk ingest pays nothing per row for them.
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("api_key_id", sa.Uuid(), nullable=True),
    sa.Column("project_id", sa.Uuid(), nullable=True),
    sa.Column("token_id", sa.Uuid(), nullable=True),
    sa.Column("request_id", sa.String(200), nullable=True),
    sa.Column("alias", sa.String(200), nullable=True),
    sa.Column("profile", sa.String(200), nullable=True),
    sa.Column("provider", sa.String(200), nullable=True),
    sa.Column("model", sa.String(200), nullable=True),
    sa.Column("origin", sa.String(200), nullable=True),
    sa.Column("is_streaming", sa.Boolean(), nullable=False),
    sa.Column("success", sa.Boolean(), nullable=False),
    sa.Column("status_code", sa.Integer(), nullable=True),
    sa.Column("response_time_ms", sa.BigInteger(), nullable=True),
    sa.Column("time_to_first_token_ms", sa.BigInteger(), nullable=True),
    sa.Column("time_to_last_token_ms", sa.BigInteger(), nullable=True),
    sa.Column("tokens_per_second", sa.Float(), nullable=True),
    sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
    sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
    sa.Column("cached_tokens", sa.BigInteger(), nullable=False),
    sa.Column("total_tokens", sa.BigInteger(), nullable=False),
    # Integer minor units, as the ledger's amounts.
    sa.Column("cost", sa.BigInteger(), nullable=False),
    sa.Column("finish_reason", sa.String(100), nullable=True),
    sa.Column("max_tokens", sa.BigInteger(), nullable=True),
    sa.Column("temperature", sa.Float(), nullable=True),
    sa.Column("top_p", sa.Float(), nullable=True),
    sa.Column("message_count", sa.Integer(), nullable=True),
    sa.Column("error_type", sa.String(200), nullable=True),
    sa.Column("error_message", sa.String(4000), nullable=True),
    sa.Column("usage_metadata", Json, nullable=True),
    # Added by 0008 (existing rows: 0, NULL, "reported", "given"). Token parts are
    # included in prompt_tokens / completion_tokens (OpenTelemetry GenAI's convention).
    sa.Column("cache_write_tokens", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("reasoning_tokens", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("audio_input_tokens", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("audio_output_tokens", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("end_user", sa.String(200), nullable=True),
    sa.Column("session_id", sa.String(200), nullable=True),
    sa.Column("service_tier", sa.String(200), nullable=True),
    # A JSON array of distinct strings; NULL when there are none.
    sa.Column("tags", Json, nullable=True),
    sa.Column("usage_source", sa.String(20), nullable=False, server_default="reported"),
    # Where ``cost`` came from: "given", "price_table" or "none" (no price: cost 0).
    sa.Column("cost_source", sa.String(20), nullable=False, server_default="given"),
    sa.UniqueConstraint("request_id"),
    # Newest-first pages and time windows: all rows, one key, one project, one model.
    sa.Index(None, "created_at", "id"),
    sa.Index(None, "api_key_id", "created_at", "id"),
    sa.Index(None, "project_id", "created_at", "id"),
    sa.Index(None, "model", "created_at"),
    # SQLite: never reuse the id of a purged row (a receipt may still name it).
    sqlite_autoincrement=True,
)

usage_receipts = sa.Table(
    "llmstore_usage_receipts",
    metadata,
    sa.Column("id", sa.Uuid(), primary_key=True),
    # No foreign key: a receipt outlives the purge of the row it states.
    sa.Column("usage_id", sa.BigInteger(), nullable=False),
    # The signed bytes: the row's canonical JSON (RFC 8785, with integers kept exact), as issued.
    sa.Column("payload", sa.Text(), nullable=False),
    sa.Column("signature", sa.String(200), nullable=False),
    sa.Column("public_key", sa.String(200), nullable=False),
    sa.Column("issued_at", UTCDateTime(), nullable=False),
    # One receipt per row: issuing again, even concurrently, returns the first.
    sa.Index(None, "usage_id", unique=True),
)


# Registered on ``metadata`` with the rest, whoever imports this module first.
from . import admission_schema as admission_schema  # noqa: E402
from . import prices_schema as prices_schema  # noqa: E402
