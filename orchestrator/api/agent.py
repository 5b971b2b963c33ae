"""Routes under /api/v1/agent that pull agents call with their worker token.

The status code gives the agent its next step. 200 means done, and 401 or 403
a wrong token. 409 means try again later, except for accept, where it means do
not start the job. 410 means that the job has ended here, so the agent kills it
and drops its output. 413 means send smaller batches.
"""

import asyncio
import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field

from orchestrator import agent as agent_client
from orchestrator import jobs, security, workers
from orchestrator.api import deps
from orchestrator.exceptions import (
    AuthenticationError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
)
from orchestrator.transports.agent import AgentExecution, AgentTransport
from orchestrator.transports.base import STDERR, STDOUT, ExitResult, signal_name

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/agent", tags=["agent"])

TOKEN_CACHE_SECONDS = 30.0
FINISH_WAIT_SECONDS = 20.0
MAX_POLL_WAIT_SECONDS = 300.0


class HeldJob(BaseModel):
    """A job that the agent runs or still has output or an exit status for."""

    id: int
    delivery: str = Field(max_length=64)
    started: bool = Field(
        default=True, description="False while the agent waits for its acceptance"
    )


class PollRequest(BaseModel):
    """A heartbeat that also requests work."""

    instance: str = Field(min_length=1, max_length=64)
    seq: int = Field(ge=0, description="Increases with every poll of one instance")
    hostname: str = Field(default="", max_length=255)
    version: str = Field(default="", max_length=32)
    wait: float = Field(
        default=20, ge=0, le=MAX_POLL_WAIT_SECONDS, description="Seconds to hold"
    )
    jobs: list[HeldJob] = Field(default_factory=list)
    killed: list[int] = Field(
        default_factory=list, description="Jobs whose kill request the agent got"
    )


class AcceptRequest(BaseModel):
    """The agent's request to start an offered job."""

    delivery: str = Field(max_length=64)
    instance: str = Field(min_length=1, max_length=64)
    seq: int = Field(ge=0, description="Seq of the poll that offered the job")


class FinishRequest(BaseModel):
    """The end of a job on the agent, sent after all of its output."""

    delivery: str = Field(max_length=64)
    exit_code: int | None = None
    signal: str | int | None = None
    error: str | None = Field(default=None, max_length=4096)
    stdout_bytes: int = Field(default=0, ge=0)
    stderr_bytes: int = Field(default=0, ge=0)


async def current_agent(
    request: Request, engine: deps.EngineDep, dispatcher: deps.DispatcherDep
) -> AgentTransport:
    """Resolve the bearer token to the transport of its agent worker."""
    token = deps.bearer_key(request)
    if not token:
        raise AuthenticationError(
            "missing agent token: send an 'Authorization: Bearer TOKEN' header",
            field="Authorization",
        )
    token_hash = security.hash_api_key(token)
    worker_id = await _worker_for_token(request, engine, token_hash)
    transport = dispatcher.agents.get(worker_id)
    if transport is None:
        # The worker was added after the last inventory reload.
        await dispatcher.refresh_workers()
        transport = dispatcher.agents.get(worker_id)
    if transport is None:
        raise HTTPException(503, "the worker is not loaded yet: try again")
    return transport


AgentDep = Annotated[AgentTransport, Depends(current_agent)]


@router.post("/poll")
async def poll(body: PollRequest, agent: AgentDep) -> dict[str, Any]:
    """Record a heartbeat and return offered jobs, kill requests and jobs to drop.

    Waits up to ``wait`` seconds (capped below the heartbeat timeout) until
    there is something new for the agent.
    """
    agent.heartbeat(body.instance, body.hostname)
    agent_jobs = {job.id: (job.delivery, job.started) for job in body.jobs}
    drops = await agent.reconcile(agent_jobs, set(body.killed), body.instance, body.seq)
    if not drops:
        await agent.wait_for_news(agent.hold_seconds(body.wait))
    return agent.poll_response(drops)


@router.post("/jobs/{job_id}/accept")
async def accept_job(job_id: int, body: AcceptRequest, agent: AgentDep) -> Any:
    """Confirm that the agent may start an offered job; 409 means it must not."""
    agent.heartbeat()
    if not agent.accept(job_id, body.delivery, body.instance, body.seq):
        raise ConflictError(
            f"job {job_id} is not offered to this agent as delivery "
            f"{body.delivery!r}: do not start it"
        )
    logger.info(
        "Agent of worker %s accepted job %d",
        agent.name,
        job_id,
        extra={"event": "agent_job_accepted", "job": job_id, "worker": agent.name},
    )
    return {"start": True}


@router.post(
    "/jobs/{job_id}/output",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string"}}},
        }
    },
)
async def append_output(
    job_id: int,
    request: Request,
    agent: AgentDep,
    engine: deps.EngineDep,
    dispatcher: deps.DispatcherDep,
    delivery: str = Query(..., max_length=64),
) -> dict[str, int]:
    """Store output frames and return the bytes stored per stream.

    The body is a sequence of frames, each a header of stream (1 byte, 1 or
    2), byte offset in that stream (8 bytes) and length (4 bytes), all
    big-endian, followed by that many bytes of output.
    """
    agent.heartbeat()
    execution = await _tracked_execution(engine, agent, job_id, delivery)
    chunks = parse_frames(await request.body())
    running = dispatcher.running.get(job_id)
    writer = running.writer if running is not None else None
    if writer is None:
        raise ConflictError(f"job {job_id} is not ready for output yet: try again")
    return await execution.receive(chunks, writer.flush)


