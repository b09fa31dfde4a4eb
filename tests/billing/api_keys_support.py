"""Constants and helpers shared by the ``test_api_keys_*`` modules (the API keys
repository on every driver, in a single process)."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore import ApiKey, LedgerEntry, Store
from llmstore._db.schema import api_keys, ledger_entries, reservations, withdrawals
from llmstore.pytest_plugin import run_sql

MAX = 2**63 - 1
TOKEN = "cashuAeyJ0b2tlbiI6W3sibWludCI6Imh0dHBzOi8vbWludC5leGFtcGxlIn1dfQ"
MINT = "https://mint.example.com/v1"
TABLES = (api_keys, ledger_entries, reservations, withdrawals)


async def _key(store: Store, balance: int = 0, **kwargs: Any) -> ApiKey:
    return (await store.api_keys.create(balance, **kwargs)).key


async def _ledger(store: Store, key_id: uuid.UUID) -> list[LedgerEntry]:
    return await store.api_keys.ledger(key_id, limit=1000)


def _dump(conn: Connection) -> dict[str, list[tuple[Any, ...]]]:
    return {
        table.name: [
            tuple(row)
            for row in conn.execute(sa.select(table).order_by(*table.primary_key.columns))
        ]
        for table in TABLES
    }


async def _everything(store: Store) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the four money tables, to show that a refusal wrote nothing."""
    return await run_sql(store, _dump)


def _chain_is_consistent(entries: list[LedgerEntry]) -> None:
    """Newest first: ids decrease and each balance_after follows from the one before it."""
    assert [e.id for e in entries] == sorted((e.id for e in entries), reverse=True)
    assert len({e.id for e in entries}) == len(entries)
    oldest_first = list(reversed(entries))
    assert oldest_first[0].balance_after == oldest_first[0].amount
    for older, newer in itertools.pairwise(oldest_first):
        assert newer.balance_after == older.balance_after + newer.amount, (older, newer)
    assert all(e.balance_after >= 0 for e in entries)
