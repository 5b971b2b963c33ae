"""Ansible-format inventories: parsing, sync, export, and agreement with Ansible."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from orchestrator import inventory
from tests.support.server import Server, free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "inventory" / "example.yml"
ANSIBLE_INVENTORY = str(Path(sys.executable).parent / "ansible-inventory")
# Variables the server reads; the test compares them with Ansible's view.
SERVER_VARS = (
    "ansible_host",
    "ansible_port",
    "ansible_user",
    "jobbalancer_user",
    "jobbalancer_max_jobs",
    "jobbalancer_max_sessions",
)


@pytest.fixture
def cli_server(tmp_path: Path) -> Server:
    """Return a server configuration for CLI commands; no process is started."""
    return Server(tmp_path / "server")


def ansible_view(path: Path) -> dict[str, Any]:
    """Return `ansible-inventory --list` for a file."""
    result = subprocess.run(
        [ANSIBLE_INVENTORY, "-i", str(path), "--list"],
        capture_output=True,
        text=True,
        check=False,
        env={"ANSIBLE_INVENTORY_UNPARSED_FAILED": "true", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    view: dict[str, Any] = json.loads(result.stdout)
    return view


def group_of(view: dict[str, Any], host: str) -> str:
    """Return the one group below ``all`` that lists ``host``."""
    groups = [
        name
        for name, body in view.items()
        if name not in ("_meta", "all") and host in body.get("hosts", [])
    ]
    assert len(groups) == 1, groups
    return groups[0]


def worker_rows(server: Server) -> dict[str, list[str]]:
    """Return `jobbalancer worker list` rows by worker name."""
    lines = server.cli("worker", "list").stdout.splitlines()[1:]
    return {line.split()[0]: line.split() for line in lines}


def test_example_matches_ansible_view() -> None:
    parsed = inventory.Inventory.from_yaml(EXAMPLE.read_text(), str(EXAMPLE))
    view = ansible_view(EXAMPLE)
    hostvars = view["_meta"]["hostvars"]

    assert set(parsed.workers) == set(hostvars)
    for name, spec in parsed.workers.items():
        values = hostvars[name]
        assert spec.host == values["ansible_host"]
        assert spec.port == values["ansible_port"]
        assert spec.username == values["jobbalancer_user"]
        assert spec.worker_class == group_of(view, name)
        assert spec.max_sessions == values["jobbalancer_max_sessions"]
        effective = spec.max_jobs or parsed.classes[spec.worker_class]
        assert effective == values["jobbalancer_max_jobs"]
        assert values["ansible_user"] == "admin"
    assert parsed.classes == {"default": 4, "media": 2}
    assert parsed.workers["worker2"].max_jobs == 8
    assert parsed.workers["worker1"].max_jobs is None


def test_nested_groups_follow_ansible_precedence(tmp_path: Path) -> None:
    path = tmp_path / "nested.yml"
    path.write_text(
        """
all:
  vars:
    ansible_user: everyone
    jobbalancer_max_sessions: 5
  hosts:
    loose:
      ansible_host: 127.0.0.9
  children:
    site:
      vars:
        jobbalancer_max_sessions: 6
        ansible_port: 2200
      children:
        gpu:
          vars:
            jobbalancer_max_jobs: 3
            ansible_group_priority: 5
          hosts:
            gpu[01:03]:
              ansible_host: 127.0.0.1
            gpu02:
              jobbalancer_max_sessions: 7
        cpu:
          vars:
            jobbalancer_max_sessions: 9
          hosts:
            node-[a:b]:
