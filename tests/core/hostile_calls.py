"""Every public method of the store's repositories, with a valid value for each argument, and
the harness that calls one with an argument replaced, on SQLite and Postgres side by side.

``SPECS`` maps ``(repository, method)`` to ``{argument: valid value}``. A valid value is a
constant, ``W("attribute")`` (a row of the store's :class:`World`) or ``Fresh(factory)`` (a
row made for this call alone, for methods that use a row up: delete, settle, ...).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy.exc

from llmstore import LlmstoreError, UsageRecord, UsageWriter, ValidationError
from tests.snapshots import Snapshot, store_snapshot

from .hostile import FUTURE, MINT, PAST, TOKEN, World, label

MAX_MESSAGE = 1000


@dataclasses.dataclass(frozen=True)
class W:
    """The world's row of that name."""

    attribute: str


@dataclasses.dataclass(frozen=True)
class Fresh:
    """A value made for a call on the store it is for, and kept for the next calls until
    one succeeds (a refused call used nothing up). ``row``: making it writes a row."""

    make: Callable[[World], Awaitable[object] | object]
    row: bool = True


async def _project(w: World) -> object:
    return (await w.store.projects.create(w.unique("project"))).id


async def _token(w: World) -> object:
    return (await w.store.tokens.create(w.project_id, name=w.unique("token"))).token.id


async def _credential(w: World) -> object:
    return (await w.store.providers.create("openai", w.unique("model"), active=False)).id


async def _hold(w: World) -> object:
    return (await w.store.api_keys.reserve(w.key_id, 1)).id


async def _payout(w: World) -> object:
    return (await w.store.api_keys.withdraw(w.key_id, 1, TOKEN, MINT)).id


async def _failed_payout(w: World) -> object:
    payout = await w.store.api_keys.withdraw(w.key_id, 1, TOKEN, MINT)
    return (await w.store.api_keys.fail_withdrawal(payout.id, "mint down")).id


async def _budget(w: World) -> object:
    return (await w.store.budgets.create(100, tag=w.unique("tag"))).id


async def _rate_limit(w: World) -> object:
    return (await w.store.rate_limits.create(requests=100, tag=w.unique("tag"))).id


async def _admission(w: World) -> object:
    return (await w.store.admissions.admit(w.key_secret, cost=2)).id


async def _api_key(w: World) -> object:
    return (await w.store.api_keys.create()).key.id


def _name(prefix: str) -> Fresh:
    return Fresh(lambda w: w.unique(prefix), row=False)


PROJECT, TOKEN_ID, CREDENTIAL = Fresh(_project), Fresh(_token), Fresh(_credential)
HOLD, PAYOUT, FAILED_PAYOUT = Fresh(_hold), Fresh(_payout), Fresh(_failed_payout)
BUDGET, RATE_LIMIT, ADMISSION = Fresh(_budget), Fresh(_rate_limit), Fresh(_admission)
API_KEY = Fresh(_api_key)
TTL = dt.timedelta(minutes=5)
ACTOR = {"actor": "tests"}
PAGE = {"limit": 10, "after": None}

