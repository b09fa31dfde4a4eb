"""Usage logs at scale: load a realistic table, then time the reads a dashboard makes.

Run ``python -m benchmarks.usage_scale --help``; ``benchmarks/README.md`` explains it.

For each driver: a new SQLite file or Postgres schema, ``--rows`` rows (default 1,000,000)
written with ``store.usage.record_many`` in batches of 10,000, spread over 90 days in time
order (``benchmarks.usage_data``: ~20 models, ~1,000 API keys, a few keys and models taking
most of the traffic), then ``ANALYZE``, then the median of 5 timed calls (after one untimed
call) of each query. Every query should take under a second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import secrets
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final

import asyncpg  # type: ignore[import-untyped]
import sqlalchemy as sa

import llmstore
from llmstore import Store, StoreConfig, UsageRecord
from llmstore.migrations import upgrade

from .common import DRIVERS, Driver, masked, positive, postgres_dsn, postgres_url
from .databases import drop_schema, postgres_unreachable
from .usage_data import UsageRows

DEFAULT_ROWS: Final = 1_000_000
BATCH: Final = 10_000
SPAN: Final = dt.timedelta(days=90)
REPEATS: Final = 5
PAGE: Final = 100
DEEP_PAGE: Final = 1_000
TARGET_SECONDS: Final = 1.0
USAGE_TABLE: Final = "llmstore_usage_logs"


@contextlib.asynccontextmanager
async def fresh_store(
    driver: Driver, url: str
) -> AsyncIterator[tuple[Store, Callable[[], Awaitable[None]]]]:
    """An open store on a new, migrated database, and a function that ANALYZEs it."""
    if driver == "sqlite":
        with tempfile.TemporaryDirectory(prefix="llmstore-scale-") as tmp:
            path = Path(tmp) / "scale.db"
            config = StoreConfig.from_url(f"sqlite:///{path}")
            await upgrade(config, backup=False)

            async def analyze_sqlite() -> None:
                def run() -> None:
                    conn = sqlite3.connect(path)
                    try:
                        conn.execute("ANALYZE")
                    finally:
                        conn.close()

                await asyncio.to_thread(run)

            async with Store(config) as store:
                yield store, analyze_sqlite
        return
    schema = f"bench_scale_{secrets.token_hex(6)}"
    config = StoreConfig.from_url(url, schema_name=schema)
    dsn = postgres_dsn(url)
    try:
        await upgrade(config, backup=False)

        async def analyze_postgres() -> None:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(f'ANALYZE "{schema}".{USAGE_TABLE}')
            finally:
                await conn.close()

        async with Store(config) as store:
            yield store, analyze_postgres
    finally:
        await drop_schema(dsn, schema)


async def load(store: Store, source: UsageRows, rows: int, end: dt.datetime) -> Counter[uuid.UUID]:
    """Write ``rows`` rows over the 90 days before ``end``, oldest batch first; rows per key."""
    batches = -(-rows // BATCH)
    window = SPAN / batches
    start = end - SPAN
    per_key: Counter[uuid.UUID] = Counter()
    building = writing = 0.0
    for index in range(batches):
        count = min(BATCH, rows - index * BATCH)
        began = time.perf_counter()
        fields = sorted(source.rows(count, start + index * window, window), key=_created_at)
        records = [UsageRecord(**row) for row in fields]
        per_key.update(record.api_key_id for record in records if record.api_key_id)
        wrote = time.perf_counter()
        result = await store.usage.record_many(records)
        assert result.written == count
        writing += time.perf_counter() - wrote
        building += wrote - began
        done = min(rows, (index + 1) * BATCH)
        if sys.stdout.isatty():
            print(f"\r  loaded {done:,} of {rows:,} rows", end="", flush=True)
    if sys.stdout.isatty():
        print("\r\033[K", end="")
    print(
        f"  loaded {rows:,} rows in {writing:.1f} s of record_many: {rows / writing:,.0f} rows/s "
        f"(building the records took {building:.1f} s more, untimed)"
    )
    return per_key


def _created_at(row: dict[str, Any]) -> dt.datetime:
    created_at: dt.datetime = row["created_at"]
    return created_at


async def median_seconds(call: Callable[[], Awaitable[object]]) -> float:
    await call()  # untimed: warms the caches and the statement cache
    samples = []
    for _ in range(REPEATS):
        began = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - began)
    return statistics.median(samples)


async def deep_page(store: Store, key: uuid.UUID) -> tuple[int, int | None]:
    """(page number, its ``after``): page 1,000 of the key's rows, or its last page."""
    afters: list[int | None] = [None]  # afters[n - 1] fetches page n
    while len(afters) < DEEP_PAGE:
        rows = await store.usage.list(api_key_id=key, limit=PAGE, after=afters[-1])
        if len(rows) < PAGE:
            if not rows and len(afters) > 1:
                afters.pop()  # the previous page was the last
            break
        afters.append(rows[-1].id)
    return len(afters), afters[-1]


