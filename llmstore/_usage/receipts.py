"""Signed receipts: a usage row stated as canonical JSON and signed with Ed25519.

A receipt can be checked by anyone holding it and the operator's public key, without the
database: ``payload`` is the exact signed text (RFC 8785 with exact integers, see
``_jcs``), and it names its own receipt id, time, format version and public key besides
every field of the row::

    {"issued_at": "...", "public_key": "...", "receipt_id": "...",
     "usage": {"cost": 1500, "created_at": "...", "id": 42, ...},
     "version": "llmstore-receipt/1"}

Keys are 32 raw bytes written as unpadded base64url (43 characters). The private key is
held only as a ``cryptography`` key object; only the public key and signatures are stored.
One usage row has at most one receipt (a unique index): issuing again returns it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import pydantic
import sqlalchemy as sa
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, SecretStr
from sqlalchemy.engine import Connection

from llmstore._core.errors import ConfigError, NotFoundError, ValidationError
from llmstore._core.ids import new_id, utcnow
from llmstore._core.jcs import CanonicalJSONError, canonical_json, parse_strict, timestamp
from llmstore._core.signing import (
    ENV_VARIABLE,
    KEY_SIZE,
    decode,
    encode,
    load_signing_key,
    public_key_text,
)
from llmstore._db.dialects import insert_ignoring_conflicts
from llmstore._db.schema import usage_receipts

if TYPE_CHECKING:
    from .records import UsageLog

R = usage_receipts
VERSION = "llmstore-receipt/1"
_SIGNATURE_SIZE = 64


class Receipt(BaseModel):
    """A signed statement of one usage row.

    ``payload`` is the exact text that was signed: keep it byte for byte. ``signature``
    and ``public_key`` are unpadded base64url. ``id``, ``usage_id``, ``public_key`` and
    ``issued_at`` repeat what the payload states; :func:`verify_receipt` checks that they
    agree. Store or send it as ``receipt.model_dump_json()``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: uuid.UUID
    usage_id: int
    payload: str
    signature: str
    public_key: str
    issued_at: pydantic.AwareDatetime

    @property
    def statement(self) -> dict[str, Any]:
        """The payload parsed: ``version``, ``receipt_id``, ``issued_at``, ``public_key``
        and ``usage`` (the row, with times as RFC 3339 strings and UUIDs as strings).
        Verify the receipt before trusting it."""
        parsed: dict[str, Any] = json.loads(self.payload)
        return parsed


class ReceiptSigner:
    """Signs receipts with the configured key; without one, refuses with ConfigError."""

    def __init__(self, key: SecretStr | None) -> None:
        raw = None if key is None else key.get_secret_value()
        self._key = load_signing_key(raw) if raw and raw.strip() else None
        self.public_key = None if self._key is None else public_key_text(self._key.public_key())

    def __repr__(self) -> str:
        return f"ReceiptSigner(public_key={self.public_key!r})"

    def require(self) -> ReceiptSigner:
        """This signer, or ConfigError if it has no key (checked before any I/O)."""
        self._keys()
        return self

    def _keys(self) -> tuple[Ed25519PrivateKey, str]:
        if self._key is None or self.public_key is None:
            raise ConfigError(
                f"no receipt signing key: set {ENV_VARIABLE} (make one with "
                "`python -m llmstore receipts generate-key`)"
            )
        return self._key, self.public_key

    def receipt(self, log: UsageLog) -> Receipt:
        key, public_key = self._keys()
        receipt_id = new_id()
        issued_at = utcnow()
        try:
            payload = canonical_json(
                {
                    "version": VERSION,
                    "receipt_id": receipt_id,
                    "issued_at": issued_at,
                    "public_key": public_key,
                    "usage": log.model_dump(),
                }
            )
        except CanonicalJSONError as exc:
            raise ValidationError(f"usage row {log.id} has no canonical JSON form: {exc}") from None
        return Receipt(
            id=receipt_id,
            usage_id=log.id,
            payload=payload,
            signature=encode(key.sign(payload.encode("utf-8"))),
            public_key=public_key,
            issued_at=issued_at,
        )


def configured_public_key(environ: Mapping[str, str]) -> str:
    """The public key of the signing key in ``environ``; ConfigError if there is none."""
    raw = environ.get(ENV_VARIABLE)
    signer = ReceiptSigner(None if raw is None else SecretStr(raw)).require()
    assert signer.public_key is not None
    return signer.public_key


_COLUMNS = (R.c.id, R.c.usage_id, R.c.payload, R.c.signature, R.c.public_key, R.c.issued_at)


def _receipt_from_row(row: Any) -> Receipt:
    return Receipt.model_construct(**row._mapping)


