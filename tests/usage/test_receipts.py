"""Signed usage receipts on every driver; canonical JSON against RFC 8785's examples; the
signing key's configuration, CLI and secrecy."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import struct
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from llmstore import (
    ConfigError,
    ConflictError,
    NotFoundError,
    Receipt,
    Store,
    StoreConfig,
    UsageLog,
    UsageRecord,
    ValidationError,
    verify_receipt,
)
from llmstore._cli.main import EXIT_OK, EXIT_USAGE, main
from llmstore._core.jcs import CanonicalJSONError, canonical_json, number, parse_strict
from llmstore._core.signing import encode, generate_signing_key
from llmstore._db.schema import metadata, usage_logs, usage_receipts
from llmstore._usage.receipts import VERSION, ReceiptSigner, configured_public_key
from llmstore.pytest_plugin import run_sql
from tests.helpers import run_llmstore

KEY_VARIABLE = "LLMSTORE_RECEIPT_SIGNING_KEY"
MAX = 2**63 - 1


# --- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def signing_key() -> str:
    return generate_signing_key()


@pytest.fixture
def public_key(signing_key: str) -> str:
    return configured_public_key({KEY_VARIABLE: signing_key})


@pytest.fixture
async def signed(store: Store, signing_key: str) -> AsyncIterator[Store]:
    """A second store on the ``store`` fixture's database, holding a signing key.

    On sqlite-memory it is a database of its own (memory is not shared between stores).
    """
    config = StoreConfig.model_validate({**dict(store.config), "receipt_signing_key": signing_key})
    async with Store(config) as other:
        yield other


def _private_forms(signing_key: str) -> dict[str, bytes]:
    """Every spelling of the private key that must never be stored or shown."""
    seed = base64.urlsafe_b64decode(signing_key + "=")
    return {
        "base64url": signing_key.encode(),
        "base64": base64.b64encode(seed).rstrip(b"="),
        "hex": seed.hex().encode(),
        "HEX": seed.hex().upper().encode(),
        "raw": seed,
    }


def _full_record(**overrides: Any) -> UsageRecord:
    values: dict[str, Any] = {
        "created_at": dt.datetime(2026, 11, 22, 10, 0, 0, 123456, tzinfo=dt.UTC),
        "api_key_id": uuid.UUID("0195f0e4-9c2a-7d3e-8b1f-2a3b4c5d6e7f"),
        "project_id": uuid.uuid4(),
        "token_id": uuid.uuid4(),
        "request_id": f"req-{uuid.uuid4()}",
        "alias": "fast",
        "profile": "default",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "origin": "https://app.example.com",
        "is_streaming": True,
        "success": False,
        "status_code": 502,
        "response_time_ms": 1234,
        "time_to_first_token_ms": 56,
        "time_to_last_token_ms": 1200,
        "tokens_per_second": 42.5,
        "prompt_tokens": 2**53 + 1,
        "completion_tokens": 7,
        "cached_tokens": 3,
        "cost": MAX,
        "finish_reason": "length",
        "max_tokens": 4096,
        "temperature": 0.1,
        "top_p": 1.0,
        "message_count": 3,
        "error_type": "upstream",
        "error_message": 'bad "gateway"\n\u20ac \U0001f600 \x01',
        "metadata": {"z": [1, 2.5, None, True], "a": {"\u00f6": "x", "1": 1e21}},
    }
    values.update(overrides)
    return UsageRecord(**values)


async def _record(store: Store, **overrides: Any) -> int:
    result = await store.usage.record(_full_record(**overrides))
    usage_id = result.ids[0]
    assert usage_id is not None
    return usage_id


async def _receipt_rows(store: Store) -> list[Any]:
    rows: list[Any] = await run_sql(
        store, lambda conn: list(conn.execute(sa.select(usage_receipts)))
    )
    return rows


async def _every_row_as_text(store: Store) -> str:
    def dump(conn: sa.Connection) -> str:
        lines: list[str] = []
        for table in metadata.sorted_tables:
            lines.extend(f"{table.name}: {tuple(row)}" for row in conn.execute(sa.select(table)))
        return "\n".join(lines)

    text: str = await run_sql(store, dump)
    return text


def _resigned(receipt: Receipt, signing_key: str, payload: str) -> Receipt:
    """``receipt`` with another payload, validly signed by the same key."""
    key = Ed25519PrivateKey.from_private_bytes(base64.urlsafe_b64decode(signing_key + "="))
    return receipt.model_copy(
        update={"payload": payload, "signature": encode(key.sign(payload.encode()))}
    )


# --- issue, get, verify --------------------------------------------------------------------


async def test_issue_get_verify_round_trip(
    signed: Store, signing_key: str, public_key: str
) -> None:
    usage_id = await _record(signed)
    before = dt.datetime.now(dt.UTC)
    receipt = await signed.usage.issue_receipt(usage_id)
    assert before <= receipt.issued_at <= dt.datetime.now(dt.UTC)
    assert receipt.usage_id == usage_id
    assert receipt.public_key == public_key
    assert len(base64.urlsafe_b64decode(receipt.signature + "==")) == 64

    statement = receipt.statement
    assert statement["version"] == VERSION == "llmstore-receipt/1"
    assert statement["receipt_id"] == str(receipt.id)
    assert statement["public_key"] == public_key
    assert statement["issued_at"] == receipt.issued_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    usage = statement["usage"]
    assert set(usage) == set(UsageLog.model_fields)
    row = await signed.usage.get(usage_id)
    assert row is not None
    assert usage["id"] == usage_id
    assert usage["cost"] == MAX  # integers stay exact beyond 2**53
    assert usage["prompt_tokens"] == 2**53 + 1
    assert usage["created_at"] == "2026-11-22T10:00:00.123456Z"
    assert usage["api_key_id"] == "0195f0e4-9c2a-7d3e-8b1f-2a3b4c5d6e7f"
    assert usage["tokens_per_second"] == 42.5
    assert usage["top_p"] == 1  # the canonical form of 1.0
    assert usage["error_message"] == row.error_message
    assert usage["metadata"] == row.metadata
    assert usage["success"] is False
    assert usage["alias"] == "fast"
    assert '"cost":9223372036854775807,' in receipt.payload
    assert '"top_p":1,' in receipt.payload
    assert receipt.payload == canonical_json(statement)

    key_forms: list[Any] = [
        public_key,
        base64.urlsafe_b64decode(public_key + "="),
        Ed25519PrivateKey.from_private_bytes(
            base64.urlsafe_b64decode(signing_key + "=")
        ).public_key(),
    ]
    receipt_forms: list[Any] = [
        receipt,
        receipt.model_dump(),
        receipt.model_dump(mode="json"),
        receipt.model_dump_json(),
        receipt.model_dump_json(indent=2).encode(),
    ]
    for key in key_forms:
        for form in receipt_forms:
            assert verify_receipt(form, key) is True
    assert Receipt.model_validate_json(receipt.model_dump_json()) == receipt

    assert await signed.usage.get_receipt(receipt.id) == receipt
    assert await signed.usage.get_receipt(str(receipt.id)) == receipt
    assert await signed.usage.get_receipt(uuid.uuid4()) is None
    rows = await _receipt_rows(signed)
    assert len(rows) == 1
    assert rows[0].payload == receipt.payload
    assert rows[0].signature == receipt.signature


async def test_a_receipt_can_be_issued_inside_a_transaction(signed: Store, public_key: str) -> None:
    async with signed.transaction() as tx:
        result = await tx.usage.record(_full_record())
        assert result.ids[0] is not None
        receipt = await tx.usage.issue_receipt(result.ids[0])
        assert await tx.usage.get_receipt(receipt.id) == receipt
    assert await signed.usage.get_receipt(receipt.id) == receipt
    assert verify_receipt(receipt, public_key)


async def test_a_rolled_back_transaction_keeps_no_receipt(signed: Store) -> None:
    usage_id = await _record(signed)
    with pytest.raises(RuntimeError, match="undo"):
        async with signed.transaction() as tx:
            receipt = await tx.usage.issue_receipt(usage_id)
            raise RuntimeError("undo")
    assert await signed.usage.get_receipt(receipt.id) is None
    assert await _receipt_rows(signed) == []


async def test_issuing_again_returns_the_first_receipt(signed: Store) -> None:
    usage_id = await _record(signed)
    first = await signed.usage.issue_receipt(usage_id)
    assert await signed.usage.issue_receipt(usage_id) == first
    other = await signed.usage.issue_receipt(await _record(signed))
    assert other.id != first.id
    assert len(await _receipt_rows(signed)) == 2


async def test_concurrent_issues_for_one_row_store_one_receipt(signed: Store) -> None:
    usage_id = await _record(signed)
    receipts = await asyncio.gather(*(signed.usage.issue_receipt(usage_id) for _ in range(8)))
    assert len({receipt.id for receipt in receipts}) == 1
    assert len(await _receipt_rows(signed)) == 1


async def test_the_database_refuses_a_second_receipt_for_a_row(signed: Store) -> None:
    receipt = await signed.usage.issue_receipt(await _record(signed))
    duplicate = {**receipt.model_dump(), "id": uuid.uuid4()}
    with pytest.raises(ConflictError):
        await run_sql(
            signed,
            lambda conn: conn.execute(sa.insert(usage_receipts).values(duplicate)),
            write=True,
        )


async def test_an_unknown_row_is_not_found_and_nothing_is_written(signed: Store) -> None:
    with pytest.raises(NotFoundError, match="no usage row with id 987654"):
        await signed.usage.issue_receipt(987654)
    assert await _receipt_rows(signed) == []


@pytest.mark.parametrize("bad", [0, -1, 2**63, True, "1", 1.0, None])
async def test_a_bad_usage_id_is_refused(signed: Store, bad: Any) -> None:
    with pytest.raises(ValidationError, match="usage id"):
        await signed.usage.issue_receipt(bad)


@pytest.mark.parametrize("bad", ["nope", 5, None, b"x"])
async def test_a_bad_receipt_id_is_refused(signed: Store, bad: Any) -> None:
    with pytest.raises(ValidationError, match="receipt id"):
        await signed.usage.get_receipt(bad)


async def test_issuing_needs_a_signing_key_but_reading_does_not(
    store: Store, signed: Store, public_key: str
) -> None:
    assert store.config.receipt_signing_key is None
    usage_id = await _record(store)
    with pytest.raises(ConfigError, match=KEY_VARIABLE):
        await store.usage.issue_receipt(usage_id)
    with pytest.raises(ConfigError, match=KEY_VARIABLE):
        await store.usage.issue_receipt(987654)  # the key is checked before the row
    assert await _receipt_rows(store) == []
    if store.config.is_memory:
        return  # the signing store has a database of its own
    receipt = await signed.usage.issue_receipt(usage_id)
    assert await store.usage.get_receipt(receipt.id) == receipt
    assert verify_receipt(receipt, public_key)


async def test_a_receipt_outlives_its_usage_row(signed: Store, public_key: str) -> None:
    usage_id = await _record(signed)
    receipt = await signed.usage.issue_receipt(usage_id)
    await run_sql(
        signed,
        lambda conn: conn.execute(sa.delete(usage_logs).where(usage_logs.c.id == usage_id)),
        write=True,
    )
    assert await signed.usage.get(usage_id) is None
    stored = await signed.usage.get_receipt(receipt.id)
    assert stored == receipt
    assert verify_receipt(stored, public_key)
    assert stored.statement["usage"]["cost"] == MAX
    # What was issued stays issued: asking again returns it, not NotFoundError.
    assert await signed.usage.issue_receipt(usage_id) == receipt


async def test_a_rotated_key_does_not_reissue(
    db_config: StoreConfig, signing_key: str, public_key: str
) -> None:
    def keyed(key: str) -> StoreConfig:
        return StoreConfig.model_validate({**dict(db_config), "receipt_signing_key": key})

    async with Store(keyed(signing_key), auto_upgrade=True) as before:
        usage_id = await _record(before)
        first = await before.usage.issue_receipt(usage_id)
    async with Store(keyed(generate_signing_key())) as later:
        again = await later.usage.issue_receipt(usage_id)
        fresh = await later.usage.issue_receipt(await _record(later))
    assert again == first
    assert verify_receipt(again, public_key)
    assert fresh.public_key != public_key
    assert verify_receipt(fresh, fresh.public_key)
    assert not verify_receipt(fresh, public_key)


# --- tampering -----------------------------------------------------------------------------


async def test_one_changed_byte_in_payload_or_signature_fails(
    signed: Store, public_key: str
) -> None:
    receipt = await signed.usage.issue_receipt(await _record(signed))
    assert verify_receipt(receipt, public_key)
    payload = receipt.payload.encode("utf-8")
    signature = receipt.signature.encode("ascii")

    @settings(max_examples=150, deadline=None, database=None)
    @given(
        field=st.sampled_from(["payload", "signature"]),
        where=st.floats(min_value=0, max_value=1, exclude_max=True),
        value=st.integers(min_value=0, max_value=255),
    )
    def changed_byte_fails(field: str, where: float, value: int) -> None:
        original = payload if field == "payload" else signature
        position = int(where * len(original))
        if original[position] == value:
            value = (value + 1) % 256
        changed = original[:position] + bytes([value]) + original[position + 1 :]
        text = changed.decode("utf-8", errors="surrogateescape")
        as_dict = {**receipt.model_dump(mode="json"), field: text}
        assert verify_receipt(as_dict, public_key) is False
        assert verify_receipt(receipt.model_copy(update={field: text}), public_key) is False

    changed_byte_fails()
    # The edges explicitly: the first and last byte of each.
    for field, original in (("payload", receipt.payload), ("signature", receipt.signature)):
        for position in (0, len(original) - 1):
            for char in "A_-=0 ~\u00e9":
                if original[position] != char:
                    text = original[:position] + char + original[position + 1 :]
                    tampered = receipt.model_copy(update={field: text})
                    assert verify_receipt(tampered, public_key) is False, (field, position, char)


async def test_every_other_spelling_of_the_last_signature_character_fails(
    signed: Store, public_key: str
) -> None:
    # 64 bytes use 86 base64url characters, the last with 4 unused bits: a lenient decoder
    # reads 16 spellings of it as the same signature.
    receipt = await signed.usage.issue_receipt(await _record(signed))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+/"
    for char in alphabet:
        if char != receipt.signature[-1]:
            tampered = receipt.model_copy(update={"signature": receipt.signature[:-1] + char})
            assert verify_receipt(tampered, public_key) is False, char
    for suffix in ("=", "==", " ", "\n"):
        padded = receipt.model_copy(update={"signature": receipt.signature + suffix})
        assert verify_receipt(padded, public_key) is False


async def test_the_envelope_must_agree_with_the_payload(signed: Store, public_key: str) -> None:
    receipt = await signed.usage.issue_receipt(await _record(signed))
    for change in (
        {"usage_id": receipt.usage_id + 1},
        {"id": uuid.uuid4()},
        {"issued_at": receipt.issued_at + dt.timedelta(microseconds=1)},
        {"public_key": configured_public_key({KEY_VARIABLE: generate_signing_key()})},
    ):
        assert verify_receipt(receipt.model_copy(update=change), public_key) is False, change


async def test_a_wrong_public_key_fails(signed: Store, public_key: str) -> None:
    receipt = await signed.usage.issue_receipt(await _record(signed))
    other = configured_public_key({KEY_VARIABLE: generate_signing_key()})
    assert verify_receipt(receipt, other) is False
    assert verify_receipt(receipt, base64.urlsafe_b64decode(other + "=")) is False
    # Even with the envelope's public key swapped to match: the payload names the signer.
    swapped = receipt.model_copy(update={"public_key": other})
    assert verify_receipt(swapped, other) is False


async def test_a_validly_signed_but_non_canonical_payload_fails(
    signed: Store, signing_key: str, public_key: str
) -> None:
    receipt = await signed.usage.issue_receipt(await _record(signed))
    statement = receipt.statement
    # Each is signed by the right key, yet is not the canonical text of what it states.
    spaced = json.dumps(statement, sort_keys=True)
    unsorted = json.dumps(dict(reversed(list(statement.items()))), separators=(",", ":"))
    ascii_only = canonical_json(statement).replace("\u20ac", "\\u20ac")
    one_point_zero = receipt.payload.replace('"top_p":1,', '"top_p":1.0,')
    duplicated = receipt.payload[:-1] + ',"version":"llmstore-receipt/1"}'
    for payload in (spaced, unsorted, ascii_only, one_point_zero, duplicated):
        assert payload != receipt.payload
        assert verify_receipt(_resigned(receipt, signing_key, payload), public_key) is False
    # Canonical and signed, but claiming another format version or another signer.
    for key, value in (("version", "llmstore-receipt/2"), ("public_key", "A" * 43)):
        payload = canonical_json({**statement, key: value})
        assert verify_receipt(_resigned(receipt, signing_key, payload), public_key) is False
    # The control: re-signing the canonical payload itself verifies.
    assert verify_receipt(_resigned(receipt, signing_key, receipt.payload), public_key)


@pytest.mark.parametrize(
    "form",
    [
        "",
        "not json",
        "{}",
        "[]",
        '{"id": "x"}',
        b"\xff\xfe",
        {"payload": "{}"},
        {
            "id": "nope",
            "usage_id": 1,
            "payload": "",
            "signature": "",
            "public_key": "",
            "issued_at": 1,
        },
    ],
)
def test_malformed_receipts_are_false_not_errors(form: Any) -> None:
    key = configured_public_key({KEY_VARIABLE: generate_signing_key()})
    assert verify_receipt(form, key) is False


def test_unusable_arguments_raise_validation_error() -> None:
    key = configured_public_key({KEY_VARIABLE: generate_signing_key()})
    for receipt in (None, 42, ["a"], object()):
        with pytest.raises(ValidationError, match="receipt must be"):
            verify_receipt(receipt, key)  # type: ignore[arg-type]
    for bad_key in (None, 42, "", "short", key + "A", key[:-1] + "!", b"\x00" * 31, key.encode()):
        with pytest.raises(ValidationError, match="public_key"):
            verify_receipt("{}", bad_key)  # type: ignore[arg-type]
    # The key's padded form is the same key.
    assert verify_receipt("{}", key + "=") is False


# --- canonical JSON (RFC 8785) -------------------------------------------------------------

# RFC 8785, Appendix B: IEEE 754 doubles (as hex) and their canonical text.
APPENDIX_B = [
    ("0000000000000000", "0"),
    ("8000000000000000", "0"),
    ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"),
    ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"),
    ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"),
    ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"),
    ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"),
    ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
    ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"),
    ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"),
    ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"),
    ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]


@pytest.mark.parametrize(("bits", "expected"), APPENDIX_B)
def test_rfc8785_appendix_b_numbers(bits: str, expected: str) -> None:
    value = struct.unpack(">d", bytes.fromhex(bits))[0]
    assert number(value) == expected
    assert canonical_json([value]) == f"[{expected}]"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.1, "0.1"),
        (1.0, "1"),
        (1e21, "1e+21"),
        (1e20, "100000000000000000000"),
        (-1.5, "-1.5"),
        (1e-6, "0.000001"),
        (1e-7, "1e-7"),
        (1.5e-7, "1.5e-7"),
        (123.456e30, "1.23456e+32"),
    ],
)
def test_ecmascript_number_forms(value: float, expected: str) -> None:
    assert number(value) == expected


@pytest.mark.parametrize("bits", ["7fffffffffffffff", "7ff0000000000000", "fff0000000000000"])
def test_nan_and_infinity_have_no_canonical_form(bits: str) -> None:
    with pytest.raises(CanonicalJSONError):
        canonical_json({"x": struct.unpack(">d", bytes.fromhex(bits))[0]})


def test_rfc8785_section_3_2_2_example() -> None:
    text = (
        '{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],'
        r' "string": "\u20ac$\u000F\u000aA' + "'" + r'\u0042\u0022\u005c\\\"\/",'
        ' "literals": [null, true, false]}'
    )
    expected = (
        '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
        '"string":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    )
    assert canonical_json(parse_strict(text)) == expected


def test_rfc8785_section_3_2_3_sorting_example() -> None:
    value = {
        "\u20ac": "Euro Sign",
        "\r": "Carriage Return",
        "\ufb33": "Hebrew Letter Dalet With Dagesh",
        "1": "One",
        "\U0001f600": "Emoji: Grinning Face",
        "\u0080": "Control",
        "\u00f6": "Latin Small Letter O With Diaeresis",
    }
    expected_order = ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]
    assert list(json.loads(canonical_json(value))) == expected_order
    assert canonical_json(value).startswith('{"\\r":"Carriage Return","1":"One","\u0080":')


def test_object_keys_sort_by_utf16_code_units_not_code_points() -> None:
    # U+10000 is D800 DC00 in UTF-16, so it sorts before U+E000 (code points say after).
    assert canonical_json({"\ue000": 1, "\U00010000": 2}) == '{"\U00010000":2,"\ue000":1}'


def test_string_escapes() -> None:
    assert canonical_json("\b\t\n\f\r") == '"\\b\\t\\n\\f\\r"'
    assert canonical_json("\x00\x1f\x7f") == '"\\u0000\\u001f\x7f"'
    assert canonical_json('"\\/') == '"\\"\\\\/"'
    assert canonical_json("\u2028\u00e9\U0001f600") == '"\u2028\u00e9\U0001f600"'
    for bad in ("\ud800", {"\udc00": 1}):
        with pytest.raises(CanonicalJSONError, match="surrogate"):
            canonical_json(bad)


def test_row_values_become_json() -> None:
    moment = dt.datetime(2026, 11, 22, 11, 0, 0, 123456, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert canonical_json(moment) == '"2026-11-22T10:00:00.123456Z"'
    assert canonical_json(moment.replace(microsecond=0)) == '"2026-11-22T10:00:00.000000Z"'
    some_id = uuid.UUID("0195F0E4-9C2A-7D3E-8B1F-2A3B4C5D6E7F")
    assert canonical_json(some_id) == '"0195f0e4-9c2a-7d3e-8b1f-2a3b4c5d6e7f"'
    assert canonical_json([MAX, -(2**64), True, None, (1, 2)]) == (
        "[9223372036854775807,-18446744073709551616,true,null,[1,2]]"
    )
    for bad in (dt.datetime(2026, 1, 1), b"bytes", {1: "x"}, {1.5}):
        with pytest.raises(CanonicalJSONError):
            canonical_json(bad)


def test_parse_strict_refuses_what_has_no_canonical_form() -> None:
    with pytest.raises(CanonicalJSONError, match="duplicate"):
        parse_strict('{"a":1,"a":2}')
    for text in ("NaN", "[Infinity]", "-Infinity"):
        with pytest.raises(CanonicalJSONError):
            parse_strict(text)


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(_JSON)
def test_canonical_json_reads_back_and_is_a_fixed_point(value: Any) -> None:
    try:
        text = canonical_json(value)
    except CanonicalJSONError:
        return  # a lone surrogate drawn in some text
    parsed = parse_strict(text)
    assert canonical_json(parsed) == text
    assert _same_json(parsed, value)


def _same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values: 1 and 1.0 are one number."""
    if type(a) is int and type(b) is int:
        return a == b
    if type(a) in (int, float) and type(b) in (int, float):
        # A double printed without a fraction (7.179215108220994e16 as 71792151082209940)
        # reads back as a Python int: the same JSON number, and the same double.
        return float(a) == float(b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
        )
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same_json, a, b))
    return bool(a == b) and type(a) is type(b)