SPECS: dict[tuple[str, str], dict[str, object]] = {
    # projects
    ("projects", "create"): {"name": _name("p"), "api_key": "sk-1", **ACTOR},
    ("projects", "get"): {"project_id": W("project_id")},
    ("projects", "get_by_name"): {"name": W("project_name")},
    ("projects", "list"): {"active": None, **PAGE},
    ("projects", "update"): {"project_id": PROJECT, "name": _name("p"), "api_key": "sk-2", **ACTOR},
    ("projects", "deactivate"): {"project_id": PROJECT, **ACTOR},
    ("projects", "activate"): {"project_id": PROJECT, **ACTOR},
    ("projects", "delete"): {"project_id": PROJECT, **ACTOR},
    ("projects", "reveal_api_key"): {"project_id": W("project_id")},
    # tokens
    ("tokens", "create"): {
        "project_id": W("project_id"),
        "expires_at": FUTURE,
        "max_requests": 100,
        "name": _name("t"),
        **ACTOR,
    },
    ("tokens", "use"): {"secret": W("token_secret"), "cache_hit": False},
    ("tokens", "get"): {"token_id": W("token_id")},
    ("tokens", "list"): {"project_id": W("project_id"), "active": None, **PAGE},
    ("tokens", "update"): {
        "token_id": TOKEN_ID,
        "expires_at": FUTURE,
        "max_requests": 5,
        "name": _name("t"),
        **ACTOR,
    },
    ("tokens", "deactivate"): {"token_id": TOKEN_ID, **ACTOR},
    ("tokens", "activate"): {"token_id": TOKEN_ID, **ACTOR},
    ("tokens", "delete"): {"token_id": TOKEN_ID, **ACTOR},
    # audit
    ("audit", "record"): {
        "action": "tests.call",
        "actor": "tests",
        "outcome": "success",
        "project_id": W("project_id"),
        "token_id": W("token_id"),
        "request_id": "req-1",
        "client_ip": "203.0.113.7",
        "metadata": {"k": [1, "v"]},
    },
    ("audit", "get"): {"event_id": W("event_id")},
    ("audit", "list"): {
        "action": "world.made",
        "actor": "tests",
        "project_id": None,
        "outcome": "success",
        "since": PAST,
        "until": FUTURE,
        **PAGE,
    },
    ("audit", "purge"): {"older_than": PAST, **ACTOR},
    ("audit", "verify"): {},
    # providers
    ("providers", "create"): {
        "provider": "openai",
        "model": _name("m"),
        "project_id": W("project_id"),
        "base_url": "https://api.example.com/v1",
        "api_key": "sk-p",
        "active": False,
        **ACTOR,
    },
    ("providers", "get"): {"credential_id": W("credential_id")},
    ("providers", "list"): {"project_id": None, **PAGE},
    ("providers", "update"): {
        "credential_id": CREDENTIAL,
        "provider": "anthropic",
        "model": _name("m"),
        "base_url": "https://api.example.com/v2",
        "api_key": "sk-q",
        **ACTOR,
    },
    ("providers", "activate"): {"credential_id": CREDENTIAL, **ACTOR},
    ("providers", "deactivate"): {"credential_id": CREDENTIAL, **ACTOR},
    ("providers", "delete"): {"credential_id": CREDENTIAL, **ACTOR},
    ("providers", "reveal_api_key"): {"credential_id": W("credential_id")},
    ("providers", "resolve"): {"project_id": W("project_id")},
    ("providers", "ensure_default"): {
        "provider": "openai",
        "model": "gpt-4o",
        "api_key": "sk-p",
        "base_url": "https://api.example.com/v1",
        **ACTOR,
    },
    # api_keys
    ("api_keys", "create"): {
        "balance": 100,
        "project_id": W("project_id"),
        "expires_at": FUTURE,
        "metadata": {"plan": "pro"},
        **ACTOR,
    },
    ("api_keys", "authenticate"): {"secret": W("key_secret")},
    ("api_keys", "get"): {"key_id": W("key_id")},
    ("api_keys", "list"): {"project_id": None, **PAGE},
    ("api_keys", "deposit"): {
        "key_id": W("key_id"),
        "amount": 5,
        "idempotency_key": None,
        "description": "top-up",
        **ACTOR,
    },
    ("api_keys", "charge"): {
        "key_id": W("key_id"),
        "amount": 1,
        "idempotency_key": None,
        "description": "call",
        "request_data": {"model": "m"},
        **ACTOR,
    },
    ("api_keys", "transfer"): {
        "from_key_id": W("key_id"),
        "to_key_id": W("other_key_id"),
        "amount": 1,
        "idempotency_key": None,
        "description": "move",
        **ACTOR,
    },
    ("api_keys", "ledger"): {"key_id": W("key_id"), **PAGE},
    ("api_keys", "reserve"): {"key_id": W("key_id"), "amount": 1, "ttl": TTL, **ACTOR},
    ("api_keys", "get_reservation"): {"reservation_id": W("reservation_id")},
    # A fresh hold: a tiny ttl would let the two stores' copies of one expire apart.
    ("api_keys", "extend"): {"reservation_id": HOLD, "ttl": TTL, **ACTOR},
    ("api_keys", "settle"): {"reservation_id": HOLD, "actual_amount": 1, **ACTOR},
    ("api_keys", "release"): {"reservation_id": HOLD, **ACTOR},
    ("api_keys", "expire_reservations"): {},
    ("api_keys", "withdraw"): {
        "key_id": W("key_id"),
        "amount": 1,
        "token": TOKEN,
        "mint_url": MINT,
        **ACTOR,
    },
    ("api_keys", "get_withdrawal"): {"withdrawal_id": W("withdrawal_id")},
    ("api_keys", "list_withdrawals"): {"key_id": W("key_id"), "status": "pending", **PAGE},
    ("api_keys", "reveal_withdrawal_token"): {"withdrawal_id": W("withdrawal_id")},
    ("api_keys", "complete_withdrawal"): {"withdrawal_id": PAYOUT, **ACTOR},
    ("api_keys", "fail_withdrawal"): {"withdrawal_id": PAYOUT, "error": "mint down", **ACTOR},
    ("api_keys", "retry_withdrawal"): {"withdrawal_id": FAILED_PAYOUT, **ACTOR},
    ("api_keys", "verify"): {},
    # budgets
    ("budgets", "create"): {
        "limit": 1000,
        "project_id": None,
        "api_key_id": None,
        "token_id": None,
        "end_user": None,
        "tag": _name("tag"),
        "period": "week",
        "timezone": "Europe/Berlin",
        "soft_limits": [500, 800],
        "name": "weekly",
    },
    ("budgets", "get"): {"budget_id": W("budget_id")},
    ("budgets", "list"): {
        "project_id": W("project_id"),
        "api_key_id": None,
        "token_id": None,
        "end_user": None,
        "tag": None,
        **PAGE,
    },
    ("budgets", "update"): {"budget_id": BUDGET, "limit": 900, "soft_limits": [10], "name": "b"},
    ("budgets", "delete"): {"budget_id": BUDGET},
    ("budgets", "status"): {"budget_id": W("budget_id")},
    ("budgets", "history"): {"budget_id": W("budget_id"), "limit": 3},
    ("budgets", "verify"): {},
    # rate limits
    ("rate_limits", "create"): {
        "requests": 10,
        "tokens": 1000,
        "per": "minute",
        "project_id": None,
        "api_key_id": None,
        "token_id": None,
        "end_user": _name("user"),
        "tag": None,
        "name": "per user",
    },
    ("rate_limits", "get"): {"rate_limit_id": W("rate_limit_id")},
    ("rate_limits", "list"): {
        "project_id": W("project_id"),
        "api_key_id": None,
        "token_id": None,
        "end_user": None,
        "tag": None,
        **PAGE,
    },
    ("rate_limits", "update"): {
        "rate_limit_id": RATE_LIMIT,
        "requests": 5,
        "tokens": None,
        "per": "second",
        "name": "r",
    },
    ("rate_limits", "delete"): {"rate_limit_id": RATE_LIMIT},
    ("rate_limits", "status"): {"rate_limit_id": W("rate_limit_id")},
    # admissions
    ("admissions", "admit"): {
        "secret": W("key_secret"),
        "api_key_id": None,
        "token_id": None,
        "project_id": W("project_id"),
        "end_user": "alice",
        "tags": ["chat", "batch"],
        "cost": 3,
        "tokens": 100,
        "ttl": TTL,
        "idempotency_key": None,
    },
    ("admissions", "settle"): {
        "admission_id": ADMISSION,
        "cost": 2,
        "tokens": 80,
        "usage": UsageRecord(model="m", cost=2),
    },
    ("admissions", "release"): {"admission_id": ADMISSION},
    ("admissions", "extend"): {"admission_id": ADMISSION, "ttl": TTL},
    ("admissions", "get"): {"admission_id": W("admission_id")},
    ("admissions", "expire"): {},
    ("api_keys", "cleanup_expired"): {**ACTOR},
    ("api_keys", "deactivate"): {"key_id": API_KEY, **ACTOR},
    ("api_keys", "activate"): {"key_id": API_KEY, **ACTOR},
    ("api_keys", "update"): {
        "key_id": API_KEY,
        "expires_at": FUTURE,
        "metadata": {"plan": "team"},
        **ACTOR,
    },
    ("api_keys", "delete"): {"key_id": API_KEY, **ACTOR},
    # usage
    ("usage", "record"): {"record": UsageRecord(model="m", cost=1)},
    ("usage", "record_many"): {"records": [UsageRecord(model="m"), {"model": "n"}]},
    ("usage", "get"): {"usage_id": W("usage_id")},
    ("usage", "list"): {
        "api_key_id": None,
        "project_id": None,
        "model": "m",
        "success": None,
        "since": PAST,
        "until": FUTURE,
        "limit": 10,
        "after": None,
    },
    # ``filters`` is **filters: a hostile value is passed as ``model=value``.
    ("usage", "metrics"): {
        "since": PAST,
        "until": FUTURE,
        "group_by": ["model"],
        "bucket": "day",
        "filters": {"model": "m"},
    },
    ("usage", "purge"): {
        "older_than": PAST,
        "batch_size": 100,
        "export_to": Fresh(lambda w: f"{w.unique('export')}.jsonl", row=False),
        "progress": None,
    },
    ("usage", "issue_receipt"): {"usage_id": W("usage_id")},
    ("usage", "get_receipt"): {"receipt_id": W("receipt_id")},
    ("usage", "writer"): {"max_batch": 10, "flush_interval": 3600, "max_pending": 100},
    # a writer from store.usage.writer()
    ("writer", "put"): {"record": UsageRecord(model="w")},
    ("writer", "close"): {"timeout": 10},
    # the store itself
    ("store", "rotate_keys"): {"batch_size": 100, "progress": None},
    ("store", "health_check"): {},
}
#: The store's own lifecycle: called by every test, never with hostile arguments (none).
LIFECYCLE = {("store", "open"), ("store", "close")}
#: Calls with an argument replaced, as (repository, method, argument).
ARGUMENTS = [(repo, method, name) for (repo, method), args in SPECS.items() for name in args]


