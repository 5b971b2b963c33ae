"""Stored SSH keys: generation, import, encryption at rest, use, rotation, host keys."""

import base64
import sqlite3
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import testhost
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from sqlalchemy import Engine, create_engine, inspect, select, text

from orchestrator import db, keys, models, workers
from tests.support.server import JOBBALANCER, MARIADB_URL, Server, free_port

KEYS_MARIADB_DATABASE = "jobbalancer_keys_test"


@pytest.fixture(scope="module")
def key_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Any]]:
    """Start two sshd hosts whose authorized_keys the tests may rewrite."""
    hosts = testhost.start_hosts(2, tmp_path_factory.mktemp("key-hosts"))
    yield hosts
    testhost.stop_hosts(hosts)


@pytest.fixture
def sqlite_server(tmp_path: Path) -> Iterator[Server]:
    """Build a server on SQLite that the test starts when it is ready."""
    server = Server(tmp_path / "server")
    yield server
    server.stop()


def authorize_only(host: Any, *public_keys: str) -> None:
    """Make a test host accept exactly these public key lines."""
    host.authorized_keys_path.write_text("".join(k + "\n" for k in public_keys))


def poll(condition: Any, timeout: float = 30, what: str = "condition") -> Any:
    """Call ``condition`` until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def worker_named(client: httpx.Client, name: str) -> dict[str, Any]:
    """Return one worker from GET /api/v1/workers."""
    for worker in client.get("/api/v1/workers").json()["workers"]:
        if worker["name"] == name:
            return dict(worker)
    raise AssertionError(f"worker {name} not listed")


def ssh_keygen_fingerprint(path: Path) -> str:
    """Return the SHA256 fingerprint that ssh-keygen prints for a key file."""
    output = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return output.split()[1]


# Command line


def test_generate_prints_public_key_line(sqlite_server: Server, tmp_path: Path) -> None:
    ed = sqlite_server.cli("key", "generate", "fleet").stdout.strip()
    rsa_line = sqlite_server.cli("key", "generate", "legacy", "--type", "rsa")
    rsa_key = rsa_line.stdout.strip()

    assert ed.startswith("ssh-ed25519 AAAA")
    assert len(ed.splitlines()) == 1
    assert rsa_key.startswith("ssh-rsa AAAA")
    public = sqlite_server.cli("key", "public", "fleet").stdout.strip()
    assert public == ed

    pub_file = tmp_path / "rsa.pub"
    pub_file.write_text(rsa_key + "\n")
    loaded: Any = serialization.load_ssh_public_key(rsa_key.encode())
    assert loaded.key_size == 4096

    listing = sqlite_server.cli("key", "list").stdout
    rows = {line.split()[0]: line for line in listing.splitlines()[1:]}
    assert "ssh-ed25519" in rows["fleet"]
    assert "ssh-rsa 4096" in rows["legacy"]
    assert ssh_keygen_fingerprint(pub_file) in rows["legacy"]
    # The first stored key becomes the default key.
    assert " yes " in rows["fleet"]
    assert " yes " not in rows["legacy"]


def test_generate_rejects_bad_input(sqlite_server: Server) -> None:
    sqlite_server.cli("key", "generate", "dup")
    again = sqlite_server.cli("key", "generate", "dup", check=False)
    bad_name = sqlite_server.cli("key", "generate", "no spaces", check=False)
    reserved = sqlite_server.cli("key", "generate", "rotations", check=False)

    assert again.returncode == 1
    assert "already exists" in again.stderr
    assert bad_name.returncode == 1
    assert "invalid key name" in bad_name.stderr
    assert reserved.returncode == 1


@pytest.mark.parametrize(
    ("key_format", "key_type"),
    [("openssh", "ed25519"), ("PEM", "rsa"), ("PKCS8", "ecdsa")],
)
def test_import_with_passphrase_env(
    sqlite_server: Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    key_format: str,
    key_type: str,
) -> None:
    path = tmp_path / "id_import"
    format_option = [] if key_format == "openssh" else ["-m", key_format]
    subprocess.run(
        ["ssh-keygen", "-q", "-t", key_type, *format_option, "-N", "s3cret pass"]
        + ["-f", str(path)],
        check=True,
    )
    monkeypatch.setenv("TEST_KEY_PASSPHRASE", "s3cret pass")
    result = sqlite_server.cli(
        "key",
        "import",
        "imported",
        str(path),
        "--passphrase-env",
        "TEST_KEY_PASSPHRASE",
    )

    line = result.stdout.strip()
    assert line.split()[1] == path.with_suffix(".pub").read_text().split()[1]
    listing = sqlite_server.cli("key", "list").stdout
    assert ssh_keygen_fingerprint(path.with_suffix(".pub")) in listing


def test_import_prompts_for_passphrase(sqlite_server: Server, tmp_path: Path) -> None:
    path = tmp_path / "id_prompt"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "prompted", "-f", str(path)],
        check=True,
    )
    command = [JOBBALANCER, "key", "import", "prompted", str(path)]

    def run(stdin: str) -> subprocess.CompletedProcess[str]:
        # A new session has no controlling terminal, so getpass reads stdin.
        return subprocess.run(
            command,
            input=stdin,
            capture_output=True,
            text=True,
            env=sqlite_server.env(),
            start_new_session=True,
            timeout=60,
        )

    wrong = run("not it\n")
    right = run("prompted\n")

    assert wrong.returncode == 1
    assert "passphrase does not decrypt" in wrong.stderr
    assert right.returncode == 0, right.stderr
    assert right.stdout.startswith("ssh-ed25519 ")


def test_import_rejects_public_key(sqlite_server: Server, key_hosts: list) -> None:
    public = key_hosts[0].client_key_path.with_suffix(".pub")
    result = sqlite_server.cli("key", "import", "pub", str(public), check=False)
    assert result.returncode == 1
    assert "not a private key" in result.stderr


# Encryption at rest


@pytest.fixture(params=["sqlite", "mariadb"])
def store_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """Return an engine with the current schema on SQLite or MariaDB."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        url = _fresh_mariadb_database()
    engine = db.create_db_engine(url)
    db.upgrade_schema(engine)
    workers.ensure_defaults(engine)
    yield engine
    engine.dispose()


