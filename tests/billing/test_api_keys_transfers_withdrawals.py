"""API keys: transfers between keys and withdrawals (their state machine), on every
driver, in a single process."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Awaitable, Callable

import pytest

from llmstore import (
    ConflictError,
    IdempotencyConflictError,
    InsufficientBalanceError,
    NotFoundError,
    Store,
    ValidationError,
    Withdrawal,
)
from llmstore._db.schema import withdrawals
from tests.billing.api_keys_support import (
    MINT,
    TOKEN,
    _chain_is_consistent,
    _everything,
    _key,
    _ledger,
)
from tests.helpers import column_value, every_page, now, refused

# --- transfers -----------------------------------------------------------------------------


async def test_transfer_moves_money_between_keys_once(store: Store) -> None:
    source = await _key(store, 100)
    target = await _key(store, 5)
    debit, credit = await store.api_keys.transfer(
        source.id, str(target.id), 30, idempotency_key="t-1", description="share"
    )
    assert (debit.kind, debit.amount, debit.balance_after) == ("transfer_out", -30, 70)
    assert (credit.kind, credit.amount, credit.balance_after) == ("transfer_in", 30, 35)
    assert (debit.api_key_id, credit.api_key_id) == (source.id, target.id)
    assert debit.transfer_id is not None
    assert debit.transfer_id == credit.transfer_id
    assert debit.description == credit.description == "share"
    assert debit.idempotency_key == "t-1"
    replay = await store.api_keys.transfer(
        source.id, target.id, 30, idempotency_key="t-1", description="share"
    )
    assert replay == (debit, credit)
    src = await store.api_keys.get(source.id)
    dst = await store.api_keys.get(target.id)
    assert (src.balance, src.total_deposited, src.total_spent) == (70, 100, 0)
    assert (dst.balance, dst.total_deposited, dst.total_spent) == (35, 5, 0)
    assert len(await _ledger(store, source.id)) == 2
    assert len(await _ledger(store, target.id)) == 2
    third = await _key(store)
    snapshot = await _everything(store)
    for call in [
        lambda: store.api_keys.transfer(source.id, target.id, 31, idempotency_key="t-1"),
        lambda: store.api_keys.transfer(source.id, third.id, 30, idempotency_key="t-1"),
        lambda: store.api_keys.transfer(source.id, target.id, 30, idempotency_key="t-1"),
        lambda: store.api_keys.charge(source.id, 30, idempotency_key="t-1", description="share"),
    ]:
        await refused(IdempotencyConflictError, call, "conflict")
    assert await _everything(store) == snapshot
    # The replay answers even after the source has spent everything.
    await store.api_keys.charge(source.id, 70)
    assert (
        await store.api_keys.transfer(
            source.id, target.id, 30, idempotency_key="t-1", description="share"
        )
        == replay
    )
    assert (await store.api_keys.verify()).ok


async def test_transfer_refusals_write_nothing_on_either_key(store: Store) -> None:
    source = await _key(store, 100)
    target = await _key(store, 10)
    await store.api_keys.reserve(source.id, 30)
    before = await _everything(store)
    for same in [
        lambda: store.api_keys.transfer(source.id, source.id, 1),
        lambda: store.api_keys.transfer(source.id, str(source.id), 1),
        lambda: store.api_keys.transfer(str(source.id).upper(), source.id, 1),
    ]:
        await refused(ValidationError, same, "same key")
    with pytest.raises(InsufficientBalanceError) as info:
        await store.api_keys.transfer(source.id, target.id, 71)
    assert (info.value.available, info.value.requested) == (70, 71)
    with pytest.raises(InsufficientBalanceError):
        await store.api_keys.transfer(source.id, target.id, 71, idempotency_key="x")
    with pytest.raises(InsufficientBalanceError):
        await store.api_keys.transfer(target.id, source.id, 11)
    await refused(ValidationError, lambda: store.api_keys.transfer("x", target.id, 1), "from")
    await refused(
        ValidationError,
        lambda: store.api_keys.transfer(source.id, None, 1),  # type: ignore[arg-type]
        "to",
    )
    assert await _everything(store) == before
    debit, credit = await store.api_keys.transfer(source.id, target.id, 70, idempotency_key="x")
    assert (debit.balance_after, credit.balance_after) == (30, 80)
    assert (await store.api_keys.get(source.id)).available == 0


# --- withdrawals ---------------------------------------------------------------------------


async def test_withdraw_debits_at_once_and_encrypts_the_token(store: Store) -> None:
    key = await _key(store, 100)
    before = now()
    withdrawal = await store.api_keys.withdraw(key.id, 40, TOKEN, MINT)
    assert isinstance(withdrawal, Withdrawal)
    assert (withdrawal.api_key_id, withdrawal.amount, withdrawal.mint_url) == (key.id, 40, MINT)
    assert withdrawal.status == "pending"
    assert (withdrawal.retry_count, withdrawal.error_message) == (0, None)
    assert withdrawal.completed_at is None
    assert before - dt.timedelta(seconds=5) <= withdrawal.created_at <= now()
    assert not hasattr(withdrawal, "token")
    assert TOKEN not in repr(withdrawal) and TOKEN not in repr(withdrawal.model_dump())
    assert await store.api_keys.get_withdrawal(withdrawal.id) == withdrawal
    state = await store.api_keys.get(key.id)
    assert (state.balance, state.total_spent, state.total_deposited) == (60, 0, 100)
    debit = (await _ledger(store, key.id))[0]
    assert (debit.kind, debit.amount, debit.balance_after) == ("withdrawal", -40, 60)
    assert debit.withdrawal_id == withdrawal.id
    stored = await column_value(store, withdrawals.c.token_encrypted, withdrawal.id)
    assert stored and stored != TOKEN
    assert TOKEN not in stored
    assert TOKEN not in repr(await _everything(store))
    assert await store.api_keys.reveal_withdrawal_token(withdrawal.id) == TOKEN
    assert await store.api_keys.reveal_withdrawal_token(str(withdrawal.id)) == TOKEN
    with pytest.raises(NotFoundError):
        await store.api_keys.reveal_withdrawal_token(uuid.uuid4())


async def test_withdraw_refusals_write_nothing(store: Store) -> None:
    key = await _key(store, 100)
    await store.api_keys.reserve(key.id, 50)
    before = await _everything(store)
    with pytest.raises(InsufficientBalanceError) as info:
        await store.api_keys.withdraw(key.id, 51, TOKEN, MINT)
    assert (info.value.available, info.value.requested) == (50, 51)
    for token in ["", "  ", f" {TOKEN}", f"{TOKEN}\n", 5, None, "x" * 100_001]:
        await refused(
            ValidationError, lambda t=token: store.api_keys.withdraw(key.id, 1, t, MINT), "token"
        )
    for url in ["", "ftp://mint.example", "mint.example", "https://", "http://a b", 7]:
        await refused(
            ValidationError, lambda u=url: store.api_keys.withdraw(key.id, 1, TOKEN, u), url
        )
    assert await _everything(store) == before


async def test_withdrawal_state_machine(store: Store) -> None:
    key = await _key(store, 100)
    api = store.api_keys

    async def balance() -> int:
        return (await api.get(key.id)).balance

    # pending -> completed
    done = await api.withdraw(key.id, 30, TOKEN, MINT)
    completed = await api.complete_withdrawal(done.id)
    assert completed.status == "completed"
    assert completed.completed_at is not None
    assert (completed.retry_count, completed.error_message) == (0, None)
    assert await api.get_withdrawal(done.id) == completed
    assert await balance() == 70

    # pending -> failed: a refund entry, one more retry
    flaky = await api.withdraw(key.id, 20, TOKEN, MINT)
    assert await balance() == 50
    failed = await api.fail_withdrawal(flaky.id, "mint timed out")
    assert failed.status == "failed"
    assert (failed.error_message, failed.retry_count) == ("mint timed out", 1)
    assert failed.completed_at is None
    refund = (await _ledger(store, key.id))[0]
    assert (refund.kind, refund.amount, refund.balance_after) == ("withdrawal_refund", 20, 70)
    assert refund.withdrawal_id == flaky.id
    assert await balance() == 70

    # Every forbidden edge is a ConflictError and writes nothing.
    snapshot = await _everything(store)
    forbidden: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("complete a completed one", lambda: api.complete_withdrawal(done.id)),
        ("fail a completed one", lambda: api.fail_withdrawal(done.id, "late")),
        ("retry a completed one", lambda: api.retry_withdrawal(done.id)),
        ("complete a failed one", lambda: api.complete_withdrawal(flaky.id)),
        ("fail a failed one", lambda: api.fail_withdrawal(flaky.id, "again")),
    ]
    for name, call in forbidden:
        await refused(ConflictError, call, name)
    assert await _everything(store) == snapshot

    # failed -> pending: debited again; retry_count counts the failures
    retried = await api.retry_withdrawal(flaky.id)
    assert retried.status == "pending"
    assert retried.retry_count == 1
    debit = (await _ledger(store, key.id))[0]
    assert (debit.kind, debit.amount, debit.balance_after) == ("withdrawal", -20, 50)
    assert debit.withdrawal_id == flaky.id
    snapshot = await _everything(store)
    await refused(ConflictError, lambda: api.retry_withdrawal(flaky.id), "retry a pending one")
    assert await _everything(store) == snapshot

    # fail again, retry again, then complete
    assert (await api.fail_withdrawal(flaky.id, "still down")).retry_count == 2
    assert await balance() == 70
    await api.retry_withdrawal(flaky.id)
    assert await balance() == 50
    final = await api.complete_withdrawal(flaky.id)
    assert (final.status, final.retry_count, final.error_message) == (
        "completed",
        2,
        "still down",
    )
    assert await balance() == 50
    state = await api.get(key.id)
    assert (state.total_deposited, state.total_spent) == (100, 0)
    _chain_is_consistent(await _ledger(store, key.id))
    assert (await api.verify()).ok

    missing = uuid.uuid4()
    for call in [
        lambda: api.get_withdrawal(missing),
        lambda: api.complete_withdrawal(missing),
        lambda: api.fail_withdrawal(missing, "x"),
        lambda: api.retry_withdrawal(missing),
    ]:
        await refused(NotFoundError, call, "missing")
    pending = await api.withdraw(key.id, 1, TOKEN, MINT)
    for error in ["", "   ", "x" * 2001, None]:
        await refused(ValidationError, lambda e=error: api.fail_withdrawal(pending.id, e), "error")
    assert (await api.get_withdrawal(pending.id)).status == "pending"


async def test_retry_without_enough_balance_stays_failed(store: Store) -> None:
    key = await _key(store, 100)
    withdrawal = await store.api_keys.withdraw(key.id, 60, TOKEN, MINT)
    await store.api_keys.fail_withdrawal(withdrawal.id, "mint down")
    await store.api_keys.charge(key.id, 50)
    await store.api_keys.reserve(key.id, 5)
    before = await _everything(store)
    with pytest.raises(InsufficientBalanceError) as info:
        await store.api_keys.retry_withdrawal(withdrawal.id)
    assert (info.value.available, info.value.requested) == (45, 60)
    assert await _everything(store) == before
    still = await store.api_keys.get_withdrawal(withdrawal.id)
    assert (still.status, still.retry_count) == ("failed", 1)
    await store.api_keys.deposit(key.id, 15)
    assert (await store.api_keys.retry_withdrawal(withdrawal.id)).status == "pending"
    assert (await store.api_keys.get(key.id)).available == 0


async def test_list_withdrawals_filters_and_pages(store: Store) -> None:
    key = await _key(store, 100)
    other = await _key(store, 100)
    made = [await store.api_keys.withdraw(key.id, 1, TOKEN, MINT) for _ in range(4)]
    theirs = await store.api_keys.withdraw(other.id, 2, TOKEN, MINT)
    await store.api_keys.complete_withdrawal(made[1].id)
    await store.api_keys.fail_withdrawal(made[2].id, "x")
    everything = await store.api_keys.list_withdrawals()
    assert [w.id for w in everything] == [w.id for w in [*made, theirs]]
    assert [w.id for w in await store.api_keys.list_withdrawals(key_id=key.id)] == [
        w.id for w in made
    ]
    assert [w.id for w in await store.api_keys.list_withdrawals(status="pending")] == [
        made[0].id,
        made[3].id,
        theirs.id,
    ]
    assert [
        w.id for w in await store.api_keys.list_withdrawals(key_id=key.id, status="failed")
    ] == [made[2].id]
    assert [w.id for w in await store.api_keys.list_withdrawals(status="completed")] == [made[1].id]
    pages = await every_page(lambda after: store.api_keys.list_withdrawals(limit=2, after=after), 2)
    assert pages == everything
    assert await store.api_keys.list_withdrawals(key_id=uuid.uuid4()) == []
    for kwargs in [{"status": "done"}, {"limit": 0}, {"after": "x"}, {"key_id": 3}]:
        await refused(
            ValidationError, lambda kw=kwargs: store.api_keys.list_withdrawals(**kw), kwargs
        )
