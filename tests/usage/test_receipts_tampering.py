"""Verifying signed usage receipts: any change to a receipt, a wrong key, a validly signed
but non-canonical payload fail; malformed receipts are false, unusable arguments errors."""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmstore import Store, ValidationError, verify_receipt
from llmstore._core.jcs import canonical_json
from llmstore._core.signing import generate_signing_key
from llmstore._usage.receipts import configured_public_key
from tests.usage.receipts_support import KEY_VARIABLE, _record, _resigned

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
