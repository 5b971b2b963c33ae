"""Settings that admins change at runtime, stored in the settings table.

A stored value overrides the same key from the configuration file. Each server
process reads the table at start, so other processes sharing the database see
a change after their next restart.
"""

import logging
from typing import Any

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from orchestrator import models
from orchestrator.config import STRATEGIES, Settings
from orchestrator.exceptions import InvalidInputError

logger = logging.getLogger(__name__)

MIN_LIVENESS_INTERVAL_SECONDS = 1.0
MIN_LOG_BYTES = 1024
EDITABLE = (
    "strategy",
    "liveness_interval_seconds",
    "default_watchdog_seconds",
    "max_log_bytes",
)


def validate(values: dict[str, Any]) -> dict[str, Any]:
    """Check editable settings and return them with their proper types."""
    clean: dict[str, Any] = {}
    strategy = values.get("strategy")
    if strategy not in STRATEGIES:
        raise InvalidInputError(
            f"strategy must be one of {', '.join(STRATEGIES)}", field="strategy"
        )
    clean["strategy"] = strategy

    liveness = _number(values, "liveness_interval_seconds")
    if liveness < MIN_LIVENESS_INTERVAL_SECONDS:
        raise InvalidInputError(
            f"the liveness interval must be at least "
            f"{MIN_LIVENESS_INTERVAL_SECONDS:g} s",
            field="liveness_interval_seconds",
        )
    clean["liveness_interval_seconds"] = liveness

    watchdog = _number(values, "default_watchdog_seconds")
    if watchdog < 0:
        raise InvalidInputError(
            "the default watchdog must be 0 (no limit) or more seconds",
            field="default_watchdog_seconds",
        )
    clean["default_watchdog_seconds"] = watchdog

    max_log = int(_number(values, "max_log_bytes"))
    if max_log < MIN_LOG_BYTES:
        raise InvalidInputError(
            f"the max log size must be at least {MIN_LOG_BYTES} bytes",
            field="max_log_bytes",
        )
    clean["max_log_bytes"] = max_log
    return clean


def _number(values: dict[str, Any], name: str) -> float:
    value = values.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInputError(f"{name} must be a number", field=name)
    return float(value)


def load(engine: Engine) -> dict[str, Any]:
    """Return the stored editable settings; keys never saved are absent."""
    s = models.settings
    with engine.connect() as conn:
        rows = conn.execute(select(s.c.name, s.c.value).where(s.c.name.in_(EDITABLE)))
        return {row.name: row.value for row in rows}


def save(engine: Engine, values: dict[str, Any]) -> None:
    """Store editable settings, replacing earlier values."""
    for name, value in values.items():
        if name not in EDITABLE:
            raise InvalidInputError(f"{name} is not an editable setting", field=name)
        set_value(engine, name, value)


def get_value(engine: Engine, name: str) -> Any:
    """Return one stored value, or None when it was never saved."""
    s = models.settings
    with engine.connect() as conn:
        return conn.execute(select(s.c.value).where(s.c.name == name)).scalar()


def set_value(engine: Engine, name: str, value: Any) -> None:
    """Insert or replace one stored value."""
    s = models.settings
    try:
        with engine.begin() as conn:
            changed = conn.execute(
                update(s).where(s.c.name == name).values(value=value)
            ).rowcount
            if not changed:
                conn.execute(insert(s).values(name=name, value=value))
    except IntegrityError:
        # Another process inserted the row between the update and the insert.
        with engine.begin() as conn:
            conn.execute(update(s).where(s.c.name == name).values(value=value))


def apply(settings: Settings, values: dict[str, Any]) -> None:
    """Copy stored values onto the settings object that the dispatcher reads."""
    for name, value in values.items():
        if name in EDITABLE:
            setattr(settings, name, value)


def apply_stored(engine: Engine, settings: Settings) -> None:
    """Apply stored values at start; invalid ones are logged and skipped."""
    stored = load(engine)
    if not stored:
        return
    merged = {name: getattr(settings, name) for name in EDITABLE} | stored
    try:
        apply(settings, validate(merged))
    except InvalidInputError as exc:
        logger.error("Ignoring the stored settings: %s", exc.detail)
        return
    logger.info(
        "Applied stored settings: %s",
        ", ".join(f"{name}={stored[name]}" for name in sorted(stored)),
    )
