"""The audit log (``store.audit``): record and get, and what is refused before anything is
written, on every driver."""

from __future__ import annotations

import datetime as dt
import json
import types
import uuid
from collections.abc import Mapping
from typing import Any

import pytest

from llmstore import Audit, AuditEvent, NotFoundError, Store, ValidationError
from llmstore._core.validate import JSON_MAX_BYTES as METADATA_MAX_BYTES
from llmstore._db.schema import audit_events
from tests.access.audit_support import _assert_chained, _chain_row, _record_n
from tests.helpers import count_rows

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
