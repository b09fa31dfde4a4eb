"""Argument checks shared by the repositories: each raises ``ValidationError``.

The rules hold on both drivers alike: whatever one database would store and the other
refuse is refused here, before anything is written.

* Text. Labels (names, actions, actors, descriptions, idempotency keys) go through
  :func:`check_text`: not blank, at most the column's length, no control characters
  (C0 U+0000-U+001F, DEL U+007F, C1 U+0080-U+009F) and no lone surrogates. Recorded values
  (usage rows' fields, their filters) go through :func:`check_name`: any text but NUL
  (Postgres cannot store it) and lone surrogates (not Unicode, so not UTF-8 either).
* Integers that reach the database fit its BIGINT: at most 2**63 - 1.
* JSON: objects with string keys, at most :data:`JSON_MAX_DEPTH` levels and
  :data:`JSON_MAX_BYTES` bytes, finite numbers, text without NUL or lone surrogates.
* A value of the right type's subclass (a ``StrEnum`` member, say) is taken as its plain
  value, so none of its own methods runs later.
* Messages name a value's type and at most a short excerpt of it, never its ``repr()``:
  that may be huge, or raise (an int of more than 4,300 digits cannot even be printed).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import uuid
from collections.abc import Mapping
from typing import Any

from .errors import ValidationError

MAX_PAGE = 1000
MAX_INT64 = 2**63 - 1
JSON_MAX_BYTES = 16_384
#: Objects and arrays nest at most this deep (the outer object is level 1). A receipt
#: embeds a row's metadata two levels down, within its canonical JSON's limit of 64.
JSON_MAX_DEPTH = 32
_EXCERPT = 40
_HTTP_URL = re.compile(r"https?://[^\s/?#]+[^\s]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_DATETIME_FIELDS = ("year", "month", "day", "hour", "minute", "second", "microsecond")


# --- describing a caller's value -------------------------------------------------------------


def describe(value: object, limit: int = _EXCERPT) -> str:
    """A caller's value as an error message may show it: its type, and for text and numbers
    a short excerpt (``str 'abc...' (100000 characters)``); nothing of other objects."""
    kind = type(value).__name__
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        number = int.__int__(value)
        if abs(number) < 10**20:
            return f"{kind} {int.__repr__(number)}"
        return f"{kind} of {number.bit_length()} bits"
    if isinstance(value, float):
        return f"{kind} {float.__repr__(float.__float__(value))}"
    if isinstance(value, str):
        text = str.__str__(value)
        if len(text) <= limit:
            return f"{kind} {str.__repr__(text)}"
        return f"{kind} {str.__repr__(text[:limit])}... ({len(text)} characters)"
    return kind


def plain_text(value: object, what: str) -> str:
    """``value`` as a plain ``str``, or ValidationError for anything that is not text."""
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be a string, not {type(value).__name__}")
    return str.__str__(value)


def plain_int(value: object, what: str) -> int:
    """``value`` as a plain ``int``; bools, floats and numeric strings are refused."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{what} must be an integer, not {describe(value)}")
    return int.__int__(value)


# --- text ------------------------------------------------------------------------------------


def check_storable(value: str, what: str) -> str:
    """Refuse what one driver cannot store: NUL (Postgres) and lone surrogates (not UTF-8)."""
    if "\x00" in value:
        raise ValidationError(f"{what} must not contain NUL characters (Postgres refuses them)")
    if not value.isascii() and _SURROGATE.search(value) is not None:
        raise ValidationError(f"{what} is not valid text (lone surrogates)")
    return value


def check_text(value: object, what: str, *, max_length: int) -> str:
    """A label: 1 to ``max_length`` characters, not blank, with no control characters."""
    text = plain_text(value, what)
    if len(text) > max_length:
        raise ValidationError(f"{what} is {len(text)} characters long; the limit is {max_length}")
    if not text.strip():
        raise ValidationError(f"{what} must not be empty")
    if _CONTROL.search(text) is not None:
        raise ValidationError(
            f"{what} must not contain control characters (U+0000-U+001F, U+007F-U+009F)"
        )
    return check_storable(text, what)


def check_name(value: object, what: str, *, max_length: int = 200) -> str:
    """A recorded value: 1 to ``max_length`` characters of any text but NUL."""
    text = str.__str__(value) if isinstance(value, str) else None
    if text is None or not 1 <= len(text) <= max_length:
        raise ValidationError(f"{what} must be a string of 1 to {max_length} characters")
    return check_storable(text, what)


def check_secret(value: object, what: str, *, max_length: int = 4096) -> str:
    """Like :func:`check_text`, but never quotes the value."""
    text = plain_text(value, what)
    if len(text) > max_length or not text.strip() or text != text.strip():
        raise ValidationError(
            f"{what} must be 1 to {max_length} characters with no surrounding whitespace"
        )
    return check_storable(text, what)


