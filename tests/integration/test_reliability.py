"""Faults the server survives: its own SIGKILL, lost workers, retries, bursts."""

import concurrent.futures
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.test_ssh_jobs import kill_detached_job, read_log
from tests.support.server import FINAL_STATES, Server

COUNTING_JOB = (
    "echo $$ >> {marker}; "
    "for i in $(seq 1 {lines}); do echo out$i; echo err$i >&2; sleep 0.25; done"
)


def test_sigkill_restart_reattaches(
    server: Server, ssh_hosts: list, tmp_path: Path
) -> None:
    server.cli("worker", "disable", "local")
    for index, host in enumerate(ssh_hosts):
        server.add_ssh_worker(host, f"w{index}")
    markers = [tmp_path / f"started{n}" for n in range(3)]
    with server.client() as client:
        for index in range(3):
            server.wait_worker(client, f"w{index}", "online")
        ids = [
            server.submit(client, command=COUNTING_JOB.format(marker=m, lines=40))["id"]
            for m in markers
        ]
        time.sleep(2)
        server.stop(signal.SIGKILL)
        time.sleep(10)
        server.start()
        jobs = [server.wait_job(client, job_id, timeout=90) for job_id in ids]
    expected_out = "".join(f"out{i}\n" for i in range(1, 41))
    expected_err = "".join(f"err{i}\n" for i in range(1, 41))
    for job, marker in zip(jobs, markers, strict=True):
        assert job["state"] == "succeeded", job
        assert job["exit_code"] == 0
        assert read_log(server, job["id"], "stdout").decode() == expected_out
        assert read_log(server, job["id"], "stderr").decode() == expected_err
        assert len(marker.read_text().split()) == 1, "job started more than once"


def test_lost_job_retried_elsewhere(server_factory: object, ssh_hosts: list) -> None:
    server = server_factory(reattach_grace_seconds=2)  # type: ignore[operator]
    server.cli("worker", "disable", "local")
    server.add_ssh_worker(ssh_hosts[2], "doomed")
    with server.client() as client:
        server.wait_worker(client, "doomed", "online")
        # The job must still run when the host goes down, after a CLI call and
        # a liveness check that take a few seconds on a loaded machine.
        job_id = server.submit(
            client, command="echo attempt; sleep 8; echo done", retries=1
        )["id"]
        time.sleep(1)
        server.add_ssh_worker(ssh_hosts[0], "healthy")
        server.wait_worker(client, "healthy", "online")
        ssh_hosts[2].pause()
        try:
            job = server.wait_job(client, job_id, timeout=60)
        finally:
            kill_detached_job(job_id)
            ssh_hosts[2].resume()
    assert job["state"] == "succeeded", job
    assert job["attempt"] == 2
    assert job["worker"] == "healthy"
    log = read_log(server, job_id, "stdout").decode()
    assert log.endswith("attempt\ndone\n")


def test_retry_on_nonzero_exit(server: Server, tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    command = f"if [ -e {flag} ]; then echo second; else touch {flag}; exit 3; fi"
    with server.client() as client:
        infra_only = server.submit(client, command="exit 3", retries=2)["id"]
        any_exit = server.submit(
            client, command=command, retries=2, retry_on="any", retry_delay=0.5
        )["id"]
        always = server.submit(client, command="exit 4", retries=1, retry_on="any")[
            "id"
        ]
        first = server.wait_job(client, infra_only)
        second = server.wait_job(client, any_exit)
        third = server.wait_job(client, always)
    assert first["state"] == "failed"
    assert first["attempt"] == 1
    assert second["state"] == "succeeded"
    assert second["attempt"] == 2
    assert third["state"] == "failed"
    assert third["attempt"] == 2
    assert third["exit_code"] == 4


def test_idempotency_key_returns_same_job(server: Server) -> None:
    with server.client() as client:
        first = client.post(
            "/addJob", json={"command": "echo once"}, headers={"Idempotency-Key": "k-1"}
        ).json()
        again = client.post(
            "/addJob", json={"command": "echo once"}, headers={"Idempotency-Key": "k-1"}
        ).json()
        in_body = client.post(
            "/addJob", json={"command": "echo once", "idempotencyKey": "k-1"}
        ).json()
        other = client.post(
            "/addJob", json={"command": "echo once", "idempotencyKey": "k-2"}
        ).json()

        def post(_: int) -> int:
            answer = client.post(
                "/addJob", json={"command": "true", "idempotencyKey": "race"}
            )
            assert answer.status_code == 200, answer.text
            return int(answer.json()["id"])

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            raced = set(pool.map(post, range(16)))
        listing = client.get("/api/v1/jobs", params={"q": "echo once"}).json()
    assert again["id"] == first["id"]
    assert in_body["id"] == first["id"]
    assert other["id"] != first["id"]
    assert len(raced) == 1
    assert listing["total"] == 2


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_burst_every_job_recorded(server_factory: object) -> None:
    server = server_factory(strategy="round_robin")  # type: ignore[operator]
    total, clients = 10_000, 50
    server.cli("worker", "add", "local2", "--transport", "local", "--max-jobs", "8")
    limits = httpx.Limits(max_connections=clients)
    accepted: list[int] = []
    occupied = 0

    def submit(index: int) -> tuple[int, str]:
        response = http.post(
            "/addJob",
            json={"command": "true", "need_realtime": index % 5 == 0},
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        return int(answer["id"]), str(answer["state"])

    with httpx.Client(
        base_url=server.url,
        headers={"Authorization": f"Bearer {server.api_key}"},
        limits=limits,
        timeout=120,
    ) as http:
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            for job_id, state in pool.map(submit, range(total)):
                if state == "occupied":
                    occupied += 1
                else:
                    accepted.append(job_id)
        assert len(accepted) + occupied == total
        assert len(set(accepted)) == len(accepted)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            counts = http.get(
                "/api/v1/jobs", params={"state": "succeeded", "limit": 1}
            ).json()
            if counts["total"] >= len(accepted):
                break
            time.sleep(1)
        listing = http.get("/api/v1/jobs", params={"limit": 1}).json()
        unfinished = [
            http.get("/api/v1/jobs", params={"state": s, "limit": 1}).json()["total"]
            for s in ("waiting", "running")
        ]
    assert counts["total"] == len(accepted)
    assert listing["total"] == total
    assert unfinished == [0, 0]
    status = Path(f"/proc/{server.pid}/status").read_text()
    peak_kib = int(status.split("VmHWM:")[1].split()[0])
    assert peak_kib < 600 * 1024, f"server peak RSS {peak_kib / 1024:.0f} MiB"
    assert set(FINAL_STATES) >= {"succeeded"}
