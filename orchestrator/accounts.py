"""Users and their API keys."""

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, insert, select, update

from orchestrator import models, security
from orchestrator.exceptions import ConflictError, InvalidInputError, NotFoundError
from orchestrator.timeutil import as_utc, utcnow

logger = logging.getLogger(__name__)

ROLES = ("admin", "submitter")


@dataclass(frozen=True)
class User:
    """A user as the API and the dispatcher see it."""

    id: int
    name: str
    role: str
    enabled: bool
    allow_commands: bool
    allowed_classes: list[str] | None

    @property
    def is_admin(self) -> bool:
        """Return whether the user has the admin role."""
        return self.role == "admin"


def _user_from_row(row: Any) -> User:
    return User(
        id=row.id,
        name=row.name,
        role=row.role,
        enabled=row.enabled,
        allow_commands=row.allow_commands,
        allowed_classes=row.allowed_classes,
    )


def count_users(engine: Engine) -> int:
    """Return the number of users."""
    with engine.connect() as conn:
        return int(
            conn.execute(select(func.count()).select_from(models.users)).scalar_one()
        )


def create_user(
    engine: Engine,
    name: str,
    password: str,
    role: str = "submitter",
    *,
    allow_commands: bool = True,
    allowed_classes: list[str] | None = None,
) -> User:
    """Insert a user with a hashed password."""
    if role not in ROLES:
        raise InvalidInputError(
            f"role must be one of {', '.join(ROLES)}, not {role!r}", field="role"
        )
    if not name or len(name) > 64:
        raise InvalidInputError("name must be 1 to 64 characters", field="name")
    with engine.begin() as conn:
        exists = conn.execute(
            select(models.users.c.id).where(models.users.c.name == name)
        ).first()
        if exists:
            raise ConflictError(f"user {name!r} already exists", field="name")
        result = conn.execute(
            insert(models.users).values(
                name=name,
                password_hash=security.hash_password(password),
                role=role,
                enabled=True,
                allow_commands=allow_commands,
                allowed_classes=allowed_classes,
                created_at=utcnow(),
            )
        )
        user_id = int(result.inserted_primary_key[0])
    logger.info(
        "Created user %s with role %s", name, role, extra={"event": "user_created"}
    )
    return get_user(engine, user_id)


def get_user(engine: Engine, user_id: int) -> User:
    """Load a user by id."""
    with engine.connect() as conn:
        row = conn.execute(
            select(models.users).where(models.users.c.id == user_id)
        ).first()
    if row is None:
        raise NotFoundError(f"user {user_id} not found")
    return _user_from_row(row)


def find_user_by_name(engine: Engine, name: str) -> tuple[User, str] | None:
    """Return a user and its password hash, or None when the name is unknown."""
    with engine.connect() as conn:
        row = conn.execute(
            select(models.users).where(models.users.c.name == name)
        ).first()
    if row is None:
        return None
    return _user_from_row(row), row.password_hash


def create_api_key(engine: Engine, user_id: int, label: str = "") -> str:
    """Create an API key for a user and return it; only its hash is stored."""
    key, prefix, key_hash = security.generate_api_key()
    with engine.begin() as conn:
        conn.execute(
            insert(models.api_keys).values(
                user_id=user_id,
                prefix=prefix,
                key_hash=key_hash,
                label=label,
                created_at=utcnow(),
            )
        )
    return key


def user_for_api_key(engine: Engine, key: str) -> User | None:
    """Return the enabled user that owns an unrevoked key, and record its use."""
    key_hash = security.hash_api_key(key)
    keys = models.api_keys
    with engine.begin() as conn:
        row = conn.execute(
            select(keys.c.id, keys.c.key_hash, models.users)
            .join(models.users, models.users.c.id == keys.c.user_id)
            .where(keys.c.key_hash == key_hash, keys.c.revoked_at.is_(None))
        ).first()
        if row is None or not security.same_digest(row.key_hash, key_hash):
            return None
        conn.execute(
            update(keys).where(keys.c.id == row[0]).values(last_used_at=utcnow())
        )
    user = _user_from_row(row)
    return user if user.enabled else None


def list_users(engine: Engine) -> list[dict[str, Any]]:
    """Return every user with the number of unrevoked API keys, ordered by name."""
    u, k = models.users, models.api_keys
    key_counts = (
        select(k.c.user_id, func.count().label("key_count"))
        .where(k.c.revoked_at.is_(None))
        .group_by(k.c.user_id)
        .subquery()
    )
    with engine.connect() as conn:
        rows = conn.execute(
            select(u, key_counts.c.key_count)
            .outerjoin(key_counts, key_counts.c.user_id == u.c.id)
            .order_by(u.c.name)
        ).all()
    return [
        {
            "user": _user_from_row(row),
            "created_at": as_utc(row.created_at),
            "key_count": int(row.key_count or 0),
        }
        for row in rows
    ]


