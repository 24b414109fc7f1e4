"""The dashboard with more agents than a page should draw, in a real headless Chromium.

A brain may have tens of thousands of agents. The page drew every one of
them in the overview's table and on the Agents page, and built its two
agent pickers anew at every render (each agent's worker coming or going):
with 5,000 agents, loading the overview held Chromium's main thread for
7.4 s in one piece, each agent joining for up to 0.7 s, opening the Agents
page for 4.7 s (this machine, measured with a PerformanceObserver of long
tasks). Now the tables show the first 100 agents their filter matches (the
Agents page: 100 more at each "More"), and a picker keeps the options of
agents that stay, setting only labels that changed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Page, expect
from test_provisioning_browser import sign_in

from z4j import keys
from z4j.config import Config
from z4j.store import store_for

if TYPE_CHECKING:
    from conftest import Dashboard  # tests/browser/conftest.py

expect.set_options(timeout=60_000)
MANY = 1500  # agents of project "fleet", besides "shop / checkout"
SHOWN = 100  # what each table shows at once (app.js AGENTS_SHOWN, provisioning.js PAGE)


async def _fleet(config: Config, count: int) -> None:
    """``count`` agents of project "fleet", node-00000 ... (their tokens unused)."""
    store = store_for(config)
    master = keys.master_secret(config)
    try:
        await store.migrate()
        project = await store.create_project("fleet")
        for n in range(count):
            token_hash = keys.token_hash(master, keys.new_agent_token())
            await store.create_agent(project.id, f"node-{n:05d}", token_hash)
    finally:
        await store.aclose()


@pytest.fixture(scope="module")
def dashboard(
    serve_dashboard: Callable[..., AbstractContextManager[Dashboard]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Dashboard]:
    """conftest's dashboard, with `MANY` more agents made before the brain starts."""
    fleet = functools.partial(_fleet, count=MANY)
    with serve_dashboard(tmp_path_factory.mktemp("many") / "data", before_start=fleet) as shown:
        yield shown


def option(page: Page, label: str) -> Any:
    """The command picker's option of the agent labelled ``label`` (project / name)."""
    return page.locator("#cmd-agent option").filter(has_text=f"{label} (")


def test_the_overview_shows_a_page_of_agents_and_finds_the_others(
    page: Page, dashboard: Dashboard
) -> None:
    sign_in(page, dashboard)
    total = MANY + 1
    rows = page.locator("#agents-table tr.agent-row")
    expect(page.locator("#agents-hint")).to_have_text(
        f"{total:,} agents, the first {SHOWN} shown: filter to find others"
    )
    expect(rows).to_have_count(SHOWN)
    # By project, then name: fleet's first hundred (shop / checkout sorts after).
    expect(rows.first).to_contain_text("node-00000")
    expect(rows.last).to_contain_text(f"node-{SHOWN - 1:05d}")
    # Since when each agent is: its creation (the API had not sent it).
    since = rows.first.locator("td").nth(3)
    expect(since).to_have_attribute("title", re.compile(r"^\d{4}-\d\d-\d\dT"))
    expect(since).not_to_have_text("\u2013")
    # The filter reaches past the page, by name, project or id.
    page.fill("#agents-filter", f"node-{MANY - 1:05d}")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text(f"node-{MANY - 1:05d}")
    expect(page.locator("#agents-hint")).to_have_text(f"1 of {total:,} agents match")
    page.fill("#agents-filter", dashboard.agent_id)
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("checkout")
    expect(rows.first).to_contain_text("1 of 1 live")
    page.fill("#agents-filter", "node-010")  # node-01000 ... node-01099
    expect(page.locator("#agents-hint")).to_have_text(f"100 of {total:,} agents match")
    page.fill("#agents-filter", "no such agent")
    expect(rows).to_have_count(0)
    expect(page.locator("#agents-hint")).to_have_text(f"none of {total:,} agents matches")
    # The command picker still offers every agent.
    expect(page.locator("#cmd-agent option")).to_have_count(total)
    last = option(page, f"fleet / node-{MANY - 1:05d}")
    page.select_option("#cmd-agent", last.get_attribute("value"))
    expect(page.locator("#cmd-agent option:checked")).to_have_text(
        f"fleet / node-{MANY - 1:05d} (0 live)"
    )


