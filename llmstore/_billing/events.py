"""The audit events of ``store.api_keys``: written with the change they record, in its unit.

A mutation called with ``actor=`` runs as one transaction that writes the change and
its event (``api_key.<operation>``) together; without an actor nothing is audited and
the operation keeps its fastest form. An event names the key's project as
``project_id`` and carries the key's id (and the amount moved, for money) in its
metadata, never a secret: not the key's, not a withdrawal's token.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore._access import record_event
from llmstore._core.errors import NotFoundError

from .records import K

_LOOKUP: Any = object()


def _plain(value: object) -> object:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dt.datetime):
        return value.isoformat(timespec="microseconds")
    return value


def lock_key(conn: Connection, key_id: uuid.UUID) -> uuid.UUID | None:
    """Lock the key's row for the rest of the unit; its project id (NotFoundError if none).

    An audited money call locks it first: a racing call with the same idempotency key
    is then seen (and replayed, unaudited) once the lock is ours.
    """
    row = conn.execute(sa.select(K.c.project_id).where(K.c.id == key_id).with_for_update()).first()
    if row is None:
        raise NotFoundError(f"no API key with id {key_id}")
    project_id: uuid.UUID | None = row.project_id
    return project_id


def key_event(
    conn: Connection,
    actor: str | None,
    operation: str,
    key_id: uuid.UUID,
    *,
    project_id: uuid.UUID | None = _LOOKUP,
    **details: object,
) -> None:
    """With an ``actor``: the event ``api_key.<operation>`` of the key, in this unit."""
    if actor is None:
        return
    if project_id is _LOOKUP:
        project_id = conn.execute(sa.select(K.c.project_id).where(K.c.id == key_id)).scalar()
    metadata: dict[str, object] = {"api_key_id": str(key_id)}
    metadata.update({name: _plain(value) for name, value in details.items() if value is not None})
    record_event(
        conn, f"api_key.{operation}", actor, "success", project_id=project_id, metadata=metadata
    )
