"""Ids are UUIDv7 and strictly increasing within a process, even inside one millisecond."""

from __future__ import annotations

import threading
import uuid

from llmstore._core.ids import new_id


def test_ids_are_version_7_and_strictly_increasing() -> None:
    ids = [new_id() for _ in range(20_000)]  # many share a millisecond
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert {value.version for value in ids} == {7}
    assert {value.variant for value in ids} == {uuid.RFC_4122}


def test_ids_from_several_threads_are_unique() -> None:
    made: list[list[uuid.UUID]] = [[] for _ in range(4)]

    def make(bucket: list[uuid.UUID]) -> None:
        bucket.extend(new_id() for _ in range(5_000))

    threads = [threading.Thread(target=make, args=(bucket,)) for bucket in made]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [value for bucket in made for value in bucket]
    assert len(set(every)) == len(every)
    assert all(bucket == sorted(bucket) for bucket in made)
