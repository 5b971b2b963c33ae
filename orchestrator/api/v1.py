"""JSON API under /api/v1: jobs, logs, workers, classes and scripts."""

import asyncio
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from orchestrator import jobs, outputs, scripts, workers
from orchestrator.accounts import User
from orchestrator.api import deps
from orchestrator.api.schemas import JobCreate, ScriptCreate, WorkerCreate, WorkerUpdate
from orchestrator.api.submit import submit_job
from orchestrator.exceptions import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
)
from orchestrator.transports.base import STDERR, STDOUT

router = APIRouter(prefix="/api/v1")

STREAMS = {"stdout": STDOUT, "stderr": STDERR}


async def _load_job(engine: Any, job_id: int, user: User) -> Any:
    row = await asyncio.to_thread(jobs.get_job_row, engine, job_id)
    if not user.is_admin and row.user_id != user.id:
        raise NotFoundError(f"job {job_id} not found")
    return row


@router.get("/jobs", tags=["jobs"])
async def read_jobs(
    engine: deps.EngineDep,
    user: deps.UserDep,
    limit: int = Query(50, ge=1, le=1000),
    offset: int = Query(0, ge=0),
    state: str | None = Query(None, description="Only jobs in this state"),
    q: str | None = Query(None, description="Search id, command, worker, user, state"),
    sort: str = Query("id", description=f"One of {', '.join(jobs.SORTABLE)}"),
    order: str = Query("desc", pattern="^(asc|desc)$"),
) -> dict[str, Any]:
    """List jobs, newest first, one page at a time."""
    if state is not None and state not in jobs.STATES:
        raise InvalidInputError(
            f"unknown state {state!r}: use one of {', '.join(jobs.STATES)}",
            field="state",
        )
    if sort not in jobs.SORTABLE:
        raise InvalidInputError(
            f"cannot sort by {sort!r}: use one of {', '.join(jobs.SORTABLE)}",
            field="sort",
        )
    rows, total = await asyncio.to_thread(
        jobs.list_jobs,
        engine,
        limit=limit,
        offset=offset,
        state=state,
        user_id=None if user.is_admin else user.id,
        search=q,
        sort=sort,
        descending=order == "desc",
    )
    return {
        "jobs": [jobs.public_job(row) for row in rows],
        "total": total,
        "limit": limit,
        "offset": offset,
    }


@router.get("/jobs/{job_id}", tags=["jobs"])
async def read_job(job_id: int, engine: deps.EngineDep, user: deps.UserDep) -> Any:
    """Return one job."""
    return jobs.public_job(await _load_job(engine, job_id, user))


