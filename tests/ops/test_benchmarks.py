"""The benchmark harness (``benchmarks/``): ``python -m benchmarks.run`` end to end with tiny
numbers on each driver, its report holding a ratio line for every operation; the raw
tables, generated from llmstore's schema, being llmstore's tables under other names; the
harness's ids being time-ordered UUIDs as llmstore's are; and the raw admission's copies
of llmstore's columns and arithmetic being llmstore's."""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from benchmarks import admission_sql
from benchmarks.common import DRIVERS, Driver, new_id
from benchmarks.databases import postgres_context
from benchmarks.operations import OPERATIONS
from benchmarks.ops_admission import (
    ADMIT_COST,
    ADMIT_TOKENS,
    RATE_PER,
    SETTLED_COST,
    SETTLED_TOKENS,
    RawAdmissions,
    raw_setup,
)
from benchmarks.ops_admission_cte import RawAdmissionsInOneStatement
from benchmarks.raw_schema import RAW_TABLES, USAGE_COLUMN_NAMES, llmstore_table, raw_ddl
from llmstore._admission.periods import rate_window
from llmstore._admission.records import ADMISSION_COLUMNS
from llmstore._billing.records import KEY_COLUMNS, params_digest
from tests.helpers import require_postgres, run_module

ROOT = Path(__file__).resolve().parents[2]
RATE = r"\d[\d,]*(?:\.\d\d)?"
RATIO = r"\d+\.\d\d"


def ratio_line(report: str, driver: str, operation: str) -> tuple[float, float]:
    """The ``llmstore/raw`` and ``llmstore/orm`` ratios of the operation's line."""
    pattern = rf"^{driver} +{re.escape(operation)} +(?:{RATE} +){{3}}({RATIO}) +({RATIO})$"
    found = re.findall(pattern, report, flags=re.MULTILINE)
    assert len(found) == 1, f"no single ratio line for {driver} {operation}:\n{report}"
    to_raw, to_orm = found[0]
    return float(to_raw), float(to_orm)


