"""admissions.settle, release, extend and expire: each admission ends once; a settlement
is retry-safe; holds past their expiry never block, and a hold counts in the period it
was admitted in."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from llmstore import (
    BudgetExceededError,
    ConflictError,
    InsufficientBalanceError,
    NotFoundError,
    RateLimitedError,
    Settlement,
    Store,
    UsageRecord,
    ValidationError,
)
from tests.admission.admission_support import START, Clock, tenant


async def test_settle_charges_the_budgets_and_the_key_once(store: Store) -> None:
    t = await tenant(store, balance=1000)
    budget = await store.budgets.create(5000, project_id=t.project.id)
    admitted = await store.admissions.admit(t.key.secret, cost=200)
    settled = await store.admissions.settle(admitted.id, 150)
    assert isinstance(settled, Settlement)
    assert (settled.cost, settled.charged, settled.shortfall, settled.usage_id) == (
        150,
        150,
        0,
        None,
    )
    assert settled.settled_at == START
    key = await store.api_keys.get(t.key.key.id)
    assert (key.balance, key.reserved, key.total_spent) == (850, 0, 150)
    status = await store.budgets.status(budget.id)
    assert (status.spent, status.reserved, status.remaining) == (150, 0, 4850)
    # The same call again: the same settlement, nothing charged twice.
    assert await store.admissions.settle(admitted.id, 150) == settled
    assert (await store.api_keys.get(t.key.key.id)).balance == 850
    # Another call: a conflict, nothing changed.
    with pytest.raises(ConflictError, match="other arguments"):
        await store.admissions.settle(admitted.id, 151)
    with pytest.raises(ConflictError):
        await store.admissions.release(admitted.id)
    assert (await store.admissions.get(admitted.id)).status == "settled"
    assert (await store.budgets.verify()).ok and (await store.api_keys.verify()).ok


async def test_settling_above_the_hold_charges_what_the_key_has(store: Store) -> None:
    t = await tenant(store, balance=300)
    budget = await store.budgets.create(250, api_key_id=t.key.key.id)
    admitted = await store.admissions.admit(t.key.secret, cost=100)
    settled = await store.admissions.settle(admitted.id, 400)
    assert (settled.charged, settled.shortfall) == (300, 100)
    # The budget records the whole cost: overspent, nothing remains.
    status = await store.budgets.status(budget.id)
    assert (status.spent, status.remaining) == (400, 0)
    assert [c.threshold for c in settled.crossed] == [250]
    assert settled.crossed[0].hard


async def test_a_zero_cost_settlement_frees_everything(store: Store) -> None:
    t = await tenant(store, balance=300)
    budget = await store.budgets.create(250, api_key_id=t.key.key.id)
    admitted = await store.admissions.admit(t.key.secret, cost=100)
    settled = await store.admissions.settle(admitted.id, 0)
    assert (settled.charged, settled.shortfall) == (0, 0)
    assert (await store.api_keys.get(t.key.key.id)).available == 300
    assert (await store.budgets.status(budget.id)).remaining == 250


async def test_settle_corrects_the_token_estimate(store: Store) -> None:
    limit = await store.rate_limits.create(tokens=1000, tag="t")
    first = await store.admissions.admit(tags=["t"], tokens=800)
    with pytest.raises(RateLimitedError):  # the window is full of the estimate
        await store.admissions.admit(tags=["t"], tokens=300)
    settled = await store.admissions.settle(first.id, 0, tokens=120)
    assert settled.tokens == 120
    assert (await store.rate_limits.status(limit.id)).tokens == 120
    await store.admissions.admit(tags=["t"], tokens=880)


async def test_settle_writes_the_usage_row_in_the_same_transaction(store: Store) -> None:
    t = await tenant(store)
    admitted = await store.admissions.admit(t.key.secret, cost=10)
    usage = UsageRecord(
        api_key_id=t.key.key.id, request_id="req-9", model="m", prompt_tokens=3, cost=7
    )
    settled = await store.admissions.settle(admitted.id, 7, usage=usage)
    assert settled.usage_id is not None
    row = await store.usage.get(settled.usage_id)
    assert row is not None and (row.request_id, row.cost) == ("req-9", 7)
    assert await store.admissions.settle(admitted.id, 7, usage=usage) == settled
    # A failed settlement writes no usage either: the row and the charge go together.
    other = await store.admissions.admit(t.key.secret, cost=10)
    await store.admissions.release(other.id)
    with pytest.raises(ConflictError):
        await store.admissions.settle(
            other.id, 7, usage=usage.model_copy(update={"request_id": "r2"})
        )
    assert [log.request_id for log in await store.usage.list()] == ["req-9"]


async def test_settle_refuses_bad_arguments(store: Store) -> None:
    admitted = await store.admissions.admit(cost=0)
    for args in ((-1,), (2**63,), ("5",)):
        with pytest.raises(ValidationError):
            await store.admissions.settle(admitted.id, *args)
    with pytest.raises(ValidationError):
        await store.admissions.settle(admitted.id, 1, tokens=-1)
    with pytest.raises(ValidationError):
        await store.admissions.settle(admitted.id, 1, usage={"cost": 1})  # type: ignore[arg-type]
    with pytest.raises(NotFoundError):
        await store.admissions.settle(uuid.uuid4(), 1)
    assert (await store.admissions.get(admitted.id)).status == "active"


async def test_release_frees_holds_and_tokens_but_keeps_the_request(store: Store) -> None:
    t = await tenant(store, balance=100)
    budget = await store.budgets.create(100, project_id=t.project.id)
    limit = await store.rate_limits.create(requests=5, tokens=100, project_id=t.project.id)
    admitted = await store.admissions.admit(t.key.secret, cost=100, tokens=100)
    released = await store.admissions.release(admitted.id)
    assert released.status == "released"
    assert (await store.api_keys.get(t.key.key.id)).reserved == 0
    assert (await store.budgets.status(budget.id)).reserved == 0
    window = await store.rate_limits.status(limit.id)
    assert (window.requests, window.tokens) == (1, 0)
    with pytest.raises(ConflictError, match="released"):
        await store.admissions.release(admitted.id)
    with pytest.raises(ConflictError, match="released"):
        await store.admissions.settle(admitted.id, 1)
    assert (await store.budgets.verify()).ok and (await store.api_keys.verify()).ok


async def test_extend_moves_the_expiry_of_the_admission_and_its_hold(
    store: Store, clock: Clock
) -> None:
    t = await tenant(store, balance=100)
    admitted = await store.admissions.admit(t.key.secret, cost=100, ttl=dt.timedelta(minutes=1))
    clock.move(dt.timedelta(seconds=50))
    extended = await store.admissions.extend(admitted.id, dt.timedelta(minutes=10))
    assert extended.expires_at == clock.at + dt.timedelta(minutes=10)
    assert admitted.reservation_id is not None
    hold = await store.api_keys.get_reservation(admitted.reservation_id)
    assert hold.expires_at == extended.expires_at
    clock.move(dt.timedelta(minutes=5))
    assert await store.admissions.expire() == 0
    await store.admissions.settle(admitted.id, 100)
    with pytest.raises(ConflictError):
        await store.admissions.extend(admitted.id, dt.timedelta(minutes=1))
    with pytest.raises(ValidationError):
        await store.admissions.extend(admitted.id, dt.timedelta(days=8))


async def test_expired_admissions_never_block_and_expire_releases_them(
    store: Store, clock: Clock
) -> None:
    t = await tenant(store, balance=100)
    budget = await store.budgets.create(100, project_id=t.project.id)
    stale = await store.admissions.admit(t.key.secret, cost=100, ttl=dt.timedelta(minutes=5))
    with pytest.raises(BudgetExceededError):
        await store.admissions.admit(t.key.secret, cost=1)
    clock.move(dt.timedelta(minutes=5))
    # Nobody swept: the budget's and the key's lapsed holds are expired first.
    fresh = await store.admissions.admit(t.key.secret, cost=100)
    assert (await store.admissions.get(stale.id)).status == "expired"
    with pytest.raises(ConflictError, match="expired"):
        await store.admissions.settle(stale.id, 100)
    assert (await store.budgets.status(budget.id)).reserved == 100
    clock.move(dt.timedelta(minutes=15))
    assert await store.admissions.expire() == 1
    assert (await store.admissions.get(fresh.id)).status == "expired"
    assert await store.admissions.expire() == 0
    key = await store.api_keys.get(t.key.key.id)
    assert (key.balance, key.reserved) == (100, 0)
    assert (await store.budgets.verify()).ok and (await store.api_keys.verify()).ok


async def test_a_lapsed_key_hold_never_blocks_a_charge(store: Store, clock: Clock) -> None:
    t = await tenant(store, balance=100)
    await store.admissions.admit(t.key.secret, cost=100, ttl=dt.timedelta(minutes=1))
    with pytest.raises(InsufficientBalanceError):
        await store.api_keys.charge(t.key.key.id, 1)
    with pytest.raises(InsufficientBalanceError):
        await store.api_keys.reserve(t.key.key.id, 1)
    clock.move(dt.timedelta(minutes=1))
    await store.api_keys.charge(t.key.key.id, 60)
    await store.api_keys.reserve(t.key.key.id, 40)
    assert (await store.api_keys.verify()).ok


async def test_a_settlement_after_its_key_hold_was_swept_still_charges(
    store: Store, clock: Clock
) -> None:
    t = await tenant(store, balance=100)
    admitted = await store.admissions.admit(t.key.secret, cost=60, ttl=dt.timedelta(minutes=1))
    clock.move(dt.timedelta(minutes=2))
    assert await store.api_keys.expire_reservations() == 1  # the key's sweep, not the admission's
    settled = await store.admissions.settle(admitted.id, 60)
    assert (settled.charged, settled.shortfall) == (60, 0)
    key = await store.api_keys.get(t.key.key.id)
    assert (key.balance, key.reserved) == (40, 0)
    assert (await store.api_keys.verify()).ok and (await store.budgets.verify()).ok


@pytest.mark.parametrize(
    ("period", "zone", "before", "after"),
    [
        ("day", "UTC", dt.datetime(2026, 2, 1, tzinfo=dt.UTC), None),
        ("week", "UTC", dt.datetime(2026, 2, 2, tzinfo=dt.UTC), None),
        ("month", "UTC", dt.datetime(2026, 2, 1, tzinfo=dt.UTC), None),
        # Berlin's day and month begin an hour before UTC's.
        ("day", "Europe/Berlin", dt.datetime(2026, 1, 31, 23, tzinfo=dt.UTC), None),
        ("month", "Europe/Berlin", dt.datetime(2026, 1, 31, 23, tzinfo=dt.UTC), None),
        # The spring DST change: 29 March in Berlin is 23 hours long.
        (
            "day",
            "Europe/Berlin",
            dt.datetime(2026, 3, 29, 22, tzinfo=dt.UTC),
            dt.datetime(2026, 3, 29, 21, 59, tzinfo=dt.UTC),
        ),
        # A 31-day March after a 28-day February.
        (
            "month",
            "UTC",
            dt.datetime(2026, 4, 1, tzinfo=dt.UTC),
            dt.datetime(2026, 3, 31, 23, 59, tzinfo=dt.UTC),
        ),
    ],
)
async def test_spend_resets_exactly_at_the_boundary(
    store: Store,
    clock: Clock,
    period: str,
    zone: str,
    before: dt.datetime,
    after: dt.datetime | None,
) -> None:
    budget = await store.budgets.create(100, tag="t", period=period, timezone=zone)
    clock.set(after or before - dt.timedelta(minutes=1))
    held = await store.admissions.admit(tags=["t"], cost=100, ttl=dt.timedelta(hours=2))
    with pytest.raises(BudgetExceededError) as refused:
        await store.admissions.admit(tags=["t"], cost=1)
    assert refused.value.resets_at == before
    clock.set(before)
    fresh = await store.admissions.admit(tags=["t"], cost=100)
    assert fresh.budgets[0].period_start == before
    # Admitted before the boundary, settled after it: it counts in its own period.
    await store.admissions.settle(held.id, 70)
    status = await store.budgets.status(budget.id)
    assert (status.period_start, status.spent, status.reserved) == (before, 0, 100)
    history = await store.budgets.history(budget.id, limit=2)
    assert [(p.spent, p.reserved) for p in history] == [(0, 100), (70, 0)]
    assert (await store.budgets.verify()).ok


async def test_fixed_periods_count_from_the_budgets_creation(store: Store, clock: Clock) -> None:
    clock.move(dt.timedelta(minutes=7))
    budget = await store.budgets.create(10, tag="t", period=dt.timedelta(hours=1))
    await store.admissions.admit(tags=["t"], cost=10, ttl=dt.timedelta(hours=2))
    clock.move(dt.timedelta(minutes=59, seconds=59))
    with pytest.raises(BudgetExceededError) as refused:
        await store.admissions.admit(tags=["t"], cost=1)
    assert refused.value.resets_at == budget.anchor_at + dt.timedelta(hours=1)
    assert refused.value.retry_after == 1
    clock.move(dt.timedelta(seconds=1))
    await store.admissions.admit(tags=["t"], cost=10)


async def test_counts_near_the_int64_limit_behave_alike_on_both_drivers(store: Store) -> None:
    top = 2**63 - 1
    limit = await store.rate_limits.create(requests=10, tag="t")
    budget = await store.budgets.create(top, tag="t")
    first = await store.admissions.admit(tags=["t"], tokens=top, cost=top - 1)
    await store.admissions.admit(tags=["t"], tokens=top)  # the window's count saturates
    assert (await store.rate_limits.status(limit.id)).tokens == top
    await store.admissions.settle(first.id, top - 1)
    second = await store.admissions.admit(tags=["t"], cost=1)
    # Spend past 2**63 - 1 is refused, and nothing of that settlement is written.
    with pytest.raises(ValidationError, match="overflow"):
        await store.admissions.settle(second.id, 2)
    assert (await store.admissions.get(second.id)).status == "active"
    await store.admissions.settle(second.id, 1)
    status = await store.budgets.status(budget.id)
    assert (status.spent, status.reserved, status.remaining) == (top, 0, 0)
    assert (await store.budgets.verify()).ok


async def test_lapsed_holds_stay_unless_expiring_them_makes_room(
    store: Store, clock: Clock
) -> None:
    t = await tenant(store, balance=100)
    key_id = t.key.key.id
    await store.admissions.admit(t.key.secret, cost=30, ttl=dt.timedelta(minutes=1))
    await store.api_keys.charge(key_id, 50)
    clock.move(dt.timedelta(minutes=1))
    # 20 available and 30 lapsed: not enough for 51, and both drivers leave the hold.
    with pytest.raises(InsufficientBalanceError) as refused:
        await store.api_keys.charge(key_id, 51)
    assert (refused.value.available, refused.value.requested) == (20, 51)
    assert (await store.api_keys.get(key_id)).reserved == 30
    with pytest.raises(InsufficientBalanceError):
        await store.api_keys.reserve(key_id, 51)
    assert (await store.api_keys.get(key_id)).reserved == 30
    # Enough for 50: the lapsed hold is expired first, in the same call.
    await store.api_keys.charge(key_id, 50)
    key = await store.api_keys.get(key_id)
    assert (key.balance, key.reserved) == (0, 0)
    assert (await store.api_keys.verify()).ok
