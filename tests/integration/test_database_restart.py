"""MariaDB restarted during a burst of jobs: nothing accepted is lost."""

import concurrent.futures
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.support.server import Server

pytestmark = pytest.mark.parametrize("backend", ["mariadb"], indirect=True)

PID_FILE = Path("/run/mysqld/mysqld.pid")
MARIADBD = "/usr/sbin/mariadbd"


def mariadb_answers() -> bool:
    result = subprocess.run(
        ["mariadb", "-h", "127.0.0.1", "-u", "root", "-e", "SELECT 1"],
        capture_output=True,
    )
    return result.returncode == 0


def restart_mariadb(down_seconds: float) -> None:
    """Stop the MariaDB server by the PID in its PID file and start it again."""
    pid = int(PID_FILE.read_text().strip())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    time.sleep(down_seconds)
    subprocess.run(
        [
            "start-stop-daemon",
            "--start",
            "--oknodo",
            "--background",
            "--exec",
            MARIADBD,
        ],
        check=True,
    )
    deadline = time.monotonic() + 60
    while not mariadb_answers():
        assert time.monotonic() < deadline, "MariaDB did not come back"
        time.sleep(0.5)


@pytest.mark.skipif(not PID_FILE.exists(), reason="no local MariaDB PID file")
def test_mariadb_restart_during_burst(server: Server) -> None:
    server.cli("worker", "add", "local2", "--transport", "local", "--max-jobs", "8")
    command = "for i in 1 2 3 4 5 6; do echo tick$i; sleep 0.3; done"

    def submit(index: int) -> int:
        # A client retries with the same key while the database is away.
        deadline = time.monotonic() + 120
        while True:
            try:
                response = http.post(
                    "/addJob",
                    json={"command": command},
                    headers={"Idempotency-Key": f"burst-{index}"},
                )
            except httpx.HTTPError:
                response = None
            if response is not None and response.status_code == 200:
                return int(response.json()["id"])
            assert response is None or response.status_code == 503, response.text
            assert time.monotonic() < deadline, "submission never accepted"
            time.sleep(0.5)

    with httpx.Client(
        base_url=server.url,
        headers={"Authorization": f"Bearer {server.api_key}"},
        timeout=60,
    ) as http:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(submit, n) for n in range(200)]
            time.sleep(2)
            restart_mariadb(down_seconds=3)
            ids = [future.result() for future in futures]
        assert len(set(ids)) == 200
        deadline = time.monotonic() + 300
        states: dict[int, str] = {}
        while time.monotonic() < deadline:
            states = {
                job_id: http.get(f"/api/v1/jobs/{job_id}").json()["state"]
                for job_id in ids
            }
            if all(state not in ("waiting", "running") for state in states.values()):
                break
            time.sleep(2)
        logs = {job_id: http.get(f"/api/v1/jobs/{job_id}/log").text for job_id in ids}
    expected = "".join(f"tick{i}\n" for i in range(1, 7))
    assert set(states.values()) == {"succeeded"}, states
    wrong = [job_id for job_id, log in logs.items() if log != expected]
    assert wrong == [], f"incomplete logs: {wrong[:5]}"
