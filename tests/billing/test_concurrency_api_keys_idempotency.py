"""Prepaid API keys under several OS processes: identical idempotent calls race to one
effect.

How the workers run and what is checked: ``concurrency_api_keys_support``.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import Awaitable
from typing import Any

import pytest

from llmstore import IdempotencyConflictError, Store, StoreConfig
from llmstore.migrations._commands import upgrade
from tests import processes
from tests.billing.concurrency_api_keys_support import WORKERS, _check_ledger

pytestmark = pytest.mark.slow


RACERS_PER_WORKER = 5
IDEM_CHARGE = 50
IDEM_DEPOSIT = 70
IDEM_TRANSFER = 30
MIXED = (40, 45)


def _idempotent_worker(
    config_json: str, worker: int, source: str, target: str, ready: Any, start: Any
) -> dict[str, list[Any]]:
    return asyncio.run(
        processes.open_and_wait(
            config_json, ready, start, lambda s: _idempotent(s, worker, source, target)
        )
    )


async def _idempotent(store: Store, worker: int, source: str, target: str) -> dict[str, list[Any]]:
    seen: dict[str, list[Any]] = defaultdict(list)

    async def record(name: str, call: Awaitable[Any]) -> None:
        try:
            result = await call
        except IdempotencyConflictError:
            seen[f"{name}:conflict"].append(1)
        except Exception as exc:
            seen["failures"].append(processes.failure(exc, name))
        else:
            if isinstance(result, tuple):
                seen[name].append(tuple((e.id, e.kind, e.amount, e.api_key_id.hex) for e in result))
            else:
                seen[name].append((result.id, result.kind, result.amount, result.balance_after))

    keys = store.api_keys
    mixed = MIXED[worker % 2]
    calls = []
    for _ in range(RACERS_PER_WORKER):
        calls += [
            record("charge", keys.charge(source, IDEM_CHARGE, "race-charge", "same")),
            record("deposit", keys.deposit(source, IDEM_DEPOSIT, "race-deposit", "same")),
            record("transfer", keys.transfer(source, target, IDEM_TRANSFER, "race-transfer")),
            record(f"mixed-{mixed}", keys.charge(target, mixed, "race-mixed")),
        ]
    # A worker's calls are interleaved; the four kinds run concurrently.
    await asyncio.gather(*calls)
    return dict(seen)


async def test_identical_idempotent_calls_race_to_one_effect(db_config: StoreConfig) -> None:
    await upgrade(db_config)
    async with Store(db_config) as store:
        source = (await store.api_keys.create(balance=1000)).key.id
        target = (await store.api_keys.create(balance=100)).key.id

    config_json = processes.config_json(db_config)
    results: list[dict[str, list[Any]]] = await processes.run_workers(
        _idempotent_worker,
        [(config_json, worker, str(source), str(target)) for worker in range(WORKERS)],
    )

    merged: dict[str, list[Any]] = defaultdict(list)
    for result in results:
        for name, values in result.items():
            merged[name] += values
    assert merged.pop("failures", []) == []
    racers = WORKERS * RACERS_PER_WORKER
    # Every caller got the one entry (the same id): the balance moved once.
    for name in ("charge", "deposit", "transfer"):
        assert len(merged[name]) == racers, name
        assert len(set(merged[name])) == 1, (name, Counter(merged[name]))
    (charge_id, kind, amount, _) = merged["charge"][0]
    assert (kind, amount) == ("charge", -IDEM_CHARGE)
    (deposit_id, kind, amount, _) = merged["deposit"][0]
    assert (kind, amount) == ("deposit", IDEM_DEPOSIT)
    debit, credit = merged["transfer"][0]
    assert debit[1:] == ("transfer_out", -IDEM_TRANSFER, source.hex)
    assert credit[1:] == ("transfer_in", IDEM_TRANSFER, target.hex)
    # The same key with other parameters: one amount won, every caller of the other lost.
    winners = [amount for amount in MIXED if merged.get(f"mixed-{amount}")]
    assert len(winners) == 1, {name: len(values) for name, values in merged.items()}
    won = winners[0]
    lost = next(amount for amount in MIXED if amount != won)
    assert len(merged[f"mixed-{won}"]) == racers // 2
    assert len(set(merged[f"mixed-{won}"])) == 1
    assert len(merged[f"mixed-{lost}:conflict"]) == racers // 2
    assert f"mixed-{won}:conflict" not in merged

    async with Store(db_config) as store:
        src = await store.api_keys.get(source)
        dst = await store.api_keys.get(target)
        assert src.balance == 1000 - IDEM_CHARGE + IDEM_DEPOSIT - IDEM_TRANSFER
        assert (src.total_deposited, src.total_spent) == (1000 + IDEM_DEPOSIT, IDEM_CHARGE)
        assert dst.balance == 100 + IDEM_TRANSFER - won
        assert (dst.total_deposited, dst.total_spent) == (100, won)
        src_history = await store.api_keys.ledger(source)
        dst_history = await store.api_keys.ledger(target)
        assert Counter(e.kind for e in src_history) == {
            "deposit": 2,
            "charge": 1,
            "transfer_out": 1,
        }
        assert Counter(e.kind for e in dst_history) == {
            "deposit": 1,
            "transfer_in": 1,
            "charge": 1,
        }
        by_key = Counter(e.idempotency_key for e in src_history + dst_history)
        assert by_key == {
            None: 3,  # two opening deposits and the transfer's credit
            "race-charge": 1,
            "race-deposit": 1,
            "race-transfer": 1,
            "race-mixed": 1,
        }
        assert {e.id for e in src_history} >= {charge_id, deposit_id, debit[0]}
        await _check_ledger(store)
