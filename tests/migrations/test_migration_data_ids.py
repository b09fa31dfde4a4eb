"""Revision 0005 renames every table: ids go on counting through it and back, on SQLite
(its AUTOINCREMENT mark) and Postgres (the id sequences, renamed with their tables)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore import Store, StoreConfig, UsageRecord
from llmstore._db.schema import metadata
from llmstore.migrations._commands import downgrade, upgrade
from llmstore.pytest_plugin import drop_schema, fresh_schema_name
from tests.helpers import require_postgres
from tests.migrations.data_seeds import SEEDS
from tests.migrations.data_support import _BEFORE_RENAMING, as_at, on_database
from tests.migrations.data_values import K2, NOW

_OLD_USAGE = sa.table(
    "usage_logs",
    sa.column("id", sa.BigInteger()),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("is_streaming", sa.Boolean()),
    sa.column("success", sa.Boolean()),
    sa.column("prompt_tokens", sa.BigInteger()),
    sa.column("completion_tokens", sa.BigInteger()),
    sa.column("cached_tokens", sa.BigInteger()),
    sa.column("total_tokens", sa.BigInteger()),
    sa.column("cost", sa.BigInteger()),
)


def _insert_and_purge_the_newest(conn: Connection) -> int:
    """Three usage rows at 0004, ids from the table's own counter; the newest is purged."""
    row = {
        "created_at": NOW,
        "is_streaming": False,
        "success": True,
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "cached_tokens": 0,
        "total_tokens": 2,
        "cost": 1,
    }
    ids: list[int] = [
        conn.execute(sa.insert(_OLD_USAGE).values(row).returning(_OLD_USAGE.c.id)).scalar_one()
        for _ in range(3)
    ]
    conn.execute(sa.delete(_OLD_USAGE).where(_OLD_USAGE.c.id == max(ids)))
    return max(ids)


async def test_ids_go_on_counting_through_the_rename_and_back(db_config: StoreConfig) -> None:
    """SQLite's AUTOINCREMENT mark and Postgres's sequence survive 0004 -> 0005 -> 0004
    -> 0005: the id of a purged row never comes back (a receipt may name it)."""
    await upgrade(db_config, _BEFORE_RENAMING)
    purged = await on_database(db_config, _insert_and_purge_the_newest)
    await upgrade(db_config)
    async with Store(db_config) as store:
        first = (await store.usage.record(UsageRecord(cost=1))).ids[0]
    assert first is not None and first > purged
    await downgrade(db_config, _BEFORE_RENAMING)
    again = await on_database(db_config, _insert_and_purge_the_newest)
    assert again > first
    await upgrade(db_config)
    async with Store(db_config) as store:
        last = (await store.usage.record(UsageRecord(cost=1))).ids[0]
        assert last is not None and last > again


# A seeded key as the table has it at 0004 (without the columns later revisions add).
_OLD_KEY = as_at(
    SEEDS["0003_api_keys_ledger"]["api_keys"][1],
    "api_keys",
    "0003_api_keys_ledger",
    _BEFORE_RENAMING,
)
_OLD_KEYS = sa.table(
    "api_keys",
    *(sa.column(name, metadata.tables["llmstore_api_keys"].c[name].type) for name in _OLD_KEY),
)
_OLD_LEDGER = sa.table(
    "ledger_entries",
    sa.column("id", sa.BigInteger()),
    sa.column("api_key_id", sa.Uuid()),
    sa.column("kind", sa.String()),
    sa.column("amount", sa.BigInteger()),
    sa.column("balance_after", sa.BigInteger()),
    sa.column("description", sa.String()),
    sa.column("shortfall", sa.BigInteger()),
    sa.column("created_at", sa.DateTime(timezone=True)),
)


def _insert_and_purge_the_newest_entry(conn: Connection) -> int:
    """Three ledger entries at 0004, ids from the sequence; the newest is deleted."""
    row = {
        "api_key_id": K2,
        "kind": "deposit",
        "amount": 1,
        "balance_after": 0,
        "description": "",
        "shortfall": 0,
        "created_at": NOW,
    }
    ids: list[int] = [
        conn.execute(sa.insert(_OLD_LEDGER).values(row).returning(_OLD_LEDGER.c.id)).scalar_one()
        for _ in range(3)
    ]
    conn.execute(sa.delete(_OLD_LEDGER).where(_OLD_LEDGER.c.id == max(ids)))
    return max(ids)


def _serial_sequences(conn: Connection) -> dict[str, tuple[str, int]]:
    """By table: its id column's sequence (pg_get_serial_sequence, without the schema) and
    that sequence's last value."""
    out = {}
    for table in ("ledger_entries", "usage_logs"):
        name = next(n for n in (f"llmstore_{table}", table) if sa.inspect(conn).has_table(n))
        qualified = conn.execute(
            sa.text("SELECT pg_get_serial_sequence(:table, 'id')"), {"table": name}
        ).scalar_one()
        sequence = qualified.rsplit(".", 1)[-1]
        last = conn.execute(
            sa.text(
                "SELECT last_value FROM pg_sequences "
                "WHERE schemaname = current_schema() AND sequencename = :name"
            ),
            {"name": sequence},
        ).scalar_one()
        out[name] = (sequence, last)
    return out


@pytest.mark.postgres
async def test_postgres_sequences_are_renamed_with_their_tables_and_go_on() -> None:
    """Both id sequences follow their tables through 0004 -> 0005 -> 0004 -> 0005, still
    owned by the id column and at the value they had: no ledger entry or usage row gets
    the id of one deleted before the migration."""
    url, schema = require_postgres(), fresh_schema_name()
    config = StoreConfig.from_url(url, schema_name=schema)
    try:
        await upgrade(config, _BEFORE_RENAMING)
        await on_database(
            config,
            lambda conn: conn.execute(sa.insert(_OLD_KEYS), _OLD_KEY),
        )
        entry = await on_database(config, _insert_and_purge_the_newest_entry)
        usage = await on_database(config, _insert_and_purge_the_newest)
        old = {
            "ledger_entries": ("ledger_entries_id_seq", entry),
            "usage_logs": ("usage_logs_id_seq", usage),
        }
        assert await on_database(config, _serial_sequences) == old

        await upgrade(config)
        new = {f"llmstore_{table}": (f"llmstore_{seq}", last) for table, (seq, last) in old.items()}
        assert await on_database(config, _serial_sequences) == new
        async with Store(config) as store:
            deposited = await store.api_keys.deposit(K2, 1)
            recorded = (await store.usage.record(UsageRecord(cost=1))).ids[0]
        assert recorded is not None
        assert (deposited.id, recorded) == (entry + 1, usage + 1)

        await downgrade(config, _BEFORE_RENAMING)
        again = {
            "ledger_entries": ("ledger_entries_id_seq", deposited.id),
            "usage_logs": ("usage_logs_id_seq", recorded),
        }
        assert await on_database(config, _serial_sequences) == again
        entry = await on_database(config, _insert_and_purge_the_newest_entry)
        usage = await on_database(config, _insert_and_purge_the_newest)
        assert (entry, usage) == (deposited.id + 3, recorded + 3)

        await upgrade(config)
        async with Store(config) as store:
            assert (await store.api_keys.deposit(K2, 1)).id == entry + 1
            assert (await store.usage.record(UsageRecord(cost=1))).ids[0] == usage + 1
    finally:
        await drop_schema(url, schema)
