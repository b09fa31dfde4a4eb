"""Prepaid API keys under several OS processes, cancellation and killed connections.

The multi-process tests start worker processes ("spawn") against one SQLite file or one
Postgres schema, as in ``tests/access/test_concurrency_tokens.py``: each worker opens its
own store, waits until every worker is ready, then all of them start together. Workers never let an
exception escape; they report what they did, and the test checks the database against it:
the balances, the ledger, the holds and the withdrawals.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import sqlite3
import threading
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from llmstore import (
    DatabaseUnavailableError,
    IdempotencyConflictError,
    InsufficientBalanceError,
    Store,
    StoreConfig,
    generate_key,
)
from llmstore._db.schema import api_keys, ledger_entries, reservations, withdrawals
from llmstore.migrations._commands import upgrade
from llmstore.pytest_plugin import drop_schema, fresh_schema_name, run_sql
from tests import processes
from tests.helpers import CheckedOut, require_postgres, terminate_backends

WORKERS = 4
TOKEN = "cashuAeyJ0b2tlbiI6W3sicHJvb2ZzIjpbXX1dfQ"
MINT = "https://mint.example.com/v1"

pytestmark = pytest.mark.slow


# -- consistency checks on the tables themselves ---------------------------------------------

L = ledger_entries
R = reservations
W = withdrawals
K = api_keys


def _ledger_problems(conn: Connection) -> list[str]:
    """Cross-table invariants that verify() does not look at; empty when all hold."""
    problems: list[str] = []
    # Each key's entries, in id order, run up to each entry's balance_after.
    running: dict[uuid.UUID, int] = defaultdict(int)
    for row in conn.execute(
        sa.select(L.c.id, L.c.api_key_id, L.c.amount, L.c.balance_after).order_by(L.c.id)
    ):
        running[row.api_key_id] += row.amount
        if running[row.api_key_id] != row.balance_after or row.balance_after < 0:
            problems.append(f"entry {row.id}: balance_after {row.balance_after}")
    # Both halves of every transfer, and nothing else, share its transfer_id.
    transfers: dict[uuid.UUID | None, list[Any]] = defaultdict(list)
    for row in conn.execute(
        sa.select(L.c.transfer_id, L.c.kind, L.c.amount, L.c.api_key_id).where(
            sa.or_(L.c.transfer_id.is_not(None), L.c.kind.in_(["transfer_in", "transfer_out"]))
        )
    ):
        transfers[row.transfer_id].append(row)
    for transfer_id, rows in transfers.items():
        kinds = sorted(row.kind for row in rows)
        if (
            transfer_id is None
            or kinds != ["transfer_in", "transfer_out"]
            or sum(row.amount for row in rows) != 0
            or rows[0].api_key_id == rows[1].api_key_id
        ):
            problems.append(f"transfer {transfer_id}: {[tuple(row) for row in rows]}")
    # A settled hold has exactly one settlement entry, for what it charged; no other has one.
    settlements: dict[uuid.UUID | None, list[Any]] = defaultdict(list)
    for settlement in conn.execute(
        sa.select(L.c.reservation_id, L.c.amount, L.c.api_key_id).where(L.c.kind == "settlement")
    ):
        settlements[settlement.reservation_id].append(settlement)
    for hold in conn.execute(sa.select(R)):
        found = settlements.pop(hold.id, [])
        if hold.status == "settled":
            if len(found) != 1 or -found[0].amount != hold.settled_amount:
                problems.append(f"settled hold {hold.id}: {hold.settled_amount}, {found}")
            elif found[0].api_key_id != hold.api_key_id:
                problems.append(f"settled hold {hold.id} charged the wrong key")
        elif found:
            problems.append(f"{hold.status} hold {hold.id} has settlement entries {found}")
    if settlements:
        problems.append(f"settlement entries without a settled hold: {dict(settlements)}")
    # A withdrawal's debits minus refunds: one while pending or completed, none when failed.
    moves: dict[uuid.UUID | None, Counter[str]] = defaultdict(Counter)
    for move in conn.execute(
        sa.select(L.c.withdrawal_id, L.c.kind, L.c.amount).where(
            L.c.kind.in_(["withdrawal", "withdrawal_refund"])
        )
    ):
        moves[move.withdrawal_id][move.kind] += 1
        moves[move.withdrawal_id][f"{move.kind}:amount"] += abs(move.amount)
    for payout in conn.execute(sa.select(W.c.id, W.c.amount, W.c.status, W.c.retry_count)):
        seen = moves.pop(payout.id, Counter())
        debits, refunds = seen["withdrawal"], seen["withdrawal_refund"]
        expected_net = 0 if payout.status == "failed" else 1
        if (
            debits - refunds != expected_net
            or refunds != payout.retry_count
            or seen["withdrawal:amount"] != debits * payout.amount
            or seen["withdrawal_refund:amount"] != refunds * payout.amount
        ):
            problems.append(f"withdrawal {payout.id} ({payout.status}): {dict(seen)}")
    if moves:
        problems.append(f"withdrawal entries without a withdrawal: {dict(moves)}")
    return problems


async def _check_ledger(store: Store) -> None:
    report = await store.api_keys.verify()
    assert report.ok, report.mismatches
    assert await run_sql(store, _ledger_problems) == []


def _kind_counts(conn: Connection) -> Counter[str]:
    rows = conn.execute(sa.select(L.c.kind, sa.func.count()).group_by(L.c.kind)).all()
    return Counter({row[0]: int(row[1]) for row in rows})


# -- 1. no overdraft ---------------------------------------------------------------------------

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


# -- 2. idempotency races -----------------------------------------------------------------------

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


# -- 3. conservation under a mix ----------------------------------------------------------------

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


# -- 4. cancellation and killed connections -----------------------------------------------------

CANCEL_OPS = 240
CANCEL_BATCH = 12


async def _chaos(
    store: Store,
    key_ids: list[uuid.UUID],
    rng: random.Random,
    *,
    timeouts: bool,
    allowed: tuple[type[BaseException], ...],
    ops: int = CANCEL_OPS,
    tag: str = "",
) -> tuple[Counter[str], list[str], list[str]]:
    """Run ``ops`` random operations in batches; each may be cancelled at a random point."""
    outcomes: Counter[str] = Counter()
    failures: list[str] = []
    attempted_tx: list[str] = []
    keys = store.api_keys
    a, b, c = key_ids

    async def hold_then(settle: bool) -> None:
        hold = await keys.reserve(rng.choice(key_ids), rng.randint(1, 50))
        await asyncio.sleep(0)
        if settle:
            await keys.settle(hold.id, rng.randint(1, 100))
        else:
            await keys.release(hold.id)

    async def payout() -> None:
        made = await keys.withdraw(rng.choice(key_ids), rng.randint(1, 50), TOKEN, MINT)
        await keys.fail_withdrawal(made.id, "mint offline")
        await keys.retry_withdrawal(made.id)
        await keys.complete_withdrawal(made.id)

    async def in_transaction(n: int) -> None:
        name = f"tx-{tag}{n}"
        attempted_tx.append(name)
        async with store.transaction() as tx:
            await tx.api_keys.transfer(a, c, rng.randint(1, 20), idempotency_key=name)
            await tx.api_keys.charge(c, rng.randint(1, 20), idempotency_key=name)

    def pick(n: int) -> Callable[[], Awaitable[Any]]:
        choice = rng.randrange(8)
        amount = rng.randint(1, 60)
        src, dst = (a, b) if rng.random() < 0.5 else (b, a)
        return [
            lambda: keys.charge(rng.choice(key_ids), amount),
            lambda: keys.charge(src, amount, idempotency_key=f"c-{tag}{n}"),
            lambda: keys.deposit(rng.choice(key_ids), amount),
            lambda: keys.transfer(src, dst, amount),
            lambda: hold_then(True),
            lambda: hold_then(False),
            payout,
            lambda: in_transaction(n),
        ][choice]

    async def one(n: int, call: Callable[[], Awaitable[Any]], limit: float | None) -> None:
        try:
            await asyncio.wait_for(call(), limit)
        except TimeoutError:
            outcomes["cancelled"] += 1
        except allowed as exc:
            outcomes[type(exc).__name__] += 1
        except Exception as exc:
            failures.append(processes.failure(exc, f"op {n}"))
        else:
            outcomes["done"] += 1

    for first in range(0, ops, CANCEL_BATCH):
        batch = []
        for n in range(first, min(first + CANCEL_BATCH, ops)):
            timeout = _timeout(rng) if timeouts else None
            batch.append(one(n, pick(n), timeout))
        await asyncio.gather(*batch)
    return outcomes, failures, attempted_tx


def _timeout(rng: random.Random) -> float | None:
    """A third cut short at once, a third part-way, a third left to finish."""
    return rng.choice([rng.uniform(0.0, 0.003), rng.uniform(0.003, 0.05), None])


def _tx_halves(conn: Connection) -> Counter[str | None]:
    rows = conn.execute(
        sa.select(L.c.idempotency_key).where(L.c.idempotency_key.like("tx-%"))
    ).scalars()
    return Counter(rows)


async def _check_after_chaos(store: Store, key_ids: list[uuid.UUID], attempted: list[str]) -> None:
    await _check_ledger(store)
    # A transaction's transfer and charge committed together or not at all.
    halves = await run_sql(store, _tx_halves)
    assert set(halves.values()) <= {2}, halves
    assert set(halves) <= set(attempted)
    # The store still serves every kind of call.
    before = await store.api_keys.get(key_ids[0])
    entry = await store.api_keys.charge(key_ids[0], 1, idempotency_key=uuid.uuid4().hex)
    assert entry.balance_after == before.balance - 1
    async with store.transaction() as tx:
        await tx.api_keys.transfer(key_ids[1], key_ids[0], 1)
    assert (await store.api_keys.get(key_ids[0])).balance == before.balance
    await _check_ledger(store)


async def test_cancelled_operations_leave_the_ledger_consistent(store: Store) -> None:
    key_ids = [(await store.api_keys.create(balance=20_000)).key.id for _ in range(3)]
    rng = random.Random(7)

    outcomes, failures, attempted = await _chaos(
        store, key_ids, rng, timeouts=True, allowed=(InsufficientBalanceError,)
    )

    assert failures == []
    # Both happened: calls cancelled part-way, and calls that finished.
    assert outcomes["cancelled"] > 0 and outcomes["done"] > 0, outcomes
    await asyncio.sleep(0.05)  # let a write cancelled in a worker thread finish there
    await _check_after_chaos(store, key_ids, attempted)


async def test_transaction_cancelled_while_it_begins_does_not_wedge_sqlite(
    tmp_path: Path,
) -> None:
    """A cancellation that lands while BEGIN IMMEDIATE waits for another writer's lock.

    The BEGIN still completes in the writer thread after the task is gone; the store must
    not be left with its writer connection inside that orphaned transaction.
    """
    path = tmp_path / "wedge.db"
    async with Store.from_url(
        f"sqlite:///{path}", encryption_keys=generate_key(), auto_upgrade=True
    ) as store:
        key = (await store.api_keys.create(balance=100)).key
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            other.execute("BEGIN IMMEDIATE")  # another process holds the write lock

            async def charge_in_transaction() -> None:
                async with store.transaction() as tx:
                    await tx.api_keys.charge(key.id, 1)

            with pytest.raises(TimeoutError):
                await asyncio.wait_for(charge_in_transaction(), 0.2)
            other.execute("COMMIT")
            await asyncio.sleep(0.2)  # the orphaned BEGIN has its lock by now
        finally:
            other.close()

        hold = await store.api_keys.reserve(key.id, 5)
        assert hold.status == "active"
        async with store.transaction() as tx:
            await tx.api_keys.charge(key.id, 7)
        after = await store.api_keys.get(key.id)
        assert (after.balance, after.reserved) == (93, 5)
        await _check_ledger(store)


async def _store_pids(checked_out: CheckedOut, schema: str, admin: Any) -> list[int]:
    """Server pids of this store's connections: those checked out of its pool (its lane's
    idle ones among them), and any mid-statement."""
    pids = set(checked_out.pids())
    async with admin.connect() as conn:
        rows = await conn.execute(
            sa.text(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND position(:schema in query) > 0"
            ),
            {"schema": schema},
        )
        pids.update(int(pid) for pid in rows.scalars())
    return sorted(pids)


async def _until_it_answers(call: Callable[[], Awaitable[Any]], attempts: int = 20) -> Any:
    for _ in range(attempts - 1):
        try:
            return await call()
        except DatabaseUnavailableError:
            await asyncio.sleep(0.05)
    return await call()


@pytest.mark.postgres
async def test_killed_connections_leave_the_ledger_consistent() -> None:
    url = require_postgres()
    schema = fresh_schema_name()
    store = Store.from_url(
        url, schema_name=schema, encryption_keys=generate_key(), auto_upgrade=True
    )
    admin = create_async_engine(store.config.url.get_secret_value(), poolclass=NullPool)
    try:
        with CheckedOut().following() as checked_out:
            async with store:
                key_ids = [(await store.api_keys.create(balance=20_000)).key.id for _ in range(3)]
                killed: list[int] = []

                async def killer() -> None:
                    for _ in range(8):
                        await asyncio.sleep(0.03)
                        pids = await _store_pids(checked_out, schema, admin)
                        if pids:
                            killed.append(await terminate_backends(pids))

                chaos = _chaos(
                    store,
                    key_ids,
                    random.Random(11),
                    timeouts=False,
                    allowed=(InsufficientBalanceError, DatabaseUnavailableError),
                    ops=360,
                )
                (outcomes, failures, attempted), _ = await asyncio.gather(chaos, killer())

                assert failures == []
                assert sum(killed) > 0
                # Connections died under the store, and it went on serving the other calls.
                assert outcomes["DatabaseUnavailableError"] > 0, outcomes
                assert outcomes["done"] > 0, outcomes
                await _until_it_answers(store.api_keys.verify)
                await _check_after_chaos(store, key_ids, attempted)
                # And a timed-out round on top of that.
                outcomes, failures, attempted_more = await _chaos(
                    store,
                    key_ids,
                    random.Random(12),
                    timeouts=True,
                    allowed=(InsufficientBalanceError,),
                    tag="again-",
                )
                assert failures == []
                await _check_after_chaos(store, key_ids, attempted + attempted_more)
    finally:
        await admin.dispose()
        await drop_schema(url, schema)
