"""Usage: records, the usage log, metrics, retention, the buffered writer and signed receipts."""
