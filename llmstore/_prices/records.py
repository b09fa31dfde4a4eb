"""Prices: what ``store.prices`` stores and returns, and the checks of what callers give.

A price is per million tokens, an exact ``Decimal`` in the store's cost unit (the unit of
``UsageRecord.cost`` and of balances: cents, micro-dollars, credits). Floats are refused:
0.1 is not one tenth in binary, and cost errors are what users of other proxies reported
most. Stored as decimal text, which both drivers keep exactly.
"""

from __future__ import annotations

import datetime as dt
import itertools
import uuid
from collections.abc import Mapping, Sequence
from decimal import Context, Decimal, InvalidOperation
from typing import Any

from pydantic import BaseModel, ConfigDict

from llmstore._core.errors import ValidationError
from llmstore._core.validate import check_name, describe, plain_int, plain_mapping
from llmstore._db.prices_schema import PRICE_TEXT, UNDATED, PriceSource, prices

P = prices
#: The prices of a model besides ``input`` and ``output``; None: priced as input
#: (``cached_input``, ``cache_write``, ``audio_input``) or as output (``reasoning``,
#: ``audio_output``).
OPTIONAL_PRICES = ("cached_input", "cache_write", "reasoning", "audio_input", "audio_output")
PRICE_FIELDS = ("input", "output", *OPTIONAL_PRICES)
MAX_TIERS = 10
_MAX_DIGITS = 40
_EXACT = Context(prec=2 * PRICE_TEXT)


class PriceTier(BaseModel):
    """Prices for requests whose ``prompt_tokens`` are more than ``above`` (long-context
    pricing). A price left None is the base price's."""

    model_config = ConfigDict(frozen=True)

    above: int
    input: Decimal | None = None
    output: Decimal | None = None
    cached_input: Decimal | None = None
    cache_write: Decimal | None = None
    reasoning: Decimal | None = None
    audio_input: Decimal | None = None
    audio_output: Decimal | None = None


class Price(BaseModel):
    """A model's prices per million tokens from ``valid_from`` (None: undated, in force
    before the first dated price), in the store's cost unit.

    ``source`` is "manual" (``prices.set``) or "genai-prices" (an import).
    """

    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    provider: str
    model: str
    valid_from: dt.datetime | None
    source: PriceSource
    input: Decimal
    output: Decimal
    cached_input: Decimal | None
    cache_write: Decimal | None
    reasoning: Decimal | None
    audio_input: Decimal | None
    audio_output: Decimal | None
    tiers: tuple[PriceTier, ...]
    created_at: dt.datetime
    updated_at: dt.datetime


class PriceImport(BaseModel):
    """What ``prices.import_genai_prices`` did.

    * ``written``: prices stored (new, or an earlier import's changed).
    * ``unchanged``: prices stored by an earlier import, the same now.
    * ``removed``: an earlier import's prices that the package no longer has.
    * ``kept_manual``: models left alone because a price was set for them by hand.
    * ``skipped``: the package's prices that cannot be stored as prices per token (only
      per request, per image or by the time of day).
    """

    model_config = ConfigDict(frozen=True)

    written: int
    unchanged: int
    removed: int
    kept_manual: int
    skipped: int


# --- checks ------------------------------------------------------------------------------


