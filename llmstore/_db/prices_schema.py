"""The price table (revision 0009): prices per million tokens, by provider, model and the
time they apply from. On the one ``MetaData`` of ``schema.py``, which imports this module
so that the table is always registered."""

from __future__ import annotations

import datetime as dt
from typing import Literal, get_args

import sqlalchemy as sa

from .schema import Json, UTCDateTime, metadata

#: Who wrote a price: by hand (``prices.set``), or ``prices.import_genai_prices``.
PriceSource = Literal["manual", "genai-prices"]
PRICE_SOURCES: tuple[PriceSource, ...] = get_args(PriceSource)
#: ``valid_from`` of an undated price, which applies at any time before the first dated
#: one: a stored time, so that the unique key holds no NULL (NULLs are all distinct).
UNDATED = dt.datetime(1, 1, 1, tzinfo=dt.UTC)
#: A price as exact decimal text ("2.5", "0.0375"): exact on both drivers, where SQLite's
#: NUMERIC would keep a float.
PRICE_TEXT = 64

prices = sa.Table(
    "llmstore_prices",
    metadata,
    sa.Column("id", sa.Uuid(), primary_key=True),
    sa.Column("provider", sa.String(200), nullable=False),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("valid_from", UTCDateTime(), nullable=False),
    sa.Column("source", sa.String(20), nullable=False),
    sa.Column("input", sa.String(PRICE_TEXT), nullable=False),
    sa.Column("output", sa.String(PRICE_TEXT), nullable=False),
    # NULL: priced as input (cache reads and writes, audio input) or as output.
    sa.Column("cached_input", sa.String(PRICE_TEXT), nullable=True),
    sa.Column("cache_write", sa.String(PRICE_TEXT), nullable=True),
    sa.Column("reasoning", sa.String(PRICE_TEXT), nullable=True),
    sa.Column("audio_input", sa.String(PRICE_TEXT), nullable=True),
    sa.Column("audio_output", sa.String(PRICE_TEXT), nullable=True),
    # Long-context prices: [{"above": prompt tokens, "input": "...", ...}], ascending.
    sa.Column("tiers", Json, nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.CheckConstraint(
        "source IN (" + ", ".join(f"'{source}'" for source in PRICE_SOURCES) + ")",
        name="source",
    ),
    # One price per model and start; a lookup reads the latest start at or before a time.
    sa.UniqueConstraint("provider", "model", "valid_from"),
)
