"""API keys: operations inside ``store.transaction()``, committed, failed or refused, on
every driver, in a single process."""

from __future__ import annotations

import datetime as dt

import pytest

from llmstore import InsufficientBalanceError, Store, TransactionError, ValidationError
from tests.billing.api_keys_support import (
    MAX,
    MINT,
    TOKEN,
    _chain_is_consistent,
    _everything,
    _key,
    _ledger,
)


async def test_operations_in_a_transaction_commit_together(store: Store) -> None:
    async with store.transaction() as tx:
        issued = await tx.api_keys.create(100)
        other = await tx.api_keys.create()
        await tx.api_keys.charge(issued.key.id, 10, idempotency_key="c")
        assert (
            await tx.api_keys.charge(issued.key.id, 10, idempotency_key="c")
            == (await tx.api_keys.ledger(issued.key.id))[0]
        )
        hold = await tx.api_keys.reserve(issued.key.id, 20)
        await tx.api_keys.settle(hold.id, 5)
        await tx.api_keys.transfer(issued.key.id, other.key.id, 15)
        withdrawal = await tx.api_keys.withdraw(other.key.id, 5, TOKEN, MINT)
        with pytest.raises(InsufficientBalanceError):  # refused, the transaction goes on
            await tx.api_keys.charge(other.key.id, 1000)
        with pytest.raises(TransactionError):
            await store.api_keys.get(issued.key.id)
    key = await store.api_keys.get(issued.key.id)
    assert (key.balance, key.reserved, key.total_spent) == (70, 0, 15)
    assert (await store.api_keys.get(other.key.id)).balance == 10
    assert (await store.api_keys.get_withdrawal(withdrawal.id)).status == "pending"
    assert await store.api_keys.authenticate(issued.secret) == key
    _chain_is_consistent(await _ledger(store, key.id))
    assert (await store.api_keys.verify()).ok


async def test_a_failed_transaction_writes_nothing(store: Store) -> None:
    payer = await _key(store, 100)
    payee = await _key(store, 10)
    withdrawal = await store.api_keys.withdraw(payee.id, 5, TOKEN, MINT)
    hold = await store.api_keys.reserve(payer.id, 20)
    before = await _everything(store)
    with pytest.raises(RuntimeError, match="boom"):
        async with store.transaction() as tx:
            await tx.api_keys.charge(payer.id, 30, idempotency_key="c")
            await tx.api_keys.deposit(payee.id, 50)
            await tx.api_keys.create(40)
            await tx.api_keys.settle(hold.id, 10)
            await tx.api_keys.transfer(payer.id, payee.id, 5)
            await tx.api_keys.complete_withdrawal(withdrawal.id)
            assert (await tx.api_keys.get(payer.id)).balance == 55
            raise RuntimeError("boom")
    assert await _everything(store) == before
    # The idempotency key of the rolled-back charge is free again.
    entry = await store.api_keys.charge(payer.id, 30, idempotency_key="c")
    assert entry.balance_after == 70


async def test_a_refused_retry_inside_a_transaction_leaves_the_withdrawal_failed(
    store: Store,
) -> None:
    """retry_withdrawal() moves the row to pending before it debits; when the debit is
    refused inside store.transaction(), the caller catches the error and commits."""
    key = await _key(store, 100)
    withdrawal = await store.api_keys.withdraw(key.id, 60, TOKEN, MINT)
    await store.api_keys.fail_withdrawal(withdrawal.id, "mint down")
    await store.api_keys.charge(key.id, 50)
    before = await _everything(store)
    async with store.transaction() as tx:
        with pytest.raises(InsufficientBalanceError):
            await tx.api_keys.retry_withdrawal(withdrawal.id)
    assert (await store.api_keys.get_withdrawal(withdrawal.id)).status == "failed"
    assert await _everything(store) == before
    assert (await store.api_keys.verify()).ok


async def test_a_refused_transfer_inside_a_transaction_moves_nothing(store: Store) -> None:
    """transfer() debits the source before it credits the target; a refused credit (an
    overflow) inside store.transaction() must not leave the debit behind."""
    source = await _key(store, 100)
    full = await _key(store, MAX)
    before = await _everything(store)
    async with store.transaction() as tx:
        with pytest.raises(ValidationError):
            await tx.api_keys.transfer(source.id, full.id, 10)
    assert await _everything(store) == before
    assert (await store.api_keys.get(source.id)).balance == 100


async def test_a_hold_in_a_transaction_leaves_the_keys_own_expiry(store: Store) -> None:
    # Once, on Postgres, the hold's expiry was bound under a name of the key's columns and
    # SQLAlchemy added it to the key's UPDATE: the key expired with its hold.
    never = await store.api_keys.create(balance=100)
    until = dt.datetime(2099, 1, 1, tzinfo=dt.UTC)
    dated = await store.api_keys.create(balance=100, expires_at=until)
    async with store.transaction() as tx:
        await tx.api_keys.reserve(never.key.id, 10, ttl=dt.timedelta(minutes=1))
        await tx.api_keys.reserve(dated.key.id, 10, ttl=dt.timedelta(minutes=1))
    assert (await store.api_keys.get(never.key.id)).expires_at is None
    assert (await store.api_keys.get(dated.key.id)).expires_at == until
