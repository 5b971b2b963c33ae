"""Browser sessions: signed cookies, the logged-in user, CSRF tokens and flashes.

The session lives in a signed cookie (Starlette's SessionMiddleware), so it
contains only the user id, a stamp of the password hash, the CSRF token and
pending flash messages. Each request reloads the user, so disabling or deleting
a user or changing its password ends its sessions at once.
"""

import asyncio
import hashlib
import hmac
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from orchestrator import accounts
from orchestrator.accounts import User
from orchestrator.config import Settings

logger = logging.getLogger(__name__)

SECRET_FILE = "session.key"
SESSION_COOKIE = "jobbalancer_session"
SESSION_MAX_AGE_SECONDS = 7 * 24 * 3600
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# JSON routes that accept a session; the pages check their own forms.
API_PREFIXES = ("/api/", "/addJob")
MAX_FLASHES = 5


def load_secret_key(data_path: Path) -> str:
    """Return the cookie signing key, creating it with mode 0600 on first use."""
    path = data_path / SECRET_FILE
    data_path.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(48))
    logger.info("Created the session signing key in %s", path)
    return path.read_text().strip()


def add_middleware(app: FastAPI, settings: Settings) -> None:
    """Add the session cookie and the session-user middleware to ``app``."""
    secret = load_secret_key(settings.data_path())
    # Starlette adds each middleware outside the previous one, so the cookie
    # is decoded before SessionUserMiddleware reads it.
    app.add_middleware(SessionUserMiddleware)
    app.add_middleware(SchemeSessionMiddleware, secret_key=secret)


class SchemeSessionMiddleware:
    """Session cookies that carry the Secure flag when the request came over HTTPS.

    Behind a proxy the scheme comes from X-Forwarded-Proto, which uvicorn trusts
    from the addresses in its --forwarded-allow-ips.
    """

    def __init__(self, app: ASGIApp, secret_key: str):
        options: dict[str, Any] = {
            "secret_key": secret_key,
            "session_cookie": SESSION_COOKIE,
            "max_age": SESSION_MAX_AGE_SECONDS,
            "same_site": "lax",
        }
        self.plain = SessionMiddleware(app, https_only=False, **options)
        self.secure = SessionMiddleware(app, https_only=True, **options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("scheme") in ("https", "wss"):
            await self.secure(scope, receive, send)
        else:
            await self.plain(scope, receive, send)


class SessionUserMiddleware:
    """Load the session's user into ``request.state.session_user``.

    JSON requests that change state with a session, and no API key, must send
    the session's CSRF token in the X-CSRF-Token header.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/static/"):
            await self.app(scope, receive, send)
            return
        session: dict[str, Any] = scope.get("session", {})
        user = await _load_user(scope, session)
        headers = Headers(scope=scope)
        if user is not None and _needs_csrf_header(scope, headers):
            if not check_csrf(session, headers.get(CSRF_HEADER, "")):
                await _reject_csrf(send)
                return
        scope.setdefault("state", {})["session_user"] = user
        await self.app(scope, receive, send)


async def _load_user(scope: Scope, session: dict[str, Any]) -> User | None:
    user_id = session.get("user_id")
    if not isinstance(user_id, int):
        return None
    engine = getattr(scope["app"].state, "engine", None)
    if engine is None:
        return None
    found = await asyncio.to_thread(accounts.get_user_auth, engine, user_id)
    if found is None:
        clear_login(session)
        return None
    user, password_hash = found
    if not user.enabled or session.get("stamp") != password_stamp(password_hash):
        clear_login(session)
        return None
    return user


def _needs_csrf_header(scope: Scope, headers: Headers) -> bool:
    if scope["method"] in SAFE_METHODS:
        return False
    if not scope["path"].startswith(API_PREFIXES):
        return False
    # An API key authenticates on its own and is never sent by a browser.
    return not (headers.get("authorization") or headers.get("x-api-key"))


async def _reject_csrf(send: Send) -> None:
    body = json.dumps(
        {
            "result": False,
            "error": "csrf_failed",
            "detail": "missing or wrong X-CSRF-Token header: send the token from "
            "the page's csrf-token meta tag, or use an API key",
            "field": "X-CSRF-Token",
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 403,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def password_stamp(password_hash: str) -> str:
    """Return a short digest of a password hash; a new password changes it."""
    return hashlib.sha256(password_hash.encode()).hexdigest()[:16]


def start_login(session: dict[str, Any], user: User, password_hash: str) -> None:
    """Replace the session's contents with a fresh login."""
    session.clear()
    session["user_id"] = user.id
    session["stamp"] = password_stamp(password_hash)
    session["csrf"] = secrets.token_urlsafe(32)


def clear_login(session: dict[str, Any]) -> None:
    """Forget the logged-in user and rotate the CSRF token."""
    session.clear()
    session["csrf"] = secrets.token_urlsafe(32)


def csrf_token(session: dict[str, Any]) -> str:
    """Return the session's CSRF token, creating one when missing."""
    token = session.get("csrf")
    if not isinstance(token, str) or not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def check_csrf(session: dict[str, Any], token: str) -> bool:
    """Compare a submitted token with the session's in constant time."""
    expected = session.get("csrf")
    if not isinstance(expected, str) or not expected or not token:
        return False
    return hmac.compare_digest(expected.encode(), token.encode())


def flash(session: dict[str, Any], level: str, message: str) -> None:
    """Queue a message for the next page the browser opens."""
    pending = list(session.get("flash", []))[-(MAX_FLASHES - 1) :]
    pending.append([level, message[:500]])
    session["flash"] = pending


def pop_flashes(session: dict[str, Any]) -> list[tuple[str, str]]:
    """Return and clear the queued messages."""
    pending = session.pop("flash", None) or []
    return [(str(level), str(text)) for level, text in pending]
