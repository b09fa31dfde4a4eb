"""Access: projects, proxy tokens, upstream providers and the audit log."""
