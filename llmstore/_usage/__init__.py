"""Usage: records, the usage log, metrics, retention, the buffered writer and signed receipts."""

from .records import UsageRecord
from .repository import insert_records

__all__ = ["UsageRecord", "insert_records"]
