"""What the signed receipts' tests (``test_receipts_*.py``) share: the signing key's
variable, usage rows to issue receipts for, the stored rows, and every spelling of a private
key that must never be stored or shown. Their fixtures (``signing_key``, ``public_key``,
``signed``) are in ``conftest.py``."""

from __future__ import annotations

import base64
import datetime as dt
import uuid
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from llmstore import Receipt, Store, UsageRecord
from llmstore._core.signing import encode
from llmstore._db.schema import metadata, usage_receipts
from llmstore.pytest_plugin import run_sql

KEY_VARIABLE = "LLMSTORE_RECEIPT_SIGNING_KEY"
MAX = 2**63 - 1


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
