"""Tag output chunks with the job attempt that produced them

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 16:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job_output") as batch:
        batch.add_column(
            sa.Column("attempt", sa.SmallInteger(), nullable=False, server_default="1")
        )


def downgrade() -> None:
    with op.batch_alter_table("job_output") as batch:
        batch.drop_column("attempt")