def check_price_value(value: object, what: str) -> Decimal:
    """A price: a finite non-negative Decimal, an int, or decimal text; never a float."""
    if isinstance(value, float):
        raise ValidationError(
            f"{what} must be exact: a Decimal, an int or a string such as '2.5', not a float"
        )
    if isinstance(value, Decimal):
        number = Decimal(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = Decimal(plain_int(value, what))
    elif isinstance(value, str):
        try:
            number = Decimal(str.__str__(value).strip())
        except InvalidOperation:
            raise ValidationError(f"{what} is not a decimal number: {describe(value)}") from None
    else:
        raise ValidationError(
            f"{what} must be a Decimal, an int or a string, not {describe(value)}"
        )
    if not number.is_finite() or number < 0:
        raise ValidationError(f"{what} must be a finite number of at least 0, not {number}")
    if len(number.as_tuple().digits) > _MAX_DIGITS or len(price_text(number)) > PRICE_TEXT:
        raise ValidationError(f"{what} has more than {_MAX_DIGITS} digits or is too large")
    return number


def check_optional_price(value: object, what: str) -> Decimal | None:
    return None if value is None else check_price_value(value, what)


def price_text(value: Decimal) -> str:
    """A price as stored: plain decimal text, never an exponent ("1E+2" is "100")."""
    # normalize() within a context wide enough never to round: "2.50" is "2.5".
    text = format(value.normalize(_EXACT), "f")
    return "0" if text in ("-0", "") else text


def check_tiers(value: object) -> tuple[PriceTier, ...]:
    """Up to 10 tiers with distinct ``above`` thresholds, in ascending order."""
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Sequence):
        raise ValidationError("tiers must be a sequence of PriceTier or of mappings")
    tiers = [_check_tier(item, index) for index, item in enumerate(value)]
    if len(tiers) > MAX_TIERS:
        raise ValidationError(f"at most {MAX_TIERS} tiers")
    tiers.sort(key=lambda tier: tier.above)
    for before, after in itertools.pairwise(tiers):
        if before.above == after.above:
            raise ValidationError(f"two tiers start above {after.above} prompt tokens")
    return tuple(tiers)


def _check_tier(item: object, index: int) -> PriceTier:
    if isinstance(item, PriceTier):
        fields: dict[Any, Any] = dict(item)
    elif isinstance(item, Mapping):
        fields = plain_mapping(item)
    else:
        raise ValidationError(
            f"tier {index} must be a PriceTier or a mapping, not {type(item).__name__}"
        )
    unknown = [name for name in fields if name not in ("above", *PRICE_FIELDS)]
    if unknown:
        raise ValidationError(f"tier {index} has unknown field {describe(unknown[0], 40)}")
    if "above" not in fields:
        raise ValidationError(f"tier {index} needs 'above' (a number of prompt tokens)")
    above = plain_int(fields["above"], f"tier {index}'s above")
    if above < 0 or above > 2**63 - 1:
        raise ValidationError(f"tier {index}'s above must be from 0 to 2**63 - 1")
    prices_of = {
        name: check_optional_price(fields.get(name), f"tier {index}'s {name}")
        for name in PRICE_FIELDS
    }
    if all(price is None for price in prices_of.values()):
        raise ValidationError(f"tier {index} sets no price")
    return PriceTier(above=above, **prices_of)


def check_model_key(provider: object, model: object) -> tuple[str, str]:
    """A price's provider and model names, as usage rows name them."""
    return check_name(provider, "provider"), check_name(model, "model")


# --- rows ----------------------------------------------------------------------------------

PRICE_COLUMNS = tuple(P.c)


def tiers_json(tiers: Sequence[PriceTier]) -> list[dict[str, Any]] | None:
    """Tiers as stored: prices as decimal text, unset ones left out."""
    if not tiers:
        return None
    return [
        {
            "above": tier.above,
            **{
                name: price_text(price)
                for name in PRICE_FIELDS
                if (price := getattr(tier, name)) is not None
            },
        }
        for tier in tiers
    ]


def _decimal(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)


def price_from_row(row: Any) -> Price:
    """A price from a row of ``PRICE_COLUMNS``."""
    values = dict(zip((c.name for c in PRICE_COLUMNS), row, strict=True))
    for name in PRICE_FIELDS:
        values[name] = _decimal(values[name])
    values["valid_from"] = None if values["valid_from"] == UNDATED else values["valid_from"]
    values["tiers"] = tuple(
        PriceTier(
            above=int(tier["above"]),
            **{name: _decimal(tier.get(name)) for name in PRICE_FIELDS},
        )
        for tier in values["tiers"] or ()
    )
    return Price.model_construct(**values)
