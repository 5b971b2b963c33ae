"""Worker pages: inventory, add, edit, enable, drain, delete and connection test."""

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy import Engine

from orchestrator import keys, workers
from orchestrator.api import deps
from orchestrator.dispatch import Dispatcher
from orchestrator.exceptions import InvalidInputError, JobBalancerError
from orchestrator.transports.base import TransportError
from orchestrator.transports.ssh import fingerprint
from orchestrator.ui import common, forms

router = APIRouter(route_class=common.PageRoute, include_in_schema=False)

# NOTE: agent workers are left out until their token can be issued from a page.
FORM_TRANSPORTS = ("ssh", "local")
TEST_TIMEOUT_SECONDS = 30.0
# Path suffix: (audit action, changed worker fields, message).
STATE_ACTIONS = {
    "enable": ("worker.enable", {"enabled": True, "draining": False}, "enabled"),
    "disable": ("worker.disable", {"enabled": False, "draining": False}, "disabled"),
    "drain": ("worker.drain", {"draining": True}, "draining: it takes no new jobs"),
    "undrain": ("worker.undrain", {"draining": False}, "taking jobs again"),
}


@router.get("/workers")
async def workers_page(
    request: Request,
    user: common.AdminUser,
    engine: deps.EngineDep,
    dispatcher: deps.DispatcherDep,
) -> Response:
    """List workers with their live state, load and host key."""
    pending = await asyncio.to_thread(workers.list_pending_host_keys, engine)
    rows = [
        {
            "record": record,
            "state": state,
            "reason": reason,
            "running": running,
            "fingerprint": fingerprint(record.host_key or ""),
            "pending": fingerprint(pending.get(record.id) or "")
            if record.id in pending
            else None,
        }
        for record, state, reason, running in dispatcher.worker_view()
    ]
    return common.render(request, "workers.html", {"title": "Workers", "rows": rows})


async def _form_context(
    engine: Engine, worker: Any, values: dict[str, Any], errors: dict[str, str]
) -> dict[str, Any]:
    classes, stored_keys = await asyncio.to_thread(
        lambda: (workers.list_classes(engine), keys.list_keys(engine))
    )
    return {
        "title": f"Edit worker {worker.name}" if worker else "Add a worker",
        "worker": worker,
        "values": values,
        "errors": errors,
        "classes": classes,
        "stored_keys": stored_keys,
        "transports": FORM_TRANSPORTS,
    }


def _record_values(worker: workers.WorkerRecord, key_name: str) -> dict[str, Any]:
    return {
        "name": worker.name,
        "transport": worker.transport,
        "host": worker.host,
        "port": worker.port,
        "username": worker.username,
        "key_path": worker.key_path or "",
        "ssh_key": key_name,
        "class_id": worker.class_id,
        "max_sessions": worker.max_sessions,
    }


@router.get("/workers/new")
async def new_worker_page(
    request: Request, user: common.AdminUser, engine: deps.EngineDep
) -> Response:
    """Show the form that adds a worker."""
    values = {"transport": "ssh", "port": 22, "max_sessions": 10}
    context = await _form_context(engine, None, values, {})
    return common.render(request, "worker_form.html", context)


@router.get("/workers/{worker_id}/edit")
async def edit_worker_page(
    worker_id: int, request: Request, user: common.AdminUser, engine: deps.EngineDep
) -> Response:
    """Show the form that changes a worker."""
    worker, key_name = await asyncio.to_thread(_load_worker, engine, worker_id)
    values = _record_values(worker, key_name)
    # The class default applies when max_jobs is empty, so show the override only.
    override = await asyncio.to_thread(workers.get_max_jobs_override, engine, worker_id)
    values["max_jobs"] = "" if override is None else override
    context = await _form_context(engine, worker, values, {})
    return common.render(request, "worker_form.html", context)


def _load_worker(engine: Engine, worker_id: int) -> tuple[Any, str]:
    worker = workers.get_worker(engine, worker_id)
    key_name = ""
    if worker.key_id is not None:
        key_name = keys.get_key(engine, worker.key_id).name
    return worker, key_name


def _read_worker_form(form: forms.FormInput) -> dict[str, Any]:
    transport = form.text("transport") or "ssh"
    if transport not in FORM_TRANSPORTS:
        raise InvalidInputError(
            f"transport must be one of {', '.join(FORM_TRANSPORTS)}", field="transport"
        )
    class_id = form.integer("class_id", minimum=1)
    if class_id is None:
        raise InvalidInputError("choose a worker class", field="class_id")
    return {
        "name": form.text("name", required=True, max_length=64),
        "transport": transport,
        "host": form.text("host", max_length=255),
        "port": form.integer("port", minimum=1, maximum=65535) or 22,
        "username": form.text("username", max_length=64),
        "key_path": form.text("key_path", max_length=1024) or None,
        "class_id": class_id,
        "max_jobs": form.integer("max_jobs", minimum=1, maximum=10_000),
        "max_sessions": form.integer("max_sessions", minimum=1, maximum=1000) or 10,
    }


@router.post("/workers/new")
async def add_worker(
    request: Request,
    user: common.AdminUser,
    engine: deps.EngineDep,
    dispatcher: deps.DispatcherDep,
    form: forms.CheckedForm,
) -> Response:
    """Register a worker; the dispatcher checks it at once."""
    try:
        fields = _read_worker_form(form)
        key_name = form.text("ssh_key") or None
        await asyncio.to_thread(_add_worker, engine, fields, key_name)
    except JobBalancerError as exc:
        context = await _form_context(
            engine, None, form.values(), forms.form_errors(exc)
        )
        return common.render(
            request, "worker_form.html", context, status_code=exc.status_code
        )
    await dispatcher.refresh_workers()
    await forms.record(request, user, "worker.add", f"worker {fields['name']}")
    return forms.action_done(request, f"Worker {fields['name']} added.", "/workers")


