"""Database tables, declared with SQLAlchemy Core."""

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql

metadata = MetaData()

# MySQL's plain BLOB and TEXT stop at 64 KiB, so the long variants are needed there.
Blob = LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
LongText = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
# Integer ids autoincrement on SQLite only when declared as INTEGER.
Id = BigInteger().with_variant(Integer(), "sqlite")

users = Table(
    "users",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("password_hash", String(255), nullable=False),
    Column("role", String(16), nullable=False, default="submitter"),
    Column("enabled", Boolean, nullable=False, default=True),
    Column("allow_commands", Boolean, nullable=False, default=True),
    Column("allowed_classes", JSON, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("user_id", Id, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("prefix", String(16), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("label", String(128), nullable=False, default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("last_used_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)

worker_classes = Table(
    "worker_classes",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("default_max_jobs", Integer, nullable=False, default=4),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

workers = Table(
    "workers",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("transport", String(16), nullable=False, default="ssh"),
    Column("host", String(255), nullable=False, default=""),
    Column("port", Integer, nullable=False, default=22),
    Column("username", String(64), nullable=False, default=""),
    Column("key_path", String(1024), nullable=True),
    Column("class_id", Id, ForeignKey("worker_classes.id"), nullable=False),
    Column("max_jobs", Integer, nullable=True),
    Column("max_sessions", Integer, nullable=False, default=10),
    Column("enabled", Boolean, nullable=False, default=True),
    Column("draining", Boolean, nullable=False, default=False),
    Column("state", String(16), nullable=False, default="offline"),
    Column("reason", Text, nullable=True),
    Column("last_seen_at", DateTime(timezone=True), nullable=True),
    Column("host_key", Text, nullable=True),
    # A host key presented on connect that differs from host_key; it waits
    # here until an admin accepts it.
    Column("pending_host_key", Text, nullable=True),
    Column(
        "key_id",
        Id,
        ForeignKey("ssh_keys.id", name="fk_workers_key_id_ssh_keys"),
        nullable=True,
    ),
    # SHA-256 of the token a pull agent authenticates with.
    Column("token_hash", String(64), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("token_hash", name="uq_workers_token_hash"),
)

ssh_keys = Table(
    "ssh_keys",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("key_type", String(32), nullable=False),
    Column("public_key", Text, nullable=False),
    Column("fingerprint", String(128), nullable=False),
    # The private key in OpenSSH format, encrypted with the master key, which
    # is kept outside the database.
    Column("private_key_encrypted", Blob, nullable=False),
    Column("is_default", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("user_id", Id, nullable=True),
    Column("user_name", String(64), nullable=True),
    Column("action", String(64), nullable=False),
    Column("target", String(255), nullable=True),
    Column("detail", Text, nullable=True),
    Column("address", String(64), nullable=True),
    Index("ix_audit_log_at", "at"),
)

scripts = Table(
    "scripts",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("interpreter", String(255), nullable=False),
    Column("body", LongText, nullable=False),
    Column("retries", Integer, nullable=False, default=0, server_default="0"),
    Column("retry_delay", Float, nullable=False, default=0, server_default="0"),
    Column(
        "retry_on", String(16), nullable=False, default="infra", server_default="infra"
    ),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("state", String(16), nullable=False),
    Column("command", LongText, nullable=True),
    Column("script_id", Id, ForeignKey("scripts.id"), nullable=True),
    Column("params", JSON, nullable=True),
    Column("class_id", Id, ForeignKey("worker_classes.id"), nullable=False),
    Column("worker_id", Id, ForeignKey("workers.id"), nullable=True),
    Column("user_id", Id, ForeignKey("users.id"), nullable=True),
    Column("watchdog", Float, nullable=True),
    Column("need_realtime", Boolean, nullable=False, default=False),
    Column("exit_code", Integer, nullable=True),
    Column("signal", String(16), nullable=True),
    Column("reason", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Column("attempt", Integer, nullable=False, default=1),
    Column("log_bytes", BigInteger, nullable=False, default=0),
    Column("log_truncated", Boolean, nullable=False, default=False),
    Column("restarted_from", Id, nullable=True),
    Column("retries", Integer, nullable=False, default=0, server_default="0"),
    Column("retry_delay", Float, nullable=False, default=0, server_default="0"),
    # "infra" retries lost jobs and jobs that could not start; "any" also
    # retries non-zero exits.
    Column(
        "retry_on", String(16), nullable=False, default="infra", server_default="infra"
    ),
    Column("idempotency_key", String(128), nullable=True),
    Column("original_id", Id, nullable=True),
    # Names the job's run folder on an SSH worker; random, so that a reused job
    # id never meets an old folder.
    Column("run_token", String(32), nullable=True),
    Index("ix_jobs_state_id", "state", "id"),
    Index("ix_jobs_created_at", "created_at"),
    Index("ix_jobs_worker_id", "worker_id", "id"),
    Index("ix_jobs_user_id", "user_id", "id"),
    Index("ix_jobs_idempotency", "user_id", "idempotency_key", unique=True),
)

job_output = Table(
    "job_output",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("job_id", Id, ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("seq", Integer, nullable=False),
    # 1 is stdout and 2 is stderr, as the file descriptors.
    Column("stream", SmallInteger, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("data", Blob, nullable=False),
    # The job attempt that produced the chunk; retries append to the same log.
    Column("attempt", SmallInteger, nullable=False, default=1, server_default="1"),
    Index("ix_job_output_job_seq", "job_id", "seq", unique=True),
)

settings = Table(
    "settings",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", JSON, nullable=True),
)
