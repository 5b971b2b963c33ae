"""Run jobs on workers whose agent pulls them over HTTP (the ``agent`` transport).

The agent (``orchestrator/agent.py``) long-polls the server. A job started here
waits in the worker's mailbox as an offer, named by the run id of its attempt,
until the agent accepts it. The agent runs a job only after the server has
confirmed its acceptance and never starts a run id twice, so a lost response
never makes a job run twice. Output arrives as chunks tagged with a stream and a byte
offset, so a chunk that is sent again is skipped. A poll that has nothing to
return is held open and woken by an ``asyncio.Event`` when a job or a kill
request comes in, so the agent hears of a kill at once.

After a server restart the dispatcher starts its running jobs again with the
offsets already stored. The agent lists the jobs it has in every poll, so an
offer of a job that it already runs turns into that running job.
"""

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import Engine

from orchestrator import jobs, workers
from orchestrator.config import Settings
from orchestrator.exceptions import NotFoundError
from orchestrator.transports.base import (
    STDERR,
    STDOUT,
    ExitResult,
    OutputSink,
    RunSpec,
    TransportError,
)

logger = logging.getLogger(__name__)

POLL_HOLD_MAX_SECONDS = 20.0
# A held poll returns before a third of the heartbeat timeout has passed, so a
# healthy agent always polls again well inside the timeout.
POLL_HOLD_FRACTION = 1 / 3

OFFERED = "offered"
ACCEPTED = "accepted"
# Killed while offered: the agent's next poll shows whether it has the job.
WITHDRAWN = "withdrawn"

Flush = Callable[[], Awaitable[None]]


class AgentExecution:
    """A job offered to an agent, until the agent reports its end."""

    def __init__(
        self,
        transport: "AgentTransport",
        job_id: int,
        delivery: str,
        sink: OutputSink,
        payload: dict[str, Any],
        offsets: tuple[int, int],
    ):
        self.transport = transport
        self.job_id = job_id
        self.delivery = delivery
        self.payload = payload
        self.state = OFFERED
        self.stream_bytes = {STDOUT: offsets[0], STDERR: offsets[1]}
        self.kill_grace: float | None = None
        self.kill_acknowledged = False
        # The agent instance and poll seq that accepted the job.
        self.accepted_by: tuple[str, int] | None = None
        self.sink = sink
        self._lock = asyncio.Lock()
        self._result: asyncio.Future[ExitResult] = (
            asyncio.get_running_loop().create_future()
        )

    async def wait(self) -> ExitResult:
        """Wait until the agent reports the end or the job is given up as lost."""
        return await asyncio.shield(self._result)

    async def kill(self, grace_seconds: float) -> None:
        """Ask the agent to kill the job's process group at its next poll."""
        self.transport.request_kill(self, grace_seconds)

    def received(self) -> tuple[int, int]:
        """Return the bytes of stdout and stderr received so far."""
        return self.stream_bytes[STDOUT], self.stream_bytes[STDERR]

    @property
    def done(self) -> bool:
        """Whether the job's end is known."""
        return self._result.done()

    def resolve(self, result: ExitResult) -> None:
        """End the execution with ``result``; later reports are ignored."""
        if self.transport.executions.get(self.job_id) is self:
            del self.transport.executions[self.job_id]
        if not self._result.done():
            self._result.set_result(result)

    def stored_offsets(self) -> dict[str, int]:
        """Return the bytes received per stream in the form the agent reads."""
        return {
            "stdout": self.stream_bytes[STDOUT],
            "stderr": self.stream_bytes[STDERR],
        }

    async def receive(
        self, chunks: list[tuple[int, int, bytes]], flush: Flush
    ) -> dict[str, int]:
        """Pass new output to the sink, store it, and return the new offsets.

        A chunk that starts before the received offset of its stream was sent
        before, so its known part is skipped. The offsets are returned only
        after ``flush`` has stored the output, because the agent deletes what
        the server acknowledges.
        """
        async with self._lock:
            for stream, offset, data in chunks:
                have = self.stream_bytes[stream]
                if offset > have:
                    logger.warning(
                        "Output of job %d has a gap on stream %d: %d bytes missing",
                        self.job_id,
                        stream,
                        offset - have,
                        extra={"event": "agent_output_gap", "job": self.job_id},
                    )
                    have = self.stream_bytes[stream] = offset
                piece = data[have - offset :]
                if piece:
                    await self.sink(stream, piece)
                    self.stream_bytes[stream] += len(piece)
            await flush()
            return self.stored_offsets()