def _add_worker(engine: Engine, fields: dict[str, Any], key_name: str | None) -> None:
    class_name = workers.get_class(engine, fields.pop("class_id"))["name"]
    workers.add_worker(engine, class_name=class_name, **fields)
    if key_name:
        keys.assign_key(engine, fields["name"], key_name)


@router.post("/workers/{worker_id}/edit")
async def edit_worker(
    worker_id: int,
    request: Request,
    user: common.AdminUser,
    engine: deps.EngineDep,
    dispatcher: deps.DispatcherDep,
    form: forms.CheckedForm,
) -> Response:
    """Store a worker's changed fields and reconnect when needed."""
    worker = await asyncio.to_thread(workers.get_worker, engine, worker_id)
    try:
        fields = _read_worker_form(form)
        key_name = form.text("ssh_key") or None
        await asyncio.to_thread(_change_worker, engine, worker_id, fields, key_name)
    except JobBalancerError as exc:
        context = await _form_context(
            engine, worker, form.values(), forms.form_errors(exc)
        )
        return common.render(
            request, "worker_form.html", context, status_code=exc.status_code
        )
    await dispatcher.refresh_workers()
    await forms.record(request, user, "worker.edit", f"worker {fields['name']}")
    return forms.action_done(request, f"Worker {fields['name']} saved.", "/workers")


def _change_worker(
    engine: Engine, worker_id: int, fields: dict[str, Any], key_name: str | None
) -> None:
    workers.change_worker(engine, worker_id, **fields)
    if fields["transport"] == "ssh":
        keys.assign_key(engine, fields["name"], key_name)


@router.post("/workers/{worker_id}/{action}")
async def change_state(
    worker_id: int,
    action: str,
    request: Request,
    user: common.AdminUser,
    engine: deps.EngineDep,
    dispatcher: deps.DispatcherDep,
    form: forms.CheckedForm,
) -> Response:
    """Enable, disable, drain, delete, test or accept the host key of a worker."""
    worker = await asyncio.to_thread(workers.get_worker, engine, worker_id)
    if action == "test":
        return await _test_connection(request, dispatcher, worker)
    if action == "delete":
        return await _delete(request, user, engine, dispatcher, form, worker)
    if action == "accept-host-key":
        return await _accept_host_key(request, user, engine, dispatcher, form, worker)
    if action not in STATE_ACTIONS:
        raise InvalidInputError(f"unknown worker action {action!r}", field="action")
    audit_action, values, done = STATE_ACTIONS[action]
    await asyncio.to_thread(workers.update_worker, engine, worker.name, **values)
    await dispatcher.refresh_workers()
    await forms.record(request, user, audit_action, f"worker {worker.name}")
    return forms.action_done(request, f"Worker {worker.name} is {done}.", "/workers")


async def _test_connection(
    request: Request, dispatcher: Dispatcher, worker: workers.WorkerRecord
) -> Response:
    runtime = dispatcher.workers.get(worker.id)
    if runtime is None:
        await dispatcher.refresh_workers()
        runtime = dispatcher.workers.get(worker.id)
    if runtime is None:
        raise InvalidInputError(f"worker {worker.name} is not loaded yet: try again")
    started = time.monotonic()
    try:
        await asyncio.wait_for(runtime.transport.check(), TEST_TIMEOUT_SECONDS)
    except (TransportError, TimeoutError) as exc:
        message = f"{worker.name}: connection failed: {exc or 'timed out'}"
        return forms.action_done(
            request, message, "/workers", level="error", data={"passed": False}
        )
    elapsed = (time.monotonic() - started) * 1000
    message = f"{worker.name}: connection works ({elapsed:.0f} ms)."
    return forms.action_done(request, message, "/workers", data={"passed": True})


async def _delete(
    request: Request,
    user: Any,
    engine: Engine,
    dispatcher: Dispatcher,
    form: forms.FormInput,
    worker: workers.WorkerRecord,
) -> Response:
    if not form.confirmed():
        return forms.confirm_page(
            request,
            f"Delete worker {worker.name}?",
            "Finished jobs keep their history without the worker.",
            "Delete worker",
            "/workers",
        )
    await asyncio.to_thread(workers.remove_worker, engine, worker.name)
    await dispatcher.refresh_workers()
    await forms.record(request, user, "worker.delete", f"worker {worker.name}")
    return forms.action_done(request, f"Worker {worker.name} deleted.", "/workers")


async def _accept_host_key(
    request: Request,
    user: Any,
    engine: Engine,
    dispatcher: Dispatcher,
    form: forms.FormInput,
    worker: workers.WorkerRecord,
) -> Response:
    expected = form.text("fingerprint")
    if not form.confirmed():
        return forms.confirm_page(
            request,
            f"Trust the new host key of {worker.name}?",
            f"Accept {expected} only if you know why the worker's key changed.",
            "Accept host key",
            "/workers",
            fields={"fingerprint": expected},
        )
    await asyncio.to_thread(keys.accept_host_key, engine, worker.name, expected or None)
    await dispatcher.refresh_workers()
    await forms.record(
        request, user, "worker.accept_host_key", f"worker {worker.name}", expected
    )
    message = f"Worker {worker.name} now trusts host key {expected}."
    return forms.action_done(request, message, "/workers")
