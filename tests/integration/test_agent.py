"""The pull agent, run as a separate process against a real server process."""

import ast
import datetime as dt
import hashlib
import os
import pwd
import re
import secrets
import shutil
import signal
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from orchestrator import agent as agent_module
from tests.support.server import Server

ROOT = Path(__file__).resolve().parents[2]
AGENT_SCRIPT = ROOT / "orchestrator" / "agent.py"
INSTALL_PLAYBOOK = ROOT / "ansible" / "install-agent.yml"
UNIT_FILE = ROOT / "ansible" / "jobbalancer-agent.service"
ANSIBLE_PLAYBOOK = str(Path(sys.executable).parent / "ansible-playbook")
# The interpreter that the unit file names, which runs the installed agent.
SYSTEM_PYTHON = "/usr/bin/python3"
# The agent runs under the system interpreter, outside the virtualenv, to show
# that it needs the standard library only. Set this to try another version.
AGENT_PYTHON = (
    os.environ.get("JOBBALANCER_TEST_AGENT_PYTHON")
    or shutil.which("python3")
    or sys.executable
)
HEARTBEAT_TIMEOUT_SECONDS = 4
REATTACH_GRACE_SECONDS = 8
KILL_GRACE_SECONDS = 1
OUTAGE_SECONDS = 30


class AgentProcess:
    """One ``python3 orchestrator/agent.py`` process with its own spool folder."""

    def __init__(
        self,
        server: Server,
        token: str,
        workdir: Path,
        options: tuple[str, ...] = (),
        token_in_environment: bool = False,
    ):
        self.server = server
        self.token = token
        self.options = options
        self.token_in_environment = token_in_environment
        workdir.mkdir(parents=True, exist_ok=True)
        self.spool = workdir / "spool"
        self.log_path = workdir / "agent.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the agent, which retries until the server responds."""
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        token_options = ["--token", self.token]
        if self.token_in_environment:
            env["JOBBALANCER_AGENT_TOKEN"] = self.token
            token_options = []
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    AGENT_PYTHON,
                    str(AGENT_SCRIPT),
                    "--server",
                    self.server.url,
                    *token_options,
                    "--spool-dir",
                    str(self.spool),
                    "--max-backoff",
                    "1",
                    "--log-level",
                    "DEBUG",
                    *self.options,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.spool.parent,
            )

    def send_signal(self, number: int) -> None:
        """Send a signal to the agent process by PID."""
        assert self.process is not None
        self.process.send_signal(number)

    def stop(self) -> None:
        """Stop the agent with SIGTERM, or SIGKILL when it does not exit."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGCONT)
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Start a server whose only enabled workers are agents."""
    server = Server(
        tmp_path_factory.mktemp("agent-server"),
        agent_heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_SECONDS,
        reattach_grace_seconds=REATTACH_GRACE_SECONDS,
        kill_grace_seconds=KILL_GRACE_SECONDS,
    )
    server.start()
    server.cli("worker", "disable", "local")
    yield server
    server.stop()


def add_agent_worker(server: Server, name: str, *options: str) -> str:
    """Register an agent worker with the CLI and return the printed token."""
    result = server.cli("worker", "add", name, "--transport", "agent", *options)
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def token(server: Server) -> str:
    """Register the main agent worker, with room for three jobs."""
    return add_agent_worker(server, "agent1", "--max-jobs", "3")


@pytest.fixture(scope="module")
def agent(
    server: Server, token: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AgentProcess]:
    """Start the main agent and wait until its worker is online."""
    agent = AgentProcess(server, token, tmp_path_factory.mktemp("agent1"))
    agent.start()
    with server.client() as client:
        server.wait_worker(client, "agent1", "online")
    yield agent
    agent.stop()


@pytest.fixture
def client(server: Server, agent: AgentProcess) -> Iterator[httpx.Client]:
    """Return an admin client for a server with a running agent."""
    with server.client() as client:
        yield client


def read_log(client: httpx.Client, job_id: int, stream: str | None = None) -> bytes:
    params = {"stream": stream} if stream else {}
    response = client.get(f"/api/v1/jobs/{job_id}/log", params=params)
    assert response.status_code == 200, response.text
    return response.content


