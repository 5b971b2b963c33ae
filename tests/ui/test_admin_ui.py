"""Admin screens in the browser: users and API keys, workers, classes, settings."""

import json
import re
import subprocess

from playwright.sync_api import Page, expect

from tests.support.server import free_port
from tests.ui.conftest import Console, UiServer, screenshot


def confirm(page: Page) -> None:
    """Accept the page's confirmation dialog."""
    expect(page.locator("#confirm-dialog")).to_be_visible()
    page.click("#confirm-dialog [data-confirm-ok]")


def curl(*args: str) -> tuple[int, dict[str, object]]:
    """Run the real curl and return the HTTP status and the JSON body."""
    result = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    body, _, status = result.stdout.rpartition("\n")
    return int(status), json.loads(body)


def test_user_api_key_works_with_curl(
    admin_page: Page, ui_server: UiServer, console: Console
) -> None:
    page = admin_page
    page.goto(f"{ui_server.url}/users/new")
    page.fill("#f-name", "carol")
    page.fill("#f-password", "short")
    page.click("button:has-text('Create user')")
    expect(page.locator("#password-error")).to_contain_text("at least 8 characters")
    page.fill("#f-password", "carol-password-1")
    page.click("button:has-text('Create user')")
    expect(page.locator(".flash-ok")).to_contain_text("User carol created")

    page.fill("#f-label", "ci pipeline")
    page.click("button:has-text('Create API key')")
    key = page.locator("[data-testid='new-key']").inner_text().strip()
    assert key.startswith("jb_")
    screenshot(page, "api-key-created")

    status, answer = curl(
        "-X",
        "POST",
        f"{ui_server.url}/addJob",
        "-H",
        f"Authorization: Bearer {key}",
        "-d",
        '{"command": "echo from-curl", "wait": true}',
    )
    assert status == 200
    assert answer["result"] is True
    assert answer["stdout"] == "from-curl\n"
    status, job = curl(
        f"{ui_server.url}/api/v1/jobs/{answer['id']}",
        "-H",
        f"Authorization: Bearer {key}",
    )
    assert status == 200
    assert job["user"] == "carol"

    page.click("a:has-text('Done')")
    row = page.locator(f"tr[data-key='{key[:11]}']")
    expect(row).to_contain_text("ci pipeline")
    expect(row).to_contain_text("ago")
    row.locator("button:has-text('Revoke')").click()
    confirm(page)
    expect(page.locator(".flash-ok")).to_contain_text("revoked")
    expect(row).to_contain_text("Revoked")
    status, rejected = curl(
        f"{ui_server.url}/api/v1/jobs", "-H", f"Authorization: Bearer {key}"
    )
    assert status == 401
    assert rejected["error"] == "unauthorized"
    assert console.errors == []
    assert console.http_statuses() == [422]


def test_worker_add_test_drain_disable_delete(
    admin_page: Page, ui_server: UiServer, console: Console
) -> None:
    page = admin_page
    page.goto(f"{ui_server.url}/workers/new")
    page.fill("#f-name", "local")
    page.fill("#f-host", "127.0.0.1")
    page.click("button:has-text('Add worker')")
    expect(page.locator("#name-error")).to_contain_text("already exists")
    expect(page.locator("#f-name")).to_have_attribute("aria-invalid", "true")

    page.fill("#f-name", "nowhere")
    page.fill("#f-port", str(free_port()))
    page.fill("#f-max_jobs", "3")
    page.click("button:has-text('Add worker')")
    expect(page.locator(".flash-ok")).to_contain_text("Worker nowhere added")
    row = page.locator("tr[data-worker='nowhere']")
    expect(row).to_contain_text("0 / 3")
    expect(row.locator("[data-field='state']")).to_have_text("Offline", timeout=15_000)

    row.locator("button:has-text('Test')").click()
    expect(row.locator(".result[id^='test-']")).to_contain_text("connection failed")
    local = page.locator("tr[data-worker='local']")
    local.locator("button:has-text('Test')").click()
    expect(local.locator(".result[id^='test-']")).to_contain_text("connection works")

    row.locator("button:has-text('Drain')").click()
    confirm(page)
    expect(page.locator(".flash-ok")).to_contain_text("draining")
    row.locator("button:has-text('Resume')").click()
    expect(page.locator(".flash-ok")).to_contain_text("taking jobs again")
    row.locator("button:has-text('Disable')").click()
    confirm(page)
    expect(row.locator("[data-field='state']")).to_have_text("Disabled")
    row.locator("button:has-text('Enable')").click()
    expect(page.locator(".flash-ok")).to_contain_text("enabled")

    row.locator("a:has-text('Edit')").click()
    expect(page.locator("#f-max_jobs")).to_have_value("3")
    page.fill("#f-max_jobs", "")
    page.fill("#f-max_sessions", "0")
    page.click("button:has-text('Save worker')")
    expect(page.locator("#max_sessions-error")).to_contain_text("at least 1")
    page.fill("#f-max_sessions", "5")
    page.click("button:has-text('Save worker')")
    expect(page.locator(".flash-ok")).to_contain_text("Worker nowhere saved")
    expect(row).to_contain_text("0 / 4")
    screenshot(page, "workers")

    row.locator("button:has-text('Delete')").click()
    confirm(page)
    expect(page.locator(".flash-ok")).to_contain_text("Worker nowhere deleted")
    expect(row).to_have_count(0)
    assert console.errors == []
    assert console.http_statuses() == [409, 422]


