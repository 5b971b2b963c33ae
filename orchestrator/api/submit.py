"""POST /addJob, the submission endpoint that existing clients call."""

import asyncio
import json
import logging
import time
import weakref
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError

from orchestrator import jobs, outputs, scripts, workers
from orchestrator.accounts import User
from orchestrator.api import deps
from orchestrator.api.schemas import JobCreate
from orchestrator.config import Settings
from orchestrator.dispatch import Dispatcher
from orchestrator.exceptions import (
    ConflictError,
    InvalidInputError,
    InvalidJsonError,
    NotFoundError,
    PermissionDeniedError,
)
from orchestrator.jobs import JobSpec
from orchestrator.timeutil import utcnow
from orchestrator.transports.base import STDERR, STDOUT

logger = logging.getLogger(__name__)

router = APIRouter(tags=["jobs"])

CLASS_CACHE_SECONDS = 5.0
_class_cache: weakref.WeakKeyDictionary[
    Engine, dict[str | int | None, tuple[tuple[int, str], float]]
] = weakref.WeakKeyDictionary()

MESSAGES = {
    jobs.RUNNING: "Job {id} is running",
    jobs.WAITING: "Job {id} is waiting for a free worker",
    jobs.OCCUPIED: "Job {id} was rejected: all workers are occupied",
}


@router.post(
    "/addJob",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": JobCreate.model_json_schema()}},
        }
    },
)
async def add_job(
    request: Request,
    engine: deps.EngineDep,
    settings: deps.SettingsDep,
    dispatcher: deps.DispatcherDep,
) -> dict[str, Any]:
    """Submit a command or a stored script as a job.

    The body is read as JSON whatever its Content-Type, because existing
    clients post it as form data (curl -d) as often as with a JSON header.
    """
    payload = await _parse_payload(request)
    key = payload.apiKey or deps.bearer_key(request)
    user = await deps.authenticate_key(request, key, payload.userName)
    idempotency_key = request.headers.get("idempotency-key") or payload.idempotencyKey
    if idempotency_key is not None and not 0 < len(idempotency_key) <= 128:
        raise InvalidInputError(
            "Idempotency-Key must be 1 to 128 characters", field="idempotencyKey"
        )
    job_id, state = await submit_job(
        engine,
        dispatcher,
        user,
        payload,
        idempotency_key=idempotency_key,
        address=deps.client_address(request),
    )
    answer: dict[str, Any] = {
        "result": state != jobs.OCCUPIED,
        "message": MESSAGES.get(state, "Job {id} has ended: {state}").format(
            id=job_id, state=state
        ),
        "id": job_id,
        "state": state,
        "url": f"/api/v1/jobs/{job_id}",
        "log_url": f"/api/v1/jobs/{job_id}/log",
    }
    if state in (jobs.WAITING, jobs.OCCUPIED):
        class_id, class_name = await _resolve_class(engine, payload.workerClassId)
        if not dispatcher.class_has_usable_worker(class_id):
            answer["warning"] = (
                f"no enabled worker in class {class_name!r} is online: add or "
                "enable one (jobbalancer worker list), or submit to another class"
            )
    if payload.wait and state != jobs.OCCUPIED:
        await dispatcher.wait_for_end(job_id, payload.waitTimeout)
        answer.update(await _final_answer(engine, settings, job_id))
    return answer


async def _parse_payload(request: Request) -> JobCreate:
    body = await request.body()
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidJsonError(
            "the request body is not valid JSON: send a JSON object such as "
            '{"command": "echo hello"}',
            field="body",
        ) from exc
    if not isinstance(data, dict):
        raise InvalidJsonError(
            f"the request body must be a JSON object, not {type(data).__name__}",
            field="body",
        )
    try:
        return JobCreate.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc


async def submit_job(
    engine: Engine,
    dispatcher: Dispatcher,
    user: User,
    payload: JobCreate,
    restarted_from: int | None = None,
    idempotency_key: str | None = None,
    address: str | None = None,
) -> tuple[int, str]:
    """Validate a submission against the caller's rights and hand it over.

    A repeated idempotency key returns the job that the first request created.
    """
    if idempotency_key:
        existing = await asyncio.to_thread(
            jobs.find_by_idempotency_key, engine, user.id, idempotency_key
        )
        if existing is not None:
            return _replay(existing, payload, idempotency_key)
    script = await _check_request(engine, user, payload)
    class_id, class_name = await _resolve_class(engine, payload.workerClassId)
    if user.allowed_classes is not None and class_name not in user.allowed_classes:
        raise PermissionDeniedError(
            f"user {user.name!r} may not use worker class {class_name!r}",
            field="workerClassId",
        )
    spec, values = _build_job(payload, user, class_id, script)
    values["restarted_from"] = restarted_from
    values["idempotency_key"] = idempotency_key or None
    try:
        audit_entry = {
            "user_id": user.id,
            "user_name": user.name,
            "action": "job.restart" if restarted_from else "job.submit",
            "detail": (payload.command or f"script {payload.scriptId}")[:1000],
            "address": address,
        }
        state = await dispatcher.submit(
            spec, values, payload.need_realtime, audit_entry
        )
    except IntegrityError:
        # A concurrent request with the same idempotency key won the insert.
        found = await asyncio.to_thread(
            jobs.find_by_idempotency_key, engine, user.id, idempotency_key or ""
        )
        if found is None:
            raise
        return _replay(found, payload, idempotency_key or "")
    logger.info(
        "Job %d submitted by %s: %s",
        spec.id,
        user.name,
        state,
        extra={"event": "job_submitted", "job": spec.id, "user": user.name},
    )
    return spec.id, state


