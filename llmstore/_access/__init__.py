"""Access: projects, proxy tokens, upstream providers and the audit log."""

from .audit import record_event
from .tokens import TOKEN_PREFIX, Token, check_token_secret, find_token, use_token

__all__ = ["TOKEN_PREFIX", "Token", "check_token_secret", "find_token", "record_event", "use_token"]
