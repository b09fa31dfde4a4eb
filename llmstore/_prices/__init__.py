"""Prices per million tokens and the cost of usage: ``store.prices``."""

from .cost import TOKEN_FIELDS, TokenCounts, broken_convention, check_counts, cost_of
from .lookup import costs_for
from .prices import Prices
from .records import Price, PriceImport, PriceTier

__all__ = [
    "TOKEN_FIELDS",
    "Price",
    "PriceImport",
    "PriceTier",
    "Prices",
    "TokenCounts",
    "broken_convention",
    "check_counts",
    "cost_of",
    "costs_for",
]
