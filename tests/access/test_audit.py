"""The tamper-evident audit log (``store.audit``) on every driver, and ``audit verify``."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import types
import uuid
from collections.abc import Mapping
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Connection

from llmstore import (
    Audit,
    AuditEvent,
    AuditVerification,
    ConflictError,
    NotFoundError,
    Store,
    StoreConfig,
    ValidationError,
)
from llmstore._access.audit import event_hash
from llmstore._cli.main import EXIT_OK, EXIT_TAMPERED, main
from llmstore._core.validate import JSON_MAX_BYTES as METADATA_MAX_BYTES
from llmstore._db.schema import audit_chain, audit_events
from llmstore.migrations._commands import upgrade
from llmstore.pytest_plugin import run_sql
from tests.helpers import count_rows

GENESIS = "0" * 64
UTC_PLUS_5 = dt.timezone(dt.timedelta(hours=5))


# --- helpers -------------------------------------------------------------------------


async def _chain_row(store: Store) -> Any:
    return await run_sql(
        store, lambda conn: conn.execute(sa.select(audit_chain).where(audit_chain.c.id == 1)).one()
    )


async def _record_n(store: Store, n: int, **fields: Any) -> list[AuditEvent]:
    events = []
    for i in range(n):
        events.append(
            await store.audit.record(
                fields.get("action", f"test.action{i % 3}"),
                fields.get("actor", f"actor-{i % 2}"),
                fields.get("outcome", "success"),
                metadata=fields.get("metadata", {"i": i}),
            )
        )
    return events


async def _tamper(store: Store, seq: int, **values: Any) -> None:
    """Change one event's columns directly, leaving its hash as it was."""
    count = await run_sql(
        store,
        lambda conn: (
            conn.execute(
                sa.update(audit_events).where(audit_events.c.seq == seq).values(**values)
            ).rowcount
        ),
        write=True,
    )
    assert count == 1


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


async def _delete(store: Store, *seqs: int) -> None:
    count = await run_sql(
        store,
        lambda conn: (
            conn.execute(sa.delete(audit_events).where(audit_events.c.seq.in_(seqs))).rowcount
        ),
        write=True,
    )
    assert count == len(seqs)


def _assert_chained(events: list[AuditEvent], first_prev: str = GENESIS) -> None:
    assert events[0].prev_hash == first_prev
    for before, after in itertools.pairwise(events):
        assert after.seq == before.seq + 1
        assert after.prev_hash == before.hash
        assert after.timestamp >= before.timestamp


# --- record, get ---------------------------------------------------------------------


async def test_record_returns_chained_events(store: Store) -> None:
    before = dt.datetime.now(dt.UTC)
    events = await _record_n(store, 4)
    assert [event.seq for event in events] == [1, 2, 3, 4]
    _assert_chained(events)
    assert len({event.hash for event in events}) == 4
    assert len({event.id for event in events}) == 4
    for event in events:
        assert isinstance(event, AuditEvent)
        assert len(event.hash) == 64 and int(event.hash, 16) >= 0
        assert event.timestamp.utcoffset() == dt.timedelta(0)
        assert before - dt.timedelta(seconds=5) <= event.timestamp <= dt.datetime.now(dt.UTC)
        assert await store.audit.get(event.id) == event
        assert await store.audit.get(str(event.id)) == event
    with pytest.raises(Exception, match="frozen"):
        events[0].actor = "mallory"  # type: ignore[misc]


async def test_record_with_every_field_round_trips(store: Store) -> None:
    project_id, token_id = uuid.uuid4(), uuid.uuid4()
    event = await store.audit.record(
        "token.use",
        "proxy ☃",
        "denied",
        project_id=str(project_id),
        token_id=token_id,
        request_id="req-123",
        client_ip="2001:DB8::1",
        metadata={"reason": "expired"},
    )
    assert event.action == "token.use"
    assert event.actor == "proxy ☃"
    assert event.outcome == "denied"
    assert event.project_id == project_id
    assert event.token_id == token_id
    assert event.request_id == "req-123"
    assert event.client_ip == "2001:db8::1"
    assert event.metadata == {"reason": "expired"}
    assert await store.audit.get(event.id) == event
    assert await store.audit.list() == [event]
    assert (await store.audit.verify()).ok


async def test_optional_fields_default_to_none(store: Store) -> None:
    event = await store.audit.record("a", "b", "failure")
    stored = await store.audit.get(event.id)
    assert stored == event
    assert (stored.project_id, stored.token_id, stored.request_id) == (None, None, None)
    assert (stored.client_ip, stored.metadata) == (None, None)


