"""``python -m llmstore``: parse, call the library, print one line per error.

Exit codes: 0 success; 1 the command failed; 2 bad usage or configuration;
3 ``check`` found differences between the database and the models;
4 the database could not be reached; 5 ``audit verify`` found a broken chain or
``verify`` found balances that disagree with the ledger.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence

from llmstore._core.errors import ConfigError, DatabaseUnavailableError, LlmstoreError

from . import commands, prices
from .commands import (
    EXIT_DRIFT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TAMPERED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)

__all__ = [
    "EXIT_DRIFT",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_TAMPERED",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "main",
]


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="database URL (default: DATABASE_URL, DATABASE_PATH)")
    common.add_argument(
        "--env", choices=("dev", "test", "prod"), help="environment (default: LLMSTORE_ENV)"
    )
    common.add_argument("--verbose", "-v", action="store_true", help="log and show tracebacks")

    parser = argparse.ArgumentParser(
        prog="python -m llmstore",
        description="Manage an llmstore database.",
        epilog="exit codes: 0 ok, 1 failed, 2 usage or configuration error, "
        "3 schema differs from the models (check), 4 database unreachable, "
        "5 audit chain broken (audit verify) or balances disagree with the ledger (verify)",
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, handler: Callable[[argparse.Namespace], int], text: str
    ) -> argparse.ArgumentParser:
        sub = subcommands.add_parser(name, parents=[common], help=text, description=text)
        sub.set_defaults(handler=handler)
        return sub

    sub = add("upgrade", commands.upgrade, "upgrade the schema (default: to head)")
    sub.add_argument("revision", nargs="?", default="head")
    sub.add_argument("--sql", action="store_true", help="print the SQL instead of running it")
    no_backup = "do not back the database up first (by default it is, once there is work to do)"
    sub.add_argument("--no-backup", action="store_true", help=no_backup)
    sub = add("downgrade", commands.downgrade, "downgrade the schema to REVISION (base: empty)")
    sub.add_argument("revision")
    sub.add_argument("--sql", action="store_true", help="print the SQL (REVISION as FROM:TO)")
    sub.add_argument("--no-backup", action="store_true", help=no_backup)
    sub.add_argument("--yes", action="store_true", help="confirm a downgrade in LLMSTORE_ENV=prod")
    sub = add("backup", commands.backup, "back the database up (SQLite backup API, or pg_dump)")
    sub.add_argument(
        "--out",
        metavar="PATH",
        help="write the backup to PATH, a new file (default: a timestamped file in the "
        "backups folder, keeping the newest LLMSTORE_BACKUP_KEEP)",
    )
    sub = add(
        "restore",
        commands.restore,
        "replace the database's contents with a backup, after backing the database up",
    )
    sub.add_argument("file", metavar="FILE", help="a backup made by `backup`, upgrade or downgrade")
    sub.add_argument("--yes", action="store_true", help="confirm a restore in LLMSTORE_ENV=prod")
    add("current", commands.current, "print the database's schema revision")
    add("history", commands.history, "list the schema revisions this llmstore knows")
    add(
        "check",
        commands.check,
        "compare the database schema with the models (exit 3 if they differ)",
    )
    add(
        "create-db",
        commands.create_db,
        "create the database (Postgres) or file (SQLite) if missing",
    )
    add("info", commands.info, "print driver, URL (password masked), revision and row counts")
    add(
        "generate-key",
        commands.generate_encryption_key,
        "print a new key for LLMSTORE_ENCRYPTION_KEYS",
    )
    sub = add(
        "rotate-keys",
        commands.rotate_keys,
        "re-encrypt every stored secret under the first key of LLMSTORE_ENCRYPTION_KEYS",
    )
    _batch_size_option(sub, 500, "values")
    add(
        "verify",
        commands.verify_ledger,
        "check every API key against the ledger and its holds (exit 5 on any mismatch)",
    )
    audit = subcommands.add_parser(
        "audit", help="audit log commands", description="audit log commands"
    )
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    text = "recompute the audit hash chain (exit 5 if an event was altered or removed)"
    verify = audit_commands.add_parser("verify", parents=[common], help=text, description=text)
    verify.set_defaults(handler=commands.audit_verify)
    receipts = subcommands.add_parser(
        "receipts", help="usage receipt keys", description="usage receipt keys"
    )
    receipt_commands = receipts.add_subparsers(
        dest="receipts_command", required=True, metavar="COMMAND"
    )
    # Neither command touches the database: no --url, --env or --verbose.
    text = "print a new Ed25519 private key for LLMSTORE_RECEIPT_SIGNING_KEY"
    sub = receipt_commands.add_parser("generate-key", help=text, description=text)
    sub.set_defaults(handler=commands.receipts_generate_key, verbose=False)
    text = (
        "print the public key of LLMSTORE_RECEIPT_SIGNING_KEY, which customers use to "
        "verify receipts (exit 2 if no key is set)"
    )
    sub = receipt_commands.add_parser("public-key", help=text, description=text)
    sub.set_defaults(handler=commands.receipts_public_key, verbose=False)
    usage = subcommands.add_parser(
        "usage", help="usage log commands", description="usage log commands"
    )
    usage_commands = usage.add_subparsers(dest="usage_command", required=True, metavar="COMMAND")
    text = "delete usage rows older than a duration, in short batches (optionally exported first)"
    purge = usage_commands.add_parser("purge", parents=[common], help=text, description=text)
    purge.add_argument(
        "--older-than",
        type=commands.duration,
        required=True,
        metavar="AGE",
        help="delete rows created more than AGE ago: a number and m, h, d or w (90d, 12h)",
    )
    purge.add_argument(
        "--export",
        metavar="FILE",
        help="first write the rows to FILE, a new .jsonl or .csv file (never overwritten)",
    )
    _batch_size_option(purge, 10_000, "rows")
    purge.set_defaults(handler=commands.usage_purge)
    prices.add_commands(subcommands, common)
    return parser


def _batch_size_option(sub: argparse.ArgumentParser, default: int, what: str) -> None:
    sub.add_argument(
        "--batch-size",
        type=commands.batch_size,
        default=default,
        metavar="N",
        help=f"{what} per transaction (default: {default})",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print("llmstore: interrupted", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:
        if args.verbose:
            traceback.print_exc()
        error = exc if isinstance(exc, LlmstoreError) else None
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"llmstore: error: {message}", file=sys.stderr)
        if isinstance(error, ConfigError):
            return EXIT_USAGE
        if isinstance(error, DatabaseUnavailableError):
            return EXIT_UNREACHABLE
        return EXIT_FAILED
