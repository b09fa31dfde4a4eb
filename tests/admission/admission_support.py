"""What the admission tests share: a clock they move, and a project with a prepaid key."""

from __future__ import annotations

import dataclasses
import datetime as dt

from llmstore import IssuedApiKey, Project, Store

# A Saturday, noon UTC: the day, the ISO week (from Monday the 26th), the month and the
# year all begin before it.
START = dt.datetime(2026, 1, 31, 12, 0, tzinfo=dt.UTC)


class Clock:
    """The store's clock in a test: it stands still until the test moves it."""

    def __init__(self, at: dt.datetime) -> None:
        self.at = at

    def __call__(self) -> dt.datetime:
        return self.at

    def move(self, delta: dt.timedelta) -> None:
        self.at += delta

    def set(self, at: dt.datetime) -> None:
        self.at = at


@dataclasses.dataclass
class Tenant:
    project: Project
    key: IssuedApiKey


async def tenant(store: Store, balance: int = 1_000_000, name: str = "tenant") -> Tenant:
    project = await store.projects.create(name)
    key = await store.api_keys.create(balance=balance, project_id=project.id)
    return Tenant(project, key)
