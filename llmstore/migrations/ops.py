"""Operations for llmstore's revision scripts (and a host's, on tables that may be large).

Every revision after the first four begins ``upgrade()`` and ``downgrade()`` with
:func:`set_lock_timeout`, and indexes a table it did not create itself with
:func:`create_index_concurrently` (and drops such an index with
:func:`drop_index_concurrently`). On SQLite these are the plain operations, inside the one
migration transaction; on PostgreSQL a concurrent build runs in an autocommit block that
commits the revisions before it (see the README, "Writing a revision").
"""

from __future__ import annotations

from llmstore.migrations._ops import (
    DEFAULT_LOCK_TIMEOUT,
    create_index_concurrently,
    drop_index_concurrently,
    set_lock_timeout,
)

__all__ = [
    "DEFAULT_LOCK_TIMEOUT",
    "create_index_concurrently",
    "drop_index_concurrently",
    "set_lock_timeout",
]
