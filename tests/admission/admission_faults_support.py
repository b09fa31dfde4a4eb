"""What the admission fault tests share: a tenant with a prepaid key, two budgets and a
rate limit; a check that no admission was left half-written, read from the tables; the
server pids of a store's Postgres connections; and a worker process that admits and
settles until it is killed."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import random
import time
import uuid
from collections import Counter, defaultdict
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore import Budget, LlmstoreError, RateLimit, Store, StoreConfig
from llmstore._db.admission_schema import (
    admission_budgets,
    admission_windows,
    admissions,
    rate_windows,
)
from llmstore._db.schema import ledger_entries, reservations
from llmstore.pytest_plugin import run_sql
from tests.admission.admission_support import Clock, Tenant, tenant

A = admissions
AB = admission_budgets
AW = admission_windows
L = ledger_entries
R = reservations
RW = rate_windows
TAG = "team"


@dataclasses.dataclass
class Limits:
    """A tenant whose key pays, a budget of its project, one of a tag, and a rate limit."""

    tenant: Tenant
    project_budget: Budget
    tag_budget: Budget
    rate_limit: RateLimit

    @property
    def secret(self) -> str:
        return self.tenant.key.secret

    @property
    def key_id(self) -> uuid.UUID:
        return self.tenant.key.key.id


async def limits(store: Store, *, tag_limit: int = 10**9, soft: tuple[int, ...] = ()) -> Limits:
    t = await tenant(store, balance=10**8)
    project_budget = await store.budgets.create(10**9, project_id=t.project.id, period="day")
    tag_budget = await store.budgets.create(tag_limit, tag=TAG, period="month", soft_limits=soft)
    rate_limit = await store.rate_limits.create(
        requests=10**6, tokens=10**12, per="hour", project_id=t.project.id
    )
    return Limits(t, project_budget, tag_budget, rate_limit)


# -- what the tables say -----------------------------------------------------------------------


def _one_snapshot(conn: Connection) -> None:
    """Read what follows in one snapshot (Postgres reads at READ COMMITTED otherwise)."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")


def _problems(conn: Connection, setup: Limits) -> tuple[list[str], Counter[str]]:
    """Every admission whole: its key hold, its budget holds and its window count as its
    status says, a settled one's one ledger entry; (problems, admissions by status)."""
    _one_snapshot(conn)
    problems: list[str] = []
    rows = conn.execute(sa.select(A)).all()
    holds = {row.id: row for row in conn.execute(sa.select(R))}
    entries: dict[uuid.UUID | None, list[Any]] = defaultdict(list)
    for entry in conn.execute(sa.select(L).where(L.c.kind == "settlement")):
        entries[entry.reservation_id].append(entry)
    budget_holds: dict[uuid.UUID, list[Any]] = defaultdict(list)
    for held in conn.execute(sa.select(AB)):
        budget_holds[held.admission_id].append(held)
    counted: dict[uuid.UUID, list[Any]] = defaultdict(list)
    for window in conn.execute(sa.select(AW)):
        counted[window.admission_id].append(window)
    for a in rows:
        name = f"{a.status} admission {a.id}"
        hold = holds.pop(a.reservation_id, None)
        if hold is None or (hold.api_key_id, hold.amount) != (setup.key_id, a.cost):
            problems.append(f"{name}: its key hold is {hold}")
        elif hold.status != a.status:
            problems.append(f"{name}: its key hold is {hold.status}")
        expected = {setup.project_budget.id} | ({setup.tag_budget.id} if TAG in a.tags else set())
        mine = budget_holds.pop(a.id, [])
        settled_amount = a.settled_cost if a.status == "settled" else None
        if sorted(h.budget_id for h in mine) != sorted(expected) or any(
            (h.amount, h.settled_amount) != (a.cost, settled_amount) for h in mine
        ):
            problems.append(f"{name}: its budget holds are {[tuple(h) for h in mine]}")
        tokens = a.tokens
        if a.status == "released":
            tokens = 0  # a release frees the estimate (the request stays counted)
        elif a.status == "settled" and a.settled_tokens is not None:
            tokens = a.settled_tokens
        windows = counted.pop(a.id, [])
        if [(w.rate_limit_id, w.tokens) for w in windows] != [(setup.rate_limit.id, tokens)]:
            problems.append(f"{name}: its windows are {[tuple(w) for w in windows]}")
        charges = entries.pop(a.reservation_id, [])
        if a.status == "settled":
            if [-entry.amount for entry in charges] != [a.charged] or (
                a.charged + a.shortfall != a.settled_cost
            ):
                problems.append(f"{name}: charged {a.charged}, its entries {charges}")
        elif charges or a.charged is not None:
            problems.append(f"{name}: charged {a.charged}, its entries {charges}")
    # Nothing outside an admission: no hold, no settlement, no budget hold, no count.
    for leftover in (holds, entries, budget_holds, counted):
        if leftover:
            problems.append(f"rows of no admission: {leftover}")
    windows_total = conn.execute(
        sa.select(sa.func.coalesce(sa.func.sum(RW.c.requests), 0), sa.func.count())
    ).one()
    if windows_total[0] != len(rows):
        problems.append(f"the windows count {windows_total[0]} requests of {len(rows)}")
    window_tokens = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(RW.c.tokens), 0))).scalar()
    tokens_counted = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(AW.c.tokens), 0))).scalar()
    if window_tokens != tokens_counted:
        problems.append(
            f"the windows count {window_tokens} tokens, the admissions {tokens_counted}"
        )
    return problems, Counter(a.status for a in rows)


