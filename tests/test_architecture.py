"""The import rules of llmstore's layers (ARCHITECTURE.md), read from the source.

* ``_core`` imports nothing else of llmstore (an import only for type checking is allowed:
  it creates no dependency when the code runs);
* ``_db`` imports only ``_core``;
* a domain (``_access``, ``_admission``, ``_billing``, ``_prices``, ``_usage``) imports
  ``_core``, ``_db``, its own modules and another domain's package, never another
  domain's modules; never a driver
  (``sqlite3``, ``asyncpg``) nor a concrete runner; never ``_ops``, ``_cli``, ``_store`` or
  ``migrations``, which sit above it;
* nothing but the package's ``__init__`` and ``__main__`` imports the command line;
* nothing above ``_db`` asks which database it is on (no ``"postgresql"`` or ``"sqlite"``
  compared, no ``dialect.name``): a domain asks its runner's capabilities or calls
  ``_db``; operations and migrations ask ``llmstore._db.traits`` (``_core.config``, which
  reads the driver from a URL, and the revisions, never edited once landed, are exempt);
* the benchmarks (``benchmarks/``) use llmstore's public API: no private module of
  llmstore's (``llmstore._x``), but for ``benchmarks.raw_schema``'s ``llmstore._db.schema``
  (its ``MetaData``, which llmstore does not expose).

Each rule is also shown to fail on a module that breaks it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llmstore"
BENCHMARKS = PACKAGE.parent / "benchmarks"
#: (benchmark module, private module of llmstore's) pairs allowed: the raw tables are
#: generated from llmstore's MetaData, which no public module exposes.
BENCHMARK_PRIVATE_IMPORTS = {("benchmarks.raw_schema", "llmstore._db.schema")}
DOMAINS = ("_access", "_admission", "_billing", "_prices", "_usage")
DRIVERS = ("sqlite3", "asyncpg", "aiosqlite", "psycopg", "psycopg2")
CONCRETE_RUNNERS = ("SQLiteRunner", "AsyncEngineRunner", "PostgresLane")


@dataclass(frozen=True)
class Import:
    module: str  # absolute, e.g. "llmstore._db.runner"
    names: tuple[str, ...]
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, source: str, *, is_package: bool = False) -> list[Import]:
    """Every import the module runs, with relative ones made absolute."""
    package = name if is_package else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and _type_checking_only(node):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                found.extend(Import(alias.name, (), node.lineno) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")
                    parent = parent[: len(parent) - node.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                names = tuple(alias.name for alias in node.names)
                if node.module is None:  # from . import x: each x is a module
                    found.extend(Import(f"{base}.{n}", (), node.lineno) for n in names)
                else:
                    found.append(Import(base, names, node.lineno))
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list) and inner and isinstance(inner[0], ast.stmt):
                    visit(inner)
                elif isinstance(inner, list):
                    for handler in inner:
                        if isinstance(handler, ast.ExceptHandler):
                            visit(handler.body)

    visit(ast.parse(source).body)
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "llmstore" else ""


def violations(name: str, source: str, *, is_package: bool = False) -> list[str]:
    """The rules ``name`` (a module of llmstore with this source) breaks, one line each."""
    layer = _layer(name)
    broken: list[str] = []
    for imp in imports_of(name, source, is_package=is_package):
        target = imp.module
        top = target.split(".")[0]
        inner = _layer(target) if top == "llmstore" else None
        where = f"{name}:{imp.line} imports {target}"
        if layer == "_core" and top == "llmstore" and inner != "_core":
            broken.append(f"{where}: _core imports nothing else of llmstore")
        if layer == "_db" and top == "llmstore" and inner not in ("_core", "_db"):
            broken.append(f"{where}: _db imports only _core")
        if layer in DOMAINS:
            if top in DRIVERS:
                broken.append(f"{where}: a domain never imports a driver")
            other = top == "llmstore" and inner in DOMAINS and inner != layer
            if other and target != f"llmstore.{inner}":
                broken.append(f"{where}: another domain's internals (import its package)")
            if top == "llmstore" and inner in ("_ops", "_cli", "_store", "migrations", ""):
                broken.append(f"{where}: a domain never imports a layer above it")
            concrete = set(imp.names) & set(CONCRETE_RUNNERS)
            if concrete:
                broken.append(f"{where}: a domain never uses a concrete runner ({concrete})")
        if inner == "_cli" and layer not in ("_cli", "__main__"):
            broken.append(f"{where}: only the entry points import the command line")
    return broken


DIALECT_NAMES = ("postgresql", "sqlite")


#: Where a database's name may be read: the driver layer, and the config that reads it
#: from a URL.
DIALECT_NAMES_ALLOWED = ("_db", "_core")


def dialect_checks(name: str, source: str) -> list[str]:
    """Where a module above the driver layer asks which database it is on."""
    if _layer(name) in DIALECT_NAMES_ALLOWED:
        return []
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(isinstance(o, ast.Constant) and o.value in DIALECT_NAMES for o in operands):
                found.append(f"{name}:{node.lineno} compares a dialect name")
        elif isinstance(node, ast.Attribute) and node.attr == "name":
            value = node.value
            if isinstance(value, ast.Attribute) and value.attr == "dialect":
                found.append(f"{name}:{node.lineno} reads dialect.name")
        elif isinstance(node, ast.Call) and any(
            isinstance(a, ast.Constant) and a.value in DIALECT_NAMES for a in node.args
        ):
            found.append(f"{name}:{node.lineno} names a dialect")
    return found


def package_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "scripts" not in p.parts)


def test_every_module_keeps_the_import_rules() -> None:
    broken = [
        line
        for path in package_modules()
        for line in violations(
            module_name(path), path.read_text(), is_package=path.name == "__init__.py"
        )
    ]
    assert broken == []


def test_nothing_above_the_drivers_asks_which_database_it_is_on() -> None:
    # The migration environment too; the revisions are never edited once landed.
    environment = PACKAGE / "migrations" / "scripts" / "env.py"
    found = [
        line
        for path in [*package_modules(), environment]
        for line in dialect_checks(module_name(path), path.read_text())
    ]
    assert found == []


@pytest.mark.parametrize(
    "source",
    [
        'if conn.dialect.name == "postgresql":\n    pass\n',
        'postgres = runner.driver != "sqlite"\n',
        'x = "sqlite" in names\n',
        "@compiles(Thing, 'sqlite')\ndef f(): ...\n",
    ],
)
def test_a_dialect_check_above_the_drivers_is_reported(source: str) -> None:
    for name in ("llmstore._usage.writer", "llmstore.migrations._commands", "llmstore._ops.backup"):
        assert dialect_checks(name, source) != []
    assert dialect_checks("llmstore._db.dialects", source) == []


def test_the_rules_see_every_module() -> None:
    names = {module_name(path) for path in package_modules()}
    for layer in ("_core", "_db", *DOMAINS, "_ops", "_cli", "migrations"):
        assert any(_layer(name) == layer and name != f"llmstore.{layer}" for name in names)


@pytest.mark.parametrize(
    ("name", "source", "rule"),
    [
        ("llmstore._core.ids", "from llmstore._db.schema import metadata", "_core imports"),
        ("llmstore._core.ids", "from .._usage import records", "_core imports"),
        ("llmstore._db.runner", "from llmstore._access.projects import Project", "_db imports"),
        ("llmstore._db.runner", "import llmstore._billing", "_db imports"),
        ("llmstore._access.tokens", "import sqlite3", "driver"),
        ("llmstore._usage.writer", "def f():\n    import asyncpg\n", "driver"),
        ("llmstore._billing.keys", "from llmstore._usage.records import X", "internals"),
        ("llmstore._billing.keys", "from .._usage.records import X", "internals"),
        ("llmstore._billing.keys", "from llmstore._db.runner import SQLiteRunner", "concrete"),
        ("llmstore._usage.usage", "from llmstore._ops.backup import x", "above"),
        ("llmstore._usage.usage", "from llmstore import _store", "above"),
        ("llmstore._ops.backup", "from llmstore._cli.main import main", "command line"),
    ],
)
def test_a_broken_rule_is_reported(name: str, source: str, rule: str) -> None:
    broken = violations(name, source)
    assert len(broken) == 1
    assert rule in broken[0]


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("llmstore._core.errors", "if TYPE_CHECKING:\n    from llmstore._usage import X\n"),
        ("llmstore._core.config", "from .signing import load_signing_key"),
        ("llmstore._db.runner", "from llmstore._core.errors import LlmstoreError"),
        ("llmstore._billing.keys", "from llmstore._access import Audit"),
        ("llmstore._billing.keys", "from .ledger import entry_values"),
        ("llmstore._usage.usage", "from llmstore._db.runner import Runner"),
    ],
)
def test_an_allowed_import_is_not_reported(name: str, source: str) -> None:
    assert violations(name, source) == []


def benchmark_violations(name: str, source: str) -> list[str]:
    """Where the benchmark module ``name`` imports a private module of llmstore's."""
    broken: list[str] = []
    for imp in imports_of(name, source):
        if imp.module.split(".")[0] != "llmstore":
            continue
        private = [part for part in imp.module.split(".") if part.startswith("_")]
        private += [f"{imp.module}.{n}" for n in imp.names if n.startswith("_")]
        allowed = (name, imp.module) in BENCHMARK_PRIVATE_IMPORTS
        if private and not allowed:
            broken.append(f"{name}:{imp.line} imports {imp.module}: use llmstore's public API")
    return broken


