"""Admissions from several OS processes against one SQLite file or one Postgres schema:
budgets and rate limits hold exactly across replicas, soft limits are reported once, and
admissions over overlapping budgets in different orders never deadlock.

Each worker opens its own store (on a clock fixed by the test, so that a burst never
straddles a window), waits until every worker is ready, then all start together
(``tests/processes.py``). Workers never let an exception escape: they report outcomes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections import Counter
from typing import Any

import pytest

from llmstore import BudgetExceededError, RateLimitedError, Store, StoreConfig
from llmstore.migrations._commands import upgrade
from tests import processes
from tests.admission.admission_support import START, Clock

pytestmark = pytest.mark.slow

WORKERS = 4


def _worker(config_json: str, at: str, job: str, args: Any, ready: Any, start: Any) -> Any:
    clock = Clock(dt.datetime.fromisoformat(at))
    return asyncio.run(
        processes.open_and_wait(
            config_json, ready, start, lambda store: JOBS[job](store, *args), clock=clock
        )
    )


async def _admit_many(
    store: Store, count: int, kwargs: dict[str, Any], settle: bool
) -> tuple[int, Counter[str], list[str], list[tuple[int, bool]]]:
    """``count`` concurrent admissions; (admitted, refusals by type, failures, crossings)."""
    admitted = 0
    refused: Counter[str] = Counter()
    failures: list[str] = []
    crossings: list[tuple[int, bool]] = []

    async def one() -> None:
        nonlocal admitted
        try:
            admission = await store.admissions.admit(**kwargs)
            crossings.extend((c.threshold, c.hard) for c in admission.crossed)
            if settle:
                settlement = await store.admissions.settle(admission.id, admission.cost)
                crossings.extend((c.threshold, c.hard) for c in settlement.crossed)
        except (BudgetExceededError, RateLimitedError) as exc:
            refused[type(exc).__name__] += 1
        except Exception as exc:
            failures.append(processes.failure(exc))
        else:
            admitted += 1

    await asyncio.gather(*(one() for _ in range(count)))
    return admitted, refused, failures, crossings


async def _overlapping(store: Store, seed: int, rounds: int) -> tuple[int, list[str]]:
    """Admissions over random overlapping sets of tag budgets, in random orders, settled."""
    pick = random.Random(seed)
    done = 0
    failures: list[str] = []

    async def one() -> None:
        nonlocal done
        tags = pick.sample(["a", "b", "c", "d"], k=pick.randint(2, 4))
        try:
            admission = await store.admissions.admit(tags=tags, cost=pick.randint(1, 5))
            await store.admissions.settle(admission.id, pick.randint(0, 5))
        except Exception as exc:
            failures.append(processes.failure(exc))
        else:
            done += 1

    for _ in range(rounds):
        await asyncio.gather(*(one() for _ in range(8)))
    return done, failures


JOBS: dict[str, Any] = {"admit": _admit_many, "overlap": _overlapping}


async def _run(config: StoreConfig, job: str, per_worker: list[Any]) -> list[Any]:
    config_json = processes.config_json(config)
    return await processes.run_workers(
        _worker, [(config_json, START.isoformat(), job, args) for args in per_worker]
    )


def _totals(results: list[Any]) -> tuple[int, Counter[str], list[str], list[tuple[int, bool]]]:
    admitted = sum(result[0] for result in results)
    refused: Counter[str] = sum((result[1] for result in results), Counter())
    failures = [failure for result in results for failure in result[2]]
    crossings = [crossing for result in results for crossing in result[3]]
    return admitted, refused, failures, crossings


async def test_a_budget_admits_exactly_what_fits(db_config: StoreConfig) -> None:
    limit, cost = 1000, 70  # 14 fit, 60 try
    await upgrade(db_config)
    async with Store(db_config, clock=Clock(START)) as store:
        project = await store.projects.create("p")
        issued = await store.api_keys.create(balance=10**9, project_id=project.id)
        budget = await store.budgets.create(limit, project_id=project.id, period="day")
    kwargs = {"secret": issued.secret, "cost": cost}
    results = await _run(db_config, "admit", [(15, kwargs, True)] * WORKERS)
    admitted, refused, failures, _ = _totals(results)
    assert failures == []
    assert admitted == limit // cost
    assert refused == Counter({"BudgetExceededError": 4 * 15 - limit // cost})
    async with Store(db_config, clock=Clock(START)) as store:
        status = await store.budgets.status(budget.id)
        assert (status.spent, status.reserved) == (admitted * cost, 0)
        key = await store.api_keys.get(issued.key.id)
        assert (key.total_spent, key.reserved) == (admitted * cost, 0)
        assert (await store.budgets.verify()).ok
        assert (await store.api_keys.verify()).ok


async def test_a_rate_limit_admits_exactly_its_requests_per_window(
    db_config: StoreConfig,
) -> None:
    await upgrade(db_config)
    async with Store(db_config, clock=Clock(START)) as store:
        limit = await store.rate_limits.create(requests=50, per="minute", end_user="u")
    kwargs = {"end_user": "u"}
    results = await _run(db_config, "admit", [(50, kwargs, False)] * WORKERS)
    admitted, refused, failures, _ = _totals(results)
    assert failures == []
    assert (admitted, refused) == (50, Counter({"RateLimitedError": 150}))
    clock = Clock(START + dt.timedelta(minutes=1))
    async with Store(db_config, clock=clock) as store:
        assert (await store.rate_limits.status(limit.id)).requests == 0
        await store.admissions.admit(end_user="u")  # the next window admits again
        clock.move(dt.timedelta(seconds=-1))
        with pytest.raises(RateLimitedError):
            await store.admissions.admit(end_user="u")


async def test_a_soft_limit_is_reported_once_across_replicas(db_config: StoreConfig) -> None:
    await upgrade(db_config)
    async with Store(db_config, clock=Clock(START)) as store:
        await store.budgets.create(1000, tag="team", soft_limits=[800, 500])
    kwargs = {"tags": ["team"], "cost": 30}
    results = await _run(db_config, "admit", [(12, kwargs, True)] * WORKERS)
    admitted, _, failures, crossings = _totals(results)
    assert failures == []
    assert admitted == 1000 // 30
    # Each threshold once, the limit itself never reached (990 of 1000).
    assert sorted(crossings) == [(500, False), (800, False)]


async def test_overlapping_budgets_in_any_order_never_deadlock(db_config: StoreConfig) -> None:
    await upgrade(db_config)
    async with Store(db_config, clock=Clock(START)) as store:
        for tag in "abcd":
            await store.budgets.create(10**9, tag=tag)
    results = await _run(db_config, "overlap", [(seed, 5) for seed in range(WORKERS)])
    assert [failure for _, failures in results for failure in failures] == []
    assert sum(done for done, _ in results) == WORKERS * 5 * 8
    async with Store(db_config, clock=Clock(START)) as store:
        report = await store.budgets.verify()
        assert report.ok and report.periods_checked == 4
