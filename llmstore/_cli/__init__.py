"""The command line: ``python -m llmstore``."""
