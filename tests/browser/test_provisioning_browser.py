"""The dashboard's Projects and Agents pages in a real headless Chromium.

An agent created on the Agents page shows its configuration once; a real
z4j-bare agent (tests/agents/rotation_agent.py, its own process) started
with exactly that text connects and streams, and the page lists it live
with its version. Its token is rotated on the page through the grace: the
old agent streams on, one on the new configuration joins it, and when the
brain's clock passes the grace (this module's brain runs on a clock the
test moves: no sleeping through a grace) the old one is closed 4401 and
the page shows one worker left. Projects are created, their secret rotated
and archived, agents revoked; each destructive action waits for its
confirmation (and Cancel leaves things as they were).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from playwright.sync_api import Page, expect
from test_provisioning_api import HOUR, Clock
from test_rotation_bare import BareAgent

if TYPE_CHECKING:
    from conftest import Dashboard  # tests/browser/conftest.py

expect.set_options(timeout=60_000)
NOTHING = "\u2013"  # what the page shows for no value


@pytest.fixture(scope="module")
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def dashboard(
    serve_dashboard: Callable[..., AbstractContextManager[Dashboard]],
    tmp_path_factory: pytest.TempPathFactory,
    clock: Clock,
) -> Iterator[Dashboard]:
    """conftest's dashboard, but its brain runs on ``clock``."""
    with serve_dashboard(tmp_path_factory.mktemp("provisioning") / "data", clock=clock) as shown:
        yield shown


def sign_in(page: Page, dashboard: Dashboard) -> None:
    page.goto(f"{dashboard.url}/")
    page.fill("#token", dashboard.admin_token)
    page.click("#login-submit")
    expect(page).to_have_url(f"{dashboard.url}/")
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")


