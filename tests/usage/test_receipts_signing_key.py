"""The receipts' signing key: its configuration (environment, spellings, malformed keys,
masking), its secrecy (never stored or shown), and the ``receipts`` command line."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from llmstore import ConfigError, NotFoundError, Store, StoreConfig
from llmstore._cli.main import EXIT_OK, EXIT_USAGE, main
from llmstore._usage.receipts import ReceiptSigner, configured_public_key
from tests.helpers import run_llmstore
from tests.usage.receipts_support import KEY_VARIABLE, _every_row_as_text, _private_forms, _record

# --- configuration -------------------------------------------------------------------------


@pytest.fixture
def _no_key_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_VARIABLE, raising=False)


@pytest.mark.usefixtures("_no_key_in_environment")
def test_config_reads_the_key_from_the_environment(signing_key: str, public_key: str) -> None:
    config = StoreConfig.from_env({"DATABASE_URL": "sqlite://", KEY_VARIABLE: signing_key})
    assert config.receipt_signing_key is not None
    assert config.receipt_signing_key.get_secret_value() == signing_key
    assert ReceiptSigner(config.receipt_signing_key).public_key == public_key
    assert StoreConfig.from_env({"DATABASE_URL": "sqlite://"}).receipt_signing_key is None
    blank = StoreConfig.from_env({"DATABASE_URL": "sqlite://", KEY_VARIABLE: "  "})
    assert blank.receipt_signing_key is None
    assert StoreConfig.from_url("sqlite://").receipt_signing_key is None
    overridden = StoreConfig.from_env(
        {"DATABASE_URL": "sqlite://", KEY_VARIABLE: signing_key}, receipt_signing_key=None
    )
    assert overridden.receipt_signing_key is None


def test_from_url_reads_the_environment_unless_given(
    monkeypatch: pytest.MonkeyPatch, signing_key: str
) -> None:
    monkeypatch.setenv(KEY_VARIABLE, signing_key)
    from_env = StoreConfig.from_url("sqlite://").receipt_signing_key
    assert from_env is not None
    assert from_env.get_secret_value() == signing_key
    assert StoreConfig.from_url("sqlite://", receipt_signing_key=None).receipt_signing_key is None


def test_hex_and_base64url_spell_the_same_key(signing_key: str, public_key: str) -> None:
    seed = base64.urlsafe_b64decode(signing_key + "=")
    for spelling in (seed.hex(), seed.hex().upper(), f"  {signing_key}\n"):
        config = StoreConfig.from_url("sqlite://", receipt_signing_key=spelling)
        assert ReceiptSigner(config.receipt_signing_key).public_key == public_key
    assert configured_public_key({KEY_VARIABLE: seed.hex()}) == public_key


@pytest.mark.parametrize(
    "bad",
    [
        "not-a-key",
        "A" * 42,
        "A" * 44,
        "0" * 63,
        "0" * 66,
        "g" * 64,
        # The 32 bytes in standard base64 ("+" and "/"), and with unused bits set.
        base64.b64encode(b"\xfb" * 32).decode(),
        "A" * 42 + "B",
    ],
)
def test_a_malformed_key_is_a_config_error_that_does_not_quote_it(bad: str) -> None:
    with pytest.raises(ConfigError, match=KEY_VARIABLE) as caught:
        StoreConfig.from_url("sqlite://", receipt_signing_key=bad)
    assert bad not in str(caught.value)
    assert "generate-key" in str(caught.value)
    with pytest.raises(ConfigError, match=KEY_VARIABLE) as caught:
        StoreConfig.from_env({"DATABASE_URL": "sqlite://", KEY_VARIABLE: bad})
    assert bad not in str(caught.value)


def test_the_key_is_masked_wherever_the_config_is_shown(signing_key: str) -> None:
    config = StoreConfig.from_url("sqlite://", receipt_signing_key=signing_key)
    signer = ReceiptSigner(config.receipt_signing_key)
    shown = [repr(config), str(config), config.model_dump_json(), repr(signer), str(signer)]
    shown.append(repr(Store(config)))
    forms = _private_forms(signing_key)
    for text in shown:
        for label, form in forms.items():
            if label != "raw":
                assert form.decode() not in text, (label, text)
    assert "receipt_signing_key=SecretStr('**********')" in repr(config)
    assert signer.public_key is not None
    assert signer.public_key in repr(signer)


# --- secrecy of the private key ------------------------------------------------------------


async def test_the_private_key_is_never_stored_or_shown(
    signed: Store, signing_key: str, tmp_path: Path
) -> None:
    usage_id = await _record(signed)
    receipt = await signed.usage.issue_receipt(usage_id)
    with pytest.raises(NotFoundError) as not_found:
        await signed.usage.issue_receipt(987654)
    shown = [
        await _every_row_as_text(signed),
        repr(receipt),
        receipt.model_dump_json(),
        repr(signed),
        repr(signed.config),
        repr(signed.usage.__dict__),
        str(not_found.value),
    ]
    forms = _private_forms(signing_key)
    for text in shown:
        raw = text.encode("utf-8")
        for label, form in forms.items():
            assert form not in raw, f"the private key ({label}) in {text[:80]!r}"
    # Every byte of the database files, on SQLite: the raw seed must not be there either.
    path = signed.config.sqlite_path
    if path is not None and not signed.config.is_memory:
        for file in Path(path).parent.glob(Path(path).name + "*"):
            data = file.read_bytes()
            for label, form in forms.items():
                assert form not in data, f"the private key ({label}) in {file.name}"
        assert receipt.signature.encode() in Path(path).read_bytes() + b"".join(
            file.read_bytes() for file in Path(path).parent.glob(Path(path).name + "-wal")
        )


# --- command line --------------------------------------------------------------------------


def test_cli_generate_key_prints_a_new_usable_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["receipts", "generate-key"]) == EXIT_OK
    first = capsys.readouterr().out
    assert main(["receipts", "generate-key"]) == EXIT_OK
    second = capsys.readouterr().out
    assert first.endswith("\n")
    assert first.count("\n") == 1
    assert len(first.strip()) == 43
    assert first != second
    config = StoreConfig.from_url("sqlite://", receipt_signing_key=first.strip())
    assert ReceiptSigner(config.receipt_signing_key).public_key is not None


def test_cli_public_key_prints_the_configured_public_key(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    signing_key: str,
    public_key: str,
) -> None:
    monkeypatch.setenv(KEY_VARIABLE, signing_key)
    assert main(["receipts", "public-key"]) == EXIT_OK
    captured = capsys.readouterr()
    assert captured.out == public_key + "\n"
    assert signing_key not in captured.out + captured.err


@pytest.mark.parametrize("value", [None, "", "   ", "not-a-key"])
def test_cli_public_key_without_a_usable_key_exits_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv(KEY_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(KEY_VARIABLE, value)
    assert main(["receipts", "public-key"]) == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("llmstore: error:")
    assert captured.err.count("\n") == 1
    assert KEY_VARIABLE in captured.err
    if value and value.strip():
        assert value not in captured.err


def test_cli_receipts_in_a_real_process(signing_key: str, public_key: str) -> None:
    shown = run_llmstore("receipts", "public-key", env={KEY_VARIABLE: signing_key})
    assert shown.returncode == EXIT_OK, shown.stderr
    assert shown.stdout == public_key + "\n"
    missing = run_llmstore("receipts", "public-key", env={KEY_VARIABLE: ""})
    assert missing.returncode == EXIT_USAGE
    assert missing.stdout == ""
    assert missing.stderr.count("\n") == 1
    assert "Traceback" not in missing.stderr
    generated = run_llmstore("receipts", "generate-key")
    assert generated.returncode == EXIT_OK
    assert configured_public_key({KEY_VARIABLE: generated.stdout})
    usage = run_llmstore("receipts")
    assert usage.returncode == EXIT_USAGE
