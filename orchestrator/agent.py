"""Pull jobs from a Job Balancer server and run them on this host.

The agent is for workers that accept no inbound SSH. It connects out to the
server, long-polls for jobs, runs each job in its own process group with stdin
at end of file, and streams stdout and stderr back while the job runs. Output
waits in a spool folder on disk until the server has stored it, so jobs keep
running and no output is lost while the server is unreachable.

The module uses the standard library only and runs on Python 3.9 or later, so
the file can be copied to a host and started alone:

    python3 agent.py --server https://jobs.example.org --token-file /etc/token

Installed with the package, the same module is the ``jobbalancer-agent``
command. ``jobbalancer worker add NAME --transport agent`` prints the token.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import http.client
import json
import logging
import os
import random
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

logger = logging.getLogger("jobbalancer.agent")

PROTOCOL_VERSION = "1"
SERVER_ENV = "JOBBALANCER_AGENT_SERVER"
TOKEN_ENV = "JOBBALANCER_AGENT_TOKEN"
STDOUT = 1
STDERR = 2
# Output frame: stream (1 byte), byte offset in that stream (8 bytes) and data
# length (4 bytes), big-endian, then the data. The spool files hold the same
# frames that the agent sends.
FRAME_HEADER = struct.Struct(">BQI")

READ_BYTES = 64 * 1024
SEGMENT_BYTES = 4 << 20
BATCH_BYTES = 512 * 1024
MIN_BATCH_BYTES = 4 * 1024
BATCH_DELAY_SECONDS = 0.1
SENDER_IDLE_SECONDS = 1.0
DEFAULT_SPOOL_MAX_BYTES = 1 << 30
DEFAULT_POLL_SECONDS = 20.0
REQUEST_TIMEOUT_SECONDS = 30.0
FIRST_BACKOFF_SECONDS = 0.5
DEFAULT_MAX_BACKOFF_SECONDS = 5.0
FAILURE_LOG_INTERVAL_SECONDS = 60.0
DEFAULT_KILL_GRACE_SECONDS = 3.0
KILL_CHECK_SECONDS = 0.05
# The server's watchdog kills the job. The agent's own timer fires this much
# later and matters only while the server is unreachable.
WATCHDOG_MARGIN_SECONDS = 2.0
STOP_DELIVERY_SECONDS = 10.0

# Job phases on the agent.
ACCEPTING = "accepting"
STARTED = "started"
ENDED = "ended"


class RequestError(Exception):
    """Raised when a request to the server fails and may be retried."""


class CertificateMismatchError(OSError):
    """Raised when the server's certificate does not match the pinned fingerprint."""


class SpoolBudget:
    """The bytes of output that all jobs may keep on disk before delivery.

    A reader that would pass the limit waits, so the job blocks on its next
    write to the pipe until the server has taken some output.
    """

    def __init__(self, limit: int, stopping: threading.Event):
        self.limit = limit
        self.used = 0
        self._stopping = stopping
        self._condition = threading.Condition()

    def reserve(self, size: int) -> None:
        """Take ``size`` bytes, waiting while the spool is full."""
        with self._condition:
            while (
                self.used > 0
                and self.used + size > self.limit
                and not self._stopping.is_set()
            ):
                self._condition.wait(0.5)
            self.used += size

    def take(self, size: int) -> None:
        """Count bytes that are already on disk, without waiting."""
        with self._condition:
            self.used += size

    def release(self, size: int) -> None:
        """Give back bytes that the server has stored."""
        if size <= 0:
            return
        with self._condition:
            self.used = max(0, self.used - size)
            self._condition.notify_all()


class Frame:
    """The end of one spooled frame, used to move the cursor past it."""

    __slots__ = ("stream", "end", "segment", "position", "length")

    def __init__(self, stream: int, end: int, segment: int, position: int, length: int):
        self.stream = stream
        self.end = end
        self.segment = segment
        self.position = position
        self.length = length


