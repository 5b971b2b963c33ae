"""Worker class pages: list, create, edit and delete."""

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy import Engine

from orchestrator import jobs, workers
from orchestrator.api import deps
from orchestrator.exceptions import JobBalancerError
from orchestrator.ui import common, forms

router = APIRouter(route_class=common.PageRoute, include_in_schema=False)

MAX_JOBS_LIMIT = 10_000


def _load_classes(engine: Engine) -> list[dict[str, Any]]:
    active = jobs.count_active_by_class(engine)
    classes = workers.list_classes(engine)
    for item in classes:
        item["active_jobs"] = active.get(item["id"], 0)
        item["is_default"] = item["name"] == workers.DEFAULT_CLASS
    return classes


async def _render_list(
    request: Request,
    engine: Engine,
    values: dict[str, Any] | None = None,
    errors: dict[str, str] | None = None,
    status_code: int = 200,
) -> Response:
    classes = await asyncio.to_thread(_load_classes, engine)
    context = {
        "title": "Worker classes",
        "classes": classes,
        "values": values or {"default_max_jobs": workers.DEFAULT_MAX_JOBS},
        "errors": errors or {},
    }
    return common.render(request, "classes.html", context, status_code=status_code)


def _read_class_form(form: forms.FormInput) -> tuple[str, int]:
    name = form.text("name", required=True, max_length=64)
    default_max_jobs = form.integer(
        "default_max_jobs", minimum=1, maximum=MAX_JOBS_LIMIT
    )
    return name, default_max_jobs or workers.DEFAULT_MAX_JOBS


@router.get("/worker-classes")
async def classes_page(
    request: Request, user: common.AdminUser, engine: deps.EngineDep
) -> Response:
    """List worker classes with their workers and active jobs."""
    return await _render_list(request, engine)


@router.post("/worker-classes")
async def create_class(
    request: Request,
    user: common.AdminUser,
    engine: deps.EngineDep,
    form: forms.CheckedForm,
) -> Response:
    """Create a worker class."""
    try:
        name, default_max_jobs = _read_class_form(form)
        await asyncio.to_thread(workers.create_class, engine, name, default_max_jobs)
    except JobBalancerError as exc:
        return await _render_list(
            request, engine, form.values(), forms.form_errors(exc), exc.status_code
        )
    await forms.record(request, user, "class.create", f"class {name}")
    return forms.action_done(
        request, f"Worker class {name} created.", "/worker-classes"
    )


@router.get("/worker-classes/{class_id}/edit")
async def edit_class_page(
    class_id: int, request: Request, user: common.AdminUser, engine: deps.EngineDep
) -> Response:
    """Show the form that renames a class or changes its default max jobs."""
    item = await asyncio.to_thread(workers.get_class, engine, class_id)
    context = {"title": f"Edit class {item['name']}", "item": item, "errors": {}}
    context["values"] = item
    return common.render(request, "class_form.html", context)


@router.post("/worker-classes/{class_id}/edit")
async def edit_class(
    class_id: int,
    request: Request,
    user: common.AdminUser,
    engine: deps.EngineDep,
    dispatcher: deps.DispatcherDep,
    form: forms.CheckedForm,
) -> Response:
    """Store a class's new name or default max jobs."""
    item = await asyncio.to_thread(workers.get_class, engine, class_id)
    try:
        name, default_max_jobs = _read_class_form(form)
        await asyncio.to_thread(
            workers.update_class, engine, class_id, name, default_max_jobs
        )
    except JobBalancerError as exc:
        context = {
            "title": f"Edit class {item['name']}",
            "item": item,
            "values": form.values(),
            "errors": forms.form_errors(exc),
        }
        return common.render(
            request, "class_form.html", context, status_code=exc.status_code
        )
    # Workers without their own max jobs follow the class default.
    await dispatcher.refresh_workers()
    # Users cached for API keys carry allowed class names, which just changed.
    request.app.state.key_cache.clear()
    await forms.record(request, user, "class.edit", f"class {name}")
    return forms.action_done(request, f"Worker class {name} saved.", "/worker-classes")


@router.post("/worker-classes/{class_id}/delete")
async def delete_class(
    class_id: int,
    request: Request,
    user: common.AdminUser,
    engine: deps.EngineDep,
    form: forms.CheckedForm,
) -> Response:
    """Delete a class that no worker and no waiting or running job uses."""
    item = await asyncio.to_thread(workers.get_class, engine, class_id)
    name = item["name"]
    if not form.confirmed():
        return forms.confirm_page(
            request,
            f"Delete worker class {name}?",
            "Finished jobs of the class move to the default class.",
            "Delete class",
            "/worker-classes",
        )
    moved = await asyncio.to_thread(workers.delete_class, engine, class_id)
    request.app.state.key_cache.clear()
    await forms.record(request, user, "class.delete", f"class {name}")
    message = f"Worker class {name} deleted."
    if moved:
        message += f" {moved} finished jobs now show the default class."
    return forms.action_done(request, message, "/worker-classes")
