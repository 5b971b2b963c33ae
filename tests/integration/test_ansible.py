"""Run ansible/prepare-worker.yml against a real sshd, then run a job there.

The test host is this machine, so the play gets settings that keep it away from
the machine's own configuration. It edits the sshd config of the test sshd and
reloads that sshd through its PID file. It creates a temporary job account with
its home folder in a temporary folder, and it names only packages that are
already installed. The account is deleted at the end.
"""

import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import testhost
import yaml

from tests.support.server import Server

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = ROOT / "ansible" / "prepare-worker.yml"
ANSIBLE_PLAYBOOK = str(Path(sys.executable).parent / "ansible-playbook")
PLAYBOOK_TIMEOUT_SECONDS = 300
# Installed on this machine already, so the package task changes nothing.
INSTALLED_PACKAGE = "ffmpeg"
MAX_SESSIONS = 8


class HomeKeysHost(testhost.SshHost):
    """A test sshd that also reads ~/.ssh/authorized_keys, as a stock sshd does."""

    def _write_config(self, port: int) -> None:
        super()._write_config(port)
        config = self.config_path.read_text()
        own = f"AuthorizedKeysFile {self.authorized_keys_path}"
        assert own in config
        self.config_path.write_text(config.replace(own, f"{own} .ssh/authorized_keys"))


def apt_bindings_present() -> bool:
    """Return whether the target's Python has python3-apt.

    Ansible's apt module installs python3-apt when it is missing, and the test
    installs nothing on this machine, so without it the package step is skipped.
    """
    result = subprocess.run(
        ["/usr/bin/python3", "-c", "import apt"], capture_output=True, check=False
    )
    return result.returncode == 0


def package_installed(name: str) -> bool:
    """Return whether dpkg lists a package as installed."""
    result = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Status}", name],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() == "install ok installed"


@pytest.fixture
def job_user() -> Iterator[tuple[str, Path]]:
    """Pick an unused account name and home folder; delete both after the test."""
    name = f"jbtest{secrets.token_hex(4)}"
    with pytest.raises(KeyError):
        pwd.getpwnam(name)
    # sshd reads authorized_keys as the account, so every folder above the
    # home folder must be searchable by it, which pytest's tmp_path is not.
    parent = Path(tempfile.mkdtemp(prefix="jobbalancer-home-"))
    parent.chmod(0o755)
    try:
        yield name, parent / name
    finally:
        try:
            pwd.getpwnam(name)
        except KeyError:
            pass
        else:
            subprocess.run(["userdel", name], check=True)
        shutil.rmtree(parent)


@pytest.fixture
def worker_host(tmp_path: Path) -> Iterator[HomeKeysHost]:
    """Start the sshd that the playbook prepares."""
    host = HomeKeysHost(tmp_path / "sshd", name="prepared")
    host.start()
    yield host
    host.stop()


def write_inventory(
    path: Path, host: HomeKeysHost, user: str, home: Path, tmp_path: Path
) -> None:
    """Write an inventory that both Ansible and the server read."""
    host_vars: dict[str, Any] = {
        "ansible_host": host.host,
        "ansible_port": host.port,
        "ansible_user": host.user,
        "jobbalancer_user": user,
        "jobbalancer_home": str(home),
        "jobbalancer_max_sessions": MAX_SESSIONS,
        "jobbalancer_packages": [INSTALLED_PACKAGE],
        "jobbalancer_install_packages": apt_bindings_present(),
        "jobbalancer_sshd_config": str(host.config_path),
        "jobbalancer_sshd_pid_file": str(host.pid_file_path),
        # Connection settings for Ansible alone; the server ignores them.
        "ansible_become": False,
        "ansible_python_interpreter": "/usr/bin/python3",
        "ansible_ssh_private_key_file": str(host.client_key_path),
        "ansible_ssh_common_args": (
            f"-o UserKnownHostsFile={host.known_hosts_path} "
            "-o StrictHostKeyChecking=yes"
        ),
        "ansible_remote_tmp": str(tmp_path / "ansible-remote"),
    }
    data = {
        "all": {
            "children": {
                "media": {
                    "vars": {"jobbalancer_max_jobs": 2},
                    "hosts": {"prepared": host_vars},
                }
            }
        }
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def run_playbook(inventory: Path, public_key: Path, tmp_path: Path) -> str:
    """Run the playbook and return its output; fail the test when it fails."""
    env = dict(os.environ)
    env.update(
        ANSIBLE_HOME=str(tmp_path / "ansible-home"),
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-local"),
        # No persistent control connections: nothing may outlive the test.
        ANSIBLE_SSH_ARGS="-o ControlMaster=no -o ControlPersist=no",
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
    )
    result = subprocess.run(
        [
            ANSIBLE_PLAYBOOK,
            "-i",
            str(inventory),
            str(PLAYBOOK),
            "-e",
            f"jobbalancer_public_key_file={public_key}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=PLAYBOOK_TIMEOUT_SECONDS,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def recap_counts(output: str) -> dict[str, int]:
    """Return the PLAY RECAP counters of the one host."""
    match = re.search(r"^prepared\s*:\s*(.*)$", output, re.MULTILINE)
    assert match, output
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", match[1])}


def wait_for_sshd(host: HomeKeysHost) -> None:
    """Wait until the sshd that reloaded its config accepts connections again."""
    deadline = time.monotonic() + 10
    while not testhost._read_ssh_banner(host.host, host.port):
        assert time.monotonic() < deadline, "sshd did not come back after reload"
        time.sleep(0.1)


@pytest.mark.skipif(
    not package_installed(INSTALLED_PACKAGE),
    reason=f"{INSTALLED_PACKAGE} must be installed, because the test never "
    "installs packages on this machine",
)
def test_playbook_prepares_worker_for_jobs(
    tmp_path: Path, worker_host: HomeKeysHost, job_user: tuple[str, Path]
) -> None:
    user, home = job_user
    server = Server(tmp_path / "server")
    public_line = server.cli("key", "generate", "fleet").stdout.strip()
    public_key = tmp_path / "fleet.pub"
    public_key.write_text(server.cli("key", "public", "fleet").stdout)
    inventory = tmp_path / "inventory.yml"
    write_inventory(inventory, worker_host, user, home, tmp_path)

    first = recap_counts(run_playbook(inventory, public_key, tmp_path))
    wait_for_sshd(worker_host)
    second = recap_counts(run_playbook(inventory, public_key, tmp_path))

    assert first["failed"] == 0
    assert first["changed"] > 0
    assert second["failed"] == 0
    assert second["changed"] == 0
    assert f"MaxSessions {MAX_SESSIONS}\n" in worker_host.config_path.read_text()
    account = pwd.getpwnam(user)
    assert account.pw_dir == str(home)
    authorized = (home / ".ssh" / "authorized_keys").read_text()
    assert authorized.splitlines() == [public_line]
    bashrc = (home / ".bashrc").read_text()
    assert all(line.startswith("#") for line in bashrc.splitlines())
    work = home / "work"
    assert work.is_dir()
    assert work.stat().st_uid == account.pw_uid

    synced = server.cli("inventory", "sync", str(inventory)).stdout
    server.cli("worker", "disable", "local")
    server.start()
    try:
        with server.client() as client:
            server.wait_worker(client, "prepared", "online")
            answer = server.submit(
                client,
                workerClassId="media",
                command=f"id -un; pwd; {INSTALLED_PACKAGE} -version | head -n 1; "
                "test -d work && echo work-folder",
            )
            job = server.wait_job(client, answer["id"])
            log = client.get(f"/api/v1/jobs/{answer['id']}/log").text
            worker = server.wait_worker(client, "prepared", "online")
    finally:
        server.stop()

    assert "add worker prepared" in synced
    assert job["state"] == "succeeded", job
    assert job["worker"] == "prepared"
    assert log.splitlines()[:2] == [user, str(home)]
    assert f"{INSTALLED_PACKAGE} version" in log
    assert "work-folder" in log
    assert worker["user"] == user
    assert worker["max_sessions"] == MAX_SESSIONS
    assert worker["worker_class"] == "media"
