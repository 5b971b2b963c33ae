"""User pages: accounts, roles, allowed classes, and API keys shown once."""

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy import Engine

from orchestrator import accounts, security, workers
from orchestrator.accounts import User
from orchestrator.api import deps
from orchestrator.exceptions import ConflictError, InvalidInputError, JobBalancerError
from orchestrator.ui import common, forms

router = APIRouter(route_class=common.PageRoute, include_in_schema=False)

MIN_PASSWORD_CHARS = 8
ALL_CLASSES = "*"


@router.get("/users")
async def users_page(
    request: Request, user: common.AdminUser, engine: deps.EngineDep
) -> Response:
    """List users with their role, rights and key count."""
    rows = await asyncio.to_thread(accounts.list_users, engine)
    return common.render(request, "users.html", {"title": "Users", "rows": rows})


async def _render_form(
    request: Request,
    engine: Engine,
    target: User | None,
    values: dict[str, Any],
    errors: dict[str, str],
    status_code: int = 200,
) -> Response:
    classes, api_keys = await asyncio.to_thread(
        lambda: (
            workers.list_classes(engine),
            accounts.list_api_keys(engine, target.id) if target else [],
        )
    )
    context = {
        "title": f"User {target.name}" if target else "Create a user",
        "target": target,
        "values": values,
        "errors": errors,
        "classes": classes,
        "api_keys": api_keys,
        "roles": accounts.ROLES,
    }
    return common.render(request, "user_form.html", context, status_code=status_code)


def _user_values(target: User) -> dict[str, Any]:
    return {
        "role": target.role,
        "allow_commands": target.allow_commands,
        "classes": [ALL_CLASSES]
        if target.allowed_classes is None
        else target.allowed_classes,
    }


def _form_values(form: forms.FormInput) -> dict[str, Any]:
    values: dict[str, Any] = form.values()
    values["allow_commands"] = form.checkbox("allow_commands")
    values["classes"] = form.choices("classes")
    return values


def _read_rights(form: forms.FormInput) -> dict[str, Any]:
    role = form.text("role") or "submitter"
    if role not in accounts.ROLES:
        raise InvalidInputError(
            f"role must be one of {', '.join(accounts.ROLES)}", field="role"
        )
    chosen = form.choices("classes")
    if not chosen:
        raise InvalidInputError(
            "tick at least one worker class, or all classes", field="classes"
        )
    allowed = None if ALL_CLASSES in chosen else sorted(set(chosen))
    return {
        "role": role,
        "allow_commands": form.checkbox("allow_commands"),
        "allowed_classes": allowed,
    }


def _read_password(form: forms.FormInput, required: bool) -> str | None:
    password = str(form.form.get("password") or "")
    if not password and not required:
        return None
    if len(password) < MIN_PASSWORD_CHARS:
        raise InvalidInputError(
            f"password must have at least {MIN_PASSWORD_CHARS} characters",
            field="password",
        )
    return password


@router.get("/users/new")
async def new_user_page(
    request: Request, user: common.AdminUser, engine: deps.EngineDep
) -> Response:
    """Show the form that creates a user."""
    values = {"role": "submitter", "allow_commands": True, "classes": [ALL_CLASSES]}
    return await _render_form(request, engine, None, values, {})


@router.post("/users/new")
async def create_user(
    request: Request,
    user: common.AdminUser,
    engine: deps.EngineDep,
    form: forms.CheckedForm,
) -> Response:
    """Create a user with a password."""
    try:
        name = form.text("name", required=True, max_length=64)
        rights = _read_rights(form)
        password = _read_password(form, required=True) or ""
        created = await asyncio.to_thread(
            lambda: accounts.create_user(
                engine,
                name,
                password,
                rights["role"],
                allow_commands=rights["allow_commands"],
                allowed_classes=rights["allowed_classes"],
            )
        )
    except JobBalancerError as exc:
        values = _form_values(form)
        errors = forms.form_errors(exc)
        return await _render_form(
            request, engine, None, values, errors, exc.status_code
        )
    await forms.record(
        request, user, "user.create", f"user {created.name}", created.role
    )
    message = f"User {created.name} created. Create an API key below if it needs one."
    return forms.action_done(request, message, f"/users/{created.id}")


@router.get("/users/{user_id}")
async def edit_user_page(
    user_id: int, request: Request, user: common.AdminUser, engine: deps.EngineDep
) -> Response:
    """Show a user's rights and API keys."""
    target = await asyncio.to_thread(accounts.get_user, engine, user_id)
    return await _render_form(request, engine, target, _user_values(target), {})


