"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# Rules for tables that may be large: the README's "Writing a revision" (checked by
# tests/migrations/test_migration_rules.py). Index an existing table with create_index_concurrently.
from llmstore.migrations.ops import set_lock_timeout
${imports if imports else ""}
revision: str = ${repr(up_revision)}
down_revision: str | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}


def upgrade() -> None:
    set_lock_timeout()
    ${upgrades if upgrades else ""}


def downgrade() -> None:
    set_lock_timeout()
    ${downgrades if downgrades else ""}
