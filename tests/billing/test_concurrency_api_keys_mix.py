"""Prepaid API keys under several OS processes: a mix of every operation conserves money.

How the workers run and what is checked: ``concurrency_api_keys_support``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import threading
from collections import Counter, defaultdict
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore import InsufficientBalanceError, Store, StoreConfig
from llmstore.migrations._commands import upgrade
from llmstore.pytest_plugin import run_sql
from tests import processes
from tests.billing.concurrency_api_keys_support import MINT, TOKEN, WORKERS, L, _check_ledger

pytestmark = pytest.mark.slow


def _kind_counts(conn: Connection) -> Counter[str]:
    rows = conn.execute(sa.select(L.c.kind, sa.func.count()).group_by(L.c.kind)).all()
    return Counter({row[0]: int(row[1]) for row in rows})


KEYS = 4
OPENING = 5000
ROUNDS = 6
OPS_PER_ROUND = 8
WITHDRAWAL_PATHS: list[tuple[str, ...]] = [
    (),
    ("complete",),
    ("fail",),
    ("fail", "retry"),
    ("fail", "retry", "complete"),
    ("fail", "retry", "fail"),
]
OPS = ("charge", "deposit", "hold", "short_hold", "transfer", "withdraw", "expire")


def _mix_worker(
    config_json: str, worker: int, key_ids: list[str], ready: Any, start: Any, barrier: Any
) -> dict[str, Any]:
    return asyncio.run(
        processes.open_and_wait(
            config_json, ready, start, lambda s: _mix(s, worker, key_ids, barrier)
        )
    )


async def _mix(store: Store, worker: int, key_ids: list[str], barrier: Any) -> dict[str, Any]:
    rng = random.Random(1000 + worker)
    keys = store.api_keys
    done: dict[str, Any] = {
        "deposits": [],  # (key, amount)
        "charges": [],  # (key, amount)
        "settled": [],  # (hold id, key, hold, actual, charged)
        "released": [],  # hold ids
        "short": [],  # hold ids left to expire
        "transfers": [],  # (from, to, amount)
        "withdrawals": [],  # (id, key, amount, final status, retries that debited)
        "expired": [],  # counts returned by expire_reservations
        "refused": Counter(),
        "failures": [],
    }

    async def run(op: str) -> None:
        key = rng.choice(key_ids)
        amount = rng.randint(1, 400)
        try:
            if op == "charge":
                await keys.charge(key, amount)
                done["charges"].append((key, amount))
            elif op == "deposit":
                await keys.deposit(key, amount)
                done["deposits"].append((key, amount))
            elif op == "hold":
                hold = await keys.reserve(key, amount)
                await asyncio.sleep(rng.random() * 0.01)
                if rng.random() < 0.5:
                    actual = rng.randint(1, 2 * amount)
                    settled = await keys.settle(hold.id, actual)
                    charged = -settled.amount
                    assert charged + settled.shortfall == actual
                    done["settled"].append((str(hold.id), key, amount, actual, charged))
                else:
                    await keys.release(hold.id)
                    done["released"].append(str(hold.id))
            elif op == "short_hold":
                hold = await keys.reserve(key, amount, ttl=dt.timedelta(milliseconds=1))
                done["short"].append(str(hold.id))
            elif op == "transfer":
                # Opposing transfers between the same two keys, from every worker.
                pair = key_ids[:2] if rng.random() < 0.5 else key_ids[1::-1]
                await keys.transfer(pair[0], pair[1], amount)
                done["transfers"].append((pair[0], pair[1], amount))
            elif op == "withdraw":
                await withdraw(key, amount)
            elif op == "expire":
                done["expired"].append(await keys.expire_reservations())
        except InsufficientBalanceError:
            done["refused"][op] += 1
        except Exception as exc:
            done["failures"].append(processes.failure(exc, op))

    async def withdraw(key: str, amount: int) -> None:
        payout = await keys.withdraw(key, amount, TOKEN, MINT)
        status, debits = "pending", 1
        for step in rng.choice(WITHDRAWAL_PATHS):
            await asyncio.sleep(0)
            if step == "complete":
                status = (await keys.complete_withdrawal(payout.id)).status
            elif step == "fail":
                status = (await keys.fail_withdrawal(payout.id, "mint offline")).status
            else:
                try:
                    status = (await keys.retry_withdrawal(payout.id)).status
                    debits += 1
                except InsufficientBalanceError:
                    done["refused"]["retry"] += 1
                    break
        done["withdrawals"].append((str(payout.id), key, amount, status, debits))

    for _ in range(ROUNDS):
        ops = [rng.choice(OPS[:-1]) for _ in range(OPS_PER_ROUND)]
        if worker < 2:
            ops.append("expire")
        await asyncio.gather(*(run(op) for op in ops))
    # Every short hold has been made; two replicas sweep at the same moment.
    try:
        barrier.wait(processes.READY_TIMEOUT)
    except threading.BrokenBarrierError as exc:
        done["failures"].append(processes.failure(exc, "barrier"))
    if worker < 2:
        await asyncio.sleep(0.01)
        await run("expire")
    return done


async def test_mixed_operations_conserve_money(db_config: StoreConfig) -> None:
    await upgrade(db_config)
    async with Store(db_config) as store:
        key_ids = [str((await store.api_keys.create(balance=OPENING)).key.id) for _ in range(KEYS)]

    config_json = processes.config_json(db_config)
    results: list[dict[str, Any]] = await processes.run_workers(
        _mix_worker, [(config_json, w, key_ids) for w in range(WORKERS)], round_barrier=True
    )

    assert [failure for done in results for failure in done["failures"]] == []
    merged: dict[str, list[Any]] = defaultdict(list)
    refused: Counter[str] = Counter()
    for done in results:
        refused += done.pop("refused")
        for name, values in done.items():
            merged[name] += values
    # The workload did what it is for: every kind of operation succeeded somewhere.
    for name in ("deposits", "charges", "settled", "released", "short", "transfers"):
        assert merged[name], name
    assert {status for _, _, _, status, _ in merged["withdrawals"]} >= {"completed", "failed"}
    transfer_pairs = {(src, dst) for src, dst, _ in merged["transfers"]}
    assert transfer_pairs == {(key_ids[0], key_ids[1]), (key_ids[1], key_ids[0])}

    balance = dict.fromkeys(key_ids, OPENING)
    deposited = dict.fromkeys(key_ids, OPENING)
    spent = dict.fromkeys(key_ids, 0)
    for key, amount in merged["deposits"]:
        balance[key] += amount
        deposited[key] += amount
    for key, amount in merged["charges"]:
        balance[key] -= amount
        spent[key] += amount
    for _, key, _, actual, charged in merged["settled"]:
        assert 0 <= charged <= actual
        balance[key] -= charged
        spent[key] += charged
    for src, dst, amount in merged["transfers"]:
        balance[src] -= amount
        balance[dst] += amount
    withdrawn = 0
    for _, key, amount, status, _ in merged["withdrawals"]:
        if status != "failed":
            balance[key] -= amount
            withdrawn += amount
    # Each short hold expired exactly once, whichever sweep (or sweeper) took it.
    assert sum(merged["expired"]) == len(merged["short"])

    async with Store(db_config) as store:
        keys = {key_id: await store.api_keys.get(key_id) for key_id in key_ids}
        for key_id, key in keys.items():
            assert key.balance == balance[key_id], key_id
            assert key.reserved == 0, key_id
            assert (key.total_deposited, key.total_spent) == (deposited[key_id], spent[key_id])
        # Transfers net to zero: the sum of balances is what came in minus what went out.
        assert sum(key.balance for key in keys.values()) == (
            sum(deposited.values()) - sum(spent.values()) - withdrawn
        )
        await _check_ledger(store)
        counts = await run_sql(store, _kind_counts)
        debits = sum(n for _, _, _, _, n in merged["withdrawals"])
        assert (
            counts
            == Counter(
                {
                    "deposit": KEYS + len(merged["deposits"]),
                    "charge": len(merged["charges"]),
                    "settlement": len(merged["settled"]),
                    "transfer_in": len(merged["transfers"]),
                    "transfer_out": len(merged["transfers"]),
                    "withdrawal": debits,
                    "withdrawal_refund": debits
                    - sum(w[3] != "failed" for w in merged["withdrawals"]),
                }
            )
            - Counter()
        )
        for hold_id, _, hold, _, charged in merged["settled"]:
            settled = await store.api_keys.get_reservation(hold_id)
            assert (settled.status, settled.amount, settled.settled_amount) == (
                "settled",
                hold,
                charged,
            )
        for hold_id in merged["released"]:
            assert (await store.api_keys.get_reservation(hold_id)).status == "released"
        for hold_id in merged["short"]:
            expired = await store.api_keys.get_reservation(hold_id)
            assert expired.status == "expired" and expired.finished_at is not None
        for payout_id, _, amount, status, debits_made in merged["withdrawals"]:
            payout = await store.api_keys.get_withdrawal(payout_id)
            assert (payout.status, payout.amount) == (status, amount)
            assert payout.retry_count == debits_made - (status != "failed")
        assert await store.api_keys.expire_reservations() == 0
