"""Placement across real sshd workers: round robin, limits, MaxSessions."""

import time
from collections import Counter
from datetime import datetime

from tests.support.server import Server


def register(server: Server, hosts: list, **opts: object) -> list[str]:
    """Register hosts as workers w0..wN and wait until they are online."""
    server.cli("worker", "disable", "local")
    names = []
    for index, host in enumerate(hosts):
        name = f"w{index}"
        server.add_ssh_worker(host, name, **opts)  # type: ignore[arg-type]
        names.append(name)
    with server.client() as client:
        for name in names:
            server.wait_worker(client, name, "online")
    return names


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def test_round_robin_spreads_jobs(server: Server, ssh_hosts: list) -> None:
    register(server, ssh_hosts)
    with server.client() as client:
        ids = [server.submit(client, command="sleep 1")["id"] for _ in range(6)]
        finished = [server.wait_job(client, job_id) for job_id in ids]
    assert all(job["state"] == "succeeded" for job in finished)
    per_worker = Counter(job["worker"] for job in finished)
    assert per_worker == {"w0": 2, "w1": 2, "w2": 2}


def test_full_workers_queue_or_reject(server: Server, ssh_hosts: list) -> None:
    register(server, ssh_hosts, max_jobs=1)
    with server.client() as client:
        busy = [server.submit(client, command="sleep 2")["id"] for _ in range(3)]
        rejected = server.submit(client, command="echo no", need_realtime=True)
        queued = server.submit(client, command="echo yes", need_realtime=False)
        assert rejected["state"] == "occupied"
        assert rejected["result"] is False
        assert queued["state"] == "waiting"
        assert queued["result"] is True
        ended = [server.wait_job(client, job_id) for job_id in busy]
        waiting = server.wait_job(client, queued["id"])
        stored = client.get(f"/api/v1/jobs/{rejected['id']}").json()
    assert stored["state"] == "occupied"
    assert waiting["state"] == "succeeded"
    first_free = min(parse_time(job["finished_at"]) for job in ended)
    delay = (parse_time(waiting["started_at"]) - first_free).total_seconds()
    assert delay < 0.2, f"waiting job started {delay:.3f} s after a slot freed"


def test_max_sessions_two_runs_ten(server: Server, small_host: object) -> None:
    server.cli("worker", "disable", "local")
    server.add_ssh_worker(small_host, "small", max_jobs=10, max_sessions=2)
    with server.client() as client:
        server.wait_worker(client, "small", "online")
        started = time.monotonic()
        ids = [
            server.submit(client, command=f"sleep 1; echo job{n}")["id"]
            for n in range(10)
        ]
        jobs = [server.wait_job(client, job_id) for job_id in ids]
        elapsed = time.monotonic() - started
        logs = [client.get(f"/api/v1/jobs/{job_id}/log").content for job_id in ids]
    assert [job["state"] for job in jobs] == ["succeeded"] * 10
    assert logs == [f"job{n}\n".encode() for n in range(10)]
    assert elapsed < 6, f"ten 1-second jobs took {elapsed:.1f} s"


def test_least_loaded_strategy(server_factory: object, ssh_hosts: list) -> None:
    server = server_factory(strategy="least_loaded")  # type: ignore[operator]
    register(server, ssh_hosts[:2], max_jobs=2)
    with server.client() as client:
        ids = [server.submit(client, command="sleep 1")["id"] for _ in range(4)]
        jobs = [server.wait_job(client, job_id) for job_id in ids]
    assert Counter(job["worker"] for job in jobs) == {"w0": 2, "w1": 2}


def test_new_worker_picked_up_live(server: Server, ssh_hosts: list) -> None:
    server.cli("worker", "disable", "local")
    with server.client() as client:
        server.wait_worker(client, "local", "disabled")
        queued = server.submit(client, command="echo picked")
        assert queued["state"] == "waiting"
        server.add_ssh_worker(ssh_hosts[1], "late")
        job = server.wait_job(client, queued["id"], timeout=30)
        listing = server.cli("worker", "list").stdout
    assert job["state"] == "succeeded"
    assert job["worker"] == "late"
    assert "late" in listing
    assert "disabled" in listing
