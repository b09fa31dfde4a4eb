"""The cost of a request's tokens at a price: exact, rounded once.

Token counts follow OpenTelemetry's GenAI convention: ``prompt_tokens`` includes the cache
reads (``cached_tokens``), the cache writes (``cache_write_tokens``) and the audio input
(``audio_input_tokens``); ``completion_tokens`` includes ``reasoning_tokens`` and
``audio_output_tokens``. So each part is priced at its own price and the rest of the whole
at ``input`` (or ``output``), and nothing is counted twice:

    cost = ( (prompt - cached - cache_write - audio_input) * input
           + cached * cached_input + cache_write * cache_write + audio_input * audio_input
           + (completion - reasoning - audio_output) * output
           + reasoning * reasoning + audio_output * audio_output ) / 1,000,000

A price left None is ``input``'s (cache reads and writes, audio input) or ``output``'s
(reasoning, audio output). Above a tier's ``above`` prompt tokens, that tier's prices
replace the base prices it sets (the highest such tier). The sum is exact (rational
arithmetic) and rounded once, at the end, half up, to an integer of the cost unit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Protocol

from llmstore._core.errors import ValidationError
from llmstore._core.validate import MAX_INT64, describe, plain_int, plain_mapping

from .records import PRICE_FIELDS, Price, PriceTier

#: The token counts a cost reads, as ``UsageRecord`` names them.
TOKEN_FIELDS = (
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "audio_input_tokens",
    "audio_output_tokens",
)
PER = 1_000_000
_PRICED_AS_INPUT = ("cached_input", "cache_write", "audio_input")


class Counts(Protocol):
    """What a cost reads of a request: a ``TokenCounts``, or a ``UsageRecord``."""

    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def cached_tokens(self) -> int: ...
    @property
    def cache_write_tokens(self) -> int: ...
    @property
    def reasoning_tokens(self) -> int: ...
    @property
    def audio_input_tokens(self) -> int: ...
    @property
    def audio_output_tokens(self) -> int: ...


@dataclass(frozen=True)
class TokenCounts:
    """A request's token counts, its parts within their wholes (see the module's text)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    audio_input_tokens: int = 0
    audio_output_tokens: int = 0


def broken_convention(counts: Counts) -> str | None:
    """Why these counts break the convention (parts larger than their whole), or None."""
    prompt_parts = counts.cached_tokens + counts.cache_write_tokens + counts.audio_input_tokens
    if prompt_parts > counts.prompt_tokens:
        return (
            "prompt_tokens includes cached_tokens, cache_write_tokens and audio_input_tokens: "
            f"their sum ({prompt_parts}) is more than prompt_tokens ({counts.prompt_tokens})"
        )
    completion_parts = counts.reasoning_tokens + counts.audio_output_tokens
    if completion_parts > counts.completion_tokens:
        return (
            "completion_tokens includes reasoning_tokens and audio_output_tokens: their sum "
            f"({completion_parts}) is more than completion_tokens ({counts.completion_tokens})"
        )
    return None


def check_counts(usage: object) -> TokenCounts:
    """A usage mapping's (or a ``UsageRecord``'s) token counts, checked."""
    if isinstance(usage, Mapping):
        fields = plain_mapping(usage)
        unknown = [name for name in fields if name not in TOKEN_FIELDS]
        if unknown:
            raise ValidationError(
                f"usage has unknown count {describe(unknown[0], 40)}: it takes "
                f"{', '.join(TOKEN_FIELDS)}"
            )
    else:
        if not all(hasattr(usage, name) for name in TOKEN_FIELDS):
            raise ValidationError(
                f"usage must be a UsageRecord or a mapping of token counts, not "
                f"{type(usage).__name__}"
            )
        fields = {name: getattr(usage, name) for name in TOKEN_FIELDS}
    values: dict[str, int] = {}
    for name in TOKEN_FIELDS:
        value = plain_int(fields.get(name, 0), f"usage {name}")
        if value < 0 or value > MAX_INT64:
            raise ValidationError(f"usage {name} must be from 0 to 2**63 - 1")
        values[name] = value
    counts = TokenCounts(**values)
    broken = broken_convention(counts)
    if broken is not None:
        raise ValidationError(f"usage: {broken}")
    return counts


def _tier_for(price: Price, prompt_tokens: int) -> PriceTier | None:
    chosen = None
    for tier in price.tiers:  # ascending
        if prompt_tokens > tier.above:
            chosen = tier
    return chosen


def unit_prices(price: Price, prompt_tokens: int) -> dict[str, Decimal]:
    """Every price in force for a request of ``prompt_tokens``, None ones filled in."""
    tier = _tier_for(price, prompt_tokens)
    own: dict[str, Decimal | None] = {}
    for name in PRICE_FIELDS:
        tiered = None if tier is None else getattr(tier, name)
        own[name] = tiered if tiered is not None else getattr(price, name)
    base_input, base_output = own["input"], own["output"]
    assert base_input is not None  # input and output are never None
    assert base_output is not None
    rates: dict[str, Decimal] = {}
    for name, value in own.items():
        if value is None:
            value = base_input if name in _PRICED_AS_INPUT else base_output
        rates[name] = value
    return rates


def exact_cost(price: Price, counts: Counts) -> Fraction:
    """The unrounded cost, in the cost unit."""
    rates = unit_prices(price, counts.prompt_tokens)
    text_in = (
        counts.prompt_tokens
        - counts.cached_tokens
        - counts.cache_write_tokens
        - counts.audio_input_tokens
    )
    text_out = counts.completion_tokens - counts.reasoning_tokens - counts.audio_output_tokens
    parts = (
        (text_in, rates["input"]),
        (counts.cached_tokens, rates["cached_input"]),
        (counts.cache_write_tokens, rates["cache_write"]),
        (counts.audio_input_tokens, rates["audio_input"]),
        (text_out, rates["output"]),
        (counts.reasoning_tokens, rates["reasoning"]),
        (counts.audio_output_tokens, rates["audio_output"]),
    )
    return sum((Fraction(rate) * tokens for tokens, rate in parts if tokens), Fraction(0)) / PER


def round_half_up(value: Fraction) -> int:
    """A non-negative amount to the nearest integer, halves up."""
    return (2 * value.numerator + value.denominator) // (2 * value.denominator)


def cost_of(price: Price, counts: Counts) -> int:
    """The cost of ``counts`` at ``price``, rounded once, half up; ValidationError past
    what a cost column holds (2**63 - 1)."""
    cost = round_half_up(exact_cost(price, counts))
    if cost > MAX_INT64:
        raise ValidationError(
            f"the cost at {price.provider}/{price.model}'s price is more than 2**63 - 1"
        )
    return cost
