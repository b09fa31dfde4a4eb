"""A cancelled ``api_keys.settle`` ends the same way on every driver: it took effect or
it did not, and the same settle again tells which, returning the one settlement."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore import LedgerEntry, Store
from llmstore._db.schema import ledger_entries
from llmstore.pytest_plugin import run_sql


async def _cut_after(loops: int, call: Callable[[], Awaitable[LedgerEntry]]) -> Any:
    """Start ``call`` as a task, let the loop turn ``loops`` times, cancel it; what it
    ended with (its entry, or the cancellation)."""
    task = asyncio.ensure_future(call())
    for _ in range(loops):
        await asyncio.sleep(0)
    task.cancel()
    (outcome,) = await asyncio.gather(task, return_exceptions=True)
    return outcome


async def _cut_by_timeout(seconds: float, call: Callable[[], Awaitable[LedgerEntry]]) -> Any:
    try:
        return await asyncio.wait_for(call(), seconds)
    except TimeoutError as exc:
        return exc


CUTS: dict[str, Callable[[Callable[[], Awaitable[LedgerEntry]]], Awaitable[Any]]] = {
    "before it starts": lambda call: _cut_after(0, call),
    "after sleep(0)": lambda call: _cut_after(1, call),
    "after 3 loop turns": lambda call: _cut_after(3, call),
    "after 10 loop turns": lambda call: _cut_after(10, call),
    "after 50 loop turns": lambda call: _cut_after(50, call),
    "timeout 0": lambda call: _cut_by_timeout(0, call),
    "timeout 1ms": lambda call: _cut_by_timeout(0.001, call),
    "timeout 5ms": lambda call: _cut_by_timeout(0.005, call),
}


def _settlements(conn: Connection, reservation_id: uuid.UUID) -> list[int]:
    return list(
        conn.execute(
            sa.select(ledger_entries.c.id).where(
                ledger_entries.c.reservation_id == reservation_id,
                ledger_entries.c.kind == "settlement",
            )
        ).scalars()
    )


@pytest.mark.parametrize("actor", [None, "alice"])
@pytest.mark.parametrize("cut", sorted(CUTS))
async def test_a_cancelled_settle_is_told_by_its_retry(
    store: Store, cut: str, actor: str | None
) -> None:
    key = (await store.api_keys.create(1_000)).key
    # Below the hold, the whole hold, and more than the key has left (a shortfall).
    cases = [(await store.api_keys.reserve(key.id, 100), actual) for actual in (0, 40, 100, 990)]
    took_effect = 0
    for hold, actual in cases:

        def settle(hold_id: uuid.UUID = hold.id, actual: int = actual) -> Awaitable[LedgerEntry]:
            return store.api_keys.settle(hold_id, actual, actor=actor)

        outcome = await CUTS[cut](settle)
        retried = await settle()
        assert retried.reservation_id == hold.id
        assert retried.shortfall - retried.amount == actual
        if isinstance(outcome, LedgerEntry):
            took_effect += 1
            assert outcome == retried
        else:
            assert isinstance(outcome, asyncio.CancelledError | TimeoutError), outcome
        # Once more: still the one settlement.
        assert await settle() == retried
        assert await run_sql(store, functools.partial(_settlements, reservation_id=hold.id)) == [
            retried.id
        ]
        assert (await store.api_keys.get_reservation(hold.id)).status == "settled"
    state = await store.api_keys.get(key.id)
    assert state.reserved == 0
    assert (await store.api_keys.verify()).ok
    if actor is not None:
        settles = await store.audit.list(action="api_key.settle", limit=100)
        assert len(settles) == len(cases)
        assert {e.metadata["reservation_id"] for e in settles if e.metadata} == {
            str(hold.id) for hold, _ in cases
        }
    if cut == "before it starts":
        assert took_effect == 0  # a task cancelled before its first step never ran
    # The store still serves everything after the cancellations.
    assert state.balance == 0  # the last case drained it
    await store.api_keys.deposit(key.id, 5)
    assert (await store.api_keys.charge(key.id, 1)).balance_after == 4