# --- configuration -------------------------------------------------------------------------


@pytest.fixture
def _no_key_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_VARIABLE, raising=False)


@pytest.mark.usefixtures("_no_key_in_environment")
def test_config_reads_the_key_from_the_environment(signing_key: str, public_key: str) -> None:
    config = StoreConfig.from_env({"DATABASE_URL": "sqlite://", KEY_VARIABLE: signing_key})
    assert config.receipt_signing_key is not None
    assert config.receipt_signing_key.get_secret_value() == signing_key
    assert ReceiptSigner(config.receipt_signing_key).public_key == public_key
    assert StoreConfig.from_env({"DATABASE_URL": "sqlite://"}).receipt_signing_key is None
    blank = StoreConfig.from_env({"DATABASE_URL": "sqlite://", KEY_VARIABLE: "  "})
    assert blank.receipt_signing_key is None
    assert StoreConfig.from_url("sqlite://").receipt_signing_key is None
    overridden = StoreConfig.from_env(
        {"DATABASE_URL": "sqlite://", KEY_VARIABLE: signing_key}, receipt_signing_key=None
    )
    assert overridden.receipt_signing_key is None


def test_from_url_reads_the_environment_unless_given(
    monkeypatch: pytest.MonkeyPatch, signing_key: str
) -> None:
    monkeypatch.setenv(KEY_VARIABLE, signing_key)
    from_env = StoreConfig.from_url("sqlite://").receipt_signing_key
    assert from_env is not None
    assert from_env.get_secret_value() == signing_key
    assert StoreConfig.from_url("sqlite://", receipt_signing_key=None).receipt_signing_key is None