def _replay(
    existing: tuple[int, str, tuple[Any, ...]], payload: JobCreate, key: str
) -> tuple[int, str]:
    """Return the job a repeated request created, or reject a different request."""
    job_id, state, request = existing
    params = payload.param_list() if payload.scriptId is not None else None
    if request != (payload.command, payload.scriptId, params):
        raise ConflictError(
            f"Idempotency-Key {key!r} was used for job {job_id} with a different "
            "command, script or params: use a new key for a new job",
            field="idempotencyKey",
        )
    return job_id, state


async def _resolve_class(engine: Engine, ref: str | int | None) -> tuple[int, str]:
    """Resolve a worker class reference, from a short-lived cache when possible.

    The cache spares a query per submission. NOTE: a renamed class still
    resolves by its old name for up to CLASS_CACHE_SECONDS.
    """
    cache = _class_cache.setdefault(engine, {})
    now = time.monotonic()
    cached = cache.get(ref)
    if cached is not None and cached[1] > now:
        return cached[0]
    resolved = await asyncio.to_thread(workers.resolve_class, engine, ref)
    cache[ref] = (resolved, now + CLASS_CACHE_SECONDS)
    return resolved


async def _check_request(
    engine: Engine, user: User, payload: JobCreate
) -> scripts.Script | None:
    if (payload.command is None) == (payload.scriptId is None):
        raise InvalidInputError(
            "send either command (a shell command line) or scriptId "
            "(a stored script id), not both and not neither",
            field="command",
        )
    if payload.command is not None and not payload.command.strip():
        raise InvalidInputError("command is empty", field="command")
    if payload.command is not None and payload.params:
        raise InvalidInputError(
            "params apply to stored scripts only: send scriptId, or put the "
            "arguments into command",
            field="params",
        )
    if payload.command is not None and not user.allow_commands:
        raise PermissionDeniedError(
            f"user {user.name!r} may run stored scripts only: send scriptId",
            field="command",
        )
    if payload.scriptId is None:
        return None
    return await asyncio.to_thread(_check_script, engine, payload.scriptId)


def _build_job(
    payload: JobCreate, user: User, class_id: int, script: scripts.Script | None
) -> tuple[JobSpec, dict[str, Any]]:
    params = payload.param_list()
    watchdog = payload.watchdog or None
    retries = payload.retries
    retry_delay = payload.retry_delay
    retry_on = payload.retry_on
    if script is not None:
        # A script's retry settings apply unless the request sets its own.
        retries = script.retries if retries is None else retries
        retry_delay = script.retry_delay if retry_delay is None else retry_delay
        retry_on = script.retry_on if retry_on is None else retry_on
    spec = JobSpec(
        id=0,
        class_id=class_id,
        command=payload.command,
        script_id=payload.scriptId,
        params=params,
        watchdog=watchdog,
        user_id=user.id,
        retries=retries or 0,
        retry_delay=retry_delay or 0.0,
        retry_on=retry_on or "infra",
    )
    values: dict[str, Any] = {
        "command": payload.command,
        "script_id": payload.scriptId,
        "params": params if payload.scriptId is not None else None,
        "class_id": class_id,
        "user_id": user.id,
        "watchdog": watchdog,
        "need_realtime": payload.need_realtime,
        "created_at": utcnow(),
        "attempt": 1,
        "log_bytes": 0,
        "log_truncated": False,
        "run_token": spec.run_token,
        "retries": spec.retries,
        "retry_delay": spec.retry_delay,
        "retry_on": spec.retry_on,
    }
    return spec, values


def _check_script(engine: Engine, script_id: int) -> scripts.Script:
    try:
        return scripts.get_script(engine, script_id)
    except NotFoundError as exc:
        raise InvalidInputError(
            f"unknown scriptId {script_id}: list stored scripts with "
            "GET /api/v1/scripts",
            field="scriptId",
        ) from exc


async def _final_answer(
    engine: Engine, settings: Settings, job_id: int
) -> dict[str, Any]:
    row = await asyncio.to_thread(jobs.get_job_row, engine, job_id)
    limit = settings.wait_output_limit_bytes
    stdout, out_cut = await asyncio.to_thread(
        _read_limited, engine, job_id, STDOUT, limit
    )
    stderr, err_cut = await asyncio.to_thread(
        _read_limited, engine, job_id, STDERR, limit
    )
    return {
        "result": row.state == jobs.SUCCEEDED,
        "message": f"Job {job_id} ended {row.state}",
        "state": row.state,
        "exit_code": row.exit_code,
        "signal": row.signal,
        "reason": row.reason,
        "stdout": stdout.decode(errors="replace"),
        "stderr": stderr.decode(errors="replace"),
        "output_truncated": out_cut or err_cut or bool(row.log_truncated),
        "output_limit_bytes": limit,
    }


def _read_limited(
    engine: Engine, job_id: int, stream: int, limit: int
) -> tuple[bytes, bool]:
    data = bytearray()
    for _, chunk in outputs.iter_output(engine, job_id, stream):
        data.extend(chunk)
        if len(data) > limit:
            return bytes(data[:limit]), True
    return bytes(data), False
