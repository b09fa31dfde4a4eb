"""Seeding the price table from ``genai-prices`` (pydantic's package): its bundled data
only, never its network update.

Each of the package's models is stored under its id and every name its match rule lists
exactly (``gpt-4o``, ``gpt-4o-2024-08-06``...), for its provider's id; names it matches by
prefix or pattern are not listed, so such a row needs a price set by hand. A model's price
history becomes dated prices: the first entry is undated (the package uses it before any
start date), each later one starts at its start date, midnight UTC. What the table cannot
hold is counted as skipped: prices by time of day (the standard price stays in force),
and models priced only per request, image or second.

The package prices per million tokens in USD; each price is multiplied by
``units_per_usd`` exactly. Long-context prices (``TieredPrices``, whose tiers apply to all
tokens once the prompt is above their start) become this table's tiers.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore._core.errors import ConfigError, ValidationError
from llmstore._core.validate import check_name
from llmstore._db.dialects import delete_where_in, upsert_rows
from llmstore._db.prices_schema import UNDATED

from .records import (
    OPTIONAL_PRICES,
    P,
    PriceImport,
    PriceTier,
    check_price_value,
    price_text,
    tiers_json,
)

SOURCE = "genai-prices"
#: The package's price keys that this table holds, by the field they become.
PRICE_KEYS = {
    "input": "input_mtok",
    "output": "output_mtok",
    "cached_input": "cache_read_mtok",
    "cache_write": "cache_write_mtok",
    "reasoning": "output_reasoning_mtok",
    "audio_input": "input_audio_mtok",
    "audio_output": "output_audio_mtok",
}
_VALUE_COLUMNS = ("input", "output", *OPTIONAL_PRICES, "tiers")
Spec = dict[str, Any]


def _bundled_providers() -> list[Any]:
    try:
        from genai_prices.data import providers
    except ImportError as exc:
        raise ConfigError(
            "import_genai_prices needs the genai-prices package: pip install 'llmstore[prices]'"
        ) from exc
    return list(providers)


def _exact_names(match: Any) -> Iterator[str]:
    """The names a match rule lists exactly: an equals clause, or an or of them."""
    equals = getattr(match, "equals", None)
    if isinstance(equals, str):
        yield equals
    for inner in getattr(match, "or_", None) or ():
        yield from _exact_names(inner)


def _entries(model: Any) -> tuple[list[tuple[dt.datetime, Any]], int]:
    """A model's (start, ModelPrice) history, and how many of its entries were skipped."""
    prices = model.prices
    if not isinstance(prices, list):
        return [(UNDATED, prices)], 0
    history: list[tuple[dt.datetime, Any]] = []
    skipped = 0
    for entry in prices:
        constraint = entry.constraint
        start_date = getattr(constraint, "start_date", None)
        if not history:
            history.append((UNDATED, entry.prices))  # also used before any start date
        elif constraint is None:
            history = [(UNDATED, entry.prices)]  # always in force: replaces what came before
        elif isinstance(start_date, dt.date):
            start = dt.datetime.combine(start_date, dt.time(), tzinfo=dt.UTC)
            history = [(s, p) for s, p in history if s < start] + [(start, entry.prices)]
        else:
            skipped += 1  # by time of day
    return history, skipped


def _converted(value: Any, rate: Decimal) -> Decimal:
    return check_price_value(Decimal(value) * rate, "an imported price")


