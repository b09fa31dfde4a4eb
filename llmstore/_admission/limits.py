"""What budgets and rate limits share: one scope each, found for a request by its scopes."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore._core.errors import NotFoundError
from llmstore._db.schema import api_keys, projects, tokens

_REFERENCED = {"project_id": projects, "api_key_id": api_keys, "token_id": tokens}


def check_referenced(conn: Connection, scope: dict[str, Any]) -> None:
    """NotFoundError when the scope names a project, key or token that does not exist."""
    for name, table in _REFERENCED.items():
        value = scope[name]
        if value is not None:
            found = conn.execute(sa.select(table.c.id).where(table.c.id == value)).first()
            if found is None:
                what = name.removesuffix("_id").replace("_", " ")
                raise NotFoundError(
                    f"no {'API key' if what == 'api key' else what} with id {value}"
                )


def scope_filter(
    table: sa.Table,
    *,
    project_id: uuid.UUID | None,
    api_key_id: uuid.UUID | None,
    token_id: uuid.UUID | None,
    end_user: str | None,
    tags: Sequence[str],
) -> sa.ColumnElement[bool]:
    """The limits of any of a request's scopes (each column indexed: an OR of index scans)."""
    conditions: list[sa.ColumnElement[bool]] = []
    for column, value in (
        (table.c.project_id, project_id),
        (table.c.api_key_id, api_key_id),
        (table.c.token_id, token_id),
        (table.c.end_user, end_user),
    ):
        if value is not None:
            conditions.append(column == value)
    if tags:
        conditions.append(table.c.tag.in_(list(tags)))
    return sa.or_(*conditions) if conditions else sa.false()
