"""The schema: one ``MetaData`` that the migrations are checked against."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


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


projects = sa.Table(
    "projects",
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
    "tokens",
    metadata,
    sa.Column("id", sa.Uuid(), primary_key=True),
    sa.Column(
        "project_id",
        sa.Uuid(),
        sa.ForeignKey("projects.id", ondelete="CASCADE"),
        nullable=False,
    ),
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
    "audit_events",
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
    sa.Column("event_metadata", sa.JSON(), nullable=True),
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
    "audit_chain",
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

provider_credentials = sa.Table(
    "provider_credentials",
    metadata,
    sa.Column("id", sa.Uuid(), primary_key=True),
    sa.Column(
        "project_id",
        sa.Uuid(),
        sa.ForeignKey("projects.id", ondelete="CASCADE"),
        nullable=True,
    ),
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
        "uq_provider_credentials_active_scope",
        "scope",
        unique=True,
        sqlite_where=sa.text("is_active"),
        postgresql_where=sa.text("is_active"),
    ),
    sa.Index(None, "project_id"),
)
