"""Load the server configuration from a TOML file and the environment."""

import logging
import os
import tomllib
from pathlib import Path

from pydantic import BaseModel, Field

logger = logging.getLogger(__name__)

CONFIG_ENV = "JOBBALANCER_CONFIG"
DATABASE_URL_ENV = "JOBBALANCER_DATABASE_URL"
STRATEGIES = ("round_robin", "least_loaded", "random")

DEFAULT_CONFIG_TEXT = """\
# Job Balancer configuration. Every setting below shows its default value;
# uncomment a line and change it to override the default.

# Address and TCP port the HTTP server listens on.
# host = "127.0.0.1"
# port = 8080

# Folder for the SQLite database and other server state. A relative path is
# taken from the folder of this file.
# data_dir = "{data_dir}"

# SQLAlchemy database URL. Empty means the SQLite file in data_dir. For MariaDB
# or MySQL use "mysql+pymysql://user:password@host:3306/dbname".
# The environment variable JOBBALANCER_DATABASE_URL overrides this setting.
# database_url = ""

# How waiting jobs are placed on the workers of their class:
# "round_robin", "least_loaded" or "random".
# strategy = "round_robin"

# Seconds between two liveness checks of each worker.
# liveness_interval_seconds = 10

# Watchdog in seconds for jobs that set none; 0 means no limit.
# default_watchdog_seconds = 0

# Seconds between SIGTERM and SIGKILL when a job is killed or times out.
# kill_grace_seconds = 3

# Bytes of output kept per job; later output is dropped and the job is marked
# as truncated.
# max_log_bytes = 1073741824

# Bytes of output returned inline by POST /addJob with "wait": true.
# wait_output_limit_bytes = 1048576

# Largest accepted HTTP request body in bytes.
# max_body_bytes = 4194304

# Seconds an SSH connection may take to open before the attempt fails.
# ssh_connect_timeout_seconds = 10

# Seconds between SSH keepalive messages on pooled connections. A connection
# that misses three in a row counts as lost.
# ssh_keepalive_seconds = 5

# Seconds to keep trying to reach a running job again after its connection was
# lost. Jobs keep running on the worker meanwhile; past this grace they end
# "lost" (and run again elsewhere when the job allows retries).
# reattach_grace_seconds = 60

# Serve HTTPS with this certificate and key (PEM files). Create a self-signed
# pair with "jobbalancer cert generate". Session cookies are then sent with the
# Secure flag.
# tls_cert_file = "/etc/jobbalancer/server.crt"
# tls_key_file = "/etc/jobbalancer/server.key"

# Seconds without a poll from a pull agent before its worker goes offline.
# Its running jobs then end "lost" unless it returns within reattach_grace_seconds.
# agent_heartbeat_timeout_seconds = 30

# Bearer token that GET /metrics (Prometheus) accepts; admin API keys work too.
# metrics_token = ""

# Serve /metrics without credentials; applies only while metrics_token is empty.
# metrics_public = false
"""


class Settings(BaseModel):
    """Server settings; each field name is also its key in the TOML file."""

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    data_dir: Path = Path("~/.local/share/jobbalancer")
    database_url: str = ""
    strategy: str = "round_robin"
    liveness_interval_seconds: float = Field(default=10, gt=0)
    default_watchdog_seconds: float = Field(default=0, ge=0)
    kill_grace_seconds: float = Field(default=3, ge=0)
    max_log_bytes: int = Field(default=1 << 30, gt=0)
    wait_output_limit_bytes: int = Field(default=1 << 20, ge=0)
    max_body_bytes: int = Field(default=4 << 20, gt=0)
    ssh_connect_timeout_seconds: float = Field(default=10, gt=0)
    ssh_keepalive_seconds: float = Field(default=5, gt=0)
    reattach_grace_seconds: float = Field(default=60, ge=0)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    agent_heartbeat_timeout_seconds: float = Field(default=30, gt=0)
    metrics_token: str = ""
    metrics_public: bool = False
    config_path: Path | None = None

    def resolved_database_url(self) -> str:
        """Return the database URL, defaulting to the SQLite file in data_dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_path() / 'jobbalancer.db'}"

    def data_path(self) -> Path:
        """Return data_dir with ``~`` expanded and relative paths resolved."""
        path = self.data_dir.expanduser()
        if not path.is_absolute() and self.config_path is not None:
            path = self.config_path.parent / path
        return path.resolve()


class ConfigError(ValueError):
    """Raised when the configuration file cannot be read or is invalid."""


def default_config_path() -> Path:
    """Return the config path from JOBBALANCER_CONFIG or the per-user default."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env).expanduser()
    return Path("~/.config/jobbalancer/config.toml").expanduser()


def load_settings(path: Path | None = None, *, create: bool = True) -> Settings:
    """Read settings from ``path``, writing a commented default file if absent."""
    path = (path or default_config_path()).expanduser().resolve()
    if not path.exists() and create:
        path.parent.mkdir(parents=True, exist_ok=True)
        data_dir = Settings().data_dir
        path.write_text(DEFAULT_CONFIG_TEXT.format(data_dir=data_dir))
        # The file may come to hold a database password.
        path.chmod(0o600)
        logger.info("Wrote default configuration to %s", path)
    values: dict[str, object] = {}
    if path.exists():
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML in {path}: {exc}") from exc
    env_url = os.environ.get(DATABASE_URL_ENV)
    if env_url:
        values["database_url"] = env_url
    values["config_path"] = path
    try:
        settings = Settings.model_validate(values)
    except ValueError as exc:
        raise ConfigError(f"invalid setting in {path}: {exc}") from exc
    if settings.strategy not in STRATEGIES:
        raise ConfigError(
            f"invalid strategy {settings.strategy!r} in {path}: "
            f"use one of {', '.join(STRATEGIES)}"
        )
    return settings