CLIENT_IPS: list[tuple[str, set[str]]] = [
    ("::FFFF:1.2.3.4", {"::ffff:1.2.3.4", "::ffff:102:304"}),
    (" 10.0.0.1 ", {"10.0.0.1"}),
    ("2001:0DB8:0000:0000:0000:0000:0000:0001", {"2001:db8::1"}),
    ("\t192.168.1.1\n", {"192.168.1.1"}),
]


async def test_client_ip_is_normalised(store: Store) -> None:
    for given_ip, expected in CLIENT_IPS:
        event = await store.audit.record("login", "alice", "success", client_ip=given_ip)
        assert event.client_ip in expected, given_ip
        assert (await store.audit.get(event.id)).client_ip == event.client_ip
    assert (await store.audit.verify()).ok


METADATA_CASES: list[tuple[Mapping[str, Any], Any]] = [
    ({}, {}),
    (
        {"nested": {"list": [1, [2, [3, {"deep": None}]]], "dict": {"a": {"b": {"c": True}}}}},
        {"nested": {"list": [1, [2, [3, {"deep": None}]]], "dict": {"a": {"b": {"c": True}}}}},
    ),
    (
        {"unicode ☃": "ünïcødé 日本語 🎉", "quote\"'\\": "\t\n"},
        {"unicode ☃": "ünïcødé 日本語 🎉", "quote\"'\\": "\t\n"},
    ),
    (
        {"ints": [0, -1, 2**53 + 1, -(2**63), 2**63 - 1, 2**70]},
        {"ints": [0, -1, 2**53 + 1, -(2**63), 2**63 - 1, 2**70]},
    ),
    (
        {"floats": [0.1, -2.5, 1e300, 5e-324, 1.7976931348623157e308, -0.0, 3.0]},
        {"floats": [0.1, -2.5, 1e300, 5e-324, 1.7976931348623157e308, -0.0, 3.0]},
    ),
    ({"tuple": (1, "two", (3,))}, {"tuple": [1, "two", [3]]}),
    (
        {"bools": [True, False], "none": None, "empty": ""},
        {"bools": [True, False], "none": None, "empty": ""},
    ),
]


async def test_metadata_round_trips(store: Store) -> None:
    recorded = []
    for metadata, expected in METADATA_CASES:
        event = await store.audit.record("meta", "alice", "success", metadata=metadata)
        assert event.metadata == expected
        recorded.append((event, expected))
    for event, expected in recorded:
        stored = await store.audit.get(event.id)
        assert stored.metadata == expected
        assert json.dumps(stored.metadata, sort_keys=True) == json.dumps(expected, sort_keys=True)
        assert stored.hash == event.hash
    report = await store.audit.verify()
    assert report.ok and report.events_checked == len(METADATA_CASES)


async def test_metadata_at_the_size_limit_is_accepted(store: Store) -> None:
    overhead = len(json.dumps({"a": ""}))
    fits = {"a": "x" * (METADATA_MAX_BYTES - overhead)}
    event = await store.audit.record("big", "alice", "success", metadata=fits)
    assert (await store.audit.get(event.id)).metadata == fits
    assert (await store.audit.verify()).ok


async def test_get_unknown_or_malformed_id(store: Store) -> None:
    await _record_n(store, 1)
    with pytest.raises(NotFoundError):
        await store.audit.get(uuid.uuid4())
    for bad in ("not-a-uuid", 42, None):
        with pytest.raises(ValidationError, match="event id"):
            await store.audit.get(bad)  # type: ignore[arg-type]


# --- validation: refused before anything is written ---------------------------------


class _NotJson:
    pass


