"""Jobs on real sshd workers: output, exit codes, watchdog, kill, stdin, scripts."""

import contextlib
import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.server import Server


def use_ssh_worker(
    server: Server, host: object, name: str = "w1", **opts: object
) -> None:
    """Register one SSH worker and take the local worker out of rotation."""
    server.cli("worker", "disable", "local")
    server.add_ssh_worker(host, name, **opts)  # type: ignore[arg-type]
    with server.client() as client:
        server.wait_worker(client, name, "online")


def read_log(server: Server, job_id: int, stream: str | None = None) -> bytes:
    params = {"stream": stream} if stream else {}
    with server.client() as client:
        response = client.get(f"/api/v1/jobs/{job_id}/log", params=params)
    assert response.status_code == 200
    return response.content


def rss_kib(pid: int) -> tuple[int, int]:
    """Return (current RSS, peak RSS) of a process in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def test_binary_output_exact_bytes(
    server: Server, ssh_hosts: list, tmp_path: Path
) -> None:
    use_ssh_worker(server, ssh_hosts[0])
    sample = tmp_path / "random.bin"
    command = (
        f"head -c 52428800 /dev/urandom > {sample} && cat {sample} && "
        f"sha256sum {sample} >&2"
    )
    with server.client() as client:
        warmup = server.submit(client, command="head -c 1000000 /dev/urandom")
        server.wait_job(client, warmup["id"])
        _, peak_before = rss_kib(server.pid)
        answer = server.submit(client, command=command)
        job = server.wait_job(client, answer["id"], timeout=240)
    assert job["state"] == "succeeded", job
    stored = read_log(server, job["id"], "stdout")
    produced = hashlib.sha256(sample.read_bytes()).hexdigest()
    assert len(stored) == 52428800
    assert hashlib.sha256(stored).hexdigest() == produced
    assert produced in read_log(server, job["id"], "stderr").decode()
    assert job["log_bytes"] == len(stored) + len(read_log(server, job["id"], "stderr"))
    _, peak_after = rss_kib(server.pid)
    growth_mib = (peak_after - peak_before) / 1024
    assert growth_mib < 40, f"server peak RSS grew by {growth_mib:.1f} MiB"


def test_exit_codes_and_signal(server: Server, ssh_hosts: list) -> None:
    use_ssh_worker(server, ssh_hosts[0])
    cases = {"exit 0": 0, "exit 1": 1, "exit 255": 255}
    with server.client() as client:
        ids = {cmd: server.submit(client, command=cmd)["id"] for cmd in cases}
        signalled = server.submit(client, command="kill -USR1 $$")["id"]
        for command, code in cases.items():
            job = server.wait_job(client, ids[command])
            assert job["exit_code"] == code, job
            assert job["signal"] is None
            assert job["state"] == ("succeeded" if code == 0 else "failed")
        job = server.wait_job(client, signalled)
    assert job["state"] == "failed"
    assert job["signal"] == "SIGUSR1"
    assert job["exit_code"] is None


def kill_detached_job(job_id: int) -> None:
    """Stop what a lost job left running on the local test hosts, by PID."""
    for pid_file in Path.home().glob(f".cache/jobbalancer/run/{job_id}-*/pid"):
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def test_ssh_failure_is_not_exit_255(server_factory: object, ssh_hosts: list) -> None:
    server = server_factory(reattach_grace_seconds=3)  # type: ignore[operator]
    host = ssh_hosts[2]
    use_ssh_worker(server, host, "fragile")
    with server.client() as client:
        job_id = server.submit(client, command="sleep 30")["id"]
        time.sleep(1)
        host.pause()
        try:
            worker = server.wait_worker(client, "fragile", "offline", timeout=10)
            assert worker["reason"]
            job = server.wait_job(client, job_id, timeout=30)
            assert job["state"] == "lost", job
            assert job["exit_code"] is None
            answer = server.submit(client, command="echo later")
            assert answer["state"] == "waiting"
        finally:
            kill_detached_job(job_id)
            host.resume()
        server.wait_worker(client, "fragile", "online", timeout=30)
        job = server.wait_job(client, answer["id"], timeout=30)
    assert job["state"] == "succeeded"
    assert job["worker"] == "fragile"


def test_job_survives_short_outage(server_factory: object, ssh_hosts: list) -> None:
    server = server_factory(reattach_grace_seconds=30)  # type: ignore[operator]
    host = ssh_hosts[1]
    use_ssh_worker(server, host, "flaky")
    command = "for i in $(seq 1 8); do echo line$i; echo err$i >&2; sleep 0.5; done"
    with server.client() as client:
        job_id = server.submit(client, command=command)["id"]
        time.sleep(1.2)
        host.pause()
        time.sleep(2)
        host.resume()
        job = server.wait_job(client, job_id, timeout=60)
    assert job["state"] == "succeeded", job
    stdout = read_log(server, job_id, "stdout").decode()
    stderr = read_log(server, job_id, "stderr").decode()
    assert stdout == "".join(f"line{i}\n" for i in range(1, 9))
    assert stderr == "".join(f"err{i}\n" for i in range(1, 9))


def leftover_processes(marker: str) -> list[str]:
    """Return command lines of processes whose arguments contain ``marker``."""
    result = subprocess.run(
        ["ps", "-eo", "stat=,args="], capture_output=True, text=True, check=True
    )
    return [
        line
        for line in result.stdout.splitlines()
        if marker in line and not line.lstrip().startswith("Z") and "ps -eo" not in line
    ]


def test_watchdog_kills_process_tree(server: Server, ssh_hosts: list) -> None:
    use_ssh_worker(server, ssh_hosts[0])
    command = "sh -c 'sleep 300.25 & sleep 300.25'"
    with server.client() as client:
        started = time.monotonic()
        job_id = server.submit(client, command=command, watchdog=2)["id"]
        job = server.wait_job(client, job_id, timeout=30)
        elapsed = time.monotonic() - started
    assert job["state"] == "timed_out", job
    assert elapsed < 2 + 1 + 2, f"took {elapsed:.1f} s"
    time.sleep(0.5)
    assert leftover_processes("sleep 300.25") == []


def test_kill_through_api(server: Server, ssh_hosts: list) -> None:
    use_ssh_worker(server, ssh_hosts[0])
    command = "sh -c 'sleep 300.5 & sleep 300.5'"
    with server.client() as client:
        job_id = server.submit(client, command=command)["id"]
        time.sleep(1)
        response = client.post(f"/api/v1/jobs/{job_id}/kill")
        assert response.status_code == 200, response.text
        job = server.wait_job(client, job_id, timeout=15)
        again = client.post(f"/api/v1/jobs/{job_id}/kill")
    assert job["state"] == "killed"
    assert again.status_code == 409
    time.sleep(0.5)
    assert leftover_processes("sleep 300.5") == []


def test_stdin_is_at_eof(server: Server, ssh_hosts: list) -> None:
    use_ssh_worker(server, ssh_hosts[0])
    with server.client() as client:
        answer = server.submit(
            client, command="cat; echo done", wait=True, waitTimeout=20
        )
    assert answer["state"] == "succeeded"
    assert answer["stdout"] == "done\n"


def test_script_params_not_executed(
    server: Server, ssh_hosts: list, tmp_path: Path
) -> None:
    use_ssh_worker(server, ssh_hosts[0])
    script = tmp_path / "args.sh"
    script.write_text('for a in "$@"; do printf "<%s>\\n" "$a"; done\n')
    script_id = server.cli(
        "script", "add", "args", "--interpreter", "/bin/sh", "--file", str(script)
    ).stdout.strip()
    marker = Path("/tmp/pwned")
    marker.unlink(missing_ok=True)
    params = ["a b", "$(touch /tmp/pwned)", "'"]
    with server.client() as client:
        listed = server.submit(
            client, scriptId=script_id, params=params, wait=True, waitTimeout=20
        )
        keyed = server.submit(
            client,
            scriptId=int(script_id),
            params={"x": "1", "y": "two words"},
            wait=True,
            waitTimeout=20,
        )
    assert listed["stdout"] == "<a b>\n<$(touch /tmp/pwned)>\n<'>\n"
    assert not marker.exists()
    assert keyed["stdout"] == "<1>\n<two words>\n"


def test_wait_returns_output_and_code(server: Server, ssh_hosts: list) -> None:
    use_ssh_worker(server, ssh_hosts[0])
    with server.client() as client:
        answer = server.submit(
            client, command="echo out; echo err >&2; exit 7", wait=True
        )
    assert answer["state"] == "failed"
    assert answer["exit_code"] == 7
    assert answer["stdout"] == "out\n"
    assert answer["stderr"] == "err\n"
    assert answer["result"] is False


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_large_command_runs(server: Server, ssh_hosts: list) -> None:
    use_ssh_worker(server, ssh_hosts[0])
    filler = "x" * 300_000
    command = f": {filler}\necho big-ok"
    with server.client() as client:
        answer = server.submit(client, command=command, wait=True, waitTimeout=30)
    assert answer["state"] == "succeeded", answer
    assert answer["stdout"] == "big-ok\n"


def test_job_waits_for_background_children(server: Server, ssh_hosts: list) -> None:
    use_ssh_worker(server, ssh_hosts[0])
    command = "(sleep 1; echo late) & echo early"
    with server.client() as client:
        answer = server.submit(client, command=command, wait=True, waitTimeout=30)
    assert answer["state"] == "succeeded", answer
    assert answer["stdout"] == "early\nlate\n"
