"""Prepaid API keys under several OS processes: charges and overrunning settlements never
overdraw a key.

How the workers run and what is checked: ``concurrency_api_keys_support``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from llmstore import InsufficientBalanceError, Store, StoreConfig
from llmstore.migrations._commands import upgrade
from tests import processes
from tests.billing.concurrency_api_keys_support import WORKERS, _check_ledger

pytestmark = pytest.mark.slow


BALANCE = 1000
CHARGE = 37
CHARGES = 50
CHARGES_PER_WORKER = [13, 13, 12, 12]


def _charge_worker(
    config_json: str, key_id: str, count: int, ready: Any, start: Any
) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]], list[str]]:
    return asyncio.run(
        processes.open_and_wait(config_json, ready, start, lambda s: _charges(s, key_id, count))
    )


async def _charges(
    store: Store, key_id: str, count: int
) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]], list[str]]:
    entries: list[tuple[int, int, int]] = []
    refusals: list[tuple[int, int]] = []
    failures: list[str] = []

    async def one(index: int) -> None:
        try:
            written = await store.api_keys.charge(key_id, CHARGE, description=f"c{index}")
        except InsufficientBalanceError as exc:
            refusals.append((exc.available, exc.requested))
        except Exception as exc:
            failures.append(processes.failure(exc, "charge"))
        else:
            entries.append((written.id, written.balance_after, written.amount))

    await asyncio.gather(*(one(index) for index in range(count)))
    return entries, refusals, failures


async def test_concurrent_charges_never_overdraw(db_config: StoreConfig) -> None:
    await upgrade(db_config)
    async with Store(db_config) as store:
        issued = await store.api_keys.create(balance=BALANCE)
    key_id = str(issued.key.id)
    assert sum(CHARGES_PER_WORKER) == CHARGES
    assert CHARGES * CHARGE > BALANCE and BALANCE % CHARGE != 0

    config_json = processes.config_json(db_config)
    results = await processes.run_workers(
        _charge_worker, [(config_json, key_id, count) for count in CHARGES_PER_WORKER]
    )

    assert [failure for _, _, failures in results for failure in failures] == []
    entries = [entry for worker_entries, _, _ in results for entry in worker_entries]
    refusals = [refusal for _, worker_refusals, _ in results for refusal in worker_refusals]
    paid = BALANCE // CHARGE
    left = BALANCE - paid * CHARGE
    assert len(entries) == paid
    assert len(refusals) == CHARGES - paid
    assert len({entry_id for entry_id, _, _ in entries}) == paid
    assert {amount for _, _, amount in entries} == {-CHARGE}
    # Every charge saw the balance its predecessors left: one of each, down to what is left.
    assert sorted(after for _, after, _ in entries) == [
        BALANCE - n * CHARGE for n in range(paid, 0, -1)
    ]
    # A refusal is only given once the money is truly gone, and names the real numbers.
    assert set(refusals) == {(left, CHARGE)}

    async with Store(db_config) as store:
        key = await store.api_keys.get(key_id)
        assert (key.balance, key.reserved) == (left, 0)
        assert (key.total_deposited, key.total_spent) == (BALANCE, paid * CHARGE)
        history = await store.api_keys.ledger(key_id, limit=1000)
        assert Counter(entry.kind for entry in history) == {"deposit": 1, "charge": paid}
        assert history[0].balance_after == left
        await _check_ledger(store)
        with pytest.raises(InsufficientBalanceError):
            await store.api_keys.charge(key_id, left + 1)


# Overrunning settlements racing charges on one key: each settlement charges what is
# available at the moment it runs (its hold plus the free balance), never more, so the key
# ends at exactly zero whatever the interleaving.
OVERRUN_BALANCE = 2000
OVERRUN_HOLD = 100
OVERRUN_ACTUAL = 10_000
OVERRUN_CHARGE = 50
OVERRUN_CHARGES_PER_WORKER = 12


def _overrun_worker(
    config_json: str, key_id: str, hold_id: str, ready: Any, start: Any
) -> dict[str, Any]:
    return asyncio.run(
        processes.open_and_wait(config_json, ready, start, lambda s: _overrun(s, key_id, hold_id))
    )


async def _overrun(store: Store, key_id: str, hold_id: str) -> dict[str, Any]:
    done: dict[str, Any] = {"charged": 0, "settled": None, "refused": 0, "failures": []}

    async def charge() -> None:
        try:
            await store.api_keys.charge(key_id, OVERRUN_CHARGE)
            done["charged"] += OVERRUN_CHARGE
        except InsufficientBalanceError:
            done["refused"] += 1
        except Exception as exc:
            done["failures"].append(processes.failure(exc, "charge"))

    async def settle() -> None:
        try:
            written = await store.api_keys.settle(hold_id, OVERRUN_ACTUAL)
            done["settled"] = (-written.amount, written.shortfall, written.balance_after)
        except Exception as exc:
            done["failures"].append(processes.failure(exc, "settle"))

    calls = [charge() for _ in range(OVERRUN_CHARGES_PER_WORKER)]
    calls.insert(OVERRUN_CHARGES_PER_WORKER // 2, settle())
    await asyncio.gather(*calls)
    return done


async def test_overrunning_settlements_racing_charges_end_at_zero(db_config: StoreConfig) -> None:
    await upgrade(db_config)
    async with Store(db_config) as store:
        key_id = str((await store.api_keys.create(balance=OVERRUN_BALANCE)).key.id)
        holds = [
            str((await store.api_keys.reserve(key_id, OVERRUN_HOLD)).id) for _ in range(WORKERS)
        ]
    assert WORKERS * OVERRUN_CHARGES_PER_WORKER * OVERRUN_CHARGE > OVERRUN_BALANCE

    config_json = processes.config_json(db_config)
    results = await processes.run_workers(
        _overrun_worker, [(config_json, key_id, hold) for hold in holds]
    )

    assert [failure for result in results for failure in result["failures"]] == []
    settled = [result["settled"] for result in results]
    for charged, shortfall, _ in settled:
        assert OVERRUN_HOLD <= charged <= OVERRUN_BALANCE
        assert charged + shortfall == OVERRUN_ACTUAL
    charges = sum(result["charged"] for result in results)
    assert charges + sum(charged for charged, _, _ in settled) == OVERRUN_BALANCE
    # The last settlement to run took everything that was left.
    assert min(after for _, _, after in settled) == 0
    async with Store(db_config) as store:
        key = await store.api_keys.get(key_id)
        assert (key.balance, key.reserved, key.total_spent) == (0, 0, OVERRUN_BALANCE)
        for hold in holds:
            assert (await store.api_keys.get_reservation(hold)).status == "settled"
        await _check_ledger(store)
