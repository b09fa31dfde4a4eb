"""usage logs and receipts

Revision ID: 0004_usage_logs_receipts
Revises: 0003_api_keys_ledger
Create Date: 2026-11-22 00:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_usage_logs_receipts"
down_revision: str | None = "0003_api_keys_ledger"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "usage_logs",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("api_key_id", sa.Uuid(), nullable=True),
        sa.Column("project_id", sa.Uuid(), nullable=True),
        sa.Column("token_id", sa.Uuid(), nullable=True),
        sa.Column("request_id", sa.String(length=200), nullable=True),
        sa.Column("alias", sa.String(length=200), nullable=True),
        sa.Column("profile", sa.String(length=200), nullable=True),
        sa.Column("provider", sa.String(length=200), nullable=True),
        sa.Column("model", sa.String(length=200), nullable=True),
        sa.Column("origin", sa.String(length=200), nullable=True),
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
        sa.Column("cost", sa.BigInteger(), nullable=False),
        sa.Column("finish_reason", sa.String(length=100), nullable=True),
        sa.Column("max_tokens", sa.BigInteger(), nullable=True),
        sa.Column("temperature", sa.Float(), nullable=True),
        sa.Column("top_p", sa.Float(), nullable=True),
        sa.Column("message_count", sa.Integer(), nullable=True),
        sa.Column("error_type", sa.String(length=200), nullable=True),
        sa.Column("error_message", sa.String(length=4000), nullable=True),
        sa.Column("usage_metadata", sa.JSON(none_as_null=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_logs")),
        sa.UniqueConstraint("request_id", name=op.f("uq_usage_logs_request_id")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_usage_logs_created_at_id"), "usage_logs", ["created_at", "id"])
    op.create_index(
        op.f("ix_usage_logs_api_key_id_created_at_id"),
        "usage_logs",
        ["api_key_id", "created_at", "id"],
    )
    op.create_index(
        op.f("ix_usage_logs_project_id_created_at_id"),
        "usage_logs",
        ["project_id", "created_at", "id"],
    )
    op.create_index(op.f("ix_usage_logs_model_created_at"), "usage_logs", ["model", "created_at"])

    op.create_table(
        "usage_receipts",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("usage_id", sa.BigInteger(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("signature", sa.String(length=200), nullable=False),
        sa.Column("public_key", sa.String(length=200), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_receipts")),
    )
    op.create_index(op.f("ix_usage_receipts_usage_id"), "usage_receipts", ["usage_id"], unique=True)


def downgrade() -> None:
    op.drop_table("usage_receipts")
    op.drop_table("usage_logs")
