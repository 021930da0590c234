"""Alembic migrations, shipped inside the package as ``outbox.migrations``."""
