"""Reporting: the table of medians and ratios (``llmstore/raw``, ``llmstore/orm``), one line
per (driver, operation), with a rows/s line for bulk operations and, with ``-v``, every
round's figures."""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Sequence
from typing import Final

import asyncpg  # type: ignore[import-untyped]
import sqlalchemy as sa

import llmstore

from .common import VARIANTS
from .measure import Result


def versions_line() -> str:
    return (
        f"llmstore {llmstore.__version__}, Python {sys.version.split()[0]}, "
        f"SQLite {sqlite3.sqlite_version}, SQLAlchemy {sa.__version__}, "
        f"asyncpg {asyncpg.__version__}"
    )


COLUMNS: Final = (
    ("driver", 9, "<"),
    ("operation", 23, "<"),
    ("llmstore ops/s", 15, ">"),
    ("raw ops/s", 11, ">"),
    ("orm ops/s", 11, ">"),
    ("llmstore/raw", 13, ">"),
    ("llmstore/orm", 13, ">"),
)


def rate(value: float) -> str:
    # Bulk operations run a few calls per second: whole numbers would hide their ratios.
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


def table_line(cells: Sequence[str]) -> str:
    return " ".join(
        f"{cell:{align}{width}}" for cell, (_, width, align) in zip(cells, COLUMNS, strict=True)
    ).rstrip()


def header_line() -> str:
    return table_line([title for title, _, _ in COLUMNS])


def result_line(result: Result) -> str:
    ours, raw, orm = (result.median(variant) for variant in VARIANTS)
    return table_line(
        [
            result.driver,
            result.operation,
            rate(ours),
            rate(raw),
            rate(orm),
            f"{ours / raw:.2f}",
            f"{ours / orm:.2f}",
        ]
    )


def rows_line(result: Result, rows_per_call: int) -> str:
    parts = [f"{variant} {result.median(variant) * rows_per_call:,.0f}" for variant in VARIANTS]
    return f"    rows/s ({rows_per_call:,} per call): " + " | ".join(parts)


def rounds_line(result: Result) -> str:
    parts = [
        f"{variant} " + " ".join(rate(value) for value in result.samples[variant])
        for variant in VARIANTS
    ]
    return "    rounds: " + " | ".join(parts)


def result_lines(result: Result, *, rows_per_call: int | None, verbose: bool) -> list[str]:
    """The report of one (driver, operation): its line, rows/s (bulk), rounds (verbose)."""
    lines = [result_line(result)]
    if rows_per_call is not None:
        lines.append(rows_line(result, rows_per_call))
    if verbose:
        lines.append(rounds_line(result))
    return lines