def check_actor(value: object) -> str | None:
    """``actor=`` of an audited mutation: None (not audited) or who made the change."""
    return None if value is None else check_text(value, "actor", max_length=200)


def check_choice(value: object, what: str, choices: tuple[str, ...]) -> str:
    """One of ``choices``; compared as plain text, so no caller's ``__eq__`` runs."""
    if isinstance(value, str) and str.__str__(value) in choices:
        return str.__str__(value)
    raise ValidationError(f"{what} must be one of {', '.join(choices)}, not {describe(value)}")


def check_http_url(value: object, what: str) -> str:
    url = check_text(value, what, max_length=2000)
    if _HTTP_URL.fullmatch(url) is None:
        raise ValidationError(f"{what} must be an http:// or https:// URL, not {describe(url)}")
    return url


# --- numbers, ids, times ---------------------------------------------------------------------


def check_id(value: object, what: str = "id") -> uuid.UUID:
    if type(value) is uuid.UUID:
        return value
    if isinstance(value, uuid.UUID):
        # A subclass (asyncpg's, say) as a plain UUID, so its methods never run again. Not
        # through uuid.UUID's own slot: asyncpg's UUID, in C, does not have its layout.
        try:
            number = value.int
        except Exception as exc:
            raise ValidationError(
                f"{what}: reading the UUID failed ({type(exc).__name__})"
            ) from exc
        if type(number) is int and 0 <= number < 2**128:
            return uuid.UUID(int=number)
    text = str.__str__(value) if isinstance(value, str) else ""
    if 32 <= len(text) <= 45:  # "urn:uuid:" and 36 characters at most
        try:
            return uuid.UUID(text)
        except ValueError:
            pass
    raise ValidationError(f"{what} must be a UUID, not {describe(value, 60)}")


def check_optional_id(value: object, what: str) -> uuid.UUID | None:
    """``value`` checked as an id, or None when it is None (no filter, no reference)."""
    return None if value is None else check_id(value, what)


def check_int(value: object, what: str, *, minimum: int, maximum: int) -> int:
    """An integer from ``minimum`` to ``maximum``: bools, floats and strings are refused."""
    number = plain_int(value, what)
    if not minimum <= number <= maximum:
        top = "2**63 - 1" if maximum == MAX_INT64 else str(maximum)
        raise ValidationError(
            f"{what} must be an integer from {minimum} to {top}, not {describe(number)}"
        )
    return number


def check_positive_int(value: object, what: str) -> int:
    """An integer from 1 to 2**63 - 1 (a BIGINT id, amount or quota)."""
    return check_int(value, what, minimum=1, maximum=MAX_INT64)


def check_limit(value: object, *, maximum: int = MAX_PAGE) -> int:
    return check_int(value, "limit", minimum=1, maximum=maximum)