def test_worker_class_rules(
    admin_page: Page, ui_server: UiServer, console: Console
) -> None:
    page = admin_page
    page.goto(f"{ui_server.url}/worker-classes")
    page.fill("#f-name", "gpu")
    page.fill("#f-default_max_jobs", "2")
    page.click("button:has-text('Create class')")
    expect(page.locator(".flash-ok")).to_contain_text("Worker class gpu created")
    page.fill("#f-name", "gpu")
    page.click("button:has-text('Create class')")
    expect(page.locator("#name-error")).to_contain_text("already exists")

    page.goto(f"{ui_server.url}/worker-classes")
    page.locator("tr[data-class='gpu'] a:has-text('Edit')").click()
    page.fill("#f-name", "gpu-large")
    page.fill("#f-default_max_jobs", "6")
    page.click("button:has-text('Save class')")
    expect(page.locator(".flash-ok")).to_contain_text("gpu-large saved")
    expect(page.locator("tr[data-class='gpu-large']")).to_contain_text("6")

    page.goto(f"{ui_server.url}/workers/new")
    page.fill("#f-name", "gpu-box")
    page.select_option("#f-transport", "local")
    page.select_option("#f-class_id", label="gpu-large (default 6 jobs)")
    page.click("button:has-text('Add worker')")
    expect(page.locator("tr[data-worker='gpu-box']")).to_contain_text("0 / 6")

    page.goto(f"{ui_server.url}/worker-classes")
    page.locator("tr[data-class='gpu-large'] button:has-text('Delete')").click()
    confirm(page)
    expect(page.locator(".flash-error")).to_contain_text("has 1 workers")
    expect(page.locator("tr[data-class='gpu-large']")).to_have_count(1)

    page.goto(f"{ui_server.url}/workers")
    page.locator("tr[data-worker='gpu-box'] button:has-text('Delete')").click()
    confirm(page)
    expect(page.locator(".flash-ok")).to_contain_text("Worker gpu-box deleted")
    page.goto(f"{ui_server.url}/worker-classes")
    page.locator("tr[data-class='gpu-large'] button:has-text('Delete')").click()
    confirm(page)
    expect(page.locator(".flash-ok")).to_contain_text("gpu-large deleted")
    expect(page.locator("tr[data-class='gpu-large']")).to_have_count(0)
    expect(
        page.locator("tr[data-class='default'] button:has-text('Delete')")
    ).to_have_count(0)
    assert console.errors == []
    assert console.http_statuses() == [409]


def test_settings_apply_to_running_server(
    admin_page: Page, ui_server: UiServer, console: Console
) -> None:
    page = admin_page
    page.goto(f"{ui_server.url}/settings")
    expect(page.locator("input[name='strategy'][value='round_robin']")).to_be_checked()
    page.fill("#f-liveness_interval_seconds", "0")
    page.click("button:has-text('Save settings')")
    expect(page.locator("#liveness_interval_seconds-error")).to_contain_text(
        "at least 1 s"
    )

    page.check("input[name='strategy'][value='least_loaded']")
    page.fill("#f-liveness_interval_seconds", "2")
    page.fill("#f-default_watchdog_seconds", "1")
    page.fill("#f-max_log_mib", "64")
    page.click("button:has-text('Save settings')")
    expect(page.locator(".flash-ok")).to_contain_text("Settings saved and applied")
    page.reload()
    expect(page.locator("input[name='strategy'][value='least_loaded']")).to_be_checked()
    expect(page.locator("#f-max_log_mib")).to_have_value("64")
    screenshot(page, "settings")

    # The running dispatcher uses the new default watchdog at once.
    api = ui_server.api()
    answer = api.post("/addJob", json={"command": "sleep 20", "wait": True}).json()
    assert answer["state"] == "timed_out"

    page.check("input[name='strategy'][value='round_robin']")
    page.fill("#f-default_watchdog_seconds", "0")
    page.fill("#f-liveness_interval_seconds", "1")
    page.click("button:has-text('Save settings')")
    expect(page.locator(".flash-ok")).to_contain_text("Settings saved")
    answer = api.post("/addJob", json={"command": "sleep 1.5", "wait": True}).json()
    assert answer["state"] == "succeeded"
    assert console.errors == []
    assert console.http_statuses() == [422]


def test_script_edit_rename_and_delete(
    admin_page: Page, ui_server: UiServer, console: Console
) -> None:
    page = admin_page
    page.goto(f"{ui_server.url}/scripts/new")
    page.fill("#f-name", "greeter")
    page.fill("#f-interpreter", "python3")
    page.fill("#f-body", "import sys\nprint('hi', *sys.argv[1:])\n")
    page.click("button:has-text('Create script')")
    expect(page.locator(".flash-ok")).to_contain_text("Script greeter saved")
    expect(page.locator(".gutter")).to_contain_text("2")

    page.fill("#f-name", "")
    page.click("button:has-text('Save script')")
    expect(page.locator("#name-error")).to_contain_text("Name is required")
    page.fill("#f-name", "greeter-renamed")
    page.locator("#f-body").press("Control+End")
    page.locator("#f-body").press("Enter")
    page.keyboard.type("print('bye')")
    page.locator("#f-body").press("Control+s")
    expect(page.locator(".flash-ok")).to_contain_text("Script greeter-renamed saved")

    page.fill("#f-params", "Ada")
    page.click("button:has-text('Run script')")
    page.wait_for_url(re.compile(r"/jobs/\d+$"))
    expect(page.locator("#log")).to_contain_text("hi Ada")
    expect(page.locator("#log")).to_contain_text("bye")
    expect(page.locator("[data-job-page] [data-field='state']")).to_have_text(
        "Succeeded"
    )

    page.goto(f"{ui_server.url}/scripts")
    row = page.locator("tr[data-script='greeter-renamed']")
    row.locator("button:has-text('Delete')").click()
    confirm(page)
    expect(page.locator(".flash-ok")).to_contain_text("greeter-renamed deleted")
    expect(row).to_have_count(0)
    assert console.errors == []
    assert console.http_statuses() == [422]
