"""The audit log (``store.audit``): purge, and verifying after it, on every driver."""

from __future__ import annotations

import datetime as dt

import pytest

from llmstore import NotFoundError, Store, ValidationError
from llmstore._db.schema import audit_events
from tests.access.audit_support import (
    UTC_PLUS_5,
    _assert_chained,
    _chain_row,
    _delete,
    _record_n,
    _tamper,
)
from tests.helpers import count_rows


async def test_purge_deletes_exactly_the_older_events(store: Store) -> None:
    events = await _record_n(store, 6)
    cutoff = events[3].timestamp
    older = [e for e in events if e.timestamp < cutoff]
    kept = [e for e in events if e.timestamp >= cutoff]
    assert len(older) >= 1 and events[3] in kept

    assert await store.audit.purge(cutoff) == len(older)
    assert await store.audit.list() == kept[::-1]
    assert await count_rows(store, audit_events) == len(kept)
    for event in older:
        with pytest.raises(NotFoundError):
            await store.audit.get(event.id)
    report = await store.audit.verify()
    assert report.ok
    assert report.anchor_seq == older[-1].seq
    assert report.events_checked == len(kept)
    assert report.head_seq == 6

    more = await _record_n(store, 2)
    assert [e.seq for e in more] == [7, 8]
    _assert_chained(more, first_prev=events[-1].hash)
    report = await store.audit.verify()
    assert report.ok and report.events_checked == len(kept) + 2 and report.head_seq == 8


async def test_purge_of_everything_keeps_the_chain_going(store: Store) -> None:
    events = await _record_n(store, 3)
    future = dt.datetime.now(UTC_PLUS_5) + dt.timedelta(minutes=1)
    assert await store.audit.purge(future) == 3
    assert await store.audit.list() == []
    report = await store.audit.verify()
    assert report.ok
    assert (report.events_checked, report.anchor_seq, report.head_seq) == (0, 3, 3)
    chain = await _chain_row(store)
    assert chain.anchor_hash == events[-1].hash
    assert chain.purged_at is not None

    nxt = await store.audit.record("after", "alice", "success")
    assert nxt.seq == 4 and nxt.prev_hash == events[-1].hash
    report = await store.audit.verify()
    assert report.ok and report.events_checked == 1


async def test_purge_with_nothing_old_returns_zero(store: Store) -> None:
    long_ago = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    assert await store.audit.purge(long_ago) == 0
    events = await _record_n(store, 3)
    assert await store.audit.purge(long_ago) == 0
    assert await store.audit.purge(events[0].timestamp) == 0
    assert await store.audit.list() == events[::-1]
    report = await store.audit.verify()
    assert report.ok and report.anchor_seq == 0 and report.events_checked == 3
    assert (await _chain_row(store)).purged_at is None


async def test_purge_with_actor_records_the_purge(store: Store) -> None:
    events = await _record_n(store, 4)
    cutoff = events[2].timestamp
    deleted = await store.audit.purge(cutoff, actor="ops")
    assert deleted == len([e for e in events if e.timestamp < cutoff])
    (purge_event,) = await store.audit.list(action="audit.purge")
    assert purge_event.seq == 5
    assert purge_event.actor == "ops"
    assert purge_event.outcome == "success"
    assert purge_event.prev_hash == events[-1].hash
    assert purge_event.metadata is not None
    assert purge_event.metadata["deleted"] == deleted
    assert dt.datetime.fromisoformat(purge_event.metadata["older_than"]) == cutoff
    report = await store.audit.verify()
    assert report.ok and report.head_seq == 5

    # A purge that deletes nothing is still audited when an actor is given.
    assert await store.audit.purge(dt.datetime(2000, 1, 1, tzinfo=dt.UTC), actor="ops") == 0
    assert len(await store.audit.list(action="audit.purge")) == 2
    assert (await store.audit.verify()).ok


async def test_purge_twice_moves_the_anchor(store: Store) -> None:
    events = await _record_n(store, 6)
    deleted_seqs: list[int] = []
    for cutoff in (events[2].timestamp, events[4].timestamp):
        remaining = await store.audit.list()
        older = [e.seq for e in remaining if e.timestamp < cutoff]
        assert await store.audit.purge(cutoff) == len(older)
        deleted_seqs.extend(older)
        report = await store.audit.verify()
        assert report.ok
        assert report.anchor_seq == max(deleted_seqs)
        assert report.events_checked == 6 - len(deleted_seqs)
    assert sorted(deleted_seqs) == list(range(1, len(deleted_seqs) + 1))
    assert [e.seq for e in await store.audit.list()][-1] == len(deleted_seqs) + 1


async def test_tampering_after_a_purge_is_detected(store: Store) -> None:
    events = await _record_n(store, 6)
    cutoff = events[3].timestamp
    await store.audit.purge(cutoff)
    first_kept = (await store.audit.list())[-1]
    await _tamper(store, first_kept.seq, event_metadata={"forged": 1})
    report = await store.audit.verify()
    assert (report.ok, report.reason, report.failed_seq) == (
        False,
        "content_altered",
        first_kept.seq,
    )
    assert report.failed_event_id == first_kept.id


async def test_deleting_after_a_purge_is_detected(store: Store) -> None:
    events = await _record_n(store, 6)
    await store.audit.purge(events[3].timestamp)
    first_kept = (await store.audit.list())[-1]
    await _delete(store, first_kept.seq)
    report = await store.audit.verify()
    assert not report.ok and report.reason == "events_missing"


async def test_purge_refuses_bad_arguments(store: Store) -> None:
    await _record_n(store, 2)
    with pytest.raises(ValidationError, match="older_than"):
        await store.audit.purge(dt.datetime.now() + dt.timedelta(days=1))
    with pytest.raises(ValidationError, match="older_than"):
        await store.audit.purge("2999-01-01T00:00:00+00:00")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="actor"):
        await store.audit.purge(dt.datetime.now(dt.UTC) + dt.timedelta(days=1), actor="")
    assert await count_rows(store, audit_events) == 2
    report = await store.audit.verify()
    assert report.ok and report.anchor_seq == 0