def _fresh_mariadb_database() -> str:
    base = MARIADB_URL.rsplit("/", 1)[0]
    admin = create_engine(base + "/")
    with admin.begin() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {KEYS_MARIADB_DATABASE}"))
        conn.execute(text(f"CREATE DATABASE {KEYS_MARIADB_DATABASE}"))
    admin.dispose()
    return f"{base}/{KEYS_MARIADB_DATABASE}"


def dump_database(engine: Engine) -> bytes:
    """Return every row of every table, the way a backup would contain them."""
    chunks: list[bytes] = []
    with engine.connect() as conn:
        for table in inspect(conn).get_table_names():
            for row in conn.execute(text(f"SELECT * FROM {table}")):
                for value in row:
                    if isinstance(value, (bytes, bytearray, memoryview)):
                        chunks.append(bytes(value))
                    else:
                        chunks.append(str(value).encode())
    if engine.url.get_backend_name() == "sqlite":
        database = Path(str(engine.url.database))
        for path in (database, Path(f"{database}-wal")):
            if path.exists():
                chunks.append(path.read_bytes())
        with sqlite3.connect(database) as raw:
            chunks.append("\n".join(raw.iterdump()).encode())
    return b"\n".join(chunks)


def secret_forms(private_pem: bytes) -> dict[str, bytes]:
    """Return the secret numbers of a private key in the encodings a leak could use."""
    key: Any = serialization.load_ssh_private_key(private_pem, password=None)
    secrets: list[bytes] = []
    if isinstance(key, ed25519.Ed25519PrivateKey):
        secrets.append(
            key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
        )
    elif isinstance(key, rsa.RSAPrivateKey):
        numbers = key.private_numbers()
        for value in (numbers.d, numbers.p, numbers.q):
            secrets.append(value.to_bytes((value.bit_length() + 7) // 8, "big"))
    forms = {}
    for index, secret in enumerate(secrets):
        forms[f"raw{index}"] = secret
        forms[f"hex{index}"] = secret.hex().encode()
        forms[f"base64_{index}"] = base64.b64encode(secret)[:-4]
    body = b"".join(line for line in private_pem.splitlines() if b"-----" not in line)
    forms["openssh_body"] = body[:64]
    return forms


def test_database_dump_reveals_no_private_key(
    store_engine: Engine, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    master = keys.load_master_key(data_dir)
    generated = keys.generate_key(store_engine, master, "gen-ed25519")
    generated_rsa = keys.generate_key(store_engine, master, "gen-rsa", "rsa")
    imported_path = tmp_path / "id_import"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(imported_path)],
        check=True,
    )
    imported = keys.import_key(
        store_engine, master, "imported", imported_path.read_bytes()
    )
    dump = dump_database(store_engine)

    assert b"PRIVATE KEY" not in dump
    for record in (generated, generated_rsa, imported):
        private = keys.load_private_key(store_engine, master, record.id)
        pem = private.export_private_key("openssh")
        for form, value in secret_forms(pem).items():
            assert value not in dump, f"{record.name}: {form} found in the dump"
    for form, value in secret_forms(imported_path.read_bytes()).items():
        assert value not in dump, f"imported file: {form} found in the dump"
    assert base64.urlsafe_b64encode(master) not in dump
    assert stat.S_IMODE((data_dir / keys.MASTER_KEY_FILE).stat().st_mode) == 0o600


def test_wrong_master_key_cannot_decrypt(store_engine: Engine, tmp_path: Path) -> None:
    master = keys.load_master_key(tmp_path / "right")
    other = keys.load_master_key(tmp_path / "other")
    record = keys.generate_key(store_engine, master, "sealed")

    with pytest.raises(keys.KeyStoreError, match="cannot decrypt"):
        keys.load_private_key(store_engine, other, record.id)
    key = keys.load_private_key(store_engine, master, record.id)
    assert key.get_fingerprint("sha256") == record.fingerprint


def test_moved_ciphertext_does_not_decrypt(
    store_engine: Engine, tmp_path: Path
) -> None:
    master = keys.load_master_key(tmp_path / "data")
    first = keys.generate_key(store_engine, master, "first")
    second = keys.generate_key(store_engine, master, "second")
    k = models.ssh_keys
    with store_engine.begin() as conn:
        blob = conn.execute(
            select(k.c.private_key_encrypted).where(k.c.id == first.id)
        ).scalar_one()
        conn.execute(
            k.update().where(k.c.id == second.id).values(private_key_encrypted=blob)
        )

    with pytest.raises(keys.KeyStoreError):
        keys.load_private_key(store_engine, master, second.id)


def test_master_key_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    value = keys.generate_master_key_text()
    monkeypatch.setenv(keys.MASTER_KEY_ENV, value)
    assert keys.load_master_key(tmp_path) == base64.urlsafe_b64decode(value)
    assert not (tmp_path / keys.MASTER_KEY_FILE).exists()

    monkeypatch.setenv(keys.MASTER_KEY_ENV, "too-short")
    with pytest.raises(keys.KeyStoreError, match="invalid master key"):
        keys.load_master_key(tmp_path)


def test_server_creates_master_key_file(sqlite_server: Server) -> None:
    sqlite_server.start()
    path = sqlite_server.workdir / "data" / keys.MASTER_KEY_FILE
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# Using stored keys


def use_only_ssh_workers(server: Server) -> None:
    """Take the built-in local worker out of rotation."""
    server.cli("worker", "disable", "local")


def add_worker(server: Server, host: Any, name: str, *options: str) -> None:
    """Register a test host as a worker without a key file."""
    server.cli(
        "worker",
        "add",
        name,
        "--host",
        host.host,
        "--port",
        str(host.port),
        "--user",
        host.user,
        *options,
    )


def run_job(server: Server, client: httpx.Client, command: str) -> dict[str, Any]:
    """Submit a command and wait for its end."""
    answer = server.submit(client, command=command)
    return server.wait_job(client, answer["id"])


def test_worker_uses_named_and_default_key(
    sqlite_server: Server, key_hosts: list
) -> None:
    server = sqlite_server
    default_line = server.cli("key", "generate", "main").stdout.strip()
    named_line = server.cli("key", "generate", "special").stdout.strip()
    authorize_only(key_hosts[0], named_line)
    authorize_only(key_hosts[1], default_line)
    use_only_ssh_workers(server)
    add_worker(server, key_hosts[0], "named", "--key-name", "special")
    add_worker(server, key_hosts[1], "by-default")
    server.start()

    with server.client() as client:
        server.wait_worker(client, "named", "online")
        server.wait_worker(client, "by-default", "online")
        jobs = [run_job(server, client, "echo stored-key") for _ in range(4)]
        listing = client.get("/api/v1/keys").json()["keys"]

    assert {job["state"] for job in jobs} == {"succeeded"}
    assert {job["worker"] for job in jobs} == {"named", "by-default"}
    users = {item["name"]: item["workers"] for item in listing}
    assert users == {"main": ["by-default"], "special": ["named"]}


def test_worker_add_unknown_key_name(sqlite_server: Server) -> None:
    result = sqlite_server.cli(
        "worker",
        "add",
        "w",
        "--host",
        "127.0.0.1",
        "--key-name",
        "missing",
        check=False,
    )
    assert result.returncode == 1
    assert "SSH key 'missing' not found" in result.stderr


def test_delete_refuses_key_in_use(sqlite_server: Server, key_hosts: list) -> None:
    server = sqlite_server
    server.cli("key", "generate", "main")
    server.cli("key", "generate", "spare", "--no-default")
    add_worker(server, key_hosts[0], "w1", "--key-name", "spare")
    add_worker(server, key_hosts[1], "w2")

    refused = server.cli("key", "delete", "spare", check=False)
    refused_default = server.cli("key", "delete", "main", check=False)
    server.start()
    with server.client() as client:
        api_refused = client.delete("/api/v1/keys/spare")
        moved = client.put("/api/v1/workers/w1/key", json={"key": None})
        deleted = client.delete("/api/v1/keys/spare")
        names = [item["name"] for item in client.get("/api/v1/keys").json()["keys"]]

    assert refused.returncode == 1
    assert "in use by 1 worker(s): w1" in refused.stderr
    assert refused_default.returncode == 1
    assert "w2" in refused_default.stderr
    assert api_refused.status_code == 409
    assert moved.status_code == 200
    assert deleted.status_code == 200
    assert names == ["main"]


def test_key_api_generate_import_default(sqlite_server: Server, tmp_path: Path) -> None:
    server = sqlite_server
    server.start()
    path = tmp_path / "id_api"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "rsa", "-b", "3072", "-m", "PEM", "-N", "pw-api"]
        + ["-f", str(path)],
        check=True,
    )
    with server.client() as client:
        created = client.post("/api/v1/keys", json={"name": "api-ed"})
        rsa_created = client.post(
            "/api/v1/keys", json={"name": "api-rsa", "type": "rsa", "default": True}
        )
        no_pass = client.post(
            "/api/v1/keys/import",
            json={"name": "imp", "private_key": path.read_text()},
        )
        imported = client.post(
            "/api/v1/keys/import",
            json={
                "name": "imp",
                "private_key": path.read_text(),
                "passphrase": "pw-api",
            },
        )
        public = client.get("/api/v1/keys/imp/public")
        bad_type = client.post("/api/v1/keys", json={"name": "x", "type": "dsa"})
        listing = client.get("/api/v1/keys").json()

    assert created.status_code == 201
    assert created.json()["default"] is True
    assert rsa_created.status_code == 201
    assert rsa_created.json()["bits"] == 4096
    assert no_pass.status_code == 422
    assert no_pass.json()["field"] == "passphrase"
    assert imported.status_code == 201
    assert imported.json()["fingerprint"] == ssh_keygen_fingerprint(path)
    assert public.text.split()[1] == path.with_suffix(".pub").read_text().split()[1]
    assert bad_type.status_code == 422
    defaults = [item["name"] for item in listing["keys"] if item["default"]]
    assert defaults == ["api-rsa"]
    assert all("private" not in name for item in listing["keys"] for name in item)


