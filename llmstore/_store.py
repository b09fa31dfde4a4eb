"""The ``Store`` facade: configuration in, repositories out, one runner per driver."""

from __future__ import annotations

import enum
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Self

from pydantic import BaseModel, ConfigDict
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from ._access.audit import Audit
from ._access.projects import Projects
from ._access.providers import Providers
from ._access.tokens import Tokens
from ._admission.admissions import Admissions
from ._admission.budgets import Budgets
from ._admission.rate_limits import RateLimits
from ._billing.keys import ApiKeys
from ._core.config import Driver, StoreConfig
from ._core.errors import (
    ConfigError,
    SchemaOutOfDateError,
    StoreClosedError,
    UnknownRevisionError,
)
from ._core.secrets import SecretBox, SecretDigester
from ._db.backends import StoreRunner, open_runner
from ._db.operations import Clock
from ._db.runner import Runner
from ._db.translate import translated
from ._ops.rotation import Progress as RotationProgress
from ._ops.rotation import rotate_keys
from ._prices.prices import Prices
from ._usage.receipts import ReceiptSigner
from ._usage.usage import Usage
from .migrations import _commands as _migrations
from .migrations._template import copy_head_schema


class HealthStatus(BaseModel):
    """What :meth:`Store.health_check` found."""

    model_config = ConfigDict(frozen=True)

    driver: Driver
    revision: str | None
    latency_ms: float


class _Repositories:
    """The repositories over one runner: the store's own, or one transaction's."""

    def __init__(
        self,
        runner: Runner,
        secrets: SecretBox,
        digester: SecretDigester,
        signer: ReceiptSigner,
        clock: Clock | None,
    ) -> None:
        self.projects = Projects(runner, secrets)
        self.tokens = Tokens(runner, digester, clock)
        self.audit = Audit(runner)
        self.providers = Providers(runner, secrets)
        self.api_keys = ApiKeys(runner, secrets, digester, clock)
        self.usage = Usage(runner, signer)
        self.budgets = Budgets(runner, clock)
        self.rate_limits = RateLimits(runner, clock)
        self.admissions = Admissions(runner, clock, digester)
        self.prices = Prices(runner, clock)


