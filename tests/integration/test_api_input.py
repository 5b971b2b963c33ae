"""Bad input gets a 4xx JSON error that names the problem."""

import pytest

from tests.support.server import Server

CASES = [
    ({"command": "true", "apiKey": "wrong"}, 401, "apiKey"),
    ({}, 422, "command"),
    ({"scriptId": 999}, 422, "scriptId"),
    ({"scriptId": "abc"}, 422, "scriptId"),
    ({"command": "true", "watchdog": -1}, 422, "watchdog"),
    ({"command": "true", "watchdog": "soon"}, 422, "watchdog"),
    ({"command": "true", "workerClassId": "nope"}, 422, "workerClassId"),
    ({"command": "true", "workerClassId": 999}, 422, "workerClassId"),
    ({"command": "true", "params": [["nested"]]}, 422, "params"),
    ({"command": "   "}, 422, "command"),
    ({"command": "true", "watchdog": True}, 422, "watchdog"),
    ({"command": "echo a\x00b"}, 422, "command"),
    ({"command": "true", "params": ["x"]}, 422, "params"),
]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_bad_submissions_named(server: Server) -> None:
    with server.client() as client:
        for body, status, field in CASES:
            response = client.post("/addJob", json=body)
            assert response.status_code == status, (body, response.text)
            answer = response.json()
            assert answer["field"] == field, (body, answer)
            assert answer["detail"], body
            assert answer["result"] is False


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_body_not_json_or_too_big(server: Server) -> None:
    with server.client() as client:
        not_json = client.post("/addJob", content=b"command=true")
        array = client.post("/addJob", content=b"[1, 2]")
        huge = client.post(
            "/addJob", content=b'{"command": "' + b"x" * (10 << 20) + b'"}'
        )
        no_key = client.post(
            "/addJob", json={"command": "true"}, headers={"Authorization": ""}
        )
    assert not_json.status_code == 400
    assert "JSON" in not_json.json()["detail"]
    assert array.status_code == 400
    assert huge.status_code == 413
    assert "larger than" in huge.json()["detail"]
    assert no_key.status_code == 401


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_original_payload_forms(server: Server) -> None:
    with server.client() as client:
        plain = client.post(
            "/addJob",
            json={
                "command": 'echo "Hello World"',
                "watchdog": 10,
                "workerClassId": "1",
                "need_realtime": False,
                "userName": "admin",
                "apiKey": server.api_key,
            },
            headers={"Authorization": ""},
        )
        answer = plain.json()
        assert plain.status_code == 200, plain.text
        assert answer["result"] is True
        assert answer["state"] in ("running", "waiting")
        job = server.wait_job(client, answer["id"])
        wrong_user = client.post(
            "/addJob",
            json={
                "command": "true",
                "userName": "mallory",
                "apiKey": server.api_key,
            },
            headers={"Authorization": ""},
        )
    assert job["state"] == "succeeded"
    assert job["worker_class"] == "default"
    assert wrong_user.status_code == 401
    assert wrong_user.json()["field"] == "userName"


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_job_endpoints_errors(server: Server) -> None:
    with server.client() as client:
        missing = client.get("/api/v1/jobs/424242")
        bad_state = client.get("/api/v1/jobs", params={"state": "dancing"})
        job = server.submit(client, command="sleep 5")
        running_delete = client.delete(f"/api/v1/jobs/{job['id']}")
        client.post(f"/api/v1/jobs/{job['id']}/kill")
        restarted = client.post(f"/api/v1/jobs/{job['id']}/restart").json()
        client.post(f"/api/v1/jobs/{restarted['id']}/kill")
        deleted = client.delete(f"/api/v1/jobs/{job['id']}")
        gone = client.get(f"/api/v1/jobs/{job['id']}")
        anonymous = client.get("/api/v1/jobs", headers={"Authorization": ""})
    assert missing.status_code == 404
    assert bad_state.status_code == 422
    assert running_delete.status_code == 409
    assert restarted["restarted_from"] == job["id"]
    assert deleted.status_code == 200
    assert gone.status_code == 404
    assert anonymous.status_code == 401


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_docs_served_offline(server: Server) -> None:
    with server.client() as client:
        document = client.get("/openapi.json")
        bundle = client.get("/docs-assets/swagger-ui-bundle.js")
        anonymous_doc = client.get("/openapi.json", headers={"Authorization": ""})
        anonymous_page = client.get(
            "/docs", headers={"Authorization": ""}, follow_redirects=False
        )
    assert document.status_code == 200
    assert "/addJob" in document.json()["paths"]
    assert bundle.status_code == 200
    assert anonymous_doc.status_code == 401
    assert anonymous_page.status_code == 303
    assert anonymous_page.headers["location"].startswith("/login")


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_nested_json_and_reused_key(server: Server) -> None:
    nested = b'{"x":' + b"[" * 5000 + b"]" * 5000 + b"}"
    with server.client() as client:
        deep = client.post("/addJob", content=nested)
        first = client.post(
            "/addJob", json={"command": "true"}, headers={"Idempotency-Key": "k"}
        )
        different = client.post(
            "/addJob", json={"command": "false"}, headers={"Idempotency-Key": "k"}
        )
    assert deep.status_code == 400
    assert first.status_code == 200
    assert different.status_code == 409
    assert different.json()["field"] == "idempotencyKey"


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_warning_when_class_has_no_worker(server: Server) -> None:
    server.cli("worker", "disable", "local")
    with server.client() as client:
        server.wait_worker(client, "local", "disabled")
        queued = client.post("/addJob", json={"command": "true"}).json()
        rejected = client.post(
            "/addJob", json={"command": "true", "need_realtime": True}
        ).json()
    assert queued["state"] == "waiting"
    assert "no enabled worker" in queued["warning"]
    assert rejected["state"] == "occupied"
    assert "no enabled worker" in rejected["warning"]
