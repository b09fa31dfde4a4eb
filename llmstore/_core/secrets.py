"""Secrets at rest: Fernet encryption under a rotating key list (MultiFernet)."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from pydantic import SecretStr

from .errors import ConfigError, ValidationError

_PLAINTEXT_PREFIX = "plain:"


class SecretBox:
    """Encrypts values for storage; the first key encrypts, every key decrypts.

    With ``allow_plaintext`` (tests only) and no key, values are stored marked as
    plaintext so that a later key rotation can find and encrypt them.
    """

    def __init__(self, keys: Sequence[SecretStr], *, allow_plaintext: bool = False) -> None:
        fernets = []
        for position, key in enumerate(keys, start=1):
            try:
                fernets.append(Fernet(key.get_secret_value().encode("ascii")))
            except (ValueError, UnicodeEncodeError):
                raise ConfigError(
                    f"LLMSTORE_ENCRYPTION_KEYS entry {position} is not a Fernet key "
                    "(32 url-safe base64-encoded bytes; make one with "
                    "`python -m llmstore generate-key`)"
                ) from None
        self._fernet = MultiFernet(fernets) if fernets else None
        self._first = fernets[0] if fernets else None
        self._allow_plaintext = allow_plaintext

    def __repr__(self) -> str:
        keys = len(self._fernet._fernets) if self._fernet else 0
        return f"SecretBox(keys={keys}, allow_plaintext={self._allow_plaintext})"

    def encrypt(self, plaintext: str) -> str:
        if self._fernet is None:
            if not self._allow_plaintext:
                raise ConfigError(
                    "storing a secret needs LLMSTORE_ENCRYPTION_KEYS "
                    "(or allow_plaintext_secrets=True, for tests only)"
                )
            return _PLAINTEXT_PREFIX + plaintext
        return self._fernet.encrypt(plaintext.encode("utf-8")).decode("ascii")

    def decrypt(self, stored: str) -> str:
        if stored.startswith(_PLAINTEXT_PREFIX):
            return stored[len(_PLAINTEXT_PREFIX) :]
        if self._fernet is None:
            raise ConfigError("reading an encrypted secret needs LLMSTORE_ENCRYPTION_KEYS")
        try:
            return self._fernet.decrypt(stored.encode("ascii")).decode("utf-8")
        except InvalidToken:
            raise ConfigError(
                "a stored secret cannot be decrypted with any key in LLMSTORE_ENCRYPTION_KEYS"
            ) from None

    @property
    def has_keys(self) -> bool:
        return self._fernet is not None

    def needs_rotation(self, stored: str) -> bool:
        """Whether ``stored`` is plaintext or not encrypted under the first key."""
        if self._first is None:
            raise ConfigError("rotating secrets needs LLMSTORE_ENCRYPTION_KEYS")
        if stored.startswith(_PLAINTEXT_PREFIX):
            return True
        try:
            self._first.decrypt(_token_bytes(stored))
        except InvalidToken:
            return True
        return False

    def rotate(self, stored: str) -> str:
        """``stored`` encrypted under the first key (plaintext-marked values encrypted)."""
        if self._fernet is None:
            raise ConfigError("rotating secrets needs LLMSTORE_ENCRYPTION_KEYS")
        if stored.startswith(_PLAINTEXT_PREFIX):
            return self.encrypt(stored[len(_PLAINTEXT_PREFIX) :])
        try:
            return self._fernet.rotate(_token_bytes(stored)).decode("ascii")
        except InvalidToken:
            raise ConfigError(
                "a stored secret cannot be decrypted with any key in LLMSTORE_ENCRYPTION_KEYS"
            ) from None


def _token_bytes(stored: str) -> bytes:
    """A Fernet token's bytes; anything not ASCII is no token (``InvalidToken``)."""
    try:
        return stored.encode("ascii")
    except UnicodeEncodeError:
        raise InvalidToken from None


def generate_key() -> str:
    """A new Fernet key for ``LLMSTORE_ENCRYPTION_KEYS``."""
    return Fernet.generate_key().decode("ascii")


class SecretDigester:
    """Digests of bearer secrets (tokens, API keys): what is stored and looked up.

    SHA-256, or HMAC-SHA256 keyed by a pepper kept outside the database, so that a stolen
    database alone cannot be used to test guesses.
    """

    def __init__(self, pepper: SecretStr | None) -> None:
        self._pepper = None if pepper is None else pepper.get_secret_value().encode("utf-8")

    def __repr__(self) -> str:
        return f"SecretDigester(peppered={self._pepper is not None})"

    def digest(self, secret: str) -> str:
        data = secret.encode("utf-8")
        if self._pepper is None:
            return hashlib.sha256(data).hexdigest()
        return hmac.new(self._pepper, data, hashlib.sha256).hexdigest()


_BEARER_BODY = re.compile(r"[A-Za-z0-9_-]{43}")
# How much of a secret a record keeps for display: the prefix and 8 characters (48 bits).
DISPLAY_LENGTH = 12


def new_bearer_secret(prefix: str) -> str:
    """``prefix`` followed by 256 random bits, URL-safe base64 (43 characters)."""
    return prefix + secrets.token_urlsafe(32)


def check_bearer_secret(value: object, prefix: str, what: str) -> str:
    """Refuse anything not shaped like ``new_bearer_secret(prefix)``, without quoting it."""
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be a string, not {type(value).__name__}")
    text = str.__str__(value)  # a subclass's own methods never run
    if not text.startswith(prefix) or _BEARER_BODY.fullmatch(text[len(prefix) :]) is None:
        raise ValidationError(f"not {what}: expected {prefix!r} and 43 URL-safe base64 characters")
    return text
