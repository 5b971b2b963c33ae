"""A worker's network cut while a job runs, with the worker in a network namespace.

The cut takes a veth link down, so TCP goes silent without a reset, as when a
cable or a router fails. The server can notice it only through SSH keepalives
and timeouts.
"""

import os
import pwd
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netnshost import NetnsHost, netns_unavailable_reason

from tests.integration.test_ssh_jobs import read_log, use_ssh_worker
from tests.support.server import Server

KEEPALIVE_SECONDS = 1
LIVENESS_SECONDS = 1
# Slack for process scheduling and for the log and API polls of the test.
MARGIN_SECONDS = 3
# asyncssh 2.24 closes a connection at the keepalive tick after 3 requests
# (keepalive_count_max) went unanswered, which is 4 keepalive intervals after the
# last data it received. The jobs below print every 0.5 s, so that is 3.5 to 4 s
# after the cut.
DETECTION_BOUND_SECONDS = KEEPALIVE_SECONDS * 3 + LIVENESS_SECONDS + MARGIN_SECONDS
LOST_GRACE_SECONDS = 3
RUN_ROOT = Path(pwd.getpwuid(os.geteuid()).pw_dir) / ".cache/jobbalancer/run"
TICKER = "for i in $(seq 1 {lines}); do echo line$i; echo err$i >&2; sleep 0.5; done"

pytestmark = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


@pytest.fixture(scope="module")
def netns_reason() -> str | None:
    """Return why network namespaces are unusable here, or None."""
    return netns_unavailable_reason()


@pytest.fixture
def netns_host(netns_reason: str | None, tmp_path: Path) -> Iterator[NetnsHost]:
    """Start an sshd worker host in a network namespace of its own."""
    if netns_reason is not None:
        pytest.skip(netns_reason)
    host = NetnsHost(tmp_path / "netns", name="netns")
    try:
        host.start()
        yield host
    finally:
        host.close()


def ticker_output(lines: int, prefix: str) -> str:
    """Return what TICKER prints on one stream."""
    return "".join(f"{prefix}{i}\n" for i in range(1, lines + 1))


