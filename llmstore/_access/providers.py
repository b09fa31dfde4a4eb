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

import builtins
import datetime as dt
import re
import uuid
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
    check_optional_id,
    check_secret,
    check_text,
    describe,
)
from llmstore._db.dialects import lock_until_commit
from llmstore._db.operations import Repository, reads, writes
from llmstore._db.queries import found, id_page
from llmstore._db.runner import Runner
from llmstore._db.schema import projects, provider_credentials

from .audit import record_event

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


class Providers(Repository):
    """``store.providers`` and ``tx.providers``: each call is one unit of work.

    A scope (one project, or the global default) has at most one active credential; the
    switches within a scope are serialised, so two replicas never leave two active.
    """

    def __init__(self, runner: Runner, secrets: SecretBox) -> None:
        super().__init__(runner)
        self._secrets = secrets

    def _encrypt(self, api_key: object) -> str | None:
        return None if api_key is None else self._secrets.encrypt(check_secret(api_key, "api_key"))

    @writes()
    def create(
        self,
        conn: Connection,
        provider: str,
        model: str,
        project_id: uuid.UUID | str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        active: bool | None = None,
        *,
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
            found = conn.execute(sa.select(projects.c.id).where(projects.c.id == project))
            if found.first() is None:
                raise NotFoundError(f"no project with id {project}")
        if active is not False:
            self._lock_scope(conn, scope)
        if active is None:
            active = self._active_in(conn, scope) is None
        elif active:
            self._deactivate_scope(conn, scope, now)
        values["is_active"] = active
        row = conn.execute(_TABLE.insert().returning(*_COLUMNS), values).one()
        return self._audited(conn, actor, "provider.create", _credential(row))

    @reads()
    def get(self, conn: Connection, credential_id: uuid.UUID | str) -> ProviderCredential:
        """The credential with this id (never its key); NotFoundError if there is none."""
        return _credential(self._row(conn, check_id(credential_id, "credential id")))

    @reads()
    def list(
        self,
        conn: Connection,
        project_id: uuid.UUID | str | None = None,
        limit: int = 100,
        after: uuid.UUID | str | None = None,
    ) -> builtins.list[ProviderCredential]:
        """Credentials in creation order: all of them, or one project's."""
        project = check_optional_id(project_id, "project id")
        statement = id_page(
            _SELECT, _TABLE.c.id, limit=limit, after=after, equal=[(_TABLE.c.project_id, project)]
        )
        return [_credential(row) for row in conn.execute(statement)]

    @writes(single="unless_audited")
    def update(
        self,
        conn: Connection,
        credential_id: uuid.UUID | str,
        *,
        provider: str | Unset = UNSET,
        model: str | Unset = UNSET,
        base_url: str | Unset | None = UNSET,
        api_key: str | Unset | None = UNSET,
        actor: str | None = None,
    ) -> ProviderCredential:
        """Change the provider, model, base URL or key (``None`` removes the last two)."""
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
        credential = self._change(conn, key, updated_at=utcnow(), **changes)
        return self._audited(conn, actor, "provider.update", credential)

    @writes()
    def activate(
        self, conn: Connection, credential_id: uuid.UUID | str, *, actor: str | None = None
    ) -> ProviderCredential:
        """Make this the active credential of its scope, deactivating the previous one."""
        key = check_id(credential_id, "credential id")
        actor = check_actor(actor)
        # The scope never changes; its state is read again under the lock.
        scope = _scope(self._row(conn, key).project_id)
        self._lock_scope(conn, scope)
        now = utcnow()
        self._deactivate_scope(conn, scope, now, keep=key)
        credential = self._change(conn, key, is_active=True, updated_at=now)
        return self._audited(conn, actor, "provider.activate", credential)

    @writes(single="unless_audited")
    def deactivate(
        self, conn: Connection, credential_id: uuid.UUID | str, *, actor: str | None = None
    ) -> ProviderCredential:
        """Mark the credential inactive; its scope may then have none active."""
        key = check_id(credential_id, "credential id")
        actor = check_actor(actor)
        credential = self._change(conn, key, is_active=False, updated_at=utcnow())
        return self._audited(conn, actor, "provider.deactivate", credential)

    @writes(single="unless_audited")
    def delete(
        self, conn: Connection, credential_id: uuid.UUID | str, *, actor: str | None = None
    ) -> None:
        """Delete the credential."""
        key = check_id(credential_id, "credential id")
        actor = check_actor(actor)
        row = found(
            conn,
            _TABLE.delete().where(_TABLE.c.id == key).returning(*_COLUMNS),
            "provider credential",
            key,
        )
        self._audited(conn, actor, "provider.delete", _credential(row))

    @reads()
    def reveal_api_key(self, conn: Connection, credential_id: uuid.UUID | str) -> str | None:
        """The decrypted upstream key, or None when the credential has none."""
        row = self._row(conn, check_id(credential_id, "credential id"))
        encrypted = row.api_key_encrypted
        return None if encrypted is None else self._secrets.decrypt(encrypted)

    @reads()
    def resolve(self, conn: Connection, project_id: uuid.UUID | str) -> ProviderCredential:
        """The project's active credential, else the active global one."""
        project = check_id(project_id, "project id")
        row = conn.execute(
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

    @writes()
    def ensure_default(
        self,
        conn: Connection,
        provider: str,
        model: str,
        api_key: str | None = None,
        *,
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
        self._lock_scope(conn, GLOBAL_SCOPE)
        row = conn.execute(
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
            return Providers.create.run_in(
                self,
                conn,
                provider,
                model,
                base_url=base_url,
                api_key=api_key,
                active=True,
                actor=actor,
            )
        changes: dict[str, Any] = {}
        if base_url is not None and base_url != row.base_url:
            changes["base_url"] = base_url
        if api_key is not None and (
            row.api_key_encrypted is None or self._secrets.decrypt(row.api_key_encrypted) != api_key
        ):
            changes["api_key_encrypted"] = self._encrypt(api_key)
        if not row.is_active:
            self._deactivate_scope(conn, GLOBAL_SCOPE, now)
            changes["is_active"] = True
        if not changes:
            return _credential(row)
        credential = self._change(conn, row.id, updated_at=now, **changes)
        return self._audited(conn, actor, "provider.ensure_default", credential)

    def _lock_scope(self, conn: Connection, scope: str) -> None:
        """Serialise switches in ``scope`` until the transaction ends."""
        lock_until_commit(conn, _SCOPE_LOCK_NAMESPACE, scope)

    def _active_in(self, conn: Connection, scope: str) -> Any:
        return conn.execute(
            sa.select(_TABLE.c.id).where(_TABLE.c.scope == scope, _TABLE.c.is_active == sa.true())
        ).first()

    def _deactivate_scope(
        self, conn: Connection, scope: str, now: dt.datetime, keep: uuid.UUID | None = None
    ) -> None:
        statement = _TABLE.update().where(_TABLE.c.scope == scope, _TABLE.c.is_active == sa.true())
        if keep is not None:
            statement = statement.where(_TABLE.c.id != keep)
        conn.execute(statement.values(is_active=False, updated_at=now))

    def _row(self, conn: Connection, key: uuid.UUID) -> Any:
        return found(conn, _SELECT.where(_TABLE.c.id == key), "provider credential", key)

    def _change(self, conn: Connection, key: uuid.UUID, **values: Any) -> ProviderCredential:
        row = found(
            conn,
            _TABLE.update().where(_TABLE.c.id == key).values(**values).returning(*_COLUMNS),
            "provider credential",
            key,
        )
        return _credential(row)

    def _audited(
        self, conn: Connection, actor: str | None, action: str, credential: ProviderCredential
    ) -> ProviderCredential:
        if actor is not None:
            record_event(
                conn,
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
