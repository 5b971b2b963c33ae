"""Sessions, roles, CSRF tokens and login throttling, checked over HTTP."""

import re

import httpx

from tests.ui.conftest import UiServer, csrf_token, post_form, ui_client

PAGES = [
    "/dashboard",
    "/jobs",
    "/jobs/1",
    "/workers",
    "/worker-classes",
    "/users",
    "/scripts",
    "/settings",
    "/logout",
]


def create_user(
    admin: httpx.Client, name: str, password: str, role: str = "submitter"
) -> int:
    """Create a user through the users form and return its id."""
    response = post_form(
        admin,
        "/users/new",
        name=name,
        password=password,
        role=role,
        allow_commands="on",
        classes="*",
    )
    assert response.status_code == 303, response.text
    return int(response.headers["location"].rsplit("/", 1)[1])


def test_first_start_hint_until_first_login(ui_server: UiServer) -> None:
    assert "jobbalancer serve" in ui_server.first_login_html
    assert 'data-testid="first-start"' in ui_server.first_login_html
    ui_client(ui_server.url, "admin", ui_server.admin_password).close()
    later = httpx.get(f"{ui_server.url}/login", timeout=30).text
    assert 'data-testid="first-start"' not in later


def test_pages_redirect_to_login_without_session(ui_server: UiServer) -> None:
    with httpx.Client(base_url=ui_server.url, timeout=30) as client:
        for path in PAGES:
            response = client.get(path)
            assert response.status_code == 303, path
            assert response.headers["location"].startswith("/login"), path
        assert client.get("/login").status_code == 200
        root = client.get("/")
        assert root.status_code == 303
        assert root.headers["location"] == "/dashboard"


def test_login_redirect_keeps_target(ui_server: UiServer) -> None:
    with httpx.Client(base_url=ui_server.url, timeout=30) as client:
        response = client.get("/jobs?state=failed")
        assert response.headers["location"] == "/login?next=%2Fjobs%3Fstate%3Dfailed"
        token = csrf_token(client.get(response.headers["location"]).text)
        login = client.post(
            "/login",
            data={
                "username": "admin",
                "password": ui_server.admin_password,
                "csrf_token": token,
                "next": "/jobs?state=failed",
            },
        )
        assert login.headers["location"] == "/jobs?state=failed"


def test_login_rejects_foreign_redirect_target(ui_server: UiServer) -> None:
    with httpx.Client(base_url=ui_server.url, timeout=30) as client:
        token = csrf_token(client.get("/login").text)
        login = client.post(
            "/login",
            data={
                "username": "admin",
                "password": ui_server.admin_password,
                "csrf_token": token,
                "next": "//evil.example/",
            },
        )
        assert login.headers["location"] == "/dashboard"


def test_failed_logins_throttled_per_user(ui_server: UiServer) -> None:
    admin = ui_client(ui_server.url, "admin", ui_server.admin_password)
    create_user(admin, "throttled", "right-password-1")
    with httpx.Client(base_url=ui_server.url, timeout=30) as client:
        for _ in range(5):
            token = csrf_token(client.get("/login").text)
            failed = client.post(
                "/login",
                data={
                    "username": "throttled",
                    "password": "wrong",
                    "csrf_token": token,
                },
            )
            assert failed.status_code == 401
            assert "Wrong user name or password" in failed.text
        token = csrf_token(client.get("/login").text)
        blocked = client.post(
            "/login",
            data={
                "username": "throttled",
                "password": "right-password-1",
                "csrf_token": token,
            },
        )
        assert blocked.status_code == 429
        assert "Too many failed logins" in blocked.text
    # Other users on the same address may still log in.
    ui_client(ui_server.url, "admin", ui_server.admin_password).close()


