"""SQL functions that compile differently per database, written once for domain code.

``bucket_start(unit, column)``: the UTC start of the minute, hour or day holding a
``UTCDateTime`` value (``date_trunc`` on Postgres, a prefix of the stored text on SQLite).

``json_array_items(column)``: a JSON array of strings as a table of its items, column
``value`` (``json_array_elements_text`` on Postgres, ``json_each`` on SQLite), to join or
to look in.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from .schema import UTCDateTime

__all__ = ["BUCKETS", "BucketStart", "JsonArrayItems", "bucket_start", "json_array_items"]

BUCKETS = ("minute", "hour", "day")


class BucketStart(FunctionElement[dt.datetime]):
    """The UTC start of the minute, hour or day holding ``created_at``."""

    type = UTCDateTime()
    inherit_cache = True
    unit: ClassVar[str]


# One class per unit, so that the unit is part of SQLAlchemy's statement cache key.
class _Minute(BucketStart):
    inherit_cache = True
    unit = "minute"


class _Hour(BucketStart):
    inherit_cache = True
    unit = "hour"


class _Day(BucketStart):
    inherit_cache = True
    unit = "day"


_BUCKET_CLASSES: dict[str, type[BucketStart]] = {"minute": _Minute, "hour": _Hour, "day": _Day}
# SQLite holds created_at as naive UTC text 'YYYY-MM-DD HH:MM:SS.ffffff': a bucket's start
# is a prefix of it, completed to a timestamp that the column type reads back.
_SQLITE_PREFIX = {"minute": (16, ":00"), "hour": (13, ":00:00"), "day": (10, " 00:00:00")}


@compiles(BucketStart)
def _bucket_start_postgresql(element: BucketStart, compiler: SQLCompiler, **kw: Any) -> str:
    column = compiler.process(element.clauses, **kw)
    return f"date_trunc('{element.unit}', {column} AT TIME ZONE 'UTC')"


@compiles(BucketStart, "sqlite")
def _bucket_start_sqlite(element: BucketStart, compiler: SQLCompiler, **kw: Any) -> str:
    length, rest = _SQLITE_PREFIX[element.unit]
    column = compiler.process(element.clauses, **kw)
    return f"(substr({column}, 1, {length}) || '{rest}')"


def bucket_start(unit: str, column: sa.ColumnElement[dt.datetime]) -> BucketStart:
    """The start of the ``unit`` (one of ``BUCKETS``) that holds ``column``'s value."""
    return _BUCKET_CLASSES[unit](column)


class JsonArrayItems(FunctionElement[str]):
    """The items of a JSON array of strings, as the rows of a table-valued function."""

    type = sa.String()
    inherit_cache = True


@compiles(JsonArrayItems)
def _json_array_items_postgresql(element: JsonArrayItems, compiler: SQLCompiler, **kw: Any) -> str:
    return f"json_array_elements_text({compiler.process(element.clauses, **kw)})"


@compiles(JsonArrayItems, "sqlite")
def _json_array_items_sqlite(element: JsonArrayItems, compiler: SQLCompiler, **kw: Any) -> str:
    return f"json_each({compiler.process(element.clauses, **kw)})"


def json_array_items(column: sa.ColumnElement[Any], name: str) -> sa.TableValuedAlias:
    """``column``'s items as a table named ``name`` with one column, ``value`` (no rows for
    NULL). In a FROM list after the column's table, each row's own items."""
    return JsonArrayItems(column).table_valued("value", name=name)
