"""The audit log (``store.audit``): list, its filters and pages, on every driver."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmstore import AuditEvent, NotFoundError, Store, ValidationError
from tests.access.audit_support import UTC_PLUS_5, _record_n


async def test_list_is_newest_first_with_limit(store: Store) -> None:
    events = await _record_n(store, 5)
    assert await store.audit.list() == events[::-1]
    assert await store.audit.list(limit=2) == events[::-1][:2]
    assert await store.audit.list(limit=1000) == events[::-1]
    for bad in (0, 1001, -1, True, "5"):
        with pytest.raises(ValidationError, match="limit"):
            await store.audit.list(limit=bad)  # type: ignore[arg-type]


async def test_list_filters(store: Store) -> None:
    acme, other = uuid.uuid4(), uuid.uuid4()
    specs = [
        ("project.create", "alice", "success", acme),
        ("token.use", "proxy", "denied", acme),
        ("project.create", "bob", "success", other),
        ("token.use", "proxy", "success", None),
        ("token.use", "alice", "failure", acme),
        ("project.delete", "bob", "success", other),
    ]
    events = [
        await store.audit.record(action, actor, outcome, project_id=project)
        for action, actor, outcome, project in specs
    ]
    newest_first = events[::-1]

    def expect(keep: Any) -> list[AuditEvent]:
        return [event for event in newest_first if keep(event)]

    assert await store.audit.list(action="token.use") == expect(lambda e: e.action == "token.use")
    assert await store.audit.list(actor="alice") == expect(lambda e: e.actor == "alice")
    assert await store.audit.list(project_id=acme) == expect(lambda e: e.project_id == acme)
    assert await store.audit.list(project_id=str(other)) == expect(lambda e: e.project_id == other)
    assert await store.audit.list(outcome="success") == expect(lambda e: e.outcome == "success")
    assert await store.audit.list(outcome="denied") == [events[1]]
    assert await store.audit.list(action="token.use", actor="alice", project_id=acme) == [events[4]]
    assert await store.audit.list(action="nothing.like.this") == []
    assert await store.audit.list(project_id=uuid.uuid4()) == []

    pivot = events[2].timestamp
    assert await store.audit.list(since=pivot) == expect(lambda e: e.timestamp >= pivot)
    assert await store.audit.list(until=pivot) == expect(lambda e: e.timestamp < pivot)
    assert events[2] in await store.audit.list(since=pivot)
    assert events[2] not in await store.audit.list(until=pivot)
    # The same instant in another time zone selects the same events.
    assert await store.audit.list(since=pivot.astimezone(UTC_PLUS_5)) == await store.audit.list(
        since=pivot
    )
    assert await store.audit.list(since=events[1].timestamp, until=events[4].timestamp) == expect(
        lambda e: events[1].timestamp <= e.timestamp < events[4].timestamp
    )
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    assert await store.audit.list(since=future) == []
    assert await store.audit.list(until=future) == newest_first
    assert await store.audit.list(actor="proxy", limit=1) == [events[3]]


async def test_list_refuses_bad_filters(store: Store) -> None:
    naive = dt.datetime.now()
    with pytest.raises(ValidationError, match="since"):
        await store.audit.list(since=naive)
    with pytest.raises(ValidationError, match="until"):
        await store.audit.list(until=naive)
    with pytest.raises(ValidationError, match="outcome"):
        await store.audit.list(outcome="ok")
    with pytest.raises(ValidationError, match="project id"):
        await store.audit.list(project_id="nope")
    with pytest.raises(ValidationError):
        await store.audit.list(action="")


async def test_list_after_unknown_event_is_not_found(store: Store) -> None:
    await _record_n(store, 2)
    with pytest.raises(NotFoundError):
        await store.audit.list(after=uuid.uuid4())
    with pytest.raises(ValidationError, match="after"):
        await store.audit.list(after="not-a-uuid")


async def test_list_after_combines_with_filters(store: Store) -> None:
    events = await _record_n(store, 9)
    alices = [e for e in events[::-1] if e.actor == "actor-0"]
    page = await store.audit.list(actor="actor-0", limit=2)
    assert page == alices[:2]
    assert await store.audit.list(actor="actor-0", after=page[-1].id) == alices[2:]
    # `after` may name an event the filter excludes: paging resumes below its seq.
    assert await store.audit.list(actor="actor-0", after=events[5].id) == [
        e for e in alices if e.seq < 6
    ]


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(count=st.integers(min_value=0, max_value=9), page=st.integers(min_value=1, max_value=10))
async def test_pages_cover_every_event_once(store: Store, count: int, page: int) -> None:
    await store.audit.purge(dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
    created = await _record_n(store, count)
    seen: list[uuid.UUID] = []
    after: uuid.UUID | None = None
    pages = 0
    while batch := await store.audit.list(limit=page, after=after):
        assert len(batch) <= page
        seen.extend(event.id for event in batch)
        after = batch[-1].id
        pages += 1
    assert seen == [event.id for event in created[::-1]]
    assert pages == -(-count // page)
