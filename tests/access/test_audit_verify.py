"""The audit log (``store.audit``): verify() detects altered, rewritten and deleted
events, on every driver."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Connection

from llmstore import AuditVerification, Store
from llmstore._access.audit import event_hash
from llmstore._db.schema import audit_events
from llmstore.pytest_plugin import run_sql
from tests.access.audit_support import _delete, _record_n, _tamper


async def _rehash(store: Store, seq: int, **values: Any) -> str:
    """Change one event's columns and store the hash of its new content."""

    def rewrite(conn: Connection) -> str:
        row = conn.execute(sa.select(audit_events).where(audit_events.c.seq == seq)).one()
        new_hash = event_hash({**row._mapping, **values})
        assert new_hash != row.hash
        conn.execute(
            sa.update(audit_events).where(audit_events.c.seq == seq).values(**values, hash=new_hash)
        )
        return new_hash

    return await run_sql(store, rewrite, write=True)


async def test_verify_intact_chain(store: Store) -> None:
    empty = await store.audit.verify()
    assert empty == AuditVerification(ok=True, events_checked=0, anchor_seq=0, head_seq=0)
    await _record_n(store, 5)
    report = await store.audit.verify()
    assert report.ok
    assert (report.events_checked, report.anchor_seq, report.head_seq) == (5, 0, 5)
    assert report.reason is None and report.failed_seq is None and report.failed_event_id is None


async def test_altered_content_is_detected(store: Store) -> None:
    events = await _record_n(store, 5)
    target = events[2]
    columns = ["actor", "action", "outcome", "event_metadata", "timestamp", "client_ip"]
    columns += ["project_id", "request_id", "hash"]
    original = await run_sql(
        store,
        lambda conn: dict(
            conn.execute(sa.select(audit_events).where(audit_events.c.seq == target.seq))
            .one()
            ._mapping
        ),
    )
    forged: dict[str, Any] = {
        "actor": "mallory",
        "action": "nothing.happened",
        "outcome": "failure",
        "event_metadata": {"i": 999},
        "timestamp": target.timestamp + dt.timedelta(seconds=1),
        "client_ip": "10.6.6.6",
        "project_id": uuid.uuid4(),
        "request_id": "forged",
        "hash": "f" * 64,
    }
    for column in columns:
        await _tamper(store, target.seq, **{column: forged[column]})
        report = await store.audit.verify()
        assert not report.ok, column
        assert report.reason == "content_altered", column
        assert report.failed_seq == target.seq
        assert report.failed_event_id == target.id
        assert report.events_checked == 2
        assert report.head_seq == 5
        assert str(target.seq) in report.message
        # Putting the original value back makes the chain verify again.
        await _tamper(store, target.seq, **{column: original[column]})
        assert (await store.audit.verify()).ok, column


async def test_rewritten_event_with_recomputed_hash_breaks_the_next_link(store: Store) -> None:
    events = await _record_n(store, 5)
    await _rehash(store, 2, actor="mallory", event_metadata={"forged": True})
    report = await store.audit.verify()
    assert not report.ok
    assert report.reason == "link_broken"
    assert report.failed_seq == 3
    assert report.failed_event_id == events[2].id
    assert report.events_checked == 2


async def test_rewritten_last_event_with_recomputed_hash_is_detected(store: Store) -> None:
    events = await _record_n(store, 4)
    await _rehash(store, 4, actor="mallory")
    report = await store.audit.verify()
    assert not report.ok
    assert report.reason is not None
    # The event that no longer matches the chain head is the last one, seq 4.
    assert report.failed_seq == 4, report
    assert report.failed_event_id == events[3].id, report


async def test_deleted_middle_event_is_detected(store: Store) -> None:
    events = await _record_n(store, 5)
    await _delete(store, 3)
    report = await store.audit.verify()
    assert not report.ok
    assert report.reason == "events_missing"
    assert report.events_checked == 2
    # Detected at the first event after the gap, whose message names the missing one.
    assert report.failed_seq == 4
    assert report.failed_event_id == events[3].id
    assert "3" in report.message