def test_hex_and_base64url_spell_the_same_key(signing_key: str, public_key: str) -> None:
    seed = base64.urlsafe_b64decode(signing_key + "=")
    for spelling in (seed.hex(), seed.hex().upper(), f"  {signing_key}\n"):
        config = StoreConfig.from_url("sqlite://", receipt_signing_key=spelling)
        assert ReceiptSigner(config.receipt_signing_key).public_key == public_key
    assert configured_public_key({KEY_VARIABLE: seed.hex()}) == public_key


@pytest.mark.parametrize(
    "bad",
    [
        "not-a-key",
        "A" * 42,
        "A" * 44,
        "0" * 63,
        "0" * 66,
        "g" * 64,
        # The 32 bytes in standard base64 ("+" and "/"), and with unused bits set.
        base64.b64encode(b"\xfb" * 32).decode(),
        "A" * 42 + "B",
    ],
)
def test_a_malformed_key_is_a_config_error_that_does_not_quote_it(bad: str) -> None:
    with pytest.raises(ConfigError, match=KEY_VARIABLE) as caught:
        StoreConfig.from_url("sqlite://", receipt_signing_key=bad)
    assert bad not in str(caught.value)
    assert "generate-key" in str(caught.value)
    with pytest.raises(ConfigError, match=KEY_VARIABLE) as caught:
        StoreConfig.from_env({"DATABASE_URL": "sqlite://", KEY_VARIABLE: bad})
    assert bad not in str(caught.value)


