"""Projects: the repository over a connection, and its async face on the store."""

from __future__ import annotations

import builtins
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
    check_optional_bool,
    check_secret,
    check_text,
)
from llmstore._db.operations import Repository, reads, writes
from llmstore._db.queries import found, id_page
from llmstore._db.runner import Runner
from llmstore._db.schema import UTCDateTime, projects

from .audit import record_event

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


class Projects(Repository):
    """``store.projects`` and ``tx.projects``: each call is one unit of work.

    Every project operation is a single statement; with ``actor=``, the change and its
    audit event are written in one transaction.
    """

    def __init__(self, runner: Runner, secrets: SecretBox) -> None:
        super().__init__(runner)
        self._secrets = secrets

    @writes(single="unless_audited")
    def create(
        self, conn: Connection, name: str, api_key: str | None = None, *, actor: str | None = None
    ) -> Project:
        """Create an active project; ``api_key`` (its upstream key) is stored encrypted."""
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
        project = _record(conn.execute(_INSERT, values).one())
        return _audited(conn, actor, "project.create", project)

    @reads()
    def get(self, conn: Connection, project_id: uuid.UUID | str) -> Project:
        """The project with this id; NotFoundError if there is none."""
        key = check_id(project_id, "project id")
        row = found(conn, _BY_ID, "project", key, {"key": key})
        return _record(row)

    @reads()
    def get_by_name(self, conn: Connection, name: str) -> Project:
        """The project with this name; NotFoundError if there is none."""
        name = check_text(name, "project name", max_length=NAME_MAX)
        row = conn.execute(_BY_NAME, {"name": name}).first()
        if row is None:
            raise NotFoundError(f"no project named {name!r}")
        return _record(row)

    @reads()
    def list(
        self,
        conn: Connection,
        active: bool | None = None,
        limit: int = 100,
        after: uuid.UUID | str | None = None,
    ) -> builtins.list[Project]:
        """Projects in creation order; pass the last id of a page as ``after`` for the next."""
        equal = [(projects.c.is_active, check_optional_bool(active, "active"))]
        statement = id_page(_SELECT, projects.c.id, limit=limit, after=after, equal=equal)
        return [_record(row) for row in conn.execute(statement)]

    @writes(single="unless_audited")
    def update(
        self,
        conn: Connection,
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
        project = _change(conn, key, updated_at=utcnow(), **changes)
        return _audited(conn, actor, "project.update", project)

    @writes(single="unless_audited")
    def deactivate(
        self, conn: Connection, project_id: uuid.UUID | str, *, actor: str | None = None
    ) -> Project:
        """Mark the project inactive; an already inactive project keeps its first date."""
        key = check_id(project_id, "project id")
        actor = check_actor(actor)
        now = utcnow()
        project = _change(
            conn,
            key,
            is_active=False,
            updated_at=now,
            deactivated_at=sa.func.coalesce(
                projects.c.deactivated_at, sa.literal(now, UTCDateTime())
            ),
        )
        return _audited(conn, actor, "project.deactivate", project)

    @writes(single="unless_audited")
    def activate(
        self, conn: Connection, project_id: uuid.UUID | str, *, actor: str | None = None
    ) -> Project:
        """Mark the project active again."""
        key = check_id(project_id, "project id")
        actor = check_actor(actor)
        project = _change(conn, key, is_active=True, updated_at=utcnow(), deactivated_at=None)
        return _audited(conn, actor, "project.activate", project)

    @writes(single="unless_audited")
    def delete(
        self, conn: Connection, project_id: uuid.UUID | str, *, actor: str | None = None
    ) -> None:
        """Delete the project with its tokens and provider credentials."""
        key = check_id(project_id, "project id")
        actor = check_actor(actor)
        row = found(
            conn,
            projects.delete().where(projects.c.id == key).returning(*_RETURNED),
            "project",
            key,
        )
        _audited(conn, actor, "project.delete", _record(row))

    @reads()
    def reveal_api_key(self, conn: Connection, project_id: uuid.UUID | str) -> str | None:
        """The decrypted upstream key, or None when the project has none."""
        key = check_id(project_id, "project id")
        row = found(
            conn,
            sa.select(projects.c.api_key_encrypted).where(projects.c.id == key),
            "project",
            key,
        )
        return (
            None if row.api_key_encrypted is None else self._secrets.decrypt(row.api_key_encrypted)
        )


def _audited(conn: Connection, actor: str | None, action: str, project: Project) -> Project:
    if actor is not None:
        record_event(conn, action, actor, "success", project_id=project.id)
    return project


def _change(conn: Connection, key: uuid.UUID, **values: Any) -> Project:
    row = found(
        conn,
        projects.update().where(projects.c.id == key).values(**values).returning(*_RETURNED),
        "project",
        key,
    )
    return _record(row)
