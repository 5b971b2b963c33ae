"""UTC timestamps that keep their offset across SQLite and MariaDB."""

from datetime import UTC, datetime


def utcnow() -> datetime:
    """Return the current time in UTC."""
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """Attach UTC to a naive timestamp read back from the database."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def isoformat(value: datetime | None) -> str | None:
    """Format a timestamp as ISO 8601 with its UTC offset."""
    value = as_utc(value)
    return value.isoformat() if value is not None else None
