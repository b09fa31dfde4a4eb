"""Constants and ledger checks shared by the ``test_concurrency_api_keys_*`` modules:
the cross-table invariants that verify() does not look at, read from the tables.

Those modules start worker processes ("spawn") against one SQLite file or one Postgres
schema, as in ``tests/access/test_concurrency_tokens.py``: each worker opens its own store,
waits until every worker is ready, then all of them start together. Workers never let an
exception escape; they report what they did, and the test checks the database against it:
the balances, the ledger, the holds and the withdrawals.
"""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore import Store
from llmstore._db.schema import api_keys, ledger_entries, reservations, withdrawals
from llmstore.pytest_plugin import run_sql

WORKERS = 4
TOKEN = "cashuAeyJ0b2tlbiI6W3sicHJvb2ZzIjpbXX1dfQ"
MINT = "https://mint.example.com/v1"


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
