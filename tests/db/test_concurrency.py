"""Several OS processes against one SQLite file and one Postgres schema.

Each worker opens its own store and, in transactions that read before they write (the
pattern that makes a deferred SQLite transaction fail with "database is locked"), creates
its own projects; it also races the other workers for a set of shared names.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from typing import Any

import pytest

from llmstore import ConflictError, Store, StoreConfig
from llmstore.migrations._commands import upgrade
from tests import processes

WORKERS = 4
ROUNDS = 40


def _worker(config_json: str, worker: int, start: Any) -> tuple[int, int, list[str]]:
    config = StoreConfig.model_validate_json(config_json)
    return asyncio.run(_work(config, worker, start))


async def _work(config: StoreConfig, worker: int, start: Any) -> tuple[int, int, list[str]]:
    won = lost = 0
    failures: list[str] = []
    async with Store(config) as store:
        start.wait()
        for round_ in range(ROUNDS):
            try:
                async with store.transaction() as tx:
                    await tx.projects.list(limit=5)
                    await asyncio.sleep(0.002)  # widen the window between read and write
                    own = await tx.projects.create(f"w{worker}-r{round_}")
                    await tx.projects.update(own.id, name=f"w{worker}-r{round_}-done")
                try:
                    await store.projects.create(f"shared-{round_}")
                    won += 1
                except ConflictError:
                    lost += 1
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
    return won, lost, failures


@pytest.mark.slow
async def test_processes_write_concurrently_without_locking_errors(db_config: StoreConfig) -> None:
    await upgrade(db_config)
    context = multiprocessing.get_context("spawn")
    manager = context.Manager()
    start = manager.Event()
    try:
        with context.Pool(WORKERS) as pool:
            pending = [
                pool.apply_async(_worker, (processes.config_json(db_config), worker, start))
                for worker in range(WORKERS)
            ]
            await asyncio.sleep(0.5)
            start.set()
            results = await asyncio.to_thread(lambda: [p.get(timeout=240) for p in pending])
    finally:
        manager.shutdown()
    failures = [failure for _won, _lost, fails in results for failure in fails]
    assert failures == []
    assert sum(won for won, _lost, _ in results) == ROUNDS
    assert sum(lost for _won, lost, _ in results) == ROUNDS * (WORKERS - 1)
    async with Store(db_config) as store:
        names = [p.name for p in await store.projects.list(limit=1000)]
    own = {f"w{w}-r{r}-done" for w in range(WORKERS) for r in range(ROUNDS)}
    shared = {f"shared-{r}" for r in range(ROUNDS)}
    assert sorted(names) == sorted(own | shared)