class Transaction(_Repositories):
    """The repositories of a store, bound to one database transaction."""


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class Store:
    """The llmstore data layer over SQLite or PostgreSQL.

    Constructors do no I/O: open with ``async with store:`` or ``await store.open()``.
    ``clock`` (a callable returning an aware datetime; the system's UTC time by default)
    is the time budgets, rate limits and admissions decide by, so that a test can move
    it to the next period instead of waiting for it.
    """

    def __init__(
        self,
        config: StoreConfig,
        *,
        engine: AsyncEngine | None = None,
        auto_upgrade: bool = False,
        allow_plaintext_secrets: bool = False,
        clock: Clock | None = None,
    ) -> None:
        if not isinstance(config, StoreConfig):
            raise ConfigError(f"config must be a StoreConfig, not {type(config).__name__}")
        for name, flag in (
            ("auto_upgrade", auto_upgrade),
            ("allow_plaintext_secrets", allow_plaintext_secrets),
        ):
            if not isinstance(flag, bool):
                raise ConfigError(f"{name} must be True or False, not {type(flag).__name__}")
        if engine is not None and not isinstance(engine, AsyncEngine):
            raise ConfigError(
                f"engine must be a SQLAlchemy AsyncEngine, not {type(engine).__name__}"
            )
        if clock is not None and not callable(clock):
            raise ConfigError(f"clock must be a callable, not {type(clock).__name__}")
        self._config = config
        self._clock = clock
        self._engine = engine
        self._auto_upgrade = auto_upgrade
        self._secrets = SecretBox(config.encryption_keys, allow_plaintext=allow_plaintext_secrets)
        self._digester = SecretDigester(config.token_pepper)
        self._signer = ReceiptSigner(config.receipt_signing_key)
        self._state = _State.NEW
        self._runner: StoreRunner | None = None
        self._repositories: _Repositories | None = None

    @classmethod
    def from_env(
        cls,
        *,
        auto_upgrade: bool = False,
        allow_plaintext_secrets: bool = False,
        clock: Clock | None = None,
        **overrides: Any,
    ) -> Store:
        """A store configured by the environment; ``overrides`` set ``StoreConfig`` fields."""
        return cls(
            StoreConfig.from_env(**overrides),
            auto_upgrade=auto_upgrade,
            allow_plaintext_secrets=allow_plaintext_secrets,
            clock=clock,
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        auto_upgrade: bool = False,
        allow_plaintext_secrets: bool = False,
        clock: Clock | None = None,
        **options: Any,
    ) -> Store:
        """A store for ``url``; ``options`` set other ``StoreConfig`` fields."""
        return cls(
            StoreConfig.from_url(url, **options),
            auto_upgrade=auto_upgrade,
            allow_plaintext_secrets=allow_plaintext_secrets,
            clock=clock,
        )

    @classmethod
    def from_engine(
        cls,
        engine: AsyncEngine,
        *,
        schema_name: str | None = None,
        encryption_keys: str | None = None,
        auto_upgrade: bool = False,
        allow_plaintext_secrets: bool = False,
        clock: Clock | None = None,
    ) -> Store:
        """A store on a host application's ``AsyncEngine`` (asyncpg or aiosqlite).

        The engine stays the host's: closing the store does not dispose it.
        ``encryption_keys`` (comma-separated) defaults to ``LLMSTORE_ENCRYPTION_KEYS``.
        """
        if not isinstance(engine, AsyncEngine):
            raise ConfigError(
                f"engine must be a SQLAlchemy AsyncEngine, not {type(engine).__name__}"
            )
        options: dict[str, Any] = {"schema_name": schema_name}
        if encryption_keys is not None:
            options["encryption_keys"] = encryption_keys
        config = StoreConfig.from_url(engine.url.render_as_string(hide_password=False), **options)
        return cls(
            config,
            engine=engine,
            auto_upgrade=auto_upgrade,
            allow_plaintext_secrets=allow_plaintext_secrets,
            clock=clock,
        )

    @property
    def config(self) -> StoreConfig:
        """The configuration the store was made with."""
        return self._config

    @property
    def driver(self) -> Driver:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._config.driver

    @property
    def projects(self) -> Projects:
        """Projects and their upstream keys (:class:`Projects`)."""
        return self._open_repositories().projects

    @property
    def tokens(self) -> Tokens:
        """Proxy tokens with expiry and quotas (:class:`Tokens`)."""
        return self._open_repositories().tokens

    @property
    def audit(self) -> Audit:
        """The tamper-evident audit log (:class:`Audit`)."""
        return self._open_repositories().audit

    @property
    def providers(self) -> Providers:
        """Upstream provider credentials (:class:`Providers`)."""
        return self._open_repositories().providers

    @property
    def api_keys(self) -> ApiKeys:
        """Prepaid API keys: balances, holds, the ledger, withdrawals (:class:`ApiKeys`)."""
        return self._open_repositories().api_keys

    @property
    def usage(self) -> Usage:
        """Usage logs, metrics, retention and receipts (:class:`Usage`)."""
        return self._open_repositories().usage

    @property
    def budgets(self) -> Budgets:
        """Spending limits per calendar or fixed period (:class:`Budgets`)."""
        return self._open_repositories().budgets

    @property
    def rate_limits(self) -> RateLimits:
        """Requests and tokens per window (:class:`RateLimits`)."""
        return self._open_repositories().rate_limits

    @property
    def admissions(self) -> Admissions:
        """The per-request decision: admit, settle, release (:class:`Admissions`)."""
        return self._open_repositories().admissions

    @property
    def prices(self) -> Prices:
        """Prices per million tokens, their history, and costs (:class:`Prices`)."""
        return self._open_repositories().prices

    def _open_repositories(self) -> _Repositories:
        self._require_open()
        assert self._repositories is not None
        return self._repositories

    def __repr__(self) -> str:
        url = self._config.masked_url
        return f"Store(driver={self.driver!r}, url={url!r}, state={self._state.value!r})"

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Connect and check the schema revision (upgrading first if ``auto_upgrade``)."""
        if self._state is _State.OPEN:
            return
        if self._state is _State.CLOSED:
            raise StoreClosedError("this store was closed; create a new Store to reopen")
        runner = await open_runner(
            self._config,
            engine=self._engine,
            upgrade=self._upgrade if self._auto_upgrade else None,
            head_schema=_copy_head_schema,
        )
        try:
            await self._check_revision(runner)
        except BaseException:
            await runner.close()
            raise
        self._runner = runner
        self._repositories = _Repositories(
            runner, self._secrets, self._digester, self._signer, self._clock
        )
        self._state = _State.OPEN

    async def _upgrade(self, engine: AsyncEngine | None) -> None:
        if engine is not None:
            await _upgrade_with(engine, self._config.schema_name)
        else:
            await _migrations.upgrade(self._config)

    async def _check_revision(self, runner: Runner) -> None:
        schema = self._config.schema_name
        revision = await runner.read(lambda conn: _migrations.read_revision(conn, schema))
        head = _migrations.head_revision()
        if revision == head:
            return
        if revision is not None and not _migrations.is_known(revision):
            raise UnknownRevisionError(
                f"the database is at revision {revision!r}, which this version of llmstore "
                f"does not know (its head is {head!r}): upgrade llmstore"
            )
        raise SchemaOutOfDateError(
            f"the database is at revision {revision or 'none'}, the code at {head}: "
            "run `python -m llmstore upgrade` (or open the store with auto_upgrade=True)"
        )

    async def close(self) -> None:
        """Close connections and threads; a closed store cannot be reopened."""
        runner = self._runner
        if runner is not None:
            # From another event loop this raises EventLoopError before closing anything,
            # and the store stays open for its own loop.
            await runner.close()
        self._runner = None
        self._state = _State.CLOSED

    def _require_open(self) -> StoreRunner:
        if self._runner is None:
            if self._state is _State.NEW:
                raise StoreClosedError(
                    "the store is not open: use `async with store:` or `await store.open()`"
                )
            raise StoreClosedError("the store is closed")
        return self._runner

    async def health_check(self) -> HealthStatus:
        """The driver, schema revision and round-trip latency.

        Raises DatabaseUnavailableError when the database cannot be reached or cannot take
        writes (a read-only SQLite file, folder or disk; a Postgres standby).
        """
        runner = self._require_open()
        schema = self._config.schema_name
        started = time.perf_counter()
        await runner.probe()
        latency_ms = (time.perf_counter() - started) * 1000
        revision = await runner.read(lambda conn: _migrations.read_revision(conn, schema))
        return HealthStatus(driver=self.driver, revision=revision, latency_ms=latency_ms)

    async def rotate_keys(
        self, *, batch_size: int = 500, progress: RotationProgress | None = None
    ) -> int:
        """Re-encrypt every stored secret under the first key of ``encryption_keys``.

        Walks project keys, provider credential keys and withdrawal tokens in batches of
        ``batch_size``, each batch its own transaction, so an interrupted rotation can simply
        be run again. Values already under the first key are left as they are; plaintext
        ones (``allow_plaintext_secrets``) are encrypted. ``progress(checked, total)`` is
        called before the first batch and after each batch that read values. Returns how many
        values were re-encrypted. Raises ``ConfigError`` without a key, or at a value no key
        decrypts (before its batch writes anything). Then the old keys can be removed.
        """
        return await rotate_keys(
            self._require_open(), self._secrets, batch_size=batch_size, progress=progress
        )

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """One database transaction: committed on exit, rolled back on error or cancel."""
        runner = self._require_open()
        async with runner.transaction() as tx_runner:
            yield Transaction(tx_runner, self._secrets, self._digester, self._signer, self._clock)


def _copy_head_schema(conn: Connection) -> None:
    dbapi_connection = conn.connection.dbapi_connection
    copy_head_schema(dbapi_connection)  # type: ignore[arg-type]


async def _upgrade_with(engine: AsyncEngine, schema: str | None) -> None:
    with translated():
        async with engine.connect() as conn:
            await conn.run_sync(_migrations.upgrade_connection, schema)