def check_seconds(value: object, what: str, *, zero: bool) -> float:
    """A finite number of seconds, above 0 (or 0 too with ``zero``), as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(f"{what} must be a number of seconds, not {describe(value)}")
    try:
        seconds = float(int.__int__(value) if isinstance(value, int) else float.__float__(value))
    except OverflowError:  # an int beyond any float
        seconds = math.inf
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not zero):
        bound = "0 or more" if zero else "more than 0"
        raise ValidationError(f"{what} must be a finite number of seconds, {bound}")
    return seconds


def check_optional_bool(value: object, what: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ValidationError(f"{what} must be True, False or None, not {type(value).__name__}")
    return value


def check_aware(value: object, what: str) -> dt.datetime:
    """A timezone-aware datetime, as a plain ``datetime`` in UTC."""
    if not isinstance(value, dt.datetime):
        raise ValidationError(f"{what} must be a datetime, not {type(value).__name__}")
    try:
        # The tzinfo is the caller's code: its utcoffset() may raise anything.
        offset = value.utcoffset()
        utc = None if offset is None else value.astimezone(dt.UTC)
    except OverflowError:
        raise ValidationError(f"{what} is out of range in UTC") from None
    except Exception as exc:
        raise ValidationError(f"{what} has a time zone that failed ({type(exc).__name__})") from exc
    if utc is None:
        raise ValidationError(f"{what} must be timezone-aware (naive datetimes are refused)")
    if type(utc) is not dt.datetime:
        # A subclass (a pandas Timestamp, say) as the plain datetime the drivers bind,
        # read through datetime's own descriptors.
        year, month, day, hour, minute, second, micro = (
            getattr(dt.datetime, name).__get__(utc) for name in _DATETIME_FIELDS
        )
        utc = dt.datetime(year, month, day, hour, minute, second, micro, tzinfo=dt.UTC)
    return utc


def check_timedelta(value: object, what: str) -> dt.timedelta:
    """A ``timedelta`` as a plain one (a subclass's own comparisons never run)."""
    if not isinstance(value, dt.timedelta):
        raise ValidationError(f"{what} must be a datetime.timedelta, not {type(value).__name__}")
    if type(value) is dt.timedelta:
        return value
    return dt.timedelta(
        days=dt.timedelta.days.__get__(value),
        seconds=dt.timedelta.seconds.__get__(value),
        microseconds=dt.timedelta.microseconds.__get__(value),
    )


# --- JSON ------------------------------------------------------------------------------------


def check_json_mapping(value: object, what: str) -> dict[str, Any] | None:
    """None, or a JSON object as it will read back (tuples become lists, and so on)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValidationError(f"{what} must be a mapping with string keys, not {describe(value)}")
    plain = _JsonCopy(what).value(value, 1)
    try:
        # The limit is on the text as stored (json.dumps with its default separators).
        encoded = json.dumps(plain, sort_keys=True, allow_nan=False, ensure_ascii=False)
        if len(encoded.encode("utf-8")) > JSON_MAX_BYTES:
            raise ValidationError(f"{what} is larger than {JSON_MAX_BYTES} bytes as JSON")
        # Keys sorted at every level, as the value reads back from the database.
        decoded: dict[str, Any] = json.loads(encoded)
    except ValueError as exc:  # an integer of more digits than Python converts to text
        raise ValidationError(f"{what} cannot be written as JSON ({exc})") from None
    return decoded


class _JsonCopy:
    """A plain copy of a JSON value (dicts, lists, str, int, float, bool, None), checked.

    It counts at least one byte of JSON text per value as it goes, so an oversized value is
    refused before all of it has been walked.
    """

    def __init__(self, what: str) -> None:
        self._what = what
        self._budget = JSON_MAX_BYTES

    def _spend(self, size: int) -> None:
        self._budget -= size
        if self._budget < 0:
            raise ValidationError(f"{self._what} is larger than {JSON_MAX_BYTES} bytes as JSON")

    def value(self, value: object, depth: int) -> Any:
        self._spend(1)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str):
            return self._text(value)
        if isinstance(value, int):
            number = int.__int__(value)
            self._spend(number.bit_length() // 4)  # fewer than its decimal digits
            return number
        if isinstance(value, float):
            real = float.__float__(value)
            if not math.isfinite(real):
                raise ValidationError(f"{self._what} holds {real}, which has no JSON form")
            return real
        if isinstance(value, Mapping | list | tuple):
            if depth > JSON_MAX_DEPTH:
                raise ValidationError(
                    f"{self._what} is nested deeper than {JSON_MAX_DEPTH} levels of JSON"
                )
            if isinstance(value, Mapping):
                return {self._key(key): self.value(item, depth + 1) for key, item in _items(value)}
            # Plain copies: a subclass's own __iter__ never runs.
            if isinstance(value, list):
                items: list[Any] | tuple[Any, ...] = list.__getitem__(value, slice(None))
            else:
                items = tuple.__getitem__(value, slice(None))
            return [self.value(item, depth + 1) for item in items]
        raise ValidationError(
            f"{self._what} holds a {type(value).__name__}, which has no JSON form"
        )

    def _key(self, key: object) -> str:
        if not isinstance(key, str):
            raise ValidationError(
                f"{self._what} must be a mapping with string keys, not {type(key).__name__} keys"
            )
        return self._text(key)

    def _text(self, value: str) -> str:
        text = str.__str__(value)
        self._spend(len(text) + 1)
        return check_storable(text, f"text in {self._what}")


def _items(value: Mapping[Any, Any]) -> list[tuple[Any, Any]]:
    if isinstance(value, dict):
        return list(dict.items(value))
    try:
        return list(value.items())  # the caller's own Mapping: its code may raise anything
    except Exception as exc:
        raise ValidationError(
            f"reading a {type(value).__name__} failed ({type(exc).__name__})"
        ) from exc


def plain_mapping(value: Mapping[Any, Any]) -> dict[Any, Any]:
    """A caller's mapping as a plain dict, read once; ValidationError if it cannot be read."""
    items = _items(value)
    try:
        return dict(items)  # hashes the caller's keys
    except Exception as exc:
        raise ValidationError(
            f"reading a {type(value).__name__} failed ({type(exc).__name__})"
        ) from exc


# The most rows one batch of a purge or a key rotation reads and writes in one transaction.
MAX_BATCH_SIZE = 100_000


def check_batch_size(value: object) -> int:
    """A batch size from 1 to ``MAX_BATCH_SIZE``."""
    return check_int(value, "batch_size", minimum=1, maximum=MAX_BATCH_SIZE)
