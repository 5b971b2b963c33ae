"""Create database engines and bring the schema up to date with Alembic."""

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InterfaceError, OperationalError

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30000

T = TypeVar("T")


def create_db_engine(url: str) -> Engine:
    """Create an engine for ``url`` with the settings each backend needs."""
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"future": True}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        kwargs["pool_size"] = 8
        kwargs["max_overflow"] = 8
    else:
        # pool_pre_ping replaces connections that the server dropped (a MariaDB
        # restart) instead of failing the next statement on them.
        kwargs["pool_pre_ping"] = True
        kwargs["pool_recycle"] = 3600
        kwargs["pool_size"] = 10
        kwargs["max_overflow"] = 10
    engine = create_engine(url, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _configure_sqlite)
    return engine


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def alembic_config(url: str) -> AlembicConfig:
    """Build an Alembic configuration that points at the packaged migrations."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_schema(engine: Engine) -> None:
    """Create or upgrade the schema to the newest migration."""
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


RETRY_FIRST_PAUSE_SECONDS = 0.2
RETRY_MAX_PAUSE_SECONDS = 5.0
RETRY_GIVE_UP_SECONDS = 900.0


async def retrying(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking database call in a thread, retrying while the server is away.

    Connection errors (a restarted MariaDB, a locked SQLite file) are retried with
    backoff for up to RETRY_GIVE_UP_SECONDS, so job state and output written by
    the dispatcher wait for the database instead of being lost.
    """
    pause = RETRY_FIRST_PAUSE_SECONDS
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RETRY_GIVE_UP_SECONDS
    while True:
        try:
            return await asyncio.to_thread(function, *args, **kwargs)
        except (OperationalError, InterfaceError) as exc:
            if loop.time() > deadline:
                raise
            logger.warning(
                "Database call %s failed, retrying in %.1f s: %s",
                getattr(function, "__name__", "call"),
                pause,
                exc.orig if exc.orig is not None else exc,
                extra={"event": "db_retry"},
            )
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX_PAUSE_SECONDS)


def escape_like(text: str) -> str:
    """Escape LIKE wildcards so that text matches literally, with "\\" as escape."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
