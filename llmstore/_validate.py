"""Argument checks shared by the repositories: each raises ``ValidationError``."""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import Mapping
from typing import Any

from ._errors import ValidationError

MAX_PAGE = 1000
MAX_INT64 = 2**63 - 1
JSON_MAX_BYTES = 16_384
_HTTP_URL = re.compile(r"https?://[^\s/?#]+[^\s]*")


def check_id(value: object, what: str = "id") -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        try:
            return uuid.UUID(value)
        except ValueError:
            pass
    raise ValidationError(f"{what} must be a UUID, not {type(value).__name__} {value!r:.60}")


def check_text(value: object, what: str, *, max_length: int) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be a string, not {type(value).__name__}")
    if not value.strip():
        raise ValidationError(f"{what} must not be empty")
    if len(value) > max_length:
        raise ValidationError(f"{what} is {len(value)} characters long; the limit is {max_length}")
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise ValidationError(f"{what} must not contain control characters")
    _check_encodable(value, what)
    return value


def check_name(value: object, what: str, *, max_length: int = 200) -> str:
    """1 to ``max_length`` characters of valid text without NUL (Postgres refuses NUL)."""
    if not isinstance(value, str) or not 1 <= len(value) <= max_length:
        raise ValidationError(f"{what} must be a string of 1 to {max_length} characters")
    if "\x00" in value:
        raise ValidationError(f"{what} must not contain NUL characters")
    _check_encodable(value, what)
    return value


def _check_encodable(value: str, what: str) -> None:
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError(f"{what} is not valid text (lone surrogates)") from None


def check_secret(value: object, what: str, *, max_length: int = 4096) -> str:
    """Like :func:`check_text`, but never quotes the value."""
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be a string, not {type(value).__name__}")
    if not value.strip() or len(value) > max_length or value != value.strip():
        raise ValidationError(
            f"{what} must be 1 to {max_length} characters with no surrounding whitespace"
        )
    _check_encodable(value, what)
    return value


def check_limit(value: object, *, maximum: int = MAX_PAGE) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise ValidationError(f"limit must be an integer from 1 to {maximum}, not {value!r:.40}")
    return value


def check_optional_bool(value: object, what: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ValidationError(f"{what} must be True, False or None, not {type(value).__name__}")
    return value


def check_aware(value: object, what: str) -> dt.datetime:
    if not isinstance(value, dt.datetime):
        raise ValidationError(f"{what} must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValidationError(f"{what} must be timezone-aware (naive datetimes are refused)")
    try:
        return value.astimezone(dt.UTC)
    except OverflowError:
        raise ValidationError(f"{what} is out of range in UTC") from None


def check_positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_INT64:
        raise ValidationError(f"{what} must be an integer from 1 to 2**63 - 1, not {value!r:.40}")
    return value


def check_actor(value: object) -> str | None:
    """``actor=`` of an audited mutation: None (not audited) or who made the change."""
    return None if value is None else check_text(value, "actor", max_length=200)


def check_json_mapping(value: object, what: str) -> dict[str, Any] | None:
    """None, or a JSON object of at most ``JSON_MAX_BYTES``, as it will read back."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise ValidationError(f"{what} must be a mapping with string keys")
    try:
        encoded = json.dumps(
            dict(value), sort_keys=True, allow_nan=False, ensure_ascii=False, default=_plain
        )
        size = len(encoded.encode("utf-8"))
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise ValidationError(f"{what} must be JSON-serialisable text ({exc})") from None
    if size > JSON_MAX_BYTES:
        raise ValidationError(f"{what} is larger than {JSON_MAX_BYTES} bytes as JSON")
    # Tuples become lists and so on, so that what is hashed or compared is what is stored.
    decoded: dict[str, Any] = json.loads(encoded)
    return decoded


def _plain(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def check_http_url(value: object, what: str) -> str:
    url = check_text(value, what, max_length=2000)
    if _HTTP_URL.fullmatch(url) is None:
        raise ValidationError(f"{what} must be an http:// or https:// URL, not {url!r:.80}")
    return url