def report(driver: Driver, query: str, seconds: float | None, note: str = "") -> None:
    if seconds is None:
        print(f"{driver:<9} {query:<58} {'':>10}  {note}", flush=True)
        return
    verdict = "ok" if seconds < TARGET_SECONDS else f"SLOW (target < {TARGET_SECONDS:g} s)"
    print(f"{driver:<9} {query:<58} {seconds * 1000:>10.1f}  {verdict}{note}", flush=True)


async def measure(driver: Driver, url: str, rows: int) -> None:
    print(f"{driver}: loading {rows:,} rows over 90 days in batches of {BATCH:,}", flush=True)
    end = dt.datetime.now(dt.UTC)
    async with fresh_store(driver, url) as (store, analyze):
        source = UsageRows()
        per_key = await load(store, source, rows, end)
        began = time.perf_counter()
        await analyze()
        print(f"  ANALYZE took {time.perf_counter() - began:.1f} s")
        key, key_rows = per_key.most_common(1)[0]
        print(f"  busiest API key: {key_rows:,} rows; {len(per_key):,} keys in all")
        print(f"{'driver':<9} {'query':<58} {'median ms':>10}  verdict", flush=True)

        usage = store.usage
        report(
            driver,
            f"list(api_key_id=K, limit={PAGE}) page 1",
            await median_seconds(lambda: usage.list(api_key_id=key, limit=PAGE)),
        )
        page, after = await deep_page(store, key)
        note = (
            "" if page == DEEP_PAGE else f" (the key's last page: too few rows for {DEEP_PAGE:,})"
        )
        report(
            driver,
            f"list(api_key_id=K, limit={PAGE}, after=...) page {page:,}",
            await median_seconds(lambda: usage.list(api_key_id=key, limit=PAGE, after=after)),
            note,
        )
        report(
            driver,
            f"list(limit={PAGE}) page 1",
            await median_seconds(lambda: usage.list(limit=PAGE)),
        )
        day = (end - SPAN / 2).replace(hour=0, minute=0, second=0, microsecond=0)
        metrics: Callable[..., Awaitable[Sequence[object]]] | None = getattr(usage, "metrics", None)
        query = 'metrics(since=day, until=day + 1 day, group_by=("model",))'
        if metrics is None:
            report(driver, query, None, "metrics: not available")
        else:
            report(
                driver,
                query,
                await median_seconds(
                    lambda: metrics(
                        since=day, until=day + dt.timedelta(days=1), group_by=("model",)
                    )
                ),
            )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.usage_scale",
        description="Load a realistic usage table with record_many, then time list() pages "
        "and metrics() on it (median of 5; each should take under a second).",
    )
    parser.add_argument(
        "--rows", type=positive, default=DEFAULT_ROWS, help="rows to load (default: 1,000,000)"
    )
    parser.add_argument(
        "--driver", choices=[*DRIVERS, "all"], default="all", help="database(s) to run on"
    )
    return parser.parse_args(argv)


async def main_async(args: argparse.Namespace) -> int:
    drivers: list[Driver] = list(DRIVERS) if args.driver == "all" else [args.driver]
    url = postgres_url()
    print(
        f"llmstore {llmstore.__version__}, Python {sys.version.split()[0]}, "
        f"SQLite {sqlite3.sqlite_version}, SQLAlchemy {sa.__version__}, "
        f"asyncpg {asyncpg.__version__}"
    )
    for driver in drivers:
        if driver == "postgres" and await postgres_unreachable(url):
            if args.driver == "postgres":
                return 1
            continue
        if driver == "postgres":
            print(f"postgres: {masked(url)} (from LLMSTORE_BENCH_POSTGRES_URL or the default)")
        await measure(driver, url, args.rows)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
