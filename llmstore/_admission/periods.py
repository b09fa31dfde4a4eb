"""Where a budget's period and a rate limit's window begin and end, computed in Python.

Calendar periods start at midnight in the budget's IANA time zone (``zoneinfo``), so a
"month" is a calendar month whatever its length, and a day in a DST change is 23 or 25
hours long. A midnight that does not exist (a zone that skips 00:00) starts the day at
its first instant. Fixed periods (a ``timedelta``) are counted from the budget's anchor;
rate windows are fixed windows aligned to the Unix epoch.

All times are timezone-aware UTC; nothing here reads the clock.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from functools import lru_cache

from llmstore._core.errors import ValidationError
from llmstore._core.validate import check_text, describe
from llmstore._db.admission_schema import RatePer

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
WINDOW = {
    "second": dt.timedelta(seconds=1),
    "minute": dt.timedelta(minutes=1),
    "hour": dt.timedelta(hours=1),
    "day": dt.timedelta(days=1),
}


@lru_cache(maxsize=256)
def zone(name: str) -> zoneinfo.ZoneInfo:
    """The IANA zone ``name``; ValidationError if there is none."""
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise ValidationError(
            f"timezone must be an IANA time zone name, not {describe(name)}"
        ) from None


def check_timezone(value: object) -> str:
    name = check_text(value, "timezone", max_length=64)
    zone(name)
    return name


def _local_midnight(year: int, month: int, day: int, tz: zoneinfo.ZoneInfo) -> dt.datetime:
    # fold=0 of a skipped midnight is read with the offset before the gap: the instant the
    # day's clocks begin.
    return dt.datetime(year, month, day, tzinfo=tz).astimezone(dt.UTC)


def _calendar_start(kind: str, local: dt.datetime) -> tuple[int, int, int]:
    if kind == "day":
        return local.year, local.month, local.day
    if kind == "week":
        monday = local.date() - dt.timedelta(days=local.weekday())
        return monday.year, monday.month, monday.day
    if kind == "month":
        return local.year, local.month, 1
    return local.year, 1, 1


def _calendar_next(kind: str, year: int, month: int, day: int) -> tuple[int, int, int]:
    if kind in ("day", "week"):
        following = dt.date(year, month, day) + dt.timedelta(days=1 if kind == "day" else 7)
        return following.year, following.month, following.day
    if kind == "month":
        return (year + 1, 1, 1) if month == 12 else (year, month + 1, 1)
    return year + 1, 1, 1


def budget_period(
    kind: str | None,
    seconds: int | None,
    timezone: str,
    anchor: dt.datetime,
    at: dt.datetime,
) -> tuple[dt.datetime, dt.datetime | None]:
    """The period containing ``at``: its start, and when it ends (None: never)."""
    if kind is None:
        return anchor, None
    if kind == "fixed":
        assert seconds is not None
        length = dt.timedelta(seconds=seconds)
        start = anchor + ((at - anchor) // length) * length
        return start, start + length
    tz = zone(timezone)
    local = at.astimezone(tz)
    year, month, day = _calendar_start(kind, local)
    start = _local_midnight(year, month, day, tz)
    if start > at:  # a skipped midnight's day began at the gap, after this instant
        year, month, day = _calendar_start(kind, local - dt.timedelta(days=1))
        start = _local_midnight(year, month, day, tz)
    return start, _local_midnight(*_calendar_next(kind, year, month, day), tz)


def previous_period(
    kind: str | None, seconds: int | None, timezone: str, anchor: dt.datetime, start: dt.datetime
) -> dt.datetime | None:
    """The start of the period before the one starting at ``start`` (None: there is none)."""
    if kind is None or start <= anchor:
        return None
    return budget_period(kind, seconds, timezone, anchor, start - dt.timedelta(microseconds=1))[0]


def rate_window(per: RatePer | str, at: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The window of ``per`` containing ``at``: its start and its end."""
    length = WINDOW[per]
    start = EPOCH + ((at - EPOCH) // length) * length
    return start, start + length
