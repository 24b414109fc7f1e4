"""The dashboard's OpAMP pages in a real headless Chromium: the fleet, one
agent and its configuration editor, and rollouts.

The agents are raw ``AgentToServer`` protobufs sent to ``POST /v1/opamp``
with a project's OpAMP token (tests/test_opamp_http.py's helpers), so each
test says exactly what an agent reports and when: a configuration pushed
from the page is "applied" only once the test's agent says so. Each test
marks its agents' service names with a fresh marker and narrows the fleet
to them with the search, so tests sharing the module's brain do not see
each other's agents.

The rollouts API belongs to another piece of work: where this brain does
not serve it the page must say so; its rendering is checked against the
API's documented shapes, served by the browser's own request routing.
"""

from __future__ import annotations

import functools
import json
import re
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from playwright.sync_api import Page, expect

from z4j.protocol.opamp import AgentCapability
from z4j.protocol.opamp import opamp_pb2 as pb

if TYPE_CHECKING:
    from conftest import Dashboard  # tests/browser/conftest.py

pytest.importorskip("opentelemetry._opamp", reason="tests/test_opamp_http.py needs it")
from test_opamp_http import full_report, opamp_token, post

expect.set_options(timeout=60_000)  # bounds failures only
# What must come over the socket: under it the page reads the API again every
# 30 s (app.js POLL_MS); a live change takes well under a second.
LIVE_MS = 15_000

CAPABLE = (
    AgentCapability.REPORTS_STATUS
    | AgentCapability.REPORTS_HEALTH
    | AgentCapability.ACCEPTS_REMOTE_CONFIG
    | AgentCapability.REPORTS_REMOTE_CONFIG
    | AgentCapability.REPORTS_EFFECTIVE_CONFIG
)
COLLECTOR = "receivers:\n  otlp: {}\nexporters:\n  debug: {}\n"


class OpampAgent:
    """One agent of a project, speaking raw protobufs to the test's brain."""

    def __init__(self, dashboard: Dashboard, token: str, service: str, **attributes: Any) -> None:
        self.dashboard = dashboard
        self.token = token
        self.uid = uuid.uuid4().bytes
        self.seq = 0
        self.service = service
        self.attributes = attributes

    @property
    def hex(self) -> str:
        return self.uid.hex()

    def send(self, message: pb.AgentToServer) -> None:
        message.instance_uid = self.uid
        message.sequence_num = self.seq
        self.seq += 1
        reply = self.dashboard.loop.run(
            post, self.dashboard.brain.addresses.http, message.SerializeToString(), self.token
        )
        assert reply.status == 200, reply

    def report(
        self,
        *,
        healthy: bool = True,
        effective: dict[str, str] | None = None,
        non_identifying: dict[str, Any] | None = None,
    ) -> None:
        """The full state: description, health (with an unhealthy exporter), config."""
        message = full_report(self.uid, **{"service.name": self.service, **self.attributes})
        message.capabilities = int(CAPABLE)
        message.health.healthy = healthy
        message.health.status = "running" if healthy else "degraded"
        for key, value in (non_identifying or {}).items():
            attribute = message.agent_description.non_identifying_attributes.add(key=key)
            attribute.value.string_value = value
        for name, body in (effective or {}).items():
            message.effective_config.config_map.config_map[name].CopyFrom(
                pb.AgentConfigFile(body=body.encode(), content_type="application/yaml")
            )
        self.send(message)

    def config_status(self, config_hash: str, status: Any, error: str = "") -> None:
        message = pb.AgentToServer()
        message.remote_config_status.CopyFrom(
            pb.RemoteConfigStatus(
                last_remote_config_hash=bytes.fromhex(config_hash),
                status=status,
                error_message=error,
            )
        )
        self.send(message)

    def disconnect(self) -> None:
        self.send(pb.AgentToServer(agent_disconnect=pb.AgentDisconnect()))


def new_agent(dashboard: Dashboard, project: str, service: str, **attributes: Any) -> OpampAgent:
    token = dashboard.loop.run(functools.partial(opamp_token, dashboard.config, project))
    return OpampAgent(dashboard, token, service, **attributes)


