"""Add SSH keys, audit log, retries and agent tokens

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04 15:48:53.578958
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "user_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=True,
        ),
        sa.Column("user_name", sa.String(length=64), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=255), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("address", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"], unique=False)
    op.create_table(
        "ssh_keys",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("key_type", sa.String(length=32), nullable=False),
        sa.Column("public_key", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.String(length=128), nullable=False),
        sa.Column(
            "private_key_encrypted",
            sa.LargeBinary()
            .with_variant(mysql.LONGBLOB(), "mariadb")
            .with_variant(mysql.LONGBLOB(), "mysql"),
            nullable=False,
        ),
        sa.Column("is_default", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    with op.batch_alter_table("jobs") as batch:
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
        batch.add_column(
            sa.Column("idempotency_key", sa.String(length=128), nullable=True)
        )
        batch.add_column(sa.Column("original_id", big_id, nullable=True))
        batch.create_index(
            "ix_jobs_idempotency", ["user_id", "idempotency_key"], unique=True
        )
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("pending_host_key", sa.Text(), nullable=True))
        batch.add_column(sa.Column("key_id", big_id, nullable=True))
        batch.add_column(sa.Column("token_hash", sa.String(length=64), nullable=True))
        batch.create_unique_constraint("uq_workers_token_hash", ["token_hash"])
        batch.create_foreign_key(
            "fk_workers_key_id_ssh_keys", "ssh_keys", ["key_id"], ["id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_constraint("fk_workers_key_id_ssh_keys", type_="foreignkey")
        batch.drop_constraint("uq_workers_token_hash", type_="unique")
        batch.drop_column("token_hash")
        batch.drop_column("key_id")
        batch.drop_column("pending_host_key")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_idempotency")
        batch.drop_column("original_id")
        batch.drop_column("idempotency_key")
        batch.drop_column("retry_on")
        batch.drop_column("retry_delay")
        batch.drop_column("retries")
    op.drop_table("ssh_keys")
    op.drop_index("ix_audit_log_at", table_name="audit_log")
    op.drop_table("audit_log")
