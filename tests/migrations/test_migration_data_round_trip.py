"""Data survives every revision: rows seeded at each revision reach head intact, and come
back down again, on SQLite (file) and Postgres.

For each revision R: an empty database is upgraded to R, every table that exists at R
gets the rows of ``SEEDS`` (``data_seeds``: plain Core inserts against the table as it is
at R), the database goes up to head and then down one revision at a time back to R, and at
every step each seeded table must hold exactly the seeded rows, column for column, in every
column that exists at that step (``data_support``).

A new revision adds one entry to ``SEEDS`` (and to ``ADDED_COLUMNS`` / ``DROPPED_COLUMNS`` /
``REVISION_ROWS`` as ``data_seeds`` says); these tests fail, naming what is missing, until
it does.
"""

from __future__ import annotations

import pytest

from llmstore import StoreConfig
from llmstore._db.schema import metadata
from llmstore.migrations._commands import current, downgrade, head_revision, upgrade
from tests.migrations.data_seeds import (
    ADDED_COLUMNS,
    DROPPED_COLUMNS,
    REVISION_ROWS,
    SEEDS,
    _missing_seed_message,
)
from tests.migrations.data_support import (
    after_downgrade,
    assert_rows_intact,
    name_at,
    revisions,
    seed,
)

# --- the tests -------------------------------------------------------------------------------


def test_every_revision_has_seed_rows() -> None:
    missing = [rev for rev in revisions() if rev not in SEEDS]
    assert not missing, _missing_seed_message(missing)
    unknown = set(SEEDS) | set(ADDED_COLUMNS) | set(DROPPED_COLUMNS) | set(REVISION_ROWS)
    assert unknown <= set(revisions()), f"no such revision(s): {unknown - set(revisions())}"
    created = [name_at(table, rev, head_revision()) for rev in revisions() for table in SEEDS[rev]]
    assert sorted(created) == sorted(metadata.tables), "SEEDS must cover every model table"


@pytest.mark.parametrize("revision", revisions())
async def test_rows_seeded_at_a_revision_survive_up_to_head_and_back(
    db_config: StoreConfig, revision: str
) -> None:
    assert revision in SEEDS, _missing_seed_message([revision])
    await upgrade(db_config, revision)
    seeded = await seed(db_config, revision)
    assert sum(len(rows) for rows in seeded.rows.values()) >= 2 * len(seeded.rows)
    await assert_rows_intact(db_config, seeded, revision, been_at_head=False)

    head = head_revision()
    assert await upgrade(db_config) == (revision, head)
    await assert_rows_intact(db_config, seeded, head)

    below_head = revisions()[revisions().index(revision) : -1]
    for step in reversed(below_head):
        await downgrade(db_config, step)
        await assert_rows_intact(db_config, seeded, step)
    # Back where it started: exactly the seeds, as written.
    assert await current(db_config) == revision

    # And up once more: each upgrade meets the rows its own downgrade left (rows seeded at
    # 0004 go 0004 -> 0005 -> 0004 -> 0005). Seeded at head: down one revision and up; what
    # head adds (its tables, its columns) goes with its downgrade and comes back empty, or
    # with the value ADDED_COLUMNS gives.
    if revision == head:
        below = revisions()[-2]
        await downgrade(db_config, below)
        seeded = after_downgrade(seeded, below)
        await assert_rows_intact(db_config, seeded, below)
    assert await upgrade(db_config) == (revisions()[-2] if revision == head else revision, head)
    await assert_rows_intact(db_config, seeded, head)
