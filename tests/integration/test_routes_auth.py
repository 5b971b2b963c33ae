"""Walk the app's route table: every route checks who is asking.

A route counts as protected when its dependencies include a user, admin or
agent check. Routes open to anyone are listed in PUBLIC by hand, so a new route
without a check fails this test until someone decides it is public.
"""

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute, iter_route_contexts

from orchestrator import config
from orchestrator.api import agent as agent_api
from orchestrator.api import deps
from orchestrator.app import create_app
from orchestrator.ui import common
from tests.support.server import Server

pytestmark = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)

PUBLIC = {
    ("GET", "/healthz"),
    ("GET", "/login"),
    ("POST", "/login"),
    # Redirects to /login without a session, checked below like a page.
    ("GET", "/docs"),
    ("GET", "/"),
    # The metrics route checks its own token or an admin key.
    ("GET", "/metrics"),
}
# Routes that check the caller in their own body instead of a dependency; the
# walk still sends them an anonymous request.
SELF_CHECKED = {
    ("POST", "/addJob"),
    ("POST", "/logout"),
}
USER_CHECKS = {deps.current_user, common.page_user}
ADMIN_CHECKS = {deps.admin_user, common.admin_page_user}
AGENT_CHECKS = {agent_api.current_agent}


def dependency_calls(route: APIRoute) -> set[Any]:
    found: set[Any] = set()
    stack = [route.dependant]
    while stack:
        dependant = stack.pop()
        if dependant.call is not None:
            found.add(dependant.call)
        stack.extend(dependant.dependencies)
    return found


def app_routes(tmp_path: Path) -> list[tuple[str, str, str]]:
    """Return (method, path, kind) for every route; kind is the check it has."""
    settings = config.Settings(data_dir=tmp_path)
    app = create_app(settings)
    routes = []
    # FastAPI wraps included routers; the route contexts carry the effective
    # route with its prefix and the router's dependencies.
    for context in iter_route_contexts(app.routes):
        route = context.route
        if not isinstance(route, APIRoute):
            continue
        calls = dependency_calls(route)
        for method in sorted(route.methods):
            if method == "HEAD":
                continue
            if calls & ADMIN_CHECKS:
                kind = "admin"
            elif calls & AGENT_CHECKS:
                kind = "agent"
            elif calls & USER_CHECKS:
                kind = "user"
            elif (method, route.path) in SELF_CHECKED:
                kind = "user"
            else:
                kind = "public"
            routes.append((method, route.path, kind))
    return routes


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


def is_page(path: str) -> bool:
    return not path.startswith("/api/") and path not in ("/addJob", "/openapi.json")


def session_client(server: Server, user: str, password: str) -> httpx.Client:
    client = httpx.Client(base_url=server.url, timeout=30, follow_redirects=False)
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token is not None
    answer = client.post(
        "/login",
        data={"username": user, "password": password, "csrf_token": token.group(1)},
    )
    assert answer.status_code == 303, answer.text
    return client


def test_every_route_checks_caller(server: Server, tmp_path: Path) -> None:
    routes = app_routes(tmp_path / "walk")
    unclassified = [
        (method, path)
        for method, path, kind in routes
        if kind == "public" and (method, path) not in PUBLIC
    ]
    assert unclassified == [], f"routes without an auth check: {unclassified}"
    assert len(routes) > 40

    env = dict(server.env(), SUB_PW="submitter-pass-1")
    import subprocess

    from tests.support.server import JOBBALANCER

    added = subprocess.run(
        [JOBBALANCER, "user", "add", "subby", "--password-env", "SUB_PW"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    sub_key = added.stdout.strip().splitlines()[-1]
    anonymous = httpx.Client(base_url=server.url, timeout=30, follow_redirects=False)
    submitter_api = httpx.Client(
        base_url=server.url,
        timeout=30,
        follow_redirects=False,
        headers={"Authorization": f"Bearer {sub_key}"},
    )
    submitter_page = session_client(server, "subby", "submitter-pass-1")
    problems = []
    for method, path, kind in routes:
        if (method, path) in PUBLIC and kind == "public":
            continue
        url = concrete(path)
        body = {} if method in ("POST", "PUT", "PATCH") else None
        answer = anonymous.request(method, url, json=body)
        if is_page(path) and kind != "agent":
            ok = answer.status_code in (302, 303, 307) and answer.headers.get(
                "location", ""
            ).startswith("/login")
            ok = ok or answer.status_code in (401, 403)
        else:
            ok = answer.status_code in (401, 403)
        if not ok:
            problems.append(f"anonymous {method} {path}: {answer.status_code}")
        if kind == "admin":
            client = submitter_page if is_page(path) else submitter_api
            answer = client.request(method, url, json=body)
            if answer.status_code != 403:
                problems.append(f"submitter {method} {path}: {answer.status_code}")
    for client in (anonymous, submitter_api, submitter_page):
        client.close()
    assert problems == []
