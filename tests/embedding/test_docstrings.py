"""Every public class and method of llmstore has a docstring (the API reference is made
of them), and an error prints under the name users import it by."""

from __future__ import annotations

import inspect

import pytest

import llmstore
import llmstore.extract
import llmstore.migrations
import llmstore.migrations.ops

MODULES = [llmstore, llmstore.extract, llmstore.migrations, llmstore.migrations.ops]


def _public_objects() -> list[tuple[str, object]]:
    found: list[tuple[str, object]] = []
    for module in MODULES:
        for name in module.__all__:
            value = getattr(module, name)
            if inspect.isclass(value) or inspect.isfunction(value):
                found.append((f"{module.__name__}.{name}", value))
    return found


def _members(cls: type) -> list[tuple[str, object]]:
    """The public methods and properties ``cls`` itself defines (not pydantic's)."""
    found: list[tuple[str, object]] = []
    for klass in cls.__mro__:
        if not klass.__module__.startswith("llmstore"):
            continue
        for name, value in vars(klass).items():
            if name.startswith("_"):
                continue
            if inspect.isfunction(value) or isinstance(value, property):
                found.append((name, value))
            elif hasattr(value, "__get__") and getattr(value, "body", None) is not None:
                found.append((name, value))  # an operation (@reads / @writes)
    return found


def test_every_public_class_function_and_method_has_a_docstring() -> None:
    missing = []
    for qualified, value in _public_objects():
        if not (value.__doc__ or "").strip():
            missing.append(qualified)
        if inspect.isclass(value):
            for name, member in _members(value):
                if not (member.__doc__ or "").strip():
                    missing.append(f"{qualified}.{name}")
    assert sorted(set(missing)) == []


@pytest.mark.parametrize(
    "error",
    [
        value
        for _, value in _public_objects()
        if inspect.isclass(value) and issubclass(value, llmstore.LlmstoreError)
    ],
)
def test_errors_print_under_their_public_name(error: type[llmstore.LlmstoreError]) -> None:
    assert f"{error.__module__}.{error.__qualname__}" == f"llmstore.{error.__name__}"
    assert getattr(llmstore, error.__name__) is error
