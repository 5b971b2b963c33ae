"""Fixtures for the browser tests: one server, one Chromium, logged-in pages.

Screenshots go to test-output/ui/ (ignored by git). The dashboard and job page
screenshots are also copied to docs/screenshots/ for the documentation.
"""

import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Page,
    StorageState,
    ViewportSize,
    sync_playwright,
)

from tests.support.server import Server

ROOT = Path(__file__).resolve().parents[2]
OUTPUT_DIR = ROOT / "test-output" / "ui"
DOCS_SCREENSHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DESKTOP: ViewportSize = {"width": 1366, "height": 900}
PHONE: ViewportSize = {"width": 390, "height": 844}
CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')
HTTP_STATUS = re.compile(r"the server responded with a status of (\d{3})")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test in this folder as a UI test."""
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.ui)


@dataclass
class UiServer:
    """The server under test, with its admin credentials."""

    server: Server
    first_login_html: str

    @property
    def url(self) -> str:
        """Return the server's base URL."""
        return self.server.url

    @property
    def admin_password(self) -> str:
        """Return the admin password printed on first start."""
        return self.server.admin_password

    def api(self) -> httpx.Client:
        """Return a client that sends the admin API key."""
        return self.server.client()


@pytest.fixture(scope="session")
def ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UiServer]:
    """Start one server for the UI tests and read the login page before any login."""
    server = Server(tmp_path_factory.mktemp("ui") / "server")
    server.start()
    assert server.admin_password, "serve printed no admin password on first start"
    first_login_html = httpx.get(f"{server.url}/login", timeout=30).text
    yield UiServer(server, first_login_html)
    server.stop()


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """Launch Debian's Chromium once for the whole run."""
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def admin_state(browser: Browser, ui_server: UiServer) -> StorageState:
    """Log in as admin once and return the browser storage state."""
    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    login(page, ui_server.url, "admin", ui_server.admin_password)
    state = context.storage_state()
    context.close()
    return state


@dataclass
class Console:
    """What pages logged to the console, and the dialogs they opened.

    Chromium logs every 4xx or 5xx response, a form sent back with a 422 too, so
    those land in ``http_errors`` and every other error in ``errors``.
    """

    errors: list[str] = field(default_factory=list)
    http_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def watch(self, page: Page) -> None:
        """Record the page's console errors, uncaught errors and dialogs."""
        page.on("console", lambda message: self._console(page, message))
        page.on("pageerror", lambda error: self.errors.append(f"{page.url}: {error}"))
        page.on("dialog", self._dialog)

    def http_statuses(self) -> list[int]:
        """Return the HTTP status codes of the failed requests, in order."""
        found = (HTTP_STATUS.search(text) for text in self.http_errors)
        return [int(match.group(1)) for match in found if match]

    def _console(self, page: Page, message: Any) -> None:
        if message.type != "error":
            return
        text = f"{page.url}: {message.text}"
        if HTTP_STATUS.search(message.text):
            self.http_errors.append(text)
        else:
            self.errors.append(text)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()


@pytest.fixture
def console() -> Console:
    """Collect console errors of the test's pages."""
    return Console()


@pytest.fixture
def admin_context(
    browser: Browser, admin_state: StorageState
) -> Iterator[BrowserContext]:
    """Open a browser context logged in as admin."""
    context = browser.new_context(viewport=DESKTOP, storage_state=admin_state)
    yield context
    context.close()


@pytest.fixture
def admin_page(admin_context: BrowserContext, console: Console) -> Page:
    """Open a page logged in as admin whose console is watched."""
    page = admin_context.new_page()
    console.watch(page)
    return page


def login(page: Page, url: str, name: str, password: str) -> None:
    """Log in through the login form and wait for the dashboard."""
    page.goto(f"{url}/login")
    page.fill("#f-username", name)
    page.fill("#f-password", password)
    page.click("button:has-text('Log in')")
    page.wait_for_url("**/dashboard")


def screenshot(page: Page, name: str, *, docs: bool = False) -> Path:
    """Save a full-page screenshot under test-output/ui, and in docs when asked."""
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUTPUT_DIR / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if docs:
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_SCREENSHOTS / f"{name}.png")
    return path


def ui_client(url: str, name: str, password: str) -> httpx.Client:
    """Return an HTTP client with a browser session, logged in through the form."""
    client = httpx.Client(base_url=url, follow_redirects=False, timeout=60)
    token = csrf_token(client.get("/login").text)
    response = client.post(
        "/login",
        data={"username": name, "password": password, "csrf_token": token},
    )
    assert response.status_code == 303, response.text
    return client


def csrf_token(html: str) -> str:
    """Return the CSRF token from a page's meta tag."""
    match = CSRF_META.search(html)
    assert match, "page has no csrf-token meta tag"
    return match.group(1)


def post_form(client: httpx.Client, path: str, **fields: str) -> httpx.Response:
    """Post a form with the session's CSRF token, as the page would."""
    token = csrf_token(client.get("/dashboard").text)
    return client.post(path, data={"csrf_token": token, **fields})
