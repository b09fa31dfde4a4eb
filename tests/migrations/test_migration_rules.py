"""Rules for revisions that touch tables which may be large (see ``llmstore.migrations._ops``),
checked on every revision script. What the rules call for is run on both drivers in
``test_migration_rules_run.py``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from llmstore.migrations import _commands as _migrations

# They landed before the rules: they create tables and index only the tables they create,
# and migrations are never edited. Every migration command still runs them under the
# default lock timeout (``migration_session``). This set never grows.
GRANDFATHERED = {
    "0001_projects",
    "0002_tokens_audit_providers",
    "0003_api_keys_ledger",
    "0004_usage_logs_receipts",
}
_CONCURRENT = {"create_index_concurrently", "drop_index_concurrently"}


def _name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _literal(node: ast.expr | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _table_argument(call: ast.Call, position: int, keyword: str) -> str | None:
    for item in call.keywords:
        if item.arg == keyword:
            return _literal(item.value)
    return _literal(call.args[position]) if len(call.args) > position else None


def _check_function(function: ast.FunctionDef, where: str) -> list[str]:
    body = function.body
    if body and isinstance(body[0], ast.Expr) and _literal(body[0].value) is not None:
        body = body[1:]  # the docstring
    first = body[0] if body else None
    problems = []
    if not (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Call)
        and _name(first.value) == "set_lock_timeout"
    ):
        problems.append(f"{where} must begin with set_lock_timeout()")
    calls = [node for node in ast.walk(function) if isinstance(node, ast.Call)]
    created = {_literal(c.args[0]) for c in calls if _name(c) == "create_table" and c.args}
    dropped = {_literal(c.args[0]) for c in calls if _name(c) == "drop_table" and c.args}
    for call in calls:
        name = _name(call)
        if any(item.arg == "postgresql_concurrently" for item in call.keywords):
            problems.append(f"{where}: use create_index_concurrently or drop_index_concurrently")
        if name == "autocommit_block":
            problems.append(f"{where}: autocommit_block only through llmstore.migrations.ops")
        if name == "create_index" and _table_argument(call, 1, "table_name") not in created:
            problems.append(f"{where}: an index on an existing table: create_index_concurrently")
        if name == "drop_index" and _table_argument(call, 1, "table_name") not in dropped:
            problems.append(f"{where}: an index of a table kept: drop_index_concurrently")
    if any(_name(call) in _CONCURRENT for call in calls):
        others = {_name(c) for c in calls} - _CONCURRENT - {"set_lock_timeout"}
        if others:
            problems.append(
                f"{where}: a concurrent index build commits what came before it, so its "
                f"revision does nothing else (also calls {', '.join(sorted(others))})"
            )
    return problems


def rule_violations(source: str, revision: str) -> list[str]:
    """What a revision script does against the rules; empty when it follows them."""
    tree = ast.parse(source)
    functions = {
        node.name: node
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name in ("upgrade", "downgrade")
    }
    problems = [
        f"{revision} has no {name}()" for name in ("upgrade", "downgrade") if name not in functions
    ]
    for name, function in functions.items():
        problems += _check_function(function, f"{revision} {name}()")
    return problems


def _scripts() -> dict[str, Path]:
    folder = _migrations.script_location() / "versions"
    return {path.stem: path for path in sorted(folder.glob("*.py"))}


def test_every_new_revision_follows_the_rules() -> None:
    scripts = _scripts()
    assert set(scripts) >= GRANDFATHERED, "a grandfathered revision is missing"
    problems = [
        problem
        for stem, path in scripts.items()
        if stem not in GRANDFATHERED
        for problem in rule_violations(path.read_text(), stem)
    ]
    assert problems == []


def test_the_grandfathered_revisions_would_not_pass_so_the_check_reads_them() -> None:
    # A check that found nothing to say about them could be reading nothing at all.
    source = _scripts()["0004_usage_logs_receipts"].read_text()
    assert "0004 upgrade() must begin with set_lock_timeout()" in rule_violations(source, "0004")


_GOOD = '''
from alembic import op
import sqlalchemy as sa
from llmstore.migrations.ops import (
    create_index_concurrently, drop_index_concurrently, set_lock_timeout,
)

def upgrade() -> None:
    """Index usage by status."""
    set_lock_timeout("5s")
    create_index_concurrently("ix_usage_logs_status_code", "llmstore_usage_logs", ["status_code"])

def downgrade() -> None:
    set_lock_timeout()
    drop_index_concurrently("ix_usage_logs_status_code", "llmstore_usage_logs")
'''

_NEW_TABLE = """
def upgrade() -> None:
    set_lock_timeout()
    op.create_table("notes", sa.Column("id", sa.Integer, primary_key=True))
    op.create_index("ix_notes_id", "notes", ["id"])

def downgrade() -> None:
    set_lock_timeout()
    op.drop_index("ix_notes_id", table_name="notes")
    op.drop_table("notes")
"""


@pytest.mark.parametrize("source", [_GOOD, _NEW_TABLE], ids=["concurrent-index", "new-table"])
def test_revisions_that_follow_the_rules_pass(source: str) -> None:
    assert rule_violations(source, "0005") == []


_BAD = {
    "no-lock-timeout": (
        _GOOD.replace('    set_lock_timeout("5s")\n', ""),
        "0005 upgrade() must begin with set_lock_timeout()",
    ),
    "plain-index-on-existing-table": (
        _NEW_TABLE.replace('"ix_notes_id", "notes"', '"ix_usage_model", "llmstore_usage_logs"'),
        "0005 upgrade(): an index on an existing table: create_index_concurrently",
    ),
    "plain-drop-on-kept-table": (
        _GOOD.replace(
            'drop_index_concurrently("ix_usage_logs_status_code", "llmstore_usage_logs")',
            'op.drop_index("ix_usage_logs_status_code", table_name="llmstore_usage_logs")',
        ),
        "0005 downgrade(): an index of a table kept: drop_index_concurrently",
    ),
    "concurrent-by-hand": (
        _GOOD.replace(
            'create_index_concurrently("ix_usage_logs_status_code", "llmstore_usage_logs", '
            '["status_code"])',
            'op.create_index("ix_s", "llmstore_usage_logs", ["status_code"], '
            "postgresql_concurrently=True)",
        ),
        "0005 upgrade(): use create_index_concurrently or drop_index_concurrently",
    ),
    "raw-autocommit-block": (
        _GOOD.replace(
            '    set_lock_timeout("5s")\n',
            '    set_lock_timeout("5s")\n    with op.get_context().autocommit_block():\n'
            '        op.execute("VACUUM llmstore_usage_logs")\n',
        ),
        "0005 upgrade(): autocommit_block only through llmstore.migrations.ops",
    ),
    "concurrent-index-mixed-with-other-work": (
        _GOOD.replace(
            '    create_index_concurrently("ix_usage_logs_status_code"',
            '    op.add_column("llmstore_usage_logs", sa.Column("note", sa.Text()))\n'
            '    create_index_concurrently("ix_usage_logs_status_code"',
        ),
        "0005 upgrade(): a concurrent index build commits what came before it, so its "
        "revision does nothing else (also calls Column, Text, add_column)",
    ),
    "no-downgrade": (
        _GOOD.split("def downgrade")[0],
        "0005 has no downgrade()",
    ),
}


@pytest.mark.parametrize("case", list(_BAD), ids=list(_BAD))
def test_a_revision_that_breaks_a_rule_fails(case: str) -> None:
    source, expected = _BAD[case]
    assert expected in rule_violations(source, "0005")
