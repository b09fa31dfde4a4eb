"""budget periods record when they end

``llmstore_budget_periods`` gains ``period_end`` (NULL: a lifetime budget's one period,
which never ends). It lets an admission on Postgres find each budget's current period in
its one statement, without computing calendar periods in SQL. Rows written before this
revision keep NULL until their period's next admission fills it in; until then that
admission takes the statement-by-statement form. Adding a nullable column rewrites nothing
on either database.

Revision ID: 0007_budget_period_end
Revises: 0006_admission
Create Date: 2026-12-04 00:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from llmstore.migrations.ops import set_lock_timeout

revision: str = "0007_budget_period_end"
down_revision: str | None = "0006_admission"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    set_lock_timeout()
    op.add_column(
        "llmstore_budget_periods",
        sa.Column("period_end", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    set_lock_timeout()
    with op.batch_alter_table("llmstore_budget_periods") as batch:
        batch.drop_column("period_end")
