"""Security promises: restricted submitters, secrets kept out of logs, HTTPS."""

import re
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from orchestrator import accounts, db
from tests.support.server import JOBBALANCER, Server

sqlite_only = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


def engine_for(server: Server) -> object:
    return db.create_db_engine(
        f"sqlite:///{server.workdir / 'data' / 'jobbalancer.db'}"
    )


@sqlite_only
def test_script_only_submitter_limits(server: Server, tmp_path: Path) -> None:
    key = server.cli("user", "add", "carol").stdout.strip().splitlines()[-1]
    script = tmp_path / "hello.sh"
    script.write_text('echo "hello $1"\n')
    script_id = server.cli(
        "script", "add", "hello", "--interpreter", "/bin/sh", "--file", str(script)
    ).stdout.strip()
    server.cli(
        "worker", "add", "gpu1", "--host", "127.0.0.1", "--port", "1", "--class", "gpu"
    )
    engine = engine_for(server)
    found = accounts.find_user_by_name(engine, "carol")  # type: ignore[arg-type]
    assert found is not None
    accounts.update_user(
        engine,  # type: ignore[arg-type]
        found[0].id,
        allow_commands=False,
        allowed_classes=["default"],
    )
    with httpx.Client(
        base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {key}"}
    ) as client:
        raw = client.post("/addJob", json={"command": "id"})
        other_class = client.post(
            "/addJob", json={"scriptId": script_id, "workerClassId": "gpu"}
        )
        allowed = client.post(
            "/addJob",
            json={"scriptId": script_id, "params": ["x"], "wait": True},
        )
        admin_only = client.post(
            "/api/v1/workers", json={"name": "evil", "host": "127.0.0.1"}
        )
    assert raw.status_code == 403
    assert raw.json()["field"] == "command"
    assert other_class.status_code == 403
    assert other_class.json()["field"] == "workerClassId"
    assert allowed.status_code == 200, allowed.text
    assert allowed.json()["stdout"] == "hello x\n"
    assert admin_only.status_code == 403


@sqlite_only
def test_secrets_never_logged(server: Server) -> None:
    env = dict(server.env(), NEW_PW="pw-Kq83-secret")
    added = subprocess.run(
        [JOBBALANCER, "user", "add", "dave", "--password-env", "NEW_PW"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    dave_key = added.stdout.strip().splitlines()[-1]
    generated = server.cli("key", "generate", "logcheck").stdout
    with server.client() as client:
        server.submit(client, command="echo hi", wait=True)
        bad = client.post("/addJob", json={"command": "x", "apiKey": "jb_bad_guess"})
        assert bad.status_code == 401
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        anonymous.post(
            "/login",
            data={"username": "dave", "password": "pw-Kq83-secret"},
        )
        anonymous.post("/addJob", json={"command": "true", "apiKey": dave_key})
    server.stop()
    log = server.log_path.read_text()
    # The first start prints the generated admin credentials once, on purpose.
    banner_end = log.index("Job Balancer listening on")
    after_banner = log[banner_end:]
    secrets = [
        server.api_key,
        server.admin_password,
        dave_key,
        "pw-Kq83-secret",
        "jb_bad_guess",
    ]
    for secret in secrets:
        assert secret not in after_banner, f"secret {secret[:6]}... in the log"
    private_key_lines = re.findall(r"PRIVATE KEY", log + generated)
    assert private_key_lines == []
    master = (server.workdir / "data").glob("master*")
    for path in master:
        assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_https_with_self_signed_cert(tmp_path: Path) -> None:
    server = Server(tmp_path / "tls")
    out = server.cli("cert", "generate", "--dir", str(tmp_path / "certs")).stdout
    cert = tmp_path / "certs" / "server.crt"
    key = tmp_path / "certs" / "server.key"
    assert "SHA-256 fingerprint" in out
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    with server.config.open("a") as handle:
        handle.write(f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"\n')
    server.url = server.url.replace("http://", "https://")
    context = ssl.create_default_context(cafile=str(cert))
    server.verify = context
    server.start()
    try:
        with httpx.Client(base_url=server.url, verify=context, timeout=30) as client:
            health = client.get("/healthz")
            login_page = client.get("/login")
            plain = None
            try:
                plain = httpx.get(
                    server.url.replace("https://", "http://") + "/healthz", timeout=5
                )
            except httpx.HTTPError:
                pass
            token = re.search(r'name="csrf_token" value="([^"]+)"', login_page.text)
            assert token is not None
            response = client.post(
                "/login",
                data={
                    "username": "admin",
                    "password": server.admin_password,
                    "csrf_token": token.group(1),
                },
            )
        assert health.status_code == 200
        assert login_page.status_code == 200
        assert plain is None or plain.status_code >= 400
        cookies = login_page.headers.get_list("set-cookie")
        cookies += response.headers.get_list("set-cookie")
        session = [c for c in cookies if "session" in c.lower()]
        assert session, cookies
        assert all("secure" in c.lower() for c in session)
        assert all("httponly" in c.lower() for c in session)
        assert all("samesite" in c.lower() for c in session)
    finally:
        server.stop()


@sqlite_only
def test_audit_log_records_actions(server: Server) -> None:
    with server.client() as client:
        job = server.submit(client, command="sleep 30")
        killed = client.post(f"/api/v1/jobs/{job['id']}/kill")
        assert killed.status_code == 200
    with httpx.Client(base_url=server.url, timeout=30) as browser:
        page = browser.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert token is not None
        browser.post(
            "/login",
            data={
                "username": "admin",
                "password": server.admin_password,
                "csrf_token": token.group(1),
            },
        )
        audit = browser.get("/audit")
        kills = browser.get("/audit", params={"action": "job.kill"})
    assert audit.status_code == 200
    assert "job.submit" in audit.text
    assert f"job {job['id']}" in audit.text
    assert "127.0.0.1" in audit.text
    assert "job.kill" in kills.text
    assert "job.submit" not in kills.text