async def test_deleted_first_event_without_a_purge_is_detected(store: Store) -> None:
    events = await _record_n(store, 3)
    await _delete(store, 1)
    report = await store.audit.verify()
    assert not report.ok
    assert report.reason == "events_missing"
    assert report.failed_event_id == events[1].id
    assert report.events_checked == 0


@pytest.mark.parametrize("deleted", [(5,), (4, 5), (1, 2, 3, 4, 5)])
async def test_deleted_last_events_are_detected(store: Store, deleted: tuple[int, ...]) -> None:
    await _record_n(store, 5)
    await _delete(store, *deleted)
    report = await store.audit.verify()
    assert not report.ok
    assert report.reason == "events_missing"
    assert report.head_seq == 5
    assert report.events_checked == 5 - len(deleted)
    assert report.failed_seq == min(deleted)
    assert report.failed_event_id is None


async def test_verify_crosses_batches(store: Store) -> None:
    """More events than verify() reads in one batch (1000): tampering beyond it is found."""

    async with store.transaction() as tx:
        events = [await tx.audit.record("bulk", "loader", "success") for _ in range(1203)]
    report = await store.audit.verify()
    assert report.ok and report.events_checked == 1203
    assert [e.seq for e in await store.audit.list(limit=3)] == [1203, 1202, 1201]
    await _tamper(store, 1101, actor="mallory")
    report = await store.audit.verify()
    assert (report.reason, report.failed_seq, report.events_checked) == (
        "content_altered",
        1101,
        1100,
    )
    assert report.failed_event_id == events[1100].id


# JSON text either driver stores: no NUL (Postgres refuses it), no lone surrogates.
JSON_TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=5)


@settings(max_examples=15, deadline=None)
@given(
    data=st.data(),
    count=st.integers(min_value=2, max_value=8),
    kind=st.sampled_from(["content", "rehash", "delete"]),
)
async def test_verify_reports_the_tampered_event(
    data: st.DataObject, count: int, kind: str
) -> None:
    async with Store.from_url("sqlite:///:memory:") as store:
        events = [
            await store.audit.record(
                data.draw(st.sampled_from(["a.b", "c.d"])),
                data.draw(
                    st.text(
                        # Printable: record() refuses control characters (DEL and C1 too).
                        st.characters(min_codepoint=32, max_codepoint=0x2FFF).filter(
                            lambda char: not "\x7f" <= char <= "\x9f"
                        ),
                        min_size=1,
                        max_size=10,
                    ).filter(str.strip)
                ),
                data.draw(st.sampled_from(["success", "failure", "denied"])),
                metadata=data.draw(
                    st.none() | st.dictionaries(JSON_TEXT, st.integers() | JSON_TEXT, max_size=3)
                ),
            )
            for _ in range(count)
        ]
        assert (await store.audit.verify()).ok
        last = count - 1 if kind == "rehash" else count
        index = data.draw(st.integers(min_value=0, max_value=last - 1))
        target = events[index]
        expected: tuple[str, int, uuid.UUID | None, int]
        if kind == "content":
            await _tamper(store, target.seq, actor=target.actor + "!")
            expected = ("content_altered", target.seq, target.id, index)
        elif kind == "rehash":
            await _rehash(store, target.seq, actor=target.actor + "!")
            following = events[index + 1]
            expected = ("link_broken", following.seq, following.id, index + 1)
        elif index == count - 1:
            await _delete(store, target.seq)
            expected = ("events_missing", target.seq, None, index)
        else:
            await _delete(store, target.seq)
            following = events[index + 1]
            expected = ("events_missing", following.seq, following.id, index)
        report = await store.audit.verify()
        assert not report.ok
        assert (
            report.reason,
            report.failed_seq,
            report.failed_event_id,
            report.events_checked,
        ) == expected