def api_get(dashboard: Dashboard, path: str) -> Any:
    request = urllib.request.Request(
        f"{dashboard.url}{path}", headers={"Authorization": f"Bearer {dashboard.admin_token}"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def config_of(page: Page) -> dict[str, str]:
    text = page.locator("#agent-shown-config").text_content() or ""
    return dict(line.split("=", 1) for line in text.splitlines())


def agent_row(page: Page, name: str) -> Any:
    return page.locator(f"#prov-agents-table tr[data-agent='{name}']")


def create_agent(page: Page, project: str, name: str) -> dict[str, str]:
    """On the Agents page: create one; the configuration it shows."""
    page.click("#nav a[data-view='agents']")
    page.select_option("#agent-project", project)
    page.fill("#agent-name", name)
    page.click("#agent-create")
    expect(page.locator("#agent-shown")).to_be_visible()
    env = config_of(page)
    assert env["Z4J_TOKEN"] == page.locator("#agent-shown-token").text_content()
    assert env["Z4J_HMAC_SECRET"] == page.locator("#agent-shown-secret").text_content()
    page.click("#agent-shown-dismiss")  # shown once: gone from the page
    expect(page.locator("#agent-shown")).to_be_hidden()
    assert page.locator("#agent-shown-config").text_content() == ""
    return env


def create_project(page: Page, name: str) -> None:
    page.click("#nav a[data-view='projects']")
    page.fill("#project-name", name)
    page.click("#project-create")
    expect(page.locator(f"#projects-table tr[data-project='{name}']")).to_be_visible()


def test_a_created_agents_configuration_connects_a_real_z4j_bare_agent(
    page: Page, dashboard: Dashboard, tmp_path: Path
) -> None:
    sign_in(page, dashboard)
    create_project(page, "payments")
    env = create_agent(page, "payments", "api")
    assert env["Z4J_BRAIN_URL"] == dashboard.url
    project = next(
        p for p in api_get(dashboard, "/api/v1/projects")["items"] if p["name"] == "payments"
    )
    assert env["Z4J_PROJECT_ID"] == project["id"]

    bare = BareAgent(env, 1_000_000, tmp_path / "bare")
    try:
        row = agent_row(page, "api")
        page.click("#prov-agents-refresh")
        expect(row.locator("[data-field='state']")).to_have_text("connected")
        expect(row.locator("[data-field='workers']")).to_have_text("1")
        expect(row.locator("[data-field='versions']")).not_to_have_text(NOTHING)
        expect(row.locator("[data-field='last-seen']")).not_to_have_text(NOTHING)

        # Revoke waits for its confirmation; Cancel leaves the agent be.
        row.locator("button[data-action='revoke']").click()
        expect(page.locator("#agent-confirm")).to_be_visible()
        expect(page.locator("#agent-confirm-text")).to_contain_text("Revoke the agent “api”")
        page.click("#agent-confirm-cancel")
        expect(page.locator("#agent-confirm")).to_be_hidden()
        expect(row.locator("[data-field='state']")).to_have_text("connected")
        row.locator("button[data-action='revoke']").click()
        page.click("#agent-confirm-go")
        expect(row.locator("[data-field='state']")).to_have_text("revoked")
        expect(row.locator("button")).to_have_count(0)
        page.click("#prov-agents-refresh")
        expect(row.locator("[data-field='workers']")).to_have_text("0")
    finally:
        bare.kill()


def test_rotating_a_token_through_its_grace(
    page: Page, dashboard: Dashboard, clock: Clock, tmp_path: Path
) -> None:
    sign_in(page, dashboard)
    create_project(page, "billing")
    env = create_agent(page, "billing", "worker")
    agents: list[BareAgent] = []
    try:
        old = BareAgent(env, 1_000_000, tmp_path / "old")
        agents.append(old)
        row = agent_row(page, "worker")
        page.click("#prov-agents-refresh")
        expect(row.locator("[data-field='state']")).to_have_text("connected")

        row.locator("button[data-action='rotate-token']").click()
        expect(page.locator("#agent-grace")).to_have_value("86400")
        page.fill("#agent-grace", str(HOUR))
        page.click("#agent-confirm-go")
        expect(page.locator("#agent-shown")).to_be_visible()
        moved = config_of(page)
        assert moved["Z4J_TOKEN"] != env["Z4J_TOKEN"]
        assert {k: v for k, v in moved.items() if k != "Z4J_TOKEN"} == {
            k: v for k, v in env.items() if k != "Z4J_TOKEN"
        }
        page.click("#agent-shown-dismiss")
        expect(row.locator("[data-field='grace']")).not_to_have_text(NOTHING)

        # In the grace both tokens work: the old agent streams on, the new joins it.
        dashboard.loop.run(old.stream_on, dashboard.config)
        new = BareAgent(moved, 2_000_000, tmp_path / "new")
        agents.append(new)
        dashboard.loop.run(new.stream_on, dashboard.config, 5)
        page.click("#prov-agents-refresh")
        expect(row.locator("[data-field='workers']")).to_have_text("2")

        clock.offset = HOUR + 1  # the grace is over: the old agent is closed 4401
        stats = dashboard.brain.stats
        expect_true(lambda: stats.agent_rejected["token_expired"] >= 1, page)
        page.click("#prov-agents-refresh")
        expect(row.locator("[data-field='workers']")).to_have_text("1")
        expect(row.locator("[data-field='grace']")).to_have_text(NOTHING)
        dashboard.loop.run(new.stream_on, dashboard.config)
    finally:
        clock.offset = 0
        for agent in agents:
            agent.kill()


def test_projects_are_created_rotated_and_archived_after_confirmation(
    page: Page, dashboard: Dashboard
) -> None:
    sign_in(page, dashboard)
    create_project(page, "legacy")
    row = page.locator("#projects-table tr[data-project='legacy']")
    expect(row.locator("[data-field='state']")).to_have_text("active")

    row.locator("button[data-action='rotate-secret']").click()
    expect(page.locator("#project-grace-label")).to_be_visible()
    page.fill("#project-grace", "60")
    page.click("#project-confirm-go")
    expect(page.locator("#secret-shown")).to_be_visible()
    secret = page.locator("#secret-shown-value").text_content()
    assert secret and len(secret) >= 40
    expect(row).to_contain_text("generation 1")
    page.click("#secret-shown-dismiss")
    expect(page.locator("#secret-shown")).to_be_hidden()

    row.locator("button[data-action='archive']").click()
    expect(page.locator("#project-grace-label")).to_be_hidden()
    page.click("#project-confirm-cancel")
    expect(row.locator("[data-field='state']")).to_have_text("active")
    row.locator("button[data-action='archive']").click()
    page.click("#project-confirm-go")
    expect(row.locator("[data-field='state']")).to_have_text("archived")
    # An archived project is no longer offered for new agents.
    page.click("#nav a[data-view='agents']")
    expect(page.locator("#agent-project option[value='legacy']")).to_have_count(0)


def expect_true(check: Any, page: Page) -> None:
    """Wait (bounded) until ``check()``; the page keeps running meanwhile."""
    for _ in range(1200):
        if check():
            return
        page.wait_for_timeout(50)
    raise AssertionError("not within 60 s")