def test_a_picker_keeps_its_options_as_agents_come_and_go(page: Page, dashboard: Dashboard) -> None:
    """An agent joining puts one option in place, its worker leaving changes one
    label: the options of the others are the same elements as before. And the
    page reads the one agent a message names, not the whole list again."""
    reads: list[str] = []
    page.on(
        "request",
        lambda request: (
            reads.append(urlsplit(request.url).path)
            if urlsplit(request.url).path.startswith(("/api/v1/agents", "/api/v1/instances"))
            else None
        ),
    )
    sign_in(page, dashboard)
    expect(page.locator("#cmd-agent option")).to_have_count(MANY + 1)
    reads.clear()
    kept = option(page, "fleet / node-00007")
    kept.evaluate("(o) => { o.dataset.mark = 'kept'; }")
    dashboard.add_agent(project="late", agent="arrival", workers=["arrival-1"])
    arrival = option(page, "late / arrival")
    expect(arrival).to_have_text("late / arrival (1 live)")
    expect(page.locator("#cmd-agent option")).to_have_count(MANY + 2)
    # In its place by project, then name: after fleet, before shop.
    labels = page.locator("#cmd-agent option").all_text_contents()
    assert labels[MANY - 1].startswith(f"fleet / node-{MANY - 1:05d} ")
    assert labels[MANY] == "late / arrival (1 live)"
    assert labels[MANY + 1].startswith("shop / checkout ")
    expect(page.locator("#cmd-agent option[data-mark='kept']")).to_have_count(1)
    arrival.evaluate("(o) => { o.dataset.mark = 'arrival'; }")
    dashboard.stop_worker("arrival-1")
    expect(page.locator("#cmd-agent option[data-mark='arrival']")).to_have_text(
        "late / arrival (0 live)"
    )
    expect(page.locator("#cmd-agent option[data-mark='kept']")).to_have_text(
        "fleet / node-00007 (0 live)"
    )
    # The arrival was read alone; the whole list only with the slow poll
    # (which reads the instances too), if one fell in this test.
    arrival_id = arrival.get_attribute("value")
    assert f"/api/v1/agents/{arrival_id}" in reads, reads
    assert reads.count("/api/v1/agents") == reads.count("/api/v1/instances"), reads
    # The tasks page's agent filter is filled when that page opens.
    page.click("#nav a[data-view='tasks']")
    expect(page.locator("#tf-agent option")).to_have_count(MANY + 3)  # and "any agent"


def test_the_agents_page_shows_a_hundred_more_at_each_more(
    page: Page, dashboard: Dashboard
) -> None:
    sign_in(page, dashboard)
    page.click("#nav a[data-view='agents']")
    rows = page.locator("#prov-agents-table tbody tr")
    expect(rows).to_have_count(SHOWN)
    total = int(
        page.evaluate("fetch('/api/v1/agents').then((r) => r.json()).then((b) => b.items.length)")
    )
    expect(page.locator("#prov-agents-hint")).to_have_text(f"{total:,} agents, {SHOWN} shown")
    page.click("#prov-agents-more")
    expect(rows).to_have_count(2 * SHOWN)
    expect(page.locator("#prov-agents-hint")).to_have_text(f"{total:,} agents, {2 * SHOWN} shown")
    page.fill("#prov-agents-filter", f"node-{MANY - 1:05d}")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-agent", f"node-{MANY - 1:05d}")
    expect(page.locator("#prov-agents-more")).to_be_hidden()
    expect(page.locator("#prov-agents-hint")).to_have_text(f"1 of {total:,} agents match")
    page.fill("#prov-agents-filter", "fleet")  # a project's name: more than a page
    expect(rows).to_have_count(SHOWN)
    expect(page.locator("#prov-agents-hint")).to_have_text(
        f"{MANY:,} of {total:,} agents match, {SHOWN} shown"
    )
    expect(page.locator("#prov-agents-more")).to_be_visible()
