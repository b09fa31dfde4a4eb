"""A database with a row in every table, and a snapshot of every row: for tests that must
show that data survived (or came back) whole."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy.engine import Connection

from llmstore import Store, StoreConfig, UsageRecord
from llmstore._core.signing import generate_signing_key
from llmstore._db.schema import VERSION_TABLE, metadata
from llmstore.migrations import _commands as _migrations
from llmstore.pytest_plugin import run_sql

Snapshot = dict[str, list[tuple[Any, ...]]]


async def seed(config: StoreConfig) -> None:
    """A row in every table of the head schema."""
    signed = config.model_copy(update={"receipt_signing_key": SecretStr(generate_signing_key())})
    async with Store(signed) as store:
        project = await store.projects.create("seeded", api_key="sk-upstream-secret")
        await store.providers.create("openai", "gpt-4o", project.id, api_key="sk-provider")
        await store.tokens.create(project.id, name="seeded", actor="tests")
        key = (await store.api_keys.create(1_000, project.id)).key
        await store.api_keys.charge(key.id, 10, idempotency_key="c1")
        await store.api_keys.reserve(key.id, 20)
        await store.api_keys.withdraw(key.id, 30, "cashuAsecret", "https://mint.example")
        result = await store.usage.record(UsageRecord(model="m", cost=3, request_id="r1"))
        assert result.ids[0] is not None
        await store.usage.issue_receipt(result.ids[0])


async def snapshot(config: StoreConfig) -> Snapshot:
    """Every row of every table in the database (the configured schema), as text."""
    schema = config.schema_name

    def read(conn: Connection) -> Snapshot:
        if schema is not None:
            conn.exec_driver_sql(f'SET LOCAL search_path TO "{schema}"')
        out = {}
        for name in sorted(sa.inspect(conn).get_table_names()):
            rows = conn.exec_driver_sql(f"SELECT * FROM {name}").all()
            out[name] = sorted(tuple(map(str, row)) for row in rows)
        return out

    return await _migrations.with_migration_connection(config, read, write=False)


async def store_snapshot(store: Store) -> Snapshot:
    """Every row of every table (llmstore's and its version table), through the open
    store's own connections: a millisecond or two, for tests that take one around every
    call. Rows are compared as the driver returns them, not as :func:`snapshot` prints them.
    """
    schema = store.config.schema_name
    names = [table.name for table in metadata.sorted_tables] + [VERSION_TABLE]

    def qualified(name: str) -> str:
        return name if schema is None else f'"{schema}".{name}'

    def read(conn: Connection) -> Snapshot:
        if conn.dialect.name == "postgresql":
            # One round trip: each table's rows as text, in one order.
            query = " UNION ALL ".join(
                f"SELECT '{name}', (SELECT coalesce(string_agg(r::text, E'\\n' ORDER BY "
                f"r::text), '') FROM {qualified(name)} r)"
                for name in names
            )
            return {name: [(rows,)] for name, rows in conn.exec_driver_sql(query).all()}
        return {
            name: sorted((repr(row),) for row in conn.exec_driver_sql(f"SELECT * FROM {name}"))
            for name in names
        }

    return await run_sql(store, read)
