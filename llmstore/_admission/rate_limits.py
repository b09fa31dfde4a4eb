"""Rate limits: at most so many requests and tokens per fixed window, for one scope.

Windows are aligned to the Unix epoch (a minute's window starts at :00 seconds), so every
replica counts the same window in the same row (``llmstore_rate_windows``), made by the
first admission in it. The admissions count in it (``admissions.py``); here: the limits
themselves and their status.
"""

from __future__ import annotations

import builtins
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore._core.errors import ValidationError
from llmstore._core.ids import new_id
from llmstore._core.unset import UNSET, Unset
from llmstore._core.validate import check_id, check_positive_int, check_text
from llmstore._db.admission_schema import RatePer, rate_windows
from llmstore._db.operations import Repository, reads, writes
from llmstore._db.queries import found, id_page

from .limits import check_referenced, scope_filters
from .periods import rate_window
from .records import (
    RATE_LIMIT_COLUMNS,
    RL,
    RateLimit,
    RateLimitStatus,
    check_per,
    check_scope,
    rate_limit,
)

RW = rate_windows
_SELECT = sa.select(*RATE_LIMIT_COLUMNS)
NAME_MAX = 200


def _optional_count(value: object, what: str) -> int | None:
    return None if value is None else check_positive_int(value, what)


def _optional_name(value: object) -> str | None:
    return None if value is None else check_text(value, "rate limit name", max_length=NAME_MAX)


def _check_some(requests: int | None, tokens: int | None) -> None:
    if requests is None and tokens is None:
        raise ValidationError("a rate limit needs requests=, tokens= or both")


class RateLimits(Repository):
    """``store.rate_limits`` and ``tx.rate_limits``: each call is one unit of work."""

    @writes()
    def create(
        self,
        conn: Connection,
        *,
        requests: int | None = None,
        tokens: int | None = None,
        per: RatePer = "minute",
        project_id: uuid.UUID | str | None = None,
        api_key_id: uuid.UUID | str | None = None,
        token_id: uuid.UUID | str | None = None,
        end_user: str | None = None,
        tag: str | None = None,
        name: str | None = None,
    ) -> RateLimit:
        """At most ``requests`` requests and ``tokens`` tokens (at least one of them) per
        ``per`` (``"second"``, ``"minute"``, ``"hour"``, ``"day"``), for exactly one scope:
        a project, an API key, a token, an end user or a tag."""
        scope = check_scope(
            project_id=project_id,
            api_key_id=api_key_id,
            token_id=token_id,
            end_user=end_user,
            tag=tag,
        )
        max_requests = _optional_count(requests, "requests")
        max_tokens = _optional_count(tokens, "tokens")
        _check_some(max_requests, max_tokens)
        window = check_per(per)
        label = _optional_name(name)
        check_referenced(conn, scope)
        now = self.now()
        values: dict[str, Any] = {
            "id": new_id(),
            "name": label,
            **scope,
            "max_requests": max_requests,
            "max_tokens": max_tokens,
            "per": window,
            "created_at": now,
            "updated_at": now,
        }
        row = conn.execute(RL.insert().returning(*RATE_LIMIT_COLUMNS), values).one()
        return rate_limit(tuple(row))

    @reads()
    def get(self, conn: Connection, rate_limit_id: uuid.UUID | str) -> RateLimit:
        """The rate limit with this id; NotFoundError if there is none."""
        key = check_id(rate_limit_id, "rate limit id")
        return rate_limit(tuple(found(conn, _SELECT.where(RL.c.id == key), "rate limit", key)))

    @reads()
    def list(
        self,
        conn: Connection,
        *,
        project_id: uuid.UUID | str | None = None,
        api_key_id: uuid.UUID | str | None = None,
        token_id: uuid.UUID | str | None = None,
        end_user: str | None = None,
        tag: str | None = None,
        limit: int = 100,
        after: uuid.UUID | str | None = None,
    ) -> builtins.list[RateLimit]:
        """Rate limits in creation order, optionally of one scope; ``after``: a page's last id."""
        equal = scope_filters(
            RL,
            project_id=project_id,
            api_key_id=api_key_id,
            token_id=token_id,
            end_user=end_user,
            tag=tag,
        )
        statement = id_page(_SELECT, RL.c.id, limit=limit, after=after, equal=equal)
        return [rate_limit(tuple(row)) for row in conn.execute(statement)]

    @writes()
    def update(
        self,
        conn: Connection,
        rate_limit_id: uuid.UUID | str,
        *,
        requests: int | Unset | None = UNSET,
        tokens: int | Unset | None = UNSET,
        per: RatePer | Unset = UNSET,
        name: str | Unset | None = UNSET,
    ) -> RateLimit:
        """Change the limits, the window or the name (``None``: no limit of that kind; one
        must remain). The current window keeps what it has counted."""
        key = check_id(rate_limit_id, "rate limit id")
        if all(value is UNSET for value in (requests, tokens, per, name)):
            raise ValidationError("update() needs at least one of requests=, tokens=, per=, name=")
        current = rate_limit(
            tuple(found(conn, _SELECT.where(RL.c.id == key).with_for_update(), "rate limit", key))
        )
        max_requests = (
            current.requests if requests is UNSET else _optional_count(requests, "requests")
        )
        max_tokens = current.tokens if tokens is UNSET else _optional_count(tokens, "tokens")
        _check_some(max_requests, max_tokens)
        changes: dict[str, Any] = {
            "max_requests": max_requests,
            "max_tokens": max_tokens,
            "updated_at": self.now(),
        }
        if per is not UNSET:
            changes["per"] = check_per(per)
        if name is not UNSET:
            changes["name"] = _optional_name(name)
        row = conn.execute(
            RL.update().where(RL.c.id == key).values(**changes).returning(*RATE_LIMIT_COLUMNS)
        ).one()
        return rate_limit(tuple(row))

    @writes(single=True)
    def delete(self, conn: Connection, rate_limit_id: uuid.UUID | str) -> None:
        """Delete the rate limit and its windows."""
        key = check_id(rate_limit_id, "rate limit id")
        found(conn, RL.delete().where(RL.c.id == key).returning(RL.c.id), "rate limit", key)

    @reads(single=False, snapshot=True)
    def status(self, conn: Connection, rate_limit_id: uuid.UUID | str) -> RateLimitStatus:
        """The current window: what it counted, what is left, when the next begins."""
        key = check_id(rate_limit_id, "rate limit id")
        record = rate_limit(tuple(found(conn, _SELECT.where(RL.c.id == key), "rate limit", key)))
        start, end = rate_window(record.per, self.now())
        row = conn.execute(
            sa.select(RW.c.requests, RW.c.tokens).where(
                RW.c.rate_limit_id == key, RW.c.window_start == start
            )
        ).first()
        requests, tokens = (row.requests, row.tokens) if row is not None else (0, 0)
        return RateLimitStatus(
            rate_limit_id=key,
            window_start=start,
            resets_at=end,
            requests=requests,
            tokens=tokens,
            remaining_requests=None
            if record.requests is None
            else max(record.requests - requests, 0),
            remaining_tokens=None if record.tokens is None else max(record.tokens - tokens, 0),
        )
