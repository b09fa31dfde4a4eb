"""The ORM way's models: declarative SQLAlchemy classes on ``orm_*`` tables, as an
application would write them, with the columns, constraints and indexes of llmstore's
tables (and its naming convention)."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from .common import new_id, utcnow
from .raw_schema import NAMING_CONVENTION


class OrmBase(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=dict(NAMING_CONVENTION))


class OrmProject(OrmBase):
    __tablename__ = "orm_projects"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(sa.String(200), unique=True)
    api_key_encrypted: Mapped[str | None] = mapped_column(sa.Text())
    is_active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)
    deactivated_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime(timezone=True))


class OrmToken(OrmBase):
    __tablename__ = "orm_tokens"
    __table_args__ = (
        sa.UniqueConstraint("project_id", "name"),
        sa.CheckConstraint("request_count >= 0", name="request_count_not_negative"),
        sa.CheckConstraint(
            "max_requests IS NULL OR max_requests > 0", name="max_requests_positive"
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    project_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("orm_projects.id", ondelete="CASCADE")
    )
    secret_digest: Mapped[str] = mapped_column(sa.String(64), unique=True)
    prefix: Mapped[str] = mapped_column(sa.String(16))
    name: Mapped[str | None] = mapped_column(sa.String(200))
    expires_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime(timezone=True))
    is_active: Mapped[bool] = mapped_column(default=True)
    deactivated_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime(timezone=True))
    request_count: Mapped[int] = mapped_column(sa.BigInteger(), default=0)
    max_requests: Mapped[int | None] = mapped_column(sa.BigInteger())
    cache_hit_count: Mapped[int] = mapped_column(sa.BigInteger(), default=0)
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime(timezone=True))

    project: Mapped[OrmProject] = relationship()


#: ``ledger_entries.id``: BIGSERIAL on Postgres, the rowid (INTEGER PRIMARY KEY) on SQLite.
LEDGER_ID_TYPE: Final = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class OrmApiKey(OrmBase):
    __tablename__ = "orm_api_keys"
    __table_args__ = (
        sa.CheckConstraint("balance >= 0", name="balance_not_negative"),
        sa.CheckConstraint("reserved >= 0 AND reserved <= balance", name="reserved_within_balance"),
        sa.CheckConstraint("total_deposited >= 0 AND total_spent >= 0", name="totals_not_negative"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    secret_digest: Mapped[str] = mapped_column(sa.String(64), unique=True)
    prefix: Mapped[str] = mapped_column(sa.String(16))
    project_id: Mapped[uuid.UUID | None] = mapped_column(
        sa.ForeignKey("orm_projects.id", ondelete="SET NULL"), index=True
    )
    balance: Mapped[int] = mapped_column(sa.BigInteger())
    reserved: Mapped[int] = mapped_column(sa.BigInteger(), default=0)
    total_deposited: Mapped[int] = mapped_column(sa.BigInteger())
    total_spent: Mapped[int] = mapped_column(sa.BigInteger(), default=0)
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime(timezone=True))
    expires_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime(timezone=True), index=True)
    key_metadata: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON())
    is_active: Mapped[bool] = mapped_column(default=True)
    deactivated_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime(timezone=True))


class OrmLedgerEntry(OrmBase):
    __tablename__ = "orm_ledger_entries"
    __table_args__ = (
        sa.UniqueConstraint("api_key_id", "idempotency_key"),
        sa.CheckConstraint(
            "kind IN ('deposit', 'charge', 'settlement', 'transfer_in', 'transfer_out', "
            "'withdrawal', 'withdrawal_refund')",
            name="kind",
        ),
        sa.CheckConstraint("balance_after >= 0", name="balance_after_not_negative"),
        sa.CheckConstraint("shortfall >= 0", name="shortfall_not_negative"),
        sa.Index(None, "api_key_id", "id"),
    )

    id: Mapped[int] = mapped_column(LEDGER_ID_TYPE, primary_key=True)
    api_key_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("orm_api_keys.id", ondelete="CASCADE")
    )
    kind: Mapped[str] = mapped_column(sa.String(20))
    amount: Mapped[int] = mapped_column(sa.BigInteger())
    balance_after: Mapped[int] = mapped_column(sa.BigInteger())
    description: Mapped[str] = mapped_column(sa.String(500), default="")
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(200))
    params_digest: Mapped[str | None] = mapped_column(sa.String(64))
    request_data: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON())
    shortfall: Mapped[int] = mapped_column(sa.BigInteger(), default=0)
    reservation_id: Mapped[uuid.UUID | None]
    withdrawal_id: Mapped[uuid.UUID | None]
    transfer_id: Mapped[uuid.UUID | None]
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)


class OrmReservation(OrmBase):
    __tablename__ = "orm_reservations"
    __table_args__ = (
        sa.CheckConstraint("amount > 0", name="amount_positive"),
        sa.CheckConstraint("status IN ('active', 'settled', 'released', 'expired')", name="status"),
        sa.Index(None, "api_key_id", "status"),
        sa.Index(None, "status", "expires_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    api_key_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("orm_api_keys.id", ondelete="CASCADE")
    )
    amount: Mapped[int] = mapped_column(sa.BigInteger())
    status: Mapped[str] = mapped_column(sa.String(10))
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True))
    expires_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True))
    settled_amount: Mapped[int | None] = mapped_column(sa.BigInteger())
    finished_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime(timezone=True))


class OrmUsageLog(OrmBase):
    __tablename__ = "orm_usage_logs"
    __table_args__ = (
        sa.Index(None, "created_at", "id"),
        sa.Index(None, "api_key_id", "created_at", "id"),
        sa.Index(None, "project_id", "created_at", "id"),
        sa.Index(None, "model", "created_at"),
    )

    id: Mapped[int] = mapped_column(LEDGER_ID_TYPE, primary_key=True)  # as ledger_entries.id
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True))
    api_key_id: Mapped[uuid.UUID | None]
    project_id: Mapped[uuid.UUID | None]
    token_id: Mapped[uuid.UUID | None]
    request_id: Mapped[str | None] = mapped_column(sa.String(200), unique=True)
    alias: Mapped[str | None] = mapped_column(sa.String(200))
    profile: Mapped[str | None] = mapped_column(sa.String(200))
    provider: Mapped[str | None] = mapped_column(sa.String(200))
    model: Mapped[str | None] = mapped_column(sa.String(200))
    origin: Mapped[str | None] = mapped_column(sa.String(200))
    is_streaming: Mapped[bool] = mapped_column(default=False)
    success: Mapped[bool] = mapped_column(default=True)
    status_code: Mapped[int | None]
    response_time_ms: Mapped[int | None] = mapped_column(sa.BigInteger())
    time_to_first_token_ms: Mapped[int | None] = mapped_column(sa.BigInteger())
    time_to_last_token_ms: Mapped[int | None] = mapped_column(sa.BigInteger())
    tokens_per_second: Mapped[float | None]
    prompt_tokens: Mapped[int] = mapped_column(sa.BigInteger(), default=0)
    completion_tokens: Mapped[int] = mapped_column(sa.BigInteger(), default=0)
    cached_tokens: Mapped[int] = mapped_column(sa.BigInteger(), default=0)
    total_tokens: Mapped[int] = mapped_column(sa.BigInteger())
    cost: Mapped[int] = mapped_column(sa.BigInteger(), default=0)
    finish_reason: Mapped[str | None] = mapped_column(sa.String(100))
    max_tokens: Mapped[int | None] = mapped_column(sa.BigInteger())
    temperature: Mapped[float | None]
    top_p: Mapped[float | None]
    message_count: Mapped[int | None]
    error_type: Mapped[str | None] = mapped_column(sa.String(200))
    error_message: Mapped[str | None] = mapped_column(sa.String(4000))
    usage_metadata: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON())
    cache_write_tokens: Mapped[int] = mapped_column(sa.BigInteger(), default=0)
    reasoning_tokens: Mapped[int] = mapped_column(sa.BigInteger(), default=0)
    audio_input_tokens: Mapped[int] = mapped_column(sa.BigInteger(), default=0)
    audio_output_tokens: Mapped[int] = mapped_column(sa.BigInteger(), default=0)
    end_user: Mapped[str | None] = mapped_column(sa.String(200))
    session_id: Mapped[str | None] = mapped_column(sa.String(200))
    service_tier: Mapped[str | None] = mapped_column(sa.String(200))
    tags: Mapped[list[str] | None] = mapped_column(sa.JSON())
    usage_source: Mapped[str] = mapped_column(sa.String(20), default="reported")
    cost_source: Mapped[str] = mapped_column(sa.String(20), default="given")


#: The scope columns of a budget or a rate limit: exactly one is set.
SCOPE_COLUMNS: Final = ("project_id", "api_key_id", "token_id", "end_user", "tag")
ONE_SCOPE: Final = (
    " + ".join(f"(CASE WHEN {name} IS NULL THEN 0 ELSE 1 END)" for name in SCOPE_COLUMNS) + " = 1"
)


class OrmScoped:
    """What a budget and a rate limit share: one scope (a foreign key or a label)."""

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    name: Mapped[str | None] = mapped_column(sa.String(200))
    project_id: Mapped[uuid.UUID | None] = mapped_column(
        sa.ForeignKey("orm_projects.id", ondelete="CASCADE"), index=True
    )
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(
        sa.ForeignKey("orm_api_keys.id", ondelete="CASCADE"), index=True
    )
    token_id: Mapped[uuid.UUID | None] = mapped_column(
        sa.ForeignKey("orm_tokens.id", ondelete="CASCADE"), index=True
    )
    end_user: Mapped[str | None] = mapped_column(sa.String(200), index=True)
    tag: Mapped[str | None] = mapped_column(sa.String(200), index=True)


class OrmBudget(OrmScoped, OrmBase):
    __tablename__ = "orm_budgets"
    __table_args__ = (
        sa.CheckConstraint(ONE_SCOPE, name="one_scope"),
        sa.CheckConstraint("limit_amount > 0", name="limit_positive"),
        sa.CheckConstraint(
            "period IS NULL OR period IN ('day', 'week', 'month', 'year', 'fixed')", name="period"
        ),
        sa.CheckConstraint(
            "(period = 'fixed' AND period_seconds > 0) "
            "OR ((period IS NULL OR period <> 'fixed') AND period_seconds IS NULL)",
            name="fixed_period_seconds",
        ),
    )

    limit_amount: Mapped[int] = mapped_column(sa.BigInteger())
    period: Mapped[str | None] = mapped_column(sa.String(8))
    period_seconds: Mapped[int | None] = mapped_column(sa.BigInteger())
    timezone: Mapped[str] = mapped_column(sa.String(64), default="UTC")
    soft_limits: Mapped[list[int]] = mapped_column(sa.JSON(), default=list)
    anchor_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)


class OrmBudgetPeriod(OrmBase):
    __tablename__ = "orm_budget_periods"
    __table_args__ = (sa.CheckConstraint("spent >= 0 AND reserved >= 0", name="not_negative"),)

    budget_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("orm_budgets.id", ondelete="CASCADE"), primary_key=True
    )
    period_start: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), primary_key=True)
    spent: Mapped[int] = mapped_column(sa.BigInteger(), default=0)
    reserved: Mapped[int] = mapped_column(sa.BigInteger(), default=0)


class OrmBudgetCrossing(OrmBase):
    __tablename__ = "orm_budget_crossings"

    budget_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("orm_budgets.id", ondelete="CASCADE"), primary_key=True
    )
    period_start: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), primary_key=True)
    threshold: Mapped[int] = mapped_column(sa.BigInteger(), primary_key=True)
    admission_id: Mapped[uuid.UUID]
    at_settle: Mapped[bool]
    crossed_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True))


class OrmRateLimit(OrmScoped, OrmBase):
    __tablename__ = "orm_rate_limits"
    __table_args__ = (
        sa.CheckConstraint(ONE_SCOPE, name="one_scope"),
        sa.CheckConstraint("per IN ('second', 'minute', 'hour', 'day')", name="per"),
        sa.CheckConstraint(
            "(max_requests IS NOT NULL OR max_tokens IS NOT NULL) "
            "AND (max_requests IS NULL OR max_requests > 0) "
            "AND (max_tokens IS NULL OR max_tokens > 0)",
            name="some_limit",
        ),
    )

    max_requests: Mapped[int | None] = mapped_column(sa.BigInteger())
    max_tokens: Mapped[int | None] = mapped_column(sa.BigInteger())
    per: Mapped[str] = mapped_column(sa.String(8))
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)


class OrmRateWindow(OrmBase):
    __tablename__ = "orm_rate_windows"
    __table_args__ = (sa.CheckConstraint("requests >= 0 AND tokens >= 0", name="not_negative"),)

    rate_limit_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("orm_rate_limits.id", ondelete="CASCADE"), primary_key=True
    )
    window_start: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), primary_key=True)
    requests: Mapped[int] = mapped_column(sa.BigInteger(), default=0)
    tokens: Mapped[int] = mapped_column(sa.BigInteger(), default=0)


class OrmAdmission(OrmBase):
    __tablename__ = "orm_admissions"
    __table_args__ = (
        sa.CheckConstraint("status IN ('active', 'settled', 'released', 'expired')", name="status"),
        sa.CheckConstraint("cost >= 0 AND tokens >= 0", name="estimates_not_negative"),
        sa.Index(None, "status", "expires_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    api_key_id: Mapped[uuid.UUID | None]
    token_id: Mapped[uuid.UUID | None]
    project_id: Mapped[uuid.UUID | None]
    end_user: Mapped[str | None] = mapped_column(sa.String(200))
    tags: Mapped[list[str] | None] = mapped_column(sa.JSON(none_as_null=True))
    reservation_id: Mapped[uuid.UUID | None]
    cost: Mapped[int] = mapped_column(sa.BigInteger())
    tokens: Mapped[int] = mapped_column(sa.BigInteger())
    status: Mapped[str] = mapped_column(sa.String(10), default="active")
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(200), unique=True)
    params_digest: Mapped[str | None] = mapped_column(sa.String(64))
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True))
    expires_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime(timezone=True))
    settled_cost: Mapped[int | None] = mapped_column(sa.BigInteger())
    settled_tokens: Mapped[int | None] = mapped_column(sa.BigInteger())
    charged: Mapped[int | None] = mapped_column(sa.BigInteger())
    shortfall: Mapped[int | None] = mapped_column(sa.BigInteger())
    settle_digest: Mapped[str | None] = mapped_column(sa.String(64))
    usage_id: Mapped[int | None] = mapped_column(sa.BigInteger())


class OrmAdmissionBudget(OrmBase):
    __tablename__ = "orm_admission_budgets"
    __table_args__ = (sa.Index(None, "budget_id", "period_start"),)

    admission_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("orm_admissions.id", ondelete="CASCADE"), primary_key=True
    )
    budget_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("orm_budgets.id", ondelete="CASCADE"), primary_key=True
    )
    period_start: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True))
    amount: Mapped[int] = mapped_column(sa.BigInteger())
    settled_amount: Mapped[int | None] = mapped_column(sa.BigInteger())


class OrmAdmissionWindow(OrmBase):
    __tablename__ = "orm_admission_windows"

    admission_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("orm_admissions.id", ondelete="CASCADE"), primary_key=True
    )
    rate_limit_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("orm_rate_limits.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    window_start: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True))
    tokens: Mapped[int] = mapped_column(sa.BigInteger())


def orm_sqlite_engine(path: Path) -> AsyncEngine:
    """aiosqlite, with the per-connection pragmas that llmstore and the raw variant use.

    WAL is a property of the file (already set); ``synchronous`` is per connection, and
    left at its default (FULL) it would add an fsync per commit that the others skip.
    """
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")

    @event.listens_for(engine.sync_engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine
