"""The jobbalancer command line against a running server."""

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.server import JOBBALANCER, Server

pytestmark = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


def test_user_add_before_first_start(tmp_path: Path, backend: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    env = dict(os.environ, JOBBALANCER_CONFIG=str(config), SECRET_PW="s3cret-pass")
    result = subprocess.run(
        [
            JOBBALANCER,
            "user",
            "add",
            "alice",
            "--role",
            "submitter",
            "--password-env",
            "SECRET_PW",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    key = result.stdout.strip().splitlines()[-1]
    assert key.startswith("jb_")
    assert "s3cret-pass" not in result.stdout
    assert (tmp_path / "data" / "jobbalancer.db").exists()
    again = subprocess.run(
        [JOBBALANCER, "user", "add", "alice"], capture_output=True, text=True, env=env
    )
    assert again.returncode == 1
    assert "already exists" in again.stderr


def test_serve_refuses_root_without_flag(tmp_path: Path, backend: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("only meaningful as root")
    config = tmp_path / "config.toml"
    result = subprocess.run(
        [JOBBALANCER, "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "--allow-root" in result.stderr


def test_config_file_written_with_defaults(server: Server) -> None:
    fresh = server.workdir / "fresh.toml"
    home = server.workdir / "home"
    env = dict(server.env(), JOBBALANCER_CONFIG=str(fresh), HOME=str(home))
    subprocess.run(
        [JOBBALANCER, "worker", "list"], env=env, check=True, capture_output=True
    )
    text = fresh.read_text()
    assert '# strategy = "round_robin"' in text
    assert "# liveness_interval_seconds" in text
    assert (home / ".local/share/jobbalancer/jobbalancer.db").exists()


def test_client_commands(server: Server) -> None:
    user = server.cli("user", "add", "bob")
    bob_key = user.stdout.strip().splitlines()[-1]
    env = dict(server.env(), JOBBALANCER_API_KEY=bob_key)

    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [JOBBALANCER, *args], capture_output=True, env=env, timeout=60
        )

    waited = run("submit", "--wait", "--", "printf 'a\\0b'; echo e >&2; exit 3")
    assert waited.returncode == 3
    assert waited.stdout == b"a\0b"
    assert waited.stderr == b"e\n"
    detached = run("submit", "--watchdog", "30", "--", "sleep", "20")
    assert detached.returncode == 0
    job_id = str(__import__("json").loads(detached.stdout)["id"])
    listing = run("jobs")
    assert job_id.encode() in listing.stdout
    assert b"sleep 20" in listing.stdout
    killed = run("kill", job_id)
    assert killed.returncode == 0, killed.stderr
    assert b"killed" in killed.stdout
    log = run("log", str(int(job_id) - 1))
    assert log.stdout == b"a\0be\n"
    argv = run("submit", "--wait", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert argv.returncode == 7
    assert argv.stdout == b"out\n"
    realtime = run("submit", "--realtime", "--class", "default", "--", "true")
    assert realtime.returncode == 0
    unknown = run("kill", "99999")
    assert unknown.returncode == 1
    assert b"404" in unknown.stderr


def test_worker_commands(server: Server) -> None:
    server.cli(
        "worker",
        "add",
        "remote1",
        "--host",
        "127.0.0.1",
        "--port",
        "1",
        "--class",
        "gpu",
        "--max-jobs",
        "3",
        "--max-sessions",
        "4",
    )
    listing = server.cli("worker", "list").stdout
    assert "remote1" in listing
    assert "gpu" in listing
    server.cli("worker", "disable", "remote1")
    assert "disabled" in server.cli("worker", "list").stdout
    server.cli("worker", "enable", "remote1")
    server.cli("worker", "remove", "remote1")
    assert "remote1" not in server.cli("worker", "list").stdout
    duplicate = server.cli(
        "worker", "add", "local", "--transport", "local", check=False
    )
    assert duplicate.returncode == 1
    assert "already exists" in duplicate.stderr
    bad = server.cli("worker", "add", "nohost", check=False)
    assert bad.returncode == 1
    assert "host is required" in bad.stderr


def test_serve_port_taken_and_modes(server: Server) -> None:
    taken = subprocess.run(
        [JOBBALANCER, "serve", "--allow-root", "--config", str(server.config)],
        capture_output=True,
        text=True,
        env=server.env(),
        timeout=60,
    )
    assert taken.returncode == 1
    assert "cannot listen" in taken.stderr
    data = server.workdir / "data"
    assert oct(data.stat().st_mode & 0o777) == "0o700"
    assert oct((data / "jobbalancer.db").stat().st_mode & 0o777) == "0o600"
    piped = subprocess.run(
        f"{JOBBALANCER} jobs --limit 50 | head -n 1",
        shell=True,
        capture_output=True,
        text=True,
        env=server.env(),
        timeout=60,
    )
    assert "Traceback" not in piped.stderr
