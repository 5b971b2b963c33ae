"""Run jobs on remote workers over pooled asyncssh connections."""

import asyncio
import contextlib
import logging
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncssh

from orchestrator.transports.base import (
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

READ_BYTES = 256 * 1024
PGID_WAIT_SECONDS = 10
CHECK_TIMEOUT_SECONDS = 10
CHANNEL_OPEN_ATTEMPTS = 5
REMOTE_SCRIPT_DIR = '"${XDG_CACHE_HOME:-$HOME/.cache}/jobbalancer/scripts"'

# The login shell runs this wrapper. sshd starts every exec channel in a new
# session, so the wrapper's PID is also the job's process group id. It reports
# that id on the first stderr line, and the reader strips it again.
WRAPPER = (
    "exec /bin/sh -c 'echo jobbalancer-pgid:$$ >&2; exec /bin/sh -c \"$1\"' "
    "jobbalancer "
)
PGID_MARKER = b"jobbalancer-pgid:"

# Kill the job's process group: SIGTERM, poll for the grace, then SIGKILL.
KILL_SCRIPT = (
    "g={pgid}; kill -TERM -- -$g 2>/dev/null || exit 0; i=0; "
    "while [ $i -lt {ticks} ]; do kill -0 -- -$g 2>/dev/null || exit 0; "
    "sleep 0.1; i=$((i+1)); done; kill -KILL -- -$g 2>/dev/null; exit 0"
)


@dataclass
class SshTarget:
    """Where and how to reach one worker."""

    name: str
    host: str
    port: int = 22
    username: str = ""
    key_path: str | None = None
    max_sessions: int = 10
    host_key: str | None = None
    connect_timeout_seconds: float = 10
    keepalive_seconds: float = 5

    def channel_limit(self) -> int:
        """Return how many channels one connection may carry at once.

        sshd frees a session slot a little after the channel closes, so a
        connection kept at its MaxSessions sees "open failed" errors.
        """
        return max(1, (self.max_sessions * 6) // 10)


class HostKeyChangedError(TransportError):
    """Raised when a worker presents a host key other than the recorded one."""

    def __init__(self, worker: str, expected: str, presented: str):
        super().__init__(
            f"host key changed: recorded {expected}, presented {presented}; "
            "accept the new key to bring the worker back",
            worker=worker,
        )
        self.expected = expected
        self.presented = presented


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
        self.reconnects = 0

    async def start(self, spec: RunSpec, sink: OutputSink) -> "SshExecution":
        """Start the job on a pooled connection; raise TransportError on failure."""
        if spec.script is not None:
            await self._ensure_script(spec.script)
        command = WRAPPER + shlex.quote(_remote_command(spec))
        for attempt in range(CHANNEL_OPEN_ATTEMPTS):
            pooled = await self._acquire()
            try:
                process = await pooled.conn.create_process(command, encoding=None)
            except asyncssh.ChannelOpenError as exc:
                # The connection is at sshd's MaxSessions: lower its limit and
                # try another one, opening a new connection if needed.
                self._release(pooled)
                pooled.limit = max(1, pooled.in_flight)
                logger.debug("Channel open failed on %s: %s", self.target.name, exc)
                await asyncio.sleep(0.01 * (attempt + 1))
                continue
            except (OSError, asyncssh.Error) as exc:
                self._release(pooled)
                raise TransportError(
                    f"could not start job on {self.target.name}: {exc}",
                    worker=self.target.name,
                ) from exc
            process.stdin.write_eof()
            return SshExecution(self, pooled, process, sink)
        raise TransportError(
            f"could not open a session on {self.target.name} after "
            f"{CHANNEL_OPEN_ATTEMPTS} attempts",
            worker=self.target.name,
        )

    async def check(self) -> None:
        """Probe the listener and run ``true`` over the pool."""
        await self._probe_listener()
        try:
            result = await asyncio.wait_for(
                self.run_simple("true"), CHECK_TIMEOUT_SECONDS
            )
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
            except asyncssh.ChannelOpenError:
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

    async def kill_group(self, pgid: int, grace_seconds: float) -> None:
        """Terminate a process group on the worker."""
        ticks = max(1, int(grace_seconds * 10))
        script = KILL_SCRIPT.format(pgid=int(pgid), ticks=ticks)
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
            "username": target.username or None,
            "connect_timeout": target.connect_timeout_seconds,
            "keepalive_interval": target.keepalive_seconds,
            "keepalive_count_max": 3,
            "agent_path": None,
            "config": [],
        }
        if target.key_path:
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
        self.reconnects += 1
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
        with contextlib.suppress(OSError, asyncssh.Error, TimeoutError):
            key = await asyncssh.get_server_host_key(
                target.host, target.port, connect_timeout=target.connect_timeout_seconds
            )
            if key is not None:
                presented = key.get_fingerprint("sha256")
        return HostKeyChangedError(target.name, expected, presented)

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


class SshExecution:
    """A job running in one SSH channel."""

    def __init__(
        self,
        transport: SshTransport,
        pooled: _PooledConnection,
        process: asyncssh.SSHClientProcess[bytes],
        sink: OutputSink,
    ):
        self._transport = transport
        self._pooled = pooled
        self._process = process
        self._sink = sink
        self._pgid: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pumps = [
            asyncio.create_task(self._pump_stdout()),
            asyncio.create_task(self._pump_stderr()),
        ]

    async def wait(self) -> ExitResult:
        """Wait for the channel to close and translate its exit status."""
        try:
            await asyncio.gather(*self._pumps)
            await self._process.wait_closed()
        except (OSError, asyncssh.Error) as exc:
            return ExitResult(error=f"connection to worker lost: {exc}")
        finally:
            self._transport._release(self._pooled)
            if not self._pgid.done():
                self._pgid.cancel()
        signal_info = self._process.exit_signal
        if signal_info is not None:
            return ExitResult(signal=signal_name(signal_info[0]))
        status = self._process.exit_status
        if status is None or status == -1:
            return ExitResult(error="connection to worker lost before the job ended")
        return ExitResult(exit_code=status)

    async def kill(self, grace_seconds: float) -> None:
        """Kill the job's process group on the worker."""
        try:
            pgid = await asyncio.wait_for(asyncio.shield(self._pgid), PGID_WAIT_SECONDS)
        except (TimeoutError, asyncio.CancelledError):
            self._process.close()
            return
        await self._transport.kill_group(pgid, grace_seconds)

    async def _pump_stdout(self) -> None:
        reader = self._process.stdout
        while True:
            data = await reader.read(READ_BYTES)
            if not data:
                return
            await self._sink(STDOUT, data)

    async def _pump_stderr(self) -> None:
        reader = self._process.stderr
        header = b""
        while not self._pgid.done():
            data = await reader.read(READ_BYTES)
            if not data:
                if header:
                    await self._sink(STDERR, header)
                return
            header += data
            # Lines before the marker come from the login shell's start-up files.
            while not self._pgid.done():
                line, newline, rest = header.partition(b"\n")
                if not newline:
                    break
                if line.startswith(PGID_MARKER):
                    self._pgid.set_result(int(line[len(PGID_MARKER) :]))
                else:
                    await self._sink(STDERR, line + newline)
                header = rest
        if header:
            await self._sink(STDERR, header)
        while True:
            data = await reader.read(READ_BYTES)
            if not data:
                return
            await self._sink(STDERR, data)


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
