"""The two forms of an admission agree (``_admission/admit.py`` and ``admit_statement.py``).

On Postgres ``store.admissions.admit`` first sends the one-statement form; it decides the
plain case and otherwise writes nothing, and the Python form (statement by statement, as
``tx.admissions`` inside ``store.transaction()`` always runs it) decides. The same
scenario is played on two fresh schemas, one through each form: every result, every
refusal and every row left behind must be the same, and the one-statement form must have
decided most of the admissions itself.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from llmstore import (
    Admission,
    ApiKeyRejectedError,
    BudgetExceededError,
    LlmstoreError,
    RateLimitedError,
    Store,
    TokenRejectedError,
    generate_key,
)
from llmstore._admission import admissions as admissions_module
from llmstore._admission import admit_statement
from llmstore._admission.admit import AdmitRequest
from llmstore._admission.admit_statement import ADMIT_IN_ONE_STATEMENT, admit_params
from llmstore.pytest_plugin import drop_schema, fresh_schema_name
from tests.admission.admission_support import START, Clock
from tests.head_schemas import postgres_schema_at_head
from tests.helpers import require_postgres

Admit = Callable[..., Awaitable[Admission]]


def test_the_statement_takes_exactly_the_parameters_it_is_given() -> None:
    request = AdmitRequest(
        secret_kind="key",
        secret_digest="d" * 64,
        api_key_id=None,
        token_id=None,
        project_id=None,
        end_user="u",
        tags=("a",),
        cost=1,
        tokens=1,
        ttl=dt.timedelta(minutes=1),
        idempotency_key=None,
        params_digest=None,
    )
    statement = ADMIT_IN_ONE_STATEMENT.statement
    assert isinstance(statement, sa.Select)
    compiled = statement.compile(
        dialect=postgresql.asyncpg.dialect()  # type: ignore[no-untyped-call]
    )
    required = {name for name, bind in compiled.binds.items() if bind.required}
    assert required == set(admit_params(request, START))
    assert compiled.string.startswith("WITH ")


@contextlib.asynccontextmanager
async def _postgres_store(clock: Clock) -> AsyncIterator[Store]:
    url = require_postgres()
    schema = fresh_schema_name()
    await postgres_schema_at_head(url, schema)
    try:
        async with Store.from_url(
            url, schema_name=schema, encryption_keys=generate_key(), clock=clock
        ) as store:
            yield store
    finally:
        await drop_schema(url, schema)


class _Names:
    """Ids made by one store, named alike in both runs."""

    def __init__(self) -> None:
        self.by_id: dict[Any, str] = {}

    def add(self, name: str, value: Any) -> Any:
        self.by_id[value] = name
        return value

    def __call__(self, value: Any) -> Any:
        return self.by_id.get(value, value)


def _outcome(names: _Names, result: Admission | LlmstoreError) -> tuple[Any, ...]:
    if isinstance(result, BudgetExceededError):
        return ("budget", names(result.budget_id), result.remaining, result.resets_at)
    if isinstance(result, RateLimitedError):
        return ("rate", names(result.rate_limit_id), result.retry_after)
    if isinstance(result, (ApiKeyRejectedError, TokenRejectedError)):
        return (type(result).__name__, result.reason)
    if isinstance(result, LlmstoreError):
        return (type(result).__name__, str(result))
    key = result.api_key
    token = result.token
    return (
        "admitted",
        result.cost,
        result.tokens,
        names(result.project_id),
        result.end_user,
        result.tags,
        result.expires_at,
        result.reservation_id is not None,
        sorted((names(b.budget_id), b.period_start, b.remaining) for b in result.budgets),
        sorted((names(c.budget_id), c.period_start, c.threshold, c.hard) for c in result.crossed),
        None if key is None else (key.balance, key.reserved, key.last_used_at, key.is_active),
        None if token is None else (token.request_count, token.last_used_at),
    )


async def _scenario(store: Store, admit: Admit, clock: Clock) -> list[tuple[Any, ...]]:
    """Admissions of every kind, plain and not: each outcome, then every row's state."""
    names = _Names()
    project = names.add("project", (await store.projects.create("p")).id)
    key = await store.api_keys.create(balance=1_000, project_id=project)
    names.add("key", key.key.id)
    issued = await store.tokens.create(project, max_requests=6)
    names.add("token", issued.token.id)
    names.add("b-project", (await store.budgets.create(700, project_id=project, period="day")).id)
    berlin = await store.budgets.create(
        400, api_key_id=key.key.id, period="month", timezone="Europe/Berlin", soft_limits=(100, 300)
    )
    names.add("b-key", berlin.id)
    names.add("b-user", (await store.budgets.create(250, end_user="alice")).id)
    six_hours = dt.timedelta(hours=6)
    names.add("b-tag", (await store.budgets.create(90, tag="batch", period=six_hours)).id)
    names.add("r-key", (await store.rate_limits.create(requests=8, api_key_id=key.key.id)).id)
    limit = await store.rate_limits.create(tokens=1_000, per="hour", project_id=project)
    names.add("r-project", limit.id)
    names.add("r-tag", (await store.rate_limits.create(requests=3, per="second", tag="batch")).id)

    outcomes: list[tuple[Any, ...]] = []

    async def attempt(secret: str | None = None, **kwargs: Any) -> None:
        try:
            result: Admission | LlmstoreError = await admit(secret, **kwargs)
        except LlmstoreError as refused:
            result = refused
        outcomes.append(_outcome(names, result))

    for cost in (40, 70, 90, 150, 60, 0):  # crossing 100 and 300, then the key budget's limit
        await attempt(key.secret, cost=cost, tokens=120)
    await attempt(key.secret, cost=5, tokens=2_000)  # more tokens than any window takes
    await attempt(key.secret, cost=5, end_user="alice", tags=["batch", "x"])
    await attempt(key.secret, cost=30, end_user="alice", tags=["batch"])
    await attempt(key.secret, cost=60, tags=["batch"])  # the tag budget is full
    await attempt(key.secret, cost=1, tags=["batch"])
    clock.move(dt.timedelta(seconds=1))  # the tag's per-second window turns
    await attempt(key.secret, cost=1, tags=["batch"], idempotency_key="once")
    await attempt(key.secret, cost=1, tags=["batch"], idempotency_key="once")
    for _ in range(8):  # the token's quota, then the project's token limit
        await attempt(issued.secret, cost=10, tokens=100)
    await attempt(token_id=issued.token.id, cost=1)
    await attempt(api_key_id=key.key.id, cost=2_000)  # more than the key holds
    await attempt(api_key_id=key.key.id, cost=1, project_id=project)
    await attempt("lsk_" + "x" * 40, cost=1)
    clock.move(dt.timedelta(days=1))  # a new day and a new minute: new periods, new windows
    for cost in (300, 300, 200):
        await attempt(key.secret, cost=cost)
    await store.api_keys.deactivate(key.key.id)
    await attempt(key.secret, cost=1)
    return outcomes + await _rows(store, names)


