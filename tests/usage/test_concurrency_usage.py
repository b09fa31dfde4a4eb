"""Usage rows from several OS processes at once: each request id is written exactly once."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
import sqlalchemy as sa

from llmstore import Store, StoreConfig, UsageRecord
from llmstore._db.schema import usage_logs
from llmstore.migrations._commands import upgrade
from llmstore.pytest_plugin import run_sql
from tests import processes

pytestmark = pytest.mark.slow

WORKERS = 4
BATCHES = 6
BATCH = 200
SHARED = 300  # request ids every worker tries to write, each twice


def _worker(config_json: str, worker: int, ready: Any, start: Any) -> dict[str, Any]:
    return asyncio.run(
        processes.open_and_wait(config_json, ready, start, lambda s: _write(s, worker))
    )


async def _write(store: Store, worker: int) -> dict[str, Any]:
    written, duplicates, failures = 0, [], []
    for batch in range(BATCHES):
        records = []
        for i in range(BATCH):
            n = batch * BATCH + i
            # Half of each batch races the other workers; the other half is this worker's.
            request_id = f"shared-{n // 2 % SHARED}" if i % 2 == 0 else f"w{worker}-{n}"
            records.append(UsageRecord(request_id=request_id, cost=1, origin=f"w{worker}"))
        try:
            result = await store.usage.record_many(records)
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
            continue
        written += result.written
        duplicates += result.duplicate_request_ids
        assert result.written + len(result.duplicate_request_ids) == BATCH
    return {"written": written, "duplicates": duplicates, "failures": failures}


async def test_racing_batches_write_each_request_id_once(db_config: StoreConfig) -> None:
    await upgrade(db_config)
    results = await processes.run_workers(
        _worker,
        [(processes.config_json(db_config), worker) for worker in range(WORKERS)],
    )
    assert [f for r in results for f in r["failures"]] == []

    async with Store(db_config) as store:

        def request_ids(conn: Any) -> Counter[str]:
            rows = conn.execute(sa.select(usage_logs.c.request_id)).scalars()
            return Counter(rows)

        stored = await run_sql(store, request_ids)
    own = WORKERS * BATCHES * BATCH // 2
    assert sum(stored.values()) == own + SHARED == sum(r["written"] for r in results)
    assert max(stored.values()) == 1
    # Every shared id was refused to all but one writer, every time after the first.
    refused = Counter(d for r in results for d in r["duplicates"])
    attempts_per_shared = WORKERS * (BATCHES * BATCH // 2) // SHARED
    assert set(refused) == {f"shared-{n}" for n in range(SHARED)}
    assert set(refused.values()) == {attempts_per_shared - 1}
