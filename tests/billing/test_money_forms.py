"""The two forms of every money statement (``llmstore/_billing/money.py``) agree.

On Postgres ``store.api_keys`` sends a charge, a deposit, a hold and a settlement as one
data-modifying CTE each, while ``tx.api_keys`` inside ``store.transaction()`` runs the
Python form, statement by statement; the same calls must write the same rows. On every
run (Postgres configured or not) the one-statement forms are compiled for Postgres and
their parameters checked against what the operations pass them.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from llmstore import ApiKeyRejectedError, ApiKeys, ConflictError, InsufficientBalanceError, Store
from llmstore._billing import money, settlement
from llmstore._billing.records import ENTRY_COLUMNS, RESERVATION_COLUMNS, Movement
from llmstore._db.lean import LeanStatement

_MOVE = Movement(uuid.uuid4(), "charge", 5, idempotency_key="k", params_digest="d")
_NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
FORMS: dict[str, tuple[LeanStatement, dict[str, Any]]] = {
    "charge": (money.MOVEMENT_IN_ONE_STATEMENT["charge"], _MOVE.params(_NOW)),
    "deposit": (money.MOVEMENT_IN_ONE_STATEMENT["deposit"], _MOVE.params(_NOW)),
    "reserve": (
        money.RESERVE_IN_ONE_STATEMENT,
        money.reserve_params(_MOVE.key_id, 5, dt.timedelta(minutes=1), _NOW),
    ),
    "settle": (settlement.SETTLE_IN_ONE_STATEMENT, settlement.settle_params(uuid.uuid4(), 5, _NOW)),
}


# SQLAlchemy's dialect classes are not annotated.
_POSTGRES = postgresql.asyncpg.dialect()  # type: ignore[no-untyped-call]


def _compiled(statement: LeanStatement) -> Any:
    executable = statement.statement
    assert isinstance(executable, sa.Insert)
    return executable.compile(dialect=_POSTGRES)


@pytest.mark.parametrize("name", sorted(FORMS))
def test_each_one_statement_form_takes_exactly_the_parameters_it_is_given(name: str) -> None:
    statement, params = FORMS[name]
    compiled = _compiled(statement)
    required = {key for key, bind in compiled.binds.items() if bind.required}
    # A parameter the form needs and is not given fails at run time; one it is given and
    # does not use was renamed on one side only.
    assert required == set(params), name
    assert compiled.string.startswith("WITH "), name


@pytest.mark.parametrize(
    ("name", "columns"),
    [
        ("charge", ENTRY_COLUMNS),
        ("deposit", ENTRY_COLUMNS),
        ("settle", ENTRY_COLUMNS),
        ("reserve", RESERVATION_COLUMNS),
    ],
)
def test_each_one_statement_form_inserts_the_python_forms_row(
    name: str, columns: tuple[sa.Column[Any], ...]
) -> None:
    statement = FORMS[name][0].statement
    assert isinstance(statement, sa.Insert)
    table = columns[0].table
    assert statement.table is table
    compiled = _compiled(FORMS[name][0]).string
    insert_line = compiled[compiled.index(f"INSERT INTO {table.name} (") :]
    named = insert_line[insert_line.index("(") + 1 : insert_line.index(")")]
    listed = {column.strip() for column in named.split(",")}
    # The columns left out are the ones the Python form writes NULL (or the identity).
    python_values = (
        money.entry_values("charge", key_id=1, amount=1, balance_after=1, now=1)
        if table is ENTRY_COLUMNS[0].table
        else {column.name: 1 for column in table.c}
    )
    assert listed <= set(python_values)
    assert {"api_key_id", "amount", "created_at"} <= listed


def _row(entry: Any) -> tuple[Any, ...]:
    """What a call wrote, without what differs between any two runs (ids, times)."""
    return (
        entry.kind,
        entry.amount,
        entry.balance_after,
        entry.description,
        entry.idempotency_key,
        entry.request_data,
        entry.shortfall,
        entry.reservation_id is not None,
    )


async def _scenario(api_keys: ApiKeys) -> list[Any]:
    """Every money statement, refusals and replays included, on a fresh key."""
    issued = await api_keys.create(100)
    key = issued.key.id
    seen: list[Any] = []
    seen.append(_row(await api_keys.deposit(key, 50, idempotency_key="d", description="top")))
    seen.append(_row(await api_keys.deposit(key, 50, idempotency_key="d", description="top")))
    seen.append(_row(await api_keys.charge(key, 30, request_data={"model": "m"})))
    seen.append(_row(await api_keys.charge(key, 20, idempotency_key="c")))
    seen.append(_row(await api_keys.charge(key, 20, idempotency_key="c")))
    small = await api_keys.reserve(key, 40)
    seen.append((small.amount, small.status))
    seen.append(_row(await api_keys.settle(small.id, 10)))
    large = await api_keys.reserve(key, 80)
    with pytest.raises(InsufficientBalanceError) as refused:
        await api_keys.reserve(key, 21)
    seen.append((refused.value.available, refused.value.requested))
    with pytest.raises(InsufficientBalanceError) as refused:
        await api_keys.charge(key, 21)
    seen.append((refused.value.available, refused.value.requested))
    # More than the key has, the hold included: the rest is a shortfall.
    seen.append(_row(await api_keys.settle(large.id, 500)))
    settled = await api_keys.get_reservation(large.id)
    seen.append((settled.status, settled.settled_amount))
    final = await api_keys.get(key)
    seen.append((final.balance, final.reserved, final.total_deposited, final.total_spent))
    return seen


async def test_one_statement_and_python_forms_write_the_same_rows(store: Store) -> None:
    alone = await _scenario(store.api_keys)
    async with store.transaction() as tx:
        together = await _scenario(tx.api_keys)
    assert together == alone
    assert alone[-1] == (0, 0, 150, 150)
    assert (await store.api_keys.verify()).ok


@pytest.mark.parametrize(
    ("name", "refuses_inactive"),
    [("charge", True), ("reserve", True), ("deposit", False), ("settle", False)],
)
def test_only_new_spending_asks_whether_the_key_is_active(
    name: str, refuses_inactive: bool
) -> None:
    """The one-statement form: a charge and a hold name ``is_active`` in their condition;
    a deposit and a settlement do not."""
    compiled = _compiled(FORMS[name][0]).string
    assert ("api_keys.is_active" in compiled) is refuses_inactive, name


@pytest.mark.parametrize(
    ("kind", "refuses_inactive"),
    [
        ("charge", True),
        ("transfer_out", True),
        ("withdrawal", True),
        ("deposit", False),
        ("transfer_in", False),
        ("withdrawal_refund", False),
    ],
)
def test_the_python_forms_debits_ask_it_too(kind: str, refuses_inactive: bool) -> None:
    change = money._CHANGES[kind].statement
    assert isinstance(change, sa.Update)
    compiled = str(change.compile(dialect=_POSTGRES))
    assert ("api_keys.is_active" in compiled) is refuses_inactive, kind
    hold = str(money._HOLD.compile(dialect=_POSTGRES))
    assert "api_keys.is_active" in hold


async def _inactive_scenario(api_keys: ApiKeys) -> list[Any]:
    """An inactive key's refusals and what it still does; settle(0) and a repeated settle."""
    key = (await api_keys.create(100)).key.id
    seen: list[Any] = []
    hold = await api_keys.reserve(key, 30)
    empty = await api_keys.reserve(key, 10)
    await api_keys.deactivate(key)
    for refused_call in (
        lambda: api_keys.charge(key, 1),
        lambda: api_keys.charge(key, 1, idempotency_key="i"),
        lambda: api_keys.reserve(key, 1),
    ):
        with pytest.raises(ApiKeyRejectedError) as rejected:
            await refused_call()
        seen.append(rejected.value.reason)
    seen.append(_row(await api_keys.deposit(key, 20, idempotency_key="d")))
    settled = await api_keys.settle(hold.id, 25)
    seen.append(_row(settled))
    assert await api_keys.settle(hold.id, 25) == settled
    with pytest.raises(ConflictError) as conflict:
        await api_keys.settle(hold.id, 24)
    seen.append(str(conflict.value).split(" was ")[1])
    nothing = await api_keys.settle(empty.id, 0)
    seen.append(_row(nothing))
    assert await api_keys.settle(empty.id, 0) == nothing
    await api_keys.activate(key)
    seen.append(_row(await api_keys.charge(key, 5)))
    final = await api_keys.get(key)
    seen.append((final.balance, final.reserved, final.total_deposited, final.total_spent))
    return seen


async def test_both_forms_refuse_an_inactive_key_and_replay_a_settle_alike(store: Store) -> None:
    alone = await _inactive_scenario(store.api_keys)
    async with store.transaction() as tx:
        together = await _inactive_scenario(tx.api_keys)
    assert together == alone
    assert alone[:3] == ["inactive", "inactive", "inactive"]
    assert alone[-1] == (90, 0, 120, 30)
    assert (await store.api_keys.verify()).ok