def _values(model_price: Any, rate: Decimal) -> Spec | None:
    """The table's columns for one of the package's ModelPrices; None without a token price."""
    found = {field: getattr(model_price, key, None) for field, key in PRICE_KEYS.items()}
    if found["input"] is None and found["output"] is None:
        return None
    base: dict[str, Decimal | None] = {}
    starts: set[int] = set()
    for field, value in found.items():
        tiers = getattr(value, "tiers", None)
        if value is not None and tiers is not None:
            starts.update(int(tier.start) for tier in tiers)
            value = value.base
        base[field] = None if value is None else _converted(value, rate)
    tiers_out = []
    for start in sorted(starts):
        prices_at: dict[str, Decimal | None] = {}
        for field, value in found.items():
            tiers = getattr(value, "tiers", None)
            applicable = [tier for tier in tiers or () if int(tier.start) <= start]
            prices_at[field] = _converted(applicable[-1].price, rate) if applicable else None
        if any(price is not None for price in prices_at.values()):
            tiers_out.append(PriceTier(above=start, **prices_at))
    return {
        "input": price_text(base["input"] or Decimal(0)),  # an embedding model has no output
        "output": price_text(base["output"] or Decimal(0)),
        **{name: _text(base[name]) for name in OPTIONAL_PRICES},
        "tiers": tiers_json(tiers_out),
    }


def _text(value: Decimal | None) -> str | None:
    return None if value is None else price_text(value)


def package_prices(rate: Decimal) -> tuple[dict[tuple[str, str, dt.datetime], Spec], int]:
    """Every price the package has, keyed by (provider, model, start); and how many of
    its models or entries could not be stored."""
    specs: dict[tuple[str, str, dt.datetime], Spec] = {}
    skipped = 0
    for provider in _bundled_providers():
        taken: set[str] = set()
        for model in provider.models:
            history, not_stored = _entries(model)
            skipped += not_stored
            converted = [(start, _values(price, rate)) for start, price in history]
            if all(values is None for _, values in converted):
                skipped += 1
                continue
            names = dict.fromkeys([model.id, *_exact_names(model.match)])
            for name in names:
                try:
                    checked = check_name(name, "model")
                except ValidationError:
                    continue
                if checked in taken:  # an earlier model matches this name first
                    continue
                taken.add(checked)
                for start, values in converted:
                    if values is not None:
                        specs[(provider.id, checked, start)] = values
    return specs, skipped


def import_rows(conn: Connection, rate: Decimal, now: dt.datetime) -> PriceImport:
    """Write the package's prices, keeping hand-set models and unchanged rows as they are."""
    specs, skipped = package_prices(rate)
    manual = {
        (row.provider, row.model)
        for row in conn.execute(
            sa.select(P.c.provider, P.c.model).where(P.c.source == "manual").distinct()
        )
    }
    kept = {(provider, model) for provider, model, _ in specs} & manual
    stored = {
        (row.provider, row.model, row.valid_from): (row.id, {c: row[c] for c in _VALUE_COLUMNS})
        for row in conn.execute(
            sa.select(
                P.c.id, P.c.provider, P.c.model, P.c.valid_from, *(P.c[c] for c in _VALUE_COLUMNS)
            ).where(P.c.source == SOURCE)
        ).mappings()
    }
    changed = []
    unchanged = 0
    for key in sorted(specs):  # a fixed order: two imports at once lock rows alike
        if key[:2] in kept:
            continue
        values = specs[key]
        before = stored.get(key)
        if before is not None and before[1] == values:
            unchanged += 1
            continue
        changed.append(
            {
                "id": uuid.uuid4(),
                "provider": key[0],
                "model": key[1],
                "valid_from": key[2],
                "source": SOURCE,
                **values,
                "created_at": now,
                "updated_at": now,
            }
        )
    gone = [entry[0] for key, entry in stored.items() if key not in specs or key[:2] in kept]
    removed = delete_where_in(conn, P.c.id, gone) if gone else 0
    upsert_rows(
        conn,
        P,
        changed,
        [P.c.provider, P.c.model, P.c.valid_from],
        lambda excluded: {name: excluded[name] for name in (*_VALUE_COLUMNS, "updated_at")},
        where=P.c.source == SOURCE,  # a price set by hand meanwhile stays
    )
    return PriceImport(
        written=len(changed),
        unchanged=unchanged,
        removed=removed,
        kept_manual=len(kept),
        skipped=skipped,
    )