def test_form_without_csrf_token_rejected(ui_server: UiServer) -> None:
    admin = ui_client(ui_server.url, "admin", ui_server.admin_password)
    missing = admin.post(
        "/worker-classes", data={"name": "no-token", "default_max_jobs": "2"}
    )
    wrong = admin.post(
        "/worker-classes",
        data={"name": "no-token", "default_max_jobs": "2", "csrf_token": "forged"},
    )
    assert missing.status_code == 403
    assert wrong.status_code == 403
    assert "form expired" in wrong.text
    classes = ui_server.api().get("/api/v1/classes").json()["classes"]
    assert "no-token" not in [c["name"] for c in classes]


def test_api_calls_from_session_need_csrf_header(ui_server: UiServer) -> None:
    admin = ui_client(ui_server.url, "admin", ui_server.admin_password)
    listed = admin.get("/api/v1/jobs")
    assert listed.status_code == 200
    assert "jobs" in listed.json()
    rejected = admin.post("/api/v1/jobs/999999/kill")
    assert rejected.status_code == 403
    assert rejected.json()["error"] == "csrf_failed"
    token = csrf_token(admin.get("/dashboard").text)
    allowed = admin.post("/api/v1/jobs/999999/kill", headers={"X-CSRF-Token": token})
    assert allowed.status_code == 404


def test_submitter_sees_only_own_jobs(ui_server: UiServer) -> None:
    admin = ui_client(ui_server.url, "admin", ui_server.admin_password)
    create_user(admin, "sam", "sam-password-1")
    api = ui_server.api()
    admin_job = api.post("/addJob", json={"command": "echo admin-only"}).json()["id"]
    sam = ui_client(ui_server.url, "sam", "sam-password-1")
    submitted = post_form(sam, "/jobs", command="echo sam-was-here")
    assert submitted.status_code == 303
    own_job = submitted.headers["location"]
    assert sam.get(own_job).status_code == 200
    assert sam.get(f"/jobs/{admin_job}").status_code == 404
    listing = sam.get("/jobs").text
    assert "sam-was-here" in listing
    assert "admin-only" not in listing
    for admin_page in ("/users", "/workers", "/worker-classes", "/settings"):
        assert sam.get(admin_page).status_code == 403, admin_page
    assert 'href="/users"' not in sam.get("/dashboard").text


def test_disabled_user_loses_session(ui_server: UiServer) -> None:
    admin = ui_client(ui_server.url, "admin", ui_server.admin_password)
    user_id = create_user(admin, "dora", "dora-password-1")
    dora = ui_client(ui_server.url, "dora", "dora-password-1")
    assert dora.get("/dashboard").status_code == 200
    disabled = post_form(admin, f"/users/{user_id}/disable")
    assert disabled.status_code == 303
    response = dora.get("/dashboard")
    assert response.status_code == 303
    assert response.headers["location"].startswith("/login")


def test_password_change_ends_sessions(ui_server: UiServer) -> None:
    admin = ui_client(ui_server.url, "admin", ui_server.admin_password)
    user_id = create_user(admin, "pat", "pat-password-1")
    pat = ui_client(ui_server.url, "pat", "pat-password-1")
    changed = post_form(
        admin,
        f"/users/{user_id}",
        role="submitter",
        classes="*",
        password="pat-password-2",
    )
    assert changed.status_code == 303
    assert pat.get("/dashboard").status_code == 303
    ui_client(ui_server.url, "pat", "pat-password-2").close()


def test_last_admin_cannot_be_demoted(ui_server: UiServer) -> None:
    admin = ui_client(ui_server.url, "admin", ui_server.admin_password)
    match = re.search(
        r'data-user="admin">\s*<td><a href="/users/(\d+)"', admin.get("/users").text
    )
    assert match, "admin row not found on /users"
    admin_id = int(match.group(1))
    response = post_form(admin, f"/users/{admin_id}", role="submitter", classes="*")
    assert response.status_code == 409
    assert "no enabled admin" in response.text
    assert admin.get("/users").status_code == 200
