"""The values the data tests seed: near the limits, unicode, offsets, JSON, ciphertext-
looking text, and the ids of the seeded rows (``data_seeds.py``, ``data_seeds_0006.py``)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import uuid
from typing import Any

Row = dict[str, Any]

BIG = 2**63 - 1  # BigInteger's largest
SMALL = -(2**63)  # ... and smallest
INT32 = 2**31 - 1  # Integer's largest on Postgres
UTC = dt.UTC
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
NOW = dt.datetime(2026, 11, 22, 12, 34, 56, 789012, tzinfo=UTC)
# Not UTC: the instant must survive (llmstore stores UTC; the offset itself is not kept).
OFFSET = dt.datetime(2027, 3, 4, 5, 6, 7, 1, tzinfo=dt.timezone(-dt.timedelta(hours=9, minutes=30)))
Y2038 = dt.datetime(2038, 1, 19, 3, 14, 8, tzinfo=UTC)
LAST = dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)

UNICODE_200 = ("名前🦀é\u0301שׁ" * 40)[:200]  # CJK, astral, combining, Hebrew: 200 characters
TRICKY = 'it\'s "quoted"\n\ttab \\ backslash; DROP TABLE projects;--'
FERNET = "gAAAAAB" + base64.urlsafe_b64encode(bytes(range(256)) * 3).decode()
FERNET_2 = "gAAAAAB" + base64.urlsafe_b64encode(hashlib.sha512(b"two").digest()).decode()
DOCUMENT = {
    "unicode": "ünïcödé 🦀 中文",
    "big": BIG,
    "small": SMALL,
    "float": 0.1,
    "nested": {"list": [1, "two", None, True, False, 2.5], "empty": {}, "none": []},
    "null": None,
    "escaped": TRICKY,
}


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def uid(n: int) -> uuid.UUID:
    return uuid.UUID(int=n)


P1, P2, P3 = uid(1), uuid.UUID("ffffffff-ffff-4fff-bfff-ffffffffffff"), uid(3)
K1, K2 = uuid.UUID("6c6c6d73-746f-7265-8000-000000000001"), uid(2**64)
B1, B2, B3 = uid(101), uuid.UUID("ffffffff-ffff-4fff-bfff-fffffffffffe"), uid(103)
R1, R2 = uid(201), uid(202)
A1, A2 = uid(301), uid(302)
