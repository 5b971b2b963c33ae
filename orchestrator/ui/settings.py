"""The settings page: placement strategy, liveness, default watchdog, log size."""

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response

from orchestrator import stored_settings
from orchestrator.api import deps
from orchestrator.config import STRATEGIES, Settings
from orchestrator.dispatch import Dispatcher
from orchestrator.exceptions import InvalidInputError, JobBalancerError
from orchestrator.ui import common, forms

router = APIRouter(route_class=common.PageRoute, include_in_schema=False)

MIB = 1024 * 1024
STRATEGY_HELP = {
    "round_robin": "Round robin: each new job goes to the next worker in turn.",
    "least_loaded": "Least loaded: the worker with the lowest share of busy slots.",
    "random": "Random: any worker with a free slot.",
}


def _current_values(settings: Settings) -> dict[str, Any]:
    return {
        "strategy": settings.strategy,
        "liveness_interval_seconds": f"{settings.liveness_interval_seconds:g}",
        "default_watchdog_seconds": f"{settings.default_watchdog_seconds:g}",
        "max_log_mib": f"{settings.max_log_bytes / MIB:g}",
    }


def _render(
    request: Request,
    values: dict[str, Any],
    errors: dict[str, str],
    status_code: int = 200,
) -> Response:
    context = {
        "title": "Settings",
        "values": values,
        "errors": errors,
        "strategies": [(name, STRATEGY_HELP.get(name, name)) for name in STRATEGIES],
    }
    return common.render(request, "settings.html", context, status_code=status_code)


@router.get("/settings")
async def settings_page(
    request: Request, user: common.AdminUser, settings: deps.SettingsDep
) -> Response:
    """Show the settings that apply to the running server."""
    return _render(request, _current_values(settings), {})


def _read_settings_form(form: forms.FormInput) -> dict[str, Any]:
    max_log_mib = form.number("max_log_mib", minimum=0)
    if max_log_mib is None:
        raise InvalidInputError("max log size is required", field="max_log_mib")
    values = {
        "strategy": form.text("strategy"),
        "liveness_interval_seconds": form.number("liveness_interval_seconds"),
        "default_watchdog_seconds": form.number("default_watchdog_seconds") or 0.0,
        "max_log_bytes": int(max_log_mib * MIB),
    }
    try:
        return stored_settings.validate(values)
    except InvalidInputError as exc:
        if exc.field == "max_log_bytes":
            exc.field = "max_log_mib"
        raise


@router.post("/settings")
async def save_settings(
    request: Request,
    user: common.AdminUser,
    engine: deps.EngineDep,
    settings: deps.SettingsDep,
    dispatcher: deps.DispatcherDep,
    form: forms.CheckedForm,
) -> Response:
    """Store the settings and apply them to the running dispatcher."""
    try:
        values = _read_settings_form(form)
    except JobBalancerError as exc:
        return _render(request, form.values(), forms.form_errors(exc), exc.status_code)
    await asyncio.to_thread(stored_settings.save, engine, values)
    apply_settings(settings, dispatcher, values)
    detail = ", ".join(f"{name}={value}" for name, value in sorted(values.items()))
    await forms.record(request, user, "settings.save", "settings", detail)
    return forms.action_done(request, "Settings saved and applied.", "/settings")


def apply_settings(
    settings: Settings, dispatcher: Dispatcher, values: dict[str, Any]
) -> None:
    """Apply new values to the running server.

    The dispatcher reads the strategy from its own attribute and the other
    values from its settings object when it uses them, so jobs that start from
    now on and the next liveness wait see the new values.
    """
    stored_settings.apply(settings, values)
    if dispatcher.settings is not settings:
        stored_settings.apply(dispatcher.settings, values)
    dispatcher.strategy = values["strategy"]
