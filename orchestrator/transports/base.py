"""The contract that every transport (local, ssh, agent) satisfies."""

import hashlib
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

STDOUT = 1
STDERR = 2

# Commands longer than this are sent to the worker as a script file, because
# Linux limits one argv string to 128 KiB (MAX_ARG_STRLEN).
INLINE_COMMAND_MAX_BYTES = 64 * 1024

OutputSink = Callable[[int, bytes], Awaitable[None]]


@dataclass(frozen=True)
class ScriptBody:
    """A script that the worker stores under its content hash before running it."""

    body: bytes
    interpreter: str

    @property
    def digest(self) -> str:
        """Return the SHA-256 hex digest that names the cached copy."""
        return hashlib.sha256(self.body).hexdigest()

    def interpreter_argv(self) -> list[str]:
        """Split the interpreter setting into argv words (``/usr/bin/env python3``)."""
        return shlex.split(self.interpreter)


@dataclass(frozen=True)
class RunSpec:
    """A job to run: a shell command, or a script with separate arguments."""

    job_id: int
    command: str | None = None
    script: ScriptBody | None = None
    params: list[str] = field(default_factory=list)
    # Names this attempt's run folder on the worker: letters, digits and "-".
    run_id: str = ""

    @classmethod
    def for_command(cls, job_id: int, command: str, run_id: str = "") -> "RunSpec":
        """Build a spec for a shell command, moving long ones into a script."""
        if len(command.encode()) > INLINE_COMMAND_MAX_BYTES:
            body = ScriptBody(command.encode(), "/bin/sh")
            return cls(job_id, script=body, run_id=run_id)
        return cls(job_id, command=command, run_id=run_id)


@dataclass(frozen=True)
class ExitResult:
    """The end of a job's process, or the reason the transport lost track of it."""

    exit_code: int | None = None
    signal: str | None = None
    # Set when the transport failed (connection lost), never for a job's own exit.
    error: str | None = None
    started: bool = True


class TransportError(Exception):
    """Raised when a transport cannot reach its worker or start a job there."""

    def __init__(self, message: str, *, worker: str = "", retryable: bool = True):
        super().__init__(message)
        self.worker = worker
        self.retryable = retryable


class Execution(Protocol):
    """A job started by a transport."""

    async def wait(self) -> ExitResult:
        """Wait until the job's process and its output streams have ended."""
        ...

    async def kill(self, grace_seconds: float) -> None:
        """Send SIGTERM to the job's process group, then SIGKILL after the grace."""
        ...

    def received(self) -> tuple[int, int]:
        """Return the bytes of stdout and stderr received so far."""
        ...


class Transport(Protocol):
    """A way to run jobs on one worker."""

    async def start(
        self, spec: RunSpec, sink: OutputSink, offsets: tuple[int, int] = (0, 0)
    ) -> Execution:
        """Start ``spec`` and feed its output to ``sink``; raise TransportError.

        A transport that keeps jobs running apart from the server (ssh) attaches
        to a job already started with the same ``run_id`` and resumes its output
        after ``offsets`` (bytes of stdout and stderr already received).
        """
        ...

    def forget(self, spec: RunSpec) -> None:
        """Drop what the worker keeps of a job whose end is recorded."""
        ...

    async def check(self) -> None:
        """Check that the worker can run jobs; raise TransportError if not."""
        ...

    async def close(self) -> None:
        """Close connections; jobs still running on them are lost."""
        ...


def signal_name(value: str | int) -> str:
    """Normalise a signal given as a number or a name to the ``SIGTERM`` form."""
    import signal as signal_module

    if isinstance(value, int):
        try:
            return signal_module.Signals(value).name
        except ValueError:
            return f"SIG{value}"
    name = value.upper()
    return name if name.startswith("SIG") else f"SIG{name}"