def test_key_api_needs_admin(sqlite_server: Server) -> None:
    server = sqlite_server
    server.start()
    key = server.cli("user", "add", "alice").stdout.strip().splitlines()[-1]
    headers = {"Authorization": f"Bearer {key}"}

    listing = httpx.get(f"{server.url}/api/v1/keys", headers=headers)
    creating = httpx.post(
        f"{server.url}/api/v1/keys", json={"name": "k"}, headers=headers
    )

    assert listing.status_code == 403
    assert creating.status_code == 403


# Rotation


def wait_rotation(client: httpx.Client, url: str) -> dict[str, Any]:
    """Poll a rotation until it has finished."""

    def finished() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(url).json()
        return body if body["state"] != "running" else None

    result: dict[str, Any] = poll(finished, 90, "the rotation to finish")
    return result


def test_rotation_moves_workers_to_new_key(
    sqlite_server: Server, key_hosts: list
) -> None:
    server = sqlite_server
    host = key_hosts[0]
    old_line = server.cli("key", "generate", "fleet").stdout.strip()
    authorize_only(host, old_line)
    use_only_ssh_workers(server)
    add_worker(server, host, "assigned", "--key-name", "fleet")
    add_worker(server, host, "defaulted")
    server.cli(
        "worker",
        "add",
        "gone",
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
        "--user",
        host.user,
    )
    server.start()

    with server.client() as client:
        server.wait_worker(client, "assigned", "online")
        server.wait_worker(client, "defaulted", "online")
        started = client.post(
            "/api/v1/keys/fleet/rotate",
            json={
                "new_name": "fleet-2",
                "authorized_keys_file": str(host.authorized_keys_path),
            },
        )
        assert started.status_code == 202, started.text
        rotation = wait_rotation(client, started.json()["url"])
        states = {item["worker"]: item for item in rotation["workers"]}
        jobs = [run_job(server, client, "echo rotated") for _ in range(4)]
        listing = {k["name"]: k for k in client.get("/api/v1/keys").json()["keys"]}

    new_line = rotation["new_public_key"]
    authorized = host.authorized_keys_path.read_text()
    assert rotation["state"] == "partial"
    assert states["assigned"]["state"] == "done"
    assert states["defaulted"]["state"] == "done"
    assert states["gone"]["state"] == "failed"
    assert "old key" in states["gone"]["detail"]
    assert authorized.count(new_line.split()[1]) == 1
    assert old_line.split()[1] not in authorized
    assert {job["state"] for job in jobs} == {"succeeded"}
    assert {job["worker"] for job in jobs} == {"assigned", "defaulted"}
    # The unreachable worker keeps the old key, so the old key stays stored.
    assert rotation["old_key_deleted"] is False
    assert listing["fleet"]["workers"] == ["gone"]
    assert listing["fleet"]["default"] is False
    assert listing["fleet-2"]["default"] is True
    assert sorted(listing["fleet-2"]["workers"]) == ["assigned", "defaulted"]


