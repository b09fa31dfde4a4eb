"""The commands of ``python -m llmstore``, one function each.

Each takes the parsed arguments, calls the library and returns an exit code; the parser
and the one line printed per error are in ``main.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import re
import sys
from collections.abc import Callable

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from llmstore._access.audit import AuditVerification
from llmstore._billing.records import LedgerReport
from llmstore._core.config import StoreConfig
from llmstore._core.errors import ConfigError
from llmstore._core.secrets import generate_key
from llmstore._core.signing import generate_signing_key
from llmstore._core.validate import MAX_BATCH_SIZE
from llmstore._db.backends import create_database
from llmstore._db.schema import metadata
from llmstore._ops.backup import backup_database
from llmstore._ops.restore import restore_database
from llmstore._store import Store
from llmstore._usage.purge import check_cutoff
from llmstore._usage.receipts import configured_public_key
from llmstore.migrations import _commands as _migrations

from .progress import CopyProgress, PurgeProgress, StagedProgress

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DRIFT = 3
EXIT_UNREACHABLE = 4
EXIT_TAMPERED = 5


def config_of(args: argparse.Namespace) -> StoreConfig:
    """The configuration of the database a command is about: --url, --env, the environment."""
    overrides = {"url": args.url} if args.url else {}
    return StoreConfig.from_env(env=args.env, **overrides)


def upgrade(args: argparse.Namespace) -> int:
    config = config_of(args)
    if args.sql:
        _offline(config, lambda cfg: command.upgrade(cfg, args.revision, sql=True))
        return EXIT_OK
    done = _migrate(config, args, downgrading=False)
    before = done.before or "empty"
    verb = "already at" if done.before == done.after else f"upgraded from {before} to"
    print(f"{config.masked_url}: {verb} {done.after}{_backup_note(done)}")
    return EXIT_OK


def downgrade(args: argparse.Namespace) -> int:
    config = config_of(args)
    if args.sql:
        _offline(config, lambda cfg: command.downgrade(cfg, args.revision, sql=True))
        return EXIT_OK
    if config.env == "prod" and not args.yes:
        raise ConfigError("downgrade in LLMSTORE_ENV=prod needs --yes: it may drop tables and data")
    done = _migrate(config, args, downgrading=True)
    print(
        f"{config.masked_url}: downgraded from {done.before or 'empty'} to "
        f"{done.after or 'empty'}{_backup_note(done)}"
    )
    return EXIT_OK


def _migrate(
    config: StoreConfig, args: argparse.Namespace, *, downgrading: bool
) -> _migrations.Migration:
    progress = CopyProgress(sys.stderr, "backing up")
    try:
        return asyncio.run(
            _migrations.migrate(
                config,
                args.revision,
                downgrading=downgrading,
                backup=not args.no_backup,
                progress=progress,
            )
        )
    finally:
        progress.end()


def _backup_note(done: _migrations.Migration) -> str:
    if done.backup is not None:
        return f" (backup: {done.backup.path})"
    if done.backup_skipped not in (None, "nothing to do", "the database is empty"):
        return f" (no backup: {done.backup_skipped})"
    return ""


def _reachable(config: StoreConfig) -> None:
    """Connect once before a client tool runs: a server that is down or credentials it
    refuses are then told by llmstore's own errors (exit 4, exit 2), not by the tool."""
    asyncio.run(_migrations.current(config))


def backup(args: argparse.Namespace) -> int:
    config = config_of(args)
    _reachable(config)
    progress = CopyProgress(sys.stderr, "backing up")
    try:
        made = backup_database(config, args.out, progress)
    finally:
        progress.end()
    size = f"{made.size / 1e6:,.1f} MB"
    revision = made.revision or "none"
    print(f"{config.masked_url}: backed up at revision {revision} to {made.path} ({size})")
    return EXIT_OK


def restore(args: argparse.Namespace) -> int:
    config = config_of(args)
    if config.env == "prod" and not args.yes:
        raise ConfigError("restore in LLMSTORE_ENV=prod needs --yes: it replaces every row")
    _reachable(config)
    progress = StagedProgress(sys.stderr)
    try:
        done = restore_database(config, args.file, progress=progress)
    finally:
        progress.end()
    previous = done.backup.path if done.backup is not None else "none, it held nothing"
    head = _migrations.head_revision()
    after = "" if done.revision == head else f"; behind head {head}: run `upgrade` next"
    print(
        f"{config.masked_url}: restored revision {done.revision} from {args.file} "
        f"(backup of the previous database: {previous}){after}"
    )
    return EXIT_OK


def _offline(config: StoreConfig, step: Callable[[Config], None]) -> None:
    step(_migrations.alembic_config(url=config.url.get_secret_value(), schema=config.schema_name))


def current(args: argparse.Namespace) -> int:
    config = config_of(args)
    revision = asyncio.run(_migrations.current(config))
    head = _migrations.head_revision()
    state = "head" if revision == head else f"behind head {head}" if revision else "empty"
    if revision is not None and not _migrations.is_known(revision):
        state = "unknown to this version of llmstore"
    print(f"{revision or 'none'} ({state})")
    return EXIT_OK


def history(args: argparse.Namespace) -> int:
    head = _migrations.head_revision()
    for script in _migrations.scripts().walk_revisions():
        marker = " (head)" if script.revision == head else ""
        print(f"{script.down_revision or '<base>'} -> {script.revision}{marker}: {script.doc}")
    return EXIT_OK


