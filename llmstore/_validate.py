"""Argument checks shared by the repositories: each raises ``ValidationError``."""

from __future__ import annotations

import uuid

from ._errors import ValidationError

MAX_PAGE = 1000


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
    return value


def check_secret(value: object, what: str, *, max_length: int = 4096) -> str:
    """Like :func:`check_text`, but never quotes the value."""
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be a string, not {type(value).__name__}")
    if not value.strip() or len(value) > max_length or value != value.strip():
        raise ValidationError(
            f"{what} must be 1 to {max_length} characters with no surrounding whitespace"
        )
    return value


def check_limit(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PAGE:
        raise ValidationError(f"limit must be an integer from 1 to {MAX_PAGE}, not {value!r:.40}")
    return value


def check_optional_bool(value: object, what: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ValidationError(f"{what} must be True, False or None, not {type(value).__name__}")
    return value
