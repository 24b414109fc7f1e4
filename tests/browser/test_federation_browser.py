"""The hub dashboard's Regions page (#/regions) in a real headless Chromium.

Three brains on a Trio loop of the test's own: east and west, each with an
agent streaming events, and the hub that federates them (east gave it a
read-only token, west one that allows commands). The page shows both
regions, their agents and their events, every row labelled by region; east
has more agents than a page (an older fleet), which "More agents" brings;
a command to west's agent is sent only once the operator has typed "west",
and the agent gets it; when east stops, the page says the view is partial
and names east, while west is still shown.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from playwright.sync_api import Page, expect

from z4j.agent import Agent
from z4j.config import Config
from z4j.ingest import connect as ingest_connect
from z4j.testing.agents import admin_token, provision
from z4j.testing.brain import RunningBrain, make_config, running_brain, wait_until
from z4j.testing.federation import federation_token, write_peers_file
from z4j.testing.store import open_store

expect.set_options(timeout=60_000)  # bounds failures only

FLEET = 99  # east's older agents: with east-box and west-box, a page of 100 and one more
LOGS = 60  # east's older events (ingested records): the events need a second page of 50


def browser_conftest(request: pytest.FixtureRequest) -> Any:
    """tests/browser/conftest.py as pytest loaded it (its TrioThread)."""
    here = str(Path(__file__).with_name("conftest.py"))
    for plugin in request.config.pluginmanager.get_plugins():
        if getattr(plugin, "__file__", None) == here:
            return plugin
    raise LookupError(here)


async def fleet(config: Config, n: int) -> None:
    """``n`` agents in a project of their own, made before any other."""
    async with open_store(config) as store:
        project = await store.create_project("fleet")
        for i in range(n):
            await store.create_agent(project.id, f"fleet-{i}", i.to_bytes(32, "big"))


@attrs.define
class World:
    loop: Any  # conftest's TrioThread
    hub: RunningBrain
    admin: str
    regions: dict[str, RunningBrain]
    agents: dict[str, Agent]
    pings: list[tuple[str, dict[str, Any]]]

    @property
    def url(self) -> str:
        return self.hub.addresses.http_url


@pytest.fixture(scope="module")
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    root = tmp_path_factory.mktemp("regions")
    loop = browser_conftest(request).TrioThread()
    try:
        regions: dict[str, RunningBrain] = {}
        agents: dict[str, Agent] = {}
        pings: list[tuple[str, dict[str, Any]]] = []
        peers = {}
        for name in ("east", "west"):
            config = make_config(root / name, region_name=name)
            if name == "east":
                loop.run(fleet, config, FLEET)
            token = loop.run(
                functools.partial(federation_token, config, "hub", allow_commands=name == "west")
            )
            agent_token, secret, _ = loop.run(
                functools.partial(provision, config, project=f"{name}-shop", agent=f"{name}-box")
            )
            brain = loop.enter(running_brain(config))
            regions[name] = brain
            if name == "east":
                with ingest_connect(*brain.ingest) as client:
                    client.send([{"t": "log", "n": n} for n in range(LOGS)])
            agent = Agent(
                brain.addresses.http_url,
                token=agent_token,
                secret=secret,
                worker_id=f"{name}-1",
            )

            def answer(region: str) -> Any:
                async def ping(target: dict[str, Any], parameters: dict[str, Any]) -> Any:
                    pings.append((region, parameters))
                    return {"pong": region}

                return ping

            agent.on_command("ping", answer(name))
            loop.run(loop.nursery.start, agent.run)
            agents[name] = agent
            peers[name] = {"url": brain.addresses.http_url, "token": token}
        hub_config = make_config(
            root / "hub",
            region_name="hub",
            federation_peers_file=write_peers_file(root / "peers.toml", peers),
            federation_timeout_ms=1500,
            federation_cache_ms=0,
        )
        admin = loop.run(admin_token, hub_config)
        hub = loop.enter(running_brain(hub_config))
        for name, agent in agents.items():
            loop.run(functools.partial(wait_until, lambda agent=agent: agent.connected))
            for n in range(3):
                loop.run_sync(agent.emit, {"kind": "task.note", "task_id": f"{name}-{n}"})
        yield World(loop, hub, admin, regions, agents, pings)
    finally:
        loop.close()


@pytest.fixture
def page(browser: Any, world: World) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1440, "height": 900}, color_scheme="dark")
    context.set_default_timeout(60_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "console",
        lambda m: (
            errors.append(m.text)
            if m.type == "error" and not m.text.startswith("Failed to load resource:")
            else None
        ),
    )
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"the page logged errors: {errors}"


def sign_in(page: Page, world: World) -> None:
    page.goto(f"{world.url}/")
    expect(page).to_have_url(f"{world.url}/login")
    page.fill("#token", world.admin)
    page.click("#login-submit")
    expect(page).to_have_url(f"{world.url}/")


def test_the_regions_page_shows_every_region_labelled_and_asks_before_a_command(
    page: Page, world: World, tmp_path: Path
) -> None:
    sign_in(page, world)
    page.click('#nav a[data-view="regions"]')
    expect(page.locator("#view-regions")).to_be_visible()

    regions = page.locator("#regions-table tbody tr")
    expect(regions).to_have_count(3)
    for name in ("hub", "east", "west"):
        expect(page.locator(f'#regions-table tr[data-region="{name}"] .pill')).to_have_text(
            "reachable"
        )
    expect(page.locator('#regions-table tr[data-region="east"]')).to_contain_text(
        "0.1"  # its version, as its summary says
    )
    expect(page.locator("#regions-partial")).to_be_hidden()

    # The first page: the newest 100 agents, east's and west's own first.
    agent_rows = page.locator("#region-agents-table tbody tr")
    expect(agent_rows).to_have_count(100)
    expect(page.locator("#region-agents-more")).to_be_visible()
    east_box = page.locator('#region-agents-table tr[data-region="east"]', has_text="east-box")
    expect(east_box).to_contain_text("east-1")
    expect(page.locator('#region-agents-table tr[data-region="west"]')).to_contain_text("west-box")
    expect(agent_rows.nth(0)).to_contain_text("west-box")  # newest first
    expect(agent_rows.nth(1)).to_contain_text("east-box")

    # The agents' events, each row labelled with the region that stored it.
    for name in ("east", "west"):
        rows = page.locator(f'#region-events-table tr[data-region="{name}"]')
        expect(rows.filter(has_text=f"{name}-2")).to_have_count(1)
        expect(rows.filter(has_text="west-" if name == "east" else "east-")).to_have_count(0)
    page.screenshot(path=str(tmp_path / "regions.png"), full_page=True)

    # "More agents" appends the rest, and is gone when there is none. The
    # page's refresh then renews the regions' state only: it asks for no first
    # page of agents, and the rows stay.
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url))
    page.click("#region-agents-more")
    expect(agent_rows).to_have_count(FLEET + 2)
    expect(page.locator("#region-agents-more")).to_be_hidden()
    expect(agent_rows.last).to_contain_text("fleet-0")  # the oldest
    asked.clear()
    for _ in range(2):
        with page.expect_response(lambda r: "/api/v1/federation/regions" in r.url, timeout=30_000):
            pass
    assert [u for u in asked if "/api/v1/federation/regions" in u]
    assert [u for u in asked if "/api/v1/federation/agents" in u] == []
    expect(agent_rows).to_have_count(FLEET + 2)

    # "Older" appends the next page of events, once each, newest first, and
    # is gone when there is none.
    event_rows = page.locator("#region-events-table tbody tr")
    expect(event_rows).to_have_count(50)
    older = page.locator("#region-events-older")
    expect(older).to_be_visible()
    older.click()
    expect(older).to_be_hidden()
    expect(event_rows).to_have_count(LOGS + 6)  # the records and both agents' task notes
    records = [
        int(n) for text in event_rows.all_text_contents() for n in re.findall(r'"n":(\d+)', text)
    ]
    assert sorted(records) == list(range(LOGS)), records

    # A command to west: only once "west" is typed; the agent gets it once.
    page.click('#region-agents-table tr[data-region="west"] button')
    expect(page.locator("#region-command")).to_be_visible()
    expect(page.locator("#region-command-text")).to_contain_text("region west")
    go = page.locator("#region-command-go")
    expect(go).to_be_disabled()
    page.fill("#region-command-confirm", "east")
    expect(go).to_be_disabled()
    page.fill("#region-command-confirm", "west")
    expect(go).to_be_enabled()
    go.click()
    expect(page.locator("#region-command-result")).to_contain_text("Sent to west")
    world.loop.run(functools.partial(wait_until, lambda: len(world.pings) == 1))
    assert world.pings == [("west", {})]

    # East stops: the page says what it lacks, and still shows west.
    world.loop.run_sync(world.regions["east"].cancel_scope.cancel)
    page.click("#region-command-cancel")
    page.click("#regions-refresh")
    expect(page.locator("#regions-partial")).to_be_visible()
    expect(page.locator("#regions-partial")).to_contain_text("east")
    expect(page.locator('#regions-table tr[data-region="east"] .pill')).to_have_text("unreachable")
    expect(page.locator('#region-agents-table tr[data-region="west"]')).to_have_count(1)
    expect(page.locator('#region-agents-table tr[data-region="east"]')).to_have_count(0)
