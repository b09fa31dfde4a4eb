"""A database with a row in every table, and a snapshot of every row: for tests that must
show that data survived (or came back) whole."""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy.engine import Connection

from llmstore import Store, StoreConfig, UsageRecord
from llmstore._core.signing import generate_signing_key
from llmstore._db.admission_schema import (
    admission_budgets,
    admission_windows,
    admissions,
    budget_crossings,
    budget_periods,
    budgets,
    rate_limits,
    rate_windows,
)
from llmstore._db.schema import VERSION_TABLE, api_keys, metadata
from llmstore.migrations import _commands as _migrations
from llmstore.pytest_plugin import run_sql

Snapshot = dict[str, list[tuple[Any, ...]]]


async def seed(config: StoreConfig) -> None:
    """A row in every table of the head schema."""
    signed = config.model_copy(update={"receipt_signing_key": SecretStr(generate_signing_key())})
    async with Store(signed) as store:
        project = await store.projects.create("seeded", api_key="sk-upstream-secret")
        await store.providers.create("openai", "gpt-4o", project.id, api_key="sk-provider")
        token = (await store.tokens.create(project.id, name="seeded", actor="tests")).token
        key = (await store.api_keys.create(1_000, project.id)).key
        await store.api_keys.charge(key.id, 10, idempotency_key="c1")
        reservation = await store.api_keys.reserve(key.id, 20)
        await store.api_keys.withdraw(key.id, 30, "cashuAsecret", "https://mint.example")
        await store.prices.set("openai", "gpt-4o", input="2.5", output="10", cached_input="1.25")
        recorded = await store.usage.record(UsageRecord(model="m", cost=3, request_id="r1"))
        usage_id = recorded.ids[0]
        assert usage_id is not None
        await store.usage.issue_receipt(usage_id)
        retired = (await store.api_keys.create(0)).key
        hold = _Hold(project.id, key.id, token.id, reservation.id, usage_id, retired.id)
        await run_sql(store, functools.partial(_admit, hold=hold), write=True)


@dataclass(frozen=True)
class _Hold:
    project_id: uuid.UUID
    api_key_id: uuid.UUID
    token_id: uuid.UUID
    reservation_id: uuid.UUID
    usage_id: int
    retired_key_id: uuid.UUID


def _admit(conn: Connection, hold: _Hold) -> None:
    """A budget and a rate limit, an admission held on both, and their rows, and a
    deactivated key (the store has no calls for them yet): written as llmstore's models
    describe them."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    conn.execute(
        sa.update(api_keys)
        .where(api_keys.c.id == hold.retired_key_id)
        .values(is_active=False, deactivated_at=now)
    )
    day, minute = now.replace(hour=0, minute=0, second=0), now.replace(second=0)
    budget, limit, admission = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    conn.execute(
        sa.insert(budgets).values(
            id=budget,
            name="seeded",
            api_key_id=hold.api_key_id,
            limit_amount=100,
            period="day",
            timezone="UTC",
            soft_limits=[50, 80],
            anchor_at=day,
            created_at=now,
            updated_at=now,
        )
    )
    conn.execute(
        sa.insert(budget_periods).values(budget_id=budget, period_start=day, spent=60, reserved=20)
    )
    conn.execute(
        sa.insert(budget_crossings).values(
            budget_id=budget,
            period_start=day,
            threshold=50,
            admission_id=admission,
            at_settle=False,
            crossed_at=now,
        )
    )
    conn.execute(
        sa.insert(rate_limits).values(
            id=limit,
            project_id=hold.project_id,
            max_requests=10,
            max_tokens=1_000,
            per="minute",
            created_at=now,
            updated_at=now,
        )
    )
    conn.execute(
        sa.insert(rate_windows).values(
            rate_limit_id=limit, window_start=minute, requests=1, tokens=100
        )
    )
    conn.execute(
        sa.insert(admissions).values(
            id=admission,
            api_key_id=hold.api_key_id,
            token_id=hold.token_id,
            project_id=hold.project_id,
            end_user="user-1",
            tags=["seeded"],
            reservation_id=hold.reservation_id,
            cost=20,
            tokens=100,
            status="active",
            idempotency_key="a1",
            created_at=now,
            expires_at=now + dt.timedelta(minutes=5),
            usage_id=hold.usage_id,
        )
    )
    conn.execute(
        sa.insert(admission_budgets).values(
            admission_id=admission, budget_id=budget, period_start=day, amount=20
        )
    )
    conn.execute(
        sa.insert(admission_windows).values(
            admission_id=admission, rate_limit_id=limit, window_start=minute, tokens=100
        )
    )


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
