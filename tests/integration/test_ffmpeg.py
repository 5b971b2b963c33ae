"""ffmpeg transcodes submitted with curl run on two SSH workers at once."""

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.server import Server

pytestmark = [
    pytest.mark.parametrize("backend", ["sqlite"], indirect=True),
    pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed"),
]


def curl_add_job(server: Server, payload: dict[str, object]) -> dict[str, object]:
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "-X",
            "POST",
            f"{server.url}/addJob",
            "-H",
            "Content-Type: application/json",
            "-H",
            f"Authorization: Bearer {server.api_key}",
            "-d",
            json.dumps(payload),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


def test_transcodes_on_two_workers(
    server: Server, ssh_hosts: list, tmp_path: Path
) -> None:
    server.cli("worker", "disable", "local")
    for index, host in enumerate(ssh_hosts[:2]):
        server.add_ssh_worker(host, f"enc{index}", max_jobs=1)
    outputs = [tmp_path / f"clip{n}.mp4" for n in range(2)]
    with server.client() as client:
        for index in range(2):
            server.wait_worker(client, f"enc{index}", "online")
        ids = []
        for out in outputs:
            command = (
                "ffmpeg -nostdin -hide_banner -y -f lavfi -i testsrc=duration=3:"
                "size=320x240:rate=25 -c:v mpeg4 -q:v 5 " + str(out)
            )
            answer = curl_add_job(server, {"command": command, "watchdog": 120})
            assert answer["result"] is True
            ids.append(answer["id"])
        started = time.monotonic()
        jobs = [server.wait_job(client, int(job_id), timeout=180) for job_id in ids]
        logs = [
            client.get(f"/api/v1/jobs/{job_id}/log", params={"stream": "stderr"}).text
            for job_id in ids
        ]
    assert [job["state"] for job in jobs] == ["succeeded", "succeeded"], jobs
    assert {job["worker"] for job in jobs} == {"enc0", "enc1"}
    assert time.monotonic() - started < 180
    for out, log in zip(outputs, logs, strict=True):
        assert out.exists()
        probe = subprocess.run(
            [
                "ffprobe",
                "-v",
                "error",
                "-show_entries",
                "stream=codec_name,width",
                "-of",
                "json",
                str(out),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        stream = json.loads(probe.stdout)["streams"][0]
        assert stream["codec_name"] == "mpeg4"
        assert stream["width"] == 320
        assert "Output #0" in log
