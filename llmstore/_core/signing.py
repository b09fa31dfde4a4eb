"""Ed25519 keys for signed receipts, written as unpadded base64url (43 characters).

Configuration checks a signing key when it is read (``_core.config``), and receipts sign
and verify with it (``_usage.receipts``); both use these helpers.
"""

from __future__ import annotations

import base64
import binascii
import re

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import ConfigError

__all__ = [
    "ENV_VARIABLE",
    "KEY_SIZE",
    "decode",
    "encode",
    "generate_signing_key",
    "load_signing_key",
    "public_key_text",
]

ENV_VARIABLE = "LLMSTORE_RECEIPT_SIGNING_KEY"
KEY_SIZE = 32
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
_KEY_HELP = (
    f"{ENV_VARIABLE} must be an Ed25519 private key: 32 bytes as unpadded base64url "
    "(43 characters) or hex (64 characters); make one with "
    "`python -m llmstore receipts generate-key`"
)


def encode(data: bytes) -> str:
    """``data`` as unpadded base64url."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def decode(text: str, size: int) -> bytes | None:
    """The bytes of canonical unpadded base64url ``text`` if there are ``size``; else None.

    Canonical: other spellings of the same bytes (padding, unused low bits set, "+" for
    "-") are refused, so that a changed character never leaves the value unchanged.
    """
    if _BASE64URL.fullmatch(text) is None:
        return None
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    if len(data) != size or encode(data) != text:
        return None
    return data


def generate_signing_key() -> str:
    """A new Ed25519 private key for ``LLMSTORE_RECEIPT_SIGNING_KEY``."""
    return encode(Ed25519PrivateKey.generate().private_bytes_raw())


def load_signing_key(raw: str) -> Ed25519PrivateKey:
    """The private key written in ``raw``; ConfigError (never quoting it) if it is not one."""
    text = raw.strip()
    seed = bytes.fromhex(text) if _HEX_KEY.fullmatch(text) else decode(text, KEY_SIZE)
    if seed is None:
        raise ConfigError(_KEY_HELP)
    return Ed25519PrivateKey.from_private_bytes(seed)


def public_key_text(key: Ed25519PublicKey) -> str:
    """The public key as unpadded base64url, as receipts name it."""
    return encode(key.public_bytes_raw())
