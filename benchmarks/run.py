"""Benchmark harness: llmstore next to the raw driver and the SQLAlchemy ORM, per operation.

Run ``python -m benchmarks.run --help``; ``benchmarks/README.md`` explains the output.

Each operation is measured three ways in one process, on the same database
(:mod:`benchmarks.databases`):

* ``llmstore``: the public ``Store`` API, on the tables that the migrations create
  (``llmstore_projects``, ``llmstore_tokens``, ``llmstore_api_keys``,
  ``llmstore_ledger_entries``, ``llmstore_reservations``, ``llmstore_usage_logs``, and
  the budget, rate-limit and admission tables);
* ``raw``: the bare driver (:mod:`benchmarks.raw_driver`: stdlib ``sqlite3`` behind a
  one-thread executor, or ``asyncpg``) sending the same statements as llmstore (a
  multi-statement unit in one transaction: one thread hop on SQLite, BEGIN ... COMMIT on
  Postgres), on ``raw_*`` tables generated from llmstore's schema
  (:mod:`benchmarks.raw_schema`);
* ``orm``: the SQLAlchemy ORM written the usual way (``AsyncSession`` per operation), on
  ``orm_*`` tables with the same columns (:mod:`benchmarks.orm_models`).

Operations run one at a time, awaited, so the figures are latency-bound throughput. The
operations are in ``benchmarks/ops_access.py``, ``ops_billing.py``, ``ops_admission.py``
and ``ops_usage.py``, registered in :data:`benchmarks.operations.OPERATIONS`;
:mod:`benchmarks.measure` times them and :mod:`benchmarks.report` prints the table. This
module is the command line.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from typing import Final

from .common import DRIVERS, POSTGRES_URL_VARIABLE, Driver, masked, positive, postgres_url
from .databases import context_for, postgres_unreachable
from .measure import bench, calls_per_round
from .operations import OPERATIONS
from .report import header_line, result_lines, versions_line

DEFAULT_OPS: Final = 2000
DEFAULT_ROUNDS: Final = 5


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="llmstore vs the raw driver vs the SQLAlchemy ORM, per operation "
        "(sequential ops/s, median of rounds).",
    )
    parser.add_argument(
        "--driver", choices=[*DRIVERS, "all"], default="all", help="database(s) to run on"
    )
    parser.add_argument(
        "--ops", type=positive, default=DEFAULT_OPS, help="operations per round and variant"
    )
    parser.add_argument(
        "--rounds", type=positive, default=DEFAULT_ROUNDS, help="timed rounds; medians are shown"
    )
    parser.add_argument(
        "--only", choices=list(OPERATIONS), metavar="OPNAME", help="run one operation only"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also print every round's ops/s"
    )
    return parser.parse_args(argv)


async def main_async(args: argparse.Namespace) -> int:
    drivers: list[Driver] = list(DRIVERS) if args.driver == "all" else [args.driver]
    names = [args.only] if args.only else list(OPERATIONS)
    url = postgres_url()
    print(versions_line())
    if "postgres" in drivers:
        print(f"postgres: {masked(url)} (from {POSTGRES_URL_VARIABLE} or the default)")
    rounds = "1 round" if args.rounds == 1 else f"{args.rounds} rounds (medians shown)"
    print(f"{args.ops:,} sequential ops per round and variant, {rounds}")
    for name in names:
        calls, _ = calls_per_round(OPERATIONS[name], args.ops)
        if calls != args.ops:
            print(f"{name}: {calls} calls per round and variant (each a bulk write)")
    print()
    header_printed = False
    for driver in drivers:
        if driver == "postgres" and await postgres_unreachable(url):
            if args.driver == "postgres":
                return 1
            continue
        async with context_for(driver, url) as ctx:
            for name in names:
                operation = OPERATIONS[name]
                result = await bench(ctx, name, operation, args.ops, args.rounds)
                if not header_printed:
                    print(header_line())
                    header_printed = True
                rows_per_call: int | None = getattr(operation, "rows_per_call", None)
                for line in result_lines(result, rows_per_call=rows_per_call, verbose=args.verbose):
                    print(line, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