def test_the_key_is_masked_wherever_the_config_is_shown(signing_key: str) -> None:
    config = StoreConfig.from_url("sqlite://", receipt_signing_key=signing_key)
    signer = ReceiptSigner(config.receipt_signing_key)
    shown = [repr(config), str(config), config.model_dump_json(), repr(signer), str(signer)]
    shown.append(repr(Store(config)))
    forms = _private_forms(signing_key)
    for text in shown:
        for label, form in forms.items():
            if label != "raw":
                assert form.decode() not in text, (label, text)
    assert "receipt_signing_key=SecretStr('**********')" in repr(config)
    assert signer.public_key is not None
    assert signer.public_key in repr(signer)


# --- secrecy of the private key ------------------------------------------------------------


async def test_the_private_key_is_never_stored_or_shown(
    signed: Store, signing_key: str, tmp_path: Path
) -> None:
    usage_id = await _record(signed)
    receipt = await signed.usage.issue_receipt(usage_id)
    with pytest.raises(NotFoundError) as not_found:
        await signed.usage.issue_receipt(987654)
    shown = [
        await _every_row_as_text(signed),
        repr(receipt),
        receipt.model_dump_json(),
        repr(signed),
        repr(signed.config),
        repr(signed.usage.__dict__),
        str(not_found.value),
    ]
    forms = _private_forms(signing_key)
    for text in shown:
        raw = text.encode("utf-8")
        for label, form in forms.items():
            assert form not in raw, f"the private key ({label}) in {text[:80]!r}"
    # Every byte of the database files, on SQLite: the raw seed must not be there either.
    path = signed.config.sqlite_path
    if path is not None and not signed.config.is_memory:
        for file in Path(path).parent.glob(Path(path).name + "*"):
            data = file.read_bytes()
            for label, form in forms.items():
                assert form not in data, f"the private key ({label}) in {file.name}"
        assert receipt.signature.encode() in Path(path).read_bytes() + b"".join(
            file.read_bytes() for file in Path(path).parent.glob(Path(path).name + "-wal")
        )


