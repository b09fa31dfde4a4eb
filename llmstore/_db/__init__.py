"""The database layer: schema, engines, runners, the lean path, error translation.

Imports only ``_core`` (checked by ``tests/test_architecture.py``).
"""
