"""Run jobs on remote workers over pooled asyncssh connections."""

import asyncio
import contextlib
import logging
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncssh

from orchestrator import metrics
from orchestrator.transports.base import (
    INLINE_COMMAND_MAX_BYTES,
    STDERR,
    STDOUT,
    ExitResult,
    OutputSink,
    RunSpec,
    ScriptBody,
    TransportError,
    signal_name,
)

logger = logging.getLogger(__name__)

# Output queued from one follower channel before the channel is paused.
FOLLOW_BUFFER_BYTES = 4 * 1024 * 1024
CLEANUP_BATCH = 64
CLEANUP_DELAY_SECONDS = 2.0
CHECK_TIMEOUT_SECONDS = 10
CHANNEL_OPEN_ATTEMPTS = 5
REMOTE_SCRIPT_DIR = '"${XDG_CACHE_HOME:-$HOME/.cache}/jobbalancer/scripts"'

REMOTE_RUN_DIR = '"${XDG_CACHE_HOME:-$HOME/.cache}/jobbalancer/run"'
FOLLOW_POLL_SECONDS = 0.05
# Channel exit statuses of the run script when it could not launch or follow the
# job. A job may exit with these too, so they are checked against the rc file.
STATUS_NO_FOLDER = 252
STATUS_NO_SUPERVISOR = 253
STATUS_NO_RC = 254
INFRA_STATUSES = (STATUS_NO_FOLDER, STATUS_NO_SUPERVISOR, STATUS_NO_RC)
# The run script prints this line on stdout and stderr right before the job's
# output. Anything earlier comes from the login shell's start-up files (a
# .bashrc that prints) and is dropped.
STREAM_MARKER = b"jobbalancer-output-follows-7f3a"

# A job runs detached from the SSH channel, so it survives a dropped connection
# or a restarted server. A supervisor, orphaned at once into its own session,
# starts the job in a further session (so the job's PID is its process group
# id), waits for it and its whole group, and writes the exit status to "rc".
# Output goes to the files "out" and "err" in the run folder. The "started"
# marker makes a second run of this script attach to the job instead of
# starting it again. The channel follows both files from the given byte offsets
# until the supervisor exits, and then exits with the job's status.
# The followers stop when a child of the channel's shell gets a lock on "lock",
# which the supervisor holds while it lives: the shell takes it and the
# supervisor inherits it. They do not watch the supervisor's PID, because an
# exited orphan stays a zombie, which "tail --pid" counts as alive, until init
# reaps it: a second or more under some container inits, and never under an
# init that does not reap. flock is part of util-linux. Run folders without a
# lock file come from an older server and are followed by PID.
RUN_SCRIPT = """d={run_dir}
if [ ! -e "$d/started" ]; then
  mkdir -p "$d" && : > "$d/out" && : > "$d/err" && : > "$d/started" || exit 252
  exec 9>"$d/lock" && flock 9 || exit 252
  ( setsid /bin/sh -c 'd=$1
echo $$ > "$d/supervisor.tmp"
mv "$d/supervisor.tmp" "$d/supervisor"
setsid /bin/sh -c "$2" </dev/null >>"$d/out" 2>>"$d/err" 9>&- &
p=$!
echo $p > "$d/pid"
wait $p
r=$?
while kill -0 -$p 2>/dev/null; do sleep 0.1; done
echo $r > "$d/rc.tmp"
mv "$d/rc.tmp" "$d/rc"' jobbalancer "$d" {command} </dev/null >/dev/null 2>&1 & )
  exec 9>&-
fi
if [ -e "$d/lock" ]; then
  flock -s "$d/lock" true &
  s=$!
else
  i=0
  while [ ! -s "$d/supervisor" ]; do
    i=$((i+1)); [ $i -gt 500 ] && exit 253; sleep 0.01
  done
  s=$(cat "$d/supervisor")
fi
echo {marker}
echo {marker} >&2
tail -c +{out_start} -s {poll} -f --pid="$s" "$d/out" &
t=$!
tail -c +{err_start} -s {poll} -f --pid="$s" "$d/err" >&2
wait $t
[ -s "$d/rc" ] || exit 254
exit $(cat "$d/rc")
"""