def wait_for_output(
    client: httpx.Client, job_id: int, expected: bytes, timeout: float = 10
) -> None:
    deadline = time.monotonic() + timeout
    while expected not in read_log(client, job_id):
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} never printed {expected!r}")
        time.sleep(0.05)


def processes_with(marker: str) -> list[int]:
    """Return the PIDs whose command line contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(int(entry.name))
    return found


def wait_until_gone(marker: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while processes_with(marker):
        if time.monotonic() > deadline:
            raise AssertionError(f"processes with {marker!r} are still running")
        time.sleep(0.05)


def wait_until_empty(folder: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(folder.iterdir()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{folder} still contains {list(folder.iterdir())}")
        time.sleep(0.05)


def duration(job: dict[str, object]) -> float:
    started = dt.datetime.fromisoformat(str(job["started_at"]))
    finished = dt.datetime.fromisoformat(str(job["finished_at"]))
    return (finished - started).total_seconds()


def test_worker_token_is_stored_hashed(
    server: Server, token: str, client: httpx.Client
) -> None:
    database = server.workdir / "data" / "jobbalancer.db"
    with sqlite3.connect(database) as conn:
        stored = conn.execute(
            "SELECT token_hash, transport FROM workers WHERE name = 'agent1'"
        ).fetchone()
    assert token.startswith("jba_")
    assert stored[0] == hashlib.sha256(token.encode()).hexdigest()
    assert stored[1] == "agent"
    assert token.encode() not in database.read_bytes()
    workers = {w["name"]: w for w in client.get("/api/v1/workers").json()["workers"]}
    assert workers["agent1"]["transport"] == "agent"
    assert workers["agent1"]["state"] == "online"
    assert workers["agent1"]["max_jobs"] == 3


def test_agent_routes_reject_wrong_token(server: Server, agent: AgentProcess) -> None:
    body = {"instance": "x", "seq": 1, "jobs": []}
    missing = httpx.post(f"{server.url}/api/v1/agent/poll", json=body)
    wrong = httpx.post(
        f"{server.url}/api/v1/agent/poll",
        json=body,
        headers={"Authorization": "Bearer jba_wrong"},
    )
    admin_key = httpx.post(
        f"{server.url}/api/v1/agent/poll",
        json=body,
        headers={"Authorization": f"Bearer {server.api_key}"},
    )
    assert missing.status_code == 401
    assert wrong.status_code == 401
    assert admin_key.status_code == 401


def test_job_output_is_exact_bytes(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    # Over 4 MiB of stdout writes more than one spool segment and many batches.
    stdout_data = os.urandom(5 << 20) + bytes(range(256))
    stderr_data = b"no newline at the end \x00\xff"
    (tmp_path / "out.bin").write_bytes(stdout_data)
    (tmp_path / "err.bin").write_bytes(stderr_data)
    command = f"cat {tmp_path}/out.bin; cat {tmp_path}/err.bin >&2; exit 3"
    answer = server.submit(client, command=command)
    job = server.wait_job(client, answer["id"])
    assert job["state"] == "failed"
    assert job["exit_code"] == 3
    assert job["worker"] == "agent1"
    assert read_log(client, job["id"], "stdout") == stdout_data
    assert read_log(client, job["id"], "stderr") == stderr_data
    assert job["log_bytes"] == len(stdout_data) + len(stderr_data)


def test_job_stdin_is_at_end_of_file(server: Server, client: httpx.Client) -> None:
    answer = server.submit(client, command="cat; read line || echo eof")
    job = server.wait_job(client, answer["id"])
    assert job["state"] == "succeeded"
    assert read_log(client, job["id"]) == b"eof\n"


def test_output_streams_while_job_runs(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    # The job cannot end before the flag exists, so "first" must arrive while
    # it runs.
    flag = tmp_path / "flag"
    command = f"echo first; while [ ! -e {flag} ]; do sleep 0.05; done; echo second"
    answer = server.submit(client, command=command)
    wait_for_output(client, answer["id"], b"first\n")
    assert client.get(f"/api/v1/jobs/{answer['id']}").json()["state"] == "running"
    flag.touch()
    job = server.wait_job(client, answer["id"])
    assert job["state"] == "succeeded"
    assert read_log(client, job["id"]) == b"first\nsecond\n"


def test_script_job_gets_params_as_arguments(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    script = tmp_path / "args.sh"
    script.write_text('for arg in "$@"; do printf "[%s]\\n" "$arg"; done\n')
    script_id = server.cli(
        "script", "add", "agent-args", "--interpreter", "/bin/sh", "--file", str(script)
    ).stdout.strip()
    params = ["two words", "$(touch /tmp/should-not-exist)", "it's"]
    answer = server.submit(client, scriptId=script_id, params=params)
    job = server.wait_job(client, answer["id"])
    assert job["state"] == "succeeded"
    expected = b"[two words]\n[$(touch /tmp/should-not-exist)]\n[it's]\n"
    assert read_log(client, job["id"]) == expected


def test_max_jobs_limits_running_jobs(server: Server, client: httpx.Client) -> None:
    answers = [server.submit(client, command="sleep 1.5") for _ in range(4)]
    states = [answer["state"] for answer in answers]
    assert states.count("running") == 3
    assert states.count("waiting") == 1
    jobs = [server.wait_job(client, answer["id"]) for answer in answers]
    assert [job["state"] for job in jobs] == ["succeeded"] * 4
    assert all(job["worker"] == "agent1" for job in jobs)


def test_kill_ends_whole_process_group(server: Server, client: httpx.Client) -> None:
    # The child ignores SIGTERM, so only the SIGKILL after the grace ends it.
    command = "sh -c 'trap \"\" TERM; sleep 3031.5' & sleep 3032.5 & echo ready; wait"
    answer = server.submit(client, command=command)
    wait_for_output(client, answer["id"], b"ready\n")
    assert processes_with("3031.5")
    started = time.monotonic()
    response = client.post(f"/api/v1/jobs/{answer['id']}/kill")
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    job = server.wait_job(client, answer["id"], timeout=10)
    assert job["state"] == "killed"
    assert elapsed < KILL_GRACE_SECONDS + 2
    wait_until_gone("3031.5", timeout=2)
    assert not processes_with("3032.5")
    assert client.post(f"/api/v1/jobs/{answer['id']}/kill").status_code == 409


def test_watchdog_times_out_job(server: Server, client: httpx.Client) -> None:
    answer = server.submit(client, command="echo start; sleep 3033.5", watchdog=2)
    job = server.wait_job(client, answer["id"], timeout=15)
    assert job["state"] == "timed_out"
    assert 2 <= duration(job) < 2 + KILL_GRACE_SECONDS + 1
    assert read_log(client, job["id"]) == b"start\n"
    wait_until_gone("3033.5", timeout=2)


def test_server_outage_loses_no_output(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    starts = tmp_path / "starts"
    printer = (
        f"echo long >> {starts}; i=0; "
        "while [ $i -lt 400 ]; do echo line $i; i=$((i+1)); sleep 0.1; done"
    )
    ends_in_outage = (
        f"echo short >> {starts}; i=0; "
        "while [ $i -lt 60 ]; do echo short $i; echo err $i >&2; i=$((i+1)); "
        "sleep 0.1; done; exit 4"
    )
    long_job = server.submit(client, command=printer)
    short_job = server.submit(client, command=ends_in_outage)
    watched_job = server.submit(
        client, command=f"echo watched >> {starts}; sleep 3034.5", watchdog=8
    )
    wait_for_output(client, long_job["id"], b"line 10\n")

    server.stop(signal.SIGKILL)
    time.sleep(OUTAGE_SECONDS)
    server.start()

    with server.client() as fresh:
        long_end = server.wait_job(fresh, long_job["id"], timeout=60)
        short_end = server.wait_job(fresh, short_job["id"], timeout=30)
        watched_end = server.wait_job(fresh, watched_job["id"], timeout=30)
        long_log = read_log(fresh, long_job["id"])
        short_stdout = read_log(fresh, short_job["id"], "stdout")
        short_stderr = read_log(fresh, short_job["id"], "stderr")
        watched_log = read_log(fresh, watched_job["id"])
    assert long_end["state"] == "succeeded"
    assert long_log == b"".join(b"line %d\n" % i for i in range(400))
    assert short_end["state"] == "failed"
    assert short_end["exit_code"] == 4
    assert short_stdout == b"".join(b"short %d\n" % i for i in range(60))
    assert short_stderr == b"".join(b"err %d\n" % i for i in range(60))
    assert watched_end["state"] == "timed_out"
    assert watched_log == b""
    assert not processes_with("3034.5")
    assert sorted(starts.read_text().split()) == ["long", "short", "watched"]


def test_full_spool_blocks_job_until_delivery(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    limit = 64 * 1024
    token = add_agent_worker(server, "small", "--class", "small")
    small = AgentProcess(
        server, token, tmp_path / "agent", ("--spool-max-bytes", str(limit))
    )
    small.start()

    data = os.urandom(1 << 20)
    (tmp_path / "data.bin").write_bytes(data)
    go, written = tmp_path / "go", tmp_path / "written"
    command = (
        f"echo ready; while [ ! -e {go} ]; do sleep 0.05; done; "
        f"cat {tmp_path}/data.bin; touch {written}"
    )

    try:
        server.wait_worker(client, "small", "online")
        answer = server.submit(client, command=command, workerClassId="small")
        wait_for_output(client, answer["id"], b"ready\n")
        # A stopped server takes no output, so the spool fills up and the job
        # blocks on its pipe. The pause stays below the heartbeat timeout.
        os.kill(server.pid, signal.SIGSTOP)
        try:
            go.touch()
            time.sleep(2)
            spooled = sum(
                path.stat().st_size for path in small.spool.glob("jobs/*/out.*")
            )
            blocked = not written.exists()
        finally:
            os.kill(server.pid, signal.SIGCONT)
        job = server.wait_job(client, answer["id"], timeout=30)
    finally:
        small.stop()

    assert blocked
    # The limit counts output bytes; frame headers and the "ready" frame that
    # was delivered before the pause come on top.
    assert spooled <= limit + 4096
    assert job["state"] == "succeeded"
    assert read_log(client, job["id"]) == b"ready\n" + data
    assert written.exists()


class FakeAgent:
    """Plays the agent's side of the protocol over HTTP, one request at a time."""

    def __init__(self, server: Server, name: str):
        self.name = name
        token = add_agent_worker(server, name, "--class", name)
        self.http = httpx.Client(
            base_url=f"{server.url}/api/v1/agent",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        self.seq = 0

    def poll(
        self, jobs: list[dict[str, object]], wait: float = 0, repeat: bool = False
    ) -> dict[str, Any]:
        """Poll; with ``repeat`` send the last seq again, which is not reconciled."""
        if not repeat:
            self.seq += 1
        body = {"instance": "fake", "seq": self.seq, "jobs": jobs, "wait": wait}
        response = self.http.post("/poll", json=body)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def accept(self, job_id: int, delivery: str) -> httpx.Response:
        body = {"delivery": delivery, "instance": "fake", "seq": self.seq}
        return self.http.post(f"/jobs/{job_id}/accept", json=body)

    def send(
        self, job_id: int, delivery: str, frames: list[tuple[int, int, bytes]]
    ) -> httpx.Response:
        body = b"".join(
            agent_module.FRAME_HEADER.pack(stream, offset, len(data)) + data
            for stream, offset, data in frames
        )
        return self.http.post(
            f"/jobs/{job_id}/output", params={"delivery": delivery}, content=body
        )

    def finish(self, job_id: int, body: dict[str, object]) -> httpx.Response:
        return self.http.post(f"/jobs/{job_id}/finish", json=body)


@pytest.fixture
def fake_agent(server: Server, client: httpx.Client) -> Iterator[FakeAgent]:
    """Register a worker in its own class and bring it online with polls."""
    name = f"fake{secrets.token_hex(3)}"
    fake = FakeAgent(server, name)
    deadline = time.monotonic() + 10
    while True:
        fake.poll([])
        workers = client.get("/api/v1/workers").json()["workers"]
        if any(w["name"] == name and w["state"] == "online" for w in workers):
            break
        assert time.monotonic() < deadline, workers
        time.sleep(0.1)
    yield fake
    fake.http.close()


def test_protocol_output_retries_are_not_duplicated(
    server: Server, client: httpx.Client, fake_agent: FakeAgent
) -> None:
    name = fake_agent.name
    answer = server.submit(client, command="true", workerClassId=name)
    offer = fake_agent.poll([], wait=5)["jobs"][0]
    job_id, delivery = offer["id"], offer["delivery"]

    first_accept = fake_agent.accept(job_id, delivery)
    second_accept = fake_agent.accept(job_id, delivery)
    first = fake_agent.send(job_id, delivery, [(1, 0, b"hello ")])
    # A retry resends the first frame with the next one.
    retry = fake_agent.send(job_id, delivery, [(1, 0, b"hello "), (1, 6, b"world\n")])
    errors = fake_agent.send(job_id, delivery, [(2, 0, b"oops\n")])
    report = {
        "delivery": delivery,
        "exit_code": 0,
        "stdout_bytes": 12,
        "stderr_bytes": 5,
    }
    finished = fake_agent.finish(job_id, report)
    repeated = fake_agent.finish(job_id, report)
    late_output = fake_agent.send(job_id, delivery, [(1, 12, b"late")])

    assert offer["command"] == "true"
    assert job_id == answer["id"]
    assert first_accept.status_code == 200
    assert second_accept.status_code == 200
    assert first.json() == {"stdout": 6, "stderr": 0}
    assert retry.json() == {"stdout": 12, "stderr": 0}
    assert errors.json() == {"stdout": 12, "stderr": 5}
    assert finished.json() == {"id": job_id, "state": "succeeded"}
    assert repeated.json() == {"id": job_id, "state": "succeeded"}
    assert late_output.status_code == 410
    assert read_log(client, job_id, "stdout") == b"hello world\n"
    assert read_log(client, job_id, "stderr") == b"oops\n"


def test_protocol_kill_before_accept_never_starts(
    server: Server, client: httpx.Client, fake_agent: FakeAgent
) -> None:
    name = fake_agent.name
    answer = server.submit(client, command="echo never", workerClassId=name)
    offer = fake_agent.poll([], wait=5)["jobs"][0]
    kills: list[httpx.Response] = []

    def kill() -> None:
        with server.client() as killer:
            kills.append(killer.post(f"/api/v1/jobs/{answer['id']}/kill"))

    killer = threading.Thread(target=kill)
    killer.start()
    deadline = time.monotonic() + 10
    while not fake_agent.poll([], repeat=True)["kill"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # The kill has withdrawn the offer, so a late acceptance is rejected.
    accept = fake_agent.accept(offer["id"], offer["delivery"])
    # The kill completes once a poll shows that the agent never took the job.
    while killer.is_alive():
        fake_agent.poll([], wait=1)
        assert time.monotonic() < deadline
    killer.join()
    job = server.wait_job(client, answer["id"])

    assert accept.status_code == 409
    assert kills[0].status_code == 200
    assert job["state"] == "killed"
    assert job["reason"] == "killed before the agent started it"
    assert read_log(client, answer["id"]) == b""


def test_protocol_kill_reaches_job_agent_already_has(
    server: Server, client: httpx.Client, fake_agent: FakeAgent
) -> None:
    # An agent that lists an offered job as started (its acceptance was lost,
    # or the server restarted) gets the kill request instead of a withdrawal.
    name = fake_agent.name
    answer = server.submit(client, command="sleep 60", workerClassId=name)
    offer = fake_agent.poll([], wait=5)["jobs"][0]
    held = [{"id": offer["id"], "delivery": offer["delivery"], "started": True}]
    kills: list[httpx.Response] = []

    def kill() -> None:
        with server.client() as killer:
            kills.append(killer.post(f"/api/v1/jobs/{answer['id']}/kill"))

    killer = threading.Thread(target=kill)
    killer.start()
    deadline = time.monotonic() + 10
    requests: list[dict[str, object]] = []
    while not requests:
        assert time.monotonic() < deadline
        requests = fake_agent.poll(held, wait=1)["kill"]
    finished = fake_agent.finish(
        offer["id"], {"delivery": offer["delivery"], "signal": "SIGTERM"}
    )
    killer.join()
    job = server.wait_job(client, answer["id"])

    assert requests == [{"id": offer["id"], "grace": KILL_GRACE_SECONDS}]
    assert finished.json()["state"] == "killed"
    assert kills[0].status_code == 200
    assert job["state"] == "killed"
    assert job["signal"] == "SIGTERM"


def test_silent_agent_jobs_end_lost(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    token = add_agent_worker(server, "quiet", "--class", "quiet")
    quiet = AgentProcess(server, token, tmp_path, token_in_environment=True)
    quiet.start()
    try:
        server.wait_worker(client, "quiet", "online")
        answer = server.submit(
            client, command="echo up; sleep 3035.5", workerClassId="quiet"
        )
        wait_for_output(client, answer["id"], b"up\n")
        quiet.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        offline = server.wait_worker(client, "quiet", "offline", timeout=15)
        assert "heartbeat" in offline["reason"]
        job = server.wait_job(client, answer["id"], timeout=30)
        silent = time.monotonic() - stopped
        assert job["state"] == "lost"
        assert silent >= HEARTBEAT_TIMEOUT_SECONDS + REATTACH_GRACE_SECONDS
        assert read_log(client, job["id"]) == b"up\n"
        # Back from the pause, the agent learns that the job has ended and
        # kills it.
        quiet.send_signal(signal.SIGCONT)
        server.wait_worker(client, "quiet", "online", timeout=15)
        wait_until_gone("3035.5", timeout=10)
    finally:
        quiet.stop()


def test_agent_restart_reports_running_job_lost(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    token = add_agent_worker(server, "restarts", "--class", "restarts")
    first = AgentProcess(server, token, tmp_path)
    first.start()
    server.wait_worker(client, "restarts", "online")
    answer = server.submit(
        client, command="echo before; sleep 3036.5", workerClassId="restarts"
    )
    wait_for_output(client, answer["id"], b"before\n")
    first.send_signal(signal.SIGKILL)
    assert first.process is not None
    first.process.wait(5)
    second = AgentProcess(server, token, tmp_path)
    second.start()
    try:
        job = server.wait_job(client, answer["id"], timeout=20)
        assert job["state"] == "lost"
        assert "agent restarted" in job["reason"]
        assert read_log(client, job["id"]) == b"before\n"
        wait_until_gone("3036.5", timeout=5)
        # The agent deletes the job's spool folder once the server has
        # confirmed the end, a moment after the state is stored.
        wait_until_empty(tmp_path / "spool" / "jobs", timeout=5)
    finally:
        second.stop()


@pytest.fixture(scope="module")
def https_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Server, Path, str]]:
    """Start a server on HTTPS with a self-signed certificate.

    Yields the server, the certificate file and the fingerprint that
    ``jobbalancer cert generate`` printed.
    """
    workdir = tmp_path_factory.mktemp("https-server")
    server = Server(workdir, agent_heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_SECONDS)
    printed = server.cli("cert", "generate", "--dir", str(workdir / "certs")).stdout
    match = re.search(r"SHA-256 fingerprint: (\S+)", printed)
    assert match, printed
    certificate = workdir / "certs" / "server.crt"
    key = workdir / "certs" / "server.key"
    with server.config.open("a") as config:
        config.write(f'tls_cert_file = "{certificate}"\ntls_key_file = "{key}"\n')
    server.url = server.url.replace("http://", "https://")
    server.verify = ssl.create_default_context(cafile=str(certificate))
    server.start()
    server.cli("worker", "disable", "local")
    yield server, certificate, match[1]
    server.stop()


def test_agent_pins_https_fingerprint(
    https_server: tuple[Server, Path, str], tmp_path: Path
) -> None:
    server, certificate, fingerprint = https_server
    token = add_agent_worker(server, "pinned")
    pinned = AgentProcess(
        server, token, tmp_path / "pinned", ("--fingerprint", fingerprint)
    )
    pinned.start()
    try:
        with httpx.Client(
            base_url=server.url,
            headers={"Authorization": f"Bearer {server.api_key}"},
            verify=server.verify,
            timeout=30,
        ) as client:
            server.wait_worker(client, "pinned", "online")
            answer = server.submit(client, command="echo secure")
            job = server.wait_job(client, answer["id"])
            log = read_log(client, job["id"])
    finally:
        pinned.stop()
    assert job["state"] == "succeeded"
    assert job["worker"] == "pinned"
    assert log == b"secure\n"


def test_agent_rejects_wrong_fingerprint(
    https_server: tuple[Server, Path, str], tmp_path: Path
) -> None:
    server, _, _ = https_server
    token = add_agent_worker(server, "mispinned")
    mispinned = AgentProcess(
        server, token, tmp_path / "mispinned", ("--fingerprint", "ab" * 32)
    )
    mispinned.start()
    try:
        deadline = time.monotonic() + 10
        while b"not the pinned" not in mispinned.log_path.read_bytes():
            assert time.monotonic() < deadline, mispinned.log_path.read_text()
            time.sleep(0.1)
    finally:
        mispinned.stop()
    with httpx.Client(
        base_url=server.url,
        headers={"Authorization": f"Bearer {server.api_key}"},
        verify=server.verify,
    ) as client:
        worker = server.wait_worker(client, "mispinned", "offline")
    assert "has not connected" in worker["reason"]


def agent_client(url: str, token: str, **options: str) -> agent_module.ServerClient:
    """Build the agent's HTTP client from command-line options."""
    argv = ["--server", url]
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", value]
    args = agent_module.build_parser().parse_args(argv)
    context, fingerprint = agent_module._ssl_settings(args)
    return agent_module.ServerClient(url, token, context, fingerprint)


def test_agent_verifies_https_certificate(
    https_server: tuple[Server, Path, str],
) -> None:
    server, certificate, _ = https_server
    token = add_agent_worker(server, "verified")
    poll = {"instance": "check", "seq": 1, "wait": 0}
    unverified = agent_client(server.url, token)
    with pytest.raises(agent_module.RequestError, match="CERTIFICATE_VERIFY_FAILED"):
        unverified.call("/api/v1/agent/poll", poll)
    trusted = agent_client(server.url, token, ca_file=str(certificate))
    status, response = trusted.call("/api/v1/agent/poll", poll)
    assert status == 200
    assert response["jobs"] == []


def test_agent_source_is_python_39_stdlib_only() -> None:
    tree = ast.parse(AGENT_SCRIPT.read_text(), feature_version=(3, 9))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= set(sys.stdlib_module_names)


@pytest.fixture
def install_root() -> Iterator[Path]:
    """Make a folder that other accounts can reach, unlike pytest's tmp_path."""
    root = Path(tempfile.mkdtemp(prefix="jobbalancer-agent-install-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def agent_account(install_root: Path) -> Iterator[tuple[str, Path]]:
    """Pick an unused account name and home folder; delete the account after."""
    name = f"jbagent{secrets.token_hex(4)}"
    with pytest.raises(KeyError):
        pwd.getpwnam(name)
    (install_root / "home").mkdir(mode=0o755)
    yield name, install_root / "home" / name
    try:
        pwd.getpwnam(name)
    except KeyError:
        return
    subprocess.run(["userdel", name], check=True)


def run_install_playbook(inventory: Path, tmp_path: Path) -> dict[str, int]:
    """Run install-agent.yml and return the host's PLAY RECAP counters."""
    env = dict(os.environ)
    env.update(
        ANSIBLE_HOME=str(tmp_path / "ansible-home"),
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-local"),
        ANSIBLE_NOCOLOR="1",
    )
    result = subprocess.run(
        [ANSIBLE_PLAYBOOK, "-i", str(inventory), str(INSTALL_PLAYBOOK)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"^agenthost\s*:\s*(.*)$", result.stdout, re.MULTILINE)
    assert match, result.stdout
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", match[1])}


def test_unit_file_passes_systemd_verify() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run(
        ["systemd-analyze", "verify", str(UNIT_FILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "jobbalancer-agent.service" not in result.stderr, result.stderr


@pytest.mark.skipif(
    not Path(SYSTEM_PYTHON).exists(), reason=f"{SYSTEM_PYTHON} is not installed"
)
def test_install_playbook_sets_up_agent(
    server: Server,
    client: httpx.Client,
    tmp_path: Path,
    install_root: Path,
    agent_account: tuple[str, Path],
) -> None:
    user, home = agent_account
    token = add_agent_worker(server, "installed", "--class", "installed")
    config_dir = install_root / "etc"
    unit_dir = install_root / "systemd"
    host_vars = {
        "ansible_connection": "local",
        "ansible_become": False,
        "ansible_python_interpreter": sys.executable,
        "jobbalancer_server_url": server.url,
        "jobbalancer_agent_token": token,
        "jobbalancer_agent_spool_max_bytes": 1 << 20,
        "jobbalancer_user": user,
        "jobbalancer_home": str(home),
        "jobbalancer_agent_python": SYSTEM_PYTHON,
        "jobbalancer_agent_install_dir": str(install_root / "opt"),
        "jobbalancer_agent_config_dir": str(config_dir),
        "jobbalancer_agent_unit_dir": str(unit_dir),
        # This machine runs no systemd, so the test starts the agent itself.
        "jobbalancer_agent_manage_service": False,
    }
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(yaml.safe_dump({"all": {"hosts": {"agenthost": host_vars}}}))

    first = run_install_playbook(inventory, tmp_path)
    second = run_install_playbook(inventory, tmp_path)

    assert first["failed"] == 0
    assert first["changed"] > 0
    assert second["changed"] == 0
    installed = install_root / "opt" / "agent.py"
    assert installed.read_bytes() == AGENT_SCRIPT.read_bytes()
    token_file = config_dir / "token"
    assert token_file.read_text() == token + "\n"
    assert token_file.stat().st_mode & 0o777 == 0o640
    assert (
        unit_dir / "jobbalancer-agent.service"
    ).read_bytes() == UNIT_FILE.read_bytes()

    # Start the agent as systemd would, from the drop-in and the environment file.
    drop_in = (unit_dir / "jobbalancer-agent.service.d" / "install.conf").read_text()
    exec_line = [
        line for line in drop_in.splitlines() if line.startswith("ExecStart=/")
    ][0]
    environment = dict(
        line.split("=", 1)
        for line in (config_dir / "agent.env").read_text().splitlines()
    )
    options = environment["JOBBALANCER_AGENT_OPTIONS"]
    command = exec_line.removeprefix("ExecStart=")
    argv = command.replace("$JOBBALANCER_AGENT_OPTIONS", options).split()
    account = pwd.getpwnam(user)
    state = install_root / "state"
    state.mkdir(mode=0o700)
    os.chown(state, account.pw_uid, account.pw_gid)
    with (tmp_path / "installed-agent.log").open("wb") as log:
        process = subprocess.Popen(
            argv,
            user=account.pw_uid,
            group=account.pw_gid,
            extra_groups=[],
            cwd=home,
            env={
                "PATH": "/usr/bin:/bin",
                "HOME": str(home),
                "JOBBALANCER_AGENT_SERVER": environment["JOBBALANCER_AGENT_SERVER"],
                "STATE_DIRECTORY": str(state),
            },
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        server.wait_worker(client, "installed", "online")
        answer = server.submit(client, command="id -un; pwd", workerClassId="installed")
        job = server.wait_job(client, answer["id"])
    finally:
        process.terminate()
        process.wait(20)

    assert options == "--spool-max-bytes 1048576"
    assert job["state"] == "succeeded"
    assert read_log(client, job["id"]) == f"{user}\n{home}\n".encode()
