"""llmstore: the data layer for LLM proxies and gateways, on SQLite or PostgreSQL.

Everything public is importable from here; the modules beginning with ``_`` are private.
"""

from ._audit import Audit, AuditEvent, AuditVerification, Outcome
from ._config import StoreConfig
from ._errors import (
    ConfigError,
    ConflictError,
    DatabaseError,
    DatabaseUnavailableError,
    LlmstoreError,
    MigrationError,
    NotFoundError,
    SchemaError,
    SchemaOutOfDateError,
    StoreClosedError,
    TokenRejectedError,
    TokenRejectionReason,
    TransactionError,
    UnknownRevisionError,
    ValidationError,
)
from ._projects import UNSET, Project, Projects, Unset
from ._providers import ProviderCredential, Providers
from ._secrets import generate_key
from ._store import HealthStatus, Store, Transaction
from ._tokens import IssuedToken, Token, Tokens

__version__ = "0.1.0.dev0"

__all__ = [
    "Audit",
    "AuditEvent",
    "AuditVerification",
    "ConfigError",
    "ConflictError",
    "DatabaseError",
    "DatabaseUnavailableError",
    "HealthStatus",
    "IssuedToken",
    "LlmstoreError",
    "MigrationError",
    "NotFoundError",
    "Outcome",
    "Project",
    "Projects",
    "ProviderCredential",
    "Providers",
    "SchemaError",
    "SchemaOutOfDateError",
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
    "ValidationError",
    "generate_key",
]