@router.post("/jobs/{job_id}/finish")
async def finish_job(
    job_id: int,
    body: FinishRequest,
    agent: AgentDep,
    engine: deps.EngineDep,
    dispatcher: deps.DispatcherDep,
) -> dict[str, Any]:
    """Record how the job ended and return its state; repeating it is safe.

    The response comes after the dispatcher has stored the end (or queued the
    job for another attempt), so the agent may then delete its copy.
    """
    agent.heartbeat()
    execution = agent.executions.get(job_id)
    if execution is not None and execution.delivery == body.delivery:
        running = dispatcher.running.get(job_id)
        execution.resolve(_exit_result(execution, body))
        if running is not None and running.task is not None:
            await asyncio.wait({running.task}, timeout=FINISH_WAIT_SECONDS)
    else:
        await _require_running_here(engine, agent, job_id, body.delivery, True)
    row = await asyncio.to_thread(jobs.get_job_row, engine, job_id)
    if row.state == jobs.RUNNING and row.worker_id == agent.worker_id:
        raise ConflictError(f"job {job_id} is still being recorded: try again")
    return {"id": job_id, "state": row.state}


def parse_frames(body: bytes) -> list[tuple[int, int, bytes]]:
    """Split an output body into (stream, offset, data) chunks."""
    header = agent_client.FRAME_HEADER
    chunks = []
    position = 0
    while position < len(body):
        if len(body) - position < header.size:
            raise InvalidInputError("the output body ends inside a frame header")
        stream, offset, length = header.unpack_from(body, position)
        position += header.size
        if stream not in (STDOUT, STDERR):
            raise InvalidInputError(f"invalid stream {stream} in output frame")
        if position + length > len(body):
            raise InvalidInputError("the output body ends inside a frame")
        chunks.append((stream, offset, body[position : position + length]))
        position += length
    return chunks


def _exit_result(execution: AgentExecution, body: FinishRequest) -> ExitResult:
    stdout, stderr = execution.received()
    missing = (body.stdout_bytes - stdout, body.stderr_bytes - stderr)
    if any(count > 0 for count in missing):
        logger.warning(
            "Job %d ended with output missing: %d stdout and %d stderr bytes",
            execution.job_id,
            max(missing[0], 0),
            max(missing[1], 0),
            extra={"event": "agent_output_missing", "job": execution.job_id},
        )
    signal = signal_name(body.signal) if body.signal is not None else None
    if body.error is not None:
        return ExitResult(exit_code=body.exit_code, signal=signal, error=body.error)
    if body.exit_code is None and signal is None:
        return ExitResult(error="the agent reported neither an exit code nor a signal")
    return ExitResult(exit_code=body.exit_code, signal=signal)


async def _tracked_execution(
    engine: Any, agent: AgentTransport, job_id: int, delivery: str
) -> AgentExecution:
    execution = agent.executions.get(job_id)
    if execution is not None and execution.delivery == delivery:
        return execution
    await _require_running_here(engine, agent, job_id, delivery, False)
    raise ConflictError(f"job {job_id} is not tracked yet: try again")


async def _require_running_here(
    engine: Any, agent: AgentTransport, job_id: int, delivery: str, ended_ok: bool
) -> None:
    """Raise 410 when the job has ended, belongs elsewhere or was offered again.

    With ``ended_ok`` a job that has ended on this worker passes, so that a
    repeated finish report gets the same response as the first one.
    """
    execution = agent.executions.get(job_id)
    if execution is not None and execution.delivery != delivery:
        raise HTTPException(
            410, f"delivery {delivery!r} of job {job_id} was replaced: drop it"
        )
    try:
        row = await asyncio.to_thread(jobs.get_job_row, engine, job_id)
    except NotFoundError as exc:
        raise HTTPException(410, f"job {job_id} does not exist: drop it") from exc
    if row.worker_id != agent.worker_id:
        raise HTTPException(410, f"job {job_id} is not assigned to this worker")
    if row.state in jobs.FINAL_STATES and not ended_ok:
        raise HTTPException(410, f"job {job_id} has ended ({row.state}): drop it")


async def _worker_for_token(request: Request, engine: Any, token_hash: str) -> int:
    cache: dict[str, tuple[int, float]] | None = getattr(
        request.app.state, "agent_tokens", None
    )
    if cache is None:
        cache = request.app.state.agent_tokens = {}
    now = time.monotonic()
    cached = cache.get(token_hash)
    if cached is not None and cached[1] > now:
        return cached[0]
    record = await asyncio.to_thread(workers.get_worker_by_token, engine, token_hash)
    if record is None:
        cache.pop(token_hash, None)
        raise AuthenticationError(
            "invalid agent token: 'jobbalancer worker token NAME' issues a new one",
            field="Authorization",
        )
    if record.transport != "agent":
        raise PermissionDeniedError(
            f"worker {record.name} uses the {record.transport} transport, not agent"
        )
    cache[token_hash] = (record.id, now + TOKEN_CACHE_SECONDS)
    return record.id
