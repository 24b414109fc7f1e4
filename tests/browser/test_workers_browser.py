"""The dashboard's engine workers (#/workers) and a queue's dead letters, in a real Chromium.

A real brain; an agent (`ops_agent`, "ops / box", worker "box-1") that
reports tasks of engine ``trio`` run by its engine worker ``alpha@box`` and
answers, as z4j-celery and z4j-dramatiq would, the worker controls and the
dead-letter commands: its hello advertises them (the z4j agent library
advertises the actions it has handlers for, so ``list_dead_letters``, the
token the brain looks for, has one too). The first agent of the module
("shop / checkout") reports a worker ``beta@box`` and advertises no control.

What the page sends is checked where it lands: the commands the brain
stored and what the agent was given.
"""

from __future__ import annotations

import functools
import json
import time
import urllib.request
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import pytest
from playwright.sync_api import Page, expect

from z4j.agent import Agent
from z4j.testing.agents import provision

if TYPE_CHECKING:
    from conftest import Dashboard  # tests/browser/conftest.py

expect.set_options(timeout=60_000)  # bounds failures only

CONTROLS = (
    "restart_worker",
    "pool_grow",
    "pool_shrink",
    "add_consumer",
    "cancel_consumer",
    "rate_limit",
)
DEAD = [
    {
        "task_id": "dl-2",
        "task_name": "mail.send",
        "queue": "outbox",
        "failed_at": "2026-10-02T12:00:00Z",
        "error_excerpt": "SMTPError: 550 mailbox unavailable",
        "attempts": 3,
    },
    {
        "task_id": "dl-1",
        "task_name": "",
        "queue": "outbox",
        "failed_at": None,
        "error_excerpt": "",
        "attempts": None,
    },
]


@attrs.define
class OpsAgent:
    dashboard: Dashboard
    agent: Agent
    agent_id: str
    commands: list[tuple[str, dict[str, Any], dict[str, Any]]]  # (action, target, parameters)

    def given(self, action: str) -> list[dict[str, Any]]:
        """The parameters of the ``action`` commands the agent was given."""
        return [p for a, _, p in self.commands if a == action]

    def emit(self, kind: str, task_id: str, **data: Any) -> None:
        """A ``task.<kind>`` event of engine ``trio``, from this agent."""
        emit(self.agent, self.dashboard, kind, task_id, **data)


