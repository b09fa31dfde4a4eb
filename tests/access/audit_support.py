"""Helpers shared by the ``test_audit_*`` modules (the tamper-evident audit log): read
the chain, record events, and tamper with the rows directly."""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Any

import sqlalchemy as sa

from llmstore import AuditEvent, Store
from llmstore._db.schema import audit_chain, audit_events
from llmstore.pytest_plugin import run_sql

GENESIS = "0" * 64
UTC_PLUS_5 = dt.timezone(dt.timedelta(hours=5))


async def _chain_row(store: Store) -> Any:
    return await run_sql(
        store, lambda conn: conn.execute(sa.select(audit_chain).where(audit_chain.c.id == 1)).one()
    )


async def _record_n(store: Store, n: int, **fields: Any) -> list[AuditEvent]:
    events = []
    for i in range(n):
        events.append(
            await store.audit.record(
                fields.get("action", f"test.action{i % 3}"),
                fields.get("actor", f"actor-{i % 2}"),
                fields.get("outcome", "success"),
                metadata=fields.get("metadata", {"i": i}),
            )
        )
    return events


async def _tamper(store: Store, seq: int, **values: Any) -> None:
    """Change one event's columns directly, leaving its hash as it was."""
    count = await run_sql(
        store,
        lambda conn: (
            conn.execute(
                sa.update(audit_events).where(audit_events.c.seq == seq).values(**values)
            ).rowcount
        ),
        write=True,
    )
    assert count == 1


async def _delete(store: Store, *seqs: int) -> None:
    count = await run_sql(
        store,
        lambda conn: (
            conn.execute(sa.delete(audit_events).where(audit_events.c.seq.in_(seqs))).rowcount
        ),
        write=True,
    )
    assert count == len(seqs)


def _assert_chained(events: list[AuditEvent], first_prev: str = GENESIS) -> None:
    assert events[0].prev_hash == first_prev
    for before, after in itertools.pairwise(events):
        assert after.seq == before.seq + 1
        assert after.prev_hash == before.hash
        assert after.timestamp >= before.timestamp
