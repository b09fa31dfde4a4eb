"""Migration scripts for tests: llmstore's own, plus revisions written by the test."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from llmstore.migrations import _schema as _migration_schema


@contextlib.contextmanager
def scripts_with(tmp_path: Path, revisions: dict[str, str]) -> Iterator[Path]:
    """Point llmstore at a copy of its scripts plus ``revisions`` (file stem: source)."""
    location = tmp_path / "scripts"
    shutil.copytree(_migration_schema.script_location(), location)
    for stem, source in revisions.items():
        (location / "versions" / f"{stem}.py").write_text(source)
    original = _migration_schema.script_location
    _migration_schema.scripts.cache_clear()
    _migration_schema.script_location = lambda: location
    try:
        yield location
    finally:
        _migration_schema.script_location = original
        _migration_schema.scripts.cache_clear()
