"""Store configuration: ``StoreConfig`` and the rules that read it from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import sqlalchemy.exc
from pydantic import BaseModel, ConfigDict, Field, SecretStr, Strict, field_validator
from pydantic import ValidationError as PydanticValidationError
from sqlalchemy.engine import URL, make_url

from .errors import ConfigError
from .signing import load_signing_key
from .validate import describe

Driver = Literal["sqlite", "postgresql"]
Environment = Literal["dev", "test", "prod"]

DEFAULT_SQLITE_PATH = "data/llmstore.db"
MEMORY = ":memory:"
_SCHEMA_MAX = 63
_PORTS = range(1, 65536)
# How much of a malformed URL an error message quotes (after masking its password).
_URL_EXCERPT = 200
# Strict: an int where a number belongs, never a bool or a numeric string (from_env turns
# the environment's text into numbers itself).
_Int = Annotated[int, Strict()]
_Float = Annotated[float, Strict()]


_PASSWORD_PARAMETERS = ("password", "pass", "passwd", "pwd", "secret")


def mask_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``; never raises."""
    try:
        parsed = make_url(url)
    except Exception:
        parsed = None
    authority = url.split("://", 1)[-1].split("/", 1)[0]
    if parsed is None or authority.count("@") > 1:
        # Unparseable, or an unescaped "@" in the password: hide all before the last "@".
        if "@" not in url:
            return url
        scheme, sep, _ = url.partition("://")
        return f"{scheme + sep if sep else ''}***@{url.rsplit('@', 1)[1]}"
    if any(name.lower() in _PASSWORD_PARAMETERS for name in parsed.query):
        parsed = parsed.update_query_dict(
            {name: "***" for name in parsed.query if name.lower() in _PASSWORD_PARAMETERS}
        )
    elif parsed.password is None:
        return url
    return parsed.render_as_string(hide_password=True)


def sqlite_url(path: str) -> str:
    """The URL of a SQLite file, escaped so that SQLAlchemy reads back exactly ``path``."""
    if path == MEMORY:
        return "sqlite:///:memory:"
    return URL.create("sqlite", database=path).render_as_string()


def _config_error(message: str, url: str) -> ConfigError:
    masked = mask_url(url)
    if len(masked) > _URL_EXCERPT:
        masked = f"{masked[:_URL_EXCERPT]}... ({len(masked)} characters)"
    return ConfigError(f"{message}: {masked!r}")


