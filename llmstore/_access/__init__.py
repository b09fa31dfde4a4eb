"""Access: projects, proxy tokens, upstream providers and the audit log."""

from .audit import record_event
from .tokens import (
    TOKEN_COLUMNS,
    TOKEN_PREFIX,
    Token,
    check_token_secret,
    find_token,
    token_record,
    token_usable,
    use_token,
)

__all__ = [
    "TOKEN_COLUMNS",
    "TOKEN_PREFIX",
    "Token",
    "check_token_secret",
    "find_token",
    "record_event",
    "token_record",
    "token_usable",
    "use_token",
]
