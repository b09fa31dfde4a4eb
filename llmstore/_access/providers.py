"""Provider credentials: the upstream LLM settings a proxy calls with, per project or global.

At most one credential is active per scope (a project, or ``global``); a partial unique
index enforces it. Switching deactivates the old one and activates the new one in one
transaction. Every operation that may switch first takes its scope's lock: on SQLite the
write lock already serialises them; on Postgres, at READ COMMITTED, two switches in one
scope would otherwise deadlock on the index, and two ``ensure_default`` calls that both
found nothing would both insert. A transaction-level advisory lock keyed by the scope
orders them instead.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Callable
from typing import Any, Final, TypeVar

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from sqlalchemy.engine import Connection

from llmstore._core.errors import NotFoundError, ValidationError
from llmstore._core.ids import new_id, utcnow
from llmstore._core.secrets import SecretBox
from llmstore._core.unset import UNSET, Unset
from llmstore._core.validate import (
    check_actor,
    check_http_url,
    check_id,
    check_limit,
    check_secret,
    check_text,
    describe,
)
from llmstore._db.runner import Runner
from llmstore._db.schema import projects, provider_credentials

from .audit import AuditRepository

T = TypeVar("T")
GLOBAL_SCOPE: Final = "global"
_PROVIDER = re.compile(r"[a-z][a-z0-9_.-]{0,49}")
# First key of the two-key advisory lock, so scope locks never meet other llmstore locks.
_SCOPE_LOCK_NAMESPACE = 0x6C6C7370  # "llsp"


class ProviderCredential(BaseModel):
    """A provider credential as stored; the key itself only through ``reveal_api_key``."""

    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    project_id: uuid.UUID | None
    provider: str
    model: str
    base_url: str | None
    has_api_key: bool
    is_active: bool
    created_at: dt.datetime
    updated_at: dt.datetime


_TABLE = provider_credentials
_COLUMNS = (
    _TABLE.c.id,
    _TABLE.c.project_id,
    _TABLE.c.provider,
    _TABLE.c.model,
    _TABLE.c.base_url,
    _TABLE.c.api_key_encrypted,
    _TABLE.c.is_active,
    _TABLE.c.created_at,
    _TABLE.c.updated_at,
)
_SELECT = sa.select(*_COLUMNS)


def _credential(row: Any) -> ProviderCredential:
    return ProviderCredential(
        id=row.id,
        project_id=row.project_id,
        provider=row.provider,
        model=row.model,
        base_url=row.base_url,
        has_api_key=row.api_key_encrypted is not None,
        is_active=row.is_active,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _scope(project_id: uuid.UUID | None) -> str:
    return GLOBAL_SCOPE if project_id is None else str(project_id)


def check_provider(value: object) -> str:
    text = str.__str__(value) if isinstance(value, str) else None
    if text is None or _PROVIDER.fullmatch(text) is None:
        raise ValidationError(
            "provider must be a lowercase name such as openai, anthropic, gemini or ollama "
            f"(letters, digits, '_', '-', '.'; at most 50), not {describe(value, 60)}"
        )
    return text


def _check_model(value: object) -> str:
    return check_text(value, "model", max_length=200)


def _check_base_url(value: object) -> str | None:
    if value is None:
        return None
    return check_http_url(value, "base_url")


class ProviderRepository:
    """Provider credential operations on one connection; the caller owns the transaction."""

    def __init__(self, conn: Connection, secrets: SecretBox) -> None:
        self._conn = conn
        self._secrets = secrets

    def _encrypt(self, api_key: object) -> str | None:
        return None if api_key is None else self._secrets.encrypt(check_secret(api_key, "api_key"))

    def create(
        self,
        provider: str,
        model: str,
        *,
        project_id: uuid.UUID | str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        active: bool | None = None,
        actor: str | None = None,
    ) -> ProviderCredential:
        """A new credential; ``active=None`` makes it active only if its scope has none."""
        project = None if project_id is None else check_id(project_id, "project id")
        if active is not None and not isinstance(active, bool):
            raise ValidationError(f"active must be True, False or None, not {describe(active)}")
        now = utcnow()
        scope = _scope(project)
        values: dict[str, Any] = {
            "id": new_id(),
            "project_id": project,
            "scope": scope,
            "provider": check_provider(provider),
            "model": _check_model(model),
            "base_url": _check_base_url(base_url),
            "api_key_encrypted": self._encrypt(api_key),
            "created_at": now,
            "updated_at": now,
        }
        actor = check_actor(actor)
        if project is not None:
            found = self._conn.execute(sa.select(projects.c.id).where(projects.c.id == project))
            if found.first() is None:
                raise NotFoundError(f"no project with id {project}")
        if active is not False:
            self._lock_scope(scope)
        if active is None:
            active = self._active_in(scope) is None
        elif active:
            self._deactivate_scope(scope, now)
        values["is_active"] = active
        row = self._conn.execute(_TABLE.insert().returning(*_COLUMNS), values).one()
        return self._audited(actor, "provider.create", _credential(row))

    def get(self, credential_id: uuid.UUID | str) -> ProviderCredential:
        return _credential(self._row(check_id(credential_id, "credential id")))

    def list(
        self,
        project_id: uuid.UUID | str | None = None,
        limit: int = 100,
        after: uuid.UUID | str | None = None,
    ) -> list[ProviderCredential]:
        """Credentials in creation order: all of them, or one project's."""
        statement = _SELECT.order_by(_TABLE.c.id).limit(check_limit(limit))
        if project_id is not None:
            statement = statement.where(_TABLE.c.project_id == check_id(project_id, "project id"))
        if after is not None:
            statement = statement.where(_TABLE.c.id > check_id(after, "after"))
        return [_credential(row) for row in self._conn.execute(statement)]

    def update(
        self,
        credential_id: uuid.UUID | str,
        *,
        provider: str | Unset = UNSET,
        model: str | Unset = UNSET,
        base_url: str | Unset | None = UNSET,
        api_key: str | Unset | None = UNSET,
        actor: str | None = None,
    ) -> ProviderCredential:
        key = check_id(credential_id, "credential id")
        changes: dict[str, Any] = {}
        if provider is not UNSET:
            changes["provider"] = check_provider(provider)
        if model is not UNSET:
            changes["model"] = _check_model(model)
        if base_url is not UNSET:
            changes["base_url"] = _check_base_url(base_url)
        if api_key is not UNSET:
            changes["api_key_encrypted"] = self._encrypt(api_key)
        if not changes:
            raise ValidationError(
                "update() needs at least one of provider=, model=, base_url=, api_key="
            )
        actor = check_actor(actor)
        credential = self._change(key, updated_at=utcnow(), **changes)
        return self._audited(actor, "provider.update", credential)

    def activate(
        self, credential_id: uuid.UUID | str, *, actor: str | None = None
    ) -> ProviderCredential:
        """Make this the active credential of its scope, deactivating the previous one."""
        key = check_id(credential_id, "credential id")
        actor = check_actor(actor)
        # The scope never changes; its state is read again under the lock.
        scope = _scope(self._row(key).project_id)
        self._lock_scope(scope)
        now = utcnow()
        self._deactivate_scope(scope, now, keep=key)
        credential = self._change(key, is_active=True, updated_at=now)
        return self._audited(actor, "provider.activate", credential)

    def deactivate(
        self, credential_id: uuid.UUID | str, *, actor: str | None = None
    ) -> ProviderCredential:
        key = check_id(credential_id, "credential id")
        actor = check_actor(actor)
        credential = self._change(key, is_active=False, updated_at=utcnow())
        return self._audited(actor, "provider.deactivate", credential)

    def delete(self, credential_id: uuid.UUID | str, *, actor: str | None = None) -> None:
        key = check_id(credential_id, "credential id")
        actor = check_actor(actor)
        row = self._conn.execute(
            _TABLE.delete().where(_TABLE.c.id == key).returning(*_COLUMNS)
        ).first()
        if row is None:
            raise NotFoundError(f"no provider credential with id {key}")
        self._audited(actor, "provider.delete", _credential(row))

    def reveal_api_key(self, credential_id: uuid.UUID | str) -> str | None:
        row = self._row(check_id(credential_id, "credential id"))
        encrypted = row.api_key_encrypted
        return None if encrypted is None else self._secrets.decrypt(encrypted)

    def resolve(self, project_id: uuid.UUID | str) -> ProviderCredential:
        """The project's active credential, else the active global one."""
        project = check_id(project_id, "project id")
        row = self._conn.execute(
            _SELECT.where(
                _TABLE.c.is_active == sa.true(),
                _TABLE.c.scope.in_([str(project), GLOBAL_SCOPE]),
            )
            .order_by(sa.case((_TABLE.c.scope == GLOBAL_SCOPE, 1), else_=0))
            .limit(1)
        ).first()
        if row is None:
            raise NotFoundError(
                f"no active provider credential for project {project} and no global default"
            )
        return _credential(row)

    def ensure_default(
        self,
        provider: str,
        model: str,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        actor: str | None = None,
    ) -> ProviderCredential:
        """Make (provider, model) the active global credential, creating it if need be."""
        provider = check_provider(provider)
        model = _check_model(model)
        base_url = _check_base_url(base_url)
        if api_key is not None:
            check_secret(api_key, "api_key")
        actor = check_actor(actor)
        self._lock_scope(GLOBAL_SCOPE)
        row = self._conn.execute(
            _SELECT.where(
                _TABLE.c.scope == GLOBAL_SCOPE,
                _TABLE.c.provider == provider,
                _TABLE.c.model == model,
            )
            .order_by(_TABLE.c.is_active.desc(), _TABLE.c.id)
            .limit(1)
        ).first()
        now = utcnow()
        if row is None:
            return self.create(
                provider, model, base_url=base_url, api_key=api_key, active=True, actor=actor
            )
        changes: dict[str, Any] = {}
        if base_url is not None and base_url != row.base_url:
            changes["base_url"] = base_url
        if api_key is not None and (
            row.api_key_encrypted is None or self._secrets.decrypt(row.api_key_encrypted) != api_key
        ):
            changes["api_key_encrypted"] = self._encrypt(api_key)
        if not row.is_active:
            self._deactivate_scope(GLOBAL_SCOPE, now)
            changes["is_active"] = True
        if not changes:
            return _credential(row)
        credential = self._change(row.id, updated_at=now, **changes)
        return self._audited(actor, "provider.ensure_default", credential)

    def _lock_scope(self, scope: str) -> None:
        """Serialise switches in ``scope`` until the transaction ends (Postgres only)."""
        if self._conn.dialect.name == "postgresql":
            self._conn.execute(
                sa.select(
                    sa.func.pg_advisory_xact_lock(_SCOPE_LOCK_NAMESPACE, sa.func.hashtext(scope))
                )
            )

    def _active_in(self, scope: str) -> Any:
        return self._conn.execute(
            sa.select(_TABLE.c.id).where(_TABLE.c.scope == scope, _TABLE.c.is_active == sa.true())
        ).first()

    def _deactivate_scope(
        self, scope: str, now: dt.datetime, keep: uuid.UUID | None = None
    ) -> None:
        statement = _TABLE.update().where(_TABLE.c.scope == scope, _TABLE.c.is_active == sa.true())
        if keep is not None:
            statement = statement.where(_TABLE.c.id != keep)
        self._conn.execute(statement.values(is_active=False, updated_at=now))

    def _row(self, key: uuid.UUID) -> Any:
        row = self._conn.execute(_SELECT.where(_TABLE.c.id == key)).first()
        if row is None:
            raise NotFoundError(f"no provider credential with id {key}")
        return row

    def _change(self, key: uuid.UUID, **values: Any) -> ProviderCredential:
        row = self._conn.execute(
            _TABLE.update().where(_TABLE.c.id == key).values(**values).returning(*_COLUMNS)
        ).first()
        if row is None:
            raise NotFoundError(f"no provider credential with id {key}")
        return _credential(row)

    def _audited(
        self, actor: str | None, action: str, credential: ProviderCredential
    ) -> ProviderCredential:
        if actor is not None:
            AuditRepository(self._conn).record(
                action,
                actor,
                "success",
                project_id=credential.project_id,
                metadata={
                    "credential_id": str(credential.id),
                    "provider": credential.provider,
                    "model": credential.model,
                },
            )
        return credential


