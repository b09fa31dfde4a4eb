"""What budgets and rate limits share: one scope each, found for a request by its scopes."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore._core.errors import NotFoundError, ValidationError
from llmstore._core.validate import check_aware
from llmstore._db.operations import Repository
from llmstore._db.runner import Runner
from llmstore._db.schema import api_keys, projects, tokens

Clock = Callable[[], dt.datetime]
_REFERENCED = {"project_id": projects, "api_key_id": api_keys, "token_id": tokens}


class ClockedRepository(Repository):
    """A repository that reads the time from the store's clock (injectable for tests)."""

    def __init__(self, runner: Runner, clock: Clock) -> None:
        super().__init__(runner)
        self._clock = clock

    def now(self) -> dt.datetime:
        """The store clock's time, checked timezone-aware and in UTC."""
        try:
            return check_aware(self._clock(), "the store's clock")
        except ValidationError as exc:
            raise ValidationError(f"{exc} (Store(clock=...) must return aware datetimes)") from None


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
