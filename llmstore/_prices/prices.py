"""``store.prices``: prices per million tokens, their history, and the cost of usage.

A usage row written with ``cost=None`` takes its cost from here, at its ``created_at``
(``lookup.costs_for``); so does ``admissions.settle(..., usage=...)`` without a cost.
"""

from __future__ import annotations

import builtins
import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore._core.errors import NotFoundError, ValidationError
from llmstore._core.unset import UNSET, Unset
from llmstore._core.validate import check_aware, check_choice, check_name
from llmstore._db.dialects import upsert_rows
from llmstore._db.operations import Repository, reads, writes
from llmstore._db.prices_schema import PRICE_SOURCES, UNDATED

from .cost import check_counts, cost_of
from .genai import import_rows
from .lookup import price_at
from .records import (
    OPTIONAL_PRICES,
    PRICE_COLUMNS,
    P,
    Price,
    PriceImport,
    PriceTier,
    check_model_key,
    check_optional_price,
    check_price_value,
    check_tiers,
    price_from_row,
    price_text,
    tiers_json,
)

PriceValue = Decimal | int | str


def _valid_from(value: object) -> dt.datetime:
    return UNDATED if value is None else check_aware(value, "valid_from")


def _where(provider: str, model: str) -> sa.ColumnElement[bool]:
    return sa.and_(P.c.provider == provider, P.c.model == model)


class Prices(Repository):
    """``store.prices`` and ``tx.prices``: a price table in the store's cost unit."""

    @writes()
    def set(
        self,
        conn: Connection,
        provider: str,
        model: str,
        *,
        input: PriceValue,  # noqa: A002 (the price's name)
        output: PriceValue,
        cached_input: PriceValue | None = None,
        cache_write: PriceValue | None = None,
        reasoning: PriceValue | None = None,
        audio_input: PriceValue | None = None,
        audio_output: PriceValue | None = None,
        tiers: Sequence[PriceTier | Mapping[str, Any]] = (),
        valid_from: dt.datetime | None = None,
    ) -> Price:
        """Set ``provider``/``model``'s prices per million tokens from ``valid_from`` (None:
        undated, in force before any dated price), replacing the price set for that same
        start. Prices are exact: Decimals, ints or decimal strings, never floats. ``tiers``
        give other prices above a number of prompt tokens (PriceTier or mappings). A price
        set here is never changed by ``import_genai_prices``.
        """
        key = check_model_key(provider, model)
        values: dict[str, Any] = {
            "input": price_text(check_price_value(input, "input")),
            "output": price_text(check_price_value(output, "output")),
        }
        given = dict(
            zip(
                OPTIONAL_PRICES,
                (cached_input, cache_write, reasoning, audio_input, audio_output),
                strict=True,
            )
        )
        for name, value in given.items():
            price = check_optional_price(value, name)
            values[name] = None if price is None else price_text(price)
        values["tiers"] = tiers_json(check_tiers(tiers))
        start = _valid_from(valid_from)
        now = self.now()
        row = {
            "id": uuid.uuid4(),
            "provider": key[0],
            "model": key[1],
            "valid_from": start,
            "source": "manual",
            **values,
            "created_at": now,
            "updated_at": now,
        }
        [written] = upsert_rows(
            conn,
            P,
            [row],
            [P.c.provider, P.c.model, P.c.valid_from],
            lambda excluded: {
                name: excluded[name]
                for name in ("source", "input", "output", *OPTIONAL_PRICES, "tiers", "updated_at")
            },
            returning=PRICE_COLUMNS,
        )
        return price_from_row(written)

    @reads()
    def get(
        self, conn: Connection, provider: str, model: str, at: dt.datetime | None = None
    ) -> Price:
        """The price of ``provider``/``model`` in force at ``at`` (default: now);
        NotFoundError if there is none."""
        key = check_model_key(provider, model)
        when = self.now() if at is None else check_aware(at, "at")
        price = price_at(conn, *key, when)
        if price is None:
            raise NotFoundError(f"no price for {key[0]}/{key[1]} at {when.isoformat()}")
        return price

    @reads()
    def list(
        self,
        conn: Connection,
        provider: str | None = None,
        model: str | None = None,
        source: str | None = None,
    ) -> builtins.list[Price]:
        """Every price (or a provider's, a model's, a source's), by provider, model and
        start, undated first."""
        statement = sa.select(*PRICE_COLUMNS)
        if provider is not None:
            statement = statement.where(P.c.provider == check_name(provider, "provider"))
        if model is not None:
            statement = statement.where(P.c.model == check_name(model, "model"))
        if source is not None:
            statement = statement.where(P.c.source == check_choice(source, "source", PRICE_SOURCES))
        statement = statement.order_by(P.c.provider, P.c.model, P.c.valid_from)
        # Sorted again in Python: Postgres orders text by its collation, SQLite by bytes.
        found = [price_from_row(row) for row in conn.execute(statement)]
        found.sort(key=lambda p: (p.provider, p.model, p.valid_from or UNDATED))
        return found

    @writes()
    def delete(
        self,
        conn: Connection,
        provider: str,
        model: str,
        valid_from: dt.datetime | Unset | None = UNSET,
    ) -> int:
        """Delete ``provider``/``model``'s price from ``valid_from`` (None: the undated
        one), or, without ``valid_from``, all of its prices; how many. NotFoundError when
        there is none. Usage rows keep the costs they were written with."""
        key = check_model_key(provider, model)
        statement = sa.delete(P).where(_where(*key))
        if not isinstance(valid_from, Unset):
            statement = statement.where(P.c.valid_from == _valid_from(valid_from))
        deleted = int(conn.execute(statement).rowcount)
        if deleted == 0:
            raise NotFoundError(f"no price for {key[0]}/{key[1]} to delete")
        return deleted

    @reads()
    def cost(
        self,
        conn: Connection,
        provider: str,
        model: str,
        usage: Any,
        at: dt.datetime | None = None,
    ) -> int:
        """The cost of ``usage`` (a UsageRecord, or a mapping of its token counts) at the
        price in force at ``at`` (default: the record's ``created_at``, else now): exact,
        rounded once at the end, half up. NotFoundError when there is no price."""
        key = check_model_key(provider, model)
        counts = check_counts(usage)
        if at is not None:
            when = check_aware(at, "at")
        else:
            created = getattr(usage, "created_at", None)
            when = created if isinstance(created, dt.datetime) else self.now()
        price = price_at(conn, *key, when)
        if price is None:
            raise NotFoundError(f"no price for {key[0]}/{key[1]} at {when.isoformat()}")
        return cost_of(price, counts)

    @writes()
    def import_genai_prices(
        self, conn: Connection, units_per_usd: int | Decimal | str
    ) -> PriceImport:
        """Seed the table from the ``genai-prices`` package's bundled data (``pip install
        llmstore[prices]``; no network), USD converted at ``units_per_usd`` cost units per
        dollar (100 for cents, 1000000 for micro-dollars). Models with a price set by hand
        are left alone; an earlier import's prices are updated, and removed where the
        package no longer has them."""
        rate = check_price_value(units_per_usd, "units_per_usd")
        if rate == 0:
            raise ValidationError("units_per_usd must be more than 0")
        return import_rows(conn, rate, self.now())
