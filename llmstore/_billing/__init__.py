"""Billing: prepaid API keys, their ledger, holds and withdrawals."""

from .holds import extend_hold, finish_holds, place_hold, settle_hold
from .keys import ApiKeys, check_api_key_secret, check_usable, find_key
from .money import settle_unheld
from .records import (
    API_KEY_PREFIX,
    ApiKey,
    LedgerEntry,
    Reservation,
    check_ttl,
    params_digest,
)

__all__ = [
    "API_KEY_PREFIX",
    "ApiKey",
    "ApiKeys",
    "LedgerEntry",
    "Reservation",
    "check_api_key_secret",
    "check_usable",
    "check_ttl",
    "extend_hold",
    "find_key",
    "finish_holds",
    "params_digest",
    "place_hold",
    "settle_hold",
    "settle_unheld",
]
