"""The built wheel carries the migration scripts: `upgrade` works outside the repository."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_ships_migrations_and_upgrades_from_any_directory(tmp_path: Path) -> None:
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("llmstore-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    assert "llmstore/migrations/scripts/env.py" in names
    assert "llmstore/py.typed" in names
    scripts = "llmstore/migrations/scripts"
    revisions = {p.name for p in (ROOT / scripts / "versions").glob("*.py")}
    assert {f"{scripts}/versions/{name}" for name in revisions} <= names

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "DATABASE_PATH": "app.db"}
    env.pop("DATABASE_URL", None)
    env.pop("LLMSTORE_ENV", None)
    where = subprocess.run(
        [sys.executable, "-c", "import llmstore; print(llmstore.__file__)"],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
        timeout=60,
    )
    assert where.stdout.startswith(str(tmp_path / "site"))
    upgrade = subprocess.run(
        [sys.executable, "-m", "llmstore", "upgrade"],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
        timeout=120,
    )
    assert upgrade.returncode == 0, upgrade.stderr
    assert "upgraded from empty" in upgrade.stdout
    assert (elsewhere / "app.db").exists()