def test_rotation_deletes_unused_old_key(
    sqlite_server: Server, key_hosts: list
) -> None:
    server = sqlite_server
    host = key_hosts[1]
    old_line = server.cli("key", "generate", "solo").stdout.strip()
    authorize_only(host, old_line)
    use_only_ssh_workers(server)
    add_worker(server, host, "only")
    server.start()

    with server.client() as client:
        server.wait_worker(client, "only", "online")
    result = server.cli(
        "key",
        "rotate",
        "solo",
        "--new-name",
        "solo-2",
        "--authorized-keys-file",
        str(host.authorized_keys_path),
    )
    with server.client() as client:
        job = run_job(server, client, "echo after")
        names = [k["name"] for k in client.get("/api/v1/keys").json()["keys"]]

    assert "only: done" in result.stdout
    assert "Rotation succeeded." in result.stdout
    assert names == ["solo-2"]
    assert job["state"] == "succeeded"
    assert old_line.split()[1] not in host.authorized_keys_path.read_text()


# Host keys


def offline_for_host_key(client: httpx.Client, name: str) -> dict[str, Any] | None:
    """Return the worker when it is offline because its host key changed."""
    worker = worker_named(client, name)
    if worker["state"] == "offline" and "host key changed" in (worker["reason"] or ""):
        return worker
    return None