"""
    )
    parsed = inventory.Inventory.from_yaml(path.read_text())
    hostvars = ansible_view(path)["_meta"]["hostvars"]

    assert sorted(parsed.workers) == sorted(hostvars)
    assert sorted(parsed.workers) == [
        "gpu01",
        "gpu02",
        "gpu03",
        "loose",
        "node-a",
        "node-b",
    ]
    for name, spec in parsed.workers.items():
        values = hostvars[name]
        assert spec.port == values.get("ansible_port", 22), name
        assert spec.username == values["ansible_user"], name
        assert spec.max_sessions == values["jobbalancer_max_sessions"], name
        assert spec.host == values.get("ansible_host", name), name
    assert parsed.workers["loose"].worker_class == "default"
    assert parsed.workers["gpu02"].worker_class == "gpu"
    assert "site" not in parsed.classes
    assert parsed.classes["gpu"] == 3


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("all: [1, 2]", "must be a mapping"),
        ("all:\n  hosts:\n    h: {ansible_port: 70000}", "at most 65535"),
        ("all:\n  hosts:\n    h: {jobbalancer_max_jobs: 0}", "at least 1"),
        ("all:\n  hosts:\n    h: {ansible_host: '{{ x }}'}", "Jinja2 template"),
        ("all:\n  host:\n    h: {}", "unknown keys"),
        ("all: {hosts: {h: {}}\n", "not valid YAML"),
        (
            "all:\n  children:\n    a: {hosts: {h: {}}}\n    b: {hosts: {h: {}}}",
            "set jobbalancer_class",
        ),
        (
            "all:\n  hosts:\n    h: {jobbalancer_key: k, jobbalancer_key_file: /f}",
            "keep one",
        ),
    ],
)
def test_invalid_inventory_is_rejected(body: str, message: str) -> None:
    with pytest.raises(inventory.InventoryError, match=message):
        inventory.Inventory.from_yaml(body)


def test_host_class_can_be_chosen() -> None:
    parsed = inventory.Inventory.from_yaml(
        "all:\n  children:\n    a: {hosts: {h: {jobbalancer_class: b}}}\n"
        "    b: {hosts: {h: {}}}"
    )
    assert parsed.workers["h"].worker_class == "b"


def test_sync_is_idempotent(cli_server: Server) -> None:
    dry = cli_server.cli("inventory", "sync", "--dry-run", str(EXAMPLE)).stdout
    after_dry = worker_rows(cli_server)
    first = cli_server.cli("inventory", "sync", str(EXAMPLE)).stdout
    rows = worker_rows(cli_server)
    second = cli_server.cli("inventory", "sync", str(EXAMPLE)).stdout

    assert "would add worker worker1" in dry
    assert "dry run, nothing was written" in dry
    assert set(after_dry) == {"local"}
    assert "add class media" in first
    assert "3 added, 0 changed, 0 unchanged" in first
    assert rows["worker2"][2:4] == ["default", "8"]
    assert rows["encoder1"][2:5] == ["media", "2", "jobs@192.0.2.21:2222"]
    assert "0 added, 0 changed, 3 unchanged" in second
    assert "add" not in second.replace("0 added", "")


def test_sync_reports_changes(cli_server: Server, tmp_path: Path) -> None:
    cli_server.cli("inventory", "sync", str(EXAMPLE))
    cli_server.cli(
        "worker", "add", "manual", "--host", "127.0.0.1", "--port", str(free_port())
    )
    data = yaml.safe_load(EXAMPLE.read_text())
    media = data["all"]["children"]["media"]
    media["vars"]["jobbalancer_max_jobs"] = 3
    encoder = media["hosts"]["encoder1"]
    encoder["ansible_port"] = 2223
    worker1 = data["all"]["children"]["default"]["hosts"].pop("worker1")
    media["hosts"]["worker1"] = worker1
    changed = tmp_path / "changed.yml"
    changed.write_text(yaml.safe_dump(data))

    report = cli_server.cli("inventory", "sync", str(changed)).stdout
    rows = worker_rows(cli_server)

    assert "change class media: default max jobs 2 -> 3" in report
    assert "change worker encoder1: port 2222 -> 2223" in report
    assert "change worker worker1: class 'default' -> 'media'" in report
    assert "unchanged worker worker2" in report
    assert "not in file, left alone: worker manual" in report
    assert rows["encoder1"][3] == "3"
    assert rows["worker1"][2] == "media"
    assert "manual" in rows


def test_sync_assigns_stored_keys(cli_server: Server, tmp_path: Path) -> None:
    cli_server.cli("key", "generate", "fleet")
    path = tmp_path / "keys.yml"
    path.write_text(
        "all:\n  hosts:\n"
        "    a: {ansible_host: 127.0.0.1, jobbalancer_key: fleet}\n"
        "    b: {ansible_host: 127.0.0.1, jobbalancer_key: missing}\n"
    )
    failed = cli_server.cli("inventory", "sync", str(path), check=False)
    path.write_text(path.read_text().replace("missing", "fleet"))
    cli_server.cli("inventory", "sync", str(path))
    listing = cli_server.cli("key", "list").stdout

    assert failed.returncode == 1
    assert "unknown SSH key(s) in jobbalancer_key: missing" in failed.stderr
    assert "a,b" in listing


def test_export_is_valid_and_round_trips(cli_server: Server, tmp_path: Path) -> None:
    cli_server.cli("key", "generate", "fleet")
    cli_server.cli("inventory", "sync", str(EXAMPLE))
    cli_server.cli(
        "worker",
        "add",
        "keyed",
        "--host",
        "127.0.0.1",
        "--port",
        "2022",
        "--user",
        "runner",
        "--key-name",
        "fleet",
        "--class",
        "empty-ish",
        "--max-jobs",
        "9",
        "--max-sessions",
        "4",
    )
    exported = tmp_path / "exported.yml"
    cli_server.cli("inventory", "export", str(exported))
    stdout_copy = cli_server.cli("inventory", "export").stdout
    view = ansible_view(exported)
    hostvars = view["_meta"]["hostvars"]
    resync = cli_server.cli("inventory", "sync", str(exported)).stdout

    assert stdout_copy.splitlines()[3:] == exported.read_text().splitlines()[3:]
    assert sorted(hostvars) == ["encoder1", "keyed", "worker1", "worker2"]
    assert "local" not in hostvars
    keyed = hostvars["keyed"]
    assert keyed["ansible_host"] == "127.0.0.1"
    assert keyed["ansible_port"] == 2022
    assert keyed["ansible_user"] == "runner"
    assert keyed["jobbalancer_max_jobs"] == 9
    assert keyed["jobbalancer_max_sessions"] == 4
    assert keyed["jobbalancer_key"] == "fleet"
    assert group_of(view, "keyed") == "empty-ish"
    assert hostvars["worker2"]["jobbalancer_max_jobs"] == 8
    assert hostvars["worker1"]["jobbalancer_max_jobs"] == 4
    assert "0 added, 0 changed, 4 unchanged" in resync


def test_inventory_api_upload_and_export(tmp_path: Path) -> None:
    server = Server(tmp_path / "server")
    port = free_port()
    text = (
        "all:\n  children:\n    batch:\n      vars: {jobbalancer_max_jobs: 2}\n"
        "      hosts:\n"
        f"        closed: {{ansible_host: 127.0.0.1, ansible_port: {port}}}\n"
    )
    server.start()
    try:
        with server.client() as client:
            dry = client.post(
                "/api/v1/inventory/sync", params={"dry_run": "true"}, content=text
            )
            raw = client.post("/api/v1/inventory/sync", content=text)
            upload = client.post(
                "/api/v1/inventory/sync",
                files={"file": ("workers.yml", text.encode(), "application/yaml")},
            )
            broken = client.post("/api/v1/inventory/sync", content="all: [")
            exported = client.get("/api/v1/inventory")
            workers = client.get("/api/v1/workers").json()["workers"]
        anonymous = httpx.get(f"{server.url}/api/v1/inventory")
    finally:
        server.stop()

    assert dry.status_code == 200
    assert dry.json()["dry_run"] is True
    assert dry.json()["added"] == ["closed"]
    assert raw.json()["added"] == ["closed"]
    assert raw.json()["classes_added"] == ["batch"]
    assert upload.json()["unchanged"] == ["closed"]
    assert broken.status_code == 422
    assert "not valid YAML" in broken.json()["detail"]
    assert exported.status_code == 200
    assert exported.headers["content-type"].startswith("application/yaml")
    assert yaml.safe_load(exported.text)["all"]["children"]["batch"]["hosts"] == {
        "closed": {
            "ansible_host": "127.0.0.1",
            "ansible_port": port,
            "jobbalancer_max_sessions": 10,
        }
    }
    assert "closed" in {worker["name"] for worker in workers}
    assert anonymous.status_code == 401