class Providers:
    """``store.providers`` and ``tx.providers``: each call is one unit of work."""

    def __init__(self, runner: Runner, secrets: SecretBox) -> None:
        self._runner = runner
        self._secrets = secrets

    def _repo(self, conn: Connection) -> ProviderRepository:
        return ProviderRepository(conn, self._secrets)

    async def _write(self, fn: Callable[[ProviderRepository], T]) -> T:
        return await self._runner.write(lambda conn: fn(self._repo(conn)))

    async def create(
        self,
        provider: str,
        model: str,
        project_id: uuid.UUID | str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        active: bool | None = None,
        *,
        actor: str | None = None,
    ) -> ProviderCredential:
        return await self._write(
            lambda repo: repo.create(
                provider,
                model,
                project_id=project_id,
                base_url=base_url,
                api_key=api_key,
                active=active,
                actor=actor,
            )
        )

    async def get(self, credential_id: uuid.UUID | str) -> ProviderCredential:
        return await self._runner.read(
            lambda conn: self._repo(conn).get(credential_id), single=True
        )

    async def list(
        self,
        project_id: uuid.UUID | str | None = None,
        limit: int = 100,
        after: uuid.UUID | str | None = None,
    ) -> list[ProviderCredential]:
        return await self._runner.read(
            lambda conn: self._repo(conn).list(project_id, limit, after), single=True
        )

    async def update(
        self,
        credential_id: uuid.UUID | str,
        *,
        provider: str | Unset = UNSET,
        model: str | Unset = UNSET,
        base_url: str | Unset | None = UNSET,
        api_key: str | Unset | None = UNSET,
        actor: str | None = None,
    ) -> ProviderCredential:
        return await self._runner.write(
            lambda conn: self._repo(conn).update(
                credential_id,
                provider=provider,
                model=model,
                base_url=base_url,
                api_key=api_key,
                actor=actor,
            ),
            single=actor is None,
        )

    async def activate(
        self, credential_id: uuid.UUID | str, *, actor: str | None = None
    ) -> ProviderCredential:
        return await self._write(lambda repo: repo.activate(credential_id, actor=actor))

    async def deactivate(
        self, credential_id: uuid.UUID | str, *, actor: str | None = None
    ) -> ProviderCredential:
        return await self._runner.write(
            lambda conn: self._repo(conn).deactivate(credential_id, actor=actor),
            single=actor is None,
        )

    async def delete(self, credential_id: uuid.UUID | str, *, actor: str | None = None) -> None:
        await self._runner.write(
            lambda conn: self._repo(conn).delete(credential_id, actor=actor),
            single=actor is None,
        )

    async def reveal_api_key(self, credential_id: uuid.UUID | str) -> str | None:
        return await self._runner.read(
            lambda conn: self._repo(conn).reveal_api_key(credential_id), single=True
        )

    async def resolve(self, project_id: uuid.UUID | str) -> ProviderCredential:
        return await self._runner.read(
            lambda conn: self._repo(conn).resolve(project_id), single=True
        )

    async def ensure_default(
        self,
        provider: str,
        model: str,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        actor: str | None = None,
    ) -> ProviderCredential:
        return await self._write(
            lambda repo: repo.ensure_default(
                provider, model, api_key=api_key, base_url=base_url, actor=actor
            )
        )
