"""Billing: prepaid API keys, their ledger, holds and withdrawals."""
