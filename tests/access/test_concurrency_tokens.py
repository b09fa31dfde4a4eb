"""Tokens, the audit chain and provider credentials under several OS processes.

Every test starts worker processes ("spawn") against one SQLite file or one Postgres
schema. Each worker opens its own store, waits until every worker is ready, then all of
them start together on a shared event. Workers never let an exception escape: they
report what they saw, and the test asserts on it and on the final state of the database.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import uuid
from collections import Counter
from typing import Any

import pytest
import sqlalchemy as sa

from llmstore import AuditEvent, Store, StoreConfig, TokenRejectedError
from llmstore._db.schema import provider_credentials
from llmstore.migrations._commands import upgrade
from llmstore.pytest_plugin import run_sql
from tests import processes

WORKERS = 4
GENESIS = "0" * 64

pytestmark = pytest.mark.slow


# -- 1. quota exactness ------------------------------------------------------------------

QUOTA = 60
CALLS_PER_WORKER = QUOTA * 3 // 4
BATCH = 5


def _spend_worker(config_json: str, secret: str, ready: Any, start: Any) -> Any:
    return asyncio.run(
        processes.open_and_wait(config_json, ready, start, lambda s: _spend(s, secret))
    )


async def _spend(store: Store, secret: str) -> tuple[list[int], list[str], list[str]]:
    counts: list[int] = []
    reasons: list[str] = []
    failures: list[str] = []

    async def one() -> None:
        try:
            token = await store.tokens.use(secret)
        except TokenRejectedError as exc:
            reasons.append(exc.reason)
        except Exception as exc:
            failures.append(processes.failure(exc))
        else:
            counts.append(token.request_count)

    for _ in range(CALLS_PER_WORKER // BATCH):
        await asyncio.gather(*(one() for _ in range(BATCH)))
    return counts, reasons, failures


async def test_processes_never_overspend_a_token_quota(db_config: StoreConfig) -> None:
    await upgrade(db_config)
    async with Store(db_config) as store:
        project = await store.projects.create("quota")
        issued = await store.tokens.create(project.id, max_requests=QUOTA)
    assert CALLS_PER_WORKER % BATCH == 0

    results = await processes.run_workers(
        _spend_worker, [(processes.config_json(db_config), issued.secret)] * WORKERS
    )

    counts = [count for worker_counts, _, _ in results for count in worker_counts]
    reasons = [reason for _, worker_reasons, _ in results for reason in worker_reasons]
    failures = [failure for _, _, worker_failures in results for failure in worker_failures]
    assert failures == []
    assert len(counts) + len(reasons) == WORKERS * CALLS_PER_WORKER
    assert len(counts) == QUOTA
    # Each successful use saw its own increment: the counts returned are 1..Q, once each.
    assert sorted(counts) == list(range(1, QUOTA + 1))
    assert set(reasons) == {"quota_exhausted"}
    assert len(reasons) == WORKERS * CALLS_PER_WORKER - QUOTA
    async with Store(db_config) as store:
        token = await store.tokens.get(issued.token.id)
        assert token.request_count == QUOTA
        assert token.remaining_requests == 0
        assert token.cache_hit_count == 0
        assert token.last_used_at is not None
        # A spent quota still serves cache hits, which spend nothing.
        hit = await store.tokens.use(issued.secret, cache_hit=True)
        assert (hit.request_count, hit.cache_hit_count) == (QUOTA, 1)
        with pytest.raises(TokenRejectedError) as refused:
            await store.tokens.use(issued.secret)
        assert refused.value.reason == "quota_exhausted"


# -- 2. one audit chain from several processes ---------------------------------------------

AUDIT_BATCHES = 6
RECORDS_PER_BATCH = 5
EVENTS_PER_WORKER = AUDIT_BATCHES * (RECORDS_PER_BATCH + 1)


def _audit_worker(config_json: str, worker: int, ready: Any, start: Any) -> Any:
    return asyncio.run(
        processes.open_and_wait(config_json, ready, start, lambda s: _audit(s, worker))
    )


async def _audit(store: Store, worker: int) -> tuple[list[int], list[str], list[str]]:
    seqs: list[int] = []
    project_ids: list[str] = []
    failures: list[str] = []
    actor = f"worker-{worker}"

    async def record(batch: int, index: int) -> None:
        try:
            event = await store.audit.record(
                "test.event",
                actor,
                "success",
                request_id=f"w{worker}-b{batch}-i{index}",
                metadata={"worker": worker, "batch": batch, "index": index},
            )
        except Exception as exc:
            failures.append(processes.failure(exc))
        else:
            seqs.append(event.seq)

    async def create_project(batch: int) -> None:
        try:
            project = await store.projects.create(f"w{worker}-p{batch}", actor=actor)
        except Exception as exc:
            failures.append(processes.failure(exc))
        else:
            project_ids.append(str(project.id))

    for batch in range(AUDIT_BATCHES):
        await asyncio.gather(
            create_project(batch), *(record(batch, index) for index in range(RECORDS_PER_BATCH))
        )
    return seqs, project_ids, failures


async def test_processes_append_to_one_unbroken_audit_chain(db_config: StoreConfig) -> None:
    await upgrade(db_config)
    config_json = processes.config_json(db_config)

    results = await processes.run_workers(_audit_worker, [(config_json, w) for w in range(WORKERS)])

    failures = [failure for _, _, worker_failures in results for failure in worker_failures]
    assert failures == []
    recorded_seqs = [seq for seqs, _, _ in results for seq in seqs]
    assert len(recorded_seqs) == len(set(recorded_seqs)) == WORKERS * AUDIT_BATCHES * 5
    created = {uuid.UUID(pid) for _, project_ids, _ in results for pid in project_ids}
    assert len(created) == WORKERS * AUDIT_BATCHES
    total = WORKERS * EVENTS_PER_WORKER

    async with Store(db_config) as store:
        verification = await store.audit.verify()
        assert verification.ok, verification.message
        assert verification.events_checked == total
        assert (verification.anchor_seq, verification.head_seq) == (0, total)
        newest_first = await store.audit.list(limit=1000)
    events: list[AuditEvent] = list(reversed(newest_first))
    assert [event.seq for event in events] == list(range(1, total + 1))
    assert events[0].prev_hash == GENESIS
    for previous, event in itertools.pairwise(events):
        assert event.prev_hash == previous.hash, f"event {event.seq} does not link"
        assert event.timestamp >= previous.timestamp, f"event {event.seq} goes back in time"
    assert len({event.hash for event in events}) == total
    # Every event written is there exactly once, under the seq its writer was told.
    records = [event for event in events if event.action == "test.event"]
    assert sorted(event.seq for event in records) == sorted(recorded_seqs)
    expected_requests = {
        f"w{w}-b{b}-i{i}"
        for w in range(WORKERS)
        for b in range(AUDIT_BATCHES)
        for i in range(RECORDS_PER_BATCH)
    }
    assert sorted(event.request_id or "" for event in records) == sorted(expected_requests)
    creates = [event for event in events if event.action == "project.create"]
    assert {event.project_id for event in creates} == created
    assert len(creates) == len(created)
    for worker in range(WORKERS):
        own = [event for event in events if event.actor == f"worker-{worker}"]
        assert len(own) == EVENTS_PER_WORKER


# -- 3. ensure_default from replicas -------------------------------------------------------

# Each round, every worker races the others to ensure one (provider, model); a model seen
# for the first time is created by exactly one of them. The last round is gpt-4o.
MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-4o", "gpt-4.1", "o3-mini", "gpt-4.1-mini", "gpt-4o")
ENSURES_PER_ROUND = 3


def _ensure_worker(config_json: str, ready: Any, start: Any, barrier: Any) -> Any:
    return asyncio.run(
        processes.open_and_wait(config_json, ready, start, lambda s: _ensure(s, barrier))
    )


async def _ensure(store: Store, barrier: Any) -> tuple[list[tuple[str, str, bool, str]], list[str]]:
    seen: list[tuple[str, str, bool, str]] = []
    failures: list[str] = []

    async def ensure(model: str) -> None:
        try:
            credential = await store.providers.ensure_default("openai", model, api_key="sk-test")
        except Exception as exc:
            failures.append(processes.failure(exc))
        else:
            seen.append((model, str(credential.id), credential.is_active, credential.model))

    for model in MODELS:
        try:
            barrier.wait(processes.READY_TIMEOUT)
        except threading.BrokenBarrierError as exc:
            failures.append(processes.failure(exc))
            break
        await asyncio.gather(*(ensure(model) for _ in range(ENSURES_PER_ROUND)))
    return seen, failures


async def test_replicas_ensure_one_default_credential(db_config: StoreConfig) -> None:
    await upgrade(db_config)

    results = await processes.run_workers(
        _ensure_worker, [(processes.config_json(db_config),)] * WORKERS, round_barrier=True
    )

    failures = [failure for _, worker_failures in results for failure in worker_failures]
    assert failures == []
    seen = [entry for worker_seen, _ in results for entry in worker_seen]
    assert len(seen) == WORKERS * len(MODELS) * ENSURES_PER_ROUND
    assert all(active for _, _, active, _ in seen)
    assert all(model == returned for model, _, _, returned in seen)
    async with Store(db_config) as store:
        credentials = await store.providers.list(limit=1000)
        # Exactly one global credential per (provider, model): nobody created a duplicate.
        assert all(c.project_id is None for c in credentials)
        per_key = Counter((c.provider, c.model) for c in credentials)
        assert per_key == Counter({("openai", model): 1 for model in MODELS})
        # Every replica was handed that one credential.
        by_model = {c.model: str(c.id) for c in credentials}
        assert {(model, by_model[model]) for model, _, _, _ in seen} == {
            (model, credential_id) for model, credential_id, _, _ in seen
        }
        active = [c for c in credentials if c.is_active]
        assert len(active) == 1
        assert active[0].model == MODELS[-1]
        resolved = await store.providers.resolve((await store.projects.create("any")).id)
        assert resolved.id == active[0].id
        for credential in credentials:
            assert await store.providers.reveal_api_key(credential.id) == "sk-test"


# -- 4. activate races in one scope --------------------------------------------------------

CREDENTIALS = 4
ACTIVATE_ROUNDS = 6


def _activate_worker(config_json: str, worker: int, ids: list[str], ready: Any, start: Any) -> Any:
    return asyncio.run(
        processes.open_and_wait(config_json, ready, start, lambda s: _activate(s, worker, ids))
    )


async def _activate(
    store: Store, worker: int, ids: list[str]
) -> tuple[list[tuple[str, str, bool]], list[str]]:
    seen: list[tuple[str, str, bool]] = []
    failures: list[str] = []

    async def activate(target: str) -> None:
        try:
            credential = await store.providers.activate(target)
        except Exception as exc:
            failures.append(processes.failure(exc))
        else:
            seen.append((target, str(credential.id), credential.is_active))

    for round_ in range(ACTIVATE_ROUNDS):
        first = (worker + round_) % len(ids)
        await asyncio.gather(activate(ids[first]), activate(ids[(first + 1) % len(ids)]))
    return seen, failures


async def _active_ids(store: Store, scope: str) -> list[uuid.UUID]:
    table = provider_credentials
    return await run_sql(
        store,
        lambda conn: list(
            conn.execute(
                sa.select(table.c.id).where(table.c.scope == scope, table.c.is_active == sa.true())
            ).scalars()
        ),
    )


async def test_concurrent_activations_leave_one_active_credential(db_config: StoreConfig) -> None:
    await upgrade(db_config)
    async with Store(db_config) as store:
        project = await store.projects.create("switching")
        global_default = await store.providers.create("openai", "gpt-4o", api_key="sk-global")
        ids = [
            str((await store.providers.create("openai", f"m{n}", project_id=project.id)).id)
            for n in range(CREDENTIALS)
        ]
        assert await _active_ids(store, str(project.id)) == [uuid.UUID(ids[0])]
    config_json = processes.config_json(db_config)

    results = await processes.run_workers(
        _activate_worker, [(config_json, w, ids) for w in range(WORKERS)]
    )

    failures = [failure for _, worker_failures in results for failure in worker_failures]
    assert failures == []
    seen = [entry for worker_seen, _ in results for entry in worker_seen]
    assert len(seen) == WORKERS * ACTIVATE_ROUNDS * 2
    assert all(target == got and active for target, got, active in seen)
    async with Store(db_config) as store:
        active = await _active_ids(store, str(project.id))
        assert len(active) == 1
        assert str(active[0]) in ids
        # The other scope was never touched.
        assert await _active_ids(store, "global") == [global_default.id]
        listed = await store.providers.list(project_id=project.id)
        assert sorted(str(c.id) for c in listed) == sorted(ids)
        assert [c.id for c in listed if c.is_active] == active
        assert (await store.providers.resolve(project.id)).id == active[0]
