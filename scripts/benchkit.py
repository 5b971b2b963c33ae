"""Building blocks of the benchmark: hosts, servers, a light HTTP client, probes.

scripts/bench.py uses these. The worker hosts are scripts/testhost.py sshd
processes that accept logins for a throwaway account (BENCH_USER) with the
stock Debian shell profile, so that the figures leave out a developer's own
shell start-up files.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import testhost  # noqa: E402  (lives in scripts/, added to the path above)

from tests.support.server import Server  # noqa: E402

BENCH_USER = "jbbench"
MARIADB_ADMIN_URL = "mysql+pymysql://root@127.0.0.1:3306/test"
MARIADB_BENCH_URL = "mysql+pymysql://root@127.0.0.1:3306/jobbalancer_bench"
ACTIVE_STATES = ("waiting", "running")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """Raised when the benchmark cannot set up or a run goes wrong."""


def ensure_bench_user() -> pwd.struct_passwd:
    """Return the benchmark account, creating it with useradd when missing."""
    try:
        return pwd.getpwnam(BENCH_USER)
    except KeyError:
        pass
    if os.geteuid() != 0:
        raise BenchError(
            f"the account {BENCH_USER!r} does not exist and only root can create "
            "it: run 'useradd --create-home --shell /bin/bash --password \\* "
            f"{BENCH_USER}'"
        )
    # useradd locks a new account ("!" as its password), and sshd without PAM
    # rejects locked accounts even for key logins; "*" only disables passwords.
    subprocess.run(
        ["useradd", "--create-home", "--shell", "/bin/bash", "--password", "*"]
        + [BENCH_USER],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(BENCH_USER)


class BenchHost(testhost.SshHost):
    """A test sshd host that accepts the benchmark account instead of ours.

    sshd reads AuthorizedKeysFile as the target account, so the host folder
    and the authorized_keys file must be readable by it.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.user = BENCH_USER

    def _prepare_files(self) -> None:
        super()._prepare_files()
        self.directory.chmod(0o755)
        self.authorized_keys_path.chmod(0o644)


def start_hosts(count: int, base: Path) -> list[BenchHost]:
    """Start ``count`` benchmark hosts in parallel under ``base``."""
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    hosts = [BenchHost(base / f"host{i}", name=f"host{i}") for i in range(count)]
    errors: list[BaseException] = []

    def start(host: BenchHost) -> None:
        try:
            host.start()
        except BaseException as exc:  # noqa: B036  (reported after the join)
            errors.append(exc)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(start, hosts))
    if errors:
        testhost.stop_hosts(hosts)
        raise errors[0]
    return hosts


def write_ssh_config(hosts: list[BenchHost], folder: Path) -> Path:
    """Write an OpenSSH client config with ControlMaster for every host.

    Each host gets the alias ``NAME`` so that ``ssh -F FILE NAME cmd`` works.
    """
    lines = []
    for host in hosts:
        lines += [
            f"Host {host.name}",
            f"  HostName {host.host}",
            f"  Port {host.port}",
            f"  User {host.user}",
            f"  IdentityFile {host.client_key_path}",
            "  IdentitiesOnly yes",
            "  BatchMode yes",
            f"  UserKnownHostsFile {host.known_hosts_path}",
            "  StrictHostKeyChecking yes",
            "  ControlMaster auto",
            f"  ControlPath {folder}/cm-%C",
            "  ControlPersist 600",
            "",
        ]
    path = folder / "ssh_config"
    path.write_text("\n".join(lines))
    return path


# Database and server


def mariadb_reachable() -> bool:
    """Create the benchmark database on the local MariaDB; False when it is down."""
    try:
        import pymysql

        conn = pymysql.connect(host="127.0.0.1", port=3306, user="root")
    except Exception:
        return False
    with conn:
        conn.cursor().execute("DROP DATABASE IF EXISTS jobbalancer_bench")
        conn.cursor().execute("CREATE DATABASE jobbalancer_bench")
    return True


def start_server(workdir: Path, backend: str, **settings: Any) -> Server:
    """Start ``jobbalancer serve`` on a fresh database of ``backend``."""
    url = ""
    if backend == "mariadb":
        mariadb_reachable()
        url = MARIADB_BENCH_URL
    values: dict[str, Any] = {"liveness_interval_seconds": 10}
    values.update(settings)
    server = Server(workdir, url, **values)
    server.start()
    return server


