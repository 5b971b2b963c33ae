"""Queue, placement, capacity, watchdog and liveness of workers."""

import asyncio
import contextlib
import logging
import random
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from orchestrator import db, jobs, keys, metrics, outputs, scripts, workers
from orchestrator.config import Settings
from orchestrator.jobs import JobSpec
from orchestrator.timeutil import as_utc, utcnow
from orchestrator.transports.agent import AgentHub
from orchestrator.transports.base import (
    STDERR,
    Execution,
    ExitResult,
    RunSpec,
    ScriptBody,
    Transport,
    TransportError,
)
from orchestrator.transports.local import LocalTransport
from orchestrator.transports.ssh import HostKeyChangedError, SshTarget, SshTransport

logger = logging.getLogger(__name__)

WORKER_REFRESH_SECONDS = 1.0
REATTACH_PAUSE_SECONDS = 1.0
RETRY_MARKER = b"\n[jobbalancer: starting attempt %d after: %s]\n"
CHECK_TIMEOUT_MARGIN_SECONDS = 5.0
KILL_WAIT_MARGIN_SECONDS = 15.0
LAST_SEEN_WRITE_SECONDS = 60.0


@dataclass
class WorkerRuntime:
    """A worker as the dispatcher tracks it in memory."""

    record: workers.WorkerRecord
    transport: Transport
    state: str = "offline"
    reason: str | None = "not checked yet"
    running: set[int] = field(default_factory=set)
    reserved: int = 0
    checking: bool = False
    # Loop time when last_seen_at was last written for this worker.
    seen_written: float = float("-inf")

    def free_slots(self) -> int:
        """Return how many more jobs the worker may take now."""
        return self.record.max_jobs - len(self.running) - self.reserved

    def accepts_jobs(self) -> bool:
        """Return whether new jobs may be placed on the worker."""
        record = self.record
        return (
            record.enabled
            and not record.draining
            and self.state == "online"
            and self.free_slots() > 0
        )

    def public_state(self) -> str:
        """Return the state shown to users."""
        if not self.record.enabled:
            return "disabled"
        if self.record.draining and self.state == "online":
            return "draining"
        return self.state


@dataclass
class RunningJob:
    """A job that occupies a slot on a worker."""

    spec: JobSpec
    worker: WorkerRuntime
    task: asyncio.Task[None] | None = None
    execution: Execution | None = None
    writer: outputs.OutputWriter | None = None
    stop_state: str | None = None


