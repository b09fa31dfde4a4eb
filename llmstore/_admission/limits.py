"""What budgets and rate limits share: a scope's project, key or token must exist, and
``list()`` filters by scope."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore._core.errors import NotFoundError
from llmstore._core.validate import check_optional_id
from llmstore._db.schema import api_keys, projects, tokens

from .records import check_label

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


def scope_filters(
    table: sa.Table,
    *,
    project_id: object,
    api_key_id: object,
    token_id: object,
    end_user: object,
    tag: object,
) -> list[tuple[sa.ColumnElement[Any], object]]:
    """A ``list()``'s scope filters, checked: (column, value) pairs, None for no filter."""
    return [
        (table.c.project_id, check_optional_id(project_id, "project id")),
        (table.c.api_key_id, check_optional_id(api_key_id, "API key id")),
        (table.c.token_id, check_optional_id(token_id, "token id")),
        (table.c.end_user, None if end_user is None else check_label(end_user, "end user")),
        (table.c.tag, None if tag is None else check_label(tag, "tag")),
    ]
