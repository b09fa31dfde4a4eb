"""Finding the price in force: for one model at one time, or for a batch of usage rows.

A model's prices are its rows ordered by ``valid_from``; the one in force at a time is the
last that starts at or before it (an undated price starts in the year 1). A batch of
usage rows reads the prices of all its models in one query per 500 models, then picks
each row's price in Python by its ``created_at``.
"""

from __future__ import annotations

import bisect
import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore._db.dialects import IN_LIST_CHUNK

from .cost import cost_of
from .records import PRICE_COLUMNS, P, Price, price_from_row

ModelKey = tuple[str, str]
#: Where a usage row's cost came from.
GIVEN, PRICE_TABLE, NONE = "given", "price_table", "none"


def price_at(conn: Connection, provider: str, model: str, at: dt.datetime) -> Price | None:
    """The price of ``provider``/``model`` in force at ``at``, or None."""
    row = conn.execute(
        sa.select(*PRICE_COLUMNS)
        .where(P.c.provider == provider, P.c.model == model, P.c.valid_from <= at)
        .order_by(P.c.valid_from.desc())
        .limit(1)
    ).first()
    return None if row is None else price_from_row(row)


class PriceBook:
    """The prices of some models, each model's in ``valid_from`` order, to pick from."""

    def __init__(self, prices: Iterable[Price]) -> None:
        self._prices: dict[ModelKey, list[Price]] = {}
        for price in prices:
            self._prices.setdefault((price.provider, price.model), []).append(price)
        self._starts = {
            key: [_start(price) for price in listed] for key, listed in self._prices.items()
        }

    def at(self, provider: str, model: str, when: dt.datetime) -> Price | None:
        listed = self._prices.get((provider, model))
        if listed is None:
            return None
        index = bisect.bisect_right(self._starts[(provider, model)], when) - 1
        return listed[index] if index >= 0 else None


def _start(price: Price) -> dt.datetime:
    return dt.datetime(1, 1, 1, tzinfo=dt.UTC) if price.valid_from is None else price.valid_from


def price_book(conn: Connection, keys: Iterable[ModelKey]) -> PriceBook:
    """Every price of these models."""
    wanted = sorted(set(keys))
    found: list[Price] = []
    for start in range(0, len(wanted), IN_LIST_CHUNK):
        chunk = wanted[start : start + IN_LIST_CHUNK]
        statement = (
            sa.select(*PRICE_COLUMNS)
            .where(sa.tuple_(P.c.provider, P.c.model).in_(chunk))
            .order_by(P.c.provider, P.c.model, P.c.valid_from)
        )
        found.extend(price_from_row(row) for row in conn.execute(statement))
    return PriceBook(found)


def costs_for(conn: Connection, records: Sequence[Any]) -> tuple[list[int], list[str]]:
    """Each usage row's cost and where it came from: its own (``cost`` given), the price
    table's at its ``created_at``, or none (no price, or no provider and model: 0)."""
    priced = [
        (r.provider, r.model)
        for r in records
        if r.cost is None and r.provider is not None and r.model is not None
    ]
    book = price_book(conn, priced) if priced else PriceBook(())
    costs: list[int] = []
    sources: list[str] = []
    for record in records:
        if record.cost is not None:
            costs.append(record.cost)
            sources.append(GIVEN)
            continue
        price = None
        if record.provider is not None and record.model is not None:
            price = book.at(record.provider, record.model, record.created_at)
        if price is None:
            costs.append(0)
            sources.append(NONE)
            continue
        costs.append(cost_of(price, record))
        sources.append(PRICE_TABLE)
    return costs, sources
