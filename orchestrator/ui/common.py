"""Templates, page routes and the login checks that every page shares."""

import hashlib
import logging
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

import jinja2
from fastapi import Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

import web
from orchestrator import jobs
from orchestrator.accounts import User
from orchestrator.exceptions import JobBalancerError
from orchestrator.timeutil import as_utc, isoformat, utcnow
from orchestrator.ui import session

logger = logging.getLogger(__name__)

WEB_DIR = Path(web.__file__).parent
TEMPLATE_DIR = WEB_DIR / "templates"
STATIC_DIR = WEB_DIR / "static"

STATE_LABELS = {
    jobs.WAITING: "Waiting",
    jobs.RUNNING: "Running",
    jobs.SUCCEEDED: "Succeeded",
    jobs.FAILED: "Failed",
    jobs.KILLED: "Killed",
    jobs.TIMED_OUT: "Timed out",
    jobs.LOST: "Lost",
    jobs.OCCUPIED: "Occupied",
}

# (label, path, admin only)
NAV_ITEMS = (
    ("Dashboard", "/dashboard", False),
    ("Jobs", "/jobs", False),
    ("Scripts", "/scripts", False),
    ("Workers", "/workers", True),
    ("Classes", "/worker-classes", True),
    ("Keys", "/keys", True),
    ("Users", "/users", True),
    ("Settings", "/settings", True),
    ("Audit", "/audit", True),
)

SECURITY_HEADERS = {
    # Pages load only their own scripts, styles and images; charts are inline SVG.
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; "
        "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


class LoginRequiredError(Exception):
    """Raised by page dependencies when the request carries no valid session."""


class PageRoute(APIRoute):
    """A route that renders errors as HTML pages and adds security headers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """Wrap FastAPI's handler so errors of the page render as HTML."""
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                response = await handler(request)
            except LoginRequiredError:
                target = request.url.path
                if request.url.query:
                    target += f"?{request.url.query}"
                response = RedirectResponse(
                    f"/login?next={quote(target, safe='')}", status_code=303
                )
            except JobBalancerError as exc:
                response = _failed_action(request, exc.status_code, exc.detail)
            except StarletteHTTPException as exc:
                response = _failed_action(request, exc.status_code, str(exc.detail))
            except RequestValidationError as exc:
                response = _failed_action(request, 400, _validation_text(exc))
            for name, value in SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
            return response

        return handle


def _failed_action(request: Request, status: int, detail: str) -> Response:
    """Send a failed form back to its page with a flash, else show the error."""
    back = _referring_page(request)
    if request.method == "POST" and back and not wants_json(request):
        session.flash(request.session, "error", detail[:1].upper() + detail[1:])
        return redirect(back)
    return error_response(request, status, detail)


def _referring_page(request: Request) -> str | None:
    # Only a page of this server counts, and not the action's own URL, which
    # is the confirmation page and returns 405 for GET.
    referer = urlsplit(request.headers.get("referer", ""))
    if referer.netloc != request.url.netloc or not referer.path.startswith("/"):
        return None
    if referer.path == request.url.path:
        return None
    return referer.path + (f"?{referer.query}" if referer.query else "")


def _validation_text(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path"))
    return f"invalid {where}: {first.get('msg', 'invalid value')}"


def wants_json(request: Request) -> bool:
    """Return whether the page's script sent the request and expects JSON."""
    return request.headers.get("x-requested-with") == "fetch"


def error_response(request: Request, status: int, detail: str) -> Response:
    """Build an error response: JSON for page scripts, an HTML page otherwise."""
    if wants_json(request):
        return JSONResponse(
            {"ok": False, "level": "error", "message": detail}, status_code=status
        )
    titles = {403: "Not allowed", 404: "Not found", 409: "Not possible now"}
    return render(
        request,
        "error.html",
        {"title": titles.get(status, "Something went wrong"), "detail": detail},
        status_code=status,
    )


async def page_user(request: Request) -> User:
    """Return the logged-in user or send the browser to the login page."""
    user: User | None = getattr(request.state, "session_user", None)
    if user is None:
        raise LoginRequiredError
    return user


async def admin_page_user(user: Annotated[User, Depends(page_user)]) -> User:
    """Require a logged-in admin."""
    if not user.is_admin:
        raise StarletteHTTPException(403, "this page needs the admin role")
    return user


PageUser = Annotated[User, Depends(page_user)]
AdminUser = Annotated[User, Depends(admin_page_user)]


def redirect(url: str) -> RedirectResponse:
    """Send the browser to ``url`` with GET after a form POST."""
    return RedirectResponse(url, status_code=303)


def render(
    request: Request,
    name: str,
    context: dict[str, Any] | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    """Render a template with the values every page uses."""
    user: User | None = getattr(request.state, "session_user", None)
    values = {
        "request": request,
        "user": user,
        "csrf_token": session.csrf_token(request.session),
        "flashes": session.pop_flashes(request.session),
        "nav": [item for item in NAV_ITEMS if user and (user.is_admin or not item[2])],
        "path": request.url.path,
    }
    values.update(context or {})
    html = _environment().get_template(name).render(values)
    return HTMLResponse(html, status_code=status_code)


_ENVIRONMENT: jinja2.Environment | None = None


def _environment() -> jinja2.Environment:
    global _ENVIRONMENT
    if _ENVIRONMENT is None:
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        env.filters.update(
            utc=format_utc,
            iso=isoformat,
            ago=format_ago,
            duration=format_duration,
            size=format_size,
            job_duration=lambda row: format_duration(job_seconds(row)),
            sentence=lambda text: text[:1].upper() + text[1:],
        )
        env.globals.update(
            static=static_url, state_label=state_label, FINAL_STATES=jobs.FINAL_STATES
        )
        _ENVIRONMENT = env
    return _ENVIRONMENT


_STATIC_VERSIONS: dict[str, str] = {}


def static_url(name: str) -> str:
    """Return the URL of a static file with a content hash that busts caches."""
    version = _STATIC_VERSIONS.get(name)
    if version is None:
        digest = hashlib.sha256((STATIC_DIR / name).read_bytes()).hexdigest()
        version = _STATIC_VERSIONS[name] = digest[:10]
    return f"/static/{name}?v={version}"


def state_label(state: str) -> str:
    """Return the display name of a job state."""
    return STATE_LABELS.get(state, state)


def format_utc(value: datetime | None) -> str:
    """Format a timestamp as UTC, to the second."""
    value = as_utc(value)
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else ""


def format_ago(value: datetime | None) -> str:
    """Describe how long ago a timestamp was, as "12 s ago" or "3 d ago"."""
    value = as_utc(value)
    if value is None:
        return "never"
    seconds = max(0.0, (utcnow() - value).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


def format_duration(seconds: float | None) -> str:
    """Format seconds as "850 ms", "42.1 s", "3 min 05 s" or "2 h 07 min"."""
    if seconds is None:
        return ""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_size(value: int | None) -> str:
    """Format a byte count with binary units."""
    size = float(value or 0)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def job_seconds(row: Any) -> float | None:
    """Return how long a job ran, or has been running, in seconds."""
    started = as_utc(row.started_at)
    if started is None:
        return None
    finished = as_utc(row.finished_at) or utcnow()
    return max(0.0, (finished - started).total_seconds())