def receipt_by_id(conn: Connection, receipt_id: uuid.UUID) -> Receipt | None:
    """The stored receipt with this id, or None."""
    row = conn.execute(sa.select(*_COLUMNS).where(R.c.id == receipt_id)).first()
    return None if row is None else _receipt_from_row(row)


def _for_usage(conn: Connection, usage_id: int) -> Receipt | None:
    row = conn.execute(sa.select(*_COLUMNS).where(R.c.usage_id == usage_id)).first()
    return None if row is None else _receipt_from_row(row)


def issue_receipt(
    conn: Connection,
    usage_id: int,
    signer: ReceiptSigner,
    load: Callable[[Connection, int], UsageLog | None],
) -> Receipt:
    """The row's receipt: the one already issued, or a new one signed and stored."""
    existing = _for_usage(conn, usage_id)
    if existing is not None:
        return existing
    log = load(conn, usage_id)
    if log is None:
        raise NotFoundError(f"no usage row with id {usage_id}")
    receipt = signer.receipt(log)
    if insert_ignoring_conflicts(conn, R, receipt.model_dump(), [R.c.usage_id]):
        return receipt
    # A concurrent call issued one first; the unique index kept ours out.
    existing = _for_usage(conn, usage_id)
    if existing is None:
        raise AssertionError(f"the receipt of usage row {usage_id} vanished")
    return existing


# --- verification: no database, no configuration ------------------------------------------


def verify_receipt(
    receipt: Receipt | Mapping[str, Any] | str | bytes,
    public_key: str | bytes | Ed25519PublicKey,
) -> bool:
    """True only if ``receipt`` is intact and was signed by ``public_key``.

    ``receipt`` is a :class:`Receipt`, its ``model_dump()`` mapping or its JSON text.
    ``public_key`` is the unpadded base64url text (as ``receipts public-key`` prints it),
    the 32 raw bytes, or a ``cryptography`` ``Ed25519PublicKey``.

    Returns False, never raises, for any receipt that is altered, malformed or signed by
    another key. Raises ValidationError only when an argument is of an unusable type or
    the public key is not an Ed25519 public key.
    """
    key = _public_key(public_key)
    parsed = _parsed(receipt)
    return parsed is not None and _intact(parsed, key)


def _public_key(value: object) -> Ed25519PublicKey:
    if isinstance(value, Ed25519PublicKey):
        return value
    if isinstance(value, str):
        raw = decode(value.strip().rstrip("="), KEY_SIZE)
    elif isinstance(value, bytes | bytearray):
        raw = bytes(value) if len(value) == KEY_SIZE else None
    else:
        raise ValidationError(
            "public_key must be base64url text, 32 bytes or an Ed25519PublicKey, "
            f"not {type(value).__name__}"
        )
    if raw is None:
        raise ValidationError(
            "public_key is not an Ed25519 public key (32 bytes, or 43 base64url characters)"
        )
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise ValidationError("public_key is not an Ed25519 public key") from None


def _parsed(receipt: object) -> Receipt | None:
    if isinstance(receipt, Receipt):
        return receipt
    if not isinstance(receipt, Mapping | str | bytes | bytearray):
        raise ValidationError(
            f"receipt must be a Receipt, a mapping or JSON text, not {type(receipt).__name__}"
        )
    try:
        if isinstance(receipt, Mapping):
            # A plain copy first: a mapping that cannot even be read is no receipt.
            try:
                fields = dict(receipt.items())
            except Exception:
                return None
            return Receipt.model_validate(fields)
        return Receipt.model_validate_json(receipt)
    except (pydantic.ValidationError, ValueError):
        return None


def _intact(receipt: Receipt, key: Ed25519PublicKey) -> bool:
    signature = decode(receipt.signature, _SIGNATURE_SIZE)
    if signature is None:
        return False
    try:
        payload = receipt.payload.encode("utf-8")
        key.verify(signature, payload)
        statement = parse_strict(receipt.payload)
        # Only the one canonical spelling counts: what was signed must be what it states.
        if canonical_json(statement) != receipt.payload or not isinstance(statement, dict):
            return False
        usage = statement.get("usage")
        usage_id = usage.get("id") if isinstance(usage, dict) else None
        return (
            statement.get("version") == VERSION
            and statement.get("public_key") == public_key_text(key) == receipt.public_key
            and statement.get("receipt_id") == str(receipt.id)
            and statement.get("issued_at") == timestamp(receipt.issued_at)
            and type(usage_id) is int
            and usage_id == receipt.usage_id
        )
    except (InvalidSignature, ValueError, RecursionError, TypeError, AttributeError):
        return False