def wait_for_log(server: Server, text: str, timeout: float) -> float | None:
    """Return the monotonic time at which `text` showed up in the server log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in server.log_path.read_text(errors="replace"):
            return time.monotonic()
        time.sleep(0.05)
    return None


def wait_running_on(server: Server, job_id: int, worker: str) -> None:
    """Wait until the job runs on `worker` and its run folder has a PID."""
    with server.client() as client:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            job = client.get(f"/api/v1/jobs/{job_id}").json()
            started = list(RUN_ROOT.glob(f"{job_id}-{job['attempt']}-*/pid"))
            if job["state"] == "running" and job["worker"] == worker and started:
                return
            time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not start on {worker}: {job}")


def stop_job_in_namespace(host: NetnsHost, job_id: int, attempt: int) -> list[int]:
    """Kill what a job attempt left in the namespace and remove its run folder.

    The process group id comes from the `pid` file that the job wrote into its run
    folder. Only a group whose leader runs in the namespace is killed, because a
    job of another server may have the same id. Returns the killed group ids.
    """
    killed = []
    for pid_file in RUN_ROOT.glob(f"{job_id}-{attempt}-*/pid"):
        group = int(pid_file.read_text())
        if not host.owns_process(group):
            continue
        os.killpg(group, signal.SIGKILL)
        killed.append(group)
        supervisor = int((pid_file.parent / "supervisor").read_text())
        deadline = time.monotonic() + 10
        # The supervisor writes the exit status once the group is gone, so the
        # folder is removed only after it exits.
        while time.monotonic() < deadline and (
            _alive(-group) or host.owns_process(supervisor)
        ):
            time.sleep(0.05)
        assert not _alive(-group), f"process group {group} outlived SIGKILL"
        shutil.rmtree(pid_file.parent, ignore_errors=True)
    return killed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_cut_detected_within_keepalive_bound(
    server_factory: object, netns_host: NetnsHost
) -> None:
    server = server_factory(  # type: ignore[operator]
        ssh_keepalive_seconds=KEEPALIVE_SECONDS,
        liveness_interval_seconds=LIVENESS_SECONDS,
        reattach_grace_seconds=60,
    )
    use_ssh_worker(server, netns_host, "netns")
    with server.client() as client:
        job_id = server.submit(client, command=TICKER.format(lines=60))["id"]
        wait_running_on(server, job_id, "netns")
        time.sleep(1)
        netns_host.cut()
        cut_at = time.monotonic()
        try:
            lost_at = wait_for_log(
                server, f"Lost the connection to job {job_id}", timeout=30
            )
            offline = server.wait_worker(client, "netns", "offline", timeout=30)
            offline_at = time.monotonic()
        finally:
            netns_host.restore()
            stop_job_in_namespace(netns_host, job_id, 1)

    assert lost_at is not None, "the job's connection was never reported lost"
    lost_after = lost_at - cut_at
    offline_after = offline_at - cut_at
    print(
        f"\ncut detected: job connection lost after {lost_after:.1f} s, "
        f"worker offline after {offline_after:.1f} s "
        f"(bound {DETECTION_BOUND_SECONDS} s)"
    )
    assert lost_after <= DETECTION_BOUND_SECONDS
    assert offline_after <= DETECTION_BOUND_SECONDS
    assert offline["reason"]


def test_job_reattached_after_short_cut(
    server_factory: object, netns_host: NetnsHost
) -> None:
    server = server_factory(  # type: ignore[operator]
        ssh_keepalive_seconds=KEEPALIVE_SECONDS, reattach_grace_seconds=30
    )
    use_ssh_worker(server, netns_host, "netns")
    lines = 24
    with server.client() as client:
        job_id = server.submit(client, command=TICKER.format(lines=lines))["id"]
        wait_running_on(server, job_id, "netns")
        time.sleep(1)
        netns_host.cut()
        try:
            time.sleep(5)
        finally:
            netns_host.restore()
        job = server.wait_job(client, job_id, timeout=60)

    log = server.log_path.read_text(errors="replace")
    assert job["state"] == "succeeded", job
    assert job["exit_code"] == 0
    assert job["attempt"] == 1
    assert f"Lost the connection to job {job_id}" in log
    assert f"Attached again to job {job_id}" in log
    assert read_log(server, job_id, "stdout").decode() == ticker_output(lines, "line")
    assert read_log(server, job_id, "stderr").decode() == ticker_output(lines, "err")


def test_job_lost_and_retried_elsewhere(
    server_factory: object, netns_host: NetnsHost, ssh_hosts: list, tmp_path: Path
) -> None:
    server = server_factory(  # type: ignore[operator]
        ssh_keepalive_seconds=KEEPALIVE_SECONDS,
        reattach_grace_seconds=LOST_GRACE_SECONDS,
    )
    use_ssh_worker(server, netns_host, "netns")

    # The first attempt runs long, so it still runs in the namespace when it is
    # declared lost. The second attempt prints 8 lines.
    first = tmp_path / "first-attempt"
    command = (
        f"if mkdir {first} 2>/dev/null; then n=120; else n=8; fi; "
        "for i in $(seq 1 $n); do echo line$i; sleep 0.5; done"
    )

    with server.client() as client:
        job_id = server.submit(client, command=command, retries=1)["id"]
        wait_running_on(server, job_id, "netns")
        server.add_ssh_worker(ssh_hosts[0], "loopback")
        server.wait_worker(client, "loopback", "online")
        netns_host.cut()
        cut_at = time.monotonic()
        try:
            retried_at = wait_for_log(server, "running attempt 2 of 2", timeout=60)
            job = server.wait_job(client, job_id, timeout=60)
        finally:
            killed = stop_job_in_namespace(netns_host, job_id, 1)
            netns_host.restore()

    assert retried_at is not None, "the first attempt never ended lost"
    lost_after = retried_at - cut_at
    print(f"\nfirst attempt ended lost {lost_after:.1f} s after the cut")
    assert lost_after <= DETECTION_BOUND_SECONDS + LOST_GRACE_SECONDS
    assert job["state"] == "succeeded", job
    assert job["attempt"] == 2
    assert job["worker"] == "loopback"
    assert len(killed) == 1, "the first attempt no longer ran in the namespace"

    stdout = read_log(server, job_id, "stdout").decode()
    second = ticker_output(8, "line")
    assert stdout.endswith(second)
    first_output = stdout[: -len(second)]
    first_lines = first_output.count("\n")
    assert first_output == ticker_output(first_lines, "line")
    assert "starting attempt 2" in read_log(server, job_id, "stderr").decode()
