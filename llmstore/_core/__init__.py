"""The foundation: errors, validation, ids, canonical JSON, secrets, signing keys, config.

Imports nothing else of llmstore (checked by ``tests/test_architecture.py``).
"""
