"""Signed usage receipts on every driver: issued, read back and verified; once per row,
inside transactions, after the row is gone and after the key is rotated; refused without a
signing key or for a bad id."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from llmstore import (
    ConfigError,
    ConflictError,
    NotFoundError,
    Receipt,
    Store,
    StoreConfig,
    UsageLog,
    ValidationError,
    verify_receipt,
)
from llmstore._core.jcs import canonical_json
from llmstore._core.signing import generate_signing_key
from llmstore._db.schema import usage_logs, usage_receipts
from llmstore._usage.receipts import VERSION
from llmstore.pytest_plugin import run_sql
from tests.usage.receipts_support import KEY_VARIABLE, MAX, _full_record, _receipt_rows, _record

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
