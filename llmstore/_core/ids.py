"""Row ids: time-ordered UUIDs (version 7), so keyset pages by id follow creation order.

Within one process ids are strictly increasing, even several in one millisecond: the 74
random bits act as a counter that starts at a random value each millisecond (RFC 9562,
method 2). Ids made by different processes in the same millisecond have no set order.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
import uuid

_RANDOM_BITS = 74
_lock = threading.Lock()
_last_millis = 0
_last_counter = 0


def new_id() -> uuid.UUID:
    global _last_millis, _last_counter
    with _lock:
        millis = time.time_ns() // 1_000_000
        if millis <= _last_millis:
            millis = _last_millis
            counter = _last_counter + 1
            if counter >> _RANDOM_BITS:  # exhausted this millisecond: borrow the next one
                millis += 1
                counter = _fresh_counter()
        else:
            counter = _fresh_counter()
        _last_millis, _last_counter = millis, counter
    rand_a, rand_b = counter >> 62, counter & ((1 << 62) - 1)
    value = (millis << 80) | (0x7 << 76) | (rand_a << 64) | (0x2 << 62) | rand_b
    return uuid.UUID(int=value)


def _fresh_counter() -> int:
    # The top bit starts clear, leaving room for 2**73 increments within a millisecond.
    return int.from_bytes(os.urandom(10), "big") >> (80 - _RANDOM_BITS + 1)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