# Kill the job's process group: SIGTERM, poll for the grace, then SIGKILL. The
# PID file appears a moment after launch, so wait for it first.
KILL_SCRIPT = (
    'd={run_dir}; i=0; while [ ! -s "$d/pid" ] && [ $i -lt 50 ]; do '
    'sleep 0.1; i=$((i+1)); done; [ -s "$d/pid" ] || exit 0; '
    'g=$(cat "$d/pid"); kill -TERM -$g 2>/dev/null || exit 0; i=0; '
    "while [ $i -lt {ticks} ]; do kill -0 -$g 2>/dev/null || exit 0; "
    "sleep 0.1; i=$((i+1)); done; kill -KILL -$g 2>/dev/null; exit 0"
)


@dataclass
class SshTarget:
    """The address, account and limits for reaching one worker."""

    name: str
    host: str
    port: int = 22
    username: str = ""
    key_path: str | None = None
    # A stored key decrypted in memory; when set it is used instead of key_path.
    client_key: asyncssh.SSHKey | None = None
    # Why the stored key could not be loaded; every connect attempt raises it.
    key_error: str | None = None
    max_sessions: int = 10
    host_key: str | None = None
    connect_timeout_seconds: float = 10
    keepalive_seconds: float = 5

    def channel_limit(self) -> int:
        """Return how many channels one connection may carry at once.

        sshd frees a session slot a little after the channel closes, so a
        connection kept at its MaxSessions gets "open failed" errors.
        """
        return max(1, (self.max_sessions * 6) // 10)


class HostKeyChangedError(TransportError):
    """Raised when a worker presents a host key other than the recorded one."""

    def __init__(
        self,
        worker: str,
        expected: str,
        presented: str,
        presented_key: str | None = None,
    ):
        super().__init__(
            f"host key changed: recorded {expected}, presented {presented}; "
            "accept the new key to bring the worker back",
            worker=worker,
        )
        self.expected = expected
        self.presented = presented
        # The presented key as an OpenSSH public key line, when it could be read.
        self.presented_key = presented_key


class _PooledConnection:
    def __init__(self, conn: asyncssh.SSHClientConnection, limit: int):
        self.conn = conn
        self.limit = limit
        self.in_flight = 0

    @property
    def closed(self) -> bool:
        return self.conn.is_closed()


HostKeyCallback = Callable[[str], Awaitable[None]]


class SshTransport:
    """A pool of SSH connections to one worker, with channels counted per connection."""

    def __init__(self, target: SshTarget, on_new_host_key: HostKeyCallback):
        self.target = target
        self._on_new_host_key = on_new_host_key
        self._pool: list[_PooledConnection] = []
        self._connect_lock = asyncio.Lock()
        self._slot_freed = asyncio.Condition()
        self._known_scripts: set[str] = set()
        self._stale_dirs: list[str] = []
        self._cleanup_timer: asyncio.TimerHandle | None = None
        self._cleanups: set[asyncio.Task[None]] = set()
        self.reconnects = 0

    async def start(
        self, spec: RunSpec, sink: OutputSink, offsets: tuple[int, int] = (0, 0)
    ) -> "SshExecution":
        """Start the job, or attach to it when it already runs on the worker.

        ``offsets`` are the bytes of stdout and stderr already received, so an
        attach resumes the output where it stopped. Raises TransportError.
        """
        if spec.script is not None:
            await self._ensure_script(spec.script)
        remote = _remote_command(spec)
        if len(remote.encode()) > INLINE_COMMAND_MAX_BYTES:
            # sshd hands the command to the login shell as one argv string,
            # which Linux caps at 128 KiB, so a long one travels as a file.
            wrapper = ScriptBody(remote.encode(), "/bin/sh")
            await self._ensure_script(wrapper)
            remote = f"exec /bin/sh {REMOTE_SCRIPT_DIR}/{wrapper.digest}"
        command = RUN_SCRIPT.format(
            run_dir=run_dir(spec),
            command=shlex.quote(remote),
            marker=STREAM_MARKER.decode(),
            out_start=offsets[0] + 1,
            err_start=offsets[1] + 1,
            poll=FOLLOW_POLL_SECONDS,
        )
        for attempt in range(CHANNEL_OPEN_ATTEMPTS):
            pooled = await self._acquire()
            try:
                channel, follower = await pooled.conn.create_session(
                    _FollowerSession, command, encoding=None
                )
            except asyncssh.ChannelOpenError as exc:
                # The connection is at sshd's MaxSessions: lower its limit and
                # try another one, opening a new connection if needed.
                self._release(pooled)
                pooled.limit = max(1, pooled.in_flight)
                logger.debug("Channel open failed on %s: %s", self.target.name, exc)
                await asyncio.sleep(0.01 * (attempt + 1))
                continue
            except asyncio.CancelledError:
                # The dispatcher cancels a reattach that outlasts its grace.
                self._release(pooled)
                raise
            except (OSError, asyncssh.Error) as exc:
                self._release(pooled)
                raise TransportError(
                    f"could not start job on {self.target.name}: {exc}",
                    worker=self.target.name,
                ) from exc
            channel.write_eof()
            return SshExecution(self, pooled, channel, follower, sink, spec, offsets)
        raise TransportError(
            f"could not open a session on {self.target.name} after "
            f"{CHANNEL_OPEN_ATTEMPTS} attempts",
            worker=self.target.name,
        )

    def forget(self, spec: RunSpec) -> None:
        """Queue the job's run folder for removal once its end is recorded."""
        self._stale_dirs.append(run_dir(spec))
        if len(self._stale_dirs) >= CLEANUP_BATCH:
            self._spawn_cleanup()
        elif self._cleanup_timer is None:
            loop = asyncio.get_running_loop()
            self._cleanup_timer = loop.call_later(
                CLEANUP_DELAY_SECONDS, self._spawn_cleanup
            )

    def _spawn_cleanup(self) -> None:
        if self._cleanup_timer is not None:
            self._cleanup_timer.cancel()
            self._cleanup_timer = None
        dirs, self._stale_dirs = self._stale_dirs, []
        if dirs:
            task = asyncio.ensure_future(self._remove_dirs(dirs))
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)

    async def _remove_dirs(self, dirs: list[str]) -> None:
        try:
            await self.run_simple("rm -rf " + " ".join(dirs), timeout=60)
        except TransportError as exc:
            logger.warning(
                "Could not remove %d run folders on %s: %s",
                len(dirs),
                self.target.name,
                exc,
            )

    async def read_status(self, spec: RunSpec) -> int | None:
        """Return the exit status the supervisor recorded, or None without one."""
        result = await self.run_simple(f"cat {run_dir(spec)}/rc", timeout=30)
        text = (result.stdout or b"").strip()
        if result.exit_status != 0 or not text.isdigit():
            return None
        return int(text)

    async def check(self) -> None:
        """Probe the listener and run ``true`` over the pool, both at once.

        When the network goes silent, the probe's TCP connect waits out
        connect_timeout_seconds, but a pooled connection closes after three
        unanswered keepalives and fails the command sooner. Raises the first
        failure and cancels the other check.
        """
        probe = asyncio.ensure_future(self._probe_listener())
        command = asyncio.ensure_future(self._check_command())
        try:
            done, _ = await asyncio.wait(
                {probe, command}, return_when=asyncio.FIRST_EXCEPTION
            )
            for task in (probe, command):
                if task in done:
                    task.result()
        finally:
            for task in (probe, command):
                task.cancel()
            await asyncio.gather(probe, command, return_exceptions=True)

    async def _check_command(self) -> None:
        try:
            # asyncio.timeout runs in this task. wait_for would wrap the call in
            # a task whose failure is never retrieved when the check is
            # cancelled at the same moment.
            async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
                result = await self.run_simple("true")
        except TimeoutError as exc:
            raise TransportError(
                f"liveness check timed out after {CHECK_TIMEOUT_SECONDS} s",
                worker=self.target.name,
            ) from exc
        if result.exit_status != 0:
            raise TransportError(
                f"liveness check exited with {result.exit_status}: "
                f"{_tail(result.stderr)}",
                worker=self.target.name,
            )

    async def run_simple(
        self, command: str, stdin: bytes | None = None, timeout: float | None = None
    ) -> asyncssh.SSHCompletedProcess:
        """Run a short helper command on a pooled channel and return its result."""
        for attempt in range(CHANNEL_OPEN_ATTEMPTS):
            pooled = await self._acquire()
            try:
                return await pooled.conn.run(
                    command,
                    input=stdin if stdin is not None else b"",
                    encoding=None,
                    check=False,
                    timeout=timeout,
                )
            except asyncssh.ChannelOpenError as exc:
                if pooled.closed:
                    # asyncssh 2.24 fails the channel opens still pending when a
                    # connection closes, for example after unanswered keepalives,
                    # with this error too. That is no session limit, and a retry
                    # would wait out the connect timeout on a new connection.
                    raise TransportError(
                        f"command failed on {self.target.name}: {exc}",
                        worker=self.target.name,
                    ) from exc
                pooled.limit = max(1, pooled.in_flight - 1)
                await asyncio.sleep(0.01 * (attempt + 1))
            except (OSError, asyncssh.Error) as exc:
                raise TransportError(
                    f"command failed on {self.target.name}: {exc}",
                    worker=self.target.name,
                ) from exc
            finally:
                self._release(pooled)
        raise TransportError(
            f"could not open a session on {self.target.name}", worker=self.target.name
        )

    async def kill_job(self, spec: RunSpec, grace_seconds: float) -> None:
        """Terminate a job's process group on the worker."""
        ticks = max(1, int(grace_seconds * 10))
        script = KILL_SCRIPT.format(run_dir=run_dir(spec), ticks=ticks)
        await self.run_simple(script, timeout=grace_seconds + 30)

    async def close(self) -> None:
        """Close every pooled connection."""
        pool, self._pool = self._pool, []
        for pooled in pool:
            pooled.conn.close()
        for pooled in pool:
            with contextlib.suppress(Exception):
                await pooled.conn.wait_closed()
        self._known_scripts.clear()

    async def _ensure_script(self, script: ScriptBody) -> None:
        digest = script.digest
        if digest in self._known_scripts:
            return
        target = f"{REMOTE_SCRIPT_DIR}/{digest}"
        command = (
            f'd={REMOTE_SCRIPT_DIR}; mkdir -p "$d" && '
            f'if [ ! -f {target} ]; then cat > "$d/{digest}.$$" && '
            f'chmod 700 "$d/{digest}.$$" && mv "$d/{digest}.$$" {target}; '
            "else cat > /dev/null; fi"
        )
        result = await self.run_simple(command, stdin=script.body, timeout=120)
        if result.exit_status != 0:
            raise TransportError(
                f"could not store script on {self.target.name}: {_tail(result.stderr)}",
                worker=self.target.name,
                retryable=False,
            )
        self._known_scripts.add(digest)

    async def _acquire(self) -> _PooledConnection:
        while True:
            self._pool = [p for p in self._pool if not p.closed]
            for pooled in self._pool:
                if pooled.in_flight < pooled.limit:
                    pooled.in_flight += 1
                    return pooled
            async with self._connect_lock:
                if any(p.in_flight < p.limit for p in self._pool if not p.closed):
                    continue
                conn = await self._connect()
                pooled = _PooledConnection(conn, self.target.channel_limit())
                self._pool.append(pooled)
                pooled.in_flight += 1
                return pooled

    def _release(self, pooled: _PooledConnection) -> None:
        pooled.in_flight -= 1
        if pooled.limit < self.target.channel_limit() and pooled.in_flight == 0:
            pooled.limit = self.target.channel_limit()

    async def _connect(self) -> asyncssh.SSHClientConnection:
        target = self.target
        options: dict[str, Any] = {
            "port": target.port,
            "connect_timeout": target.connect_timeout_seconds,
            "keepalive_interval": target.keepalive_seconds,
            "keepalive_count_max": 3,
            "agent_path": None,
            "config": [],
        }
        if target.username:
            # Without a user name asyncssh logs in as the local user.
            options["username"] = target.username
        if target.key_error:
            raise TransportError(target.key_error, worker=target.name)
        if target.client_key is not None:
            options["client_keys"] = [target.client_key]
        elif target.key_path:
            options["client_keys"] = [target.key_path]
        if target.host_key:
            trusted = asyncssh.import_public_key(target.host_key)
            options["known_hosts"] = ([trusted], [], [])
        else:
            options["known_hosts"] = None
        try:
            conn = await asyncssh.connect(target.host, **options)
        except asyncssh.HostKeyNotVerifiable as exc:
            raise await self._host_key_error() from exc
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            raise TransportError(
                f"could not connect to {target.host}:{target.port}: "
                f"{exc or type(exc).__name__}",
                worker=target.name,
            ) from exc
        except (TypeError, ValueError) as exc:
            # asyncssh rejects some settings (a bad key file, user name) this way.
            raise TransportError(
                f"invalid SSH settings for {target.name}: {exc}", worker=target.name
            ) from exc
        self.reconnects += 1
        # A connect while the pool still has a live connection only widens it.
        if self.reconnects > 1 and not any(not p.closed for p in self._pool):
            metrics.SSH_RECONNECTS.labels(target.name).inc()
        if not target.host_key:
            key = conn.get_server_host_key()
            if key is not None:
                text = key.export_public_key("openssh").decode().strip()
                target.host_key = text
                await self._on_new_host_key(text)
        return conn

    async def _host_key_error(self) -> HostKeyChangedError:
        target = self.target
        expected = fingerprint(target.host_key or "")
        presented = "unknown"
        presented_key = None
        options: dict[str, Any] = {}
        with contextlib.suppress(ValueError, asyncssh.KeyImportError):
            # Ask for a key of the recorded type, which is what connect checked.
            recorded = asyncssh.import_public_key(target.host_key or "")
            options["server_host_key_algs"] = [
                alg.decode() for alg in recorded.sig_algorithms
            ]
        # A host that no longer has a key of that type shows its preferred one.
        for attempt_options in (options, {}):
            key = None
            with contextlib.suppress(OSError, asyncssh.Error, TimeoutError):
                # get_server_host_key takes no connect_timeout (asyncssh 2.24).
                key = await asyncio.wait_for(
                    asyncssh.get_server_host_key(
                        target.host, target.port, config=[], **attempt_options
                    ),
                    target.connect_timeout_seconds,
                )
            if key is not None:
                presented = key.get_fingerprint("sha256")
                presented_key = key.export_public_key("openssh").decode().strip()
                break
        return HostKeyChangedError(target.name, expected, presented, presented_key)

    async def _probe_listener(self) -> None:
        """Open a TCP connection and read the SSH banner, so a stopped sshd shows."""
        target = self.target
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(target.host, target.port),
                target.connect_timeout_seconds,
            )
        except (OSError, TimeoutError) as exc:
            await self.close()
            raise TransportError(
                f"cannot reach sshd at {target.host}:{target.port}: "
                f"{exc or type(exc).__name__}",
                worker=target.name,
            ) from exc
        try:
            banner = await asyncio.wait_for(
                reader.readline(), target.connect_timeout_seconds
            )
        except (OSError, TimeoutError) as exc:
            raise TransportError(
                f"no SSH banner from {target.host}:{target.port}",
                worker=target.name,
            ) from exc
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if not banner.startswith(b"SSH-"):
            raise TransportError(
                f"{target.host}:{target.port} does not speak SSH", worker=target.name
            )


