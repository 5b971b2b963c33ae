"""Commands and output with awkward content either work or get a clear error."""

from pathlib import Path

from tests.integration.test_ssh_jobs import read_log, use_ssh_worker
from tests.support.server import Server


def test_megabyte_command_runs(server: Server, ssh_hosts: list) -> None:
    use_ssh_worker(server, ssh_hosts[0])
    filler = "# " + "y" * (1 << 20) + "\n"
    with server.client() as client:
        answer = server.submit(
            client, command=filler + "echo long-ok", wait=True, waitTimeout=60
        )
    assert answer["state"] == "succeeded", answer
    assert answer["stdout"] == "long-ok\n"


def test_unicode_and_metacharacters(server: Server, ssh_hosts: list) -> None:
    use_ssh_worker(server, ssh_hosts[0])
    text = "héllo wörld 日本語 🎬 $HOME `id` \"q\" 'q' \\ ; | & > < * ?"
    command = "printf '%s\\n' " + "'" + text.replace("'", "'\\''") + "'"
    with server.client() as client:
        answer = server.submit(client, command=command, wait=True, waitTimeout=30)
    assert answer["state"] == "succeeded", answer
    assert read_log(server, answer["id"], "stdout").decode() == text + "\n"


def test_invalid_utf8_output_kept(server: Server, ssh_hosts: list) -> None:
    use_ssh_worker(server, ssh_hosts[0])
    with server.client() as client:
        answer = server.submit(
            client, command="printf '\\377\\376\\000x'", wait=True, waitTimeout=30
        )
    assert answer["state"] == "succeeded"
    assert read_log(server, answer["id"], "stdout") == b"\xff\xfe\x00x"


def test_many_params_work_or_refused(
    server: Server, ssh_hosts: list, tmp_path: Path
) -> None:
    use_ssh_worker(server, ssh_hosts[0])
    script = tmp_path / "count.sh"
    script.write_text('echo "$#"\n')
    script_id = server.cli(
        "script", "add", "count", "--interpreter", "/bin/sh", "--file", str(script)
    ).stdout.strip()
    with server.client() as client:
        fits = server.submit(
            client,
            scriptId=script_id,
            params=[str(n) for n in range(50_000)],
            wait=True,
            waitTimeout=60,
        )
        too_many = client.post(
            "/addJob",
            json={"scriptId": script_id, "params": ["x"] * 200_000},
        )
    assert fits["state"] == "succeeded", fits
    assert fits["stdout"] == "50000\n"
    assert too_many.status_code == 422
    assert too_many.json()["field"] == "params"
    assert "ARG_MAX" in too_many.json()["detail"]