@pytest.fixture(scope="module")
def ops_agent(dashboard: Dashboard) -> OpsAgent:
    token, secret, agent_id = dashboard.loop.run(
        functools.partial(provision, dashboard.config, project="ops", agent="box")
    )
    agent = Agent(dashboard.url, token=token, secret=secret, worker_id="box-1")
    helper = OpsAgent(dashboard=dashboard, agent=agent, agent_id=str(agent_id), commands=[])

    def control(action: str) -> None:
        async def handle(target: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
            helper.commands.append((action, target, parameters))
            answer = {"worker": parameters.get("worker_name")}  # as celery's broadcasts answer
            for key in ("delta", "queue", "task_name", "rate"):
                if key in parameters:
                    answer[key] = parameters[key]
            return answer

        agent.on_command(action, handle)

    for action in CONTROLS:
        control(action)

    @agent.command("dlq.list")
    async def dlq_list(target: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
        helper.commands.append(("dlq.list", target, parameters))
        return {"entries": DEAD, "next_cursor": None, "total": 2, "engine": "trio"}

    @agent.command("list_dead_letters")  # advertised, as an adapter does; never sent
    async def never(target: dict[str, Any], parameters: dict[str, Any]) -> None:
        raise AssertionError("the brain sends dlq.list")

    @agent.command("requeue_dead_letter")
    async def requeue(target: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
        helper.commands.append(("requeue_dead_letter", target, parameters))
        return {"task_id": parameters["task_id"], "requeued": True}

    dashboard.loop.run(dashboard.loop.nursery.start, agent.run)
    return helper


def sign_in(page: Page, dashboard: Dashboard) -> None:
    page.goto(f"{dashboard.url}/")
    expect(page).to_have_url(f"{dashboard.url}/login")
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


def wait_for(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 60
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within 60 s"
        time.sleep(0.05)


def stored(dashboard: Dashboard, action: str) -> list[dict[str, Any]]:
    items = api_get(dashboard, "/api/v1/commands?limit=500")["items"]
    return [c for c in items if c["action"] == action]


def emit(agent: Agent, dashboard: Dashboard, kind: str, task_id: str, **data: Any) -> None:
    """A ``task.<kind>`` event of engine ``trio`` from ``agent`` (it runs on the loop)."""
    event = {"kind": f"task.{kind}", "engine": "trio", "task_id": task_id, "data": data}
    dashboard.loop.run_sync(agent.emit, event)


def test_engine_workers_table_and_controls_with_their_warning(
    page: Page, dashboard: Dashboard, ops_agent: OpsAgent
) -> None:
    m = uuid.uuid4().hex[:8]
    ops = ops_agent.emit
    ops("started", f"{m}-1", task_name="mail.send", worker="alpha@box")
    ops("succeeded", f"{m}-1", task_name="mail.send")
    ops("failed", f"{m}-2", task_name="mail.send", worker="alpha@box")
    emit(dashboard.agent, dashboard, "started", f"{m}-3", task_name="shop.pay", worker="beta@box")

    def listed() -> bool:
        items = api_get(dashboard, "/api/v1/engine-workers")["items"]
        return {w["worker"] for w in items} >= {"alpha@box", "beta@box"} and any(
            w["worker"] == "alpha@box" and w["tasks"] == 2 for w in items
        )

    wait_for("the engine workers", listed)
    sign_in(page, dashboard)
    page.click('#nav a[data-view="workers"]')
    expect(page.locator("#view-workers")).to_be_visible()
    alpha = page.locator('#engine-workers-table tr[data-worker="alpha@box"]')
    expect(alpha).to_contain_text("trio")
    expect(alpha.locator("td").nth(3)).to_have_text("2")
    expect(alpha).to_contain_text("1 succeeded")
    expect(alpha).to_contain_text("1 failed")
    # Beside the agent that reported it, and that agent's own (WebSocket) worker.
    expect(alpha.locator(".agent-name")).to_have_text("ops / box")
    expect(alpha.locator('[data-worker-id="box-1"]')).to_contain_text("connected")
    buttons = alpha.locator("button[data-action]")
    assert buttons.evaluate_all("bs => bs.map(b => b.dataset.action)") == list(CONTROLS)
    beta = page.locator('#engine-workers-table tr[data-worker="beta@box"]')
    expect(beta).to_contain_text("none offered")
    expect(beta.locator("button")).to_have_count(0)
    # The warning is on the page before anything is sent.
    expect(page.locator("#control-warning")).to_contain_text("completed once sent")

    # A restart asks first; cancelling sends nothing.
    alpha.locator('button[data-action="restart_worker"]').click()
    panel = page.locator("#control-panel")
    expect(panel).to_be_visible()
    expect(panel).to_contain_text("Restart the pool of alpha@box?")
    expect(panel).to_contain_text("even when the worker refused")
    page.click("#control-cancel")
    expect(panel).to_be_hidden()
    assert stored(dashboard, "restart_worker") == []
    alpha.locator('button[data-action="restart_worker"]').click()
    expect(page.locator("#control-confirm")).to_have_text("Restart pool")
    page.click("#control-confirm")
    result = page.locator("#control-result")
    expect(result).to_have_attribute("data-state", "completed")
    expect(result).to_contain_text("Completed only means the broadcast was sent")
    [restart] = stored(dashboard, "restart_worker")
    assert restart["agent_id"] == ops_agent.agent_id
    assert restart["target"] == {"engine": "trio", "id": "alpha@box"}
    assert ops_agent.given("restart_worker") == [{"engine": "trio", "worker_name": "alpha@box"}]

    # What a control needs is asked for, and checked before it is sent.
    alpha.locator('button[data-action="pool_grow"]').click()
    expect(page.locator("#control-delta")).to_be_visible()
    expect(page.locator("#control-queue")).to_be_hidden()
    page.fill("#control-delta", "3")
    page.click("#control-confirm")
    expect(result).to_contain_text("Grow pool of alpha@box sent as command")
    expect(result).to_have_attribute("data-state", "completed")
    assert ops_agent.given("pool_grow") == [
        {"engine": "trio", "worker_name": "alpha@box", "delta": 3}
    ]

    alpha.locator('button[data-action="rate_limit"]').click()
    page.fill("#control-task", "mail.send")
    page.fill("#control-rate", "fast")
    page.click("#control-confirm")
    expect(page.locator("#engine-workers-error")).to_contain_text("A rate is")
    assert stored(dashboard, "rate_limit") == []
    page.fill("#control-rate", "10/m")
    page.click("#control-confirm")
    expect(result).to_contain_text("Rate limit of alpha@box")
    expect(result).to_have_attribute("data-state", "completed")
    [limit] = stored(dashboard, "rate_limit")
    assert limit["parameters"] == {
        "engine": "trio",
        "worker_name": "alpha@box",
        "task_name": "mail.send",
        "rate": "10/m",
    }


def test_dead_letters_listed_on_demand_and_requeued(
    page: Page, dashboard: Dashboard, ops_agent: OpsAgent
) -> None:
    m = uuid.uuid4().hex[:8]
    queue = f"outbox-{m}"
    ops = ops_agent.emit
    ops("failed", f"{m}-1", task_name="mail.send", queue=queue, exception="SMTPError")

    def shown() -> bool:
        return any(q["queue"] == queue for q in api_get(dashboard, "/api/v1/queues")["items"])

    wait_for("the queue's outcomes", shown)
    sign_in(page, dashboard)
    page.click('#nav a[data-view="queues"]')
    line = page.locator(f'#queues-table tr[data-engine="trio"][data-queue="{queue}"]')
    assert stored(dashboard, "dlq.list") == []
    line.get_by_role("button", name="Dead letters").click()

    card = page.locator("#dead-letters-card")
    expect(card).to_be_visible()
    expect(card).to_have_attribute("data-state", "listed")
    expect(page.locator("#dead-letters-title")).to_contain_text(f"trio queue “{queue}”")
    expect(page.locator("#dead-letters-hint")).to_contain_text("2 of 2 listed by ops / box")
    rows = page.locator("#dead-letters-table tbody tr")
    expect(rows).to_have_count(2)
    assert rows.evaluate_all("rs => rs.map(r => r.dataset.taskId)") == ["dl-2", "dl-1"]
    first = rows.nth(0)
    expect(first).to_contain_text("mail.send")
    expect(first).to_contain_text("SMTPError: 550 mailbox unavailable")
    expect(first.locator("td").nth(4)).to_have_text("3")
    expect(rows.nth(1).locator("td").nth(3)).to_have_text("\u2013")  # a dash: no time kept
    assert ops_agent.given("dlq.list") == [{"engine": "trio", "queue": queue, "limit": 50}]

    first.get_by_role("button", name="Re-queue").click()
    status = page.locator("#dead-letters-status")
    expect(status).to_contain_text("Re-queue of dl-2 sent as command")
    command = api_get(dashboard, f"/api/v1/commands/{status.get_attribute('data-command')}")
    assert command["action"] == "requeue_dead_letter"
    assert command["agent_id"] == ops_agent.agent_id
    assert command["parameters"] == {
        "engine": "trio",
        "queue": queue,
        "task_id": "dl-2",
        "task_name": "mail.send",
    }
    wait_for("the agent's re-queue", lambda: len(ops_agent.given("requeue_dead_letter")) == 1)

    page.click("#dead-letters-close")
    expect(card).to_be_hidden()
