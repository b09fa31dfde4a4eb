"""llmstore: the data layer for LLM proxies and gateways, on SQLite or PostgreSQL.

Everything public is importable from here; the modules beginning with ``_`` are private.
"""

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
    TransactionError,
    UnknownRevisionError,
    ValidationError,
)
from ._projects import UNSET, Project, Projects, Unset
from ._secrets import generate_key
from ._store import HealthStatus, Store, Transaction

__version__ = "0.1.0.dev0"

__all__ = [
    "ConfigError",
    "ConflictError",
    "DatabaseError",
    "DatabaseUnavailableError",
    "HealthStatus",
    "LlmstoreError",
    "MigrationError",
    "NotFoundError",
    "Project",
    "Projects",
    "SchemaError",
    "SchemaOutOfDateError",
    "Store",
    "StoreClosedError",
    "StoreConfig",
    "Transaction",
    "TransactionError",
    "UNSET",
    "UnknownRevisionError",
    "Unset",
    "ValidationError",
    "generate_key",
]
