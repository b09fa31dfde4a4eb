"""The host's own models: ``users`` and an ``api_keys`` table (the name llmstore used for
its own table before revision 0005)."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("email", sa.String(200), nullable=False, unique=True),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id"), nullable=False),
    sa.Column("label", sa.String(100), nullable=False),
    sa.Index("ix_api_keys_user_id", "user_id"),
)
