"""Users and their API keys."""

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, insert, select, update

from orchestrator import models, security
from orchestrator.exceptions import ConflictError, InvalidInputError, NotFoundError
from orchestrator.timeutil import utcnow

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
