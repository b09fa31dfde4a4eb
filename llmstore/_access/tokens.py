"""Proxy tokens: bearer secrets stored as digests, with expiry and exact request quotas.

``use()`` is one conditional ``UPDATE ... RETURNING``: the row is only changed when the
token is usable, so concurrent calls from any number of processes never overspend a
quota (Postgres re-checks the condition on the locked row; SQLite writes one at a time).
Only a refusal takes a second statement, to say why.
"""

from __future__ import annotations

import builtins
import datetime as dt
import functools
import uuid
from typing import Any, Final

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Connection

from llmstore._core.errors import (
    ConflictError,
    NotFoundError,
    TokenRejectedError,
    TokenRejectionReason,
    ValidationError,
)
from llmstore._core.ids import new_id
from llmstore._core.secrets import (
    DISPLAY_LENGTH,
    SecretDigester,
    check_bearer_secret,
    new_bearer_secret,
)
from llmstore._core.unset import UNSET, Unset
from llmstore._core.validate import (
    check_actor,
    check_aware,
    check_id,
    check_optional_bool,
    check_optional_id,
    check_positive_int,
    check_text,
)
from llmstore._db.lean import LeanStatement, Row
from llmstore._db.operations import Clock, Repository, first_or_explain, reads, writes
from llmstore._db.queries import found, id_page
from llmstore._db.runner import Runner
from llmstore._db.schema import UTCDateTime, projects, tokens

from .audit import record_event

TOKEN_PREFIX: Final = "lst_"
NAME_MAX = 200


class Token(BaseModel):
    """A token as stored: never its secret, only a short display ``prefix``."""

    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    project_id: uuid.UUID
    name: str | None
    prefix: str
    expires_at: dt.datetime | None
    is_active: bool
    deactivated_at: dt.datetime | None
    request_count: int
    max_requests: int | None
    cache_hit_count: int
    created_at: dt.datetime
    last_used_at: dt.datetime | None

    @property
    def remaining_requests(self) -> int | None:
        """Requests left under ``max_requests``; None when unlimited."""
        if self.max_requests is None:
            return None
        return max(self.max_requests - self.request_count, 0)


class IssuedToken(BaseModel):
    """A new token and its secret. The secret is shown here once and never stored."""

    model_config = ConfigDict(frozen=True)

    token: Token
    secret: str = Field(repr=False)


_COLUMNS = (
    tokens.c.id,
    tokens.c.project_id,
    tokens.c.name,
    tokens.c.prefix,
    tokens.c.expires_at,
    tokens.c.is_active,
    tokens.c.deactivated_at,
    tokens.c.request_count,
    tokens.c.max_requests,
    tokens.c.cache_hit_count,
    tokens.c.created_at,
    tokens.c.last_used_at,
)
#: A token record's columns, in the order ``token_record()`` reads them.
TOKEN_COLUMNS = _COLUMNS
_NAMES = tuple(column.name for column in _COLUMNS)
_SELECT = sa.select(*_COLUMNS)
_BY_ID = _SELECT.where(tokens.c.id == sa.bindparam("key"))


def token_record(row: Row) -> Token:
    # Values come from the database through the column types: no need to validate again.
    return Token.model_construct(**dict(zip(_NAMES, row, strict=True)))


def token_usable(
    now: sa.ColumnElement[dt.datetime], *, spends_quota: bool
) -> list[sa.ColumnElement[bool]]:
    """What a token row must meet to be used at ``now``, as ``tokens.use()`` checks it:
    active, unexpired, of an active project and, if the use ``spends_quota``, under it."""
    usable = [
        tokens.c.is_active == sa.true(),
        sa.or_(tokens.c.expires_at.is_(None), tokens.c.expires_at > now),
        sa.exists().where(projects.c.id == tokens.c.project_id, projects.c.is_active == sa.true()),
    ]
    if spends_quota:
        usable.append(
            sa.or_(tokens.c.max_requests.is_(None), tokens.c.request_count < tokens.c.max_requests)
        )
    return usable


def _use_statement(*, cache_hit: bool) -> LeanStatement:
    now = sa.bindparam("now", type_=UTCDateTime())
    usable = [
        tokens.c.secret_digest == sa.bindparam("digest", type_=sa.String(64)),
        # A cache hit costs the upstream nothing: it is counted, but spends no quota.
        *token_usable(now, spends_quota=not cache_hit),
    ]
    changes: dict[str, Any] = (
        {"cache_hit_count": tokens.c.cache_hit_count + 1}
        if cache_hit
        else {"request_count": tokens.c.request_count + 1}
    )
    statement = (
        tokens.update().where(*usable).values(last_used_at=now, **changes).returning(*_COLUMNS)
    )
    return LeanStatement(statement, _COLUMNS)