FINISHED_OR_NOT = frozenset({"active", "settled", "released"})


async def check_whole(
    store: Store, setup: Limits, statuses: frozenset[str] = FINISHED_OR_NOT
) -> Counter[str]:
    """verify() of budgets and keys is ok and nothing is half-written; admissions by status."""
    budgets, keys = await store.budgets.verify(), await store.api_keys.verify()
    assert budgets.ok, budgets.mismatches
    assert keys.ok, keys.mismatches
    problems, by_status = await run_sql(store, lambda conn: _problems(conn, setup), write=True)
    assert problems == []
    assert set(by_status) <= statuses, by_status
    return by_status


async def keeps_working(store: Store, setup: Limits) -> None:
    """A new admission and its settlement succeed, and are counted and charged."""
    key = await store.api_keys.get(setup.key_id)
    window = await store.rate_limits.status(setup.rate_limit.id)
    admitted = await store.admissions.admit(setup.secret, tags=[TAG], cost=7, tokens=3)
    settled = await store.admissions.settle(admitted.id, 5, tokens=4)
    assert (settled.charged, settled.shortfall) == (5, 0)
    after = await store.api_keys.get(setup.key_id)
    assert (after.balance, after.reserved) == (key.balance - 5, key.reserved)
    counted = await store.rate_limits.status(setup.rate_limit.id)
    assert (counted.requests, counted.tokens) == (window.requests + 1, window.tokens + 4)


# -- a worker process that admits and settles until it is killed -------------------------------

BURST_TTL = dt.timedelta(minutes=1)


def burst_worker(config_json: str, at: str, secret: str, started: Any, seed: int) -> None:
    """Admit and settle (or release, or leave active) with 8 tasks at once until killed;
    ``started`` is set after the first 40 admissions. Gives up after a minute."""
    asyncio.run(_burst(config_json, Clock(dt.datetime.fromisoformat(at)), secret, started, seed))


async def _burst(config_json: str, clock: Clock, secret: str, started: Any, seed: int) -> None:
    rng = random.Random(seed)
    done = 0
    deadline = time.monotonic() + 60
    async with Store(StoreConfig.model_validate_json(config_json), clock=clock) as store:

        async def one() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                try:
                    admitted = await store.admissions.admit(
                        secret, tags=[TAG], cost=rng.randint(1, 50), tokens=5, ttl=BURST_TTL
                    )
                    done += 1
                    if done == 40:
                        started.set()
                    await asyncio.sleep(rng.uniform(0, 0.005))
                    if rng.random() < 0.7:
                        await store.admissions.settle(admitted.id, rng.randint(1, 60))
                    elif rng.random() < 0.5:
                        await store.admissions.release(admitted.id)
                except LlmstoreError:
                    await asyncio.sleep(0.01)

        await asyncio.gather(*(one() for _ in range(8)))
