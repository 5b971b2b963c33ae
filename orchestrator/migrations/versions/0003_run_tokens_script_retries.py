"""Add run tokens to jobs and retry defaults to scripts

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 16:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("run_token", sa.String(length=32), nullable=True))
    with op.batch_alter_table("scripts") as batch:
        batch.add_column(
            sa.Column("retries", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("retry_delay", sa.Float(), nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column(
                "retry_on", sa.String(length=16), nullable=False, server_default="infra"
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("scripts") as batch:
        batch.drop_column("retry_on")
        batch.drop_column("retry_delay")
        batch.drop_column("retries")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("run_token")
