"""Jobs in the browser: run from the scripts page, live log, kill, progress."""

import re
import time
from pathlib import Path

from playwright.sync_api import Page, expect

from tests.ui.conftest import Console, UiServer, post_form, screenshot, ui_client

TICKER = """\
echo "param: $1"
echo "param: $2"
echo '<script>alert(1)</script>'
i=0
while [ $i -lt 200 ]; do
  i=$((i + 1))
  echo "tick $i"
  echo "warning $i" >&2
  echo "progress=$((i / 2))%"
  sleep 0.2
done
"""
STATE_BADGE = "[data-job-page] [data-field='state']"


def confirm(page: Page) -> None:
    """Accept the page's confirmation dialog."""
    expect(page.locator("#confirm-dialog")).to_be_visible()
    page.click("#confirm-dialog [data-confirm-ok]")


def job_id_from(url: str) -> int:
    """Return the job id at the end of a job page URL."""
    match = re.search(r"/jobs/(\d+)$", url)
    assert match, f"not a job page: {url}"
    return int(match.group(1))


def last_tick(page: Page) -> int:
    """Return the number of the last "tick N" line the job page shows."""
    texts = page.locator("#log .line.out .text").all_inner_texts()
    ticks = [int(t.split()[1]) for t in texts if re.fullmatch(r"tick \d+", t)]
    return max(ticks)


def test_script_job_live_log_and_kill(
    admin_page: Page, ui_server: UiServer, console: Console
) -> None:
    page = admin_page
    page.goto(f"{ui_server.url}/scripts/new")
    page.fill("#f-name", "ticker")
    page.fill("#f-interpreter", "/bin/sh")
    page.fill("#f-body", TICKER)
    page.click("button:has-text('Create script')")
    expect(page.locator(".flash-ok")).to_contain_text("Script ticker saved")

    page.fill("#f-params", "alpha\nbeta gamma")
    page.click("button:has-text('Run script')")
    page.wait_for_url(re.compile(r"/jobs/\d+$"))
    job_id = job_id_from(page.url)
    expect(page.locator(".flash-ok")).to_contain_text(f"Job {job_id} is running")

    log = page.locator("#log")
    expect(log.locator(".line.out .text", has_text="param: alpha")).to_be_visible()
    expect(log.locator(".line.out .text", has_text="param: beta gamma")).to_be_visible()
    expect(log.locator(".line.err .stream").first).to_have_text("err")
    expect(log.locator(".line.err .text").first).to_contain_text("warning")
    expect(page.locator(STATE_BADGE)).to_have_text("Running")

    # The log keeps filling while the job runs, without a reload.
    page.evaluate("window.sameDocument = true")
    expect(log.locator(".line.out .text", has_text="tick 2")).to_have_count(1)
    seen_tick = last_tick(page)
    expect(
        log.locator(".line.out .text", has_text=f"tick {seen_tick + 5}")
    ).to_have_count(1)
    expect(page.locator(STATE_BADGE)).to_have_text("Running")
    expect(
        page.locator("[data-job-page] [data-progress] .progress-text")
    ).to_contain_text("% · ")

    # Job output is text, never markup.
    expect(log.locator(".text", has_text="<script>alert(1)</script>")).to_have_count(1)
    assert page.locator("#log script").count() == 0
    screenshot(page, "job-detail", docs=True)

    page.click("[data-when='active'] button:has-text('Kill')")
    confirm(page)
    expect(page.locator(STATE_BADGE)).to_have_text("Killed", timeout=20_000)
    expect(page.locator(".toast")).to_contain_text(f"Job {job_id} was killed")
    expect(page.locator("[data-when='active'] button:has-text('Kill')")).to_be_hidden()
    expect(
        page.locator("[data-when='final'] button:has-text('Delete')")
    ).to_be_visible()
    assert page.evaluate("window.sameDocument") is True
    screenshot(page, "job-killed")

    job = ui_server.api().get(f"/api/v1/jobs/{job_id}").json()
    assert job["state"] == "killed"
    assert job["params"] == ["alpha", "beta gamma"]
    assert console.dialogs == []
    assert console.errors == []


def test_ffmpeg_progress_in_list_and_page(
    admin_page: Page, ui_server: UiServer, console: Console, tmp_path: Path
) -> None:
    source = tmp_path / "source.mp4"
    command = (
        "ffmpeg -hide_banner -nostdin -y -loglevel error -f lavfi "
        f"-i testsrc=duration=8:size=160x120:rate=10 -c:v mpeg4 {source} && "
        f"ffmpeg -hide_banner -nostdin -re -i {source} -progress pipe:1 -f null -"
    )
    api = ui_server.api()
    job_id = api.post("/addJob", json={"command": command}).json()["id"]

    page = admin_page
    page.goto(f"{ui_server.url}/jobs")
    row = page.locator(f"tr[data-job-id='{job_id}']")
    expect(row.locator("[data-progress] .progress-text")).to_contain_text(
        "left", timeout=20_000
    )
    screenshot(page, "jobs-progress")

    page.goto(f"{ui_server.url}/jobs/{job_id}")
    text = page.locator("[data-job-page] [data-progress] .progress-text")
    expect(text).to_contain_text("left", timeout=10_000)
    percent_match = re.match(r"([\d.]+)%", text.inner_text())
    assert percent_match, "progress text has no percentage"
    percent = float(percent_match.group(1))
    assert 0 < percent <= 100
    expect(page.locator(STATE_BADGE)).to_have_text("Succeeded", timeout=30_000)
    expect(page.locator("[data-job-page] [data-progress]")).to_be_hidden()
    expect(page.locator("#log")).to_contain_text("progress=end")
    assert console.errors == []


