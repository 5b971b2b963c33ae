"""Form input with CSRF checks, and the responses that page actions send."""

import asyncio
import logging
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import FormData

from orchestrator import audit
from orchestrator.accounts import User
from orchestrator.api.schemas import JobCreate
from orchestrator.exceptions import InvalidInputError, JobBalancerError
from orchestrator.ui import common, session

logger = logging.getLogger(__name__)

FORM_ERROR = "_form"


class CsrfError(JobBalancerError):
    """The form carried no CSRF token or a wrong one."""

    status_code = 403
    error = "csrf_failed"


class FormInput:
    """Typed access to submitted form fields; errors name the field."""

    def __init__(self, form: FormData):
        self.form = form

    def text(self, name: str, *, required: bool = False, max_length: int = 0) -> str:
        """Return a field's text, stripped of surrounding white space."""
        value = str(self.form.get(name) or "").strip()
        if required and not value:
            raise InvalidInputError(f"{name} is required", field=name)
        if max_length and len(value) > max_length:
            raise InvalidInputError(
                f"{name} must be at most {max_length} characters", field=name
            )
        return value

    def raw(self, name: str) -> str:
        """Return a field's text as sent, for script bodies and commands."""
        return str(self.form.get(name) or "").replace("\r\n", "\n")

    def integer(
        self, name: str, *, minimum: int | None = None, maximum: int | None = None
    ) -> int | None:
        """Return a whole number, or None when the field is empty."""
        text = self.text(name)
        if not text:
            return None
        try:
            value = int(text)
        except ValueError as exc:
            raise InvalidInputError(
                f"{name} must be a whole number, not {text!r}", field=name
            ) from exc
        _check_range(name, value, minimum, maximum)
        return value

    def number(self, name: str, *, minimum: float | None = None) -> float | None:
        """Return a decimal number, or None when the field is empty."""
        text = self.text(name)
        if not text:
            return None
        try:
            value = float(text)
        except ValueError as exc:
            raise InvalidInputError(
                f"{name} must be a number, not {text!r}", field=name
            ) from exc
        if value != value or value in (float("inf"), float("-inf")):
            raise InvalidInputError(f"{name} must be a finite number", field=name)
        _check_range(name, value, minimum, None)
        return value

    def checkbox(self, name: str) -> bool:
        """Return whether a checkbox was ticked."""
        return self.form.get(name) is not None

    def choices(self, name: str) -> list[str]:
        """Return every value of a repeated field, such as ticked checkboxes."""
        return [str(value) for value in self.form.getlist(name)]

    def confirmed(self) -> bool:
        """Return whether the user confirmed a destructive action."""
        return self.form.get("confirmed") == "1"

    def values(self) -> dict[str, str]:
        """Return the fields as text, to fill the form again after an error."""
        return {
            key: str(value)
            for key, value in self.form.multi_items()
            if key not in ("csrf_token", "password") and isinstance(value, str)
        }


def _check_range(
    name: str, value: float, minimum: float | None, maximum: float | None
) -> None:
    if minimum is not None and value < minimum:
        raise InvalidInputError(f"{name} must be at least {minimum:g}", field=name)
    if maximum is not None and value > maximum:
        raise InvalidInputError(f"{name} must be at most {maximum:g}", field=name)


async def checked_form(request: Request) -> FormInput:
    """Read the posted form and reject it unless its CSRF token matches."""
    form = await request.form()
    token = str(form.get("csrf_token") or "")
    if not session.check_csrf(request.session, token):
        raise CsrfError(
            "the form expired or came from another site: reload the page and "
            "send it again"
        )
    return FormInput(form)


CheckedForm = Annotated[FormInput, Depends(checked_form)]


def job_payload(**values: Any) -> JobCreate:
    """Build a job submission, naming the field when a value is invalid."""
    try:
        return JobCreate(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        location = first.get("loc") or ("",)
        field = str(location[0]) or None
        raise InvalidInputError(
            f"{field}: {first.get('msg', 'invalid value')}", field=field
        ) from exc


def form_errors(exc: JobBalancerError) -> dict[str, str]:
    """Map an error to the form field it names, for the inline message."""
    return {exc.field or FORM_ERROR: exc.detail}


def action_done(
    request: Request,
    message: str,
    url: str,
    *,
    level: str = "ok",
    data: dict[str, Any] | None = None,
) -> Response:
    """Respond to a finished action: JSON for page scripts, else flash and redirect."""
    if common.wants_json(request):
        body = {"ok": level != "error", "level": level, "message": message}
        body.update(data or {})
        return JSONResponse(body)
    session.flash(request.session, level, message)
    return common.redirect(url)


def confirm_page(
    request: Request,
    title: str,
    message: str,
    button: str,
    cancel_url: str,
    *,
    fields: dict[str, str] | None = None,
) -> HTMLResponse:
    """Ask again before a destructive action when the page script did not."""
    return common.render(
        request,
        "confirm.html",
        {
            "title": title,
            "message": message,
            "button": button,
            "action": request.url.path,
            "cancel_url": cancel_url,
            "fields": fields or {},
        },
    )


def client_address(request: Request) -> str | None:
    """Return the client's IP address, or None when the server has none."""
    return request.client.host if request.client else None


async def record(
    request: Request,
    user: User,
    action: str,
    target: str,
    detail: str | None = None,
) -> None:
    """Write a page action to the audit log."""
    engine = request.app.state.engine
    address = client_address(request)
    try:
        await asyncio.to_thread(
            audit.record_action,
            engine,
            user_id=user.id,
            user_name=user.name,
            action=action,
            target=target,
            detail=detail,
            address=address,
        )
    except SQLAlchemyError:
        # The action itself succeeded; a failed audit write must not hide that.
        logger.exception("Recording %s on %s in the audit log failed", action, target)
