"""Accounts in a real Chromium: sign in and out with a name and password, an
admin creating a user (then disabling them) and a personal token (shown
once, used, listed with its last use, revoked)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

from playwright.sync_api import Page, expect

if TYPE_CHECKING:
    from conftest import Dashboard  # tests/browser/conftest.py

expect.set_options(timeout=60_000)

PASSWORD = "a long enough password"


def api(dashboard: Dashboard, method: str, path: str, body: Any = None, token: str = "") -> Any:
    """A bearer request (the fixture's legacy admin token unless ``token``)."""
    request = urllib.request.Request(
        f"{dashboard.url}/api/v1{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "Authorization": f"Bearer {token or dashboard.admin_token}",
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def status_of(dashboard: Dashboard, path: str, token: str) -> int:
    try:
        api(dashboard, "GET", path, token=token)
    except urllib.error.HTTPError as exc:
        return exc.code
    return 200


def sign_in_with_password(page: Page, dashboard: Dashboard, name: str) -> None:
    page.goto(f"{dashboard.url}/login")
    page.fill("#name", name)
    page.fill("#password", PASSWORD)
    page.click("#login-submit")
    expect(page).to_have_url(f"{dashboard.url}/")
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")


def test_sign_in_with_a_password_and_out(page: Page, dashboard: Dashboard) -> None:
    api(dashboard, "POST", "/users", {"name": "vera", "password": PASSWORD, "role": "viewer"})
    page.goto(f"{dashboard.url}/login")
    page.fill("#name", "vera")
    page.fill("#password", "not the password")
    page.click("#login-submit")
    expect(page.locator("#login-error")).to_have_text("Unknown name or wrong password.")
    expect(page).to_have_url(f"{dashboard.url}/login")

    sign_in_with_password(page, dashboard, "vera")
    expect(page.locator("#whoami")).to_have_text("vera · viewer")
    expect(page.locator("#nav-users")).to_be_hidden()  # not an admin
    page.click("#sign-out")
    expect(page).to_have_url(f"{dashboard.url}/login")
    page.goto(f"{dashboard.url}/")
    expect(page).to_have_url(f"{dashboard.url}/login")


def test_an_admin_creates_a_user_and_a_token(page: Page, dashboard: Dashboard) -> None:
    api(dashboard, "POST", "/users", {"name": "ada", "password": PASSWORD, "role": "admin"})
    sign_in_with_password(page, dashboard, "ada")

    page.click("#nav-users")
    expect(page.locator("#view-users")).to_be_visible()
    page.fill("#user-name", "bob")
    page.fill("#user-password", PASSWORD)
    page.select_option("#user-role", "operator")
    page.click("#user-create")
    row = page.locator('#users-table tr[data-user="bob"]')
    expect(row).to_contain_text("operator")
    expect(row.locator(".user-state")).to_have_text("active")
    row.get_by_role("button", name="Disable").click()
    expect(row.locator(".user-state")).to_have_text("disabled")
    users = {u["name"]: u for u in api(dashboard, "GET", "/users")["items"]}
    assert users["bob"]["role"] == "operator" and users["bob"]["disabled"] is True

    page.click('#nav a[data-view="tokens"]')
    expect(page.locator("#view-tokens")).to_be_visible()
    page.fill("#token-name", "ci")
    page.select_option("#token-scope", "read")
    page.fill("#token-days", "30")
    page.click("#token-create")
    expect(page.locator("#token-secret-box")).to_be_visible()
    secret = page.locator("#token-secret").text_content() or ""
    assert secret.startswith("z4j_pat_"), secret
    row = page.locator('#tokens-table tr[data-token="ci"]')
    expect(row.locator(".token-used")).to_have_text("never")
    assert status_of(dashboard, "/projects", secret) == 200
    assert status_of(dashboard, "/users", secret) == 403  # a read token, whoever owns it

    # Shown once: the page read again lists it with its last use, not its secret.
    page.click('#nav a[data-view="overview"]')
    page.click('#nav a[data-view="tokens"]')
    expect(page.locator("#token-secret-box")).to_be_hidden()
    expect(row.locator(".token-used")).not_to_have_text("never")
    assert secret not in page.content()

    row.get_by_role("button", name="Revoke").click()
    expect(row.locator(".token-state")).to_have_text("revoked")
    assert status_of(dashboard, "/projects", secret) == 401
