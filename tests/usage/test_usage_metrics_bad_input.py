"""``store.usage.metrics()`` refuses bad input, naming it, before reaching the database."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from llmstore import Store, StoreClosedError, StoreConfig, ValidationError

# --- bad input -------------------------------------------------------------------------

BAD_QUERIES: list[dict[str, Any]] = [
    {"group_by": ["model", "token_id"]},
    {"group_by": ["created_at"]},
    {"group_by": ["model", "model"]},
    {"group_by": 3},
    {"group_by": [None]},
    {"bucket": "week"},
    {"bucket": "Hour"},
    {"bucket": 60},
    {"since": dt.datetime(2024, 5, 1)},
    {"until": dt.datetime(2024, 5, 1)},
    {"since": "2024-05-01T00:00:00Z"},
    {"until": dt.date(2024, 5, 1)},
    {"status_code": 200},
    {"request_id": "r-1"},
    {"limit": 10},
    {"api_key_id": "not-a-uuid"},
    {"project_id": 12},
    {"success": 1},
    {"is_streaming": "yes"},
    {"model": ""},
    {"model": 5},
    {"provider": "x" * 201},
    {"origin": "\ud800"},
]


async def test_bad_input_is_refused(store: Store) -> None:
    for query in BAD_QUERIES:
        with pytest.raises(ValidationError):
            await store.usage.metrics(**query)


async def test_unknown_filter_is_named(store: Store) -> None:
    with pytest.raises(ValidationError, match="status_code"):
        await store.usage.metrics(status_code=200)
    with pytest.raises(ValidationError, match="'week'"):
        await store.usage.metrics(bucket="week")
    with pytest.raises(ValidationError, match="'cost'"):
        await store.usage.metrics(group_by=["cost"])


async def test_bad_input_is_refused_before_the_database(db_config: StoreConfig) -> None:
    # Once the store is closed, anything that reaches its runner raises StoreClosedError.
    async with Store(db_config, auto_upgrade=True) as store:
        usage = store.usage
    with pytest.raises(StoreClosedError):
        await usage.metrics()
    for query in BAD_QUERIES:
        with pytest.raises(ValidationError):
            await usage.metrics(**query)