def get_user_auth(engine: Engine, user_id: int) -> tuple[User, str] | None:
    """Return a user and its password hash, or None when the id is unknown."""
    with engine.connect() as conn:
        row = conn.execute(
            select(models.users).where(models.users.c.id == user_id)
        ).first()
    if row is None:
        return None
    return _user_from_row(row), row.password_hash


_UNCHANGED: Any = object()


def update_user(
    engine: Engine,
    user_id: int,
    *,
    role: str | None = None,
    enabled: bool | None = None,
    allow_commands: bool | None = None,
    allowed_classes: list[str] | None = _UNCHANGED,
    password: str | None = None,
) -> User:
    """Change a user; arguments left out stay as they are.

    ``allowed_classes=None`` allows every class. At least one enabled admin
    always remains.
    """
    if role is not None and role not in ROLES:
        raise InvalidInputError(
            f"role must be one of {', '.join(ROLES)}, not {role!r}", field="role"
        )
    values: dict[str, Any] = {}
    for name, value in (
        ("role", role),
        ("enabled", enabled),
        ("allow_commands", allow_commands),
    ):
        if value is not None:
            values[name] = value
    if allowed_classes is not _UNCHANGED:
        values["allowed_classes"] = allowed_classes
    if password is not None:
        values["password_hash"] = security.hash_password(password)
    user = get_user(engine, user_id)
    with engine.begin() as conn:
        if values:
            conn.execute(
                update(models.users)
                .where(models.users.c.id == user_id)
                .values(**values)
            )
        if user.is_admin and user.enabled:
            _check_admin_remains(conn)
    logger.info(
        "Updated user %s: %s",
        user.name,
        ", ".join(sorted(values)),
        extra={"event": "user_updated", "user": user.name},
    )
    return get_user(engine, user_id)


def delete_user(engine: Engine, user_id: int) -> None:
    """Delete a user and its API keys; its jobs stay without a submitter."""
    user = get_user(engine, user_id)
    with engine.begin() as conn:
        conn.execute(
            update(models.jobs)
            .where(models.jobs.c.user_id == user_id)
            .values(user_id=None)
        )
        conn.execute(
            delete(models.api_keys).where(models.api_keys.c.user_id == user_id)
        )
        conn.execute(delete(models.users).where(models.users.c.id == user_id))
        if user.is_admin and user.enabled:
            _check_admin_remains(conn)
    logger.info(
        "Deleted user %s", user.name, extra={"event": "user_deleted", "user": user.name}
    )


def _check_admin_remains(conn: Connection) -> None:
    # Runs inside the changing transaction, so a failed check rolls it back.
    u = models.users
    admins = conn.execute(
        select(func.count())
        .select_from(u)
        .where(u.c.role == "admin", u.c.enabled.is_(True))
    ).scalar_one()
    if not admins:
        raise ConflictError(
            "this change would leave no enabled admin: make another user an "
            "admin first",
            field="role",
        )


def list_api_keys(engine: Engine, user_id: int) -> list[dict[str, Any]]:
    """Return a user's API keys, newest first, without their hashes."""
    k = models.api_keys
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                k.c.id,
                k.c.prefix,
                k.c.label,
                k.c.created_at,
                k.c.last_used_at,
                k.c.revoked_at,
            )
            .where(k.c.user_id == user_id)
            .order_by(k.c.id.desc())
        ).all()
    return [
        {
            "id": r.id,
            "prefix": f"{security.API_KEY_PREFIX}{r.prefix}",
            "label": r.label,
            "created_at": as_utc(r.created_at),
            "last_used_at": as_utc(r.last_used_at),
            "revoked_at": as_utc(r.revoked_at),
        }
        for r in rows
    ]


def revoke_api_key(engine: Engine, user_id: int, key_id: int) -> None:
    """Revoke one of a user's API keys; revoking twice is an error."""
    k = models.api_keys
    with engine.begin() as conn:
        row = conn.execute(
            select(k.c.revoked_at).where(k.c.id == key_id, k.c.user_id == user_id)
        ).first()
        if row is None:
            raise NotFoundError(f"API key {key_id} not found")
        if row.revoked_at is not None:
            raise ConflictError(f"API key {key_id} is already revoked")
        conn.execute(update(k).where(k.c.id == key_id).values(revoked_at=utcnow()))
    logger.info(
        "Revoked API key %d of user %d",
        key_id,
        user_id,
        extra={"event": "api_key_revoked", "user": user_id},
    )
