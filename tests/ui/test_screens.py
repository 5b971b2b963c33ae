"""Every screen opens without console errors, on a laptop and on a phone."""

import re

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Page,
    StorageState,
    ViewportSize,
    expect,
)

from tests.ui.conftest import DESKTOP, PHONE, Console, UiServer, screenshot

# (screenshot name, path, text the screen shows)
SCREENS = [
    ("dashboard", "/dashboard", "Jobs per day"),
    ("jobs", "/jobs", "Search"),
    ("workers", "/workers", "Add a worker"),
    ("worker-new", "/workers/new", "Add a worker"),
    ("worker-classes", "/worker-classes", "New class"),
    ("users", "/users", "Create a user"),
    ("user-new", "/users/new", "Create a user"),
    ("scripts", "/scripts", "Scripts"),
    ("script-new", "/scripts/new", "New script"),
    ("settings", "/settings", "Distribution strategy"),
    ("logout", "/logout", "Log out?"),
]


@pytest.fixture(scope="module")
def sample_job(ui_server: UiServer) -> int:
    """Run a job with output on both streams, for the job screen."""
    api = ui_server.api()
    command = "echo 'compressing frames'; echo 'disk almost full' >&2; echo done"
    answer = api.post("/addJob", json={"command": command, "wait": True})
    return int(answer.json()["id"])


def visit(page: Page, console: Console, url: str, text: str) -> None:
    """Open a screen and check that it shows ``text`` and logged no error."""
    page.goto(url)
    expect(page.locator("main")).to_contain_text(text)
    page.wait_for_load_state("networkidle")
    assert console.errors == [], url
    assert console.http_errors == [], url


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["laptop", "phone"])
def test_screens_open_without_errors(
    browser: Browser,
    admin_state: StorageState,
    ui_server: UiServer,
    sample_job: int,
    viewport: ViewportSize,
) -> None:
    suffix = "" if viewport is DESKTOP else "-phone"
    context: BrowserContext = browser.new_context(
        viewport=viewport,
        storage_state=admin_state,
    )
    page = context.new_page()
    console = Console()
    console.watch(page)
    screens = [*SCREENS, ("job", f"/jobs/{sample_job}", "Output")]
    for name, path, text in screens:
        visit(page, console, f"{ui_server.url}{path}", text)
        if name == "job":
            expect(page.locator("#log-status")).to_have_text("Ended")
            expect(page.locator("#log .line.err")).to_contain_text("disk almost full")
        screenshot(page, f"{name}{suffix}", docs=name == "dashboard" and not suffix)
    page.goto(f"{ui_server.url}/users")
    page.locator("tr[data-user] a").first.click()
    expect(page.locator("main")).to_contain_text("API keys")
    screenshot(page, f"user-edit{suffix}")
    page.goto(f"{ui_server.url}/worker-classes")
    page.locator("tr[data-class='default'] a:has-text('Edit')").click()
    expect(page.locator("main")).to_contain_text("Edit class default")
    screenshot(page, f"worker-class-edit{suffix}")
    assert console.errors == []
    assert console.http_errors == []
    assert console.dialogs == []
    context.close()


def test_login_and_not_found_screens(browser: Browser, ui_server: UiServer) -> None:
    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    console = Console()
    console.watch(page)
    visit(page, console, f"{ui_server.url}/login", "Log in")
    screenshot(page, "login")
    page.fill("#f-username", "admin")
    page.fill("#f-password", "not the password")
    page.click("button:has-text('Log in')")
    expect(page.locator("#password-error")).to_have_text("Wrong user name or password.")
    expect(page.locator("#f-password")).to_have_attribute("aria-invalid", "true")
    page.fill("#f-password", ui_server.admin_password)
    page.click("button:has-text('Log in')")
    page.wait_for_url(re.compile(r"/dashboard$"))

    page.goto(f"{ui_server.url}/jobs/987654")
    expect(page.locator("main h1")).to_have_text("Not found")
    expect(page.locator("main")).to_contain_text("Job 987654 not found.")
    screenshot(page, "not-found")

    page.goto(f"{ui_server.url}/logout")
    page.click("main button:has-text('Log out')")
    page.wait_for_url(re.compile(r"/login$"))
    expect(page.locator(".flash-ok")).to_contain_text("You are logged out")
    assert console.errors == []
    assert console.http_statuses() == [401, 404]
    context.close()
