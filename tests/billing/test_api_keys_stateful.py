"""A model of prepaid balances, holds and withdrawals, checked against the store step by step.

Hypothesis drives a random sequence of API-key operations; a plain Python model predicts
each outcome (the entry written, or the error raised) and every key's balance, hold and
totals, and after every step the store must agree with the model and ``verify()`` must
find nothing. It runs on an in-memory SQLite store and on a fresh Postgres schema.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from llmstore import (
    ConflictError,
    IdempotencyConflictError,
    InsufficientBalanceError,
    LedgerEntry,
    Store,
    ValidationError,
    generate_key,
)
from llmstore.pytest_plugin import drop_schema, fresh_schema_name
from tests.helpers import require_postgres

T = TypeVar("T")
SETTINGS = settings(
    max_examples=20,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TOKEN = "cashuAeyJ0b2tlbiI6W3sicHJvb2ZzIjpbXX1dfQ"
MINT = "https://mint.example.com/v1"
SHORT = dt.timedelta(milliseconds=1)
LONG = dt.timedelta(hours=1)

amounts = st.integers(min_value=1, max_value=400)
idempotency_keys = st.none() | st.sampled_from(["req-1", "req-2", "req-3"])


@dataclasses.dataclass
class ModelKey:
    balance: int
    reserved: int = 0
    deposited: int = 0
    spent: int = 0

    @property
    def available(self) -> int:
        return self.balance - self.reserved


@dataclasses.dataclass
class ModelHold:
    key: uuid.UUID
    amount: int
    status: str = "active"
    short: bool = False
    #: A settled hold's (actual amount, entry id): the same settle again returns that entry.
    settled: tuple[int, int] | None = None


@dataclasses.dataclass
class ModelPayout:
    key: uuid.UUID
    amount: int
    status: str = "pending"
    retry_count: int = 0


@dataclasses.dataclass(frozen=True)
class Used:
    """What an idempotency key was first used for, and what that call returned."""

    params: tuple[Any, ...]
    entry_ids: tuple[int, ...]
    balance_after: int


class LedgerMachine(RuleBasedStateMachine):
    keys = Bundle("keys")
    holds = Bundle("holds")
    payouts = Bundle("payouts")

    def __init__(self, postgres_url: str | None) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.postgres_url = postgres_url
        self.schema: str | None = None
        self.model: dict[uuid.UUID, ModelKey] = {}
        self.model_holds: dict[uuid.UUID, ModelHold] = {}
        self.model_payouts: dict[uuid.UUID, ModelPayout] = {}
        self.used: dict[tuple[uuid.UUID, str], Used] = {}
        if postgres_url is None:
            self.store = Store.from_url("sqlite:///:memory:", encryption_keys=generate_key())
        else:
            self.schema = fresh_schema_name()
            self.store = Store.from_url(
                postgres_url,
                schema_name=self.schema,
                encryption_keys=generate_key(),
                auto_upgrade=True,
                pool_size=2,
                max_overflow=0,
            )
        self.run(self.store.open())

    def run(self, call: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(call)

    def teardown(self) -> None:
        try:
            self.run(self.store.close())
            if self.postgres_url is not None and self.schema is not None:
                self.run(drop_schema(self.postgres_url, self.schema))
            self.run(self.loop.shutdown_asyncgens())
            self.run(self.loop.shutdown_default_executor())
        finally:
            self.loop.close()

    # -- keys and plain movements ---------------------------------------------------------

    @initialize(target=keys, balance=st.integers(min_value=200, max_value=2000))
    def first_key(self, balance: int) -> uuid.UUID:
        return self._new_key(balance)

    @initialize(target=keys, balance=st.integers(min_value=200, max_value=2000))
    def second_key(self, balance: int) -> uuid.UUID:
        return self._new_key(balance)

    @rule(target=keys, balance=st.integers(min_value=0, max_value=1000))
    def create_key(self, balance: int) -> uuid.UUID:
        return self._new_key(balance)

    def _new_key(self, balance: int) -> uuid.UUID:
        issued = self.run(self.store.api_keys.create(balance=balance))
        key = issued.key
        assert (key.balance, key.reserved, key.total_deposited, key.total_spent) == (
            balance,
            0,
            balance,
            0,
        )
        self.model[key.id] = ModelKey(balance=balance, deposited=balance)
        with pytest.raises(ValidationError):  # a transfer needs two keys
            self.run(self.store.api_keys.transfer(key.id, key.id, 1))
        return key.id

    def _lapse_in_the_way(self, key: uuid.UUID, amount: int) -> None:
        """A debit or hold the available balance cannot cover first expires the key's holds
        past their time, when that makes room: they never block."""
        model = self.model[key]
        if model.available >= amount:
            return
        lapsed = [
            hold
            for hold in self.model_holds.values()
            if hold.key == key and hold.short and hold.status == "active"
        ]
        if model.available + sum(hold.amount for hold in lapsed) < amount:
            return  # expiring them would not make room: the store leaves them
        if lapsed:
            time.sleep(0.003)  # every short hold is past its 1 ms
        for hold in lapsed:
            hold.status = "expired"
            model.reserved -= hold.amount

    def _earlier(self, key: uuid.UUID, idem: str | None) -> Used | None:
        """The first call made with this key's idempotency key, if there was one."""
        return None if idem is None else self.used.get((key, idem))

    def _remember(
        self, key: uuid.UUID, idem: str | None, params: tuple[Any, ...], *entries: LedgerEntry
    ) -> None:
        if idem is not None:
            self.used[(key, idem)] = Used(
                params, tuple(e.id for e in entries), entries[0].balance_after
            )

    def _replayed(
        self, earlier: Used, params: tuple[Any, ...], call: Coroutine[Any, Any, Any]
    ) -> None:
        """A call with an idempotency key used before: the first result, or a conflict."""
        if earlier.params != params:
            with pytest.raises(IdempotencyConflictError):
                self.run(call)
            return
        result = self.run(call)
        entries = result if isinstance(result, tuple) else (result,)
        assert tuple(e.id for e in entries) == earlier.entry_ids
        assert entries[0].balance_after == earlier.balance_after

    @rule(key=keys, amount=amounts, idem=idempotency_keys)
    def deposit(self, key: uuid.UUID, amount: int, idem: str | None) -> None:
        params = ("deposit", amount)
        call = self.store.api_keys.deposit(key, amount, idempotency_key=idem)
        earlier = self._earlier(key, idem)
        if earlier is not None:
            self._replayed(earlier, params, call)
            return
        entry = self.run(call)
        model = self.model[key]
        model.balance += amount
        model.deposited += amount
        assert (entry.kind, entry.amount, entry.balance_after) == ("deposit", amount, model.balance)
        assert entry.idempotency_key == idem
        self._remember(key, idem, params, entry)

    @rule(key=keys, amount=amounts, idem=idempotency_keys)
    def charge(self, key: uuid.UUID, amount: int, idem: str | None) -> None:
        params = ("charge", amount)
        call = self.store.api_keys.charge(key, amount, idempotency_key=idem)
        earlier = self._earlier(key, idem)
        if earlier is not None:
            # A replay returns the first entry even if the money has gone since.
            self._replayed(earlier, params, call)
            return
        self._lapse_in_the_way(key, amount)
        model = self.model[key]
        if model.available < amount:
            with pytest.raises(InsufficientBalanceError) as refused:
                self.run(call)
            assert (refused.value.available, refused.value.requested) == (model.available, amount)
            return
        entry = self.run(call)
        model.balance -= amount
        model.spent += amount
        assert (entry.kind, entry.amount, entry.balance_after) == ("charge", -amount, model.balance)
        self._remember(key, idem, params, entry)

    @precondition(lambda self: len(self.model) >= 2)
    @rule(source=keys, amount=amounts, idem=idempotency_keys, data=st.data())
    def transfer(
        self, source: uuid.UUID, amount: int, idem: str | None, data: st.DataObject
    ) -> None:
        dest = data.draw(st.sampled_from(sorted(k for k in self.model if k != source)))
        call = self.store.api_keys.transfer(source, dest, amount, idempotency_key=idem)
        params = ("transfer", amount, dest)
        earlier = self._earlier(source, idem)
        if earlier is not None:
            self._replayed(earlier, params, call)
            return
        self._lapse_in_the_way(source, amount)
        src, dst = self.model[source], self.model[dest]
        if src.available < amount:
            with pytest.raises(InsufficientBalanceError) as refused:
                self.run(call)
            assert (refused.value.available, refused.value.requested) == (src.available, amount)
            return
        debit, credit = self.run(call)
        src.balance -= amount
        dst.balance += amount
        assert (debit.kind, debit.amount, debit.balance_after) == (
            "transfer_out",
            -amount,
            src.balance,
        )
        assert (credit.kind, credit.amount, credit.balance_after) == (
            "transfer_in",
            amount,
            dst.balance,
        )
        assert debit.transfer_id == credit.transfer_id is not None
        self._remember(source, idem, params, debit, credit)

    # -- holds ----------------------------------------------------------------------------

    @rule(target=holds, key=keys, amount=amounts, short=st.booleans())
    def reserve(self, key: uuid.UUID, amount: int, short: bool) -> Any:
        model = self.model[key]
        call = self.store.api_keys.reserve(key, amount, ttl=SHORT if short else LONG)
        self._lapse_in_the_way(key, amount)
        if model.available < amount:
            with pytest.raises(InsufficientBalanceError) as refused:
                self.run(call)
            assert (refused.value.available, refused.value.requested) == (model.available, amount)
            return multiple()
        hold = self.run(call)
        model.reserved += amount
        assert (hold.api_key_id, hold.amount, hold.status) == (key, amount, "active")
        assert hold.settled_amount is None and hold.finished_at is None
        self.model_holds[hold.id] = ModelHold(key, amount, short=short)
        return hold.id

    def _refused_unless_active(self, hold_id: uuid.UUID, call: Coroutine[Any, Any, Any]) -> bool:
        if self.model_holds[hold_id].status == "active":
            return False
        with pytest.raises(ConflictError):
            self.run(call)
        return True

    @rule(hold_id=holds, actual=st.integers(min_value=1, max_value=1200))
    def settle(self, hold_id: uuid.UUID, actual: int) -> None:
        call = self.store.api_keys.settle(hold_id, actual)
        hold = self.model_holds[hold_id]
        if hold.settled is not None and hold.settled[0] == actual:
            assert self.run(call).id == hold.settled[1]  # a retry: the one settlement
            return
        if self._refused_unless_active(hold_id, call):
            return
        model = self.model[hold.key]
        charged = min(actual, model.available + hold.amount)
        entry = self.run(call)
        model.reserved -= hold.amount
        model.balance -= charged
        model.spent += charged
        hold.status = "settled"
        hold.settled = (actual, entry.id)
        assert (entry.kind, entry.amount, entry.shortfall) == (
            "settlement",
            -charged,
            actual - charged,
        )
        assert (entry.balance_after, entry.reservation_id) == (model.balance, hold_id)
        stored = self.run(self.store.api_keys.get_reservation(hold_id))
        assert (stored.status, stored.settled_amount) == ("settled", charged)

    @rule(hold_id=holds)
    def release(self, hold_id: uuid.UUID) -> None:
        call = self.store.api_keys.release(hold_id)
        if self._refused_unless_active(hold_id, call):
            return
        hold = self.model_holds[hold_id]
        released = self.run(call)
        self.model[hold.key].reserved -= hold.amount
        hold.status = "released"
        assert (released.status, released.settled_amount) == ("released", None)
        assert released.finished_at is not None

    @rule(hold_id=holds)
    def extend(self, hold_id: uuid.UUID) -> None:
        call = self.store.api_keys.extend(hold_id, LONG)
        if self._refused_unless_active(hold_id, call):
            return
        extended = self.run(call)
        self.model_holds[hold_id].short = False
        assert extended.status == "active"
        assert extended.expires_at > dt.datetime.now(dt.UTC) + LONG - dt.timedelta(minutes=1)

    @precondition(lambda self: bool(self.model_holds))
    @rule()
    def expire(self) -> None:
        time.sleep(0.003)  # every short hold is past its 1 ms
        expired = self.run(self.store.api_keys.expire_reservations())
        due = [h for h in self.model_holds.values() if h.short and h.status == "active"]
        assert expired == len(due)
        for hold in due:
            hold.status = "expired"
            self.model[hold.key].reserved -= hold.amount

    # -- withdrawals ----------------------------------------------------------------------

    @rule(target=payouts, key=keys, amount=amounts)
    def withdraw(self, key: uuid.UUID, amount: int) -> Any:
        model = self.model[key]
        call = self.store.api_keys.withdraw(key, amount, TOKEN, MINT)
        self._lapse_in_the_way(key, amount)
        if model.available < amount:
            with pytest.raises(InsufficientBalanceError):
                self.run(call)
            return multiple()
        payout = self.run(call)
        model.balance -= amount
        assert (payout.status, payout.amount, payout.retry_count) == ("pending", amount, 0)
        self.model_payouts[payout.id] = ModelPayout(key, amount)
        return payout.id

    @rule(payout_id=payouts)
    def complete(self, payout_id: uuid.UUID) -> None:
        payout = self.model_payouts[payout_id]
        call = self.store.api_keys.complete_withdrawal(payout_id)
        if payout.status != "pending":
            with pytest.raises(ConflictError):
                self.run(call)
            return
        done = self.run(call)
        payout.status = "completed"
        assert (done.status, done.retry_count) == ("completed", payout.retry_count)
        assert done.completed_at is not None

    @rule(payout_id=payouts)
    def fail(self, payout_id: uuid.UUID) -> None:
        payout = self.model_payouts[payout_id]
        call = self.store.api_keys.fail_withdrawal(payout_id, "mint unreachable")
        if payout.status != "pending":
            with pytest.raises(ConflictError):
                self.run(call)
            return
        failed = self.run(call)
        payout.status = "failed"
        payout.retry_count += 1
        self.model[payout.key].balance += payout.amount
        assert (failed.status, failed.retry_count) == ("failed", payout.retry_count)
        assert failed.error_message == "mint unreachable"

    @rule(payout_id=payouts)
    def retry(self, payout_id: uuid.UUID) -> None:
        payout = self.model_payouts[payout_id]
        model = self.model[payout.key]
        call = self.store.api_keys.retry_withdrawal(payout_id)
        if payout.status != "failed":
            with pytest.raises(ConflictError):
                self.run(call)
            return
        self._lapse_in_the_way(payout.key, payout.amount)
        if model.available < payout.amount:
            with pytest.raises(InsufficientBalanceError):
                self.run(call)
            stored = self.run(self.store.api_keys.get_withdrawal(payout_id))
            assert stored.status == "failed"
            return
        retried = self.run(call)
        payout.status = "pending"
        model.balance -= payout.amount
        assert (retried.status, retried.retry_count) == ("pending", payout.retry_count)

    # -- what must always hold ------------------------------------------------------------

    @precondition(lambda self: bool(self.model))
    @invariant()
    def keys_match_the_model(self) -> None:
        for key_id, model in self.model.items():
            key = self.run(self.store.api_keys.get(key_id))
            assert (key.balance, key.reserved, key.total_deposited, key.total_spent) == (
                model.balance,
                model.reserved,
                model.deposited,
                model.spent,
            ), key_id
            assert key.available == model.available >= 0

    @invariant()
    def ledger_verifies(self) -> None:
        report = self.run(self.store.api_keys.verify())
        assert report.ok, report.mismatches
        assert report.keys_checked == len(self.model)


@pytest.mark.parametrize(
    "driver", ["sqlite-memory", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_api_keys_follow_the_model(driver: str) -> None:
    url = require_postgres() if driver == "postgres" else None
    # Hypothesis types the factory as a machine class; it calls any factory (as documented).
    run_state_machine_as_test(lambda: LedgerMachine(url), settings=SETTINGS)  # type: ignore[arg-type]
