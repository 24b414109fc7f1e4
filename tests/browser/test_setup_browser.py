"""First-run setup in a real Chromium: the link the brain wrote creates the
first admin once, signs them in, and is refused after. Its own module, so
its brain (the module's `dashboard`) has no user yet."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from playwright.sync_api import Page, expect

from z4j.brain.http.auth import SETUP_LINK_FILE

if TYPE_CHECKING:
    from conftest import Dashboard  # tests/browser/conftest.py

expect.set_options(timeout=60_000)


def test_the_setup_link_creates_the_first_admin_once(
    page: Page, browser: Any, dashboard: Dashboard
) -> None:
    link = (dashboard.config.data_dir / SETUP_LINK_FILE).read_text().strip()
    code = re.search(r"#code=([\w-]+)$", link)
    assert code is not None, link
    page.goto(f"{dashboard.url}/login")
    expect(page.locator("#setup-hint")).to_be_visible()  # the login page says where to look

    page.goto(f"{dashboard.url}/setup#code={code[1]}")
    expect(page).to_have_url(f"{dashboard.url}/setup")  # the code left the address bar
    page.fill("#setup-name", "root")
    page.fill("#setup-password", "first admin password")
    page.fill("#setup-again", "first admin password")
    page.click("#setup-submit")
    expect(page).to_have_url(f"{dashboard.url}/")
    expect(page.locator("#whoami")).to_have_text("root · admin")
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")

    # The link is spent: another browser is told to sign in instead.
    other = browser.new_context()
    try:
        again = other.new_page()
        again.goto(f"{dashboard.url}/setup#code={code[1]}")
        expect(again.locator("#setup-error")).to_have_text(
            "This brain has users already: sign in instead."
        )
        expect(again.locator("#setup-submit")).to_be_disabled()
    finally:
        other.close()

    page.click("#sign-out")
    expect(page).to_have_url(f"{dashboard.url}/login")
    expect(page.locator("#setup-hint")).to_be_hidden()
    page.fill("#name", "root")
    page.fill("#password", "first admin password")
    page.click("#login-submit")
    expect(page).to_have_url(f"{dashboard.url}/")
    expect(page.locator("#whoami")).to_have_text("root · admin")