async def _rows(store: Store, names: _Names) -> list[tuple[Any, ...]]:
    report = await store.budgets.verify()
    assert report.ok, report
    assert (await store.api_keys.verify()).ok
    rows: list[tuple[Any, ...]] = []
    for name in ("b-project", "b-key", "b-user", "b-tag"):
        budget_id = next(value for value, named in names.by_id.items() if named == name)
        status = await store.budgets.status(budget_id)
        history = await store.budgets.history(budget_id, limit=10)
        rows.append((name, status.spent, status.reserved, status.period_start, history))
    for name in ("r-key", "r-project", "r-tag"):
        limit_id = next(value for value, named in names.by_id.items() if named == name)
        window = await store.rate_limits.status(limit_id)
        rows.append((name, window.requests, window.tokens, window.window_start))
    return rows


async def test_both_forms_decide_and_write_alike(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decided: list[bool] = []
    original = admit_statement.admitted

    def counting(row: Any) -> Admission | None:
        found = original(row)
        decided.append(found is not None)
        return found

    monkeypatch.setattr(admissions_module, "admitted", counting)
    one_clock, python_clock = Clock(START), Clock(START)
    async with _postgres_store(one_clock) as store:
        one_statement = await _scenario(store, store.admissions.admit, one_clock)
    async with _postgres_store(python_clock) as store:

        async def in_a_transaction(secret: str | None = None, **kwargs: Any) -> Admission:
            async with store.transaction() as tx:
                return await tx.admissions.admit(secret, **kwargs)

        python_form = await _scenario(store, in_a_transaction, python_clock)
    assert one_statement == python_form
    # Of the 28 admissions that reached the database, the first of each new window or
    # period and every refusal went on to the Python form; the statement decided the
    # other 11 alone.
    assert (len(decided), decided.count(True)) == (28, 11), decided