def pending_host_key(client: httpx.Client, name: str) -> dict[str, Any] | None:
    """Return the worker's host key state once a changed key is pending."""
    state: dict[str, Any] = client.get(f"/api/v1/workers/{name}/host-key").json()
    return state if state["pending_fingerprint"] else None


def test_changed_host_key_needs_acceptance(
    sqlite_server: Server, tmp_path: Path
) -> None:
    server = sqlite_server
    host = testhost.SshHost(tmp_path / "host", name="rekeyed")
    host.start()
    try:
        line = server.cli("key", "generate", "main").stdout.strip()
        authorize_only(host, line)
        use_only_ssh_workers(server)
        add_worker(server, host, "rekeyed")
        server.start()
        with server.client() as client:
            server.wait_worker(client, "rekeyed", "online")
            first = client.get("/api/v1/workers/rekeyed/host-key").json()
            old_print = ssh_keygen_fingerprint(host.host_key_path.with_suffix(".pub"))

            host.stop()
            host.host_key_path.unlink()
            host.host_key_path.with_suffix(".pub").unlink()
            host.start()
            authorize_only(host, line)
            new_print = ssh_keygen_fingerprint(host.host_key_path.with_suffix(".pub"))

            offline = poll(
                lambda: offline_for_host_key(client, "rekeyed"),
                what="the worker to go offline with a host key reason",
            )
            pending = poll(
                lambda: pending_host_key(client, "rekeyed"),
                what="the pending host key",
            )
            wrong = client.post(
                "/api/v1/workers/rekeyed/accept-host-key",
                json={"fingerprint": old_print},
            )
            time.sleep(2)
            still_offline = worker_named(client, "rekeyed")
            accepted = client.post(
                "/api/v1/workers/rekeyed/accept-host-key",
                json={"fingerprint": new_print},
            )
            server.wait_worker(client, "rekeyed", "online")
            job = run_job(server, client, "echo accepted")
            again = client.post("/api/v1/workers/rekeyed/accept-host-key")
    finally:
        host.stop()

    assert first["fingerprint"] == old_print
    assert first["pending_host_key"] is None
    assert old_print in offline["reason"]
    assert new_print in offline["reason"]
    assert pending["fingerprint"] == old_print
    assert pending["pending_fingerprint"] == new_print
    assert wrong.status_code == 409
    assert still_offline["state"] == "offline"
    assert accepted.status_code == 200
    assert accepted.json()["fingerprint"] == new_print
    assert accepted.json()["pending_host_key"] is None
    assert job["state"] == "succeeded"
    assert again.status_code == 409
