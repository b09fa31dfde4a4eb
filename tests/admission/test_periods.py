"""Where budget periods and rate windows begin and end: calendar periods at midnight in
the budget's zone (DST days of 23 and 25 hours, months of 28 to 31 days), fixed periods
from the budget's anchor, rate windows aligned to the epoch."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmstore import ValidationError
from llmstore._admission.periods import budget_period, check_timezone, previous_period, rate_window

UTC = dt.UTC
BERLIN = ZoneInfo("Europe/Berlin")
ANCHOR = dt.datetime(2020, 1, 1, tzinfo=UTC)


def at(
    year: int,
    month: int,
    day: int,
    hour: int = 0,
    minute: int = 0,
    second: int = 0,
    micro: int = 0,
    *,
    tz: dt.tzinfo = UTC,
) -> dt.datetime:
    """An instant, given in ``tz``, in UTC."""
    return dt.datetime(year, month, day, hour, minute, second, micro, tzinfo=tz).astimezone(UTC)


@pytest.mark.parametrize(
    ("kind", "zone", "instant", "start", "end"),
    [
        ("day", "UTC", at(2026, 3, 29, 12), at(2026, 3, 29), at(2026, 3, 30)),
        # The day clocks go forward in Berlin is 23 hours long, the day they go back 25.
        (
            "day",
            "Europe/Berlin",
            at(2026, 3, 29, 12),
            at(2026, 3, 29, tz=BERLIN),
            at(2026, 3, 30, tz=BERLIN),
        ),
        (
            "day",
            "Europe/Berlin",
            at(2026, 10, 25, 12),
            at(2026, 10, 25, tz=BERLIN),
            at(2026, 10, 26, tz=BERLIN),
        ),
        # ISO weeks begin on Monday.
        ("week", "UTC", at(2026, 2, 1, 23, 59), at(2026, 1, 26), at(2026, 2, 2)),
        (
            "week",
            "Europe/Berlin",
            at(2026, 3, 29, 21, 59),
            at(2026, 3, 23, tz=BERLIN),
            at(2026, 3, 30, tz=BERLIN),
        ),
        # A 28-day February, then a 31-day March.
        ("month", "UTC", at(2026, 2, 14), at(2026, 2, 1), at(2026, 3, 1)),
        ("month", "UTC", at(2026, 3, 31, 23, 59), at(2026, 3, 1), at(2026, 4, 1)),
        (
            "month",
            "Europe/Berlin",
            at(2026, 2, 28, 23, 30),
            at(2026, 3, 1, tz=BERLIN),
            at(2026, 4, 1, tz=BERLIN),
        ),
        ("year", "UTC", at(2026, 12, 31, 23, 59), at(2026, 1, 1), at(2027, 1, 1)),
        (
            "year",
            "Europe/Berlin",
            at(2026, 12, 31, 23, 30),
            at(2027, 1, 1, tz=BERLIN),
            at(2028, 1, 1, tz=BERLIN),
        ),
    ],
)
def test_calendar_periods(
    kind: str, zone: str, instant: dt.datetime, start: dt.datetime, end: dt.datetime
) -> None:
    assert budget_period(kind, None, zone, ANCHOR, instant) == (start, end)
    # The boundary itself belongs to the next period.
    assert budget_period(kind, None, zone, ANCHOR, end)[0] == end
    assert budget_period(kind, None, zone, ANCHOR, end - dt.timedelta(microseconds=1))[0] == start


def test_the_berlin_dst_days_are_23_and_25_hours() -> None:
    spring = budget_period("day", None, "Europe/Berlin", ANCHOR, at(2026, 3, 29, 12))
    autumn = budget_period("day", None, "Europe/Berlin", ANCHOR, at(2026, 10, 25, 12))
    assert spring[1] - spring[0] == dt.timedelta(hours=23)  # type: ignore[operator]
    assert autumn[1] - autumn[0] == dt.timedelta(hours=25)  # type: ignore[operator]


def test_a_skipped_midnight_starts_the_day_at_its_first_instant() -> None:
    # Chile moved its clocks from 00:00 to 01:00 on 2026-09-06: that day has no midnight.
    start, end = budget_period("day", None, "America/Santiago", ANCHOR, at(2026, 9, 6, 12))
    assert start == at(2026, 9, 6, 4)  # 00:00 at UTC-4 is 01:00 at UTC-3
    assert end == at(2026, 9, 7, tz=ZoneInfo("America/Santiago"))
    before = budget_period("day", None, "America/Santiago", ANCHOR, at(2026, 9, 6, 3, 59))
    assert before[1] == start


def test_fixed_periods_count_from_the_anchor() -> None:
    anchor = at(2026, 1, 31, 12, 34, 56)
    day = 86_400
    assert budget_period("fixed", 30 * day, "UTC", anchor, anchor) == (
        anchor,
        anchor + dt.timedelta(days=30),
    )
    later = anchor + dt.timedelta(days=65)
    assert budget_period("fixed", 30 * day, "UTC", anchor, later)[0] == anchor + dt.timedelta(
        days=60
    )


def test_a_lifetime_budget_has_one_period_that_never_ends() -> None:
    assert budget_period(None, None, "UTC", ANCHOR, at(2099, 1, 1)) == (ANCHOR, None)
    assert previous_period(None, None, "UTC", ANCHOR, ANCHOR) is None


def test_previous_periods_stop_at_the_anchor() -> None:
    anchor = at(2026, 1, 31, 12)
    assert previous_period("month", None, "UTC", anchor, at(2026, 3, 1)) == at(2026, 2, 1)
    assert previous_period("month", None, "UTC", anchor, at(2026, 2, 1)) == at(2026, 1, 1)
    assert previous_period("month", None, "UTC", anchor, at(2026, 1, 1)) is None


@pytest.mark.parametrize(
    ("per", "instant", "start"),
    [
        ("second", at(2026, 1, 31, 12, 0, 5, 999_999), at(2026, 1, 31, 12, 0, 5)),
        ("minute", at(2026, 1, 31, 12, 7, 59), at(2026, 1, 31, 12, 7)),
        ("hour", at(2026, 1, 31, 12, 59, 59), at(2026, 1, 31, 12)),
        ("day", at(2026, 1, 31, 23, 59, 59), at(2026, 1, 31)),
    ],
)
def test_rate_windows_are_aligned_to_the_epoch(
    per: str, instant: dt.datetime, start: dt.datetime
) -> None:
    window_start, window_end = rate_window(per, instant)
    assert window_start == start
    assert window_start <= instant < window_end


def test_an_unknown_timezone_is_refused() -> None:
    for name in ("Mars/Olympus", "../etc/passwd", "", "UTC\x00"):
        with pytest.raises(ValidationError):
            check_timezone(name)
    assert check_timezone("Europe/Berlin") == "Europe/Berlin"


instants = st.datetimes(
    min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2090, 1, 1), timezones=st.just(UTC)
)
zones = st.sampled_from(
    [
        "UTC",
        "Europe/Berlin",
        "America/New_York",
        "Australia/Lord_Howe",
        "Asia/Kathmandu",
        "America/Santiago",
        "Pacific/Apia",
    ]
)


@given(instant=instants, zone=zones, kind=st.sampled_from(["day", "week", "month", "year"]))
def test_every_instant_is_in_exactly_one_calendar_period(
    instant: dt.datetime, zone: str, kind: str
) -> None:
    start, end = budget_period(kind, None, zone, ANCHOR, instant)
    assert end is not None
    assert start <= instant < end
    # Periods tile time: the next one begins where this one ends.
    assert budget_period(kind, None, zone, ANCHOR, end)[0] == end
    # A period begins at a local midnight or, where that does not exist, right after it.
    local = start.astimezone(ZoneInfo(zone))
    assert local.time() < dt.time(2) and local.minute in (0, 30, 45)
