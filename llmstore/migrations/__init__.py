"""llmstore's migrations, for a host application's start-up code and its own ``env.py``.

The same commands as ``python -m llmstore upgrade | downgrade | current | check``, with the
same behaviour: the migration lock (replicas migrate one at a time), a backup first when
there is work to do, every revision in one transaction, the result checked before COMMIT,
a mistyped target revision refused before anything is locked or backed up, and the same
errors (``MigrationError``, ``BackupError``, ``DatabaseUnavailableError``, ...).

``target`` is a database URL (the rest of the configuration from the environment, as
``StoreConfig.from_env``), a ``StoreConfig``, or a SQLAlchemy ``AsyncEngine`` of the host's.
An engine lends one connection for the command and is never disposed; the connection goes
back to its pool with the settings it had (``search_path`` and ``lock_timeout`` on
Postgres, ``foreign_keys`` on SQLite). With an engine, ``DATABASE_SCHEMA`` and the backup
settings come from the environment.

Nothing outside llmstore's own objects (``llmstore_*``, its version table
``llmstore_alembic_version``) is read, changed or reported: a host's tables, views and
Alembic history may share the database or the schema. For the host's own Alembic, pass
:func:`include_object` to ``context.configure()`` in its ``env.py`` so that its
autogenerate never proposes to drop or alter llmstore's tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from llmstore._core.config import StoreConfig
from llmstore._core.errors import ConfigError, ValidationError
from llmstore._db.schema import TABLE_PREFIX
from llmstore._db.traits import traits
from llmstore.migrations import _commands as _migrations

__all__ = [
    "MigrationResult",
    "Target",
    "check",
    "current",
    "downgrade",
    "include_object",
    "script_location",
    "upgrade",
]

#: A database URL, a ``StoreConfig`` or a host's ``AsyncEngine``.
Target = str | StoreConfig | AsyncEngine


@dataclass(frozen=True)
class MigrationResult:
    """What ``upgrade`` or ``downgrade`` did."""

    #: The revision before the command (None: the database held no llmstore schema).
    before: str | None
    #: The revision after it.
    after: str | None
    #: The backup made before any change, if one was made.
    backup: Path | None
    #: Why no backup was made, when none was ("nothing to do", "not asked for", ...).
    backup_skipped: str | None


def _resolve(target: object) -> tuple[StoreConfig, AsyncEngine | None]:
    if isinstance(target, StoreConfig):
        return target, None
    if isinstance(target, str):
        return StoreConfig.from_env(url=target), None
    if isinstance(target, AsyncEngine):
        # The engine's own driver does the work; the URL only locates backups and pg_dump.
        driver = traits(target.dialect).driver  # refuses a database llmstore does not migrate
        url = target.url.set(drivername=driver).render_as_string(hide_password=False)
        return StoreConfig.from_env(url=url), target
    raise ConfigError(
        f"a migration target is a URL, a StoreConfig or an AsyncEngine, not {type(target).__name__}"
    )


def _result(done: _migrations.Migration) -> MigrationResult:
    path = None if done.backup is None else done.backup.path
    return MigrationResult(done.before, done.after, path, done.backup_skipped)


async def upgrade(
    target: Target, revision: str = "head", *, backup: bool = True
) -> MigrationResult:
    """Upgrade llmstore's schema to ``revision`` (default: the newest this code has)."""
    config, engine = _resolve(target)
    done = await _migrations.migrate(
        config, revision, downgrading=False, backup=_flag(backup), engine=engine
    )
    return _result(done)


async def downgrade(target: Target, revision: str, *, backup: bool = True) -> MigrationResult:
    """Downgrade llmstore's schema to ``revision`` (``base`` removes every llmstore table)."""
    config, engine = _resolve(target)
    done = await _migrations.migrate(
        config, revision, downgrading=True, backup=_flag(backup), engine=engine
    )
    return _result(done)


async def current(target: Target) -> str | None:
    """The revision of llmstore's schema, or None when it holds none."""
    config, engine = _resolve(target)
    return await _migrations.current(config, engine)


async def check(target: Target) -> list[str]:
    """How llmstore's schema differs from this code's models; empty when it matches."""
    config, engine = _resolve(target)
    return [diff.description for diff in await _migrations.check(config, engine)]


def include_object(
    object: Any,  # noqa: A002 (the name Alembic passes it by)
    name: str | None,
    type_: str,
    reflected: bool,
    compare_to: Any,
) -> bool:
    """Alembic's ``include_object`` hook for a host's ``env.py``: everything but llmstore's.

    With it, the host's ``alembic revision --autogenerate`` never proposes to drop or alter
    llmstore's tables, indexes or version table, and its ``alembic check`` passes with them
    present. Combine it with a filter of the host's own by calling both.
    """
    table = name if type_ == "table" else getattr(getattr(object, "table", None), "name", None)
    return not (isinstance(table, str) and table.startswith(TABLE_PREFIX))


def script_location() -> Path:
    """The folder of llmstore's Alembic scripts (``env.py``, ``versions/``), for an Alembic
    ``Config`` of your own (pytest-alembic's ``alembic_config`` fixture, say)."""
    return _migrations.script_location()


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(f"backup must be True or False, not {type(value).__name__}")
    return value