class _FollowerSession(asyncssh.SSHClientSession[bytes]):
    """Queue a follower channel's output, pausing the channel when it piles up.

    The sink writes to SQL more slowly than sshd sends, so the channel is paused
    once FOLLOW_BUFFER_BYTES are queued; sshd then stops after one window.
    """

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue()
        self.buffered = 0
        self.paused = False
        self.error: Exception | None = None
        self._channel: asyncssh.SSHClientChannel[bytes] | None = None

    def connection_made(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:
        self._channel = chan

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        stream = STDERR if datatype == asyncssh.EXTENDED_DATA_STDERR else STDOUT
        self.queue.put_nowait((stream, data))
        self.buffered += len(data)
        if not self.paused and self.buffered >= FOLLOW_BUFFER_BYTES:
            self.paused = True
            assert self._channel is not None
            self._channel.pause_reading()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.error = exc
        self.queue.put_nowait(None)

    def consumed(self, size: int) -> None:
        """Record that queued bytes were handed on, resuming the channel."""
        self.buffered -= size
        if self.paused and self.buffered < FOLLOW_BUFFER_BYTES // 2:
            self.paused = False
            assert self._channel is not None
            self._channel.resume_reading()


class SshExecution:
    """The channel that launched or follows one job."""

    def __init__(
        self,
        transport: SshTransport,
        pooled: _PooledConnection,
        channel: asyncssh.SSHClientChannel[bytes],
        follower: _FollowerSession,
        sink: OutputSink,
        spec: RunSpec,
        offsets: tuple[int, int],
    ):
        self._transport = transport
        self._pooled = pooled
        self._channel = channel
        self._follower = follower
        self._sink = sink
        self._spec = spec
        # Bytes of stdout and stderr received so far, including earlier attaches.
        self.offsets = list(offsets)
        # Output before the stream marker on each stream, or None once it passed.
        self._preamble: dict[int, bytes | None] = {STDOUT: b"", STDERR: b""}
        self._pump_task = asyncio.create_task(self._pump())

    async def wait(self) -> ExitResult:
        """Wait for the channel to close and translate the job's exit status."""
        try:
            await self._pump_task
            await self._channel.wait_closed()
        except (OSError, asyncssh.Error) as exc:
            return ExitResult(error=f"connection to worker lost: {exc}")
        finally:
            self._transport._release(self._pooled)
        if self._follower.error is not None:
            return ExitResult(
                error=f"connection to worker lost: {self._follower.error}"
            )
        exit_signal = self._channel.get_exit_signal()
        if exit_signal is not None:
            name = signal_name(exit_signal[0])
            return ExitResult(error=f"the job's follower ended by {name}")
        status = self._channel.get_exit_status()
        if status is None or status == -1:
            return ExitResult(error="connection to worker lost before the job ended")
        if status in INFRA_STATUSES:
            return await self._confirm_status(status)
        return status_result(status)

    async def kill(self, grace_seconds: float) -> None:
        """Kill the job's process group on the worker."""
        await self._transport.kill_job(self._spec, grace_seconds)

    def received(self) -> tuple[int, int]:
        """Return the bytes of stdout and stderr received so far."""
        return self.offsets[0], self.offsets[1]

    async def _confirm_status(self, status: int) -> ExitResult:
        try:
            recorded = await self._transport.read_status(self._spec)
        except TransportError as exc:
            return ExitResult(error=f"connection to worker lost: {exc}")
        if recorded == status:
            return status_result(status)
        reasons = {
            STATUS_NO_FOLDER: "could not create the run folder on the worker",
            STATUS_NO_SUPERVISOR: "the job's supervisor did not start",
            STATUS_NO_RC: "the job's supervisor ended without an exit status",
        }
        return ExitResult(error=reasons[status])

    async def _pump(self) -> None:
        while True:
            item = await self._follower.queue.get()
            if item is None:
                return
            stream, data = item
            size = len(data)
            data = self._strip_preamble(stream, data)
            if data:
                self.offsets[stream - 1] += len(data)
                await self._sink(stream, data)
            self._follower.consumed(size)

    def _strip_preamble(self, stream: int, data: bytes) -> bytes:
        """Drop what precedes the stream marker on a stream; return the rest."""
        pending = self._preamble[stream]
        if pending is None:
            return data
        buffer = pending + data
        position = buffer.find(STREAM_MARKER + b"\n")
        if position < 0:
            # Keep only a tail long enough to hold a marker split across packets.
            self._preamble[stream] = buffer[-(len(STREAM_MARKER) + 1) :]
            return b""
        if position:
            logger.debug(
                "Dropped %d bytes of login shell output on stream %d",
                position,
                stream,
            )
        self._preamble[stream] = None
        return buffer[position + len(STREAM_MARKER) + 1 :]


def status_result(status: int) -> ExitResult:
    """Translate a shell exit status, where 128 + N means signal N."""
    if 128 < status < 128 + 65 and status != 255:
        return ExitResult(signal=signal_name(status - 128))
    return ExitResult(exit_code=status)


def run_dir(spec: RunSpec) -> str:
    """Return the job's run folder on the worker, as a shell word."""
    return f"{REMOTE_RUN_DIR}/{spec.run_id}"


def _remote_command(spec: RunSpec) -> str:
    if spec.script is None:
        return spec.command or ""
    words = [*spec.script.interpreter_argv()]
    quoted = " ".join(shlex.quote(word) for word in words)
    args = " ".join(shlex.quote(param) for param in spec.params)
    path = f"{REMOTE_SCRIPT_DIR}/{spec.script.digest}"
    return f"exec {quoted} {path} {args}".rstrip()


def fingerprint(public_key_line: str) -> str:
    """Return the SHA256 fingerprint of an OpenSSH public key line."""
    if not public_key_line:
        return "none"
    try:
        return asyncssh.import_public_key(public_key_line).get_fingerprint("sha256")
    except (ValueError, asyncssh.KeyImportError):
        return "invalid key"


def _tail(data: bytes | str | None, limit: int = 300) -> str:
    if data is None:
        return ""
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    return text.strip()[-limit:]
