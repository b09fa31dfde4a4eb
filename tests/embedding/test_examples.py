"""The README's set-up commands and every example run as written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmstore import generate_key

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def _clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "DB_DRIVER"))}
    env.pop("LLMSTORE_ENV", None)
    env.pop("LLMSTORE_ENCRYPTION_KEYS", None)
    env.update(extra)
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_there_are_examples() -> None:
    assert any(path.name == "quickstart.py" for path in EXAMPLES)


@pytest.mark.parametrize("with_key", [False, True])
def test_quickstart_on_the_default_sqlite_file(tmp_path: Path, with_key: bool) -> None:
    # The README: `python -m llmstore upgrade && python examples/quickstart.py`, run twice.
    extra = {"LLMSTORE_ENCRYPTION_KEYS": generate_key()} if with_key else {}
    env = _clean_env(tmp_path, **extra)
    work = tmp_path / "app"
    work.mkdir()
    for attempt in ("created", "found"):
        upgrade = _run([sys.executable, "-m", "llmstore", "upgrade"], work, env)
        assert upgrade.returncode == 0, upgrade.stderr
        result = _run([sys.executable, str(ROOT / "examples" / "quickstart.py")], work, env)
        assert result.returncode == 0, result.stderr
        assert f"{attempt} project quickstart" in result.stdout
        assert f"has upstream key: {with_key}" in result.stdout
    assert (work / "data" / "llmstore.db").exists()


def test_proxy_tokens_example(tmp_path: Path) -> None:
    env = _clean_env(tmp_path)
    result = _run([sys.executable, str(ROOT / "examples" / "proxy_tokens.py")], tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert "200: call openai/gpt-4o-mini, 1 request(s) left" in result.stdout
    assert "429: quota_exhausted (token quota exhausted)" in result.stdout
    assert "401: unknown (invalid token)" in result.stdout
    assert "chain intact: True" in result.stdout
    assert "lst_" in result.stdout  # the display prefix, never the whole secret


@pytest.mark.parametrize("with_key", [False, True])
def test_usage_logging_example(tmp_path: Path, with_key: bool) -> None:
    from llmstore._core.signing import generate_signing_key

    extra = {"LLMSTORE_RECEIPT_SIGNING_KEY": generate_signing_key()} if with_key else {}
    env = _clean_env(tmp_path, **extra)
    upgrade = _run([sys.executable, "-m", "llmstore", "upgrade"], tmp_path, env)
    assert upgrade.returncode == 0, upgrade.stderr
    result = _run([sys.executable, str(ROOT / "examples" / "usage_logging.py")], tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert "written: 250, failed attempts: 0" in result.stdout
    assert (
        sum(
            int(line.split(": ")[1].split()[0])
            for line in result.stdout.splitlines()
            if " requests, " in line
        )
        == 250
    )
    if with_key:
        assert "valid=True" in result.stdout
        assert "with the cost changed: valid=False" in result.stdout
    else:
        assert "skipping the receipt" in result.stdout


def test_admission_example(tmp_path: Path) -> None:
    env = _clean_env(tmp_path)
    result = _run([sys.executable, str(ROOT / "examples" / "admission.py")], tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "alice: 200 charged 150",
        "alice: 200 charged 120",
        "bob: 200 charged 480, crossed [600]",
        "bob: 429 rate limit exceeded, retry after 60 s",
        "bob: 429 budget exceeded, retry after 43140 s",
        "bob: 200 charged 200",
        "project, month of 2026-02-01: spent 200",
        "project, month of 2026-01-01: spent 750",
    ]
