"""Alembic environment: run migrations on the connection handed over by db.py."""

from alembic import context
from sqlalchemy import create_engine

from orchestrator import models

target_metadata = models.metadata
config = context.config


def run_migrations_online() -> None:
    """Apply migrations on the caller's connection, or on a fresh engine."""
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
