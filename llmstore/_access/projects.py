"""Projects: the repository over a connection, and its async face on the store."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from sqlalchemy.engine import Connection

from llmstore._core.errors import NotFoundError, ValidationError
from llmstore._core.ids import new_id, utcnow
from llmstore._core.secrets import SecretBox
from llmstore._core.unset import UNSET, Unset
from llmstore._core.validate import (
    check_actor,
    check_id,
    check_limit,
    check_optional_bool,
    check_secret,
    check_text,
)
from llmstore._db.runner import Runner
from llmstore._db.schema import UTCDateTime, projects

from .audit import AuditRepository

NAME_MAX = 200


class Project(BaseModel):
    """A project as stored. It never carries the upstream key, only ``has_api_key``."""

    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    name: str
    is_active: bool
    has_api_key: bool
    created_at: dt.datetime
    updated_at: dt.datetime
    deactivated_at: dt.datetime | None


# The ciphertext is fetched rather than "IS NOT NULL": SQLite 3.40 can return a wrong
# value for that expression in INSERT ... RETURNING. It never leaves _record().
_RETURNED = (
    projects.c.id,
    projects.c.name,
    projects.c.is_active,
    projects.c.api_key_encrypted,
    projects.c.created_at,
    projects.c.updated_at,
    projects.c.deactivated_at,
)


# Built once: constructing a statement costs more than executing a cached one.
_INSERT = projects.insert().returning(*_RETURNED)
_SELECT = sa.select(*_RETURNED)
_BY_ID = _SELECT.where(projects.c.id == sa.bindparam("key"))
_BY_NAME = _SELECT.where(projects.c.name == sa.bindparam("name"))


def _record(row: Any) -> Project:
    return Project(
        id=row.id,
        name=row.name,
        is_active=row.is_active,
        has_api_key=row.api_key_encrypted is not None,
        created_at=row.created_at,
        updated_at=row.updated_at,
        deactivated_at=row.deactivated_at,
    )


class ProjectRepository:
    """Project operations on one connection; the caller owns the transaction."""

    def __init__(self, conn: Connection, secrets: SecretBox) -> None:
        self._conn = conn
        self._secrets = secrets

    def create(self, name: str, api_key: str | None = None, *, actor: str | None = None) -> Project:
        name = check_text(name, "project name", max_length=NAME_MAX)
        actor = check_actor(actor)
        encrypted = None
        if api_key is not None:
            encrypted = self._secrets.encrypt(check_secret(api_key, "api_key"))
        now = utcnow()
        values = {
            "id": new_id(),
            "name": name,
            "api_key_encrypted": encrypted,
            "is_active": True,
            "created_at": now,
            "updated_at": now,
            "deactivated_at": None,
        }
        return self._audited(
            actor, "project.create", _record(self._conn.execute(_INSERT, values).one())
        )

    def get(self, project_id: uuid.UUID | str) -> Project:
        key = check_id(project_id, "project id")
        row = self._conn.execute(_BY_ID, {"key": key}).first()
        if row is None:
            raise NotFoundError(f"no project with id {key}")
        return _record(row)

    def get_by_name(self, name: str) -> Project:
        name = check_text(name, "project name", max_length=NAME_MAX)
        row = self._conn.execute(_BY_NAME, {"name": name}).first()
        if row is None:
            raise NotFoundError(f"no project named {name!r}")
        return _record(row)

    def list(
        self,
        active: bool | None = None,
        limit: int = 100,
        after: uuid.UUID | str | None = None,
    ) -> list[Project]:
        """Projects in creation order; pass the last id of a page as ``after`` for the next."""
        statement = _SELECT.order_by(projects.c.id).limit(check_limit(limit))
        if check_optional_bool(active, "active") is not None:
            statement = statement.where(projects.c.is_active == active)
        if after is not None:
            statement = statement.where(projects.c.id > check_id(after, "after"))
        return [_record(row) for row in self._conn.execute(statement)]

    def update(
        self,
        project_id: uuid.UUID | str,
        *,
        name: str | Unset = UNSET,
        api_key: str | Unset | None = UNSET,
        actor: str | None = None,
    ) -> Project:
        """Rename the project and/or replace its upstream key (``api_key=None`` removes it)."""
        key = check_id(project_id, "project id")
        actor = check_actor(actor)
        changes: dict[str, Any] = {}
        if name is not UNSET:
            changes["name"] = check_text(name, "project name", max_length=NAME_MAX)
        if api_key is not UNSET:
            changes["api_key_encrypted"] = (
                None if api_key is None else self._secrets.encrypt(check_secret(api_key, "api_key"))
            )
        if not changes:
            raise ValidationError("update() needs at least one of name= or api_key=")
        return self._audited(
            actor, "project.update", self._change(key, updated_at=utcnow(), **changes)
        )

    def deactivate(self, project_id: uuid.UUID | str, *, actor: str | None = None) -> Project:
        """Mark the project inactive; an already inactive project keeps its first date."""
        key = check_id(project_id, "project id")
        actor = check_actor(actor)
        now = utcnow()
        project = self._change(
            key,
            is_active=False,
            updated_at=now,
            deactivated_at=sa.func.coalesce(
                projects.c.deactivated_at, sa.literal(now, UTCDateTime())
            ),
        )
        return self._audited(actor, "project.deactivate", project)

    def activate(self, project_id: uuid.UUID | str, *, actor: str | None = None) -> Project:
        key = check_id(project_id, "project id")
        actor = check_actor(actor)
        project = self._change(key, is_active=True, updated_at=utcnow(), deactivated_at=None)
        return self._audited(actor, "project.activate", project)

    def delete(self, project_id: uuid.UUID | str, *, actor: str | None = None) -> None:
        """Delete the project with its tokens and provider credentials."""
        key = check_id(project_id, "project id")
        actor = check_actor(actor)
        row = self._conn.execute(
            projects.delete().where(projects.c.id == key).returning(*_RETURNED)
        ).first()
        if row is None:
            raise NotFoundError(f"no project with id {key}")
        self._audited(actor, "project.delete", _record(row))

    def reveal_api_key(self, project_id: uuid.UUID | str) -> str | None:
        """The decrypted upstream key, or None when the project has none."""
        key = check_id(project_id, "project id")
        row = self._conn.execute(
            sa.select(projects.c.api_key_encrypted).where(projects.c.id == key)
        ).first()
        if row is None:
            raise NotFoundError(f"no project with id {key}")
        return (
            None if row.api_key_encrypted is None else self._secrets.decrypt(row.api_key_encrypted)
        )

    def _audited(self, actor: str | None, action: str, project: Project) -> Project:
        if actor is not None:
            AuditRepository(self._conn).record(action, actor, "success", project_id=project.id)
        return project

    def _change(self, key: uuid.UUID, **values: Any) -> Project:
        row = self._conn.execute(
            projects.update().where(projects.c.id == key).values(**values).returning(*_RETURNED)
        ).first()
        if row is None:
            raise NotFoundError(f"no project with id {key}")
        return _record(row)


class Projects:
    """``store.projects`` and ``tx.projects``: each call is one unit of work.

    Every project operation is a single statement; with ``actor=``, the change and its
    audit event are written in one transaction.
    """

    def __init__(self, runner: Runner, secrets: SecretBox) -> None:
        self._runner = runner
        self._secrets = secrets

    def _repo(self, conn: Connection) -> ProjectRepository:
        return ProjectRepository(conn, self._secrets)

    async def create(
        self, name: str, api_key: str | None = None, *, actor: str | None = None
    ) -> Project:
        return await self._runner.write(
            lambda conn: self._repo(conn).create(name, api_key, actor=actor), single=actor is None
        )

    async def get(self, project_id: uuid.UUID | str) -> Project:
        return await self._runner.read(lambda conn: self._repo(conn).get(project_id), single=True)

    async def get_by_name(self, name: str) -> Project:
        return await self._runner.read(lambda conn: self._repo(conn).get_by_name(name), single=True)

    async def list(
        self,
        active: bool | None = None,
        limit: int = 100,
        after: uuid.UUID | str | None = None,
    ) -> list[Project]:
        return await self._runner.read(
            lambda conn: self._repo(conn).list(active, limit, after), single=True
        )

    async def update(
        self,
        project_id: uuid.UUID | str,
        *,
        name: str | Unset = UNSET,
        api_key: str | Unset | None = UNSET,
        actor: str | None = None,
    ) -> Project:
        return await self._runner.write(
            lambda conn: self._repo(conn).update(
                project_id, name=name, api_key=api_key, actor=actor
            ),
            single=actor is None,
        )

    async def deactivate(self, project_id: uuid.UUID | str, *, actor: str | None = None) -> Project:
        return await self._runner.write(
            lambda conn: self._repo(conn).deactivate(project_id, actor=actor), single=actor is None
        )

    async def activate(self, project_id: uuid.UUID | str, *, actor: str | None = None) -> Project:
        return await self._runner.write(
            lambda conn: self._repo(conn).activate(project_id, actor=actor), single=actor is None
        )

    async def delete(self, project_id: uuid.UUID | str, *, actor: str | None = None) -> None:
        await self._runner.write(
            lambda conn: self._repo(conn).delete(project_id, actor=actor), single=actor is None
        )

    async def reveal_api_key(self, project_id: uuid.UUID | str) -> str | None:
        return await self._runner.read(
            lambda conn: self._repo(conn).reveal_api_key(project_id), single=True
        )
