"""Dependencies shared by the JSON routes: settings, engine and the caller."""

import asyncio
import time
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy import Engine

from orchestrator import accounts, db, security
from orchestrator import audit as audit_log
from orchestrator.accounts import User
from orchestrator.config import Settings
from orchestrator.dispatch import Dispatcher
from orchestrator.exceptions import AuthenticationError, PermissionDeniedError

KEY_CACHE_SECONDS = 30.0


def get_engine(request: Request) -> Engine:
    """Return the application's database engine."""
    engine: Engine = request.app.state.engine
    return engine


def get_settings(request: Request) -> Settings:
    """Return the application's settings."""
    settings: Settings = request.app.state.settings
    return settings


def get_dispatcher(request: Request) -> Dispatcher:
    """Return the application's dispatcher."""
    dispatcher: Dispatcher = request.app.state.dispatcher
    return dispatcher


async def authenticate_key(request: Request, key: str, user_name: str | None) -> User:
    """Resolve an API key to its user, with a short in-memory cache."""
    if not key:
        raise AuthenticationError(
            "missing API key: send apiKey in the body or an "
            "'Authorization: Bearer KEY' header",
            field="apiKey",
        )
    cache: dict[str, tuple[User, float]] = request.app.state.key_cache
    key_hash = security.hash_api_key(key)
    cached = cache.get(key_hash)
    now = time.monotonic()
    if cached is not None and cached[1] > now:
        user = cached[0]
    else:
        engine = get_engine(request)
        found = await asyncio.to_thread(accounts.user_for_api_key, engine, key)
        if found is None:
            cache.pop(key_hash, None)
            raise AuthenticationError(
                "invalid API key: check the key or create a new one with "
                "'jobbalancer user add'",
                field="apiKey",
            )
        user = found
        cache[key_hash] = (user, now + KEY_CACHE_SECONDS)
    if user_name and user_name != user.name:
        raise AuthenticationError(
            f"userName {user_name!r} does not own this API key", field="userName"
        )
    return user


def bearer_key(request: Request) -> str:
    """Return the key from an Authorization or X-API-Key header, or ''."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key", "").strip()


async def current_user(request: Request) -> User:
    """Authenticate the caller from a header key or a browser session."""
    key = bearer_key(request)
    if key:
        return await authenticate_key(request, key, None)
    session_user: Any = getattr(request.state, "session_user", None)
    if session_user is not None:
        return session_user  # type: ignore[no-any-return]
    raise AuthenticationError(
        "missing API key: send an 'Authorization: Bearer KEY' header",
        field="Authorization",
    )


async def admin_user(user: Annotated[User, Depends(current_user)]) -> User:
    """Require the admin role."""
    if not user.is_admin:
        raise PermissionDeniedError("this action needs the admin role")
    return user


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
UserDep = Annotated[User, Depends(current_user)]
AdminDep = Annotated[User, Depends(admin_user)]


def client_address(request: Request) -> str | None:
    """Return the client address uvicorn reports, which honours trusted proxies."""
    return request.client.host if request.client else None


async def audit(
    request: Request, user: User, action: str, target: str, detail: str | None = None
) -> None:
    """Record an API action in the audit log."""
    await db.retrying(
        audit_log.record_action,
        get_engine(request),
        user_id=user.id,
        user_name=user.name,
        action=action,
        target=target,
        detail=detail,
        address=client_address(request),
    )
