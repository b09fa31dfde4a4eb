"""The public API: an explicit, sorted ``__all__``; private modules; one error hierarchy."""

from __future__ import annotations

import builtins
import importlib
import pkgutil
import subprocess
import sys
import types
from typing import Any

import pytest

import llmstore
import llmstore.migrations


def test_all_is_sorted_and_complete() -> None:
    assert llmstore.__all__ == sorted(llmstore.__all__)
    assert len(set(llmstore.__all__)) == len(llmstore.__all__)
    for name in llmstore.__all__:
        assert hasattr(llmstore, name), name
    public = {
        name
        for name, value in vars(llmstore).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(llmstore.__all__)


PUBLIC_MODULES = {"extract", "migrations", "pytest_plugin"}


def test_modules_are_private_except_the_public_ones() -> None:
    modules = {info.name for info in pkgutil.iter_modules(llmstore.__path__)}
    assert {name for name in modules if not name.startswith("_")} == PUBLIC_MODULES
    for name in modules:
        importlib.import_module(f"llmstore.{name}") if name != "__main__" else None
    inner = {info.name for info in pkgutil.iter_modules(llmstore.migrations.__path__)}
    assert {name for name in inner if not name.startswith("_")} == {"ops"}


@pytest.mark.parametrize(
    "name", ["llmstore.extract", "llmstore.migrations", "llmstore.migrations.ops"]
)
def test_public_submodules_have_a_sorted_complete_all(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__all__ == sorted(module.__all__)
    for exported in module.__all__:
        assert hasattr(module, exported), exported
    defined = {
        attribute
        for attribute, value in vars(module).items()
        if not attribute.startswith("_")
        and getattr(value, "__module__", None) == module.__name__
        and not isinstance(value, types.ModuleType)
    }
    assert defined <= set(module.__all__)


def test_errors_share_one_base_and_shadow_no_builtin() -> None:
    errors = [getattr(llmstore, n) for n in llmstore.__all__ if n.endswith("Error")]
    assert {
        "ConfigError",
        "NotFoundError",
        "ConflictError",
        "SchemaOutOfDateError",
        "ValidationError",
        "LlmstoreError",
    } <= {e.__name__ for e in errors}
    for error in errors:
        assert issubclass(error, llmstore.LlmstoreError)
    assert not set(llmstore.__all__) & set(dir(builtins))


def test_package_is_typed() -> None:
    assert importlib.resources.files("llmstore").joinpath("py.typed").is_file()


async def test_plugin_memory_store_fixture(llmstore_memory_store: llmstore.Store) -> None:
    project = await llmstore_memory_store.projects.create("from the plugin", api_key="sk-x")
    assert await llmstore_memory_store.projects.reveal_api_key(project.id) == "sk-x"
    assert llmstore_memory_store.driver == "sqlite"


async def test_plugin_postgres_factory_fixture(llmstore_postgres_factory: Any) -> None:
    first = await llmstore_postgres_factory()
    second = await llmstore_postgres_factory()
    await first.projects.create("isolated")
    assert await second.projects.list() == []
    assert first.driver == "postgresql"
    assert first.config.schema_name != second.config.schema_name


def test_importing_llmstore_pulls_in_no_web_framework() -> None:
    # FastAPI and httpx are for the example and the tests only (the dev extra).
    code = (
        "import sys, llmstore, llmstore.extract, llmstore.migrations, llmstore.migrations.ops; "
        "import llmstore._cli.main, llmstore._ops.backup, llmstore._ops.restore; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'fastapi', 'starlette', 'httpx', 'anyio'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"