class JobOutput:
    """A job's output frames in numbered segment files, kept until acknowledged.

    The cursor points at the first frame that the server has not stored. A
    segment is deleted once the cursor has moved past its end.
    """

    def __init__(self, directory: Path, budget: SpoolBudget):
        self.directory = directory
        self.budget = budget
        self.produced = {STDOUT: 0, STDERR: 0}
        self.acknowledged = {STDOUT: 0, STDERR: 0}
        self.pending_bytes = 0
        self._lock = threading.Lock()
        self._segments: list[int] = []
        self._discarded = False
        self._cursor = (0, 0)
        self._write_file: Any = None
        self._write_size = 0

    def append(self, stream: int, data: bytes) -> None:
        """Spool output of one stream, waiting while the spool is full."""
        self.budget.reserve(len(data))
        with self._lock:
            if self._discarded:
                self.budget.release(len(data))
                return
            if self._write_file is None or self._write_size >= SEGMENT_BYTES:
                self._open_segment()
            header = FRAME_HEADER.pack(stream, self.produced[stream], len(data))
            self._write_file.write(header + data)
            self._write_file.flush()
            self._write_size += len(header) + len(data)
            self.produced[stream] += len(data)
            self.pending_bytes += len(data)

    def read_batch(self, limit: int) -> tuple[bytes, list[Frame]]:
        """Return the frames after the cursor: at least one, about ``limit`` bytes."""
        with self._lock:
            body = bytearray()
            frames: list[Frame] = []
            if not self._segments:
                return b"", frames
            segment, position = self._cursor
            while len(body) < limit:
                position = self._read_segment(segment, position, limit, body, frames)
                later = [index for index in self._segments if index > segment]
                if len(body) >= limit or not later:
                    break
                segment, position = later[0], 0
            return bytes(body), frames

    def acknowledge(self, frames: list[Frame], stored: dict[int, int]) -> None:
        """Move the cursor past the frames that the server has stored."""
        released = 0
        with self._lock:
            if self._discarded:
                return
            for stream, offset in stored.items():
                self.acknowledged[stream] = max(self.acknowledged[stream], offset)
            for frame in frames:
                if stored[frame.stream] < frame.end:
                    break
                self._cursor = (frame.segment, frame.position)
                released += frame.length
            self.pending_bytes -= released
            for index in [i for i in self._segments if i < self._cursor[0]]:
                self._segments.remove(index)
                _unlink(self._segment_path(index))
        self.budget.release(released)

    def has_pending(self) -> bool:
        """Return whether some output has not been stored by the server."""
        with self._lock:
            return self.pending_bytes > 0

    def close(self) -> None:
        """Close the segment being written."""
        with self._lock:
            if self._write_file is not None:
                self._write_file.close()
                self._write_file = None

    def discard(self) -> None:
        """Stop spooling and give back the budget of what was not delivered."""
        with self._lock:
            if self._discarded:
                return
            self._discarded = True
            pending, self.pending_bytes = self.pending_bytes, 0
            if self._write_file is not None:
                self._write_file.close()
                self._write_file = None
        self.budget.release(pending)

    def load(self) -> None:
        """Rebuild the offsets from the segments left by an earlier agent process."""
        self._segments = sorted(
            int(path.name[4:])
            for path in self.directory.glob("out.*")
            if path.name[4:].isdigit()
        )
        for index in self._segments:
            self._scan_segment(index)
        if self._segments:
            self._cursor = (self._segments[0], 0)
        self.budget.take(self.pending_bytes)

    def _open_segment(self) -> None:
        if self._write_file is not None:
            self._write_file.close()
        index = self._segments[-1] + 1 if self._segments else 0
        self._write_file = open(self._segment_path(index), "ab")
        self._write_size = 0
        if not self._segments:
            self._cursor = (index, 0)
        self._segments.append(index)

    def _segment_path(self, index: int) -> Path:
        return self.directory / f"out.{index:06d}"

    def _read_segment(
        self,
        segment: int,
        position: int,
        limit: int,
        body: bytearray,
        frames: list[Frame],
    ) -> int:
        with open(self._segment_path(segment), "rb") as handle:
            handle.seek(position)
            while len(body) < limit:
                header = handle.read(FRAME_HEADER.size)
                if len(header) < FRAME_HEADER.size:
                    break
                stream, offset, length = FRAME_HEADER.unpack(header)
                data = handle.read(length)
                body += header
                body += data
                position += FRAME_HEADER.size + length
                frames.append(Frame(stream, offset + length, segment, position, length))
        return position

    def _scan_segment(self, index: int) -> None:
        path = self._segment_path(index)
        position = 0
        with open(path, "rb") as handle:
            while True:
                header = handle.read(FRAME_HEADER.size)
                if len(header) < FRAME_HEADER.size:
                    break
                stream, offset, length = FRAME_HEADER.unpack(header)
                if len(handle.read(length)) < length or stream not in (STDOUT, STDERR):
                    break
                position += FRAME_HEADER.size + length
                self.produced[stream] = max(self.produced[stream], offset + length)
                self.pending_bytes += length
        # A frame cut short by a crash is dropped, because it was never acknowledged.
        if path.stat().st_size != position:
            with open(path, "r+b") as handle:
                handle.truncate(position)


