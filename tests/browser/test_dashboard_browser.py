"""The dashboard in a real headless Chromium, against a real brain and agent.

Each test signs in through the login page as an operator would; what it
then waits for must arrive over /ws/dashboard (the page never reloads: a
marker set on ``window`` after sign-in is checked at the end).
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from playwright.sync_api import Page, WebSocketRoute, expect

if TYPE_CHECKING:
    from conftest import Dashboard  # tests/browser/conftest.py

# Bounds on failures only (each passes as soon as the page shows it): generous.
expect.set_options(timeout=60_000)


def sign_in(page: Page, dashboard: Dashboard) -> None:
    page.goto(f"{dashboard.url}/")
    expect(page).to_have_url(f"{dashboard.url}/login")
    page.fill("#token", dashboard.admin_token)
    page.click("#login-submit")
    expect(page).to_have_url(f"{dashboard.url}/")
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    page.evaluate("window.__z4jNoReload = true")


# Records every state the connection pill goes through (some last only ms).
WATCH_CONNECTION = """
window.__z4jConn = [];
const pill = document.getElementById("conn");
new MutationObserver(() => window.__z4jConn.push(pill.dataset.state)).observe(
  pill, { attributes: true, attributeFilter: ["data-state"] });
"""


def assert_no_reload(page: Page) -> None:
    assert page.evaluate("window.__z4jNoReload === true"), "the page reloaded"


def api_get(dashboard: Dashboard, path: str) -> Any:
    request = urllib.request.Request(
        f"{dashboard.url}{path}", headers={"Authorization": f"Bearer {dashboard.admin_token}"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def test_sign_in_then_instances_table_shows_this_instance(page: Page, dashboard: Dashboard) -> None:
    page.goto(f"{dashboard.url}/")
    expect(page).to_have_url(f"{dashboard.url}/login")

    page.fill("#token", "z4j-not-a-token")
    page.click("#login-submit")
    expect(page.locator("#login-error")).to_have_text("This token was not accepted.")
    expect(page).to_have_url(f"{dashboard.url}/login")

    page.fill("#token", dashboard.admin_token)
    page.click("#login-submit")
    expect(page).to_have_url(f"{dashboard.url}/")
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")

    instance_id = str(dashboard.brain.addresses.instance_id)
    row = page.locator(f'#instances-table tbody tr[data-id="{instance_id}"]')
    expect(row).to_be_visible()
    expect(row).to_contain_text(instance_id)
    expect(row).to_contain_text(str(os.getpid()))  # the brain runs in this process
    expect(row.locator(".pill")).to_have_text("live")
    expect(row.locator(".tag.you")).to_have_text("this page")  # the socket's hello
    expect(page.locator("#served-by")).to_have_text(f"via {instance_id[:8]}")

    # The agent and its worker, connected.
    agent_row = page.locator(f'#agents-table tr.agent-row[data-agent="{dashboard.agent_id}"]')
    expect(agent_row).to_contain_text("checkout")
    expect(agent_row).to_contain_text("1 of 1 live")
    worker = page.locator('#agents-table tr.worker-row[data-worker="checkout-1"]')
    expect(worker.locator(".pill")).to_have_text("connected")


def test_live_feed_updates_when_a_payload_is_ingested(page: Page, dashboard: Dashboard) -> None:
    sign_in(page, dashboard)
    marker = uuid.uuid4().hex[:12]
    kind = f"deploy.finished.{marker[:4]}"
    dashboard.ingest([{"t": kind, "service": "checkout", "marker": marker}])

    item = page.locator(f'#feed li[data-kind="{kind}"]')
    expect(item).to_have_count(1)
    expect(item).to_contain_text(marker)
    expect(item.locator(".src")).to_have_text("tcp")
    expect(page.locator(f'#kinds li[data-kind="{kind}"]')).to_contain_text("1")

    # And an event from the agent, through /ws/agent and the same buffer.
    dashboard.emit({"kind": "task.succeeded", "task_id": f"t-{marker}", "engine": "trio"})
    from_agent = page.locator("#feed li", has_text=f"t-{marker}")
    expect(from_agent).to_have_count(1)
    expect(from_agent.locator(".src")).to_have_text("agent")
    expect(from_agent).to_contain_text("shop / checkout")
    assert_no_reload(page)


def test_command_sent_from_the_form_changes_state_live(page: Page, dashboard: Dashboard) -> None:
    sign_in(page, dashboard)
    gate = uuid.uuid4().hex[:8]
    dashboard.gate(gate)

    expect(page.locator("#cmd-agent")).to_have_value(dashboard.agent_id)
    page.fill("#cmd-action", "hold")
    page.fill("#cmd-params", json.dumps({"gate": gate}))
    page.fill("#cmd-timeout", "30")
    page.click("#cmd-send")

    row = page.locator("#commands-table tbody tr", has=page.locator("td", has_text="hold")).first
    expect(row).to_be_visible()
    command_id = row.get_attribute("data-id")
    assert command_id
    row = page.locator(f'#commands-table tbody tr[data-id="{command_id}"]')
    # The worker holds it: delivered, not finished.
    expect(row).to_have_attribute("data-state", "dispatched")
    expect(row).to_contain_text("checkout-1")
    expect(row.get_by_role("button", name="Cancel")).to_be_visible()

    dashboard.release(gate)
    expect(row).to_have_attribute("data-state", "completed")
    expect(row.locator(".pill")).to_have_text("completed")
    expect(row).to_contain_text(f'"released":"{gate}"')
    expect(row.get_by_role("button", name="Cancel")).to_have_count(0)
    assert api_get(dashboard, f"/api/v1/commands/{command_id}")["state"] == "completed"

    # A bad parameters field is caught before anything is sent.
    page.fill("#cmd-params", "{not json")
    page.click("#cmd-send")
    expect(page.locator("#cmd-error")).to_contain_text("not valid JSON")
    assert_no_reload(page)


def test_reconnects_after_the_socket_drops_and_reloads_what_it_missed(
    page: Page, dashboard: Dashboard
) -> None:
    """The page's socket goes through Playwright, which can drop it and can
    lose messages on the way, as a dying connection does."""
    sockets: list[WebSocketRoute] = []
    losing = {"on": False}
    lost: list[str] = []

    def through(ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()

        def relay(message: str | bytes) -> None:
            if losing["on"]:
                lost.append(message if isinstance(message, str) else message.decode())
            else:
                ws.send(message)

        server.on_message(relay)
        sockets.append(ws)

    page.route_web_socket(re.compile(r"/ws/dashboard(\?|$)"), through)  # ?csrf=...
    sign_in(page, dashboard)
    assert len(sockets) == 1
    before = uuid.uuid4().hex[:12]
    dashboard.ingest([{"t": "before.drop", "marker": before}])
    expect(page.locator("#feed li", has_text=before)).to_have_count(1)  # live

    losing["on"] = True
    marker = uuid.uuid4().hex[:12]
    dashboard.ingest([{"t": "while.away", "marker": marker}])
    deadline = time.monotonic() + 60
    while not api_get(dashboard, "/api/v1/events?kind=while.away&limit=10")["items"]:
        assert time.monotonic() < deadline, "the event was not stored within 60 s"
        time.sleep(0.05)
    # The hub's message about it (its kinds are summed, never cut) was lost.
    while not any('"while.away"' in message for message in lost):
        assert time.monotonic() < deadline, "the hub said nothing of the event within 60 s"
        page.wait_for_timeout(50)  # Playwright delivers the socket's messages meanwhile
    expect(page.locator("#feed li", has_text=marker)).to_have_count(0)

    page.evaluate(WATCH_CONNECTION)
    sockets[0].close(code=1001, reason="going away")
    losing["on"] = False
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    seen = page.evaluate("window.__z4jConn")
    states = [state for i, state in enumerate(seen) if i == 0 or seen[i - 1] != state]
    assert states[:3] == ["retry", "connecting", "live"], seen
    assert len(sockets) == 2
    expect(page.locator("#feed li", has_text=marker)).to_have_count(1)  # reloaded from the API
    # Seen live, then again in the reloaded list: still one row.
    expect(page.locator("#feed li", has_text=before)).to_have_count(1)
    assert_no_reload(page)


def test_sign_out_returns_to_login(page: Page, dashboard: Dashboard) -> None:
    sign_in(page, dashboard)
    page.click("#sign-out")
    expect(page).to_have_url(f"{dashboard.url}/login")
    page.goto(f"{dashboard.url}/")
    expect(page).to_have_url(f"{dashboard.url}/login")


def test_rates_update_live_and_screenshot(
    page: Page, dashboard: Dashboard, screenshot_path: Path
) -> None:
    """Steady traffic, a second agent, a few commands; then the screenshot
    (docs/img/dashboard.png with Z4J_WRITE_SCREENSHOT=1, else a temporary file)."""
    dashboard.add_agent(project="ops", agent="billing", workers=["billing-1", "billing-2"])
    dashboard.stop_worker("billing-2")  # shows as disconnected
    sign_in(page, dashboard)
    instance_id = str(dashboard.brain.addresses.instance_id)
    row = page.locator(f'#instances-table tr[data-id="{instance_id}"]')

    with dashboard.traffic():
        page.select_option("#cmd-agent", dashboard.agent_id)
        for action, parameters in [("ping", {}), ("hold", {"gate": "shot"})]:
            page.fill("#cmd-action", action)
            page.fill("#cmd-params", json.dumps(parameters))
            page.click("#cmd-send")
            page.wait_for_timeout(1500)
        expect(page.locator('#commands-table tr[data-state="completed"]')).not_to_have_count(0)
        expect(page.locator('#commands-table tr[data-state="dispatched"]')).not_to_have_count(0)
        # The instance's rates come from its heartbeats over the socket.
        page.wait_for_function(
            "cell => parseFloat(cell.textContent.replace(/,/g, '')) > 0",
            arg=row.locator('td[data-col="ingest"]').element_handle(),
        )
        expect(row.locator(".share")).to_contain_text("100%")
        page.wait_for_timeout(8000)  # enough history for the charts

        # The whole page in one frame (a full-page capture repeats the sticky bar).
        height = page.evaluate("document.documentElement.scrollHeight")
        page.set_viewport_size({"width": 1440, "height": height})
        page.mouse.move(0, 0)
        page.wait_for_timeout(1500)  # a sample after the resize; flashes faded
        screenshot_path.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot_path))
    dashboard.release("shot")
    data = screenshot_path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 50_000
    assert_no_reload(page)
