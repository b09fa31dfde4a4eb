"""usage rows record token parts, the end user, the session, tags and where counts came from

``llmstore_usage_logs`` gains ``cache_write_tokens``, ``reasoning_tokens``,
``audio_input_tokens`` and ``audio_output_tokens`` (existing rows: 0), ``end_user``,
``session_id``, ``service_tier`` and ``tags`` (NULL), ``usage_source`` ("reported") and
``cost_source`` ("given": a cost stored before prices existed was the caller's). A column
added with a constant default rewrites no row on either database (Postgres 11 and later
keep the default in the catalog), so this revision is instant on a large table.

Revision ID: 0008_usage_details
Revises: 0007_budget_period_end
Create Date: 2026-12-05 00:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from llmstore.migrations.ops import set_lock_timeout

revision: str = "0008_usage_details"
down_revision: str | None = "0007_budget_period_end"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "llmstore_usage_logs"
COUNTS = ("cache_write_tokens", "reasoning_tokens", "audio_input_tokens", "audio_output_tokens")
LABELS = ("end_user", "session_id", "service_tier")


def upgrade() -> None:
    set_lock_timeout()
    for name in COUNTS:
        op.add_column(TABLE, sa.Column(name, sa.BigInteger(), nullable=False, server_default="0"))
    for name in LABELS:
        op.add_column(TABLE, sa.Column(name, sa.String(200), nullable=True))
    op.add_column(TABLE, sa.Column("tags", sa.JSON(), nullable=True))
    op.add_column(
        TABLE,
        sa.Column("usage_source", sa.String(20), nullable=False, server_default="reported"),
    )
    op.add_column(
        TABLE, sa.Column("cost_source", sa.String(20), nullable=False, server_default="given")
    )


def downgrade() -> None:
    set_lock_timeout()
    # Dropped in place, not by batch mode's copy of the table: SQLite (3.35 and later)
    # drops a column no index names, and the copy would lose AUTOINCREMENT's high-water
    # mark (the id of a purged row must never come back).
    for name in ("cost_source", "usage_source", "tags", *reversed(LABELS), *reversed(COUNTS)):
        op.drop_column(TABLE, name)
