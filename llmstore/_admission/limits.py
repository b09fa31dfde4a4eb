"""What budgets and rate limits share: the project, key or token a scope names must exist."""

from __future__ import annotations

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