def _from_database(exc: BaseException) -> bool:
    """Whether a driver error caused ``exc`` (llmstore chains what it translates)."""
    seen = exc.__cause__
    while seen is not None:
        if isinstance(seen, sqlalchemy.exc.DBAPIError | sqlite3.Error):
            return True
        if type(seen).__module__.startswith("asyncpg"):
            return True
        seen = seen.__cause__
    return False


@dataclasses.dataclass
class Outcome:
    error: LlmstoreError | None

    @property
    def verdict(self) -> str:
        return "ok" if self.error is None else type(self.error).__name__


async def _invoke(world: World, repo: str, method: str, kwargs: dict[str, Any]) -> None:
    store = world.store
    if repo == "writer":
        writer = store.usage.writer(flush_interval=3600)
        try:
            await getattr(writer, method)(**kwargs)
        finally:
            await writer.close()
        return
    if (repo, method) == ("usage", "metrics"):
        filters = kwargs.pop("filters")
        await store.usage.metrics(**kwargs, **filters)
        return
    target = store if repo == "store" else getattr(store, repo)
    result = getattr(target, method)(**kwargs)
    if isinstance(result, UsageWriter):
        await result.close()
    elif isinstance(result, Awaitable):
        await result


async def _outcome(
    world: World, repo: str, method: str, kwargs: dict[str, Any], where: str
) -> Outcome:
    home = os.getcwd()
    os.chdir(world.cwd)  # relative export paths land in this store's own folder
    try:
        await _invoke(world, repo, method, kwargs)
    except LlmstoreError as exc:
        return Outcome(exc)
    except Exception as exc:  # the leak this sweep looks for
        raise AssertionError(f"{where}: {type(exc).__name__} escaped") from exc
    finally:
        os.chdir(home)
    return Outcome(None)


