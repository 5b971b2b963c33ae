"""The SSH key page and the inventory upload, driven in Chromium."""

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.support.server import Server
from tests.ui.conftest import DESKTOP, login, screenshot

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def keys_page(browser: Browser, tmp_path: Path) -> Iterator[tuple[Page, Server]]:
    """Log in to a server of the test's own, so its keys stay out of other tests."""
    server = Server(tmp_path / "server")
    server.start()
    context = browser.new_context(viewport=DESKTOP)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    page = context.new_page()
    login(page, server.url, "admin", server.admin_password)
    yield page, server
    context.close()
    server.stop()


def test_generate_key_and_copy_public_key(keys_page: tuple[Page, Server]) -> None:
    page, server = keys_page
    page.goto(f"{server.url}/keys")
    page.fill("#f-name", "ui-fleet")
    page.click("button:has-text('Generate')")
    row = page.locator("tr[data-key='ui-fleet']")
    expect(row).to_be_visible()
    public_key = server.cli("key", "public", "ui-fleet").stdout.strip()
    fingerprint = row.locator("[data-field='fingerprint']").inner_text()

    row.locator("button:has-text('Copy')").click()
    expect(page.get_by_text("Copied to the clipboard.")).to_be_visible()
    copied = page.evaluate("navigator.clipboard.readText()")
    screenshot(page, "keys")

    assert copied.strip() == public_key
    assert fingerprint.startswith("SHA256:")
    assert fingerprint in server.cli("key", "list").stdout
    expect(row.get_by_text("Default")).to_be_visible()


def test_import_encrypted_key(keys_page: tuple[Page, Server], tmp_path: Path) -> None:
    page, server = keys_page
    path = tmp_path / "id_ui"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "ui-secret", "-f", str(path)],
        check=True,
    )
    page.goto(f"{server.url}/keys")
    page.fill("#f-import_name", "ui-imported")
    page.fill("#f-private_key", path.read_text())
    page.click("button:has-text('Import')")
    missing = page.get_by_text("the private key is encrypted: give its passphrase")
    expect(missing).to_be_visible()

    page.fill("#f-private_key", path.read_text())
    page.fill("#f-passphrase", "ui-secret")
    page.click("button:has-text('Import')")
    row = page.locator("tr[data-key='ui-imported']")
    expect(row).to_be_visible()

    shown = row.locator("pre").inner_text()
    assert shown.split()[1] == path.with_suffix(".pub").read_text().split()[1]


def test_inventory_upload_dry_run(keys_page: tuple[Page, Server]) -> None:
    page, server = keys_page
    page.goto(f"{server.url}/workers")
    page.click("a:has-text('Inventory')")
    page.set_input_files("#f-file", str(ROOT / "inventory" / "example.yml"))
    page.check("input[name='dry_run']")
    page.click("button:has-text('Sync workers')")

    report = page.locator("[data-field='report']")
    expect(report).to_contain_text("would add worker encoder1")
    expect(report).to_contain_text("dry run, nothing was written")
    listing = server.cli("worker", "list").stdout
    assert "encoder1" not in listing
