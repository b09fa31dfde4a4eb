"""The tamper-evident audit log: append-only events linked by a SHA-256 hash chain.

Each event's ``hash`` is the SHA-256 of its canonical JSON content, which includes the
previous event's hash. Appends are serialised on the one ``audit_chain`` row (row lock on
Postgres, the write lock on SQLite), so events from any number of processes form one
chain. ``purge()`` deletes a prefix of the chain and records the last deleted hash as the
anchor the remaining chain is verified from.
"""

from __future__ import annotations

import builtins
import datetime as dt
import hashlib
import ipaddress
import json
import uuid
from collections.abc import Mapping
from typing import Any, Literal, cast

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from sqlalchemy.engine import Connection

from llmstore._core.errors import NotFoundError, ValidationError
from llmstore._core.ids import new_id, utcnow
from llmstore._core.validate import (
    check_aware,
    check_choice,
    check_id,
    check_json_mapping,
    check_limit,
    check_optional_id,
    check_text,
    describe,
    plain_text,
)
from llmstore._db.operations import Repository, reads, writes
from llmstore._db.queries import found, in_period
from llmstore._db.schema import audit_chain, audit_events

Outcome = Literal["success", "failure", "denied"]
OUTCOMES: tuple[Outcome, ...] = ("success", "failure", "denied")
_VERIFY_BATCH = 1000
# The column's width: the longest IPv6 text form, and room for a short scope id.
CLIENT_IP_MAX = 45


class AuditEvent(BaseModel):
    """One event of the audit log, with its place in the hash chain."""

    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    seq: int
    timestamp: dt.datetime
    action: str
    actor: str
    outcome: Outcome
    project_id: uuid.UUID | None
    token_id: uuid.UUID | None
    request_id: str | None
    client_ip: str | None
    metadata: dict[str, Any] | None
    prev_hash: str
    hash: str


class AuditVerification(BaseModel):
    """What :meth:`Audit.verify` found. ``ok`` is False from the first broken event on.

    ``reason``: ``content_altered`` (an event's hash does not match its content),
    ``link_broken`` (an event does not point at its predecessor's hash),
    ``events_missing`` (a gap in the sequence, or events deleted at the end).
    """

    model_config = ConfigDict(frozen=True)

    ok: bool
    events_checked: int
    anchor_seq: int
    head_seq: int
    failed_event_id: uuid.UUID | None = None
    failed_seq: int | None = None
    reason: Literal["content_altered", "link_broken", "events_missing"] | None = None
    message: str = "the audit chain is intact"