@dataclasses.dataclass
class Pair:
    """A SQLite store and a Postgres store, given the same calls in the same order."""

    worlds: tuple[World, World]
    snapshots: dict[int, Snapshot] = dataclasses.field(default_factory=dict)
    fresh: dict[tuple[int, str, str, str], object] = dataclasses.field(default_factory=dict)

    async def _value(self, world: World, key: tuple[str, str, str], valid: object) -> object:
        if isinstance(valid, W):
            return getattr(world, valid.attribute)
        if not isinstance(valid, Fresh):
            return valid
        known = (id(world), *key)
        if known not in self.fresh:
            made = valid.make(world)
            self.fresh[known] = await made if isinstance(made, Awaitable) else made
            if valid.row:
                self.snapshots.pop(id(world), None)
        return self.fresh[known]

    async def _before(self, world: World) -> Snapshot:
        known = self.snapshots.get(id(world))
        if known is None:
            known = self.snapshots[id(world)] = await store_snapshot(world.store)
        return known

    async def call(
        self, repo: str, method: str, replaced: str | None = None, value: object = None
    ) -> str:
        """Call on both stores, ``replaced`` set to ``value``: the verdict both agree on.

        A refusal must leave every table as it was and not come from the database (for a
        ValidationError), and its message must be short.
        """
        spec = SPECS[repo, method]
        verdicts = []
        for world in self.worlds:
            kwargs: dict[str, Any] = {}
            for name, valid in spec.items():
                if name != replaced:
                    kwargs[name] = await self._value(world, (repo, method, name), valid)
                elif name == "filters":
                    kwargs[name] = {"model": value}
                else:
                    kwargs[name] = value
            before = await self._before(world)
            where = f"{repo}.{method}({replaced}={label(value)}) on {world.store.driver}"
            outcome = await _outcome(world, repo, method, kwargs, where)
            verdicts.append(outcome.verdict)
            if outcome.error is None:
                self.snapshots.pop(id(world), None)
                for name in spec:  # used up: the next call makes its own
                    self.fresh.pop((id(world), repo, method, name), None)
                continue
            message = str(outcome.error)
            assert len(message) <= MAX_MESSAGE, f"{where}: a {len(message)}-character message"
            if isinstance(outcome.error, ValidationError):
                assert not _from_database(outcome.error), f"{where}: refused by the database"
            after = await store_snapshot(world.store)
            assert after == before, f"{where}: {outcome.verdict}, yet the tables changed"
            self.snapshots[id(world)] = after
        assert verdicts[0] == verdicts[1], (
            f"{repo}.{method}({replaced}={label(value)}): SQLite {verdicts[0]}, "
            f"Postgres {verdicts[1]}"
        )
        return verdicts[0]
