"""llmstore: the data layer for LLM proxies and gateways, on SQLite or PostgreSQL.

Everything public is importable from here; the modules beginning with ``_`` are private.
"""

from ._access.audit import Audit, AuditEvent, AuditVerification, Outcome
from ._access.projects import Project, Projects
from ._access.providers import ProviderCredential, Providers
from ._access.tokens import IssuedToken, Token, Tokens
from ._admission.admissions import Admissions
from ._admission.budgets import Budgets
from ._admission.rate_limits import RateLimits
from ._admission.records import (
    Admission,
    Budget,
    BudgetCrossing,
    BudgetMismatch,
    BudgetPeriodSpend,
    BudgetRemaining,
    BudgetReport,
    BudgetStatus,
    RateLimit,
    RateLimitStatus,
    Settlement,
)
from ._billing.keys import ApiKeys
from ._billing.records import (
    ApiKey,
    IssuedApiKey,
    LedgerEntry,
    LedgerMismatch,
    LedgerReport,
    Reservation,
)
from ._billing.withdrawals import Withdrawal
from ._core.config import StoreConfig
from ._core.errors import (
    ApiKeyRejectedError,
    ApiKeyRejectionReason,
    BackupError,
    BudgetExceededError,
    ConfigError,
    ConflictError,
    DatabaseError,
    DatabaseUnavailableError,
    EventLoopError,
    ExportError,
    IdempotencyConflictError,
    InsufficientBalanceError,
    LlmstoreError,
    MigrationError,
    NotFoundError,
    RateLimitedError,
    SchemaError,
    SchemaOutOfDateError,
    StoreClosedError,
    TokenRejectedError,
    TokenRejectionReason,
    TransactionError,
    UnknownRevisionError,
    UnwrittenUsageError,
    ValidationError,
    WriterClosedError,
)
from ._core.secrets import generate_key
from ._core.unset import UNSET, Unset
from ._prices.prices import Prices
from ._prices.records import Price, PriceImport, PriceTier
from ._store import HealthStatus, Store, Transaction
from ._usage.metrics import UsageMetrics
from ._usage.receipts import Receipt, verify_receipt
from ._usage.records import RecordResult, UsageLog, UsageRecord, WriterStats
from ._usage.usage import Usage
from ._usage.writer import UsageWriter

__version__ = "0.1.0.dev0"

__all__ = [
    "Admission",
    "Admissions",
    "ApiKey",
    "ApiKeyRejectedError",
    "ApiKeyRejectionReason",
    "ApiKeys",
    "Audit",
    "AuditEvent",
    "AuditVerification",
    "BackupError",
    "Budget",
    "BudgetCrossing",
    "BudgetExceededError",
    "BudgetMismatch",
    "BudgetPeriodSpend",
    "BudgetRemaining",
    "BudgetReport",
    "BudgetStatus",
    "Budgets",
    "ConfigError",
    "ConflictError",
    "DatabaseError",
    "DatabaseUnavailableError",
    "EventLoopError",
    "ExportError",
    "HealthStatus",
    "IdempotencyConflictError",
    "InsufficientBalanceError",
    "IssuedApiKey",
    "IssuedToken",
    "LedgerEntry",
    "LedgerMismatch",
    "LedgerReport",
    "LlmstoreError",
    "MigrationError",
    "NotFoundError",
    "Outcome",
    "Price",
    "PriceImport",
    "PriceTier",
    "Prices",
    "Project",
    "Projects",
    "ProviderCredential",
    "Providers",
    "RateLimit",
    "RateLimitStatus",
    "RateLimitedError",
    "RateLimits",
    "Receipt",
    "RecordResult",
    "Reservation",
    "SchemaError",
    "SchemaOutOfDateError",
    "Settlement",
    "Store",
    "StoreClosedError",
    "StoreConfig",
    "Token",
    "TokenRejectedError",
    "TokenRejectionReason",
    "Tokens",
    "Transaction",
    "TransactionError",
    "UNSET",
    "UnknownRevisionError",
    "Unset",
    "UnwrittenUsageError",
    "Usage",
    "UsageLog",
    "UsageMetrics",
    "UsageRecord",
    "UsageWriter",
    "ValidationError",
    "Withdrawal",
    "WriterClosedError",
    "WriterStats",
    "generate_key",
    "verify_receipt",
]