def check(args: argparse.Namespace) -> int:
    config = config_of(args)
    diffs = asyncio.run(_migrations.check(config))
    if not diffs:
        print(f"{config.masked_url}: the schema matches the models")
        return EXIT_OK
    for diff in diffs:
        print(diff.description)
    print(f"{config.masked_url}: {len(diffs)} difference(s) from the models", file=sys.stderr)
    return EXIT_DRIFT


def create_db(args: argparse.Namespace) -> int:
    config = config_of(args)
    created = asyncio.run(create_database(config))
    print(f"{config.masked_url}: {'created' if created else 'already exists'}")
    return EXIT_OK


def info(args: argparse.Namespace) -> int:
    config = config_of(args)
    revision = asyncio.run(_migrations.current(config))
    print(f"driver: {config.driver}")
    print(f"url: {config.masked_url}")
    if config.schema_name:
        print(f"schema: {config.schema_name}")
    print(f"revision: {revision or 'none'} (head: {_migrations.head_revision()})")
    if revision is not None:
        for table, count in asyncio.run(_row_counts(config)):
            print(f"rows in {table}: {count}")
    return EXIT_OK


async def _row_counts(config: StoreConfig) -> list[tuple[str, int]]:
    def count(conn: sa.Connection) -> list[tuple[str, int]]:
        existing = set(sa.inspect(conn).get_table_names(schema=config.schema_name))
        rows = []
        for table in metadata.sorted_tables:
            if table.name in existing:
                target = sa.table(table.name, schema=config.schema_name)
                total = conn.execute(sa.select(sa.func.count()).select_from(target)).scalar()
                rows.append((table.name, int(total or 0)))
        return rows

    return await _migrations.with_migration_connection(config, count, write=False)


def audit_verify(args: argparse.Namespace) -> int:
    config = config_of(args)
    report = asyncio.run(_verify_audit(config))
    if report.ok:
        print(
            f"{config.masked_url}: audit chain intact, {report.events_checked} event(s) "
            f"after anchor {report.anchor_seq}"
        )
        return EXIT_OK
    where = f" (event id {report.failed_event_id})" if report.failed_event_id else ""
    print(
        f"{config.masked_url}: audit chain broken at event {report.failed_seq}{where}: "
        f"{report.reason}: {report.message}",
        file=sys.stderr,
    )
    return EXIT_TAMPERED


def verify_ledger(args: argparse.Namespace) -> int:
    config = config_of(args)
    report = asyncio.run(_ledger_report(config))
    for mismatch in report.mismatches:
        print(
            f"api key {mismatch.api_key_id}: {mismatch.field} is {mismatch.stored}, "
            f"the ledger says {mismatch.expected}"
        )
    if report.ok:
        print(f"{config.masked_url}: {report.keys_checked} API key(s) agree with the ledger")
        return EXIT_OK
    print(
        f"{config.masked_url}: {len(report.mismatches)} mismatch(es) in "
        f"{report.keys_checked} API key(s)",
        file=sys.stderr,
    )
    return EXIT_TAMPERED


async def _ledger_report(config: StoreConfig) -> LedgerReport:
    async with Store(config) as store:
        return await store.api_keys.verify()


async def _verify_audit(config: StoreConfig) -> AuditVerification:
    async with Store(config) as store:
        return await store.audit.verify()


def generate_encryption_key(args: argparse.Namespace) -> int:
    print(generate_key())
    return EXIT_OK


def receipts_generate_key(args: argparse.Namespace) -> int:
    print(generate_signing_key())
    return EXIT_OK


def receipts_public_key(args: argparse.Namespace) -> int:
    # Only the environment: the key is not a database setting, so no URL is needed.
    print(configured_public_key(os.environ))
    return EXIT_OK


_DURATION = re.compile(r"([0-9]+)([mhdw])")
_DURATION_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def duration(text: str) -> dt.timedelta:
    match = _DURATION.fullmatch(text.strip())
    try:
        if match is None or int(match[1]) == 0:
            raise ValueError
        return dt.timedelta(**{_DURATION_UNITS[match[2]]: int(match[1])})
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(
            f"expected a positive duration such as 90d, 12h, 30m or 2w, not {text!r}"
        ) from None


def batch_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_BATCH_SIZE:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to {MAX_BATCH_SIZE}")
    return value


def usage_purge(args: argparse.Namespace) -> int:
    config = config_of(args)
    cutoff = check_cutoff(args.older_than)
    progress = PurgeProgress(sys.stdout)
    try:
        deleted = asyncio.run(_purge(config, cutoff, args.batch_size, args.export, progress))
    finally:
        progress.end()
    exported = f", exported to {args.export}" if args.export else ""
    print(
        f"{config.masked_url}: purged {deleted} usage row(s) created before "
        f"{cutoff:%Y-%m-%dT%H:%M:%SZ}{exported}"
    )
    return EXIT_OK


async def _purge(
    config: StoreConfig,
    cutoff: dt.datetime,
    batch_size: int,
    export: str | None,
    progress: PurgeProgress,
) -> int:
    async with Store(config) as store:
        return await store.usage.purge(
            cutoff, batch_size=batch_size, export_to=export, progress=progress
        )


def rotate_keys(args: argparse.Namespace) -> int:
    config = config_of(args)
    progress = CopyProgress(sys.stderr, "re-encrypting")
    try:
        changed = asyncio.run(_rotate(config, args.batch_size, progress))
    finally:
        progress.end()
    print(
        f"{config.masked_url}: re-encrypted {changed} value(s) under the first key of "
        "LLMSTORE_ENCRYPTION_KEYS"
    )
    return EXIT_OK


async def _rotate(config: StoreConfig, batch_size: int, progress: CopyProgress) -> int:
    async with Store(config) as store:
        return await store.rotate_keys(batch_size=batch_size, progress=progress)
