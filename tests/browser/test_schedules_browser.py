"""The dashboard's Schedules page in a real headless Chromium.

A raw agent ("cron / beat", worker "beat-1") plays a z4j-bare scheduler
adapter with durable overrides: it waits for the brain's activation, then
publishes its schedules as snapshots under the epoch it was given, and
answers ``schedule.external.mutate`` (enable, disable, delete),
``schedule.trigger_now`` and ``schedule.resync`` as the adapter does: by
changing its schedules and publishing a new snapshot.
"""

from __future__ import annotations

import functools
import json
import time
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import pytest
import trio
import trio_websocket
from playwright.sync_api import Page, expect

from z4j.protocol.agent import frames as f
from z4j.testing.agents import RawAgent, provision, raw_agent
from z4j.testing.schedules import publish_events, schedule_row, snapshot_events

if TYPE_CHECKING:
    from conftest import Dashboard  # tests/browser/conftest.py

expect.set_options(timeout=60_000)

OWNER = "huey-periodic"
CAPABILITIES = {
    OWNER: [
        "delete",
        "disable",
        "enable",
        "external_schedule_mutation_v1",
        "external_schedule_stable_snapshot_v1",
        "list",
        "trigger_now",
    ]
}


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


def wait_for(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 60
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within 60 s"
        time.sleep(0.05)


@attrs.define
class Beat:
    """The schedules the agent holds, and the commands it was given."""

    rows: dict[str, dict[str, Any]]
    actions: list[str] = attrs.field(factory=list)


async def _publish(agent: RawAgent, grant: dict[str, Any], sequence: int, beat: Beat) -> None:
    await publish_events(agent, snapshot_events(grant, sequence, list(beat.rows.values())))


async def _answer(agent: RawAgent, frame: f.Frame, result: dict[str, Any]) -> None:
    assert isinstance(frame.payload, f.Command)
    token = frame.payload.delivery_claim_token
    await agent.send(f.CommandAck(delivery_claim_token=token), frame_id=frame.id)
    await agent.send(
        f.CommandResult(status="success", result=result, delivery_claim_token=token),
        frame_id=frame.id,
    )


async def _serve(agent: RawAgent, beat: Beat) -> None:
    grant: dict[str, Any] = {}
    sequence = 0
    while True:
        frame = await agent.receive()
        if not isinstance(frame.payload, f.Command):
            continue
        command = frame.payload
        beat.actions.append(command.action)
        p = command.parameters
        if command.action == "schedule.external.activate":
            grant, sequence = dict(p), 0
        elif command.action == "schedule.external.mutate":
            key = p["schedule_id"]
            if p["operation"] == "delete":
                beat.rows.pop(key, None)
            else:
                beat.rows[key] = {
                    **beat.rows[key],
                    **p["definition"],
                    "source": f"{OWNER}:override",
                }
        elif command.action == "schedule.trigger_now":
            await _answer(agent, frame, {"task_id": "run-1"})
            continue
        await _answer(agent, frame, {})
        sequence += 1
        await _publish(agent, grant, sequence, beat)


@pytest.fixture(scope="module")
def beat(dashboard: Dashboard) -> Beat:
    token, secret, _ = dashboard.loop.run(
        functools.partial(provision, dashboard.config, project="cron", agent="beat")
    )
    state = Beat(
        rows={
            key: schedule_row(OWNER, key, name=key.split(".")[-1], expression=expression)
            for key, expression in (("app.every5", "*/5 * * * *"), ("app.nightly", "0 3 * * *"))
        }
    )

    async def run(task_status: trio.TaskStatus[None]) -> None:
        async with raw_agent(
            dashboard.brain.addresses.http,
            token,
            secret,
            worker_id="beat-1",
            capabilities=CAPABILITIES,
            schedulers=(OWNER,),
            runtime_features=("external_schedule_protocol_v1",),
        ) as agent:
            await agent.send(f.Heartbeat())  # proves the key
            task_status.started()
            async with trio.open_nursery() as nursery:

                async def serve() -> None:
                    try:
                        await _serve(agent, state)
                    except trio_websocket.ConnectionClosed:
                        nursery.cancel_scope.cancel()

                nursery.start_soon(serve)
                try:
                    while True:  # the brain closes a session silent for 3 intervals
                        await trio.sleep(2)
                        await agent.send(f.Heartbeat())
                except trio_websocket.ConnectionClosed:
                    nursery.cancel_scope.cancel()

    dashboard.loop.run(dashboard.loop.nursery.start, run)
    wait_for(
        "the activated schedules",
        lambda: len(api_get(dashboard, f"/api/v1/schedules?scheduler={OWNER}")["items"]) == 2,
    )
    return state


def row(page: Page, key: str) -> Any:
    return page.locator(f'#schedules-table tbody tr[data-source-key="{key}"]')


def test_schedules_are_listed_and_acted_on(page: Page, dashboard: Dashboard, beat: Beat) -> None:
    sign_in(page, dashboard)
    page.click('#nav a[data-view="schedules"]')
    expect(page.locator("#view-schedules")).to_be_visible()
    expect(page.locator('#nav a[data-view="schedules"]')).to_have_attribute("aria-current", "page")
    expect(page.locator("#schedules-table tbody tr")).to_have_count(2)
    every5 = row(page, "app.every5")
    expect(every5.locator("td").nth(1)).to_contain_text("every5")
    expect(every5.locator("td").nth(3)).to_contain_text("*/5 * * * *")
    expect(every5.locator("td").nth(8)).to_contain_text("cron / beat · beat-1")
    expect(every5.locator("[data-enabled]")).to_have_text("enabled")

    # Disable: the adapter's next snapshot shows it, and the notice follows the command.
    every5.locator('button[data-action="disable"]').click()
    expect(every5.locator("[data-enabled]")).to_have_text("disabled")
    expect(page.locator("#schedules-result")).to_contain_text("completed")
    expect(every5.locator('button[data-action="enable"]')).to_be_visible()
    assert "schedule.external.mutate" in beat.actions

    # The filter narrows the list to the disabled one.
    page.select_option("#sf-enabled", "false")
    expect(page.locator("#schedules-table tbody tr")).to_have_count(1)
    page.click("#sf-clear")
    expect(page.locator("#schedules-table tbody tr")).to_have_count(2)

    # Sync now.
    page.click("#schedules-sync")
    expect(page.locator("#schedules-result")).to_contain_text("Sync now")
    expect(page.locator("#schedules-result")).to_contain_text("completed")
    assert "schedule.resync" in beat.actions

    # Run now.
    row(page, "app.nightly").locator('button[data-action="trigger"]').click()
    expect(page.locator("#schedules-result")).to_contain_text("Run now “nightly”")
    expect(page.locator("#schedules-result")).to_contain_text("completed")
    assert "schedule.trigger_now" in beat.actions

    # Delete asks first; cancelling sends nothing.
    nightly = row(page, "app.nightly")
    nightly.locator('button[data-action="delete"]').click()
    expect(page.locator("#schedule-delete-panel")).to_be_visible()
    expect(page.locator("#schedule-delete-text")).to_contain_text("nightly")
    page.click("#schedule-delete-cancel")
    expect(page.locator("#schedule-delete-panel")).to_be_hidden()
    nightly.locator('button[data-action="delete"]').click()
    page.click("#schedule-delete-confirm")
    expect(page.locator("#schedules-table tbody tr")).to_have_count(1)
    expect(row(page, "app.nightly")).to_have_count(0)