def test_restart_and_delete_with_confirmation(
    admin_page: Page, ui_server: UiServer, console: Console
) -> None:
    api = ui_server.api()
    answer = api.post("/addJob", json={"command": "echo restart-me", "wait": True})
    old_id = answer.json()["id"]
    page = admin_page
    page.goto(f"{ui_server.url}/jobs/{old_id}")
    expect(page.locator(STATE_BADGE)).to_have_text("Succeeded")
    expect(page.locator("#log")).to_contain_text("restart-me")

    page.click("button:has-text('Restart')")
    confirm(page)
    page.wait_for_url(re.compile(rf"/jobs/(?!{old_id}$)\d+$"))
    new_id = job_id_from(page.url)
    expect(page.locator(".toast")).to_contain_text(f"restarted as job {new_id}")
    expect(page.locator("#log")).to_contain_text("restart-me")
    expect(page.locator(STATE_BADGE)).to_have_text("Succeeded")

    page.goto(f"{ui_server.url}/jobs/{old_id}")
    page.click("[data-when='final'] button:has-text('Delete')")
    page.click("#confirm-dialog [data-confirm-cancel]")
    expect(page).to_have_url(re.compile(rf"/jobs/{old_id}$"))
    page.click("[data-when='final'] button:has-text('Delete')")
    confirm(page)
    page.wait_for_url(re.compile(r"/jobs$"))
    expect(page.locator(".toast")).to_contain_text(f"Job {old_id} was deleted")
    assert api.get(f"/api/v1/jobs/{old_id}").status_code == 404
    assert api.get(f"/api/v1/jobs/{new_id}").json()["restarted_from"] == old_id
    assert console.errors == []


def test_actions_without_script_ask_on_a_page(ui_server: UiServer) -> None:
    api = ui_server.api()
    job_id = api.post("/addJob", json={"command": "sleep 30"}).json()["id"]
    admin = ui_client(ui_server.url, "admin", ui_server.admin_password)
    question = post_form(admin, f"/jobs/{job_id}/kill")
    assert question.status_code == 200
    assert f"Kill job {job_id}?" in question.text
    assert 'name="confirmed" value="1"' in question.text
    assert api.get(f"/api/v1/jobs/{job_id}").json()["state"] == "running"
    killed = post_form(admin, f"/jobs/{job_id}/kill", confirmed="1")
    assert killed.status_code == 303
    assert api.get(f"/api/v1/jobs/{job_id}").json()["state"] == "killed"
    again = post_form(admin, f"/jobs/{job_id}/kill", confirmed="1")
    assert again.status_code == 409
    assert "already ended" in again.text


def test_list_search_sort_and_escaping(
    admin_page: Page, ui_server: UiServer, console: Console
) -> None:
    api = ui_server.api()
    marker = f"needle-{time.monotonic_ns()}"
    hostile = f"echo '<img src=x onerror=alert(2)>' {marker}"
    job_id = api.post("/addJob", json={"command": hostile, "wait": True}).json()["id"]
    api.post("/addJob", json={"command": "exit 4", "wait": True})

    page = admin_page
    page.goto(f"{ui_server.url}/jobs")
    page.fill("#f-q", marker)
    page.click("button:has-text('Filter')")
    rows = page.locator("tr[data-job-id]")
    expect(rows).to_have_count(1)
    expect(rows.first.locator(".cmd")).to_have_text(hostile)
    assert page.locator("tr[data-job-id] img").count() == 0

    page.goto(f"{ui_server.url}/jobs?state=failed")
    expect(page.locator("tr[data-job-id] [data-field='state']").first).to_have_text(
        "Failed"
    )
    page.click("th a:has-text('ID')")
    expect(page).to_have_url(re.compile(r"order=asc"))
    ids = [
        int(x)
        for x in page.locator("tr[data-job-id]").evaluate_all(
            "rows => rows.map(row => row.dataset.jobId)"
        )
    ]
    assert ids == sorted(ids)

    page.goto(f"{ui_server.url}/jobs/{job_id}")
    expect(page.locator("[data-testid='command']")).to_have_text(hostile)
    expect(page.locator("#log")).to_contain_text("<img src=x onerror=alert(2)>")
    assert console.dialogs == []
    assert console.errors == []


def test_run_command_form_names_invalid_field(
    admin_page: Page, ui_server: UiServer, console: Console
) -> None:
    page = admin_page
    page.goto(f"{ui_server.url}/jobs")
    page.click("summary:has-text('Run a command')")
    page.fill("#f-command", "   ")
    page.click("button:has-text('Run command')")
    expect(page.locator("#command-error")).to_contain_text("Command is empty")
    expect(page.locator("#f-command")).to_have_attribute("aria-invalid", "true")
    page.fill("#f-command", "echo typed-in-the-form")
    page.click("button:has-text('Run command')")
    page.wait_for_url(re.compile(r"/jobs/\d+$"))
    expect(page.locator("#log")).to_contain_text("typed-in-the-form")
    assert console.errors == []
    assert console.http_statuses() == [422]


def test_dashboard_charts_show_jobs(ui_server: UiServer) -> None:
    api = ui_server.api()
    api.post("/addJob", json={"command": "true", "wait": True})
    admin = ui_client(ui_server.url, "admin", ui_server.admin_password)
    page = admin.get("/dashboard").text
    assert 'aria-label="Jobs per day"' in page
    assert 'class="seg-ok"' in page
    assert 'aria-label="Success rate per worker"' in page
    assert re.search(r'class="label"[^>]*>local</text>', page)