# --- command line --------------------------------------------------------------------------


def test_cli_generate_key_prints_a_new_usable_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["receipts", "generate-key"]) == EXIT_OK
    first = capsys.readouterr().out
    assert main(["receipts", "generate-key"]) == EXIT_OK
    second = capsys.readouterr().out
    assert first.endswith("\n")
    assert first.count("\n") == 1
    assert len(first.strip()) == 43
    assert first != second
    config = StoreConfig.from_url("sqlite://", receipt_signing_key=first.strip())
    assert ReceiptSigner(config.receipt_signing_key).public_key is not None


def test_cli_public_key_prints_the_configured_public_key(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    signing_key: str,
    public_key: str,
) -> None:
    monkeypatch.setenv(KEY_VARIABLE, signing_key)
    assert main(["receipts", "public-key"]) == EXIT_OK
    captured = capsys.readouterr()
    assert captured.out == public_key + "\n"
    assert signing_key not in captured.out + captured.err


@pytest.mark.parametrize("value", [None, "", "   ", "not-a-key"])
def test_cli_public_key_without_a_usable_key_exits_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv(KEY_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(KEY_VARIABLE, value)
    assert main(["receipts", "public-key"]) == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("llmstore: error:")
    assert captured.err.count("\n") == 1
    assert KEY_VARIABLE in captured.err
    if value and value.strip():
        assert value not in captured.err


def test_cli_receipts_in_a_real_process(signing_key: str, public_key: str) -> None:
    shown = run_llmstore("receipts", "public-key", env={KEY_VARIABLE: signing_key})
    assert shown.returncode == EXIT_OK, shown.stderr
    assert shown.stdout == public_key + "\n"
    missing = run_llmstore("receipts", "public-key", env={KEY_VARIABLE: ""})
    assert missing.returncode == EXIT_USAGE
    assert missing.stdout == ""
    assert missing.stderr.count("\n") == 1
    assert "Traceback" not in missing.stderr
    generated = run_llmstore("receipts", "generate-key")
    assert generated.returncode == EXIT_OK
    assert configured_public_key({KEY_VARIABLE: generated.stdout})
    usage = run_llmstore("receipts")
    assert usage.returncode == EXIT_USAGE