_USE = _use_statement(cache_hit=False)
_CACHE_HIT = _use_statement(cache_hit=True)
_DIAGNOSE = (
    sa.select(
        tokens.c.is_active,
        tokens.c.expires_at,
        tokens.c.request_count,
        tokens.c.max_requests,
        projects.c.is_active.label("project_active"),
    )
    .join(projects, projects.c.id == tokens.c.project_id)
    .where(tokens.c.secret_digest == sa.bindparam("digest"))
)


def check_token_secret(secret: object) -> str:
    return check_bearer_secret(secret, TOKEN_PREFIX, "a token secret")


def rejection_reason(
    conn: Connection, *, digest: str, now: dt.datetime, cache_hit: bool
) -> TokenRejectionReason | None:
    """Why the token with ``digest`` cannot be used at ``now``; None if it now can."""
    row = conn.execute(_DIAGNOSE, {"digest": digest}).first()
    if row is None:
        return "unknown"
    if not row.is_active:
        return "inactive"
    if not row.project_active:
        return "project_inactive"
    if row.expires_at is not None and row.expires_at <= now:
        return "expired"
    if not cache_hit and row.max_requests is not None and row.request_count >= row.max_requests:
        return "quota_exhausted"
    return None


def _explain_refusal(conn: Connection, *, digest: str, cache_hit: bool, now: dt.datetime) -> None:
    """After the statement used nothing: the rejection raised, or None to try again."""
    reason = rejection_reason(conn, digest=digest, now=now, cache_hit=cache_hit)
    if reason is not None:
        raise TokenRejectedError(reason)


def use_token(
    conn: Connection,
    digest: str | None,
    now: dt.datetime,
    *,
    token_id: uuid.UUID | None = None,
) -> Token:
    """Inside a unit: spend one request of the token with this digest (or id), or raise
    ``TokenRejectedError``, as ``tokens.use()`` does."""
    if digest is None:
        digest = conn.execute(
            sa.select(tokens.c.secret_digest).where(tokens.c.id == token_id)
        ).scalar()
        if digest is None:
            raise NotFoundError(f"no token with id {token_id}")
    row = _USE.first_any(conn, {"digest": digest, "now": now})
    if row is None:
        reason = rejection_reason(conn, digest=digest, now=now, cache_hit=False)
        if reason is None:  # changed between the two statements (READ COMMITTED)
            raise ConflictError("the token changed while it was being used; try again")
        raise TokenRejectedError(reason)
    return token_record(row)


def find_token(conn: Connection, token_id: uuid.UUID) -> Token | None:
    """Inside a unit: the token with this id, or None."""
    row = conn.execute(_BY_ID, {"key": token_id}).first()
    return None if row is None else token_record(tuple(row))


def _optional_expiry(value: object) -> dt.datetime | None:
    return None if value is None else check_aware(value, "expires_at")


def _optional_quota(value: object) -> int | None:
    return None if value is None else check_positive_int(value, "max_requests")


def _optional_name(value: object) -> str | None:
    return None if value is None else check_text(value, "token name", max_length=NAME_MAX)


