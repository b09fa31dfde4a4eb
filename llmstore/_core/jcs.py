"""Canonical JSON (RFC 8785, the JSON Canonicalization Scheme): one spelling per value.

Objects have their keys sorted by UTF-16 code units and no whitespace; strings are
escaped as ECMAScript's ``JSON.stringify`` escapes them; floats are written as
ECMAScript's ``Number.prototype.toString`` writes them (``1.0`` -> ``1``, ``1e21`` ->
``1e+21``). The output is meant to be encoded as UTF-8.

One deliberate difference: Python integers are written exactly, as digits, at any size.
RFC 8785 treats every number as a double, which would round money and counts above 2**53.

Datetimes (timezone-aware, written in UTC as ``2026-11-22T10:00:00.123456Z``) and UUIDs
(their canonical string) are accepted as input and become strings.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

# Beyond this depth a value is refused rather than recursed into.
_MAX_DEPTH = 64


class CanonicalJSONError(ValueError):
    """The value has no canonical JSON form (NaN, a lone surrogate, an unknown type...)."""


def canonical_json(value: object) -> str:
    """The RFC 8785 text of ``value``; raises :class:`CanonicalJSONError` if it has none."""
    parts: list[str] = []
    _write(value, parts, 0)
    return "".join(parts)


def _write(value: object, out: list[str], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise CanonicalJSONError(f"nested deeper than {_MAX_DEPTH} levels")
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(str(int(value)))
    elif isinstance(value, float):
        out.append(number(value))
    elif isinstance(value, str):
        out.append(string(value))
    elif isinstance(value, dt.datetime):
        out.append(string(timestamp(value)))
    elif isinstance(value, uuid.UUID):
        out.append(string(str(value)))
    elif isinstance(value, Mapping):
        _write_object(value, out, depth)
    elif isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            _write(item, out, depth + 1)
        out.append("]")
    else:
        raise CanonicalJSONError(f"{type(value).__name__} has no JSON form")


def _write_object(value: Mapping[Any, Any], out: list[str], depth: int) -> None:
    if not all(isinstance(key, str) for key in value):
        raise CanonicalJSONError("object keys must be strings")
    out.append("{")
    for index, key in enumerate(sorted(value, key=_utf16_order)):
        if index:
            out.append(",")
        out.append(string(key))
        out.append(":")
        _write(value[key], out, depth + 1)
    out.append("}")


def _utf16_order(key: str) -> bytes:
    # Big-endian UTF-16 bytes compare exactly as the code units do (RFC 8785, 3.2.3).
    try:
        return key.encode("utf-16-be")
    except UnicodeEncodeError:
        raise CanonicalJSONError("a key is not valid text (lone surrogate)") from None


def string(value: str) -> str:
    """A JSON string: ``"`` and ``\\`` escaped, control characters as ``\\n`` or
    ``\\u001f``, everything else as it is (RFC 8785, 3.2.2.2)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise CanonicalJSONError("a string is not valid text (lone surrogate)") from None
    # Python's encoder escapes exactly ECMAScript's set, with the same short forms and
    # lowercase hex, once non-ASCII is left alone.
    return json.dumps(value, ensure_ascii=False)


def number(value: float) -> str:
    """ECMAScript's ``Number.prototype.toString`` of a finite double (RFC 8785, 3.2.2.3)."""
    if not math.isfinite(value):
        raise CanonicalJSONError(f"{value!r} has no JSON form")
    if value == 0:
        return "0"  # minus zero too
    # repr() gives the shortest digits that read back as the same double, which is the
    # digit string ECMAScript chooses; only the layout around them differs.
    sign, digit_tuple, exponent = decimal.Decimal(repr(value)).as_tuple()
    digits = "".join(map(str, digit_tuple)).rstrip("0")
    assert isinstance(exponent, int)
    exponent += len(digit_tuple) - len(digits)
    # value = 0.digits * 10**point
    point = len(digits) + exponent
    size = len(digits)
    if size <= point <= 21:
        text = digits + "0" * (point - size)
    elif 0 < point <= 21:
        text = f"{digits[:point]}.{digits[point:]}"
    elif -6 < point <= 0:
        text = "0." + "0" * -point + digits
    else:
        power = point - 1
        mantissa = digits if size == 1 else f"{digits[0]}.{digits[1:]}"
        text = f"{mantissa}e{'+' if power > 0 else '-'}{abs(power)}"
    return "-" + text if sign else text


def timestamp(value: dt.datetime) -> str:
    """RFC 3339 in UTC with microseconds: ``2026-11-22T10:00:00.123456Z``."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise CanonicalJSONError("datetimes must be timezone-aware")
    naive = value.astimezone(dt.UTC).replace(tzinfo=None)
    return naive.isoformat(timespec="microseconds") + "Z"


def parse_strict(text: str) -> Any:
    """JSON text as Python values, refusing duplicate keys, ``NaN`` and ``Infinity``."""
    return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise CanonicalJSONError("duplicate object key")
    return result


def _no_constant(name: str) -> Any:
    raise CanonicalJSONError(f"{name} is not JSON")