class AgentTransport:
    """The mailbox and liveness of one agent worker."""

    def __init__(self, hub: "AgentHub", record: workers.WorkerRecord):
        self.hub = hub
        self.worker_id = record.id
        self.name = record.name
        self.executions: dict[int, AgentExecution] = {}
        self.last_heartbeat: float | None = None
        self.instance: str | None = None
        self.last_seq = -1
        self._wakeup = asyncio.Event()
        self._grace_timer: asyncio.TimerHandle | None = None

    async def start(
        self, spec: RunSpec, sink: OutputSink, offsets: tuple[int, int] = (0, 0)
    ) -> AgentExecution:
        """Offer the job to the agent; it starts when the agent accepts it.

        ``offsets`` are the bytes of stdout and stderr already stored, when the
        job ran on the agent before a server restart.
        """
        delivery = spec.run_id or str(spec.job_id)
        current = self.executions.get(spec.job_id)
        if current is not None and current.delivery == delivery:
            current.sink = sink
            return current
        if current is not None:
            current.resolve(ExitResult(error="replaced by a new attempt"))
        watchdog = await asyncio.to_thread(self._watchdog_of, spec.job_id)
        payload = self.hub.delivery_payload(spec, delivery, watchdog)
        execution = AgentExecution(self, spec.job_id, delivery, sink, payload, offsets)
        self.executions[spec.job_id] = execution
        self._wakeup.set()
        if not self.alive():
            await self.close()
        return execution

    def forget(self, spec: RunSpec) -> None:
        """Do nothing: the agent deletes its copy once the end is recorded."""

    async def check(self) -> None:
        """Raise TransportError when the agent's heartbeats have stopped."""
        if self.last_heartbeat is None:
            raise TransportError(
                "the agent has not connected since the server started",
                worker=self.name,
            )
        silent = time.monotonic() - self.last_heartbeat
        if silent > self.hub.settings.agent_heartbeat_timeout_seconds:
            raise TransportError(
                f"no heartbeat from the agent for {silent:.0f} s", worker=self.name
            )

    async def close(self) -> None:
        """Start the grace after which the jobs of a silent agent end as lost.

        The dispatcher calls this when the worker goes offline. A heartbeat
        within reattach_grace_seconds cancels the grace.
        """
        if self._grace_timer is not None or not self.executions:
            return
        grace = self.hub.settings.reattach_grace_seconds
        loop = asyncio.get_running_loop()
        self._grace_timer = loop.call_later(grace, self._expire)

    def alive(self) -> bool:
        """Return whether the agent sent a heartbeat within the timeout."""
        if self.last_heartbeat is None:
            return False
        silent = time.monotonic() - self.last_heartbeat
        return silent <= self.hub.settings.agent_heartbeat_timeout_seconds

    def heartbeat(self, instance: str | None = None, hostname: str = "") -> None:
        """Record that the agent is alive, and cancel a running grace."""
        self.last_heartbeat = time.monotonic()
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        if instance is not None and instance != self.instance:
            logger.info(
                "Agent of worker %s connected from %s (instance %s)",
                self.name,
                hostname or "an unnamed host",
                instance,
                extra={"event": "agent_connected", "worker": self.name},
            )
            self.instance = instance
            self.last_seq = -1
        self.hub.on_heartbeat(self.worker_id)

    def request_kill(self, execution: AgentExecution, grace_seconds: float) -> None:
        """Queue a kill request, and withdraw the offer of a job not yet accepted.

        An offered job may already run on the agent (its acceptance got lost,
        or the server restarted), so the next poll settles it: see reconcile.
        """
        if execution.done:
            return
        if execution.kill_grace is None:
            execution.kill_grace = grace_seconds
        if execution.state == OFFERED:
            execution.state = WITHDRAWN
        self._wakeup.set()

    def accept(self, job_id: int, delivery: str, instance: str, seq: int) -> bool:
        """Confirm that the agent may start a job; False means it must not."""
        execution = self.executions.get(job_id)
        if execution is None or execution.delivery != delivery:
            return False
        if execution.state == WITHDRAWN:
            return False
        if execution.state == OFFERED:
            execution.state = ACCEPTED
            execution.accepted_by = (instance, seq)
        # Accepting the same delivery again returns True again, because the
        # agent retries when a response is lost.
        return True

    async def reconcile(
        self,
        agent_jobs: dict[int, tuple[str, bool]],
        killed: set[int],
        instance: str,
        seq: int,
    ) -> list[int]:
        """Compare the agent's jobs with ours; return the ids it must drop.

        ``agent_jobs`` maps the ids of the jobs that the agent runs or still reports
        on to their run id and whether it has started them. An offered job
        that the agent lists is its own already (it ran before a server
        restart, or its acceptance got lost). An accepted job that it no longer
        lists has been lost on its side. A job that it lists and we do not
        track has ended here, so the agent kills it and drops its output.
        """
        if instance == self.instance and seq <= self.last_seq:
            return []
        self.last_seq = seq
        drops: list[int] = []
        for execution in list(self.executions.values()):
            if execution.job_id in killed:
                execution.kill_acknowledged = True
            delivery, started = agent_jobs.get(execution.job_id, ("", False))
            if delivery == execution.delivery:
                if execution.state == WITHDRAWN and not started:
                    drops.append(execution.job_id)
                    execution.resolve(_never_started())
                elif execution.state != ACCEPTED:
                    execution.state = ACCEPTED
                    execution.accepted_by = (instance, seq)
            elif execution.state == WITHDRAWN:
                execution.resolve(_never_started())
            elif _should_hold(execution, instance, seq):
                execution.resolve(
                    ExitResult(error="the agent no longer has the job (it restarted)")
                )
        unknown: list[int] = []
        for job_id, (delivery, _) in agent_jobs.items():
            tracked = self.executions.get(job_id)
            if tracked is None and job_id not in drops:
                unknown.append(job_id)
            elif tracked is not None and tracked.delivery != delivery:
                drops.append(job_id)
        if unknown:
            drops += await asyncio.to_thread(self._ended_jobs, unknown)
        return drops

    async def wait_for_news(self, hold_seconds: float) -> None:
        """Return when there is something new for the agent or the hold ends."""
        deadline = time.monotonic() + hold_seconds
        while not self._has_news():
            self._wakeup.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def poll_response(self, drops: list[int]) -> dict[str, Any]:
        """Build the response to a poll: offered jobs, kills and jobs to drop."""
        executions = list(self.executions.values())
        return {
            "jobs": [e.payload for e in executions if e.state == OFFERED],
            "kill": [
                {"id": e.job_id, "grace": e.kill_grace}
                for e in executions
                if e.kill_grace is not None
            ],
            "drop": drops,
        }

    def hold_seconds(self, requested: float) -> float:
        """Return how long a poll may wait for news."""
        timeout = self.hub.settings.agent_heartbeat_timeout_seconds
        limit = min(timeout * POLL_HOLD_FRACTION, POLL_HOLD_MAX_SECONDS)
        return max(0.0, min(requested, limit))

    def _has_news(self) -> bool:
        return any(
            e.state in (OFFERED, WITHDRAWN)
            or (e.kill_grace is not None and not e.kill_acknowledged)
            for e in self.executions.values()
        )

    def _expire(self) -> None:
        self._grace_timer = None
        if self.alive():
            return
        grace = self.hub.settings.reattach_grace_seconds
        for execution in list(self.executions.values()):
            logger.warning(
                "Giving up job %d: the agent of worker %s is silent past a %s s grace",
                execution.job_id,
                self.name,
                grace,
                extra={"event": "agent_job_lost", "job": execution.job_id},
            )
            execution.resolve(
                ExitResult(
                    error=f"the agent sent no heartbeat for {grace} s after "
                    "the worker went offline"
                )
            )

    def _watchdog_of(self, job_id: int) -> float | None:
        try:
            row = jobs.get_job_row(self.hub.engine, job_id)
        except NotFoundError:
            return None
        return row.watchdog  # type: ignore[no-any-return]

    def _ended_jobs(self, job_ids: list[int]) -> list[int]:
        ended = []
        for job_id in job_ids:
            try:
                row = jobs.get_job_row(self.hub.engine, job_id)
            except NotFoundError:
                ended.append(job_id)
                continue
            # A running job of this worker that we do not track is about to be
            # recorded as ended, or is not started again yet after a restart.
            # A later poll settles it.
            if row.state != jobs.RUNNING or row.worker_id != self.worker_id:
                ended.append(job_id)
        return ended