class Dispatcher:
    """Place jobs on workers as slots free up and record how they end."""

    def __init__(self, engine: Engine, settings: Settings):
        self.engine = engine
        self.settings = settings
        self.workers: dict[int, WorkerRuntime] = {}
        self.running: dict[int, RunningJob] = {}
        self.queues: dict[int, deque[JobSpec]] = {}
        self._cursor: dict[int, int] = {}
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._script_dir = settings.data_path() / "scripts"
        self.strategy = settings.strategy
        self.on_job_finished: list[Callable[[int, str], None]] = []
        self.agents = AgentHub(engine, settings, self._agent_polled)
        self.inserter = jobs.JobInserter(engine)

    async def start(self) -> None:
        """Load workers and unfinished jobs, then start the background loops."""
        await self.refresh_workers()
        await self._recover_jobs()
        self._spawn(self._refresh_loop())
        self._spawn(self._liveness_loop())
        for worker in list(self.workers.values()):
            self._pump(worker.record.class_id)

    async def stop(self) -> None:
        """Stop the loops and close transports; running jobs are left to recovery."""
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for worker in self.workers.values():
            with contextlib.suppress(Exception):
                await worker.transport.close()

    # Submission and placement

    async def submit(
        self,
        spec: JobSpec,
        values: dict[str, Any],
        realtime: bool,
        audit_entry: dict[str, Any] | None = None,
    ) -> str:
        """Insert a job and place it at once when a slot is free.

        Returns the job's first state: running, waiting or occupied.
        """
        worker = self._choose_worker(spec.class_id)
        if worker is None and realtime:
            values.update(
                state=jobs.OCCUPIED,
                finished_at=utcnow(),
                reason="no free worker slot and need_realtime was set",
            )
            spec.id = await self.inserter.insert(values, audit_entry)
            return jobs.OCCUPIED
        if worker is None:
            values.update(state=jobs.WAITING)
            spec.id = await self.inserter.insert(values, audit_entry)
            self.queues.setdefault(spec.class_id, deque()).append(spec)
            # A slot may have freed while the row was being written.
            self._pump(spec.class_id)
            return jobs.WAITING
        worker.reserved += 1
        try:
            values.update(
                state=jobs.RUNNING, worker_id=worker.record.id, started_at=utcnow()
            )
            spec.id = await self.inserter.insert(values, audit_entry)
        finally:
            worker.reserved -= 1
        self._launch(spec, worker, marked=True)
        return jobs.RUNNING

    def class_has_usable_worker(self, class_id: int) -> bool:
        """Return whether an enabled, online, not draining worker is in a class."""
        return any(
            w.record.class_id == class_id
            and w.record.enabled
            and not w.record.draining
            and w.state == "online"
            for w in self.workers.values()
        )

    def _choose_worker(
        self, class_id: int, avoid: int | None = None
    ) -> WorkerRuntime | None:
        candidates = [
            w
            for w in self.workers.values()
            if w.record.class_id == class_id and w.accepts_jobs()
        ]
        if not candidates:
            return None
        # A retry goes to another worker when one is free.
        others = [w for w in candidates if w.record.id != avoid]
        candidates = others or candidates
        if self.strategy == "least_loaded":
            return min(
                candidates,
                key=lambda w: (len(w.running) + w.reserved) / w.record.max_jobs,
            )
        if self.strategy == "random":
            return random.choice(candidates)
        candidates.sort(key=lambda w: w.record.id)
        cursor = self._cursor.get(class_id, 0)
        for worker in candidates:
            if worker.record.id >= cursor:
                break
        else:
            worker = candidates[0]
        self._cursor[class_id] = worker.record.id + 1
        return worker

    def _pump(self, class_id: int) -> None:
        """Place queued jobs of a class while workers have free slots."""
        queue = self.queues.get(class_id)
        while queue and not self._stopping:
            worker = self._choose_worker(class_id, avoid=queue[0].avoid_worker_id)
            if worker is None:
                return
            spec = queue.popleft()
            self._launch(spec, worker, marked=False)

    def _launch(self, spec: JobSpec, worker: WorkerRuntime, *, marked: bool) -> None:
        job = RunningJob(spec, worker)
        worker.running.add(spec.id)
        self.running[spec.id] = job
        job.task = self._spawn(self._run(job, marked))

    # Running

    async def _run(self, job: RunningJob, marked: bool) -> None:
        spec, worker = job.spec, job.worker
        requeued = False
        try:
            if not marked:
                await db.retrying(
                    jobs.mark_running,
                    self.engine,
                    spec.id,
                    worker.record.id,
                    spec.run_token,
                )
            requeued = await self._execute(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("Job %d failed inside the server", spec.id)
            await self._finish(job, jobs.FAILED, reason=f"internal error: {exc}")
        finally:
            worker.running.discard(spec.id)
            self.running.pop(spec.id, None)
            if not requeued and not self._stopping:
                self._wake(spec.id)
            self._pump(worker.record.class_id)

    async def _execute(self, job: RunningJob) -> bool:
        """Run one job to its end; return True when it went back to the queue."""
        spec, worker = job.spec, job.worker
        run_spec = await self._build_run_spec(spec)
        writer = outputs.OutputWriter(
            self.engine, spec.id, self.settings.max_log_bytes, spec.attempt
        )
        job.writer = writer
        offsets = (0, 0)
        if spec.resume_offsets is not None or spec.attempt > 1:
            stored = await writer.resume()
            if spec.resume_offsets is not None:
                offsets = stored
        if spec.started_monotonic is None:
            spec.started_monotonic = asyncio.get_running_loop().time()
        result = await self._follow(job, run_spec, offsets)
        if result is None:
            return True
        await writer.close()
        state, reason = _final_state(job.stop_state, result)
        if self._should_retry(spec, state):
            worker.transport.forget(run_spec)
            await self._schedule_retry(job, reason or state)
            return True
        await self._finish(
            job, state, exit_code=result.exit_code, signal=result.signal, reason=reason
        )
        worker.transport.forget(run_spec)
        return False

    async def _follow(
        self, job: RunningJob, run_spec: RunSpec, offsets: tuple[int, int]
    ) -> ExitResult | None:
        """Start or attach to the job and follow it, attaching again after a
        dropped connection until reattach_grace_seconds pass.

        Returns None when the job never started and went back to the queue.
        """
        spec, worker = job.spec, job.worker
        grace = self.settings.reattach_grace_seconds
        attached = spec.resume_offsets is not None
        lost_since: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            # A connect to a silent network blocks for up to
            # ssh_connect_timeout_seconds, so a reattach is cut short where the
            # grace ends instead of stretching it by that much.
            timeout = None
            if lost_since is not None:
                timeout = max(0.0, grace - (loop.time() - lost_since))
            try:
                execution = await asyncio.wait_for(
                    worker.transport.start(
                        run_spec, job.writer.write if job.writer else _discard, offsets
                    ),
                    timeout,
                )
            except TimeoutError:
                if timeout is None:
                    raise
                return ExitResult(
                    error=f"lost contact with the worker: no reattach within {grace} s"
                )
            except TransportError as exc:
                if not attached:
                    return await self._handle_start_failure(job, exc)
                lost_since = lost_since if lost_since is not None else loop.time()
                if loop.time() - lost_since >= grace:
                    return ExitResult(error=f"lost contact with the worker: {exc}")
                await asyncio.sleep(REATTACH_PAUSE_SECONDS)
                continue
            if not attached:
                latency = (utcnow() - as_utc(spec.created_at)).total_seconds()
                metrics.DISPATCH_LATENCY.observe(max(0.0, latency))
                logger.info(
                    "Started job %d on %s",
                    spec.id,
                    worker.record.name,
                    extra={
                        "event": "job_started",
                        "job": spec.id,
                        "worker": worker.record.name,
                    },
                )
            elif lost_since is not None or spec.resume_offsets is not None:
                logger.warning(
                    "Attached again to job %d on %s",
                    spec.id,
                    worker.record.name,
                    extra={"event": "job_reattached", "job": spec.id},
                )
            attached = True
            job.execution = execution
            if job.stop_state is not None:
                self._spawn(self._kill_execution(job, execution))
            result = await self._wait_with_watchdog(job, execution)
            offsets = execution.received()
            if result.error is None or not _reattachable(worker):
                return result
            if self._stopping:
                # The job keeps running; the next start attaches to it again.
                return None
            lost_since = lost_since if lost_since is not None else loop.time()
            if loop.time() - lost_since >= grace:
                return result
            logger.warning(
                "Lost the connection to job %d on %s, attaching again: %s",
                spec.id,
                worker.record.name,
                result.error,
                extra={"event": "job_connection_lost", "job": spec.id},
            )
            await asyncio.sleep(REATTACH_PAUSE_SECONDS)

    async def _handle_start_failure(
        self, job: RunningJob, exc: TransportError
    ) -> ExitResult | None:
        spec, worker = job.spec, job.worker
        if not exc.retryable or job.stop_state is not None:
            return ExitResult(error=f"could not start: {exc}", started=False)
        # The job never ran: queue it again and take the worker out of rotation
        # until the next liveness check succeeds.
        logger.warning(
            "Could not start job %d on %s, queueing it again: %s",
            spec.id,
            worker.record.name,
            exc,
            extra={"event": "job_requeued", "job": spec.id},
        )
        await self._set_offline(worker, str(exc))
        await db.retrying(jobs.mark_waiting, self.engine, spec.id, str(exc))
        spec.started_monotonic = None
        self.queues.setdefault(spec.class_id, deque()).appendleft(spec)
        return None

    def _should_retry(self, spec: JobSpec, state: str) -> bool:
        if spec.attempt > spec.retries or self._stopping:
            return False
        if state == jobs.LOST:
            return True
        return state == jobs.FAILED and spec.retry_on == "any"

    async def _schedule_retry(self, job: RunningJob, reason: str) -> None:
        spec = job.spec
        spec.attempt += 1
        spec.run_token = secrets.token_hex(8)
        spec.avoid_worker_id = job.worker.record.id
        spec.resume_offsets = None
        spec.started_monotonic = None
        if job.writer is not None:
            await job.writer.write(
                STDERR, RETRY_MARKER % (spec.attempt, reason.encode(errors="replace"))
            )
            await job.writer.close()
        await db.retrying(
            jobs.mark_retry, self.engine, spec, f"attempt {spec.attempt - 1}: {reason}"
        )
        logger.warning(
            "Job %d ended %s, running attempt %d of %d",
            spec.id,
            reason,
            spec.attempt,
            spec.retries + 1,
            extra={"event": "job_retry", "job": spec.id},
        )
        self._spawn(self._enqueue_later(spec, spec.retry_delay))

    async def _enqueue_later(self, spec: JobSpec, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        self.queues.setdefault(spec.class_id, deque()).append(spec)
        self._pump(spec.class_id)

    async def _wait_with_watchdog(
        self, job: RunningJob, execution: Execution
    ) -> ExitResult:
        wait_task = asyncio.ensure_future(execution.wait())
        watchdog = job.spec.watchdog or self.settings.default_watchdog_seconds or None
        timeout = None
        if watchdog is not None and job.spec.started_monotonic is not None:
            elapsed = asyncio.get_running_loop().time() - job.spec.started_monotonic
            timeout = max(0.0, watchdog - elapsed)
        done, _ = await asyncio.wait({wait_task}, timeout=timeout)
        if not done and job.stop_state is None:
            job.stop_state = jobs.TIMED_OUT
            logger.warning(
                "Watchdog of %s s ended job %d",
                watchdog,
                job.spec.id,
                extra={"event": "job_timed_out", "job": job.spec.id},
            )
            await self._kill_execution(job, execution)
        return await wait_task

    async def _kill_execution(self, job: RunningJob, execution: Execution) -> None:
        try:
            await execution.kill(self.settings.kill_grace_seconds)
        except TransportError as exc:
            logger.warning("Killing job %d failed: %s", job.spec.id, exc)

    async def _build_run_spec(self, spec: JobSpec) -> RunSpec:
        if spec.script_id is None:
            return RunSpec.for_command(spec.id, spec.command or "", spec.run_id)
        script = await db.retrying(scripts.get_script, self.engine, spec.script_id)
        body = ScriptBody(script.body.encode(), script.interpreter)
        return RunSpec(
            spec.id, script=body, params=list(spec.params), run_id=spec.run_id
        )

    async def _finish(
        self,
        job: RunningJob,
        state: str,
        *,
        exit_code: int | None = None,
        signal: str | None = None,
        reason: str | None = None,
    ) -> None:
        writer = job.writer
        truncated = writer.truncated if writer else False
        if job.spec.started_monotonic is not None:
            loop = asyncio.get_running_loop()
            metrics.JOB_DURATION.observe(loop.time() - job.spec.started_monotonic)
        await db.retrying(
            jobs.finish_job,
            self.engine,
            job.spec.id,
            state,
            exit_code=exit_code,
            signal=signal,
            reason=reason,
            log_truncated=truncated,
        )
        logger.info(
            "Job %d ended %s on %s (exit %s, signal %s)",
            job.spec.id,
            state,
            job.worker.record.name,
            exit_code,
            signal,
            extra={"event": "job_finished", "job": job.spec.id, "state": state},
        )
        for callback in self.on_job_finished:
            callback(job.spec.id, state)

    # Kill, wait

    async def kill(self, job_id: int) -> bool:
        """Kill a running or waiting job; return False when it is not active."""
        for queue in self.queues.values():
            for spec in queue:
                if spec.id == job_id:
                    queue.remove(spec)
                    await db.retrying(
                        jobs.finish_job,
                        self.engine,
                        job_id,
                        jobs.KILLED,
                        reason="killed while waiting",
                    )
                    self._wake(job_id)
                    return True
        job = self.running.get(job_id)
        if job is None:
            return False
        if job.stop_state is None:
            job.stop_state = jobs.KILLED
            if job.execution is not None:
                await self._kill_execution(job, job.execution)
        if job.task is not None:
            timeout = self.settings.kill_grace_seconds + KILL_WAIT_MARGIN_SECONDS
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(job.task), timeout)
        return True

    async def wait_for_end(self, job_id: int, timeout: float | None) -> None:
        """Wait until a job reaches a final state or the timeout passes."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Registered before the row is read, so a job that ends during the read
        # still wakes this waiter.
        self._waiters.setdefault(job_id, []).append(future)
        try:
            row = await db.retrying(jobs.get_job_row, self.engine, job_id)
            if row.state in jobs.FINAL_STATES:
                return
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            pass
        finally:
            waiters = self._waiters.get(job_id, [])
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._waiters.pop(job_id, None)

    def _wake(self, job_id: int) -> None:
        for future in self._waiters.pop(job_id, []):
            if not future.done():
                future.set_result(None)

    def subscribe(self, job_id: int) -> asyncio.Queue[tuple[int, bytes] | None] | None:
        """Return a queue that receives a running job's new output, or None."""
        job = self.running.get(job_id)
        if job is None or job.writer is None:
            return None
        queue: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue()
        job.writer.listeners.append(queue)
        return queue

    # Workers

    async def refresh_workers(self) -> None:
        """Bring the in-memory inventory in line with the workers table."""
        records = await db.retrying(workers.list_workers, self.engine)
        seen = set()
        for record in records:
            seen.add(record.id)
            runtime = self.workers.get(record.id)
            if runtime is None:
                runtime = self._new_runtime(record)
                self.workers[record.id] = runtime
                if record.enabled:
                    self._spawn(self._check(runtime))
                continue
            self._update_runtime(runtime, record)
        for worker_id in list(self.workers):
            if worker_id not in seen:
                runtime = self.workers.pop(worker_id)
                self._spawn(runtime.transport.close())

    def _new_runtime(self, record: workers.WorkerRecord) -> WorkerRuntime:
        runtime = WorkerRuntime(record, self._make_transport(record))
        if record.transport == "local":
            runtime.state, runtime.reason = "online", None
        return runtime

    def _update_runtime(
        self, runtime: WorkerRuntime, record: workers.WorkerRecord
    ) -> None:
        old = runtime.record
        # A cleared or accepted host key needs a transport that trusts the new one.
        key_reset = old.host_key is not None and record.host_key != old.host_key
        changed = old.connection_fields()[:-1] != record.connection_fields()[:-1]
        if key_reset or changed:
            old_transport = runtime.transport
            runtime.transport = self._make_transport(record)
            if not runtime.running:
                self._spawn(old_transport.close())
        else:
            record.host_key = old.host_key or record.host_key
        runtime.record = record
        if record.enabled and (changed or key_reset or not old.enabled):
            self._spawn(self._check(runtime))
        self._pump(record.class_id)

    def _make_transport(self, record: workers.WorkerRecord) -> Transport:
        if record.transport == "local":
            return LocalTransport(self._script_dir)
        if record.transport == "ssh":
            client_key, key_error = self._load_client_key(record)
            target = SshTarget(
                name=record.name,
                host=record.host,
                port=record.port,
                username=record.username,
                key_path=record.key_path,
                client_key=client_key,
                key_error=key_error,
                max_sessions=record.max_sessions,
                host_key=record.host_key,
                connect_timeout_seconds=self.settings.ssh_connect_timeout_seconds,
                keepalive_seconds=self.settings.ssh_keepalive_seconds,
            )

            async def save_host_key(key: str) -> None:
                await db.retrying(workers.record_host_key, self.engine, record.id, key)

            return SshTransport(target, save_host_key)
        if record.transport == "agent":
            return self.agents.transport_for(record)
        raise ValueError(f"transport {record.transport!r} is not supported")

    def _load_client_key(self, record: workers.WorkerRecord) -> tuple[Any, str | None]:
        """Decrypt the stored key a worker logs in with.

        Returns (key, None), (None, None) when the worker uses a key file or
        the SSH defaults, or (None, reason) when the key cannot be decrypted.
        """
        key_id = record.client_key_id()
        if key_id is None:
            return None, None
        try:
            master_key = keys.load_master_key(self.settings.data_path())
            return keys.load_private_key(self.engine, master_key, key_id), None
        except keys.KeyStoreError as exc:
            logger.error(
                "Cannot load the SSH key of worker %s: %s",
                record.name,
                exc,
                extra={"event": "worker_key_unusable", "worker": record.name},
            )
            return None, f"cannot use the stored SSH key: {exc}"

    def _agent_polled(self, worker_id: int) -> None:
        """Check an agent worker at once when its agent polls while it is offline."""
        worker = self.workers.get(worker_id)
        if worker is not None and worker.state != "online" and worker.record.enabled:
            self._spawn(self._check(worker))

    async def _check(self, worker: WorkerRuntime) -> None:
        if worker.checking or worker.record.transport == "local":
            return
        worker.checking = True
        try:
            timeout = self.settings.ssh_connect_timeout_seconds * 2
            async with asyncio.timeout(timeout + CHECK_TIMEOUT_MARGIN_SECONDS):
                await worker.transport.check()
        except (TransportError, TimeoutError) as exc:
            reason = str(exc) or "liveness check timed out"
            if isinstance(exc, HostKeyChangedError):
                reason = str(exc)
                if exc.presented_key:
                    await db.retrying(
                        keys.record_pending_host_key,
                        self.engine,
                        worker.record.id,
                        exc.presented_key,
                    )
            await self._set_offline(worker, reason)
        else:
            await self._set_online(worker)
        finally:
            worker.checking = False

    async def _set_online(self, worker: WorkerRuntime) -> None:
        was = worker.state
        worker.state, worker.reason = "online", None
        # A check that changes nothing refreshes last_seen_at only now and then,
        # which spares a write per worker and check.
        now = asyncio.get_running_loop().time()
        if was == "online" and now - worker.seen_written < LAST_SEEN_WRITE_SECONDS:
            return
        worker.seen_written = now
        await db.retrying(
            workers.record_state, self.engine, worker.record.id, "online", None, True
        )
        if was != "online":
            logger.info(
                "Worker %s is online",
                worker.record.name,
                extra={"event": "worker_online", "worker": worker.record.name},
            )
            self._pump(worker.record.class_id)

    async def _set_offline(self, worker: WorkerRuntime, reason: str) -> None:
        was = worker.state
        worker.state, worker.reason = "offline", reason
        await db.retrying(
            workers.record_state,
            self.engine,
            worker.record.id,
            "offline",
            reason,
            False,
        )
        if was != "offline":
            logger.warning(
                "Worker %s is offline: %s",
                worker.record.name,
                reason,
                extra={"event": "worker_offline", "worker": worker.record.name},
            )
        # Running jobs on a dead connection end as lost instead of hanging.
        await worker.transport.close()

    async def _liveness_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.liveness_interval_seconds)
            checks = [
                self._check(w) for w in list(self.workers.values()) if w.record.enabled
            ]
            await asyncio.gather(*checks, return_exceptions=True)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(WORKER_REFRESH_SECONDS)
            try:
                await self.refresh_workers()
            except Exception:
                logger.exception("Reloading the worker inventory failed")

    async def _recover_jobs(self) -> None:
        """Queue waiting jobs again and attach to jobs on SSH and agent workers."""
        rows = await db.retrying(jobs.load_unfinished, self.engine)
        for row in rows:
            spec = jobs.spec_from_row(row)
            if row.state == jobs.WAITING:
                self.queues.setdefault(row.class_id, deque()).append(spec)
                continue
            worker = self.workers.get(row.worker_id)
            if (
                worker is None
                or worker.record.transport not in ("ssh", "agent")
                or not row.run_token
            ):
                await db.retrying(
                    jobs.finish_job,
                    self.engine,
                    row.id,
                    jobs.LOST,
                    reason="the server stopped while the job ran",
                )
                continue
            spec.resume_offsets = (0, 0)
            if row.started_at is not None:
                age = (utcnow() - as_utc(row.started_at)).total_seconds()
                spec.started_monotonic = asyncio.get_running_loop().time() - age
            logger.info(
                "Attaching again to job %d on %s after a restart",
                row.id,
                worker.record.name,
                extra={"event": "job_recovering", "job": row.id},
            )
            self._launch(spec, worker, marked=True)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def worker_view(self) -> list[tuple[workers.WorkerRecord, str, str | None, int]]:
        """Return (record, state, reason, running) for every worker."""
        return [
            (w.record, w.public_state(), w.reason, len(w.running))
            for w in sorted(self.workers.values(), key=lambda w: w.record.id)
        ]

    def script_dir(self) -> Path:
        """Return the folder where the local worker caches scripts."""
        return self._script_dir


async def _discard(stream: int, data: bytes) -> None:
    """Drop output; used only when a job has no writer."""


def _reattachable(worker: WorkerRuntime) -> bool:
    return worker.record.transport == "ssh"


def _final_state(stop_state: str | None, result: ExitResult) -> tuple[str, str | None]:
    if stop_state is not None:
        return stop_state, result.error
    if result.error is not None and not result.started:
        return jobs.FAILED, result.error
    if result.error is not None:
        return jobs.LOST, result.error
    if result.signal is not None:
        return jobs.FAILED, f"ended by {result.signal}"
    if result.exit_code == 0:
        return jobs.SUCCEEDED, None
    return jobs.FAILED, f"exit code {result.exit_code}"
