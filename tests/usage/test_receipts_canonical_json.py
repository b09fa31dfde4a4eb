"""The canonical JSON receipts are signed in, against RFC 8785's examples (numbers,
sorting, escapes) and as a fixed point for any JSON value."""

from __future__ import annotations

import datetime as dt
import json
import struct
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmstore._core.jcs import CanonicalJSONError, canonical_json, number, parse_strict
from tests.usage.receipts_support import MAX

# --- canonical JSON (RFC 8785) -------------------------------------------------------------

# RFC 8785, Appendix B: IEEE 754 doubles (as hex) and their canonical text.
APPENDIX_B = [
    ("0000000000000000", "0"),
    ("8000000000000000", "0"),
    ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"),
    ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"),
    ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"),
    ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"),
    ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"),
    ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
    ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"),
    ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"),
    ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"),
    ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]


@pytest.mark.parametrize(("bits", "expected"), APPENDIX_B)
def test_rfc8785_appendix_b_numbers(bits: str, expected: str) -> None:
    value = struct.unpack(">d", bytes.fromhex(bits))[0]
    assert number(value) == expected
    assert canonical_json([value]) == f"[{expected}]"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.1, "0.1"),
        (1.0, "1"),
        (1e21, "1e+21"),
        (1e20, "100000000000000000000"),
        (-1.5, "-1.5"),
        (1e-6, "0.000001"),
        (1e-7, "1e-7"),
        (1.5e-7, "1.5e-7"),
        (123.456e30, "1.23456e+32"),
    ],
)
def test_ecmascript_number_forms(value: float, expected: str) -> None:
    assert number(value) == expected


@pytest.mark.parametrize("bits", ["7fffffffffffffff", "7ff0000000000000", "fff0000000000000"])
def test_nan_and_infinity_have_no_canonical_form(bits: str) -> None:
    with pytest.raises(CanonicalJSONError):
        canonical_json({"x": struct.unpack(">d", bytes.fromhex(bits))[0]})


def test_rfc8785_section_3_2_2_example() -> None:
    text = (
        '{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],'
        r' "string": "\u20ac$\u000F\u000aA' + "'" + r'\u0042\u0022\u005c\\\"\/",'
        ' "literals": [null, true, false]}'
    )
    expected = (
        '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
        '"string":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    )
    assert canonical_json(parse_strict(text)) == expected


def test_rfc8785_section_3_2_3_sorting_example() -> None:
    value = {
        "\u20ac": "Euro Sign",
        "\r": "Carriage Return",
        "\ufb33": "Hebrew Letter Dalet With Dagesh",
        "1": "One",
        "\U0001f600": "Emoji: Grinning Face",
        "\u0080": "Control",
        "\u00f6": "Latin Small Letter O With Diaeresis",
    }
    expected_order = ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]
    assert list(json.loads(canonical_json(value))) == expected_order
    assert canonical_json(value).startswith('{"\\r":"Carriage Return","1":"One","\u0080":')


def test_object_keys_sort_by_utf16_code_units_not_code_points() -> None:
    # U+10000 is D800 DC00 in UTF-16, so it sorts before U+E000 (code points say after).
    assert canonical_json({"\ue000": 1, "\U00010000": 2}) == '{"\U00010000":2,"\ue000":1}'


def test_string_escapes() -> None:
    assert canonical_json("\b\t\n\f\r") == '"\\b\\t\\n\\f\\r"'
    assert canonical_json("\x00\x1f\x7f") == '"\\u0000\\u001f\x7f"'
    assert canonical_json('"\\/') == '"\\"\\\\/"'
    assert canonical_json("\u2028\u00e9\U0001f600") == '"\u2028\u00e9\U0001f600"'
    for bad in ("\ud800", {"\udc00": 1}):
        with pytest.raises(CanonicalJSONError, match="surrogate"):
            canonical_json(bad)


def test_row_values_become_json() -> None:
    moment = dt.datetime(2026, 11, 22, 11, 0, 0, 123456, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert canonical_json(moment) == '"2026-11-22T10:00:00.123456Z"'
    assert canonical_json(moment.replace(microsecond=0)) == '"2026-11-22T10:00:00.000000Z"'
    some_id = uuid.UUID("0195F0E4-9C2A-7D3E-8B1F-2A3B4C5D6E7F")
    assert canonical_json(some_id) == '"0195f0e4-9c2a-7d3e-8b1f-2a3b4c5d6e7f"'
    assert canonical_json([MAX, -(2**64), True, None, (1, 2)]) == (
        "[9223372036854775807,-18446744073709551616,true,null,[1,2]]"
    )
    for bad in (dt.datetime(2026, 1, 1), b"bytes", {1: "x"}, {1.5}):
        with pytest.raises(CanonicalJSONError):
            canonical_json(bad)


def test_parse_strict_refuses_what_has_no_canonical_form() -> None:
    with pytest.raises(CanonicalJSONError, match="duplicate"):
        parse_strict('{"a":1,"a":2}')
    for text in ("NaN", "[Infinity]", "-Infinity"):
        with pytest.raises(CanonicalJSONError):
            parse_strict(text)


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(_JSON)
def test_canonical_json_reads_back_and_is_a_fixed_point(value: Any) -> None:
    try:
        text = canonical_json(value)
    except CanonicalJSONError:
        return  # a lone surrogate drawn in some text
    parsed = parse_strict(text)
    assert canonical_json(parsed) == text
    assert _same_json(parsed, value)


def _same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values: 1 and 1.0 are one number."""
    if type(a) is int and type(b) is int:
        return a == b
    if type(a) in (int, float) and type(b) in (int, float):
        # A double printed without a fraction (7.179215108220994e16 as 71792151082209940)
        # reads back as a Python int: the same JSON number, and the same double.
        return float(a) == float(b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
        )
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same_json, a, b))
    return bool(a == b) and type(a) is type(b)
