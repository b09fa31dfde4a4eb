"""API keys: cleanup_expired, and verify() (with the ``verify`` command), on every driver,
in a single process."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore import (
    ApiKey,
    ApiKeyRejectedError,
    LedgerMismatch,
    LedgerReport,
    NotFoundError,
    Store,
    StoreConfig,
)
from llmstore._cli.main import EXIT_OK, EXIT_TAMPERED, main
from llmstore._db.schema import api_keys, ledger_entries, reservations
from llmstore.migrations._commands import upgrade
from llmstore.pytest_plugin import run_sql
from tests.billing.api_keys_support import MINT, TABLES, TOKEN, _everything, _key, _ledger
from tests.helpers import now

# --- cleanup_expired -----------------------------------------------------------------------


async def test_cleanup_expired_deletes_only_expired_keys_with_nothing_left(store: Store) -> None:
    past = now() - dt.timedelta(seconds=1)
    gone = await store.api_keys.create(expires_at=past)
    spent = await _key(store, 30, expires_at=past)
    await store.api_keys.charge(spent.id, 30)  # expired, spent to zero: also deleted
    paid_out = await _key(store, 20, expires_at=past)
    payout = await store.api_keys.withdraw(paid_out.id, 20, TOKEN, MINT)
    await store.api_keys.complete_withdrawal(payout.id)  # completed: deleted with the key

    with_balance = await _key(store, 1, expires_at=past)
    held = await _key(store, 10, expires_at=past)
    await store.api_keys.reserve(held.id, 10)
    pending = await _key(store, 10, expires_at=past)
    await store.api_keys.withdraw(pending.id, 10, TOKEN, MINT)  # balance 0, payout pending
    failed = await _key(store, 10, expires_at=past)
    refunded = await store.api_keys.withdraw(failed.id, 10, TOKEN, MINT)
    await store.api_keys.fail_withdrawal(refunded.id, "x")
    unexpired = await _key(store, expires_at=now() + dt.timedelta(hours=1))
    forever = await _key(store)
    # An active hold on an expired key with no balance: only reachable with direct SQL,
    # since a hold needs money; the hold alone must keep the key.
    orphan_hold = await _key(store, expires_at=past)
    await run_sql(
        store,
        lambda conn: conn.execute(
            reservations.insert().values(
                id=uuid.uuid4(),
                api_key_id=orphan_hold.id,
                amount=5,
                status="active",
                created_at=now(),
                expires_at=now() + dt.timedelta(hours=1),
            )
        ),
        write=True,
    )

    assert await store.api_keys.cleanup_expired() == 3
    for deleted in (gone.key, spent, paid_out):
        with pytest.raises(NotFoundError):
            await store.api_keys.get(deleted.id)
    with pytest.raises(ApiKeyRejectedError) as info:
        await store.api_keys.authenticate(gone.secret)
    assert info.value.reason == "unknown"
    kept = {key.id for key in await store.api_keys.list()}
    assert kept == {
        with_balance.id,
        held.id,
        pending.id,
        failed.id,
        unexpired.id,
        forever.id,
        orphan_hold.id,
    }
    rows = await _everything(store)
    deleted_ids = {gone.key.id, spent.id, paid_out.id}
    for table in ("llmstore_ledger_entries", "llmstore_reservations", "llmstore_withdrawals"):
        columns = [c.name for c in next(t for t in TABLES if t.name == table).c]
        position = columns.index("api_key_id")
        assert not [row for row in rows[table] if row[position] in deleted_ids], table
    assert await store.api_keys.cleanup_expired() == 0
    assert (await store.api_keys.verify()).keys_checked == 7


# --- verify --------------------------------------------------------------------------------


async def _mix(store: Store) -> tuple[ApiKey, ApiKey, ApiKey]:
    a = await _key(store, 100)
    b = await _key(store, 50)
    c = await _key(store)
    await store.api_keys.charge(a.id, 10)
    await store.api_keys.deposit(c.id, 70)
    hold = await store.api_keys.reserve(b.id, 20)
    await store.api_keys.settle(hold.id, 25)
    await store.api_keys.reserve(c.id, 30)
    await store.api_keys.reserve(a.id, 5)
    await store.api_keys.transfer(a.id, b.id, 12)
    withdrawal = await store.api_keys.withdraw(b.id, 8, TOKEN, MINT)
    await store.api_keys.fail_withdrawal(withdrawal.id, "x")
    await store.api_keys.retry_withdrawal(withdrawal.id)
    gone = await store.api_keys.reserve(c.id, 1)
    await store.api_keys.release(gone.id)
    return a, b, c


async def test_verify_is_ok_after_a_mix(store: Store) -> None:
    empty = await store.api_keys.verify()
    assert empty == LedgerReport(ok=True, keys_checked=0, mismatches=[])
    await _mix(store)
    await _key(store)  # a key without any entry
    report = await store.api_keys.verify()
    assert isinstance(report, LedgerReport)
    assert report.ok is True
    assert report.keys_checked == 4
    assert report.mismatches == []


async def test_verify_names_each_tampered_key_and_field(store: Store) -> None:
    a, b, c = await _mix(store)
    a_state = await store.api_keys.get(a.id)
    b_state = await store.api_keys.get(b.id)
    c_state = await store.api_keys.get(c.id)
    charge = next(e for e in await _ledger(store, b.id) if e.kind == "settlement")

    def tamper(conn: Connection) -> None:
        # a: balance raised by hand
        conn.execute(
            sa.update(api_keys).where(api_keys.c.id == a.id).values(balance=api_keys.c.balance + 7)
        )
        # b: one ledger entry deleted (a settlement: balance and total_spent disagree)
        deleted = conn.execute(sa.delete(ledger_entries).where(ledger_entries.c.id == charge.id))
        assert deleted.rowcount == 1
        # c: reserved changed without a hold
        conn.execute(sa.update(api_keys).where(api_keys.c.id == c.id).values(reserved=3))

    await run_sql(store, tamper, write=True)
    report = await store.api_keys.verify()
    assert report.ok is False
    assert report.keys_checked == 3
    assert all(isinstance(m, LedgerMismatch) for m in report.mismatches)
    found = {(m.api_key_id, m.field, m.stored, m.expected) for m in report.mismatches}
    assert found == {
        (a.id, "balance", a_state.balance + 7, a_state.balance),
        (b.id, "balance", b_state.balance, b_state.balance - charge.amount),
        (b.id, "total_spent", b_state.total_spent, b_state.total_spent + charge.amount),
        (c.id, "reserved", 3, c_state.reserved),
    }
    assert len(report.mismatches) == 4


async def _cli_setup(config: StoreConfig) -> uuid.UUID:
    await upgrade(config)
    async with Store(config) as store:
        a, _, _ = await _mix(store)
        return a.id


async def _cli_tamper(config: StoreConfig, key_id: uuid.UUID) -> int:
    async with Store(config) as store:
        state = await store.api_keys.get(key_id)
        await run_sql(
            store,
            lambda conn: conn.execute(
                sa.update(api_keys)
                .where(api_keys.c.id == key_id)
                .values(total_deposited=api_keys.c.total_deposited + 1)
            ),
            write=True,
        )
        return state.total_deposited


def test_cli_verify_exit_codes(
    db_config: StoreConfig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if db_config.schema_name:
        monkeypatch.setenv("DATABASE_SCHEMA", db_config.schema_name)
    key_id = asyncio.run(_cli_setup(db_config))
    args = ["verify", "--url", db_config.url.get_secret_value()]
    assert main(args) == EXIT_OK
    captured = capsys.readouterr()
    assert "3 API key(s) agree with the ledger" in captured.out
    deposited = asyncio.run(_cli_tamper(db_config, key_id))
    assert main(args) == EXIT_TAMPERED == 5
    captured = capsys.readouterr()
    assert (
        f"api key {key_id}: total_deposited is {deposited + 1}, the ledger says {deposited}"
        in captured.out
    )
    assert "1 mismatch(es) in 3 API key(s)" in captured.err