@router.post("/users/{user_id}")
async def edit_user(
    user_id: int,
    request: Request,
    user: common.AdminUser,
    engine: deps.EngineDep,
    form: forms.CheckedForm,
) -> Response:
    """Store a user's role, rights and, when given, a new password."""
    target = await asyncio.to_thread(accounts.get_user, engine, user_id)
    try:
        rights = _read_rights(form)
        password = _read_password(form, required=False)
        await asyncio.to_thread(
            lambda: accounts.update_user(engine, user_id, password=password, **rights)
        )
    except JobBalancerError as exc:
        values = _form_values(form)
        errors = forms.form_errors(exc)
        return await _render_form(
            request, engine, target, values, errors, exc.status_code
        )
    request.app.state.key_cache.clear()
    detail = "password changed" if password else None
    await forms.record(request, user, "user.edit", f"user {target.name}", detail)
    return forms.action_done(request, f"User {target.name} saved.", f"/users/{user_id}")


@router.post("/users/{user_id}/{action}")
async def user_action(
    user_id: int,
    action: str,
    request: Request,
    user: common.AdminUser,
    engine: deps.EngineDep,
    form: forms.CheckedForm,
) -> Response:
    """Enable, disable or delete a user, or create an API key for it."""
    target = await asyncio.to_thread(accounts.get_user, engine, user_id)
    if action == "keys":
        return await _create_key(request, user, engine, form, target)
    if action not in ("enable", "disable", "delete"):
        raise InvalidInputError(f"unknown user action {action!r}", field="action")
    if target.id == user.id and action != "enable":
        raise ConflictError(f"you cannot {action} your own account")
    if action == "delete":
        return await _delete(request, user, engine, form, target)
    enabled = action == "enable"
    await asyncio.to_thread(
        lambda: accounts.update_user(engine, user_id, enabled=enabled)
    )
    request.app.state.key_cache.clear()
    await forms.record(request, user, f"user.{action}", f"user {target.name}")
    message = f"User {target.name} is {action}d."
    return forms.action_done(request, message, "/users")


async def _delete(
    request: Request, user: User, engine: Engine, form: forms.FormInput, target: User
) -> Response:
    if not form.confirmed():
        return forms.confirm_page(
            request,
            f"Delete user {target.name}?",
            "Its API keys stop working. Its jobs stay, without a submitter.",
            "Delete user",
            "/users",
        )
    await asyncio.to_thread(accounts.delete_user, engine, target.id)
    request.app.state.key_cache.clear()
    await forms.record(request, user, "user.delete", f"user {target.name}")
    return forms.action_done(request, f"User {target.name} deleted.", "/users")


async def _create_key(
    request: Request, user: User, engine: Engine, form: forms.FormInput, target: User
) -> Response:
    label = form.text("label", max_length=128)
    key = await asyncio.to_thread(accounts.create_api_key, engine, target.id, label)
    prefix = key[: len(security.API_KEY_PREFIX) + security.PREFIX_CHARS]
    await forms.record(request, user, "api_key.create", f"user {target.name}", prefix)
    # The key is rendered into this response only; it is never stored in clear.
    context = {"title": "API key created", "target": target, "key": key, "label": label}
    response = common.render(request, "key_created.html", context)
    response.headers["Cache-Control"] = "no-store"
    return response


@router.post("/users/{user_id}/keys/{key_id}/revoke")
async def revoke_key(
    user_id: int,
    key_id: int,
    request: Request,
    user: common.AdminUser,
    engine: deps.EngineDep,
    form: forms.CheckedForm,
) -> Response:
    """Revoke an API key; requests with it fail from now on."""
    target = await asyncio.to_thread(accounts.get_user, engine, user_id)
    if not form.confirmed():
        return forms.confirm_page(
            request,
            f"Revoke this API key of {target.name}?",
            "Scripts that use the key get 401 errors from now on.",
            "Revoke key",
            f"/users/{user_id}",
        )
    await asyncio.to_thread(accounts.revoke_api_key, engine, user_id, key_id)
    request.app.state.key_cache.clear()
    await forms.record(
        request, user, "api_key.revoke", f"user {target.name}", str(key_id)
    )
    message = f"API key {key_id} of {target.name} revoked."
    return forms.action_done(request, message, f"/users/{user_id}")