class Job:
    """One job on this host: its process, output spool and exit status."""

    def __init__(self, agent: Agent, payload: dict[str, Any], directory: Path):
        self.agent = agent
        self.payload = payload
        self.id = int(payload["id"])
        self.delivery = str(payload["delivery"])
        self.directory = directory
        self.output = JobOutput(directory, agent.budget)
        self.phase = ACCEPTING
        self.kill_grace = float(payload.get("kill_grace") or DEFAULT_KILL_GRACE_SECONDS)
        self.kill_received = False
        self.dropped = False
        self.interrupted = False
        self.exit_code: int | None = None
        self.signal: str | None = None
        self.error: str | None = None
        self.pgid: int | None = None
        self.start_ticks: str | None = None
        self._killing = False
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._watchdog: threading.Timer | None = None

    def start(self) -> None:
        """Start the process in a new session and the threads that read it."""
        if self.kill_received:
            logger.info("Not starting job %d: it was killed before it started", self.id)
            self.error = "killed before the agent started it"
            self._record_exit(None, None)
            return

        self.phase = STARTED
        self.save()
        try:
            argv = self.agent.argv_for(self.payload)
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                env=self.agent.job_environment(),
            )
        except (OSError, ValueError) as exc:
            message = f"jobbalancer-agent: could not start job {self.id}: {exc}\n"
            self.output.append(STDERR, message.encode())
            logger.error("Could not start job %d: %s", self.id, exc)
            self._record_exit(127, None)
            return

        self.pgid = process.pid
        self.start_ticks = _start_ticks(process.pid)
        self.save()
        logger.info("Started job %d as process group %d", self.id, self.pgid)
        readers = [
            _thread(self._read, f"job-{self.id}-stdout", process.stdout, STDOUT),
            _thread(self._read, f"job-{self.id}-stderr", process.stderr, STDERR),
        ]
        _thread(self._wait, f"job-{self.id}-wait", process, readers)

        watchdog = self.payload.get("watchdog")
        if watchdog:
            delay = float(watchdog) + WATCHDOG_MARGIN_SECONDS
            self._watchdog = threading.Timer(delay, self._watchdog_expired)
            self._watchdog.daemon = True
            self._watchdog.start()

    def kill(self, grace_seconds: float) -> None:
        """Send SIGTERM to the process group, then SIGKILL after the grace."""
        with self._lock:
            if self._killing or self.pgid is None or self.phase == ENDED:
                return
            self._killing = True
        logger.info("Killing job %d (grace %s s)", self.id, grace_seconds)
        if _signal_group(self.pgid, signal.SIGTERM):
            _thread(self._finish_kill, f"job-{self.id}-kill", grace_seconds)

    def save(self) -> None:
        """Write the job's state to job.json, replacing the file atomically."""
        state = {
            "payload": self.payload,
            "phase": self.phase,
            "pgid": self.pgid,
            "boot_id": _boot_id(),
            "start_ticks": self.start_ticks,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "error": self.error,
            "produced": self.output.produced,
        }
        with self._save_lock:
            partial = self.directory / "job.json.tmp"
            partial.write_text(json.dumps(state))
            os.replace(partial, self.directory / "job.json")

    def finish_report(self) -> dict[str, Any]:
        """Build the body of the finish request."""
        return {
            "delivery": self.delivery,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "error": self.error,
            "stdout_bytes": self.output.produced[STDOUT],
            "stderr_bytes": self.output.produced[STDERR],
        }

    def _read(self, pipe: Any, stream: int) -> None:
        try:
            while True:
                data = os.read(pipe.fileno(), READ_BYTES)
                if not data:
                    return
                self.output.append(stream, data)
                self.agent.wake_sender()
        finally:
            pipe.close()

    def _wait(self, process: subprocess.Popen[bytes], readers: list[Any]) -> None:
        for reader in readers:
            reader.join()
        returncode = process.wait()
        if self._watchdog is not None:
            self._watchdog.cancel()
        if returncode < 0:
            self._record_exit(None, _signal_name(-returncode))
        else:
            self._record_exit(returncode, None)

    def _record_exit(self, exit_code: int | None, signal_name: str | None) -> None:
        self.output.close()
        self.exit_code, self.signal = exit_code, signal_name
        if self.interrupted:
            self.error = "the agent stopped while the job ran"
        self.phase = ENDED
        self.save()
        logger.info(
            "Job %d ended (exit %s, signal %s)", self.id, exit_code, signal_name
        )
        self.agent.job_ended(self)

    def _finish_kill(self, grace_seconds: float) -> None:
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline:
            if not _signal_group(self.pgid, 0):
                return
            time.sleep(KILL_CHECK_SECONDS)
        if _signal_group(self.pgid, signal.SIGKILL):
            logger.info("Sent SIGKILL to job %d after %s s", self.id, grace_seconds)

    def _watchdog_expired(self) -> None:
        logger.warning(
            "Watchdog of job %d expired without a kill request from the server",
            self.id,
        )
        self.kill(self.kill_grace)