VALID: dict[str, Any] = {"action": "ok.action", "actor": "alice", "outcome": "success"}
INVALID_RECORDS: list[tuple[dict[str, Any], str]] = [
    ({"outcome": "ok"}, "outcome"),
    ({"outcome": "SUCCESS"}, "outcome"),
    ({"outcome": None}, "outcome"),
    ({"action": ""}, "action"),
    ({"action": "   "}, "action"),
    ({"action": "a" * 101}, "action"),
    ({"action": 7}, "action"),
    ({"action": "tab\there"}, "action"),
    ({"actor": ""}, "actor"),
    ({"actor": "a" * 201}, "actor"),
    ({"actor": None}, "actor"),
    ({"client_ip": "not-an-ip"}, "client_ip"),
    ({"client_ip": "1.2.3.256"}, "client_ip"),
    ({"client_ip": ""}, "client_ip"),
    ({"client_ip": "10.0.0.1/24"}, "client_ip"),
    ({"client_ip": 167772161}, "client_ip"),
    ({"project_id": "nope"}, "project id"),
    ({"token_id": 12}, "token id"),
    ({"request_id": "r" * 201}, "request_id"),
    ({"metadata": [("a", 1)]}, "mapping"),
    ({"metadata": "a string"}, "mapping"),
    ({"metadata": {1: "int key"}}, "mapping"),
    ({"metadata": {("t",): "tuple key"}}, "mapping"),
    ({"metadata": {"a": float("nan")}}, "JSON"),
    ({"metadata": {"a": [1, float("inf")]}}, "JSON"),
    ({"metadata": {"a": _NotJson()}}, "JSON"),
    ({"metadata": {"a": {1, 2}}}, "JSON"),
    ({"metadata": {"a": b"bytes"}}, "JSON"),
    ({"metadata": {"a": "x" * (METADATA_MAX_BYTES - len(json.dumps({"a": ""})) + 1)}}, "larger"),
    ({"metadata": {"a": "é" * (METADATA_MAX_BYTES // 2)}}, "larger"),
]


async def test_invalid_records_are_refused_and_write_nothing(store: Store) -> None:
    first = await store.audit.record(**VALID)
    for change, message in INVALID_RECORDS:
        with pytest.raises(ValidationError, match=message):
            await store.audit.record(**{**VALID, **change})
    assert await count_rows(store, audit_events) == 1
    assert (await _chain_row(store)).head_seq == 1
    after = await store.audit.record(**VALID)
    assert after.seq == 2
    assert after.prev_hash == first.hash
    assert (await store.audit.verify()).ok


async def test_nested_non_string_keys_are_refused_or_kept_verifiable(store: Store) -> None:
    """A nested int key would be silently turned into a string by JSON: refuse or keep it."""
    metadata = {"a": {2: "int key deep down"}}
    try:
        event = await store.audit.record("x", "y", "success", metadata=metadata)
    except ValidationError:
        assert await count_rows(store, audit_events) == 0
    else:
        # Accepted: then what is returned and stored must be what verify() recomputes.
        assert (await store.audit.get(event.id)).metadata == event.metadata
        assert (await store.audit.verify()).ok


async def test_lone_surrogates_are_validation_errors(store: Store) -> None:
    """A string that is not valid Unicode cannot be hashed or stored: expect ValidationError."""
    raised: dict[str, str] = {}
    for field, value in [
        ("metadata", {"a": "\ud800"}),
        ("actor", "bad \udcff actor"),
        ("action", "x\ud83dy"),
        ("request_id", "\udc80"),
    ]:
        try:
            await store.audit.record(**{**VALID, field: value})
        except Exception as exc:  # the type of the error is what is checked
            raised[field] = type(exc).__name__
        else:
            raised[field] = "nothing"
    assert raised == dict.fromkeys(raised, "ValidationError")
    assert await count_rows(store, audit_events) == 0


async def test_metadata_may_be_any_mapping(store: Store) -> None:
    """``metadata`` is typed ``Mapping[str, Any]``: a read-only mapping should be accepted."""
    event = await store.audit.record("x", "y", "success", metadata=types.MappingProxyType({"a": 1}))
    assert event.metadata == {"a": 1}
    assert (await store.audit.verify()).ok


async def test_audit_has_no_update_or_delete(store: Store) -> None:
    assert isinstance(store.audit, Audit)
    for name in ("update", "delete", "remove", "edit"):
        assert not hasattr(store.audit, name)
        assert not hasattr(Audit, name)
    async with store.transaction() as tx:
        assert not hasattr(tx.audit, "update")
        assert not hasattr(tx.audit, "delete")


# --- list ----------------------------------------------------------------------------


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


# --- verify --------------------------------------------------------------------------


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


# --- purge ---------------------------------------------------------------------------


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


# --- audited mutations ---------------------------------------------------------------


async def test_project_create_with_actor_writes_an_event(store: Store) -> None:
    project = await store.projects.create("acme", actor="alice")
    (event,) = await store.audit.list()
    assert event.action == "project.create"
    assert event.actor == "alice"
    assert event.outcome == "success"
    assert event.project_id == project.id
    assert event.seq == 1
    assert await store.audit.list(project_id=project.id) == [event]
    assert (await store.audit.verify()).ok


async def test_every_project_mutation_is_audited(store: Store) -> None:
    project = await store.projects.create("acme", actor="alice")
    await store.projects.update(project.id, name="acme-2", actor="bob")
    await store.projects.deactivate(project.id, actor="carol")
    await store.projects.activate(project.id, actor="dave")
    await store.projects.delete(project.id, actor="erin")
    events = (await store.audit.list())[::-1]
    assert [(e.action, e.actor) for e in events] == [
        ("project.create", "alice"),
        ("project.update", "bob"),
        ("project.deactivate", "carol"),
        ("project.activate", "dave"),
        ("project.delete", "erin"),
    ]
    assert all(e.project_id == project.id and e.outcome == "success" for e in events)
    report = await store.audit.verify()
    assert report.ok and report.events_checked == 5


async def test_mutations_without_actor_are_not_audited(store: Store) -> None:
    project = await store.projects.create("quiet")
    await store.projects.update(project.id, name="quieter")
    await store.projects.delete(project.id)
    assert await count_rows(store, audit_events) == 0


async def test_failed_mutations_write_no_event(store: Store) -> None:
    await store.projects.create("taken", actor="alice")
    with pytest.raises(ConflictError):
        await store.projects.create("taken", actor="bob")
    with pytest.raises(NotFoundError):
        await store.projects.delete(uuid.uuid4(), actor="bob")
    with pytest.raises(ValidationError):
        await store.projects.create("fresh", actor="")
    assert [p.name for p in await store.projects.list()] == ["taken"]
    assert [e.actor for e in await store.audit.list()] == ["alice"]
    report = await store.audit.verify()
    assert report.ok and report.head_seq == 1


async def test_rolled_back_transaction_leaves_neither_project_nor_event(store: Store) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        async with store.transaction() as tx:
            project = await tx.projects.create("doomed", actor="alice")
            await tx.audit.record("extra", "alice", "success", project_id=project.id)
            assert len(await tx.audit.list()) == 2
            raise RuntimeError("boom")
    with pytest.raises(NotFoundError):
        await store.projects.get(project.id)
    assert await store.projects.list() == []
    assert await store.audit.list() == []
    assert await count_rows(store, audit_events) == 0
    report = await store.audit.verify()
    assert report.ok and report.head_seq == 0
    event = await store.audit.record("after", "alice", "success")
    assert event.seq == 1 and event.prev_hash == GENESIS
    assert (await store.audit.verify()).ok


async def test_committed_transaction_keeps_project_and_events_together(store: Store) -> None:
    async with store.transaction() as tx:
        project = await tx.projects.create("kept", actor="alice")
        note = await tx.audit.record("note", "alice", "success", project_id=project.id)
    assert (await store.projects.get(project.id)).name == "kept"
    listed = await store.audit.list(project_id=project.id)
    assert [e.action for e in listed] == ["note", "project.create"]
    assert listed[0] == note
    assert (await store.audit.verify()).ok


# --- command line --------------------------------------------------------------------


async def _seed(config: StoreConfig, n: int) -> list[AuditEvent]:
    async with Store(config) as store:
        return await _record_n(store, n)


async def _tamper_config(config: StoreConfig, seq: int, **values: Any) -> None:
    async with Store(config) as store:
        await _tamper(store, seq, **values)


async def _delete_config(config: StoreConfig, seq: int) -> None:
    async with Store(config) as store:
        await _delete(store, seq)


def test_cli_audit_verify(schema_env: StoreConfig, capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(upgrade(schema_env))
    args = ["audit", "verify", "--url", schema_env.url.get_secret_value()]
    assert main(args) == EXIT_OK
    assert "intact" in capsys.readouterr().out

    events = asyncio.run(_seed(schema_env, 3))
    assert main(args) == EXIT_OK
    out = capsys.readouterr()
    assert "intact" in out.out and "3 event" in out.out
    assert out.err == ""

    asyncio.run(_tamper_config(schema_env, 2, actor="mallory"))
    assert main(args) == EXIT_TAMPERED
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.count("\n") == 1
    assert "event 2" in out.err
    assert str(events[1].id) in out.err
    assert "content_altered" in out.err


def test_cli_audit_verify_detects_a_missing_tail(
    schema_env: StoreConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(upgrade(schema_env))
    asyncio.run(_seed(schema_env, 3))
    asyncio.run(_delete_config(schema_env, 3))
    assert main(["audit", "verify", "--url", schema_env.url.get_secret_value()]) == EXIT_TAMPERED
    out = capsys.readouterr()
    assert out.err.count("\n") == 1
    assert "event 3" in out.err and "events_missing" in out.err
