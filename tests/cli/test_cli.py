"""``python -m llmstore`` on both drivers: commands, one-line errors, exit codes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from llmstore import StoreConfig
from llmstore._cli.main import EXIT_DRIFT, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, main
from llmstore.migrations._commands import head_revision
from tests.helpers import require_postgres, run_llmstore


def _url_args(config: StoreConfig) -> list[str]:
    return ["--url", config.url.get_secret_value()]


def test_upgrade_current_check_info_downgrade(
    schema_env: StoreConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _url_args(schema_env)
    assert main(["current", *args]) == EXIT_OK
    assert capsys.readouterr().out.startswith("none")
    assert main(["upgrade", *args]) == EXIT_OK
    assert f"upgraded from empty to {head_revision()}" in capsys.readouterr().out
    assert main(["upgrade", *args]) == EXIT_OK
    assert "already at" in capsys.readouterr().out
    assert main(["current", *args]) == EXIT_OK
    assert capsys.readouterr().out.strip() == f"{head_revision()} (head)"
    assert main(["check", *args]) == EXIT_OK
    assert "matches" in capsys.readouterr().out
    assert main(["info", *args]) == EXIT_OK
    info = capsys.readouterr().out
    assert f"driver: {schema_env.driver}" in info
    assert "rows in llmstore_projects: 0" in info
    assert main(["downgrade", "base", *args]) == EXIT_OK
    assert "downgraded" in capsys.readouterr().out
    assert main(["check", *args]) == EXIT_DRIFT
    assert "add_table: llmstore_projects" in capsys.readouterr().out


def test_history_lists_the_head(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["history"]) == EXIT_OK
    assert f"{head_revision()} (head)" in capsys.readouterr().out


def test_generate_key_prints_a_usable_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate-key"]) == EXIT_OK
    key = capsys.readouterr().out.strip()
    assert StoreConfig.from_url("sqlite://", encryption_keys=key).encryption_keys


def test_create_db_sqlite_makes_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "nested" / "new.db"
    assert main(["create-db", "--url", f"sqlite:///{path}"]) == EXIT_OK
    assert path.exists()
    assert "created" in capsys.readouterr().out
    assert main(["create-db", "--url", f"sqlite:///{path}"]) == EXIT_OK
    assert "already exists" in capsys.readouterr().out


@pytest.mark.postgres
def test_create_db_postgres_creates_once(capsys: pytest.CaptureFixture[str]) -> None:
    base = StoreConfig.from_url(require_postgres())
    name = f"llmstore_cli_{uuid.uuid4().hex[:8]}"
    url = sa.make_url(base.url.get_secret_value()).set(database=name)
    text = url.render_as_string(hide_password=False)
    try:
        assert main(["create-db", "--url", text]) == EXIT_OK
        assert "created" in capsys.readouterr().out
        assert main(["create-db", "--url", text]) == EXIT_OK
        assert "already exists" in capsys.readouterr().out
        assert main(["upgrade", "--url", text]) == EXIT_OK
    finally:
        asyncio.run(_drop_database(base, name))


async def _drop_database(base: StoreConfig, name: str) -> None:
    engine = create_async_engine(base.url.get_secret_value(), isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await engine.dispose()


def test_errors_are_one_line_with_exit_codes(tmp_path: Path) -> None:
    bad = run_llmstore("current", "--url", "mysql://root:hunter2@localhost/db")
    assert bad.returncode == EXIT_USAGE
    assert bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("llmstore: error:")
    assert "hunter2" not in bad.stderr
    assert "Traceback" not in bad.stderr

    unreachable = run_llmstore("current", "--url", "postgresql://u:hunter2@127.0.0.1:1/db")
    assert unreachable.returncode == EXIT_UNREACHABLE
    assert unreachable.stderr.count("\n") == 1
    assert "hunter2" not in unreachable.stderr

    verbose = run_llmstore("current", "--verbose", "--url", "postgresql://u:hunter2@127.0.0.1:1/db")
    assert verbose.returncode == EXIT_UNREACHABLE
    assert "Traceback" in verbose.stderr


@pytest.mark.postgres
@pytest.mark.parametrize("command", [["current"], ["backup"], ["restore", "x.backup"], ["check"]])
def test_an_unreachable_server_and_refused_credentials_have_their_exit_codes(
    command: list[str], tmp_path: Path
) -> None:
    (tmp_path / "x.backup").write_bytes(b"not read: the server is checked first")
    url = sa.make_url(StoreConfig.from_url(require_postgres()).url.get_secret_value())
    down = url.set(port=1).render_as_string(hide_password=False)
    unknown_role = url.set(username=f"nobody_{uuid.uuid4().hex[:8]}")
    cases = [
        (down, EXIT_UNREACHABLE, "cannot reach the database"),
        (unknown_role.render_as_string(hide_password=False), EXIT_USAGE, "credentials"),
    ]
    for target, code, message in cases:
        result = run_llmstore(*command, "--url", target, cwd=tmp_path)
        assert result.returncode == code, result.stderr
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "backups").exists()


def test_prod_refuses_defaults(tmp_path: Path) -> None:
    env = {"LLMSTORE_ENV": "", "DATABASE_URL": "", "DATABASE_PATH": ""}
    result = run_llmstore("upgrade", "--env", "prod", env=env, cwd=tmp_path)
    assert result.returncode == EXIT_USAGE
    assert "prod" in result.stderr
    assert not (tmp_path / "data").exists()


def test_upgrade_on_the_default_sqlite_file(tmp_path: Path) -> None:
    env = {"LLMSTORE_ENV": "", "DATABASE_URL": "", "DATABASE_PATH": "", "DB_DRIVER": ""}
    result = run_llmstore("upgrade", env=env, cwd=tmp_path)
    assert result.returncode == EXIT_OK, result.stderr
    assert (tmp_path / "data" / "llmstore.db").exists()


def test_plain_alembic_command_line_works_from_the_repository(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    path = tmp_path / "alembic.db"
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{path}"}
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (
        run_llmstore("current", "--url", f"sqlite:///{path}").stdout.strip()
        == f"{head_revision()} (head)"
    )