def sign_in(page: Page, dashboard: Dashboard) -> None:
    page.goto(f"{dashboard.url}/")
    expect(page).to_have_url(f"{dashboard.url}/login")
    page.fill("#token", dashboard.admin_token)
    page.click("#login-submit")
    expect(page).to_have_url(f"{dashboard.url}/")
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    page.evaluate("window.__z4jNoReload = true")


def assert_no_reload(page: Page) -> None:
    assert page.evaluate("window.__z4jNoReload === true"), "the page reloaded"


def api(dashboard: Dashboard, path: str) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"{dashboard.url}/api/v1{path}",
        headers={"Authorization": f"Bearer {dashboard.admin_token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def wait_for(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 60
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within 60 s"
        time.sleep(0.05)


def marker() -> str:
    return uuid.uuid4().hex[:10]


def open_fleet(page: Page, search: str) -> None:
    page.click('#nav a[data-view="fleet"]')
    expect(page.locator("#view-fleet")).to_be_visible()
    expect(page.locator('#nav a[data-view="fleet"]')).to_have_attribute("aria-current", "page")
    page.fill("#fl-q", search)


def row(page: Page, agent: OpampAgent) -> Any:
    return page.locator(f'#fleet-table tbody tr[data-uid="{agent.hex}"]')


def test_the_fleet_lists_agents_with_their_health_filters_them_and_updates_live(
    page: Page, dashboard: Dashboard
) -> None:
    m = marker()
    web = new_agent(dashboard, "edge", f"web-{m}", **{"service.version": "1.2.0"})
    web.report(non_identifying={"host.name": f"host-{m}-a"})
    db = new_agent(dashboard, "edge", f"db-{m}")
    db.report(healthy=False, non_identifying={"host.name": f"host-{m}-b"})
    db.disconnect()
    other = new_agent(dashboard, "edge-eu", f"queue-{m}")
    other.report()

    sign_in(page, dashboard)
    open_fleet(page, m)
    rows = page.locator("#fleet-table tbody tr")
    expect(rows).to_have_count(3)
    # By service name: db, queue, web.
    assert rows.evaluate_all("rs => rs.map(r => r.dataset.uid)") == [db.hex, other.hex, web.hex]
    w = row(page, web)
    expect(w.locator('[data-col="service"]')).to_have_text(f"web-{m}")
    expect(w.locator('[data-col="uid"]')).to_have_text(web.hex)
    expect(w.locator('[data-col="project"]')).to_have_text("edge")
    expect(w.locator('[data-col="online"] .pill')).to_have_text("online")
    expect(w.locator('[data-col="health"] .pill')).to_have_text("healthy")
    expect(w.locator('[data-col="health"]')).to_contain_text("running")
    expect(w.locator('[data-col="transport"]')).to_have_text("http")
    expect(w.locator('[data-col="config"]')).to_have_text("none")
    d = row(page, db)
    expect(d.locator('[data-col="online"] .pill')).to_have_text("offline")
    expect(d.locator('[data-col="health"] .pill')).to_have_text("unhealthy")
    expect(d.locator('[data-col="health"]')).to_contain_text("degraded")

    # Online or offline; the search reaches attributes and the uid.
    page.select_option("#fl-online", "offline")
    expect(rows).to_have_count(1)
    expect(d).to_be_visible()
    page.select_option("#fl-online", "online")
    expect(rows).to_have_count(2)
    page.select_option("#fl-online", "")
    page.fill("#fl-q", f"host-{m}-a")
    expect(rows).to_have_count(1)
    expect(w).to_be_visible()
    page.fill("#fl-q", "service.version=1.2.0")
    expect(w).to_be_visible()
    page.fill("#fl-q", other.hex)
    expect(rows).to_have_count(1)
    expect(row(page, other)).to_be_visible()
    # One project: the brain is asked for it.
    page.fill("#fl-q", m)
    page.select_option("#fl-project", "edge-eu")
    expect(rows).to_have_count(1)
    expect(row(page, other).locator('[data-col="project"]')).to_have_text("edge-eu")
    page.click("#fl-clear")
    page.fill("#fl-q", m)
    expect(rows).to_have_count(3)

    # Live: an agent that reports now shows up, and a change to one shows, without a reload.
    late = new_agent(dashboard, "edge", f"late-{m}")
    late.report()
    expect(row(page, late)).to_be_visible(timeout=LIVE_MS)
    expect(rows).to_have_count(4)
    web.report(healthy=False)
    expect(w.locator('[data-col="health"] .pill')).to_have_text("unhealthy", timeout=LIVE_MS)
    assert_no_reload(page)


def test_an_agents_page_shows_its_attributes_health_and_config_as_text(
    page: Page, dashboard: Dashboard
) -> None:
    m = marker()
    hostile = '<img src=x onerror="window.__pwned = 1">'
    agent = new_agent(dashboard, "edge", f"api-{m}", **{"service.namespace": "shop"})
    agent.report(non_identifying={"host.name": f"node-{m}", "note": hostile}, effective={})

    sign_in(page, dashboard)
    open_fleet(page, m)
    row(page, agent).locator('[data-col="uid"]').click()  # the whole row opens it
    expect(page.locator("#view-opamp-agent")).to_be_visible()
    expect(page.locator('#nav a[data-view="fleet"]')).to_have_attribute("aria-current", "page")
    expect(page.locator("#oa-title")).to_have_text(f"api-{m}")
    expect(page.locator('#oa-summary dd[data-field="instance_uid"]')).to_have_text(agent.hex)
    expect(page.locator('#oa-summary dd[data-field="project"]')).to_have_text("edge")
    ident = page.locator("#oa-identifying")
    expect(ident.locator('tr[data-key="service.name"] .attr-value')).to_have_text(f"api-{m}")
    expect(ident.locator('tr[data-key="service.namespace"] .attr-value')).to_have_text("shop")
    non = page.locator("#oa-non-identifying")
    expect(non.locator('tr[data-key="host.name"] .attr-value')).to_have_text(f"node-{m}")
    # An agent's text is text: shown as sent, never markup.
    expect(non.locator('tr[data-key="note"] .attr-value')).to_have_text(hostile)
    assert page.locator("#view-opamp-agent img").count() == 0
    assert page.evaluate("window.__pwned === undefined")
    for capability in ("REPORTS_HEALTH", "ACCEPTS_REMOTE_CONFIG"):
        expect(page.locator("#oa-capabilities")).to_contain_text(capability)
    # The health tree: the agent, and its unhealthy exporter below it.
    root = page.locator('#oa-health-tree > li[data-component="agent"]')
    expect(root.locator(":scope > .health-line .pill")).to_have_text("healthy")
    expect(root.locator(":scope > .health-line")).to_contain_text("running")
    exporter = root.locator('li[data-component="exporter"]')
    expect(exporter).to_have_attribute("data-healthy", "false")
    expect(exporter.locator(".health-error")).to_have_text("refused")
    expect(page.locator('#oa-config-hashes dd[data-field="match"]')).to_have_text(
        "no desired configuration"
    )
    expect(page.locator("#oa-remote-status-block")).to_contain_text("not reported")


def test_the_editor_refuses_bad_json_and_yaml_and_follows_a_push_to_applied(
    page: Page, dashboard: Dashboard
) -> None:
    m = marker()
    agent = new_agent(dashboard, "edge", f"collector-{m}")
    agent.report(effective={"collector.yaml": "receivers: {}\n"})

    sign_in(page, dashboard)
    page.goto(f"{dashboard.url}/#/fleet/{agent.hex}?project=edge")
    expect(page.locator("#oa-title")).to_have_text(f"collector-{m}")
    expect(page.locator("#config-card")).to_be_visible()
    expect(page.locator("#ce-status")).to_have_text("none")
    files = page.locator("#ce-files .ce-file")
    expect(files).to_have_count(1)
    file = files.first
    config_path = f"/opamp/agents/{agent.hex}/config?project=edge"

    # JSON that does not parse: refused in the page, nothing sent.
    file.locator(".ce-name").fill("sdk.json")
    file.locator(".ce-type").fill("application/json")
    file.locator(".ce-body").fill('{"sampler": ')
    page.click("#ce-push")
    expect(file.locator(".ce-file-error")).to_contain_text("sdk.json is not valid JSON")
    expect(page.locator("#ce-error")).to_contain_text("nothing was pushed")
    assert api(dashboard, config_path)[0] == 404

    # YAML that does not parse: the brain's 400, shown where the operator looks.
    file.locator(".ce-name").fill("collector.yaml")
    file.locator(".ce-type").fill("application/yaml")
    file.locator(".ce-body").fill("receivers:\n  otlp: [\n")
    page.click("#ce-push")
    expect(page.locator("#ce-error")).to_contain_text("'collector.yaml'] is not valid YAML")
    expect(page.locator("#ce-error")).to_contain_text("line 3")
    expect(file.locator(".ce-file-error")).to_be_hidden()
    assert api(dashboard, config_path)[0] == 404

    # A good one: pushed, pending until the agent says more.
    file.locator(".ce-body").fill(COLLECTOR)
    page.click("#ce-push")
    expect(page.locator("#ce-status .pill")).to_have_text("pending")
    expect(page.locator("#ce-error")).to_be_hidden()
    expect(page.locator("#ce-result")).to_contain_text("Pushed")
    status, stored = api(dashboard, config_path)
    assert status == 200 and stored["status"] == "pending"
    assert stored["files"] == {
        "collector.yaml": {"body": COLLECTOR, "content_type": "application/yaml"}
    }
    digest = stored["config_hash"]
    expect(page.locator('#ce-summary dd[data-field="config_hash"] span')).to_have_attribute(
        "title", digest
    )
    # The agent still runs its old file: effective and desired differ.
    expect(page.locator('#oa-config-hashes dd[data-field="match"]')).to_have_text("differ")
    expect(page.locator('#oa-config-files tr[data-file="collector.yaml"]')).to_have_attribute(
        "data-same", "differs"
    )

    # The agent applies it: the page follows over the socket.
    agent.config_status(digest, pb.RemoteConfigStatus.STATUS_APPLYING)
    expect(page.locator("#ce-status .pill")).to_have_text("applying", timeout=LIVE_MS)
    agent.config_status(digest, pb.RemoteConfigStatus.STATUS_APPLIED)
    expect(page.locator("#ce-status .pill")).to_have_text("applied", timeout=LIVE_MS)
    agent.report(effective={"collector.yaml": COLLECTOR})
    match = page.locator('#oa-config-hashes dd[data-field="match"]')
    expect(match).to_have_text("match", timeout=LIVE_MS)
    expect(page.locator('#oa-config-files tr[data-file="collector.yaml"]')).to_have_attribute(
        "data-same", "same"
    )
    expect(page.locator('#oa-remote-status dd[data-field="status"]')).to_have_text("applied")

    # A second push that the agent fails: its message is shown.
    file.locator(".ce-body").fill(COLLECTOR + "processors:\n  batch: {}\n")
    page.click("#ce-push")
    expect(page.locator("#ce-status .pill")).to_have_text("pending")
    second = api(dashboard, config_path)[1]["config_hash"]
    assert second != digest
    agent.config_status(second, pb.RemoteConfigStatus.STATUS_FAILED, "unknown processor batch")
    expect(page.locator("#ce-status .pill")).to_have_text("failed", timeout=LIVE_MS)
    expect(page.locator("#ce-agent-error")).to_have_text("unknown processor batch")

    # Its history: one row per change, newest first, the failure on top.
    history = page.locator("#oa-history tbody tr")
    expect(history.first).to_contain_text(
        f"desired config {second[:12]}: failed (unknown processor batch)", timeout=LIVE_MS
    )
    expect(page.locator('#oa-history tr[data-changes~="config_status"]')).to_have_count(3)
    expect(history.last).to_have_attribute("data-changes", re.compile(r"\bconnected\b"))
    api_rows = api(dashboard, f"/opamp/agents/{agent.hex}/history?project=edge")[1]["items"]
    expect(history).to_have_count(len(api_rows))

    # The fleet shows the configuration's status too.
    page.click('#nav a[data-view="fleet"]')
    page.fill("#fl-q", m)
    expect(row(page, agent).locator('[data-col="config"] .pill')).to_have_text("failed")
    assert_no_reload(page)


def _rollout(**overrides: Any) -> dict[str, Any]:
    """A rollout as the rollouts API shows it (GET /api/v1/opamp/rollouts/{id})."""
    return {
        "id": "7d4c5b6a-0000-4000-8000-000000000001",
        "project": "edge",
        "selector": {"service.name": "checkout"},
        "config_hash": "ab" * 32,
        "state": "halted",
        "stage": 2,
        "stages": 4,
        "targets": 10,
        "counts": {"pending": 1, "applying": 1, "applied": 2, "failed": 2},
        "halted_reason": "2 of 6 failed: past the threshold of 10 %",
        "created_at": "2026-12-07T04:00:00Z",
        "created_by": "api",
        **overrides,
    }


def test_rollouts_say_when_the_brain_has_none_and_show_what_the_api_gives(
    page: Page, dashboard: Dashboard
) -> None:
    sign_in(page, dashboard)
    served = api(dashboard, "/opamp/rollouts")[0] != 404
    page.click('#nav a[data-view="rollouts"]')
    expect(page.locator("#view-rollouts")).to_be_visible()
    if served:
        expect(page.locator("#rollouts-table")).to_be_visible()
        expect(page.locator("#rollouts-unavailable")).to_be_hidden()
    else:
        expect(page.locator("#rollouts-unavailable")).to_be_visible()
        expect(page.locator("#rollouts-unavailable")).to_contain_text("not available")
        expect(page.locator("#rollouts-body")).to_be_hidden()

    # The rest against the API's shapes, served by the browser's routing; and
    # an ``opamp_rollout`` message put into the page's real socket.
    moves: list[str] = []
    started: list[dict[str, Any]] = []
    halted = _rollout()
    known = {halted["id"]: halted}

    def answer(route: Any) -> None:
        request = route.request
        path = request.url.split("/api/v1/opamp/rollouts", 1)[1].split("?")[0]
        status = 200
        if request.method == "GET" and path == "":
            body: Any = {"items": list(known.values()), "next_cursor": None}
        elif request.method == "GET":
            body = known[path.strip("/")]
        elif path == "":  # start one
            started.append(json.loads(request.post_data))
            body = _rollout(
                id=str(uuid.uuid4()),
                state="running",
                halted_reason=None,
                selector=started[-1]["selector"],
                stage=1,
                counts={"pending": 1, "applying": 0, "applied": 0, "failed": 0},
            )
            known[body["id"]] = body
            status = 201
        else:
            moves.append(path)
            rollout_id = path.split("/")[1]
            body = known[rollout_id] = {**known[rollout_id], "state": "running"}
            body["halted_reason"] = None
        route.fulfill(status=status, content_type="application/json", body=json.dumps(body))

    sockets: list[Any] = []

    def relay(ws: Any) -> None:
        ws.connect_to_server()  # everything else passes through
        sockets.append(ws)

    page.route("**/api/v1/opamp/rollouts**", answer)
    page.route_web_socket("**/ws/dashboard**", relay)
    page.reload()
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    page.evaluate("window.__z4jNoReload = true")
    expect(page.locator("#rollouts-unavailable")).to_be_hidden()
    line = page.locator(f'#rollouts-table tbody tr[data-id="{halted["id"]}"]')
    expect(line).to_have_attribute("data-state", "halted")
    expect(line).to_contain_text("service.name=checkout")
    expect(line).to_contain_text("stage 2 of 4")
    expect(line).to_contain_text("2 applied · 2 failed · 1 applying · 1 pending of 10")
    expect(line.locator(".stages i.done")).to_have_count(2)
    widths = line.locator(".progress i").evaluate_all(
        "parts => parts.map(p => [p.className, p.style.width])"
    )
    assert widths == [
        ["part-applied", "20%"],
        ["part-failed", "20%"],
        ["part-applying", "10%"],
        ["part-pending", "10%"],
    ]

    # Live: a message about it moves its counts.
    wait_for("the page's socket", lambda: bool(sockets))
    moved = _rollout(state="running", halted_reason=None, stage=3)
    moved["counts"] = {"pending": 0, "applying": 0, "applied": 6, "failed": 2}
    sockets[-1].send(json.dumps({"type": "opamp_rollout", "rollout": moved}))
    expect(line).to_have_attribute("data-state", "running", timeout=LIVE_MS)
    expect(line).to_contain_text("stage 3 of 4")

    # Its page: state, why it halted, and the operator's moves.
    line.locator("td").nth(1).click()
    expect(page.locator("#rollout-card")).to_be_visible()
    expect(page.locator("#rollouts-card")).to_be_hidden()
    expect(page.locator("#rd-state .pill")).to_have_text("halted")
    expect(page.locator('#rd-summary dd[data-field="halted_reason"]')).to_have_text(
        halted["halted_reason"]
    )
    expect(page.locator('#rd-actions [data-action="cancel"]')).to_be_visible()
    page.click('#rd-actions [data-action="resume"]')
    expect(page.locator("#rd-state .pill")).to_have_text("running")
    expect(page.locator('#rd-actions [data-action="halt"]')).to_be_visible()
    assert moves == [f"/{halted['id']}/resume"]

    # Starting one: checked in the page first, then sent, then shown.
    page.click("#rollout-card a.btn")
    expect(page.locator("#rollouts-card")).to_be_visible()
    page.fill("#ro-project", "edge")
    page.fill("#ro-selector", '{"service.name": 3}')
    page.fill("#ro-body", COLLECTOR)
    page.click("#ro-start")
    expect(page.locator("#ro-error")).to_contain_text("Each selector value is text")
    page.fill("#ro-selector", "{oops")
    page.click("#ro-start")
    expect(page.locator("#ro-error")).to_contain_text("Selector:")
    page.fill("#ro-selector", '{"service.name": "checkout"}')
    page.fill("#ro-name", "sdk.json")
    page.fill("#ro-type", "application/json")
    page.fill("#ro-body", "{")
    page.click("#ro-start")
    expect(page.locator("#ro-error")).to_contain_text("sdk.json is not valid JSON")
    assert started == []
    page.fill("#ro-name", "collector.yaml")
    page.fill("#ro-type", "application/yaml")
    page.fill("#ro-body", COLLECTOR)
    page.fill("#ro-canary", "20")
    page.click("#ro-start")
    expect(page.locator("#rollout-card")).to_be_visible()
    expect(page.locator("#rd-state .pill")).to_have_text("running")
    assert started == [
        {
            "project": "edge",
            "selector": {"service.name": "checkout"},
            "files": {"collector.yaml": {"body": COLLECTOR, "content_type": "application/yaml"}},
            "canary_percent": 20,
            "batch_size": 100,
            "failure_threshold_percent": 10,
        }
    ]
    assert page.evaluate("location.hash") == f"#/rollouts/{list(known)[-1]}"
    assert_no_reload(page)


def start_staged_rollout(page: Page, dashboard: Dashboard) -> list[OpampAgent]:
    """Ten agents of project "fleet" reporting under a fresh tag, and a rollout
    to them started from the page: a canary of 20 %, batches of four, halting
    past 10 % failed. The agents, for the test to answer as."""
    tag = marker()
    agents = [
        new_agent(dashboard, "fleet", f"svc-{tag}", **{"deployment.environment": tag})
        for _ in range(10)
    ]
    for agent in agents:
        agent.report()
    page.click('#nav a[data-view="rollouts"]')
    expect(page.locator("#rollouts-table")).to_be_visible()
    page.fill("#ro-project", "fleet")
    page.fill("#ro-selector", json.dumps({"deployment.environment": tag}))
    page.fill("#ro-name", "collector.yaml")
    page.fill("#ro-type", "application/yaml")
    page.fill("#ro-body", COLLECTOR)
    page.fill("#ro-canary", "20")
    page.fill("#ro-batch", "4")
    page.fill("#ro-threshold", "10")
    page.click("#ro-start")
    return agents


def test_a_real_staged_rollout_started_from_the_page_halts_on_injected_failures(
    page: Page, dashboard: Dashboard
) -> None:
    """No routing here: the brain's own rollouts API and leader task. Ten
    agents match the selector; the canary (two of them) applies, the next
    stage's agents fail, and the rollout halts by itself: the page shows it
    live, with the reason, and the later stages never reach anyone."""
    if api(dashboard, "/opamp/rollouts")[0] == 404:
        pytest.fail("this brain serves no rollouts API")
    sign_in(page, dashboard)
    agents = start_staged_rollout(page, dashboard)
    expect(page.locator("#rollout-card")).to_be_visible()
    rollout_id = page.evaluate("location.hash").rsplit("/", 1)[1]

    def rollout() -> dict[str, Any]:
        status, body = api(dashboard, f"/opamp/rollouts/{rollout_id}")
        assert status == 200, body
        return dict(body)

    def offered(agent: OpampAgent) -> str | None:
        """The configuration hash the brain now wants this agent to run."""
        status, body = api(dashboard, f"/opamp/agents/{agent.hex}/config")
        return str(body["config_hash"]) if status == 200 else None

    # The canary: 20% of 10, assigned by the leader within its round.
    wait_for("the canary", lambda: rollout()["counts"]["pending"] == 2)
    canary = [a for a in agents if offered(a) is not None]
    assert len(canary) == 2
    digest = offered(canary[0])
    assert digest is not None
    expect(page.locator("#rd-summary")).to_contain_text("2 pending", timeout=LIVE_MS)
    for agent in canary:
        agent.config_status(digest, pb.RemoteConfigStatus.STATUS_APPLIED)
    # The next stage (a batch of four) fails: injected by the agents' reports.
    wait_for(
        "the first batch", lambda: rollout()["stage"] == 2 and rollout()["counts"]["pending"] == 4
    )
    batch = [a for a in agents if a not in canary and offered(a) is not None]
    assert len(batch) == 4
    for agent in batch:
        agent.config_status(digest, pb.RemoteConfigStatus.STATUS_FAILED, error="exporter refused")
    # Halted by itself, shown live (no reload, no click), with its reason.
    expect(page.locator("#rd-state .pill")).to_have_text("halted", timeout=LIVE_MS)
    expect(page.locator('#rd-summary dd[data-field="halted_reason"]')).to_contain_text("fail")
    halted = rollout()
    assert halted["state"] == "halted" and halted["counts"]["failed"] >= 1
    # The last stage was never assigned: four agents have no configuration.
    untouched = [a for a in agents if a not in canary and a not in batch]
    assert [offered(a) for a in untouched] == [None] * 4
    status, audit = api(dashboard, "/audit?limit=200")
    assert status == 200
    actions = {row["action"] for row in audit["items"] if rollout_id in json.dumps(row)}
    assert {"opamp.rollout.created", "opamp.rollout.stage", "opamp.rollout.halted"} <= actions
    assert_no_reload(page)


def test_a_rollout_read_that_answers_late_does_not_undo_what_the_socket_brought(
    page: Page, dashboard: Dashboard
) -> None:
    """The page opens a new rollout and reads it from the API; the leader
    assigns its canary meanwhile, and the socket brings that first. Held here
    until then, the read answers with the rollout as it was created: the page
    keeps the newer state (it showed stage 0 until the next change)."""
    sign_in(page, dashboard)
    created: list[dict[str, Any]] = []
    held: list[Any] = []
    frames: list[dict[str, Any]] = []

    def on_response(response: Any) -> None:
        if response.request.method == "POST" and response.url.endswith("/api/v1/opamp/rollouts"):
            created.append(response.json())

    def on_socket(socket: Any) -> None:
        def on_frame(payload: str | bytes) -> None:
            message = json.loads(payload)
            if isinstance(message, dict):
                frames.append(message)

        socket.on("framereceived", on_frame)

    page.on("response", on_response)
    page.on("websocket", on_socket)
    page.route(
        re.compile(r".*/api/v1/opamp/rollouts/[0-9a-f-]{36}$"),
        lambda route: held.append(route) if route.request.method == "GET" else route.continue_(),
    )
    page.reload()  # a socket the listener below sees from its start
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")

    def until(what: str, check: Callable[[], bool]) -> None:
        """Wait, letting Playwright deliver the page's events meanwhile."""
        deadline = time.monotonic() + 60
        while not check():
            assert time.monotonic() < deadline, f"{what}: not within 60 s"
            page.wait_for_timeout(50)

    start_staged_rollout(page, dashboard)
    until("the rollout's read", lambda: bool(held) and bool(created))
    (first,) = created
    assert first["stage"] == 0 and first["counts"]["pending"] == 0
    rollout_id = first["id"]

    def canary_on_the_socket() -> bool:
        return any(
            m.get("type") == "opamp_rollout"
            and m["rollout"]["id"] == rollout_id
            and m["rollout"]["stage"] >= 1
            for m in frames
        )

    until("the canary's message", canary_on_the_socket)
    held[0].fulfill(status=200, content_type="application/json", body=json.dumps(first))
    summary = page.locator("#rd-summary")
    expect(summary).to_contain_text("stage 1 of 3", timeout=LIVE_MS)
    expect(summary).to_contain_text("2 pending")
