"""What a proxy decides per request: budgets, a rate limit and a prepaid balance, at once.

One ``admissions.admit`` before the upstream call checks and counts everything (or
nothing), one ``admissions.settle`` after it charges the actual cost. The store's clock is
a parameter, so this runs a month in a moment. Runs on a private in-memory database:

    python examples/admission.py
"""

from __future__ import annotations

import asyncio
import datetime as dt

from llmstore import BudgetExceededError, RateLimitedError, Store


class Clock:
    """A clock this example moves; a proxy leaves ``clock=`` out (the system's UTC time)."""

    def __init__(self) -> None:
        self.now = dt.datetime(2026, 1, 31, 12, 0, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


async def request(store: Store, secret: str, user: str, estimate: int, actual: int) -> str:
    try:
        admission = await store.admissions.admit(secret, end_user=user, cost=estimate)
    except (RateLimitedError, BudgetExceededError) as exc:
        return f"{exc.http_status} {exc.public_message}, retry after {exc.retry_after} s"
    # ... the upstream call, then its actual cost:
    settled = await store.admissions.settle(admission.id, actual)
    crossed = [c.threshold for c in (*admission.crossed, *settled.crossed)]
    return f"200 charged {settled.charged}" + (f", crossed {crossed}" if crossed else "")


async def main() -> None:
    clock = Clock()
    async with Store.from_url("sqlite:///:memory:", clock=clock) as store:
        project = await store.projects.create("acme")
        key = await store.api_keys.create(balance=10_000, project_id=project.id)
        # 1,000 a calendar month for the project, with an alert at 600; 300 a day per user;
        # 3 requests a minute for the key.
        await store.budgets.create(1000, project_id=project.id, period="month", soft_limits=[600])
        await store.budgets.create(300, end_user="alice", period="day")
        await store.rate_limits.create(requests=3, per="minute", api_key_id=key.key.id)

        calls = [("alice", 200, 150), ("alice", 100, 120), ("bob", 500, 480), ("bob", 10, 9)]
        for user, estimate, actual in calls:
            print(f"{user}: {await request(store, key.secret, user, estimate, actual)}")
        clock.now += dt.timedelta(minutes=1)
        print(f"bob: {await request(store, key.secret, 'bob', 300, 200)}")
        clock.now = dt.datetime(2026, 2, 1, tzinfo=dt.UTC)  # a new month, a new day
        print(f"bob: {await request(store, key.secret, 'bob', 300, 200)}")

        budget = (await store.budgets.list(project_id=project.id))[0]
        for period in await store.budgets.history(budget.id, limit=2):
            print(f"project, month of {period.period_start:%Y-%m-%d}: spent {period.spent}")
        assert (await store.budgets.verify()).ok
        assert (await store.api_keys.verify()).ok


if __name__ == "__main__":
    asyncio.run(main())