def _never_started() -> ExitResult:
    return ExitResult(started=False, error="killed before the agent started it")


def _should_hold(execution: AgentExecution, instance: str, seq: int) -> bool:
    """Return whether a poll from ``instance`` must list the execution."""
    if execution.state != ACCEPTED or execution.accepted_by is None:
        return False
    accepted_instance, accepted_seq = execution.accepted_by
    # The agent lists a job from the poll after the one it accepted it in.
    return instance != accepted_instance or seq > accepted_seq


class AgentHub:
    """The agent transports of one dispatcher, one per worker id.

    The transport object stays the same when the worker's record changes, so
    the API routes and the dispatcher always share one mailbox per worker.
    """

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        on_heartbeat: Callable[[int], None] = lambda worker_id: None,
    ):
        self.engine = engine
        self.settings = settings
        self.on_heartbeat = on_heartbeat
        self._transports: dict[int, AgentTransport] = {}

    def transport_for(self, record: workers.WorkerRecord) -> AgentTransport:
        """Return the worker's transport, creating it on first use."""
        transport = self._transports.get(record.id)
        if transport is None:
            transport = AgentTransport(self, record)
            self._transports[record.id] = transport
        transport.name = record.name
        return transport

    def get(self, worker_id: int) -> AgentTransport | None:
        """Return the transport of a worker, or None before it is loaded."""
        return self._transports.get(worker_id)

    def delivery_payload(
        self, spec: RunSpec, delivery: str, watchdog: float | None
    ) -> dict[str, Any]:
        """Build the JSON form of a job as the agent receives it."""
        script = None
        if spec.script is not None:
            script = {
                "sha256": spec.script.digest,
                "interpreter": spec.script.interpreter_argv(),
                "body": base64.b64encode(spec.script.body).decode(),
            }
        return {
            "id": spec.job_id,
            "delivery": delivery,
            "command": spec.command,
            "script": script,
            "params": list(spec.params),
            "watchdog": watchdog or self.settings.default_watchdog_seconds or None,
            "kill_grace": self.settings.kill_grace_seconds,
        }
