"""The two forms of an admission and of its settlement agree (``_admission/admit.py`` and
``admit_statement.py``; ``finish.py`` and ``settle_statement.py``).

On Postgres ``store.admissions.admit`` and ``settle`` first send the one-statement form;
it decides the plain case and otherwise writes nothing, and the Python form (statement by
statement, as ``tx.admissions`` inside ``store.transaction()`` always runs it) decides.
The same scenario is played on two fresh schemas, one through each form: every result,
every refusal and every row left behind must be the same, and the one-statement forms
must have decided the plain calls themselves.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import create_async_engine

from llmstore import (
    Admission,
    ApiKeyRejectedError,
    BudgetExceededError,
    LlmstoreError,
    RateLimitedError,
    Settlement,
    Store,
    StoreConfig,
    TokenRejectedError,
    UsageRecord,
    generate_key,
)
from llmstore._admission import admissions as admissions_module
from llmstore._admission import admit_statement, settle_statement
from llmstore._admission.admit import AdmitRequest
from llmstore._admission.admit_statement import ADMIT_IN_ONE_STATEMENT, admit_params
from llmstore._admission.settle_statement import SETTLE_IN_ONE_STATEMENT, settle_params
from llmstore._db.engines import MAX_CACHEABLE_STATEMENT
from llmstore._db.lean import LeanStatement
from llmstore.pytest_plugin import drop_schema, fresh_schema_name
from tests.admission.admission_support import START, Clock
from tests.head_schemas import postgres_schema_at_head
from tests.helpers import require_postgres

Admit = Callable[..., Awaitable[Admission]]
Settle = Callable[..., Awaitable[Settlement]]


def _compiled(statement: LeanStatement) -> Any:
    executable = statement.statement
    assert isinstance(executable, sa.Select)
    return executable.compile(dialect=postgresql.asyncpg.dialect())  # type: ignore[no-untyped-call]


def test_the_statements_take_exactly_the_parameters_they_are_given() -> None:
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
    forms = [
        (ADMIT_IN_ONE_STATEMENT, admit_params(request, START)),
        (SETTLE_IN_ONE_STATEMENT, settle_params(uuid.uuid4(), 5, None, "d" * 64, START)),
    ]
    for statement, params in forms:
        compiled = _compiled(statement)
        required = {name for name, bind in compiled.binds.items() if bind.required}
        assert required == set(params)
        assert compiled.string.startswith("WITH ")


def test_the_statements_stay_prepared_on_asyncpg() -> None:
    """asyncpg keeps no plan of a statement longer than its connections allow: each call
    would be planned again (four times the cost of the admission's statement)."""
    schema = "s" * 63  # the longest name Postgres takes
    for statement in (ADMIT_IN_ONE_STATEMENT, SETTLE_IN_ONE_STATEMENT):
        compiled = statement.compiled(postgresql.asyncpg.dialect(), schema)  # type: ignore[no-untyped-call]
        assert len(compiled.sql.encode()) < MAX_CACHEABLE_STATEMENT


async def test_a_store_prepares_statements_that_long(clock: Clock) -> None:
    async with _postgres_store(clock) as store:
        runner: Any = store._runner  # llmstore's own engine: no public handle on it
        async with runner._engine.connect() as conn:
            raw = await conn.get_raw_connection()
            config = raw.driver_connection._config
    assert config.max_cacheable_statement_size == MAX_CACHEABLE_STATEMENT


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


def _settlement_outcome(names: _Names, result: Settlement | LlmstoreError) -> tuple[Any, ...]:
    if isinstance(result, LlmstoreError):
        return (type(result).__name__,)
    return (
        "settled",
        result.cost,
        result.tokens,
        result.charged,
        result.shortfall,
        result.usage_id is not None,
        result.settled_at,
        [(names(c.budget_id), c.period_start, c.threshold, c.hard) for c in result.crossed],
    )


async def _scenario(
    store: Store, admit: Admit, settle: Settle, clock: Clock
) -> list[tuple[Any, ...]]:
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
    admitted: list[Admission] = []

    async def attempt(secret: str | None = None, **kwargs: Any) -> None:
        result: Admission | LlmstoreError
        try:
            made = await admit(secret, **kwargs)
            admitted.append(made)
            result = made
        except LlmstoreError as refused:
            result = refused
        outcomes.append(_outcome(names, result))

    async def settling(index: int, cost: int, **kwargs: Any) -> None:
        try:
            result: Settlement | LlmstoreError = await settle(admitted[index].id, cost, **kwargs)
        except LlmstoreError as refused:
            result = refused
        outcomes.append(_settlement_outcome(names, result))

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
    # Settled below, at and above the estimate, token counts corrected or not; at 0; past
    # a soft limit of the key's budget (300); again alike and unalike; with usage.
    await settling(0, 30, tokens=100)
    await settling(1, 70, tokens=500)
    await settling(2, 200)
    await settling(3, 0, tokens=0)
    await settling(0, 30, tokens=100)
    await settling(0, 31)
    await settling(4, 1, usage=UsageRecord(api_key_id=key.key.id, request_id="r", cost=1))
    await store.admissions.release(admitted[5].id)
    await settling(5, 1)
    await settling(6, 5_000)  # more than the key has: the rest is the shortfall
    await settling(7, 10, tokens=90)  # a token's admission: no key to charge
    clock.move(dt.timedelta(days=1))  # a new day and a new minute: new periods, new windows
    for cost in (300, 300, 200):
        await attempt(key.secret, cost=cost)
    await settling(8, 10)  # admitted yesterday: spent in the period it was admitted in
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
    admitted, settled = admit_statement.admitted, settle_statement.settled

    def counting_admissions(row: Any) -> Admission | None:
        found = admitted(row)
        decided.append(found is not None)
        return found

    settles: list[bool] = []

    def counting_settlements(row: Any, params: Any) -> Settlement | None:
        found = settled(row, params)
        settles.append(found is not None)
        return found

    monkeypatch.setattr(admissions_module, "admitted", counting_admissions)
    monkeypatch.setattr(admissions_module, "settled", counting_settlements)
    one_clock, python_clock = Clock(START), Clock(START)
    async with _postgres_store(one_clock) as store:
        admissions = store.admissions
        one_statement = await _scenario(store, admissions.admit, admissions.settle, one_clock)
    async with _postgres_store(python_clock) as store:

        async def admit_in_a_transaction(secret: str | None = None, **kwargs: Any) -> Admission:
            async with store.transaction() as tx:
                return await tx.admissions.admit(secret, **kwargs)

        async def settle_in_a_transaction(*args: Any, **kwargs: Any) -> Settlement:
            async with store.transaction() as tx:
                return await tx.admissions.settle(*args, **kwargs)

        python_form = await _scenario(
            store, admit_in_a_transaction, settle_in_a_transaction, python_clock
        )
    assert one_statement == python_form
    # Of the 28 admissions that reached the database, the first of each new window or
    # period and every refusal went on to the Python form; the statement decided the
    # other 11 alone. Of the settlements, the replay, the conflicts and the released
    # admission went on too (the one with usage never tried the statement).
    assert (len(decided), decided.count(True)) == (28, 11), decided
    assert settles == [True, True, True, True, False, False, False, True, True, True], settles


async def test_on_a_hosts_engine_the_statements_run_through_sqlalchemy(
    monkeypatch: pytest.MonkeyPatch, clock: Clock
) -> None:
    """A host's engine has no lean path: the same statements run through SQLAlchemy, whose
    result processing gives the same records."""
    decided: list[tuple[str, bool]] = []
    admitted, settled = admit_statement.admitted, settle_statement.settled

    def counting_admissions(row: Any) -> Admission | None:
        found = admitted(row)
        decided.append(("admit", found is not None))
        return found

    def counting_settlements(row: Any, params: Any) -> Settlement | None:
        found = settled(row, params)
        decided.append(("settle", found is not None))
        return found

    monkeypatch.setattr(admissions_module, "admitted", counting_admissions)
    monkeypatch.setattr(admissions_module, "settled", counting_settlements)
    url = require_postgres()
    schema = fresh_schema_name()
    await postgres_schema_at_head(url, schema)
    engine = create_async_engine(StoreConfig.from_url(url).url.get_secret_value())
    try:
        async with Store.from_engine(
            engine, schema_name=schema, encryption_keys=generate_key(), clock=clock
        ) as store:
            project = await store.projects.create("p")
            key = await store.api_keys.create(balance=1_000, project_id=project.id)
            budget = await store.budgets.create(500, project_id=project.id, soft_limits=(100,))
            await store.rate_limits.create(requests=10, api_key_id=key.key.id)
            first = await store.admissions.admit(key.secret, cost=50)
            await store.admissions.settle(first.id, 50)
            second = await store.admissions.admit(key.secret, cost=60, tokens=7)
            settlement = await store.admissions.settle(second.id, 55, tokens=5)
            assert [(b.budget_id, b.remaining) for b in second.budgets] == [(budget.id, 390)]
            assert [(c.budget_id, c.threshold, c.hard) for c in second.crossed] == [
                (budget.id, 100, False)
            ]
            assert second.api_key is not None and second.api_key.reserved == 60
            assert (settlement.charged, settlement.shortfall, settlement.tokens) == (55, 0, 5)
            stored = await store.admissions.get(second.id)
            assert (stored.status, stored.crossed, stored.tokens) == ("settled", second.crossed, 7)
            assert (await store.budgets.verify()).ok and (await store.api_keys.verify()).ok
    finally:
        await engine.dispose()
        await drop_schema(url, schema)
    assert decided == [("admit", False), ("settle", True), ("admit", True), ("settle", True)]
