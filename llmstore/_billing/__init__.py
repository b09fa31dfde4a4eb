"""Billing: prepaid API keys, their ledger, holds and withdrawals."""

from .holds import extend_hold, finish_holds, place_hold, settle_hold
from .keys import ApiKeys, check_api_key_secret, check_usable, find_key
from .money import reservation_values
from .records import (
    API_KEY_PREFIX,
    KEY_COLUMNS,
    ApiKey,
    LedgerEntry,
    Reservation,
    api_key,
    check_ttl,
    params_digest,
)
from .settlement import settle_unheld, settlement_ctes

__all__ = [
    "API_KEY_PREFIX",
    "ApiKey",
    "ApiKeys",
    "KEY_COLUMNS",
    "LedgerEntry",
    "Reservation",
    "api_key",
    "check_api_key_secret",
    "check_usable",
    "check_ttl",
    "extend_hold",
    "find_key",
    "finish_holds",
    "params_digest",
    "place_hold",
    "reservation_values",
    "settle_hold",
    "settle_unheld",
    "settlement_ctes",
]