def event_hash(values: Mapping[str, Any]) -> str:
    """The SHA-256 of an event's canonical content (which includes ``prev_hash``)."""
    content = {
        "seq": values["seq"],
        "id": str(values["id"]),
        "timestamp": values["timestamp"].astimezone(dt.UTC).isoformat(timespec="microseconds"),
        "action": values["action"],
        "actor": values["actor"],
        "outcome": values["outcome"],
        "project_id": _text_or_none(values["project_id"]),
        "token_id": _text_or_none(values["token_id"]),
        "request_id": values["request_id"],
        "client_ip": values["client_ip"],
        "metadata": values["event_metadata"],
        "prev_hash": values["prev_hash"],
    }
    canonical = json.dumps(
        content, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _text_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def _check_ip(value: object) -> str | None:
    """An IP address in its normal form; a scoped IPv6 address keeps its zone (``%eth0``).

    Client IPs come from request headers: the zone is the sender's text, so the address as
    a whole is held to the rules of a label (no control characters, valid text) and to the
    column's width, before either driver sees it.
    """
    if value is None:
        return None
    text = plain_text(value, "client_ip").strip()
    try:
        address = str(ipaddress.ip_address(text))
    except ValueError:
        raise ValidationError(f"client_ip is not an IP address: {describe(text)}") from None
    return check_text(address, "client_ip", max_length=CLIENT_IP_MAX)


def _check_outcome(value: object) -> Outcome:
    return cast(Outcome, check_choice(value, "outcome", OUTCOMES))


def _optional_text(value: object, what: str, max_length: int) -> str | None:
    return None if value is None else check_text(value, what, max_length=max_length)


_COLUMNS = (
    audit_events.c.id,
    audit_events.c.seq,
    audit_events.c.timestamp,
    audit_events.c.action,
    audit_events.c.actor,
    audit_events.c.outcome,
    audit_events.c.project_id,
    audit_events.c.token_id,
    audit_events.c.request_id,
    audit_events.c.client_ip,
    audit_events.c.event_metadata,
    audit_events.c.prev_hash,
    audit_events.c.hash,
)
_SELECT = sa.select(*_COLUMNS)
_HEAD_FOR_UPDATE = (
    sa.select(audit_chain.c.head_seq, audit_chain.c.head_hash, audit_chain.c.head_timestamp)
    .where(audit_chain.c.id == 1)
    .with_for_update()
)
_INSERT = audit_events.insert()
_ADVANCE = audit_chain.update().where(audit_chain.c.id == 1)


def _event_from(values: Mapping[str, Any]) -> AuditEvent:
    fields = {column.name: values[column.name] for column in _COLUMNS}
    fields["metadata"] = fields.pop("event_metadata")
    return AuditEvent(**fields)


def _event(row: Any) -> AuditEvent:
    return _event_from(row._mapping)


class Audit(Repository):
    """``store.audit`` and ``tx.audit``: a hash-chained, append-only log of who did what.

    Each event links to its predecessor's hash and the chain's head is kept apart, so an
    altered, inserted or deleted event is found by :meth:`verify`; a purge moves the
    chain's anchor, so what remains stays verifiable.
    """

    @writes()
    def record(
        self,
        conn: Connection,
        action: str,
        actor: str,
        outcome: str,
        project_id: uuid.UUID | str | None = None,
        token_id: uuid.UUID | str | None = None,
        request_id: str | None = None,
        client_ip: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> AuditEvent:
        """Append an event (``outcome``: success, failure or denied) at the chain's head."""
        values = _event_values(
            action, actor, outcome, project_id, token_id, request_id, client_ip, metadata
        )
        return _append(conn, values)

    @reads()
    def get(self, conn: Connection, event_id: uuid.UUID | str) -> AuditEvent:
        """The event with this id; NotFoundError if there is none."""
        key = check_id(event_id, "event id")
        row = found(conn, _SELECT.where(audit_events.c.id == key), "audit event", key)
        return _event(row)

    @reads(single=False)
    def list(
        self,
        conn: Connection,
        action: str | None = None,
        actor: str | None = None,
        project_id: uuid.UUID | str | None = None,
        outcome: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        limit: int = 100,
        after: uuid.UUID | str | None = None,
    ) -> builtins.list[AuditEvent]:
        """Events newest first; pass the last id of a page as ``after`` for the next."""
        statement = _SELECT.order_by(audit_events.c.seq.desc()).limit(check_limit(limit))
        if action is not None:
            statement = statement.where(
                audit_events.c.action == check_text(action, "action", max_length=100)
            )
        if actor is not None:
            statement = statement.where(
                audit_events.c.actor == check_text(actor, "actor", max_length=200)
            )
        if project_id is not None:
            statement = statement.where(
                audit_events.c.project_id == check_id(project_id, "project id")
            )
        if outcome is not None:
            statement = statement.where(audit_events.c.outcome == _check_outcome(outcome))
        statement = in_period(statement, audit_events.c.timestamp, since, until)
        if after is not None:
            key = check_id(after, "after")
            seq = conn.execute(
                sa.select(audit_events.c.seq).where(audit_events.c.id == key)
            ).scalar()
            if seq is None:
                raise NotFoundError(f"after: no audit event with id {key}")
            statement = statement.where(audit_events.c.seq < seq)
        return [_event(row) for row in conn.execute(statement)]

    @writes()
    def purge(self, conn: Connection, older_than: dt.datetime, actor: str | None = None) -> int:
        """Delete events older than ``older_than``; with ``actor``, audit the purge itself."""
        cutoff = check_aware(older_than, "older_than")
        if actor is not None:
            actor = check_text(actor, "actor", max_length=200)
        deleted = _purge(conn, cutoff)
        if actor is not None:
            record_event(
                conn,
                "audit.purge",
                actor,
                "success",
                metadata={"deleted": deleted, "older_than": cutoff.isoformat()},
            )
        return deleted

    # One snapshot, so that appends and purges meanwhile cannot look like tampering.
    @reads(single=False, snapshot=True)
    def verify(self, conn: Connection) -> AuditVerification:
        """Recompute the chain from its anchor; reports the first altered or missing event."""
        return _verify(conn)


def record_event(
    conn: Connection,
    action: str,
    actor: str,
    outcome: str,
    *,
    project_id: uuid.UUID | None = None,
    token_id: uuid.UUID | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> AuditEvent:
    """Append one event to the chain on ``conn``, inside the unit of the change it audits."""
    values = _event_values(action, actor, outcome, project_id, token_id, None, None, metadata)
    return _append(conn, values)


def _event_values(
    action: object,
    actor: object,
    outcome: object,
    project_id: object,
    token_id: object,
    request_id: object,
    client_ip: object,
    metadata: object,
) -> dict[str, Any]:
    """An event's columns, each checked (ValidationError before anything is written)."""
    return {
        "action": check_text(action, "action", max_length=100),
        "actor": check_text(actor, "actor", max_length=200),
        "outcome": _check_outcome(outcome),
        "project_id": check_optional_id(project_id, "project id"),
        "token_id": check_optional_id(token_id, "token id"),
        "request_id": _optional_text(request_id, "request_id", 200),
        "client_ip": _check_ip(client_ip),
        "event_metadata": check_json_mapping(metadata, "metadata"),
    }


def _append(conn: Connection, values: dict[str, Any]) -> AuditEvent:
    """Append checked ``values`` at the head of the chain (locks the head until commit)."""
    head = conn.execute(_HEAD_FOR_UPDATE).one()
    # Taken under the lock, so time order and chain order agree (purge relies on it).
    now = utcnow()
    if head.head_timestamp is not None and now < head.head_timestamp:
        now = head.head_timestamp
    values = {**values, "id": new_id(), "seq": head.head_seq + 1, "timestamp": now}
    values["prev_hash"] = head.head_hash
    values["hash"] = event_hash(values)
    conn.execute(_INSERT, values)
    conn.execute(
        _ADVANCE,
        {"head_seq": values["seq"], "head_hash": values["hash"], "head_timestamp": now},
    )
    return _event_from(values)


def _purge(conn: Connection, older_than: dt.datetime) -> int:
    """Delete the events before ``older_than``; the rest stays verifiable. Returns how many."""
    cutoff = check_aware(older_than, "older_than")
    head = conn.execute(_HEAD_FOR_UPDATE).one()
    first_kept = conn.execute(
        sa.select(audit_events.c.seq, audit_events.c.prev_hash)
        .where(audit_events.c.timestamp >= cutoff)
        .order_by(audit_events.c.seq)
        .limit(1)
    ).first()
    if first_kept is None:
        anchor_seq, anchor_hash = head.head_seq, head.head_hash
    else:
        anchor_seq, anchor_hash = first_kept.seq - 1, first_kept.prev_hash
    deleted = conn.execute(audit_events.delete().where(audit_events.c.seq <= anchor_seq)).rowcount
    if deleted:
        conn.execute(
            _ADVANCE,
            {"anchor_seq": anchor_seq, "anchor_hash": anchor_hash, "purged_at": utcnow()},
        )
    return int(deleted)


def _verify(conn: Connection) -> AuditVerification:
    chain = conn.execute(sa.select(audit_chain).where(audit_chain.c.id == 1)).one()
    expected_seq = chain.anchor_seq + 1
    expected_prev = chain.anchor_hash
    checked = 0

    def failed(row: Any, reason: Any, message: str) -> AuditVerification:
        return AuditVerification(
            ok=False,
            events_checked=checked,
            anchor_seq=chain.anchor_seq,
            head_seq=chain.head_seq,
            failed_event_id=None if row is None else row.id,
            failed_seq=expected_seq if row is None else row.seq,
            reason=reason,
            message=message,
        )

    last_seq = chain.anchor_seq
    last_row = None
    while True:
        rows = conn.execute(
            _SELECT.where(audit_events.c.seq > last_seq, audit_events.c.seq <= chain.head_seq)
            .order_by(audit_events.c.seq)
            .limit(_VERIFY_BATCH)
        ).all()
        for row in rows:
            if row.seq != expected_seq:
                return failed(
                    row, "events_missing", f"events {expected_seq} to {row.seq - 1} are missing"
                )
            if row.prev_hash != expected_prev:
                return failed(
                    row, "link_broken", f"event {row.seq} does not link to its predecessor"
                )
            if event_hash(dict(row._mapping)) != row.hash:
                return failed(row, "content_altered", f"event {row.seq} was altered")
            expected_prev = row.hash
            expected_seq += 1
            checked += 1
            last_row = row
        if len(rows) < _VERIFY_BATCH:
            break
        last_seq = rows[-1].seq
    if expected_seq != chain.head_seq + 1:
        return failed(
            None,
            "events_missing",
            f"the chain ends at event {expected_seq - 1}, its head is {chain.head_seq}",
        )
    if expected_prev != chain.head_hash:
        # The newest event has no successor to link to it: the head records its hash.
        return failed(
            last_row,
            "content_altered",
            f"event {expected_seq - 1} was rewritten: it does not match the chain head",
        )
    return AuditVerification(
        ok=True, events_checked=checked, anchor_seq=chain.anchor_seq, head_seq=chain.head_seq
    )
