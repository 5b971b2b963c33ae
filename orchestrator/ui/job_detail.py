"""One job's page: details, live log, progress, and kill, restart and delete."""

import asyncio
import json
import shlex
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import Engine

from orchestrator import jobs, scripts
from orchestrator.accounts import User
from orchestrator.api import deps
from orchestrator.api.submit import submit_job
from orchestrator.exceptions import ConflictError, NotFoundError
from orchestrator.timeutil import utcnow
from orchestrator.ui import common, forms, logstream, progress

router = APIRouter(route_class=common.PageRoute, include_in_schema=False)


async def _load_job(engine: Engine, job_id: int, user: User) -> Any:
    row = await asyncio.to_thread(jobs.get_job_row, engine, job_id)
    if not user.is_admin and row.user_id != user.id:
        raise NotFoundError(f"job {job_id} not found")
    return row


def curl_command(base_url: str, row: Any) -> str | None:
    """Return the curl command line that submits the same job again."""
    payload: dict[str, Any] = {}
    if row.script_id is not None:
        payload = {"scriptId": row.script_id, "params": row.params or []}
    elif row.command is not None:
        payload = {"command": row.command}
    else:
        return None
    if row.watchdog:
        watchdog = float(row.watchdog)
        payload["watchdog"] = int(watchdog) if watchdog.is_integer() else watchdog
    if row.class_name:
        payload["workerClassId"] = row.class_name
    if row.need_realtime:
        payload["need_realtime"] = True
    lines = [
        f"curl -sS -X POST {shlex.quote(base_url.rstrip('/') + '/addJob')}",
        "-H 'Content-Type: application/json'",
        '-H "Authorization: Bearer $JOBBALANCER_API_KEY"',
        f"-d {shlex.quote(json.dumps(payload))}",
    ]
    return " \\\n  ".join(lines)


@router.get("/jobs/{job_id}")
async def job_page(
    job_id: int, request: Request, user: common.PageUser, engine: deps.EngineDep
) -> Response:
    """Show a job with its live log."""
    row = await _load_job(engine, job_id, user)
    script_name = None
    if row.script_id is not None:
        script = await asyncio.to_thread(scripts.get_script, engine, row.script_id)
        script_name = script.name
    found = None
    if row.state == jobs.RUNNING:
        found = await asyncio.to_thread(
            progress.read_progress, engine, job_id, row.started_at, utcnow()
        )
    context = {
        "title": f"Job {job_id}",
        "job": row,
        "summary": logstream.job_summary(row),
        "script_name": script_name,
        "progress": found,
        "curl": curl_command(str(request.base_url), row),
        "tail_bytes": logstream.TAIL_BYTES,
    }
    return common.render(request, "job.html", context)


@router.get("/jobs/{job_id}/events")
async def job_events(
    job_id: int,
    request: Request,
    user: common.PageUser,
    engine: deps.EngineDep,
    dispatcher: deps.DispatcherDep,
) -> StreamingResponse:
    """Stream the job's output and state as Server-Sent Events."""
    await _load_job(engine, job_id, user)
    last_id = request.headers.get("last-event-id", "")
    resume_from = int(last_id) if last_id.isdigit() else None
    stream = logstream.JobStream(engine, dispatcher, job_id, resume_from)
    return StreamingResponse(
        stream.events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/jobs/{job_id}/kill")
async def kill_job(
    job_id: int,
    request: Request,
    user: common.PageUser,
    engine: deps.EngineDep,
    dispatcher: deps.DispatcherDep,
    form: forms.CheckedForm,
) -> Response:
    """Kill a waiting or running job and its whole process tree."""
    row = await _load_job(engine, job_id, user)
    if not form.confirmed():
        return forms.confirm_page(
            request,
            f"Kill job {job_id}?",
            "The job's processes get SIGTERM, then SIGKILL after the grace period.",
            "Kill job",
            f"/jobs/{job_id}",
        )
    label = common.state_label(row.state).lower()
    if row.state in jobs.FINAL_STATES or not await dispatcher.kill(job_id):
        raise ConflictError(f"job {job_id} has already ended ({label})")
    await forms.record(request, user, "job.kill", f"job {job_id}")
    return forms.action_done(request, f"Job {job_id} was killed.", f"/jobs/{job_id}")


@router.post("/jobs/{job_id}/restart")
async def restart_job(
    job_id: int,
    request: Request,
    user: common.PageUser,
    engine: deps.EngineDep,
    dispatcher: deps.DispatcherDep,
    form: forms.CheckedForm,
) -> Response:
    """Submit a new job with the same command or script, params and class."""
    row = await _load_job(engine, job_id, user)
    if not form.confirmed():
        return forms.confirm_page(
            request,
            f"Restart job {job_id}?",
            "A new job starts with the same command or script, params and class.",
            "Restart job",
            f"/jobs/{job_id}",
        )
    if row.command is None and row.script_id is None:
        raise ConflictError(f"the script of job {job_id} was deleted")
    payload = forms.job_payload(
        command=row.command if row.script_id is None else None,
        scriptId=row.script_id,
        params=row.params,
        watchdog=row.watchdog,
        workerClassId=row.class_id,
        need_realtime=row.need_realtime,
    )
    # submit_job records the restart in the audit log.
    new_id, state = await submit_job(
        engine, dispatcher, user, payload, job_id, address=forms.client_address(request)
    )
    message = f"Job {job_id} restarted as job {new_id} ({common.state_label(state)})."
    url = f"/jobs/{new_id}"
    return forms.action_done(request, message, url, data={"redirect": url})


@router.post("/jobs/{job_id}/delete")
async def delete_job(
    job_id: int,
    request: Request,
    user: common.PageUser,
    engine: deps.EngineDep,
    form: forms.CheckedForm,
) -> Response:
    """Delete a job that has ended, with its output."""
    await _load_job(engine, job_id, user)
    if not form.confirmed():
        return forms.confirm_page(
            request,
            f"Delete job {job_id}?",
            "The job and its whole output are deleted for good.",
            "Delete job",
            f"/jobs/{job_id}",
        )
    await asyncio.to_thread(jobs.delete_job, engine, job_id)
    await forms.record(request, user, "job.delete", f"job {job_id}")
    return forms.action_done(
        request, f"Job {job_id} was deleted.", "/jobs", data={"redirect": "/jobs"}
    )
