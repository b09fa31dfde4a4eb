"""What the billing operations return and take: keys, entries, holds, checked movements."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import uuid
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmstore._core.errors import ValidationError
from llmstore._core.validate import (
    MAX_INT64,
    check_int,
    check_json_mapping,
    check_positive_int,
    check_text,
    check_timedelta,
    plain_text,
)
from llmstore._db.lean import Row
from llmstore._db.schema import LedgerKind, api_keys, ledger_entries, reservations

K = api_keys
L = ledger_entries
R = reservations

API_KEY_PREFIX: Final = "lsk_"
DESCRIPTION_MAX = 500
MAX_TTL = dt.timedelta(days=7)

EntryKind = LedgerKind
ReservationStatus = Literal["active", "settled", "released", "expired"]
CREDITS = frozenset({"deposit", "transfer_in", "withdrawal_refund"})
SPENT = frozenset({"charge", "settlement"})


class ApiKey(BaseModel):
    """A prepaid key as stored: never its secret, only a short display ``prefix``."""

    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    project_id: uuid.UUID | None
    prefix: str
    balance: int
    reserved: int
    total_deposited: int
    total_spent: int
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    expires_at: dt.datetime | None
    metadata: dict[str, Any] | None
    is_active: bool = True
    deactivated_at: dt.datetime | None = None

    @property
    def available(self) -> int:
        """What a charge or a new reservation can take: ``balance - reserved``."""
        return self.balance - self.reserved


class IssuedApiKey(BaseModel):
    """A new key and its secret. The secret is shown here once and never stored."""

    model_config = ConfigDict(frozen=True)

    key: ApiKey
    secret: str = Field(repr=False)


class LedgerEntry(BaseModel):
    """One balance change. ``amount`` is signed: credits positive, debits negative."""

    model_config = ConfigDict(frozen=True)

    id: int
    api_key_id: uuid.UUID
    kind: EntryKind
    amount: int
    balance_after: int
    description: str
    idempotency_key: str | None
    request_data: dict[str, Any] | None
    shortfall: int
    reservation_id: uuid.UUID | None
    withdrawal_id: uuid.UUID | None
    transfer_id: uuid.UUID | None
    created_at: dt.datetime


class Reservation(BaseModel):
    """A hold on part of a key's balance, until it is settled, released or expires."""

    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    api_key_id: uuid.UUID
    amount: int
    status: ReservationStatus
    created_at: dt.datetime
    expires_at: dt.datetime
    settled_amount: int | None
    finished_at: dt.datetime | None


class LedgerMismatch(BaseModel):
    """One disagreement found by :meth:`ApiKeys.verify`."""

    model_config = ConfigDict(frozen=True)

    api_key_id: uuid.UUID
    field: str
    stored: int
    expected: int


class LedgerReport(BaseModel):
    """What :meth:`ApiKeys.verify` found; ``ok`` when there is no mismatch."""

    model_config = ConfigDict(frozen=True)

    ok: bool
    keys_checked: int
    mismatches: list[LedgerMismatch]


KEY_COLUMNS = (
    K.c.id,
    K.c.project_id,
    K.c.prefix,
    K.c.balance,
    K.c.reserved,
    K.c.total_deposited,
    K.c.total_spent,
    K.c.created_at,
    K.c.last_used_at,
    K.c.expires_at,
    K.c.key_metadata,
    K.c.is_active,
    K.c.deactivated_at,
)
ENTRY_COLUMNS = (
    L.c.id,
    L.c.api_key_id,
    L.c.kind,
    L.c.amount,
    L.c.balance_after,
    L.c.description,
    L.c.idempotency_key,
    L.c.request_data,
    L.c.shortfall,
    L.c.reservation_id,
    L.c.withdrawal_id,
    L.c.transfer_id,
    L.c.created_at,
)
RESERVATION_COLUMNS = tuple(R.c)
_KEY_NAMES = tuple(column.name for column in KEY_COLUMNS)
_ENTRY_NAMES = tuple(column.name for column in ENTRY_COLUMNS)
_RESERVATION_NAMES = tuple(column.name for column in RESERVATION_COLUMNS)


def api_key(row: Row) -> ApiKey:
    values = dict(zip(_KEY_NAMES, row, strict=True))
    values["metadata"] = values.pop("key_metadata")
    return ApiKey.model_construct(**values)


def entry(row: Row) -> LedgerEntry:
    return LedgerEntry.model_construct(**dict(zip(_ENTRY_NAMES, row, strict=True)))


def reservation(row: Row) -> Reservation:
    return Reservation.model_construct(**dict(zip(_RESERVATION_NAMES, row, strict=True)))


def check_amount(value: object, what: str = "amount") -> int:
    return check_positive_int(value, what)


def check_actual(value: object) -> int:
    """A settlement's actual cost: zero (nothing was used) or more."""
    return check_int(value, "actual_amount", minimum=0, maximum=MAX_INT64)


def check_balance(value: object) -> int:
    return check_int(value, "balance", minimum=0, maximum=MAX_INT64)


def check_description(value: object) -> str:
    text = plain_text(value, "description")
    return text if text == "" else check_text(text, "description", max_length=DESCRIPTION_MAX)


def check_idempotency_key(value: object) -> str | None:
    return None if value is None else check_text(value, "idempotency_key", max_length=200)


def check_ttl(value: object) -> dt.timedelta:
    ttl = check_timedelta(value, "ttl") if isinstance(value, dt.timedelta) else None
    if ttl is None or not dt.timedelta(0) < ttl <= MAX_TTL:
        raise ValidationError(f"ttl must be a timedelta above zero and at most {MAX_TTL}")
    return ttl


@dataclasses.dataclass(frozen=True)
class Movement:
    """A checked balance change, ready to be written: ``amount`` is positive."""

    key_id: uuid.UUID
    kind: EntryKind
    amount: int
    description: str = ""
    idempotency_key: str | None = None
    request_data: dict[str, Any] | None = None
    reservation_id: uuid.UUID | None = None
    withdrawal_id: uuid.UUID | None = None
    transfer_id: uuid.UUID | None = None
    shortfall: int = 0
    params_digest: str | None = None

    @property
    def signed_amount(self) -> int:
        return self.amount if self.kind in CREDITS else -self.amount

    def params(self, now: dt.datetime) -> dict[str, Any]:
        """The bound parameters of the balance change and, in one statement, its entry."""
        return {
            "key_id": self.key_id,
            "amount": self.amount,
            "now": now,
            "idempotency_key": self.idempotency_key,
            "description": self.description,
            "params_digest": self.params_digest,
            "request_data": self.request_data,
        }


def params_digest(*parts: object) -> str:
    """What identifies an idempotent call's parameters."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def movement(
    key_id: uuid.UUID,
    kind: EntryKind,
    amount: object,
    *,
    description: object = "",
    idempotency_key: object = None,
    request_data: object = None,
    extra: tuple[object, ...] = (),
) -> Movement:
    """A checked movement; with an idempotency key, the digest of its parameters."""
    checked_amount = check_amount(amount)
    checked_description = check_description(description)
    checked_key = check_idempotency_key(idempotency_key)
    checked_data = check_json_mapping(request_data, "request_data")
    digest = None
    if checked_key is not None:
        digest = params_digest(
            kind, str(key_id), checked_amount, checked_description, checked_data, *extra
        )
    return Movement(
        key_id=key_id,
        kind=kind,
        amount=checked_amount,
        description=checked_description,
        idempotency_key=checked_key,
        request_data=checked_data,
        params_digest=digest,
    )
