"""Usage metrics: counts, sums, averages and percentiles of ``usage_logs``, in one statement.

The statement is the same SQLAlchemy Core on SQLite and Postgres; only the bucket's start
(``_db.functions.bucket_start``) compiles differently. Everything else that could differ
between drivers is kept out of SQL: averages are ``SUM`` and ``COUNT`` divided in Python;
percentiles are nearest-rank with integer rank arithmetic, picked out with window
functions; rows are sorted in Python, since Postgres would sort text by its collation and
SQLite by bytes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from sqlalchemy.engine import Connection

from llmstore._core.errors import ValidationError
from llmstore._core.validate import check_aware, check_choice, check_id, check_name, describe
from llmstore._db.functions import BUCKETS, bucket_start, json_array_items
from llmstore._db.schema import usage_logs
from llmstore._prices import TOKEN_FIELDS

U = usage_logs
#: ``tag`` is each of a row's tags: a row with several is counted in each one's group,
#: a row with none in the group of None.
GROUP_COLUMNS = (
    "model",
    "provider",
    "project_id",
    "api_key_id",
    "origin",
    "alias",
    "profile",
    "end_user",
    "service_tier",
    "tag",
)
_ID_FILTERS = ("api_key_id", "project_id", "token_id")
_TEXT_FILTERS = ("model", "provider", "origin", "alias", "profile", "end_user", "service_tier")
#: ``tag``: the rows that carry this tag (among others).
_TAG_FILTER = "tag"
_BOOL_FILTERS = ("success", "is_streaming")
FILTER_COLUMNS = (*_ID_FILTERS, *_TEXT_FILTERS, _TAG_FILTER, *_BOOL_FILTERS)
#: The integer columns summed exactly, as they are named in ``UsageMetrics``.
SUMMED = (*TOKEN_FIELDS, "total_tokens", "cost")
PERCENTILES = (50, 95)
TPS_DECIMALS = 3
_NO_BUCKET = dt.datetime.min.replace(tzinfo=dt.UTC)


class UsageMetrics(BaseModel):
    """One row of :meth:`Usage.metrics`: a bucket and group, and its numbers.

    Sums are exact integers. ``avg_*`` and the percentiles consider only rows where the
    column is not NULL, and are None when there are none. ``pXX_response_time_ms`` is the
    nearest-rank percentile: the value at 1-based rank ``ceil(XX * n / 100)`` of the
    group's ``n`` non-NULL response times in ascending order.
    """

    model_config = ConfigDict(frozen=True)

    bucket: dt.datetime | None
    group: dict[str, Any]
    requests: int
    successes: int
    errors: int
    success_rate: float
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    audio_input_tokens: int
    audio_output_tokens: int
    total_tokens: int
    cost: int
    avg_response_time_ms: float | None
    p50_response_time_ms: int | None
    p95_response_time_ms: int | None
    avg_time_to_first_token_ms: float | None
    avg_tokens_per_second: float | None
    streaming_share: float


@dataclass(frozen=True)
class MetricsQuery:
    """Checked arguments of ``metrics()``: the window, the grouping and the filters."""

    since: dt.datetime | None
    until: dt.datetime | None
    group_by: tuple[str, ...]
    bucket: str | None
    filters: tuple[tuple[str, Any], ...]


def check_metrics_query(
    *,
    since: object,
    until: object,
    group_by: object,
    bucket: object,
    filters: Mapping[str, object],
) -> MetricsQuery:
    """The arguments of ``metrics()``, or ValidationError naming the first bad one."""
    for name in filters:
        if not isinstance(name, str) or str.__str__(name) not in FILTER_COLUMNS:
            raise ValidationError(
                f"unknown filter {describe(name, 60)}: metrics() filters on "
                f"{', '.join(FILTER_COLUMNS)}"
            )
    return MetricsQuery(
        since=None if since is None else check_aware(since, "since"),
        until=None if until is None else check_aware(until, "until"),
        group_by=_check_group_by(group_by),
        bucket=_check_bucket(bucket),
        # None leaves a column unfiltered, as in list().
        filters=tuple(
            (str.__str__(name), _check_filter(str.__str__(name), value))
            for name, value in filters.items()
            if value is not None
        ),
    )


def _check_group_by(value: object) -> tuple[str, ...]:
    names = (value,) if isinstance(value, str) else value
    if not isinstance(names, Sequence):
        raise ValidationError(
            f"group_by must be a column name or a sequence of them, not {type(value).__name__}"
        )
    checked: list[str] = []
    for name in names:
        if not isinstance(name, str) or str.__str__(name) not in GROUP_COLUMNS:
            raise ValidationError(
                f"cannot group by {describe(name, 60)}: group_by takes {', '.join(GROUP_COLUMNS)}"
            )
        column = str.__str__(name)
        if column in checked:
            raise ValidationError(f"group_by names {column!r} twice")
        checked.append(column)
    return tuple(checked)


def _check_bucket(value: object) -> str | None:
    return None if value is None else check_choice(value, "bucket", BUCKETS)


def _check_filter(name: str, value: object) -> object:
    if name in _ID_FILTERS:
        return check_id(value, name)
    if name in _BOOL_FILTERS:
        if not isinstance(value, bool):
            raise ValidationError(f"{name} must be True, False or None")
        return value
    if name == _TAG_FILTER:
        text = check_name(value, name)
        if not text.strip():
            raise ValidationError("tag must not be blank")
        return text
    return check_name(value, name)


def _ones(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[int]:
    return sa.func.sum(sa.case((condition, 1), else_=0))


def metrics_statement(query: MetricsQuery) -> sa.Select[Any]:
    """Per-row ranks of response times in an inner select, aggregated by the outer one."""
    keys: list[sa.ColumnElement[Any]] = []
    if query.bucket is not None:
        keys.append(bucket_start(query.bucket, U.c.created_at).label("bucket"))
    tags = json_array_items(U.c.tags, "row_tags")
    keys.extend(
        tags.c.value.label("tag") if name == "tag" else U.c[name] for name in query.group_by
    )
    partition = [key.element if isinstance(key, sa.Label) else key for key in keys] or None
    rt = U.c.response_time_ms
    # One window for both: SQLite sorts once per distinct window, and ROW_NUMBER ignores
    # the frame. NULLs last on both drivers, so the non-NULL times hold ranks 1..n.
    window: dict[str, Any] = {
        "partition_by": partition,
        "order_by": rt.asc().nulls_last(),
        "rows": (None, None),
    }
    rows = sa.select(
        *keys,
        U.c.success,
        U.c.is_streaming,
        *(U.c[name] for name in SUMMED),
        rt,
        U.c.time_to_first_token_ms,
        U.c.tokens_per_second,
        sa.func.row_number().over(**window).label("rt_rank"),
        sa.func.count(rt).over(**window).label("rt_count"),
    )
    if "tag" in query.group_by:
        rows = rows.select_from(U.outerjoin(tags, sa.true()))
    if query.since is not None:
        rows = rows.where(U.c.created_at >= query.since)
    if query.until is not None:
        rows = rows.where(U.c.created_at < query.until)
    for name, value in query.filters:
        if name == _TAG_FILTER:
            carried = json_array_items(U.c.tags, "wanted_tags")
            rows = rows.where(sa.exists().where(carried.c.value == value))
        else:
            rows = rows.where(U.c[name] == value)
    r = rows.subquery("r")
    group = [r.c[key.name] for key in keys]
    percentiles = [
        sa.func.max(
            sa.case((r.c.rt_rank == (p * r.c.rt_count + 99) // 100, r.c.response_time_ms))
        ).label(f"p{p}")
        for p in PERCENTILES
    ]
    statement = sa.select(
        *group,
        sa.func.count().label("requests"),
        _ones(r.c.success).label("successes"),
        _ones(r.c.is_streaming).label("streaming"),
        *(sa.func.sum(r.c[name]).label(name) for name in SUMMED),
        sa.func.sum(r.c.response_time_ms).label("rt_sum"),
        sa.func.count(r.c.response_time_ms).label("rt_n"),
        *percentiles,
        sa.func.sum(r.c.time_to_first_token_ms).label("ttft_sum"),
        sa.func.count(r.c.time_to_first_token_ms).label("ttft_n"),
        sa.func.sum(r.c.tokens_per_second).label("tps_sum"),
        sa.func.count(r.c.tokens_per_second).label("tps_n"),
    )
    # Without GROUP BY, an aggregate over no rows is still one row (of zero and NULLs).
    return statement.group_by(*group) if group else statement.having(sa.func.count() > 0)


def _int_mean(total: Any, count: int) -> float | None:
    # Postgres sums bigints as numeric (Decimal): int() keeps them exact before dividing.
    return None if count == 0 else int(total) / count


def _float_mean(total: float | None, count: int) -> float | None:
    # Float sums depend on the order rows are added in, which differs by driver.
    return None if total is None or count == 0 else round(total / count, TPS_DECIMALS)


def _order(row: UsageMetrics) -> tuple[Any, ...]:
    # NULLs first; a UUID orders as Postgres's uuid and SQLite's hex text do.
    values = [(False, "") if value is None else (True, value) for value in row.group.values()]
    return (row.bucket or _NO_BUCKET, *values)


def read_metrics(conn: Connection, query: MetricsQuery) -> list[UsageMetrics]:
    """The metrics rows, ordered by bucket then group values, NULLs first."""
    out = []
    for row in conn.execute(metrics_statement(query)).mappings():
        requests = int(row["requests"])
        successes = int(row["successes"])
        out.append(
            UsageMetrics(
                bucket=row["bucket"] if query.bucket is not None else None,
                group={name: row[name] for name in query.group_by},
                requests=requests,
                successes=successes,
                errors=requests - successes,
                success_rate=successes / requests,
                **{name: int(row[name]) for name in SUMMED},
                avg_response_time_ms=_int_mean(row["rt_sum"], row["rt_n"]),
                p50_response_time_ms=_int_or_none(row["p50"]),
                p95_response_time_ms=_int_or_none(row["p95"]),
                avg_time_to_first_token_ms=_int_mean(row["ttft_sum"], row["ttft_n"]),
                avg_tokens_per_second=_float_mean(row["tps_sum"], row["tps_n"]),
                streaming_share=int(row["streaming"]) / requests,
            )
        )
    out.sort(key=_order)
    return out


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)
