"""Script pages: list, create, edit, rename, delete, and run with params."""

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy import Engine

from orchestrator import scripts, workers
from orchestrator.accounts import User
from orchestrator.api import deps
from orchestrator.api.submit import submit_job
from orchestrator.exceptions import JobBalancerError
from orchestrator.ui import common, forms

router = APIRouter(route_class=common.PageRoute, include_in_schema=False)

INTERPRETERS = ("/bin/sh", "/bin/bash", "python3", "perl", "node", "ruby")
NEW_SCRIPT_BODY = """\
echo "Hello from $(hostname)"
for arg in "$@"; do
  echo "param: $arg"
done
"""


@router.get("/scripts")
async def scripts_page(
    request: Request, user: common.PageUser, engine: deps.EngineDep
) -> Response:
    """List stored scripts."""
    rows = await asyncio.to_thread(scripts.list_scripts, engine)
    return common.render(request, "scripts.html", {"title": "Scripts", "rows": rows})


async def _render_form(
    request: Request,
    engine: Engine,
    user: User,
    script: scripts.Script | None,
    values: dict[str, Any],
    errors: dict[str, str],
    status_code: int = 200,
) -> Response:
    classes = await asyncio.to_thread(workers.list_classes, engine)
    if user.allowed_classes is not None:
        classes = [c for c in classes if c["name"] in user.allowed_classes]
    if script is None:
        title = "New script"
    elif user.is_admin:
        title = f"Edit script {script.name}"
    else:
        title = f"Script {script.name}"
    context = {
        "title": title,
        "script": script,
        "values": values,
        "errors": errors,
        "classes": classes,
        "interpreters": INTERPRETERS,
    }
    return common.render(request, "script_form.html", context, status_code=status_code)


def _read_script_form(form: forms.FormInput) -> tuple[str, str, str]:
    name = form.text("name", required=True, max_length=128)
    interpreter = form.text("interpreter", required=True, max_length=255)
    return name, interpreter, form.raw("body")


@router.get("/scripts/new")
async def new_script_page(
    request: Request, user: common.AdminUser, engine: deps.EngineDep
) -> Response:
    """Show the editor for a new script."""
    values = {"interpreter": "/bin/sh", "body": NEW_SCRIPT_BODY}
    return await _render_form(request, engine, user, None, values, {})


@router.post("/scripts/new")
async def create_script(
    request: Request,
    user: common.AdminUser,
    engine: deps.EngineDep,
    form: forms.CheckedForm,
) -> Response:
    """Store a new script."""
    try:
        name, interpreter, body = _read_script_form(form)
        script = await asyncio.to_thread(
            scripts.add_script, engine, name, interpreter, body
        )
    except JobBalancerError as exc:
        errors = forms.form_errors(exc)
        return await _render_form(
            request, engine, user, None, form.values(), errors, exc.status_code
        )
    await forms.record(request, user, "script.create", f"script {script.name}")
    message = f"Script {script.name} saved."
    return forms.action_done(request, message, f"/scripts/{script.id}")


@router.get("/scripts/{script_id}")
async def script_page(
    script_id: int, request: Request, user: common.PageUser, engine: deps.EngineDep
) -> Response:
    """Show a script: editable for admins, read-only with a run form for others."""
    script = await asyncio.to_thread(scripts.get_script, engine, script_id)
    values = {
        "name": script.name,
        "interpreter": script.interpreter,
        "body": script.body,
    }
    return await _render_form(request, engine, user, script, values, {})


@router.post("/scripts/{script_id}")
async def edit_script(
    script_id: int,
    request: Request,
    user: common.AdminUser,
    engine: deps.EngineDep,
    form: forms.CheckedForm,
) -> Response:
    """Store a script's new name, interpreter or body."""
    script = await asyncio.to_thread(scripts.get_script, engine, script_id)
    try:
        name, interpreter, body = _read_script_form(form)
        script = await asyncio.to_thread(
            scripts.update_script, engine, script_id, name, interpreter, body
        )
    except JobBalancerError as exc:
        errors = forms.form_errors(exc)
        return await _render_form(
            request, engine, user, script, form.values(), errors, exc.status_code
        )
    await forms.record(request, user, "script.edit", f"script {script.name}")
    return forms.action_done(
        request, f"Script {script.name} saved.", f"/scripts/{script_id}"
    )


@router.post("/scripts/{script_id}/delete")
async def delete_script(
    script_id: int,
    request: Request,
    user: common.AdminUser,
    engine: deps.EngineDep,
    form: forms.CheckedForm,
) -> Response:
    """Delete a script that no waiting or running job uses."""
    script = await asyncio.to_thread(scripts.get_script, engine, script_id)
    if not form.confirmed():
        return forms.confirm_page(
            request,
            f"Delete script {script.name}?",
            "Finished jobs of the script keep their output and params.",
            "Delete script",
            f"/scripts/{script_id}",
        )
    await asyncio.to_thread(scripts.delete_script, engine, script_id)
    await forms.record(request, user, "script.delete", f"script {script.name}")
    return forms.action_done(
        request,
        f"Script {script.name} deleted.",
        "/scripts",
        data={"redirect": "/scripts"},
    )


def split_params(text: str) -> list[str]:
    """Split the params box into one param per line; a final newline ends the list."""
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


@router.post("/scripts/{script_id}/run")
async def run_script(
    script_id: int,
    request: Request,
    user: common.PageUser,
    engine: deps.EngineDep,
    dispatcher: deps.DispatcherDep,
    form: forms.CheckedForm,
) -> Response:
    """Run a stored script now with the given params, and open the job."""
    script = await asyncio.to_thread(scripts.get_script, engine, script_id)
    try:
        payload = forms.job_payload(
            scriptId=script_id,
            params=split_params(form.raw("params")),
            watchdog=form.number("watchdog", minimum=0),
            workerClassId=form.text("workerClassId") or None,
        )
        job_id, state = await submit_job(
            engine, dispatcher, user, payload, address=forms.client_address(request)
        )
    except JobBalancerError as exc:
        values = {"name": script.name, "interpreter": script.interpreter}
        values.update(body=script.body, **form.values())
        errors = forms.form_errors(exc)
        return await _render_form(
            request, engine, user, script, values, errors, exc.status_code
        )
    message = f"Job {job_id} is {common.state_label(state).lower()}."
    return forms.action_done(request, message, f"/jobs/{job_id}")