def test_the_benchmarks_use_the_public_api() -> None:
    paths = sorted(BENCHMARKS.glob("*.py"))
    assert paths
    broken = [
        line for path in paths for line in benchmark_violations(module_name(path), path.read_text())
    ]
    assert broken == []


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("benchmarks.run", "from llmstore._core.ids import new_id"),
        ("benchmarks.ops_usage", "from llmstore._db.schema import usage_logs"),
        ("benchmarks.raw_schema", "from llmstore.migrations._commands import upgrade"),
        ("benchmarks.common", "from llmstore import _store"),
        ("benchmarks.common", "import llmstore._billing.ledger"),
    ],
)
def test_a_private_import_in_the_benchmarks_is_reported(name: str, source: str) -> None:
    assert len(benchmark_violations(name, source)) == 1


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("benchmarks.raw_schema", "from llmstore._db.schema import metadata"),
        ("benchmarks.databases", "from llmstore.migrations import upgrade"),
        ("benchmarks.ops_usage", "from llmstore import UsageRecord"),
        ("benchmarks.common", "from llmstore.pytest_plugin import run_sql"),
        ("benchmarks.common", "import sqlalchemy._private"),
    ],
)
def test_a_public_import_in_the_benchmarks_is_not_reported(name: str, source: str) -> None:
    assert benchmark_violations(name, source) == []
