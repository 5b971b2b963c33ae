"""Start real OpenSSH sshd processes on 127.0.0.1 as throwaway worker hosts.

Tests and benchmarks use these hosts in place of remote machines. Each host runs
`/usr/sbin/sshd -D` from its own directory with its own host key, client key,
authorized_keys file, sshd_config and log file, and accepts key logins for the
current user only.

Command line:

    python3 scripts/testhost.py N [--dir D] [--max-sessions M]

starts N hosts, prints `name host port user client_key_path` for each, and stops
them on SIGINT or SIGTERM.

Linux only, because the module walks /proc and signals through pidfds. It runs as
root, which creates /run/sshd for sshd, and it was tested only as root.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

logger = logging.getLogger("testhost")

SSHD_PATH = "/usr/sbin/sshd"
SSH_KEYGEN_PATH = "ssh-keygen"
LOOPBACK = "127.0.0.1"
# sshd chroots its unprivileged pre-authentication child into this directory and
# exits at startup if it is missing.
PRIVSEP_DIR = Path("/run/sshd")

# Seconds that start() waits for sshd to bind its port and send its banner.
START_TIMEOUT = 10.0
# Seconds that stop() waits for the whole process tree to exit after SIGTERM.
STOP_TIMEOUT = 5.0
# Minimum seconds that each level of the tree gets after SIGTERM.
LEVEL_TIMEOUT = 0.5
# Seconds to wait for processes to exit after SIGKILL.
KILL_TIMEOUT = 1.0
# Attempts to find a free port when another process binds the probed port first.
PORT_ATTEMPTS = 5
LOG_TAIL_LINES = 20


class TestHostError(RuntimeError):
    """Raised when a test host cannot be started or is used in the wrong state."""

    # Keeps pytest from collecting this class because its name starts with "Test".
    __test__ = False


def current_user() -> str:
    """Return the name of the effective user, the only user that the hosts accept."""
    return pwd.getpwuid(os.geteuid()).pw_name


@dataclass(eq=False)
class SshHost:
    """One sshd listening on 127.0.0.1, with its files in `directory`.

    `port` 0 means that start() picks a free port. After the first start the port
    stays fixed, so resume() and a second start() listen on the same port.
    """

    directory: Path
    name: str = "host0"
    max_sessions: int = 10
    port: int = 0
    host: str = field(default=LOOPBACK, init=False)
    user: str = field(default_factory=current_user, init=False)
    _process: subprocess.Popen[bytes] | None = field(
        default=None, init=False, repr=False
    )
    _port_is_fixed: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).resolve()
        if self.max_sessions < 1:
            raise ValueError(
                f"max_sessions must be at least 1, got {self.max_sessions}"
            )
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be between 0 and 65535, got {self.port}")
        self._port_is_fixed = self.port != 0

    @property
    def host_key_path(self) -> Path:
        """Ed25519 private host key, with the public key next to it as `.pub`."""
        return self.directory / "ssh_host_ed25519_key"

    @property
    def client_key_path(self) -> Path:
        """Ed25519 private key without a passphrase that clients log in with."""
        return self.directory / "client_ed25519_key"

    @property
    def authorized_keys_path(self) -> Path:
        return self.directory / "authorized_keys"

    @property
    def known_hosts_path(self) -> Path:
        """known_hosts file with this host's key under `[127.0.0.1]:port`."""
        return self.directory / "known_hosts"

    @property
    def config_path(self) -> Path:
        return self.directory / "sshd_config"

    @property
    def log_path(self) -> Path:
        return self.directory / "sshd.log"

    @property
    def pid_file_path(self) -> Path:
        return self.directory / "sshd.pid"

    @property
    def pid(self) -> int | None:
        """PID of the listening sshd, or None while the host is stopped."""
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process.pid

    @property
    def is_running(self) -> bool:
        return self.pid is not None

    def start(self) -> None:
        """Start sshd and wait until it sends its SSH-2.0 banner.

        The first call creates the directory, keys and authorized_keys file, and
        picks a free port unless the constructor got one. Raises TestHostError with
        the tail of the sshd log if sshd does not come up within START_TIMEOUT.
        """
        if self.is_running:
            raise TestHostError(f"{self.name} is already running on port {self.port}")
        self._prepare_files()
        if self._port_is_fixed:
            self._start_on_port(self.port)
            return

        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = find_free_port()
            try:
                self._start_on_port(port)
            except _PortInUseError:
                logger.warning(
                    "%s: port %d was taken before sshd bound it (attempt %d of %d)",
                    self.name,
                    port,
                    attempt,
                    PORT_ATTEMPTS,
                )
                continue
            self._port_is_fixed = True
            return
        raise TestHostError(
            f"{self.name}: sshd failed to bind a free port in {PORT_ATTEMPTS} "
            f"attempts because other processes took each one first. "
            f"See {self.log_path} and retry."
        )

    def stop(self) -> None:
        """Stop sshd and every process it started, such as open SSH sessions.

        Does nothing if the host is not running.
        """
        process = self._process
        if process is None:
            return
        self._process = None
        _terminate_process_tree(process)
        self.pid_file_path.unlink(missing_ok=True)
        logger.info("%s: stopped sshd on port %d", self.name, self.port)

    def pause(self) -> None:
        """Take the host down: stop sshd and drop every open SSH session.

        The keys, config and port stay, so resume() brings the same host back.
        """
        if not self.is_running:
            raise TestHostError(
                f"{self.name} cannot be paused because it is not running"
            )
        self.stop()

    def resume(self) -> None:
        """Start sshd again on the same port with the same host key."""
        if not self._port_is_fixed:
            raise TestHostError(f"{self.name} cannot be resumed before its first start")
        if self.is_running:
            raise TestHostError(f"{self.name} is already running on port {self.port}")
        self.start()

    def ssh_command(self, *remote_command: str) -> list[str]:
        """Build an `ssh` command line that logs in to this host and runs a command."""
        return [
            "ssh",
            "-i",
            str(self.client_key_path),
            "-p",
            str(self.port),
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts_path}",
            f"{self.user}@{self.host}",
            *remote_command,
        ]

    def __enter__(self) -> SshHost:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _prepare_files(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        if not self.host_key_path.exists():
            _generate_key(self.host_key_path, comment=f"{self.name} host key")
        if not self.client_key_path.exists():
            _generate_key(self.client_key_path, comment=f"{self.user}@{self.name}")
        public_key = self.client_key_path.with_suffix(".pub").read_text()
        self.authorized_keys_path.write_text(public_key)
        self.authorized_keys_path.chmod(0o600)

    def _write_config(self, port: int) -> None:
        lines = [
            f"ListenAddress {self.host}",
            f"Port {port}",
            f"HostKey {self.host_key_path}",
            f"PidFile {self.pid_file_path}",
            f"AuthorizedKeysFile {self.authorized_keys_path}",
            "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            # The directory is usually under /tmp, whose permissions sshd would
            # otherwise reject for the authorized_keys file.
            "StrictModes no",
            "MaxStartups 200",
            f"MaxSessions {self.max_sessions}",
            "LogLevel VERBOSE",
            "UseDNS no",
            "PrintMotd no",
            "Subsystem sftp internal-sftp",
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def _write_known_hosts(self) -> None:
        public_key = self.host_key_path.with_suffix(".pub").read_text().split()
        key_type, key_data = public_key[0], public_key[1]
        entry = f"[{self.host}]:{self.port} {key_type} {key_data}\n"
        self.known_hosts_path.write_text(entry)

    def _start_on_port(self, port: int) -> None:
        self._write_config(port)
        self.pid_file_path.unlink(missing_ok=True)

        command = self._sshd_command()
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        # sshd reports some errors, such as a bad config file, on stderr before it
        # opens the -E log file, so stderr is appended to the same file.
        # A new session keeps signals sent to the caller's process group, such as
        # Ctrl-C in a terminal, away from sshd, so that stop() alone shuts it down.
        with self.log_path.open("ab") as stderr_file:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr_file,
                start_new_session=True,
            )

        try:
            self._wait_until_ready(process, port, log_offset)
        except BaseException:
            _terminate_process_tree(process)
            raise

        self._process = process
        self.port = port
        self._write_known_hosts()
        logger.info(
            "%s: sshd pid %d listening on %s:%d",
            self.name,
            process.pid,
            self.host,
            port,
        )

    def _sshd_command(self) -> list[str]:
        """Return the argv that runs sshd in the foreground with this host's files.

        Subclasses may wrap it, for example to run sshd in another network
        namespace, as long as the wrapper replaces itself with sshd by exec, because
        start() expects the PID it started to be the sshd that writes the PID file.
        """
        return [
            SSHD_PATH,
            "-D",
            "-f",
            str(self.config_path),
            "-E",
            str(self.log_path),
        ]

    def _wait_until_ready(
        self, process: subprocess.Popen[bytes], port: int, log_offset: int
    ) -> None:
        """Wait until `process` has bound `port` and sends an SSH banner.

        sshd writes its PidFile only after it has bound its listening sockets, so a
        PID file with our PID shows that the banner below comes from our sshd and
        not from another process that took the port.
        """
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._raise_start_failure(process, port, log_offset)
            if self._pid_file_matches(process.pid) and _read_ssh_banner(
                self.host, port
            ):
                return
            time.sleep(0.02)

        raise TestHostError(
            f"{self.name}: sshd did not send an SSH-2.0 banner on {self.host}:{port} "
            f"within {START_TIMEOUT:.0f} s. Log tail:\n"
            + self._read_log_tail(log_offset)
        )

    def _pid_file_matches(self, pid: int) -> bool:
        try:
            return self.pid_file_path.read_text().strip() == str(pid)
        except FileNotFoundError:
            return False

    def _raise_start_failure(
        self, process: subprocess.Popen[bytes], port: int, log_offset: int
    ) -> None:
        log_tail = self._read_log_tail(log_offset)
        if not self._port_is_fixed and "Address already in use" in log_tail:
            raise _PortInUseError(port)
        raise TestHostError(
            f"{self.name}: sshd exited with status {process.returncode} while "
            f"starting on {self.host}:{port}. Log tail:\n{log_tail}"
        )

    def _read_log_tail(self, log_offset: int) -> str:
        """Return the last lines written to the sshd log since `log_offset`."""
        text = ""
        with (
            contextlib.suppress(FileNotFoundError),
            self.log_path.open("rb") as log_file,
        ):
            log_file.seek(log_offset)
            text = log_file.read().decode(errors="replace")
        lines = text.splitlines()[-LOG_TAIL_LINES:]
        return "\n".join(lines) if lines else "(empty)"


class _PortInUseError(Exception):
    def __init__(self, port: int) -> None:
        super().__init__(f"port {port} is already in use")
        self.port = port


def find_free_port() -> int:
    """Return a port on 127.0.0.1 that was free a moment ago.

    Another process may bind the port before the caller does, so callers retry.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def _read_ssh_banner(host: str, port: int) -> bool:
    """Return whether `host:port` accepts TCP and sends an SSH-2.0 banner."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as connection:
            received = b""
            while b"\n" not in received and len(received) < 256:
                chunk = connection.recv(256)
                if not chunk:
                    break
                received += chunk
    except OSError:
        return False
    return received.startswith(b"SSH-2.0-")


def _generate_key(path: Path, comment: str) -> None:
    command = [
        SSH_KEYGEN_PATH,
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-C",
        comment,
        "-f",
        str(path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise TestHostError(
            f"ssh-keygen failed with status {result.returncode} for {path}: "
            f"{result.stderr.strip()}"
        )


# Process tree handling. Every signal goes through a pidfd that was opened while the
# process was a descendant of the sshd we started, so a PID that a finished process
# freed and the kernel handed to an unrelated process is never signalled.


def _read_process_table() -> dict[int, tuple[int, int]]:
    """Return {pid: (parent pid, start time in clock ticks)} for live processes."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat_file:
                stat = stat_file.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # The command name in field 2 may contain spaces and ")", so the fields
        # after it are found from the last ")".
        fields = stat[stat.rindex(b")") + 2 :].split()
        state = fields[0]
        if state in (b"Z", b"X"):
            continue
        table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def _find_descendants(
    root_pid: int, table: dict[int, tuple[int, int]]
) -> dict[int, int]:
    """Return {pid: depth} for the descendants of `root_pid`, whose children are 1."""
    children: dict[int, list[int]] = {}
    for pid, (parent_pid, _) in table.items():
        children.setdefault(parent_pid, []).append(pid)
    depths: dict[int, int] = {}
    pending = [(pid, 1) for pid in children.get(root_pid, [])]
    while pending:
        pid, depth = pending.pop()
        if pid in depths:
            continue
        depths[pid] = depth
        pending.extend((child, depth + 1) for child in children.get(pid, []))
    return depths


def _open_pidfd(pid: int, start_time: int) -> int | None:
    """Open a pidfd for `pid` if it is still the process that started at `start_time`.

    The start time is read after the pidfd is open, so a match proves that the
    pidfd refers to the process seen in the process table.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            stat = stat_file.read()
    except (FileNotFoundError, ProcessLookupError):
        os.close(pidfd)
        return None
    if int(stat[stat.rindex(b")") + 2 :].split()[19]) != start_time:
        os.close(pidfd)
        return None
    return pidfd


def _send_signal(pidfd: int, signal_number: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal_number)


def _pidfd_has_exited(pidfd: int) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


@dataclass
class _FrozenProcess:
    pidfd: int
    depth: int


def _freeze_descendants(root_pid: int) -> dict[int, _FrozenProcess]:
    """Send SIGSTOP to every descendant of `root_pid` and return them by PID.

    The caller stops the root first, so it accepts no new connections. Stopped
    processes cannot fork, so rescanning until no new descendant shows up collects
    the whole tree.
    """
    frozen: dict[int, _FrozenProcess] = {}
    for _ in range(50):
        table = _read_process_table()
        depths = _find_descendants(root_pid, table)
        new_pids = depths.keys() - frozen.keys()
        if not new_pids:
            break
        for pid in new_pids:
            pidfd = _open_pidfd(pid, table[pid][1])
            if pidfd is None:
                continue
            frozen[pid] = _FrozenProcess(pidfd, depths[pid])
            _send_signal(pidfd, signal.SIGSTOP)
    return frozen


def _wait_for_exit(processes: dict[int, int], timeout: float) -> dict[int, int]:
    """Wait up to `timeout` seconds and return the {pid: pidfd} still running."""
    deadline = time.monotonic() + timeout
    remaining = dict(processes)
    while True:
        remaining = {
            pid: pidfd
            for pid, pidfd in remaining.items()
            if not _pidfd_has_exited(pidfd)
        }
        if not remaining or time.monotonic() >= deadline:
            return remaining
        time.sleep(0.01)


def _terminate_and_wait(processes: dict[int, int], timeout: float) -> None:
    """Send SIGTERM to {pid: pidfd}, wait up to `timeout`, then SIGKILL the rest."""
    for pidfd in processes.values():
        _send_signal(pidfd, signal.SIGTERM)
        _send_signal(pidfd, signal.SIGCONT)

    remaining = _wait_for_exit(processes, timeout)
    for pid, pidfd in remaining.items():
        logger.warning(
            "pid %d did not exit within %.1f s of SIGTERM; sending SIGKILL",
            pid,
            timeout,
        )
        _send_signal(pidfd, signal.SIGKILL)
    # Waiting here lets the parent, which is still stopped, find the child dead
    # when it runs again.
    _wait_for_exit(remaining, KILL_TIMEOUT)


def _terminate_process_tree(process: subprocess.Popen[bytes]) -> None:
    """Terminate `process` and all its descendants, then SIGKILL what is left.

    The deepest processes go first while their parents stay stopped, so an SSH
    client sees its connection close without an exit status, as when a host fails.
    The listener reaps its per-connection children, but a per-connection sshd
    exits on SIGTERM without reaping the command it ran, so that command stays a
    zombie until init reaps it.

    NOTE: a process that outlives its session's shell, such as one started with
    `nohup cmd &` or a double-forked daemon, is re-parented to init and is no
    longer a descendant, so it keeps running.
    """
    frozen: dict[int, _FrozenProcess] = {}
    if process.poll() is None:
        process.send_signal(signal.SIGSTOP)
        frozen = _freeze_descendants(process.pid)

    try:
        # Every level gets at least LEVEL_TIMEOUT, so a process that ignores
        # SIGTERM deep in the tree does not use up the time of its parents.
        deadline = time.monotonic() + STOP_TIMEOUT
        depths = sorted({member.depth for member in frozen.values()}, reverse=True)
        for depth in depths:
            level = {
                pid: member.pidfd
                for pid, member in frozen.items()
                if member.depth == depth
            }
            timeout = max(deadline - time.monotonic(), LEVEL_TIMEOUT)
            _terminate_and_wait(level, timeout)

        if process.poll() is None:
            process.terminate()
            process.send_signal(signal.SIGCONT)
        timeout = max(deadline - time.monotonic(), LEVEL_TIMEOUT)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning(
                "sshd pid %d did not exit within %.1f s of SIGTERM; sending SIGKILL",
                process.pid,
                timeout,
            )
            process.kill()
            process.wait()
    finally:
        for member in frozen.values():
            os.close(member.pidfd)


def start_hosts(n: int, base_dir: Path | str, max_sessions: int = 10) -> list[SshHost]:
    """Start `n` hosts named host0 … host{n-1}, each in its own subdirectory.

    Hosts start in parallel. If any fails, the others are stopped and the error is
    raised.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    base_path = Path(base_dir)
    hosts = [
        SshHost(
            base_path / f"host{index}", name=f"host{index}", max_sessions=max_sessions
        )
        for index in range(n)
    ]
    with ThreadPoolExecutor(max_workers=min(n, 16)) as executor:
        futures = [executor.submit(host.start) for host in hosts]
    errors = [future.exception() for future in futures]
    first_error = next((error for error in errors if error is not None), None)
    if first_error is not None:
        stop_hosts(hosts)
        raise first_error
    return hosts


def stop_hosts(hosts: list[SshHost]) -> None:
    """Stop every host in `hosts`, skipping hosts that are already stopped."""
    for host in hosts:
        host.stop()


@contextlib.contextmanager
def running_hosts(
    n: int, base_dir: Path | str | None = None, max_sessions: int = 10
) -> Iterator[list[SshHost]]:
    """Start `n` hosts for the duration of a `with` block and stop them after it.

    Without `base_dir` the hosts live in a temporary directory that is removed
    afterwards. A given `base_dir` is kept.
    """
    temporary_dir = None
    if base_dir is None:
        temporary_dir = tempfile.mkdtemp(prefix="testhost-")
        base_dir = temporary_dir
    try:
        hosts = start_hosts(n, base_dir, max_sessions=max_sessions)
        try:
            yield hosts
        finally:
            stop_hosts(hosts)
    finally:
        if temporary_dir is not None:
            shutil.rmtree(temporary_dir, ignore_errors=True)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Start N OpenSSH servers on 127.0.0.1 as test worker hosts, print "
            "'name host port user client_key_path' for each, and stop them on "
            "SIGINT or SIGTERM."
        )
    )
    parser.add_argument(
        "count", metavar="N", type=_positive_int, help="number of hosts"
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="base directory for the hosts' files, kept on exit "
        "(default: a temporary directory removed on exit)",
    )
    parser.add_argument(
        "--max-sessions",
        type=_positive_int,
        default=10,
        help="MaxSessions in each sshd_config: sessions per SSH connection "
        "(default: 10)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )

    stop_requested = threading.Event()

    def request_stop(signal_number: int, _frame: object) -> None:
        logger.info("received %s; stopping hosts", signal.Signals(signal_number).name)
        stop_requested.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    try:
        with running_hosts(args.count, args.dir, args.max_sessions) as hosts:
            for host in hosts:
                print(host.name, host.host, host.port, host.user, host.client_key_path)
            sys.stdout.flush()
            while not stop_requested.wait(timeout=1.0):
                pass
    except TestHostError as error:
        logger.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
