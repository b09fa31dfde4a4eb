"""prices per million tokens, by provider, model and the time they apply from

``llmstore_prices``: one row per (provider, model, valid_from), prices as exact decimal
text in the store's cost unit per million tokens; ``valid_from`` 0001-01-01 UTC for an
undated price. A new table: nothing existing is touched.

Revision ID: 0009_prices
Revises: 0008_usage_details
Create Date: 2026-12-05 00:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from llmstore.migrations.ops import set_lock_timeout

revision: str = "0009_prices"
down_revision: str | None = "0008_usage_details"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    set_lock_timeout()
    op.create_table(
        "llmstore_prices",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("provider", sa.String(length=200), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("valid_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=20), nullable=False),
        sa.Column("input", sa.String(length=64), nullable=False),
        sa.Column("output", sa.String(length=64), nullable=False),
        sa.Column("cached_input", sa.String(length=64), nullable=True),
        sa.Column("cache_write", sa.String(length=64), nullable=True),
        sa.Column("reasoning", sa.String(length=64), nullable=True),
        sa.Column("audio_input", sa.String(length=64), nullable=True),
        sa.Column("audio_output", sa.String(length=64), nullable=True),
        sa.Column("tiers", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "source IN ('manual', 'genai-prices')", name=op.f("llmstore_prices_source_check")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("llmstore_prices_pkey")),
        sa.UniqueConstraint(
            "provider",
            "model",
            "valid_from",
            name=op.f("llmstore_prices_provider_model_valid_from_key"),
        ),
    )


def downgrade() -> None:
    set_lock_timeout()
    op.drop_table("llmstore_prices")
