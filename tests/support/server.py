"""Run a real ``jobbalancer serve`` process for tests and talk to it."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

BIN_DIR = Path(sys.executable).parent
JOBBALANCER = str(BIN_DIR / "jobbalancer")
MARIADB_URL = os.environ.get(
    "JOBBALANCER_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test"
)
FINAL_STATES = {"succeeded", "failed", "killed", "timed_out", "lost", "occupied"}


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def reset_mariadb(url: str = MARIADB_URL) -> None:
    """Drop every table of the MariaDB test database."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("SET FOREIGN_KEY_CHECKS=0"))
        for (name,) in conn.execute(text("SHOW TABLES")).all():
            conn.execute(text(f"DROP TABLE `{name}`"))
        conn.execute(text("SET FOREIGN_KEY_CHECKS=1"))
    engine.dispose()


class Server:
    """A server process with its own config file and data folder."""

    def __init__(self, workdir: Path, database_url: str = "", **settings: Any):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "config.toml"
        lines = [f'data_dir = "{workdir / "data"}"', f"port = {self.port}"]
        if database_url:
            lines.append(f'database_url = "{database_url}"')
        values = {"liveness_interval_seconds": 1, "kill_grace_seconds": 1}
        values.update(settings)
        for name, value in values.items():
            rendered = f'"{value}"' if isinstance(value, str) else value
            lines.append(f"{name} = {rendered}")
        self.config.write_text("\n".join(lines) + "\n")
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "server.log"
        self.api_key = ""
        self.admin_password = ""
        # An ssl.SSLContext that trusts the server's certificate under HTTPS.
        self.verify: Any = True

    def start(self) -> None:
        """Start the process and wait until /healthz returns 200."""
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [JOBBALANCER, "serve", "--allow-root", "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env(),
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log_path.read_text()}")
            try:
                if (
                    httpx.get(
                        f"{self.url}/healthz", timeout=1, verify=self.verify
                    ).status_code
                    == 200
                ):
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"server did not start:\n{self.log_path.read_text()}")
        text = self.log_path.read_text()
        key = re.search(r"API key:\s+(\S+)", text)
        password = re.search(r"web login:\s+admin / (\S+)", text)
        if key:
            self.api_key = key.group(1)
        if password:
            self.admin_password = password.group(1)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the process by PID."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    @property
    def pid(self) -> int:
        """Return the server's PID."""
        assert self.process is not None
        return self.process.pid

    def env(self) -> dict[str, str]:
        """Return the environment for commands that use this server's config."""
        env = dict(os.environ)
        env["JOBBALANCER_CONFIG"] = str(self.config)
        env["JOBBALANCER_URL"] = self.url
        if self.api_key:
            env["JOBBALANCER_API_KEY"] = self.api_key
        env.pop("JOBBALANCER_DATABASE_URL", None)
        return env

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``jobbalancer ARGS`` against this server's config."""
        result = subprocess.run(
            [JOBBALANCER, *args],
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"jobbalancer {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def client(self) -> httpx.Client:
        """Return an HTTP client that sends the admin API key."""
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.api_key}"},
            timeout=120,
        )

    def submit(self, client: httpx.Client, **payload: Any) -> dict[str, Any]:
        """POST /addJob and return the response body, failing on an HTTP error."""
        response = client.post("/addJob", json=payload)
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    def wait_job(
        self, client: httpx.Client, job_id: int, timeout: float = 60
    ) -> dict[str, Any]:
        """Poll a job until it reaches a final state."""
        deadline = time.monotonic() + timeout
        while True:
            job: dict[str, Any] = client.get(f"/api/v1/jobs/{job_id}").json()
            if job["state"] in FINAL_STATES:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job['state']}")
            time.sleep(0.05)

    def wait_worker(
        self, client: httpx.Client, name: str, state: str, timeout: float = 30
    ) -> dict[str, Any]:
        """Poll until a worker reaches ``state``."""
        deadline = time.monotonic() + timeout
        while True:
            for worker in client.get("/api/v1/workers").json()["workers"]:
                if worker["name"] == name and worker["state"] == state:
                    return dict(worker)
            if time.monotonic() > deadline:
                raise AssertionError(f"worker {name} did not become {state}")
            time.sleep(0.1)

    def add_ssh_worker(self, host: Any, name: str, **options: str | int) -> None:
        """Register a test sshd host as a worker with the CLI."""
        args = [
            "worker",
            "add",
            name,
            "--host",
            host.host,
            "--port",
            str(host.port),
            "--user",
            host.user,
            "--key",
            str(host.client_key_path),
        ]
        for option, value in options.items():
            args += [f"--{option.replace('_', '-')}", str(value)]
        self.cli(*args)