class ServerClient:
    """One keep-alive HTTP or HTTPS connection to the server, for one thread."""

    def __init__(
        self,
        url: str,
        token: str,
        context: ssl.SSLContext | None,
        fingerprint: str | None,
    ):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"invalid server URL {url!r}: use http(s)://HOST[:PORT]")
        self.scheme = parsed.scheme
        self.host = parsed.hostname
        self.port = parsed.port
        self.prefix = parsed.path.rstrip("/")
        self.token = token
        self.context = context
        self.fingerprint = fingerprint
        self._connection: http.client.HTTPConnection | None = None

    def call(
        self,
        path: str,
        payload: dict[str, Any] | None = None,
        *,
        body: bytes | None = None,
        timeout: float = REQUEST_TIMEOUT_SECONDS,
    ) -> tuple[int, Any]:
        """POST JSON or raw bytes and return the status and the decoded JSON body.

        Raises RequestError for network failures, 5xx responses and rejected
        tokens, which the caller retries after a pause.
        """
        content_type = "application/octet-stream"
        if payload is not None:
            body = json.dumps(payload).encode()
            content_type = "application/json"
        status, data = self._request(path, body or b"", content_type, timeout)
        try:
            answer = json.loads(data) if data else {}
        except ValueError:
            answer = {"detail": data[:200].decode(errors="replace")}
        if status >= 500 or status in (401, 403, 429):
            detail = answer.get("detail") if isinstance(answer, dict) else None
            raise RequestError(f"server returned {status}: {detail or 'no detail'}")
        return status, answer

    def close(self) -> None:
        """Close the connection, so that the next request opens a new one."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _request(
        self, path: str, body: bytes, content_type: str, timeout: float
    ) -> tuple[int, bytes]:
        headers = {
            "Authorization": f"Bearer {self.token}",
            "Content-Type": content_type,
            "User-Agent": f"jobbalancer-agent/{PROTOCOL_VERSION}",
        }
        for attempt in (1, 2):
            reused = self._connection is not None
            connection = self._connect(timeout)
            try:
                connection.request("POST", self.prefix + path, body, headers)
                response = connection.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                # A kept-alive connection that the server closed fails at once.
                # Every request is safe to repeat, so retry it on a new one.
                if reused and attempt == 1 and not isinstance(exc, socket.timeout):
                    continue
                raise RequestError(f"{type(exc).__name__}: {exc}") from exc
            if response.will_close:
                self.close()
            return response.status, data
        raise RequestError("the request failed twice")

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        if self._connection is None:
            if self.scheme == "https":
                self._connection = PinnedHTTPSConnection(
                    self.host,
                    self.port,
                    timeout=timeout,
                    context=self.context,
                    fingerprint=self.fingerprint,
                )
            else:
                self._connection = http.client.HTTPConnection(
                    self.host, self.port, timeout=timeout
                )
        connection = self._connection
        connection.timeout = timeout
        if connection.sock is not None:
            connection.sock.settimeout(timeout)
        return connection


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection that can also check a pinned certificate fingerprint."""

    def __init__(self, *args: Any, fingerprint: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fingerprint = fingerprint

    def connect(self) -> None:
        """Connect, then compare the certificate's SHA-256 with the pin."""
        super().connect()
        if self.fingerprint is None:
            return
        certificate = self.sock.getpeercert(binary_form=True) or b""
        digest = hashlib.sha256(certificate).hexdigest()
        if not hmac.compare_digest(digest, self.fingerprint):
            self.close()
            raise CertificateMismatchError(
                f"the server certificate has SHA-256 fingerprint {digest}, "
                f"not the pinned {self.fingerprint}"
            )


class Backoff:
    """Pauses between failed attempts that double up to a maximum."""

    def __init__(self, what: str, maximum: float, quit_event: threading.Event):
        self.what = what
        self.maximum = maximum
        self.failures = 0
        self._quit = quit_event
        self._last_log = 0.0

    def failed(self, error: Exception) -> None:
        """Log the failure (rate-limited) and sleep before the next attempt."""
        self.failures += 1
        now = time.monotonic()
        level = logging.DEBUG
        if self.failures == 1 or now - self._last_log >= FAILURE_LOG_INTERVAL_SECONDS:
            level = logging.WARNING
            self._last_log = now
        delay = min(self.maximum, FIRST_BACKOFF_SECONDS * 2 ** (self.failures - 1))
        delay *= random.uniform(0.8, 1.0)
        logger.log(
            level,
            "%s failed (attempt %d), retrying in %.1f s: %s",
            self.what,
            self.failures,
            delay,
            error,
        )
        self._quit.wait(delay)

    def succeeded(self) -> None:
        """Reset the pause after a successful request."""
        if self.failures:
            logger.info("%s works again after %d failures", self.what, self.failures)
        self.failures = 0


class Agent:
    """Poll for jobs, run them, and deliver their output and exit status."""

    def __init__(self, args: argparse.Namespace, token: str):
        self.args = args
        self.token = token
        self.instance = uuid.uuid4().hex
        self.hostname = socket.gethostname()
        self.spool = Path(args.spool_dir).expanduser()
        self.jobs: dict[int, Job] = {}
        self.stopping = threading.Event()
        self.quit = threading.Event()
        self.budget = SpoolBudget(args.spool_max_bytes, self.quit)
        self._lock = threading.Lock()
        self._sender_wakeup = threading.Event()
        self._seq = 0
        self._batch_limit = BATCH_BYTES
        context, fingerprint = _ssl_settings(args)
        self._poll_client = ServerClient(args.server, token, context, fingerprint)
        self._send_client = ServerClient(args.server, token, context, fingerprint)

    def run(self) -> None:
        """Run until SIGTERM or SIGINT, then stop the jobs and deliver their ends."""
        for folder in (self.spool / "jobs", self.spool / "scripts"):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.recover()
        logger.info(
            "Agent %s polling %s (spool %s)",
            self.instance,
            self.args.server,
            self.spool,
        )
        poller = _thread(self._poll_loop, "poll")
        sender = _thread(self._send_loop, "send")
        while not self.stopping.wait(1.0):
            pass
        logger.info("Stopping: killing running jobs and delivering what is left")
        self._interrupt_jobs()
        self.wake_sender()
        sender.join(STOP_DELIVERY_SECONDS)
        self.quit.set()
        sender.join(1.0)
        poller.join(0.1)
        self._poll_client.close()
        self._send_client.close()
        logger.info("Agent stopped")

    def recover(self) -> None:
        """Load jobs that an earlier agent process left in the spool.

        Their pipes died with that process, so a job that was still running is
        killed (when its process group is verifiably the same) and reported as
        interrupted, after its spooled output. A job that was never started is
        forgotten: the server offers it again, or has recorded it as lost.
        """
        for directory in sorted((self.spool / "jobs").iterdir()):
            try:
                state = json.loads((directory / "job.json").read_text())
                job = Job(self, state["payload"], directory)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.error("Removing unreadable spool folder %s: %s", directory, exc)
                shutil.rmtree(directory, ignore_errors=True)
                continue
            if state.get("phase") == ACCEPTING:
                shutil.rmtree(directory, ignore_errors=True)
                continue
            job.output.load()
            job.pgid = state.get("pgid")
            job.start_ticks = state.get("start_ticks")
            if state.get("phase") == ENDED:
                job.exit_code = state.get("exit_code")
                job.signal = state.get("signal")
                job.error = state.get("error")
                job.output.produced.update(
                    {int(k): v for k, v in (state.get("produced") or {}).items()}
                )
            else:
                _kill_orphaned_group(state)
                job.error = "the agent restarted while the job ran"
            job.phase = ENDED
            job.save()
            self.jobs[job.id] = job
            logger.info("Recovered job %d from the spool", job.id)

    def wake_sender(self) -> None:
        """Tell the sender that output or an exit status waits."""
        self._sender_wakeup.set()

    def job_ended(self, job: Job) -> None:
        """Deliver the exit status of a job, or forget a dropped one."""
        if job.dropped:
            self._remove(job)
        self.wake_sender()

    def argv_for(self, payload: dict[str, Any]) -> list[str]:
        """Build the argv of a job: ``sh -c COMMAND`` or the cached script."""
        script = payload.get("script")
        if not script:
            return ["/bin/sh", "-c", payload.get("command") or ""]
        path = self._store_script(script)
        params = [str(param) for param in payload.get("params") or []]
        return [*script["interpreter"], str(path), *params]

    def job_environment(self) -> dict[str, str]:
        """Return the agent's environment without its token."""
        return {k: v for k, v in os.environ.items() if k != TOKEN_ENV}

    # Polling

    def _poll_loop(self) -> None:
        backoff = Backoff("Polling the server", self.args.max_backoff, self.quit)
        while not self.stopping.is_set():
            try:
                self._retry_accepts()
                answer = self._poll()
            except RequestError as exc:
                backoff.failed(exc)
                continue
            backoff.succeeded()
            self._handle_poll_response(answer)

    def _poll(self) -> dict[str, Any]:
        with self._lock:
            listed = [
                {
                    "id": job.id,
                    "delivery": job.delivery,
                    "started": job.phase != ACCEPTING,
                }
                for job in self.jobs.values()
                if not job.dropped
            ]
            killed = [job.id for job in self.jobs.values() if job.kill_received]
        self._seq += 1
        body = {
            "instance": self.instance,
            "seq": self._seq,
            "hostname": self.hostname,
            "version": PROTOCOL_VERSION,
            "wait": self.args.poll_seconds,
            "jobs": listed,
            "killed": killed,
        }
        timeout = self.args.poll_seconds + REQUEST_TIMEOUT_SECONDS
        status, answer = self._poll_client.call(
            "/api/v1/agent/poll", body, timeout=timeout
        )
        if status != 200 or not isinstance(answer, dict):
            raise RequestError(f"poll returned {status}: {answer}")
        return answer

    def _handle_poll_response(self, answer: dict[str, Any]) -> None:
        for request in answer.get("kill") or []:
            job = self.jobs.get(int(request["id"]))
            if job is not None and not job.dropped:
                job.kill_received = True
                job.kill(float(request.get("grace") or job.kill_grace))
        for job_id in answer.get("drop") or []:
            self._drop(int(job_id))
        for payload in answer.get("jobs") or []:
            if self.stopping.is_set():
                return
            self._take(payload)

    def _take(self, payload: dict[str, Any]) -> None:
        job_id = int(payload["id"])
        with self._lock:
            job = self.jobs.get(job_id)
        if job is not None:
            # The server repeats an offer until it has our acceptance. A job that
            # is accepted already, or another delivery of it, never starts again.
            if job.delivery == str(payload["delivery"]) and job.phase == ACCEPTING:
                self._accept(job)
            return
        directory = self.spool / "jobs" / str(job_id)
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(mode=0o700)
        job = Job(self, payload, directory)
        job.save()
        with self._lock:
            self.jobs[job_id] = job
        self._accept(job)

    def _accept(self, job: Job) -> None:
        body = {"delivery": job.delivery, "instance": self.instance, "seq": self._seq}
        try:
            status, answer = self._poll_client.call(
                f"/api/v1/agent/jobs/{job.id}/accept", body
            )
        except RequestError as exc:
            logger.warning("Accepting job %d failed, will retry: %s", job.id, exc)
            return
        if status == 200:
            job.start()
            return
        logger.warning(
            "Not starting job %d: the server returned %d: %s",
            job.id,
            status,
            answer.get("detail") if isinstance(answer, dict) else answer,
        )
        self._remove(job)

    def _retry_accepts(self) -> None:
        with self._lock:
            waiting = [job for job in self.jobs.values() if job.phase == ACCEPTING]
        for job in waiting:
            if not self.stopping.is_set():
                self._accept(job)

    def _drop(self, job_id: int) -> None:
        with self._lock:
            job = self.jobs.get(job_id)
        if job is None or job.dropped:
            return
        logger.warning("Dropping job %d: the server has ended it", job_id)
        job.dropped = True
        if job.phase == STARTED:
            job.kill(job.kill_grace)
        else:
            self._remove(job)

    def _remove(self, job: Job) -> None:
        with self._lock:
            if self.jobs.get(job.id) is job:
                del self.jobs[job.id]
        job.output.discard()
        shutil.rmtree(job.directory, ignore_errors=True)

    # Sending

    def _send_loop(self) -> None:
        backoff = Backoff("Sending output", self.args.max_backoff, self.quit)
        while not self.quit.is_set():
            if self.stopping.is_set() and not self._has_undelivered():
                return
            self._sender_wakeup.wait(SENDER_IDLE_SECONDS)
            self._sender_wakeup.clear()
            self.quit.wait(BATCH_DELAY_SECONDS)
            with self._lock:
                jobs = sorted(self.jobs.values(), key=lambda job: job.id)
            try:
                for job in jobs:
                    self._deliver(job)
            except RequestError as exc:
                backoff.failed(exc)
                continue
            backoff.succeeded()

    def _has_undelivered(self) -> bool:
        with self._lock:
            return any(
                not job.dropped and job.phase != ACCEPTING for job in self.jobs.values()
            )

    def _deliver(self, job: Job) -> None:
        """Send the job's spooled output, then its exit status once it has ended."""
        while not job.dropped and not self.quit.is_set():
            if job.phase == ACCEPTING:
                return
            body, frames = job.output.read_batch(self._batch_limit)
            if frames:
                if not self._send_output(job, body, frames):
                    return
                continue
            if job.phase == ENDED and not job.output.has_pending():
                self._send_finish(job)
            return

    def _send_output(self, job: Job, body: bytes, frames: list[Frame]) -> bool:
        query = urllib.parse.urlencode({"delivery": job.delivery})
        path = f"/api/v1/agent/jobs/{job.id}/output?{query}"
        status, answer = self._send_client.call(path, body=body)
        if status == 200:
            stored = {STDOUT: int(answer["stdout"]), STDERR: int(answer["stderr"])}
            job.output.acknowledge(frames, stored)
            return True
        if status == 413 and self._batch_limit > MIN_BATCH_BYTES:
            self._batch_limit //= 2
            logger.warning("Output batches now hold %d bytes", self._batch_limit)
            return True
        self._handle_rejection(job, status, answer)
        return False

    def _send_finish(self, job: Job) -> None:
        path = f"/api/v1/agent/jobs/{job.id}/finish"
        status, answer = self._send_client.call(path, job.finish_report())
        if status == 200:
            logger.info("Server recorded job %d as %s", job.id, answer.get("state"))
            self._remove(job)
            return
        self._handle_rejection(job, status, answer)

    def _handle_rejection(self, job: Job, status: int, answer: Any) -> None:
        detail = answer.get("detail") if isinstance(answer, dict) else answer
        if status in (404, 410):
            logger.warning("Dropping job %d: %s", job.id, detail)
            self._drop(job.id)
            return
        # 409 and other statuses mean that the server is not ready for the job yet.
        logger.debug("Job %d waits: the server returned %d: %s", job.id, status, detail)

    def _interrupt_jobs(self) -> None:
        with self._lock:
            running = [job for job in self.jobs.values() if job.phase == STARTED]
        for job in running:
            job.interrupted = True
            job.kill(job.kill_grace)
        deadline = time.monotonic() + max(
            [job.kill_grace for job in running], default=0.0
        )
        while time.monotonic() < deadline + 1.0:
            if all(job.phase == ENDED for job in running):
                return
            time.sleep(KILL_CHECK_SECONDS)

    def _store_script(self, script: dict[str, Any]) -> Path:
        digest = str(script["sha256"])
        try:
            body = base64.b64decode(script["body"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("the script body is not valid base64") from exc
        if hashlib.sha256(body).hexdigest() != digest:
            raise ValueError("the script body does not match its SHA-256 digest")
        path = self.spool / "scripts" / digest
        if not path.exists():
            partial = path.with_name(f"{digest}.{os.getpid()}.tmp")
            partial.write_bytes(body)
            partial.chmod(0o700)
            os.replace(partial, path)
        return path


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser."""
    parser = argparse.ArgumentParser(
        prog="jobbalancer-agent",
        description="Pull jobs from a Job Balancer server and run them on this host.",
    )
    parser.add_argument(
        "--server",
        default=os.environ.get(SERVER_ENV),
        help=f"server URL, for example https://jobs.example.org (or ${SERVER_ENV})",
    )
    parser.add_argument(
        "--token",
        help=f"the worker's agent token (visible in ps: prefer ${TOKEN_ENV} "
        "or --token-file)",
    )
    parser.add_argument("--token-file", help="file that contains the agent token")
    parser.add_argument(
        "--spool-dir",
        default=_default_spool_dir(),
        help="folder for output not yet delivered and cached scripts "
        "(default: $STATE_DIRECTORY or ~/.local/state/jobbalancer-agent)",
    )
    parser.add_argument(
        "--spool-max-bytes",
        type=int,
        default=DEFAULT_SPOOL_MAX_BYTES,
        help="bytes of undelivered output kept on disk; jobs wait to write past it "
        "(default: 1 GiB)",
    )
    parser.add_argument("--ca-file", help="CA certificates that sign the server's")
    parser.add_argument(
        "--fingerprint",
        help="SHA-256 fingerprint of a self-signed server certificate to pin "
        "(hex, colons allowed); replaces CA verification",
    )
    parser.add_argument(
        "--poll-seconds",
        type=float,
        default=DEFAULT_POLL_SECONDS,
        help="seconds the server may hold a poll open (default: 20)",
    )
    parser.add_argument(
        "--max-backoff",
        type=float,
        default=DEFAULT_MAX_BACKOFF_SECONDS,
        help="maximum pause in seconds between retries when the server is "
        "unreachable (default: 5)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="log level (default: INFO)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run the agent until SIGTERM or SIGINT."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.server:
        parser.error(f"--server is required (or set {SERVER_ENV})")
    try:
        token = _read_token(args)
        if args.fingerprint:
            args.fingerprint = normalize_fingerprint(args.fingerprint)
        agent = Agent(args, token)
    except (OSError, ValueError, ssl.SSLError) as exc:
        parser.error(str(exc))
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: agent.stopping.set())
    agent.run()


def normalize_fingerprint(text: str) -> str:
    """Return a SHA-256 fingerprint as 64 lowercase hex digits."""
    value = text.strip().lower()
    if value.startswith("sha256:"):
        value = value[len("sha256:") :]
    value = value.replace(":", "")
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(
            f"invalid fingerprint {text!r}: give the certificate's SHA-256 as 64 "
            "hex digits, as 'openssl x509 -noout -fingerprint -sha256' prints it"
        )
    return value


def _read_token(args: argparse.Namespace) -> str:
    token = args.token or os.environ.get(TOKEN_ENV, "")
    if args.token_file:
        token = Path(args.token_file).expanduser().read_text().strip()
    if not token:
        raise ValueError(
            f"missing token: pass --token, --token-file or set {TOKEN_ENV}"
        )
    return token


def _ssl_settings(args: argparse.Namespace) -> tuple[ssl.SSLContext | None, str | None]:
    if not args.server.startswith("https:"):
        if args.fingerprint or args.ca_file:
            raise ValueError("--fingerprint and --ca-file need an https:// server URL")
        return None, None
    if args.fingerprint:
        # The pin replaces the CA chain and the host name check.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context, args.fingerprint
    return ssl.create_default_context(cafile=args.ca_file), None


def _default_spool_dir() -> str:
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        return state.split(":")[0]
    return "~/.local/state/jobbalancer-agent"


def _thread(target: Any, name: str, *args: Any) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, args=args, daemon=True)
    thread.start()
    return thread


def _signal_group(pgid: int | None, number: int) -> bool:
    """Signal a process group; return False when it no longer exists."""
    if pgid is None:
        return False
    try:
        os.killpg(pgid, number)
    except ProcessLookupError:
        return False
    except PermissionError:
        logger.error("No permission to signal process group %d", pgid)
        return False
    return True


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_ticks(pid: int) -> str | None:
    """Return a process's start time in clock ticks since boot (Linux only)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 is the start time, and the fields after the command name start at 3.
    fields = text[text.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def _kill_orphaned_group(state: dict[str, Any]) -> None:
    """Kill a job's process group left by an earlier agent process.

    Only when the host has not rebooted and the group leader, if still there,
    is the same process, so that a reused process id is never signalled.
    """
    pgid = state.get("pgid")
    if not pgid:
        return
    boot_id = _boot_id()
    if boot_id is None or boot_id != state.get("boot_id"):
        return
    leader = _start_ticks(pgid)
    if leader is not None and leader != state.get("start_ticks"):
        return
    if _signal_group(pgid, signal.SIGKILL):
        logger.warning("Killed process group %d left by an earlier agent", pgid)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


if __name__ == "__main__":
    main()
