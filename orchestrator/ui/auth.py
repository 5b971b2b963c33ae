"""Login and logout pages, with failed logins throttled per user and address."""

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy import Engine

from orchestrator import accounts, security, stored_settings
from orchestrator.accounts import User
from orchestrator.timeutil import utcnow
from orchestrator.ui import common, forms, session

logger = logging.getLogger(__name__)

router = APIRouter(route_class=common.PageRoute, include_in_schema=False)

MAX_FAILURES_PER_USER = 5
MAX_FAILURES_PER_ADDRESS = 20
FAILURE_WINDOW_SECONDS = 15 * 60
MAX_TRACKED_KEYS = 10_000
FIRST_LOGIN_SETTING = "first_login_at"
DEFAULT_TARGET = "/dashboard"


class LoginThrottle:
    """Count failed logins per user name and per client address.

    A key that reached its limit within the window is rejected until its oldest
    failure leaves the window. Counts live in this process's memory, so every
    server process throttles on its own and a restart clears them.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, user_name: str, address: str) -> float:
        """Return the seconds until a login may be tried, 0 when it may now."""
        now = self._clock()
        wait = 0.0
        for key, limit in self._limits(user_name, address):
            failures = self._recent(key, now)
            if len(failures) >= limit:
                wait = max(wait, failures[-limit] + FAILURE_WINDOW_SECONDS - now)
        return wait

    def record_failure(self, user_name: str, address: str) -> None:
        """Count one failed login for the user name and the address."""
        now = self._clock()
        if len(self._failures) >= MAX_TRACKED_KEYS:
            self._forget_expired(now)
        for key, limit in self._limits(user_name, address):
            failures = self._failures.setdefault(key, deque(maxlen=limit))
            failures.append(now)

    def record_success(self, user_name: str) -> None:
        """Clear the user's failures; the address keeps its count."""
        self._failures.pop(_user_key(user_name), None)

    def _limits(self, user_name: str, address: str) -> list[tuple[str, int]]:
        return [
            (_user_key(user_name), MAX_FAILURES_PER_USER),
            (f"address:{address}", MAX_FAILURES_PER_ADDRESS),
        ]

    def _recent(self, key: str, now: float) -> deque[float]:
        failures = self._failures.get(key, deque())
        while failures and failures[0] <= now - FAILURE_WINDOW_SECONDS:
            failures.popleft()
        return failures

    def _forget_expired(self, now: float) -> None:
        for key in list(self._failures):
            if not self._recent(key, now):
                del self._failures[key]
        # Under a flood of distinct names, drop the oldest keys to bound memory.
        while len(self._failures) >= MAX_TRACKED_KEYS:
            del self._failures[next(iter(self._failures))]


def _user_key(user_name: str) -> str:
    return f"user:{user_name.casefold()}"


def safe_target(url: str) -> str:
    """Return ``url`` when it is a path on this server, else the dashboard."""
    if url.startswith("/") and not url.startswith(("//", "/\\")):
        return url
    return DEFAULT_TARGET


@router.get("/")
async def home() -> Response:
    """Send the browser to the dashboard."""
    return common.redirect(DEFAULT_TARGET)


@router.get("/login")
async def login_page(request: Request, next: str = DEFAULT_TARGET) -> Response:
    """Show the login form, with a first-start hint until someone logs in."""
    if getattr(request.state, "session_user", None) is not None:
        return common.redirect(safe_target(next))
    return await _render_login(request, safe_target(next))


async def _render_login(
    request: Request,
    target: str,
    *,
    name: str = "",
    errors: dict[str, str] | None = None,
    status_code: int = 200,
) -> Response:
    engine: Engine = request.app.state.engine
    users, first_login = await asyncio.to_thread(_login_state, engine)
    context = {
        "title": "Log in",
        "next": target,
        "username": name,
        "errors": errors or {},
        "no_users": users == 0,
        "first_start": users > 0 and first_login is None,
    }
    return common.render(request, "login.html", context, status_code=status_code)


def _login_state(engine: Engine) -> tuple[int, Any]:
    return (
        accounts.count_users(engine),
        stored_settings.get_value(engine, FIRST_LOGIN_SETTING),
    )


@router.post("/login")
async def login(request: Request, form: forms.CheckedForm) -> Response:
    """Check the password and start a session, or show why not."""
    name = form.text("username", max_length=64)
    password = str(form.form.get("password") or "")
    target = safe_target(form.text("next"))

    throttle: LoginThrottle = request.app.state.login_throttle
    address = request.client.host if request.client else "unknown"
    wait = throttle.retry_after(name, address)
    if wait > 0:
        minutes = max(1, math.ceil(wait / 60))
        message = f"Too many failed logins: try again in {minutes} min."
        errors = {forms.FORM_ERROR: message}
        return await _render_login(
            request, target, name=name, errors=errors, status_code=429
        )

    engine: Engine = request.app.state.engine
    found = await asyncio.to_thread(_verify, engine, name, password)
    if found is None:
        throttle.record_failure(name, address)
        logger.warning(
            "Failed login for %r from %s",
            name,
            address,
            extra={"event": "login_failed", "user": name},
        )
        errors = {"password": "Wrong user name or password."}
        return await _render_login(
            request, target, name=name, errors=errors, status_code=401
        )

    user, password_hash = found
    throttle.record_success(name)
    session.start_login(request.session, user, password_hash)
    await asyncio.to_thread(_note_first_login, engine)
    await forms.record(request, user, "login", f"user {user.name}")
    return common.redirect(target)


_dummy_hash: str | None = None


def _verify(engine: Engine, name: str, password: str) -> tuple[User, str] | None:
    global _dummy_hash
    found = accounts.find_user_by_name(engine, name) if name else None
    if found is None:
        # Hash anyway, so an unknown name takes as long as a wrong password.
        _dummy_hash = _dummy_hash or security.hash_password("not a password")
        security.verify_password(_dummy_hash, password)
        return None
    user, password_hash = found
    if not security.verify_password(password_hash, password) or not user.enabled:
        return None
    return user, password_hash


def _note_first_login(engine: Engine) -> None:
    if stored_settings.get_value(engine, FIRST_LOGIN_SETTING) is None:
        stored_settings.set_value(engine, FIRST_LOGIN_SETTING, utcnow().isoformat())


@router.get("/logout")
async def logout_page(request: Request, user: common.PageUser) -> Response:
    """Ask before logging out, so a link from another site cannot do it."""
    return common.render(request, "logout.html", {"title": "Log out"})


@router.post("/logout")
async def logout(request: Request) -> Response:
    """End the session."""
    user: User | None = getattr(request.state, "session_user", None)
    if user is None:
        return common.redirect("/login")
    await forms.checked_form(request)
    await forms.record(request, user, "logout", f"user {user.name}")
    session.clear_login(request.session)
    session.flash(request.session, "ok", "You are logged out.")
    return common.redirect("/login")