@pytest.mark.slow
@pytest.mark.parametrize("driver", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_the_harness_reports_a_ratio_line_per_operation(driver: str) -> None:
    env = {"LLMSTORE_BENCH_POSTGRES_URL": require_postgres()} if driver == "postgres" else {}
    args = ("--driver", driver, "--ops", "1", "--rounds", "2", "-v")
    done = run_module("benchmarks.run", *args, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    report = done.stdout
    assert "1 sequential ops per round and variant, 2 rounds (medians shown)" in report
    header = (
        r"^driver +operation +llmstore ops/s +raw ops/s +orm ops/s +llmstore/raw +llmstore/orm$"
    )
    assert len(re.findall(header, report, flags=re.MULTILINE)) == 1
    for operation in OPERATIONS:
        to_raw, to_orm = ratio_line(report, driver, operation)
        assert to_raw > 0 and to_orm > 0
    # Every operation's rounds (-v), two figures per variant; the bulk write's rows/s.
    rounds = re.findall(r"^    rounds: (.*)$", report, flags=re.MULTILINE)
    assert len(rounds) == len(OPERATIONS)
    for line in rounds:
        assert [len(part.split()) for part in line.split(" | ")] == [3, 3, 3]
    assert re.search(r"^    rows/s \(10,000 per call\): llmstore [\d,]+ \|", report, re.MULTILINE)


@pytest.mark.slow
@pytest.mark.parametrize("driver", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_the_proxy_harness_reports_the_proxy_against_itself(driver: str) -> None:
    env = {"LLMSTORE_BENCH_POSTGRES_URL": require_postgres()} if driver == "postgres" else {}
    args = ("--driver", driver, "--requests", "20", "--concurrency", "4", "--rounds", "1")
    done = run_module("benchmarks.proxy", *args, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    line = rf"^{driver} +({RATE}) +({RATE}) +({RATIO}) +(-?{RATIO})$"
    found = re.findall(line, done.stdout, flags=re.MULTILINE)
    assert len(found) == 1, done.stdout
    with_rate, without_rate, ratio, _ = found[0]
    assert float(with_rate.replace(",", "")) > 0 and float(without_rate.replace(",", "")) > 0
    assert float(ratio) > 0


@pytest.mark.parametrize("driver", DRIVERS)
def test_the_raw_ddl_names_no_table_of_llmstore(driver: Driver) -> None:
    ddl = raw_ddl(driver)
    assert not [statement for statement in ddl if "llmstore_" in statement]
    created = [s.split()[2] for s in ddl if s.startswith("CREATE TABLE")]
    assert created == [f"raw_{name}" for name in RAW_TABLES]
    assert "REFERENCES raw_projects (id)" in ddl[1]


def test_the_raw_tables_are_llmstores_under_other_names() -> None:
    conn = sqlite3.connect(":memory:")
    try:
        for statement in raw_ddl("sqlite"):
            conn.execute(statement)
        for name in RAW_TABLES:
            info = conn.execute(f"PRAGMA table_info(raw_{name})").fetchall()
            columns = [(row[1], bool(row[3])) for row in info]  # name, NOT NULL
            table = llmstore_table(name)
            assert columns == [(column.name, not column.nullable) for column in table.columns]
            indexes = conn.execute(f"PRAGMA index_list(raw_{name})").fetchall()
            named = {row[1] for row in indexes if not row[1].startswith("sqlite_autoindex")}
            assert named == {
                str(index.name).replace("llmstore_", "raw_") for index in table.indexes
            }
        usage = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'raw_usage_logs'")
        assert "PRIMARY KEY AUTOINCREMENT" in usage.fetchone()[0]  # as llmstore's own
    finally:
        conn.close()
    assert USAGE_COLUMN_NAMES[0] == "created_at" and "id" not in USAGE_COLUMN_NAMES


def test_the_benchmarks_ids_are_time_ordered_like_llmstores() -> None:
    ids = [new_id() for _ in range(10_000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert {(value.version, value.variant) for value in ids} == {(7, uuid.RFC_4122)}
    millis = ids[-1].int >> 80
    assert abs(millis - time.time_ns() // 1_000_000) < 60_000


def names(columns: str) -> list[str]:
    return [name.strip() for name in columns.split(",")]


def test_the_raw_admission_reads_llmstores_columns() -> None:
    assert names(admission_sql.KEY_COLUMNS) == [column.name for column in KEY_COLUMNS]
    assert names(admission_sql.RATE_LIMIT_COLUMNS) == [
        column.name for column in llmstore_table("rate_limits").columns
    ]
    assert list(admission_sql.BUDGET_NAMES) == [
        column.name for column in llmstore_table("budgets").columns
    ]
    assert names(admission_sql.ADMISSION_COLUMNS) == [column.name for column in ADMISSION_COLUMNS]
    assert list(admission_sql.ADMISSION_NAMES) == [
        column.name for column in llmstore_table("admissions").columns
    ]
    for table in ("admissions", "admission_budgets", "admission_windows", "budget_crossings"):
        assert f"raw_{table}" in " ".join(raw_ddl("sqlite"))


@pytest.mark.parametrize("per", ["second", "minute", "hour", "day"])
def test_the_raw_admission_computes_llmstores_windows(per: str) -> None:
    for at in (
        dt.datetime(1970, 1, 1, tzinfo=dt.UTC),
        dt.datetime(2026, 3, 29, 1, 59, 59, 999_999, tzinfo=dt.UTC),
        dt.datetime(2026, 12, 31, 23, 0, 30, 5, tzinfo=dt.UTC),
    ):
        assert admission_sql.window_start(per, at) == rate_window(per, at)[0]


def test_the_raw_admission_stores_llmstores_settle_digest() -> None:
    assert admission_sql.settle_digest(3, 80) == params_digest("settle", 3, 80, None)
    assert admission_sql.settle_digest(0, None) == params_digest("settle", 0, None, None)


async def test_the_raw_one_statement_admission_decides_as_llmstores_does() -> None:
    """On Postgres the raw way sends one statement per admit and settle, as llmstore does,
    and falls back to its transaction only for the first request of a window; both ways
    leave the same counts, holds and spend."""
    url = require_postgres()
    async with postgres_context(url) as ctx:
        secret = await raw_setup(ctx.raw)
        flow = RawAdmissions(ctx.raw)
        fast = RawAdmissionsInOneStatement(ctx.raw, flow, RATE_PER)
        transactions = 0
        original = ctx.raw.transaction

        async def counted(steps: Any) -> Any:
            nonlocal transactions
            transactions += 1
            return await original(steps)

        ctx.raw.transaction = counted  # type: ignore[method-assign]
        for _ in range(3):
            admission_id = await fast.admit(secret, ADMIT_COST, ADMIT_TOKENS)
            await fast.settle(admission_id, SETTLED_COST, SETTLED_TOKENS)
        # The first admission made the window's row (and a minute that turns in between
        # makes another): the other admissions and every settlement took one statement.
        assert transactions <= 2
        windows = await ctx.raw.fetchrow("SELECT sum(requests), sum(tokens) FROM raw_rate_windows")
        periods = await ctx.raw.fetchrow(
            "SELECT sum(spent), sum(reserved), count(*) FROM raw_budget_periods"
        )
        key = await ctx.raw.fetchrow("SELECT sum(reserved), sum(total_spent) FROM raw_api_keys")
    assert windows is not None and tuple(windows) == (3, 3 * SETTLED_TOKENS)
    assert periods is not None and tuple(periods) == (2 * 3 * SETTLED_COST, 0, 2)
    assert key is not None and tuple(key) == (0, 3 * SETTLED_COST)