class StoreConfig(BaseModel):
    """Where the store lives and how it connects.

    Build it with :meth:`from_env` or :meth:`from_url`, or directly. ``url`` is always a
    normalised SQLAlchemy URL: ``sqlite:///<path>``, ``sqlite:///:memory:`` or
    ``postgresql+asyncpg://...``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: SecretStr
    env: Environment = "dev"
    pool_size: _Int = Field(default=10, ge=1, le=1000)
    max_overflow: _Int = Field(default=10, ge=0, le=1000)
    conn_max_lifetime: _Float = Field(default=3600.0, gt=0, allow_inf_nan=False)
    schema_name: str | None = Field(default=None, min_length=1, max_length=_SCHEMA_MAX)
    busy_timeout: _Float = Field(default=30.0, gt=0, le=3600, allow_inf_nan=False)
    encryption_keys: tuple[SecretStr, ...] = ()
    token_pepper: SecretStr | None = None
    receipt_signing_key: SecretStr | None = None
    backup_dir: str | None = Field(default=None, min_length=1)
    backup_keep: _Int = Field(default=10, ge=1, le=100_000)

    @field_validator("url", mode="before")
    @classmethod
    def _normalise_url(cls, value: object) -> str:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, URL):
            value = value.render_as_string(hide_password=False)
        if not isinstance(value, str):
            raise ConfigError(f"database URL must be a string, not {type(value).__name__}")
        return normalise_url(str.__str__(value))

    @field_validator("encryption_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        return parse_keys(value) if isinstance(value, str) else value

    @field_validator("token_pepper", mode="before")
    @classmethod
    def _check_pepper(cls, value: object) -> object:
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(raw, str) and not raw.strip():
            return None
        if isinstance(raw, str) and len(raw) < 16:
            raise ConfigError("LLMSTORE_TOKEN_PEPPER must be at least 16 characters")
        if isinstance(raw, str) and not _encodable(raw):
            # It keys an HMAC as UTF-8 bytes: a lone surrogate has none.
            raise ConfigError("LLMSTORE_TOKEN_PEPPER is not valid text (lone surrogates)")
        return value

    @field_validator("receipt_signing_key", mode="before")
    @classmethod
    def _check_signing_key(cls, value: object) -> object:
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(raw, str) and not raw.strip():
            return None
        if isinstance(raw, str):
            load_signing_key(raw)  # refuses a malformed key now, not at the first receipt
        return value

    @field_validator("backup_dir")
    @classmethod
    def _check_backup_dir(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ConfigError("LLMSTORE_BACKUP_DIR must not contain NUL characters")
        return value

    @field_validator("schema_name")
    @classmethod
    def _check_schema(cls, value: str | None) -> str | None:
        if value is not None and not (
            value.replace("_", "a").isalnum() and value.isascii() and not value[0].isdigit()
        ):
            raise ConfigError(f"DATABASE_SCHEMA must be letters, digits and underscores: {value!r}")
        return value

    @property
    def driver(self) -> Driver:
        """``"sqlite"`` or ``"postgresql"``, from the URL."""
        return "sqlite" if self.url.get_secret_value().startswith("sqlite") else "postgresql"

    @property
    def masked_url(self) -> str:
        """The URL with its password masked, for messages and logs."""
        return mask_url(self.url.get_secret_value())

    @property
    def sqlite_path(self) -> str | None:
        """The SQLite database file, ``":memory:"``, or None on Postgres."""
        if self.driver != "sqlite":
            return None
        return make_url(self.url.get_secret_value()).database or MEMORY

    @property
    def is_memory(self) -> bool:
        """Whether this is an in-memory SQLite database."""
        return self.sqlite_path == MEMORY

    @classmethod
    def from_url(cls, url: str | URL, **options: Any) -> StoreConfig:
        """A config for ``url``; ``options`` set any other field.

        ``encryption_keys``, ``token_pepper`` and ``receipt_signing_key``, when not given,
        are read from ``LLMSTORE_ENCRYPTION_KEYS``, ``LLMSTORE_TOKEN_PEPPER`` and
        ``LLMSTORE_RECEIPT_SIGNING_KEY``.
        """
        if "encryption_keys" not in options:
            options["encryption_keys"] = parse_keys(os.environ.get("LLMSTORE_ENCRYPTION_KEYS", ""))
        if "token_pepper" not in options:
            options["token_pepper"] = os.environ.get("LLMSTORE_TOKEN_PEPPER") or None
        if "receipt_signing_key" not in options:
            options["receipt_signing_key"] = os.environ.get("LLMSTORE_RECEIPT_SIGNING_KEY") or None
        return cls._build(url=url, **options)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> StoreConfig:
        """Read the configuration from the environment (or ``environ``).

        ``overrides`` win over the environment; ``url=`` and ``env=`` are accepted too.
        In the ``test`` environment the database's name ends in ``_test`` (see
        :func:`test_database`), so tests never touch the dev database.
        """
        source = _environment(os.environ if environ is None else environ)
        # Overrides are the caller's objects: tested by type, never by truthiness.
        env = _override(overrides.pop("env", None), "env") or source.get("LLMSTORE_ENV", "")
        env = env.strip() or "dev"
        if env not in ("dev", "test", "prod"):
            raise ConfigError(f"LLMSTORE_ENV must be dev, test or prod, not {describe(env)}")
        given = _override(overrides.pop("url", None), "url") or source.get("DATABASE_URL", "")
        url = given.strip() or None
        driver = source.get("DB_DRIVER", "").strip().lower()
        if driver not in ("", "sqlite", "postgres", "postgresql"):
            raise ConfigError(f"DB_DRIVER must be sqlite or postgres, not {describe(driver)}")
        path = str(Path(source.get("DATABASE_PATH", "").strip()).expanduser())
        path = "" if path == "." else path
        if url is None:
            if driver in ("postgres", "postgresql"):
                raise ConfigError("DB_DRIVER=postgres needs DATABASE_URL to be set")
            if env == "prod":
                raise ConfigError(
                    "LLMSTORE_ENV=prod needs an explicit DATABASE_URL "
                    "(for SQLite, sqlite:////absolute/path.db)"
                )
            path = path or DEFAULT_SQLITE_PATH
            url = sqlite_url(path)
        if env == "test":
            url = test_database(url)
        values: dict[str, Any] = {"url": url, "env": env}
        for name, variable, kind in (
            ("pool_size", "DATABASE_POOL_SIZE", int),
            ("max_overflow", "DATABASE_MAX_OVERFLOW", int),
            ("conn_max_lifetime", "DATABASE_CONN_MAX_LIFETIME", float),
            ("busy_timeout", "DATABASE_BUSY_TIMEOUT", float),
        ):
            raw = source.get(variable, "").strip()
            if raw:
                try:
                    values[name] = kind(raw)
                except ValueError:
                    raise ConfigError(f"{variable} must be a number, not {describe(raw)}") from None
        schema = source.get("DATABASE_SCHEMA", "").strip()
        if schema:
            values["schema_name"] = schema
        values["encryption_keys"] = parse_keys(source.get("LLMSTORE_ENCRYPTION_KEYS", ""))
        values["token_pepper"] = source.get("LLMSTORE_TOKEN_PEPPER") or None
        values["receipt_signing_key"] = source.get("LLMSTORE_RECEIPT_SIGNING_KEY") or None
        values["backup_dir"] = source.get("LLMSTORE_BACKUP_DIR", "").strip() or None
        keep = source.get("LLMSTORE_BACKUP_KEEP", "").strip()
        if keep:
            try:
                values["backup_keep"] = int(keep)
            except ValueError:
                raise ConfigError(
                    f"LLMSTORE_BACKUP_KEEP must be a whole number, not {describe(keep)}"
                ) from None
        values.update(overrides)
        return cls._build(**values)

    @classmethod
    def _build(cls, **values: Any) -> StoreConfig:
        try:
            return cls(**values)
        except PydanticValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "config"
            raise ConfigError(f"invalid configuration: {where}: {first['msg']}") from None


def _override(value: object, what: str) -> str:
    """An ``env=`` or ``url=`` override as plain text ("" when not given)."""
    if value is None:
        return ""
    if isinstance(value, URL):
        return value.render_as_string(hide_password=False)
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a string, not {type(value).__name__}")
    return str.__str__(value)


def _environment(environ: object) -> dict[str, str]:
    """The environment as plain text: a mapping of str to str, or ConfigError."""
    if not isinstance(environ, Mapping):
        raise ConfigError(f"environ must be a mapping, not {type(environ).__name__}")
    try:
        # A caller's own Mapping is the caller's code: iterating it may raise anything.
        items = list(environ.items())
    except Exception as exc:
        raise ConfigError(f"environ could not be read ({type(exc).__name__})") from exc
    plain = {}
    for name, value in items:
        if not isinstance(name, str) or not isinstance(value, str):
            raise ConfigError("environ must map variable names (str) to values (str)")
        plain[str.__str__(name)] = str.__str__(value)
    return plain


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_keys(raw: str) -> tuple[SecretStr, ...]:
    return tuple(SecretStr(part.strip()) for part in raw.split(",") if part.strip())


def normalise_url(raw: str) -> str:
    """Turn a URL as people write it into the one llmstore connects with.

    ``postgres://`` and ``postgresql://`` become ``postgresql+asyncpg://``;
    ``sqlite+aiosqlite://`` and ``sqlite+pysqlite://`` become ``sqlite://``.
    """
    text = raw.strip()
    if not text:
        raise ConfigError("database URL is empty")
    if "\x00" in text:
        raise _config_error("a database URL must not contain NUL characters", text)
    if text.startswith("postgres://"):
        text = "postgresql://" + text[len("postgres://") :]
    try:
        url = make_url(text)
    except (sqlalchemy.exc.ArgumentError, ValueError) as exc:
        raise _config_error("malformed database URL", text) from exc
    backend, _, dbapi = url.drivername.partition("+")
    if backend == "sqlite":
        if dbapi not in ("", "pysqlite", "aiosqlite"):
            raise _config_error(f"unsupported SQLite driver {describe(dbapi)} in URL", text)
        if url.host or url.username or url.password or url.port:
            raise _config_error("a SQLite URL has no host: write sqlite:///path.db", text)
        database = url.database or MEMORY
        if "\x00" in database:  # %00: no file name holds it
            raise _config_error("a SQLite path must not contain NUL characters", text)
        if database.startswith("file:") or url.query:
            raise _config_error("SQLite URL options are not supported", text)
        return sqlite_url(database)
    if backend in ("postgresql", "postgres"):
        if dbapi not in ("", "asyncpg"):
            raise _config_error(
                f"unsupported PostgreSQL driver {describe(dbapi)} (llmstore uses asyncpg)", text
            )
        if not url.database:
            raise _config_error("PostgreSQL URL names no database", text)
        if url.port is not None and url.port not in _PORTS:
            raise _config_error("the port of a PostgreSQL URL is 1 to 65535", text)
        # %00 decodes to NUL, which the connection's startup message cannot carry. (The
        # password is not in it: a password the server cannot match is refused as such.)
        parts = (url.username, url.host, url.database, *_query_text(url))
        if any(part is not None and "\x00" in part for part in parts):
            raise _config_error("a PostgreSQL URL must not contain NUL characters", text)
        if text.split("://", 1)[-1].split("/", 1)[0].count("@") > 1:
            raise _config_error('malformed database URL (write "@" in a password as %40)', text)
        _check_postgres_options(url, text)
        return url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    raise _config_error("unknown database driver in URL (use sqlite or postgresql)", text)


def _query_text(url: URL) -> list[str]:
    texts = []
    for name, value in url.query.items():
        texts.append(name)
        texts.extend((value,) if isinstance(value, str) else value)
    return texts


# The URL options llmstore passes on: to asyncpg (``sslmode`` as its ``ssl``) and to the
# libpq tools of backups. Any other would reach asyncpg.connect() as a keyword it may not
# take, and fail at open() with a TypeError.
POSTGRES_OPTIONS = ("password", "ssl", "sslmode")
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def _check_postgres_options(url: URL, text: str) -> None:
    for name, value in url.query.items():
        if name not in POSTGRES_OPTIONS:
            raise _config_error(
                f"unsupported PostgreSQL URL option {name[:40]!r} "
                f"(llmstore takes {', '.join(POSTGRES_OPTIONS)})",
                text,
            )
        if name in ("ssl", "sslmode") and value not in SSL_MODES:
            raise _config_error(f"{name} must be one of {', '.join(SSL_MODES)}", text)


def test_database(url: str) -> str:
    """The ``_test`` twin of a database: ``app`` becomes ``app_test``, ``data/x.db``
    becomes ``data/x_test.db``; a name already ending in ``_test`` and ``:memory:`` stay."""
    parsed = make_url(normalise_url(url))
    if parsed.drivername == "sqlite":
        path = parsed.database or MEMORY
        if path == MEMORY:
            return sqlite_url(path)
        file = Path(path)
        if not file.stem.endswith("_test"):
            file = file.with_name(f"{file.stem}_test{file.suffix}")
        return sqlite_url(str(file))
    name = parsed.database or ""
    if not name.endswith("_test"):
        parsed = parsed.set(database=f"{name}_test")
    return parsed.render_as_string(hide_password=False)


def ensure_parent(path: str) -> None:
    Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