@router.get(
    "/jobs/{job_id}/log",
    tags=["jobs"],
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def read_job_log(
    job_id: int,
    engine: deps.EngineDep,
    user: deps.UserDep,
    stream: str | None = Query(None, pattern="^(stdout|stderr)$"),
    offset: int = Query(0, ge=0, description="Bytes of the selected output to skip"),
) -> StreamingResponse:
    """Return the job's output bytes, both streams in arrival order by default."""
    await _load_job(engine, job_id, user)
    selected = STREAMS[stream] if stream else None

    def body() -> Iterator[bytes]:
        for _, data in outputs.iter_output(engine, job_id, selected, offset):
            yield data

    return StreamingResponse(body(), media_type="application/octet-stream")


@router.get("/jobs/{job_id}/log.json", tags=["jobs"])
async def read_job_log_chunks(
    job_id: int, engine: deps.EngineDep, user: deps.UserDep
) -> dict[str, Any]:
    """Return the job's output as text chunks tagged with their stream."""
    await _load_job(engine, job_id, user)
    chunks = await asyncio.to_thread(
        lambda: [
            {
                "stream": "stdout" if s == STDOUT else "stderr",
                "text": d.decode(errors="replace"),
            }
            for s, d in outputs.iter_output(engine, job_id)
        ]
    )
    return {"id": job_id, "chunks": chunks}


@router.post("/jobs/{job_id}/kill", tags=["jobs"])
async def kill_job(
    job_id: int,
    request: Request,
    engine: deps.EngineDep,
    dispatcher: deps.DispatcherDep,
    user: deps.UserDep,
) -> Any:
    """Kill a running or waiting job and its whole process tree."""
    row = await _load_job(engine, job_id, user)
    if row.state in jobs.FINAL_STATES or not await dispatcher.kill(job_id):
        raise ConflictError(f"job {job_id} has already ended ({row.state})")
    await deps.audit(request, user, "job.kill", f"job {job_id}")
    return jobs.public_job(await _load_job(engine, job_id, user))


@router.post("/jobs/{job_id}/restart", tags=["jobs"])
async def restart_job(
    job_id: int,
    request: Request,
    engine: deps.EngineDep,
    dispatcher: deps.DispatcherDep,
    user: deps.UserDep,
) -> dict[str, Any]:
    """Submit a new job with the same command or script, params and class."""
    row = await _load_job(engine, job_id, user)
    payload = JobCreate(
        command=row.command if row.script_id is None else None,
        scriptId=row.script_id,
        params=row.params,
        watchdog=row.watchdog,
        workerClassId=row.class_id,
        need_realtime=row.need_realtime,
    )
    new_id, state = await submit_job(
        engine,
        dispatcher,
        user,
        payload,
        job_id,
        address=deps.client_address(request),
    )
    return {
        "result": True,
        "id": new_id,
        "state": state,
        "url": f"/api/v1/jobs/{new_id}",
        "restarted_from": job_id,
    }


@router.delete("/jobs/{job_id}", tags=["jobs"])
async def delete_job(
    job_id: int, request: Request, engine: deps.EngineDep, user: deps.UserDep
) -> dict[str, Any]:
    """Delete a job that has ended, with its output."""
    await _load_job(engine, job_id, user)
    await asyncio.to_thread(jobs.delete_job, engine, job_id)
    await deps.audit(request, user, "job.delete", f"job {job_id}")
    return {"result": True, "id": job_id, "deleted": True}


@router.get("/workers", tags=["workers"])
async def read_workers(
    dispatcher: deps.DispatcherDep, user: deps.UserDep
) -> dict[str, Any]:
    """List workers with their live state and load."""
    items = [
        workers.public_worker(record, state, reason, running)
        for record, state, reason, running in dispatcher.worker_view()
    ]
    return {"workers": items, "total": len(items)}


@router.post("/workers", tags=["workers"], status_code=201)
async def create_worker(
    payload: WorkerCreate,
    request: Request,
    engine: deps.EngineDep,
    dispatcher: deps.DispatcherDep,
    user: deps.AdminDep,
) -> dict[str, Any]:
    """Register a worker; the dispatcher checks it at once."""
    record = await asyncio.to_thread(
        lambda: workers.add_worker(
            engine,
            payload.name,
            transport=payload.transport,
            host=payload.host,
            port=payload.port,
            username=payload.user,
            key_path=payload.key_path,
            class_name=payload.worker_class,
            max_jobs=payload.max_jobs,
            max_sessions=payload.max_sessions,
        )
    )
    await dispatcher.refresh_workers()
    await deps.audit(request, user, "worker.add", f"worker {record.name}")
    return workers.public_worker(record, record.state, record.reason, 0)


@router.patch("/workers/{name}", tags=["workers"])
async def update_worker(
    name: str,
    payload: WorkerUpdate,
    request: Request,
    engine: deps.EngineDep,
    dispatcher: deps.DispatcherDep,
    user: deps.AdminDep,
) -> dict[str, Any]:
    """Enable, disable, drain or resize a worker."""
    values = payload.model_dump(exclude_none=True)
    if not values:
        raise InvalidInputError(
            "send at least one of enabled, draining, max_jobs, max_sessions"
        )
    await asyncio.to_thread(workers.update_worker, engine, name, **values)
    await dispatcher.refresh_workers()
    await deps.audit(request, user, "worker.update", f"worker {name}", str(values))
    record = await asyncio.to_thread(workers.get_worker, engine, name)
    return workers.public_worker(record, record.state, record.reason, 0)


@router.delete("/workers/{name}", tags=["workers"])
async def delete_worker(
    name: str,
    request: Request,
    engine: deps.EngineDep,
    dispatcher: deps.DispatcherDep,
    user: deps.AdminDep,
) -> dict[str, Any]:
    """Remove a worker that runs no jobs."""
    await asyncio.to_thread(workers.remove_worker, engine, name)
    await dispatcher.refresh_workers()
    await deps.audit(request, user, "worker.remove", f"worker {name}")
    return {"result": True, "name": name, "deleted": True}


@router.get("/classes", tags=["workers"])
async def read_classes(engine: deps.EngineDep, user: deps.UserDep) -> dict[str, Any]:
    """List worker classes."""
    items = await asyncio.to_thread(workers.list_classes, engine)
    return {"classes": items, "total": len(items)}


@router.get("/scripts", tags=["scripts"])
async def read_scripts(engine: deps.EngineDep, user: deps.UserDep) -> dict[str, Any]:
    """List stored scripts."""
    items = await asyncio.to_thread(scripts.list_scripts, engine)
    return {"scripts": items, "total": len(items)}


@router.get("/scripts/{script_id}", tags=["scripts"])
async def read_script(
    script_id: int, engine: deps.EngineDep, user: deps.UserDep
) -> dict[str, Any]:
    """Return one stored script with its body."""
    script = await asyncio.to_thread(scripts.get_script, engine, script_id)
    return script.public()


@router.post("/scripts", tags=["scripts"], status_code=201)
async def create_script(
    payload: ScriptCreate,
    request: Request,
    engine: deps.EngineDep,
    user: deps.AdminDep,
) -> dict[str, Any]:
    """Store a script."""
    script = await asyncio.to_thread(
        scripts.add_script, engine, payload.name, payload.interpreter, payload.body
    )
    await deps.audit(request, user, "script.add", f"script {script.name}")
    return script.public()