class DatabaseProbe:
    """Read job counts straight from the server's database, bypassing HTTP."""

    def __init__(self, server: Server, backend: str):
        self.backend = backend
        if backend == "sqlite":
            path = server.workdir / "data" / "jobbalancer.db"
            self._conn: Any = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        else:
            import pymysql

            self._conn = pymysql.connect(
                host="127.0.0.1",
                user="root",
                database="jobbalancer_bench",
                autocommit=True,
            )

    def scalar(self, sql: str, *args: Any) -> Any:
        """Run one query and return the first column of its first row."""
        if self.backend == "sqlite":
            return self._conn.execute(sql.replace("%s", "?"), args).fetchone()[0]
        with self._conn.cursor() as cursor:
            cursor.execute(sql, args)
            return cursor.fetchone()[0]

    def active_jobs(self) -> int:
        """Return how many jobs are waiting or running."""
        return int(
            self.scalar(
                "SELECT COUNT(*) FROM jobs WHERE state IN (%s, %s)", *ACTIVE_STATES
            )
        )

    def log_bytes(self, job_id: int) -> int:
        """Return the output bytes stored for a job."""
        return int(self.scalar("SELECT log_bytes FROM jobs WHERE id = %s", job_id))

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()


def register_workers(
    server: Server, hosts: list[BenchHost], max_jobs: int = 4, timeout: float = 120
) -> None:
    """Register hosts as SSH workers, disable the local worker, wait until online."""
    with server.client() as client:
        response = client.patch("/api/v1/workers/local", json={"enabled": False})
        _check(response)
        for host in hosts:
            body = {
                "name": host.name,
                "host": host.host,
                "port": host.port,
                "user": host.user,
                "key_path": str(host.client_key_path),
                "max_jobs": max_jobs,
            }
            _check(client.post("/api/v1/workers", json=body))
        names = {host.name for host in hosts}
        deadline = time.monotonic() + timeout
        while True:
            listing = client.get("/api/v1/workers").json()["workers"]
            online = {w["name"] for w in listing if w["state"] == "online"}
            if names <= online:
                return
            if time.monotonic() > deadline:
                missing = [
                    f"{w['name']} ({w['state']}: {w['reason']})"
                    for w in listing
                    if w["name"] in names - online
                ]
                raise BenchError(f"workers not online: {', '.join(missing)}")
            time.sleep(0.2)


def set_workers_enabled(server: Server, names: list[str], enabled: bool) -> None:
    """Enable or disable workers through the API."""
    with server.client() as client:
        for name in names:
            _check(client.patch(f"/api/v1/workers/{name}", json={"enabled": enabled}))


def _check(response: httpx.Response) -> None:
    if response.status_code >= 400:
        raise BenchError(
            f"{response.request.method} {response.request.url} returned "
            f"{response.status_code}: {response.text[:300]}"
        )


# A light HTTP/1.1 client, so that the load generator spends little of the two
# cores that it shares with the server, the sshd hosts and the jobs.


class HttpConnection:
    """One keep-alive HTTP/1.1 connection that sends prepared requests."""

    def __init__(self, host: str, port: int):
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        """Connect to the server."""
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        """Close the connection."""
        if self._writer is not None:
            self._writer.close()

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """Send one request and return (status, body)."""
        assert self._reader is not None and self._writer is not None
        self._writer.write(request)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await self._reader.readexactly(length) if length else b""
        return status, body


def post_request(server: Server, path: str, payload: dict[str, Any]) -> bytes:
    """Build the bytes of a JSON POST with the server's admin key."""
    body = json.dumps(payload).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Authorization: Bearer {server.api_key}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def post_many(
    server: Server, request: bytes, total: int, clients: int
) -> tuple[float, float, list[int]]:
    """Send ``request`` ``total`` times from ``clients`` concurrent connections.

    Returns (time of the first send, time of the last response, job ids), with
    times from time.time().
    """
    connections = [HttpConnection("127.0.0.1", server.port) for _ in range(clients)]
    await asyncio.gather(*(c.open() for c in connections))
    remaining = total
    ids: list[int] = []

    async def run(connection: HttpConnection) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            status, body = await connection.send(request)
            if status != 200:
                raise BenchError(f"POST returned {status}: {body[:300]!r}")
            ids.append(int(json.loads(body)["id"]))

    first = time.time()
    try:
        await asyncio.gather(*(run(c) for c in connections))
    finally:
        for connection in connections:
            connection.close()
    return first, time.time(), ids


# Process figures from /proc


def cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU time a process has used."""
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kib(pid: int) -> dict[str, int]:
    """Return VmRSS and VmHWM (peak RSS) of a process in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(value.split()[0])
    return values


def reset_peak_rss(pid: int) -> None:
    """Reset a process's VmHWM to its current RSS (Linux 4.0 and later)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def percentile(values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of ``values``."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, int(round(fraction * len(ordered) + 0.5)) - 1))
    return ordered[index]


def median(values: list[float]) -> float:
    """Return the median, or NaN for no values."""
    return statistics.median(values) if values else float("nan")


def free_port() -> int:
    """Return a free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Figure:
    """One measured figure of one run."""

    key: str
    backend: str
    value: float
    unit: str
