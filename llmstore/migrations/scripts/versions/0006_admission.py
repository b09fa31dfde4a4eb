"""budgets, rate limits and admissions; API keys can be deactivated

New tables: budgets and their periods and crossings, rate limits and their windows,
admissions and their holds on budgets and windows. ``llmstore_api_keys`` gains
``is_active`` (existing keys stay active) and ``deactivated_at``: adding a column with a
constant default rewrites nothing on either database.

Revision ID: 0006_admission
Revises: 0005_llmstore_prefix
Create Date: 2026-12-04 00:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from llmstore.migrations.ops import set_lock_timeout

revision: str = "0006_admission"
down_revision: str | None = "0005_llmstore_prefix"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Exactly one of a limit's scope columns is set.
ONE_SCOPE = (
    "(CASE WHEN project_id IS NULL THEN 0 ELSE 1 END) + "
    "(CASE WHEN api_key_id IS NULL THEN 0 ELSE 1 END) + "
    "(CASE WHEN token_id IS NULL THEN 0 ELSE 1 END) + "
    "(CASE WHEN end_user IS NULL THEN 0 ELSE 1 END) + "
    "(CASE WHEN tag IS NULL THEN 0 ELSE 1 END) = 1"
)

NEW_TABLES = (
    "llmstore_budgets",
    "llmstore_budget_periods",
    "llmstore_budget_crossings",
    "llmstore_rate_limits",
    "llmstore_rate_windows",
    "llmstore_admissions",
    "llmstore_admission_budgets",
    "llmstore_admission_windows",
)


def upgrade() -> None:
    set_lock_timeout()
    op.add_column(
        "llmstore_api_keys",
        sa.Column("is_active", sa.Boolean(), nullable=False, server_default=sa.true()),
    )
    op.add_column(
        "llmstore_api_keys", sa.Column("deactivated_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_table(
        "llmstore_budgets",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("project_id", sa.Uuid(), nullable=True),
        sa.Column("api_key_id", sa.Uuid(), nullable=True),
        sa.Column("token_id", sa.Uuid(), nullable=True),
        sa.Column("end_user", sa.String(length=200), nullable=True),
        sa.Column("tag", sa.String(length=200), nullable=True),
        sa.Column("limit_amount", sa.BigInteger(), nullable=False),
        sa.Column("period", sa.String(length=8), nullable=True),
        sa.Column("period_seconds", sa.BigInteger(), nullable=True),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("soft_limits", sa.JSON(), nullable=False),
        sa.Column("anchor_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "(period = 'fixed' AND period_seconds > 0) "
            "OR ((period IS NULL OR period <> 'fixed') AND period_seconds IS NULL)",
            name=op.f("llmstore_budgets_fixed_period_seconds_check"),
        ),
        sa.CheckConstraint("limit_amount > 0", name=op.f("llmstore_budgets_limit_positive_check")),
        sa.CheckConstraint(
            ONE_SCOPE,
            name=op.f("llmstore_budgets_one_scope_check"),
        ),
        sa.CheckConstraint(
            "period IS NULL OR period IN ('day', 'week', 'month', 'year', 'fixed')",
            name=op.f("llmstore_budgets_period_check"),
        ),
        sa.ForeignKeyConstraint(
            ["api_key_id"],
            ["llmstore_api_keys.id"],
            name=op.f("llmstore_budgets_api_key_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["llmstore_projects.id"],
            name=op.f("llmstore_budgets_project_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["token_id"],
            ["llmstore_tokens.id"],
            name=op.f("llmstore_budgets_token_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("llmstore_budgets_pkey")),
    )
    op.create_index("llmstore_budgets_api_key_id_idx", "llmstore_budgets", ["api_key_id"])
    op.create_index("llmstore_budgets_end_user_idx", "llmstore_budgets", ["end_user"])
    op.create_index("llmstore_budgets_project_id_idx", "llmstore_budgets", ["project_id"])
    op.create_index("llmstore_budgets_tag_idx", "llmstore_budgets", ["tag"])
    op.create_index("llmstore_budgets_token_id_idx", "llmstore_budgets", ["token_id"])
    op.create_table(
        "llmstore_budget_periods",
        sa.Column("budget_id", sa.Uuid(), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("spent", sa.BigInteger(), nullable=False),
        sa.Column("reserved", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(
            "spent >= 0 AND reserved >= 0", name=op.f("llmstore_budget_periods_not_negative_check")
        ),
        sa.ForeignKeyConstraint(
            ["budget_id"],
            ["llmstore_budgets.id"],
            name=op.f("llmstore_budget_periods_budget_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "budget_id", "period_start", name=op.f("llmstore_budget_periods_pkey")
        ),
    )
    op.create_table(
        "llmstore_budget_crossings",
        sa.Column("budget_id", sa.Uuid(), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("threshold", sa.BigInteger(), nullable=False),
        sa.Column("admission_id", sa.Uuid(), nullable=False),
        sa.Column("at_settle", sa.Boolean(), nullable=False),
        sa.Column("crossed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["budget_id"],
            ["llmstore_budgets.id"],
            name=op.f("llmstore_budget_crossings_budget_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "budget_id", "period_start", "threshold", name=op.f("llmstore_budget_crossings_pkey")
        ),
    )
    op.create_table(
        "llmstore_rate_limits",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("project_id", sa.Uuid(), nullable=True),
        sa.Column("api_key_id", sa.Uuid(), nullable=True),
        sa.Column("token_id", sa.Uuid(), nullable=True),
        sa.Column("end_user", sa.String(length=200), nullable=True),
        sa.Column("tag", sa.String(length=200), nullable=True),
        sa.Column("max_requests", sa.BigInteger(), nullable=True),
        sa.Column("max_tokens", sa.BigInteger(), nullable=True),
        sa.Column("per", sa.String(length=8), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            ONE_SCOPE,
            name=op.f("llmstore_rate_limits_one_scope_check"),
        ),
        sa.CheckConstraint(
            "per IN ('second', 'minute', 'hour', 'day')",
            name=op.f("llmstore_rate_limits_per_check"),
        ),
        sa.CheckConstraint(
            "(max_requests IS NOT NULL OR max_tokens IS NOT NULL) "
            "AND (max_requests IS NULL OR max_requests > 0) "
            "AND (max_tokens IS NULL OR max_tokens > 0)",
            name=op.f("llmstore_rate_limits_some_limit_check"),
        ),
        sa.ForeignKeyConstraint(
            ["api_key_id"],
            ["llmstore_api_keys.id"],
            name=op.f("llmstore_rate_limits_api_key_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["llmstore_projects.id"],
            name=op.f("llmstore_rate_limits_project_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["token_id"],
            ["llmstore_tokens.id"],
            name=op.f("llmstore_rate_limits_token_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("llmstore_rate_limits_pkey")),
    )
    op.create_index("llmstore_rate_limits_api_key_id_idx", "llmstore_rate_limits", ["api_key_id"])
    op.create_index("llmstore_rate_limits_end_user_idx", "llmstore_rate_limits", ["end_user"])
    op.create_index("llmstore_rate_limits_project_id_idx", "llmstore_rate_limits", ["project_id"])
    op.create_index("llmstore_rate_limits_tag_idx", "llmstore_rate_limits", ["tag"])
    op.create_index("llmstore_rate_limits_token_id_idx", "llmstore_rate_limits", ["token_id"])
    op.create_table(
        "llmstore_rate_windows",
        sa.Column("rate_limit_id", sa.Uuid(), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(
            "requests >= 0 AND tokens >= 0", name=op.f("llmstore_rate_windows_not_negative_check")
        ),
        sa.ForeignKeyConstraint(
            ["rate_limit_id"],
            ["llmstore_rate_limits.id"],
            name=op.f("llmstore_rate_windows_rate_limit_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "rate_limit_id", "window_start", name=op.f("llmstore_rate_windows_pkey")
        ),
    )
    op.create_table(
        "llmstore_admissions",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("api_key_id", sa.Uuid(), nullable=True),
        sa.Column("token_id", sa.Uuid(), nullable=True),
        sa.Column("project_id", sa.Uuid(), nullable=True),
        sa.Column("end_user", sa.String(length=200), nullable=True),
        sa.Column("tags", sa.JSON(), nullable=True),
        sa.Column("reservation_id", sa.Uuid(), nullable=True),
        sa.Column("cost", sa.BigInteger(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("params_digest", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("settled_cost", sa.BigInteger(), nullable=True),
        sa.Column("settled_tokens", sa.BigInteger(), nullable=True),
        sa.Column("charged", sa.BigInteger(), nullable=True),
        sa.Column("shortfall", sa.BigInteger(), nullable=True),
        sa.Column("settle_digest", sa.String(length=64), nullable=True),
        sa.Column("usage_id", sa.BigInteger(), nullable=True),
        sa.CheckConstraint(
            "cost >= 0 AND tokens >= 0",
            name=op.f("llmstore_admissions_estimates_not_negative_check"),
        ),
        sa.CheckConstraint(
            "status IN ('active', 'settled', 'released', 'expired')",
            name=op.f("llmstore_admissions_status_check"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("llmstore_admissions_pkey")),
        sa.UniqueConstraint(
            "idempotency_key", name=op.f("llmstore_admissions_idempotency_key_key")
        ),
    )
    op.create_index(
        "llmstore_admissions_status_expires_at_idx", "llmstore_admissions", ["status", "expires_at"]
    )
    op.create_table(
        "llmstore_admission_budgets",
        sa.Column("admission_id", sa.Uuid(), nullable=False),
        sa.Column("budget_id", sa.Uuid(), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("settled_amount", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["admission_id"],
            ["llmstore_admissions.id"],
            name=op.f("llmstore_admission_budgets_admission_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["budget_id"],
            ["llmstore_budgets.id"],
            name=op.f("llmstore_admission_budgets_budget_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "admission_id", "budget_id", name=op.f("llmstore_admission_budgets_pkey")
        ),
    )
    op.create_index(
        "llmstore_admission_budgets_budget_id_period_start_idx",
        "llmstore_admission_budgets",
        ["budget_id", "period_start"],
    )
    op.create_table(
        "llmstore_admission_windows",
        sa.Column("admission_id", sa.Uuid(), nullable=False),
        sa.Column("rate_limit_id", sa.Uuid(), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["admission_id"],
            ["llmstore_admissions.id"],
            name=op.f("llmstore_admission_windows_admission_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["rate_limit_id"],
            ["llmstore_rate_limits.id"],
            name=op.f("llmstore_admission_windows_rate_limit_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "admission_id", "rate_limit_id", name=op.f("llmstore_admission_windows_pkey")
        ),
    )
    op.create_index(
        "llmstore_admission_windows_rate_limit_id_idx",
        "llmstore_admission_windows",
        ["rate_limit_id"],
    )


def downgrade() -> None:
    set_lock_timeout()
    for table in reversed(NEW_TABLES):  # referencing tables first
        op.drop_table(table)
    with op.batch_alter_table("llmstore_api_keys") as batch:
        batch.drop_column("deactivated_at")
        batch.drop_column("is_active")
