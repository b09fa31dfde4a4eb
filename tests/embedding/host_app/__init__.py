"""A host application with tables and an Alembic history of its own, sharing its database
(SQLite: the same file; Postgres: the ``public`` schema) with llmstore."""
