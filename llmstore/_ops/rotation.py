"""Key rotation: re-encrypt every stored secret under the first key of the key list.

Each encrypted column is walked in primary-key order, a batch at a time. A batch is read
and decrypted first; when some of its values are plaintext-marked or under another key,
one short write transaction replaces them, each with a compare-and-set on the old
ciphertext (a value a proxy replaced meanwhile was written under the first key already,
and is left alone). An interrupted rotation so loses at most the batch in flight, and
running it again finishes the job: values already under the first key are not rewritten.
A value no key decrypts stops the rotation before its batch writes anything.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore._core.errors import ConfigError, ConflictError, ValidationError
from llmstore._core.secrets import SecretBox
from llmstore._core.validate import check_batch_size
from llmstore._db.runner import Runner
from llmstore._db.schema import projects, provider_credentials, withdrawals

#: Every column that holds a secret encrypted by ``SecretBox``; each table's key is ``id``.
ENCRYPTED_COLUMNS: tuple[sa.Column[str], ...] = (
    projects.c.api_key_encrypted,
    provider_credentials.c.api_key_encrypted,
    withdrawals.c.token_encrypted,
)

#: ``progress(checked, total)``: values checked so far, out of the stored values counted
#: at the start (values written meanwhile can take ``checked`` past it).
Progress = Callable[[int, int], object]
_MAX_LOST_RACES = 3
#: A value to replace: (row id, stored value, the same secret under the first key).
Change = tuple[uuid.UUID, str, str]


def _count(conn: Connection) -> int:
    total = 0
    for column in ENCRYPTED_COLUMNS:
        statement = sa.select(sa.func.count()).select_from(column.table)
        total += conn.execute(statement.where(column.is_not(None))).scalar_one()
    return total


def _read_batch(
    conn: Connection,
    column: sa.Column[str],
    after: uuid.UUID | None,
    size: int,
    secrets: SecretBox,
) -> tuple[int, uuid.UUID | None, list[Change]]:
    """The next ``size`` stored values after ``after``: (how many, the last id, changes)."""
    key = column.table.c.id
    statement = sa.select(key, column).where(column.is_not(None)).order_by(key).limit(size)
    if after is not None:
        statement = statement.where(key > after)
    rows = conn.execute(statement).all()
    changes = []
    for row_id, stored in rows:
        if not secrets.needs_rotation(stored):
            continue
        try:
            changes.append((row_id, stored, secrets.rotate(stored)))
        except ConfigError:
            # Names the row, never the value.
            raise ConfigError(
                f"the secret in {column.table.name}.{column.name} of row {row_id} cannot be "
                "decrypted with any key in LLMSTORE_ENCRYPTION_KEYS: add the key it was "
                "encrypted with; nothing of its batch was rewritten"
            ) from None
    return len(rows), (rows[-1][0] if rows else None), changes


def _write_batch(conn: Connection, column: sa.Column[str], changes: Sequence[Change]) -> int:
    """Replace each value still as read (compare-and-set); how many were replaced."""
    key = column.table.c.id
    changed = 0
    for row_id, old, new in changes:
        statement = (
            sa.update(column.table).where(key == row_id, column == old).values({column.name: new})
        )
        changed += conn.execute(statement).rowcount
    return changed


async def rotate_keys(
    runner: Runner, secrets: SecretBox, *, batch_size: object, progress: Progress | None
) -> int:
    """Re-encrypt every stored secret under the first key; how many values were rewritten."""
    if not secrets.has_keys:
        raise ConfigError("rotate-keys needs LLMSTORE_ENCRYPTION_KEYS (the new key first)")
    size = check_batch_size(batch_size)
    if progress is not None and not callable(progress):
        raise ValidationError("progress must be a callable taking (checked, total)")
    total = await runner.read(_count)
    checked = changed = 0
    if progress is not None:
        progress(0, total)
    for column in ENCRYPTED_COLUMNS:
        after: uuid.UUID | None = None
        lost_races = 0
        while True:
            read = functools.partial(
                _read_batch, column=column, after=after, size=size, secrets=secrets
            )
            count, last, changes = await runner.read(read)
            if changes:
                written = await runner.write(
                    functools.partial(_write_batch, column=column, changes=changes)
                )
                changed += written
                if written < len(changes):
                    # Some values were replaced after they were read: read the batch again,
                    # so that a value still under an old key is not left behind.
                    lost_races += 1
                    if lost_races > _MAX_LOST_RACES:
                        raise ConflictError(
                            f"{column.table.name}.{column.name} kept changing while it was "
                            "re-encrypted: run rotate-keys again"
                        )
                    continue
            lost_races = 0
            after = last
            checked += count
            if progress is not None and count:
                progress(checked, max(total, checked))
            if count < size:
                break
    return changed
