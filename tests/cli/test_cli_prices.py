"""``python -m llmstore prices import|list|set`` on both drivers: each a call of
``store.prices``, one line per error, documented exit codes."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import pytest

from llmstore import Store, StoreConfig
from llmstore._cli.main import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main


def _args(config: StoreConfig) -> list[str]:
    return ["--url", config.url.get_secret_value()]


def test_set_list_and_import(schema_env: StoreConfig, capsys: pytest.CaptureFixture[str]) -> None:
    url = _args(schema_env)
    assert main(["upgrade", *url]) == EXIT_OK
    capsys.readouterr()
    command = ["prices", "set", "openai", "gpt-4o", "--input", "2.50", "--output", "10"]
    extra = ["--cached-input", "1.25", "--tier", "200000:input=5,output=20", "--json", *url]
    assert main([*command, *extra]) == EXIT_OK
    price = json.loads(capsys.readouterr().out)
    assert (price["input"], price["cached_input"], price["valid_from"]) == ("2.5", "1.25", None)
    assert price["tiers"] == [
        {
            "above": 200_000,
            "input": "5",
            "output": "20",
            **dict.fromkeys(
                ("cached_input", "cache_write", "reasoning", "audio_input", "audio_output")
            ),
        }
    ]
    dated = ["--valid-from", "2026-01-01T00:00:00+00:00", *url]
    assert (
        main(["prices", "set", "openai", "gpt-4o", "--input", "3", "--output", "12", *dated]) == 0
    )
    assert "set openai/gpt-4o (from 2026-01-01T00:00:00Z, manual): input=3" in (
        capsys.readouterr().out
    )
    assert main(["prices", "import", "--units-per-usd", "1000000", *url]) == EXIT_OK
    line = capsys.readouterr().out
    assert "imported genai-prices:" in line and "1 model(s) kept as set by hand" in line
    assert main(["prices", "list", "--provider", "openai", "--model", "gpt-4o", *url]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed == [
        "openai/gpt-4o (undated, manual): input=2.5 output=10 cached_input=1.25 tiers=1",
        "openai/gpt-4o (from 2026-01-01T00:00:00Z, manual): input=3 output=12",
    ]
    assert main(["prices", "list", "--source", "genai-prices", "--json", *url]) == EXIT_OK
    imported = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(imported) > 1000 and {p["source"] for p in imported} == {"genai-prices"}


async def _stored(config: StoreConfig) -> list[Decimal]:
    async with Store(config) as store:
        return [price.input for price in await store.prices.list()]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--input", "0.1x", "--output", "1"], "expected a decimal number"),
        (["--input", "1", "--output", "1", "--tier", "x"], "ABOVE:NAME=PRICE"),
        (["--input", "1", "--output", "1", "--valid-from", "May"], "ISO 8601"),
        (["--input", "1"], "--output"),
    ],
)
def test_unparsable_prices_are_usage_errors(
    capsys: pytest.CaptureFixture[str], arguments: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["prices", "set", "p", "m", *arguments])
    assert raised.value.code == EXIT_USAGE
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--input", "-1", "--output", "1"], "at least 0"),
        (["--input", "1", "--output", "1", "--valid-from", "2026-01-01"], "timezone-aware"),
        (["--input", "1", "--output", "1", "--tier", "5:inptu=1"], "unknown field"),
        (["--input", "1", "--output", "1" + "0" * 40], "digits"),
    ],
)
def test_refused_prices_are_one_line_and_write_nothing(
    schema_env: StoreConfig,
    capsys: pytest.CaptureFixture[str],
    arguments: list[str],
    message: str,
) -> None:
    url = _args(schema_env)
    assert main(["upgrade", *url]) == EXIT_OK
    capsys.readouterr()
    assert main(["prices", "set", "p", "m", *arguments, *url]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert err.startswith("llmstore: error: ") and message in err
    assert len(err.splitlines()) == 1
    assert asyncio.run(_stored(schema_env)) == []
