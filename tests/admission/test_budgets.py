"""Budgets: exactly one scope, a positive limit, a period, soft limits below the limit;
get, list, update, delete; status and history follow the store's clock."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from llmstore import Budget, NotFoundError, Store, ValidationError
from tests.admission.admission_support import START, Clock, tenant


async def test_create_and_get(store: Store) -> None:
    t = await tenant(store)
    budget = await store.budgets.create(
        1000, project_id=t.project.id, period="month", soft_limits=[900, 500], name="monthly"
    )
    assert isinstance(budget, Budget)
    assert (budget.limit, budget.period, budget.timezone) == (1000, "month", "UTC")
    assert budget.soft_limits == (500, 900)
    assert (budget.project_id, budget.api_key_id, budget.end_user) == (t.project.id, None, None)
    assert budget.anchor_at == START
    assert await store.budgets.get(budget.id) == budget


@pytest.mark.parametrize(
    "scope",
    [
        {},
        {"end_user": "u1", "tag": "t1"},
        {"project_id": uuid.uuid4(), "api_key_id": uuid.uuid4()},
    ],
)
async def test_none_or_several_scopes_are_refused(store: Store, scope: dict[str, object]) -> None:
    with pytest.raises(ValidationError, match="exactly one scope"):
        await store.budgets.create(100, **scope)  # type: ignore[arg-type]
    assert await store.budgets.list() == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": -5}, "limit"),
        ({"limit": 2**63}, "limit"),
        ({"limit": 1.5}, "limit"),
        ({"limit": True}, "limit"),
        ({"period": "fortnight"}, "period"),
        ({"period": 30}, "period"),
        ({"period": dt.timedelta(0)}, "fixed period"),
        ({"period": dt.timedelta(seconds=1.5)}, "fixed period"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"soft_limits": [100]}, "below the limit"),
        ({"soft_limits": [0]}, "soft limit"),
        ({"soft_limits": "80"}, "soft_limits"),
        ({"soft_limits": list(range(1, 12))}, "at most"),
        ({"name": ""}, "name"),
    ],
)
async def test_bad_arguments_are_refused(
    store: Store, arguments: dict[str, object], message: str
) -> None:
    values: dict[str, object] = {"limit": 100, "tag": "team-a", **arguments}
    with pytest.raises(ValidationError, match=message):
        await store.budgets.create(**values)  # type: ignore[arg-type]
    assert await store.budgets.list() == []


async def test_blank_or_long_labels_are_refused(store: Store) -> None:
    for label in ("", "   ", "x" * 201, "a\x00b"):
        with pytest.raises(ValidationError):
            await store.budgets.create(100, end_user=label)
    assert (await store.budgets.create(100, end_user="ü" * 200)).end_user == "ü" * 200


async def test_a_missing_project_key_or_token_is_not_found(store: Store) -> None:
    for scope in ("project_id", "api_key_id", "token_id"):
        with pytest.raises(NotFoundError):
            await store.budgets.create(100, **{scope: uuid.uuid4()})  # type: ignore[arg-type]
    assert await store.budgets.list() == []


async def test_list_by_scope_in_pages(store: Store) -> None:
    t = await tenant(store)
    made = [await store.budgets.create(100 + i, tag=f"t{i % 2}") for i in range(5)]
    own = await store.budgets.create(50, api_key_id=t.key.key.id)
    assert [b.id for b in await store.budgets.list()] == [b.id for b in [*made, own]]
    assert [b.id for b in await store.budgets.list(tag="t1")] == [made[1].id, made[3].id]
    assert [b.id for b in await store.budgets.list(api_key_id=t.key.key.id)] == [own.id]
    first = await store.budgets.list(limit=2)
    second = await store.budgets.list(limit=2, after=first[-1].id)
    assert [b.id for b in first + second] == [b.id for b in made[:4]]


async def test_update_and_delete(store: Store, clock: Clock) -> None:
    budget = await store.budgets.create(1000, tag="x", soft_limits=[500])
    clock.move(dt.timedelta(hours=1))
    # The soft limit would no longer be below the new limit: refused, nothing changed.
    with pytest.raises(ValidationError, match="below the limit"):
        await store.budgets.update(budget.id, limit=400)
    assert await store.budgets.get(budget.id) == budget
    changed = await store.budgets.update(budget.id, limit=400, soft_limits=[300, 100])
    assert (changed.limit, changed.soft_limits) == (400, (100, 300))
    assert changed.updated_at == START + dt.timedelta(hours=1)
    assert changed.created_at == budget.created_at == budget.anchor_at == changed.anchor_at
    renamed = await store.budgets.update(budget.id, name="ops")
    assert (renamed.name, renamed.limit) == ("ops", 400)
    with pytest.raises(ValidationError, match="at least one"):
        await store.budgets.update(budget.id)
    await store.budgets.delete(budget.id)
    with pytest.raises(NotFoundError):
        await store.budgets.get(budget.id)
    with pytest.raises(NotFoundError):
        await store.budgets.delete(budget.id)
    with pytest.raises(NotFoundError):
        await store.budgets.update(budget.id, limit=5)


async def test_deleting_the_scope_deletes_its_budgets(store: Store) -> None:
    t = await tenant(store)
    await store.budgets.create(100, project_id=t.project.id)
    kept = await store.budgets.create(100, tag="kept")
    await store.projects.delete(t.project.id)
    assert [b.id for b in await store.budgets.list()] == [kept.id]


async def test_status_follows_the_clock(store: Store, clock: Clock) -> None:
    budget = await store.budgets.create(1000, tag="x", period="day", timezone="Europe/Berlin")
    status = await store.budgets.status(budget.id)
    assert (status.spent, status.reserved, status.remaining) == (0, 0, 1000)
    # Noon UTC on 31 January is 13:00 in Berlin: the day began at 23:00 UTC.
    assert status.period_start == dt.datetime(2026, 1, 30, 23, tzinfo=dt.UTC)
    assert status.resets_at == dt.datetime(2026, 1, 31, 23, tzinfo=dt.UTC)
    clock.set(dt.datetime(2026, 1, 31, 23, tzinfo=dt.UTC))
    assert (await store.budgets.status(budget.id)).period_start == status.resets_at


async def test_history_lists_each_period_back_to_the_first(store: Store, clock: Clock) -> None:
    budget = await store.budgets.create(1000, tag="x", period="month")
    for cost in (100, 200):
        admitted = await store.admissions.admit(tags=["x"], cost=cost)
        await store.admissions.settle(admitted.id, cost)
        clock.set(clock.at.replace(day=1) + dt.timedelta(days=62))  # two months on
    history = await store.budgets.history(budget.id)
    starts = [period.period_start.date() for period in history]
    assert starts == [
        dt.date(2026, 5, 1),
        dt.date(2026, 4, 1),
        dt.date(2026, 3, 1),
        dt.date(2026, 2, 1),
        dt.date(2026, 1, 1),
    ]
    assert [period.spent for period in history] == [0, 0, 200, 0, 100]
    assert history[0].period_end == dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
    assert [p.period_start for p in await store.budgets.history(budget.id, limit=2)] == [
        p.period_start for p in history[:2]
    ]
    lifetime = await store.budgets.create(10, tag="y")
    assert [(p.period_start, p.period_end) for p in await store.budgets.history(lifetime.id)] == [
        (lifetime.anchor_at, None)
    ]