class Tokens(Repository):
    """``store.tokens`` and ``tx.tokens``: each call is one unit of work.

    Without ``actor=`` a mutation is a single statement; with it, the change and its
    audit event are written in one transaction.
    """

    def __init__(
        self, runner: Runner, digester: SecretDigester, clock: Clock | None = None
    ) -> None:
        super().__init__(runner, clock)
        self._digester = digester

    @writes()
    def create(
        self,
        conn: Connection,
        project_id: uuid.UUID | str,
        expires_at: dt.datetime | None = None,
        max_requests: int | None = None,
        name: str | None = None,
        *,
        actor: str | None = None,
    ) -> IssuedToken:
        """Issue a token of the project; its secret is in the result and nowhere else.

        ``expires_at`` (timezone-aware) and ``max_requests`` (a positive quota) are None
        for never and unlimited.
        """
        project = check_id(project_id, "project id")
        values: dict[str, Any] = {
            "expires_at": _optional_expiry(expires_at),
            "max_requests": _optional_quota(max_requests),
            "name": _optional_name(name),
        }
        actor = check_actor(actor)
        exists = conn.execute(sa.select(projects.c.id).where(projects.c.id == project))
        if exists.first() is None:
            raise NotFoundError(f"no project with id {project}")
        secret = new_bearer_secret(TOKEN_PREFIX)
        values.update(
            id=new_id(),
            project_id=project,
            secret_digest=self._digester.digest(secret),
            prefix=secret[:DISPLAY_LENGTH],
            is_active=True,
            deactivated_at=None,
            request_count=0,
            cache_hit_count=0,
            created_at=self.now(),
            last_used_at=None,
        )
        row = conn.execute(tokens.insert().returning(*_COLUMNS), values).one()
        token = token_record(tuple(row))
        _audit(conn, actor, "token.create", token)
        return IssuedToken(token=token, secret=secret)

    async def use(self, secret: str, cache_hit: bool = False) -> Token:
        """Spend one request of the token (or count a cache hit) and return it, updated.

        Raises ``TokenRejectedError`` (``.reason``: unknown, inactive, project_inactive,
        expired, quota_exhausted); anything not shaped like a token secret is ``unknown``,
        not a ``ValidationError``: one error per outcome for a proxy.
        """
        try:
            text = check_token_secret(secret)
        except ValidationError:
            raise TokenRejectedError("unknown") from None
        digest = self._digester.digest(text)
        if not isinstance(cache_hit, bool):
            raise ValidationError(
                f"cache_hit must be True or False, not {type(cache_hit).__name__}"
            )
        return await first_or_explain(
            self._runner,
            _CACHE_HIT if cache_hit else _USE,
            lambda: {"digest": digest, "now": self.now()},
            token_record,
            functools.partial(_explain_refusal, digest=digest, cache_hit=cache_hit, now=self.now()),
            conflict="the token changed while it was being used; try again",
        )

    @reads()
    def get(self, conn: Connection, token_id: uuid.UUID | str) -> Token:
        """The token with this id; NotFoundError if there is none."""
        key = check_id(token_id, "token id")
        row = found(conn, _BY_ID, "token", key, {"key": key})
        return token_record(tuple(row))

    @reads()
    def list(
        self,
        conn: Connection,
        project_id: uuid.UUID | str | None = None,
        active: bool | None = None,
        limit: int = 100,
        after: uuid.UUID | str | None = None,
    ) -> builtins.list[Token]:
        """Tokens in creation order; pass the last id of a page as ``after`` for the next."""
        equal = [
            (tokens.c.project_id, check_optional_id(project_id, "project id")),
            (tokens.c.is_active, check_optional_bool(active, "active")),
        ]
        statement = id_page(_SELECT, tokens.c.id, limit=limit, after=after, equal=equal)
        return [token_record(tuple(row)) for row in conn.execute(statement)]

    @writes(single="unless_audited")
    def update(
        self,
        conn: Connection,
        token_id: uuid.UUID | str,
        *,
        expires_at: dt.datetime | Unset | None = UNSET,
        max_requests: int | Unset | None = UNSET,
        name: str | Unset | None = UNSET,
        actor: str | None = None,
    ) -> Token:
        """Change expiry, quota or name; ``None`` means never, unlimited, or no name."""
        key = check_id(token_id, "token id")
        changes: dict[str, Any] = {}
        if expires_at is not UNSET:
            changes["expires_at"] = _optional_expiry(expires_at)
        if max_requests is not UNSET:
            changes["max_requests"] = _optional_quota(max_requests)
        if name is not UNSET:
            changes["name"] = _optional_name(name)
        if not changes:
            raise ValidationError(
                "update() needs at least one of expires_at=, max_requests=, name="
            )
        return _change(conn, key, check_actor(actor), "token.update", changes)

    @writes(single="unless_audited")
    def deactivate(
        self, conn: Connection, token_id: uuid.UUID | str, *, actor: str | None = None
    ) -> Token:
        """Mark the token inactive; an already inactive token keeps its first date."""
        key = check_id(token_id, "token id")
        now = self.now()
        changes = {
            "is_active": False,
            "deactivated_at": sa.func.coalesce(
                tokens.c.deactivated_at, sa.literal(now, UTCDateTime())
            ),
        }
        return _change(conn, key, check_actor(actor), "token.deactivate", changes)

    @writes(single="unless_audited")
    def activate(
        self, conn: Connection, token_id: uuid.UUID | str, *, actor: str | None = None
    ) -> Token:
        """Mark the token active again (its expiry and quota still apply)."""
        key = check_id(token_id, "token id")
        changes = {"is_active": True, "deactivated_at": None}
        return _change(conn, key, check_actor(actor), "token.activate", changes)

    @writes(single="unless_audited")
    def delete(
        self, conn: Connection, token_id: uuid.UUID | str, *, actor: str | None = None
    ) -> None:
        """Delete the token; its secret is refused as unknown from now on."""
        key = check_id(token_id, "token id")
        actor = check_actor(actor)
        row = found(
            conn, tokens.delete().where(tokens.c.id == key).returning(*_COLUMNS), "token", key
        )
        _audit(conn, actor, "token.delete", token_record(tuple(row)))


def _change(
    conn: Connection, key: uuid.UUID, actor: str | None, action: str, changes: dict[str, Any]
) -> Token:
    row = found(
        conn,
        tokens.update().where(tokens.c.id == key).values(**changes).returning(*_COLUMNS),
        "token",
        key,
    )
    token = token_record(tuple(row))
    _audit(conn, actor, action, token)
    return token


def _audit(conn: Connection, actor: str | None, action: str, token: Token) -> None:
    if actor is not None:
        record_event(conn, action, actor, "success", project_id=token.project_id, token_id=token.id)
