"""Run jobs on the server host itself, as the built-in ``local`` worker."""

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from orchestrator.transports.base import (
    STDERR,
    STDOUT,
    ExitResult,
    OutputSink,
    RunSpec,
    TransportError,
    signal_name,
)

logger = logging.getLogger(__name__)

READ_BYTES = 64 * 1024
GROUP_POLL_SECONDS = 0.05


class LocalExecution:
    """A job running in its own session on the server host."""

    def __init__(self, process: asyncio.subprocess.Process, sink: OutputSink):
        self._process = process
        self._offsets = [0, 0]
        self._pumps = [
            asyncio.create_task(_pump(process.stdout, STDOUT, sink, self._offsets)),
            asyncio.create_task(_pump(process.stderr, STDERR, sink, self._offsets)),
        ]

    async def wait(self) -> ExitResult:
        """Wait for the process and for both output pipes to close."""
        await asyncio.gather(*self._pumps)
        returncode = await self._process.wait()
        if returncode < 0:
            return ExitResult(signal=signal_name(-returncode))
        return ExitResult(exit_code=returncode)

    async def kill(self, grace_seconds: float) -> None:
        """Terminate the job's whole process group."""
        await kill_group(self._process.pid, grace_seconds)

    def received(self) -> tuple[int, int]:
        """Return the bytes of stdout and stderr read so far."""
        return self._offsets[0], self._offsets[1]


class LocalTransport:
    """Start jobs as child processes of the server."""

    def __init__(self, script_dir: Path):
        self._script_dir = script_dir

    async def start(
        self, spec: RunSpec, sink: OutputSink, offsets: tuple[int, int] = (0, 0)
    ) -> LocalExecution:
        """Start the job in a new session with stdin at end of file.

        Local jobs are children of the server and cannot be attached to again,
        so ``offsets`` must be zero.
        """
        if offsets != (0, 0):
            raise TransportError(
                "local jobs cannot be resumed", worker="local", retryable=False
            )
        if spec.script is not None:
            path = self._store_script(spec.script.digest, spec.script.body)
            argv = [*spec.script.interpreter_argv(), str(path), *spec.params]
        else:
            argv = ["/bin/sh", "-c", spec.command or ""]
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise TransportError(
                f"could not start {argv[0]!r}: {exc}", worker="local", retryable=False
            ) from exc
        return LocalExecution(process, sink)

    def forget(self, spec: RunSpec) -> None:
        """Do nothing: a local job leaves nothing behind."""

    async def check(self) -> None:
        """Do nothing: the server host is always reachable from itself."""

    async def close(self) -> None:
        """Do nothing: local jobs hold no connections."""

    def _store_script(self, digest: str, body: bytes) -> Path:
        self._script_dir.mkdir(parents=True, exist_ok=True)
        path = self._script_dir / digest
        if not path.exists():
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            partial.write_bytes(body)
            partial.chmod(0o700)
            partial.replace(path)
        return path


async def _pump(
    reader: asyncio.StreamReader | None,
    stream: int,
    sink: OutputSink,
    offsets: list[int],
) -> None:
    if reader is None:
        return
    while True:
        data = await reader.read(READ_BYTES)
        if not data:
            return
        offsets[stream - 1] += len(data)
        await sink(stream, data)


async def kill_group(pgid: int, grace_seconds: float) -> None:
    """Send SIGTERM to a process group, wait up to the grace, then SIGKILL it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = asyncio.get_running_loop().time() + grace_seconds
    while asyncio.get_running_loop().time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        await asyncio.sleep(GROUP_POLL_SECONDS)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
