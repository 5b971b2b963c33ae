"""GET /metrics: Prometheus text, guarded by metrics_token or an admin API key."""

from pathlib import Path

import httpx

from tests.support.server import Server

TOKEN = "metrics-secret-token"


def test_metrics_need_token_or_admin_key(tmp_path: Path) -> None:
    server = Server(tmp_path / "server", metrics_token=TOKEN)
    server.start()
    try:
        with server.client() as client:
            job = server.submit(client, command="echo metrics")
            server.wait_job(client, job["id"])
            with_key = client.get("/metrics")

        anonymous = httpx.get(f"{server.url}/metrics")
        wrong = httpx.get(
            f"{server.url}/metrics", headers={"Authorization": "Bearer wrong"}
        )
        with_token = httpx.get(
            f"{server.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
        )
    finally:
        server.stop()

    assert anonymous.status_code == 401
    assert wrong.status_code == 401
    assert with_key.status_code == 200
    assert with_token.status_code == 200

    text = with_token.text
    assert with_token.headers["content-type"].startswith("text/plain")
    assert 'jobbalancer_jobs{state="succeeded"} 1.0' in text
    assert 'jobbalancer_queue_length{worker_class="default"} 0.0' in text
    assert 'jobbalancer_worker_running_jobs{worker="local"}' in text
    assert 'jobbalancer_worker_free_slots{worker="local"}' in text
    assert "jobbalancer_dispatch_latency_seconds_count 1.0" in text
    assert "jobbalancer_job_duration_seconds_count 1.0" in text
    assert "jobbalancer_output_stored_bytes_total 8.0" in text
    assert "# TYPE jobbalancer_ssh_reconnects_total counter" in text


def test_metrics_public_without_token(tmp_path: Path) -> None:
    server = Server(tmp_path / "server")
    with server.config.open("a") as config:
        config.write("metrics_public = true\n")
    server.start()
    try:
        anonymous = httpx.get(f"{server.url}/metrics")
    finally:
        server.stop()
    assert anonymous.status_code == 200
    assert "jobbalancer_jobs" in anonymous.text
