"""The dashboard fits narrow and wide windows (a real Chromium).

At 420 px (a phone), 1400 and 1920 px (wide monitors), with an agent and a
worker of long names, the agents table's last column is whole inside its
card and the window without scrolling, nothing makes
the page scroll sideways, and every page link of the top bar can be reached
and followed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from playwright.sync_api import Page, expect

if TYPE_CHECKING:
    from conftest import Dashboard  # tests/browser/conftest.py

expect.set_options(timeout=60_000)

# Set Z4J_LAYOUT_SHOTS to a folder to keep a screenshot of each width.
SHOTS = os.environ.get("Z4J_LAYOUT_SHOTS")

# The widest element's right edge, and which element it is: what overflows
# the window sideways (0 when nothing does).
OVERFLOW = """
() => {
  const width = document.documentElement.clientWidth;
  let worst = null;
  for (const el of document.body.querySelectorAll("*")) {
    if (el.closest("[hidden]") || el.getClientRects().length === 0) continue;
    // Inside a container that scrolls sideways, it is that container's to hold.
    let scroller = el.parentElement;
    while (scroller && scroller !== document.body) {
      const overflowX = getComputedStyle(scroller).overflowX;
      if (overflowX === "auto" || overflowX === "scroll" || overflowX === "hidden") break;
      scroller = scroller.parentElement;
    }
    if (scroller && scroller !== document.body) continue;
    const right = el.getBoundingClientRect().right;
    if (right > width + 0.5 && (worst === null || right > worst.right)) {
      worst = { right, what: el.tagName + (el.id ? "#" + el.id : "") + "." + el.className };
    }
  }
  return { width, scrollWidth: document.documentElement.scrollWidth, worst };
}
"""

# The agents table's last column against its scroll container, unscrolled:
# visible as the page opens, not after scrolling the card sideways.
LAST_COLUMN = """
() => {
  const table = document.getElementById("agents-table");
  const box = table.closest(".scroll");
  box.scrollLeft = 0;
  const cells = [...table.querySelectorAll("tr > :last-child")];
  const outer = box.getBoundingClientRect();
  const right = Math.max(...cells.map((c) => c.getBoundingClientRect().right));
  const left = Math.min(...cells.map((c) => c.getBoundingClientRect().left));
  return { left, right, boxLeft: outer.left, boxRight: outer.right,
           window: document.documentElement.clientWidth,
           hiddenWidth: box.scrollWidth - box.clientWidth,
           overflowX: getComputedStyle(box).overflowX };
}
"""


def sign_in(page: Page, dashboard: Dashboard) -> None:
    page.goto(f"{dashboard.url}/")
    expect(page).to_have_url(f"{dashboard.url}/login")
    page.fill("#token", dashboard.admin_token)
    page.click("#login-submit")
    expect(page).to_have_url(f"{dashboard.url}/")
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")


LONG_AGENT = "billing-reconciliation-nightly-exporter"
LONG_WORKER = "billing-reconciliation-nightly-exporter-worker-0001.eu-west.internal"


@pytest.fixture(scope="module")
def long_names(dashboard: Dashboard) -> None:
    """An agent and worker with long names: what pushed the last column out."""
    dashboard.add_agent(project="finance-operations", agent=LONG_AGENT, workers=[LONG_WORKER])


@pytest.mark.parametrize("width", [420, 1400, 1920])
def test_agents_table_and_nav_fit_the_window(
    page: Page, dashboard: Dashboard, long_names: None, width: int
) -> None:
    page.set_viewport_size({"width": width, "height": 900})
    sign_in(page, dashboard)
    table = page.locator("#agents-table")
    expect(table).to_contain_text("checkout-1")
    expect(table.locator(f'tr[data-worker="{LONG_WORKER}"]')).to_be_visible()
    # A cut name keeps its full text at hand.
    expect(table.locator(f'tr[data-worker="{LONG_WORKER}"] td').first).to_have_attribute(
        "title", LONG_WORKER
    )
    if SHOTS:
        page.screenshot(path=str(Path(SHOTS) / f"overview-{width}.png"), full_page=True)

    column = page.evaluate(LAST_COLUMN)
    assert column["boxLeft"] - 0.5 <= column["left"], column
    assert column["right"] <= column["boxRight"] + 0.5, column
    assert column["right"] <= column["window"] + 0.5, column
    assert column["hiddenWidth"] <= 0, column

    overflow = page.evaluate(OVERFLOW)
    assert overflow["worst"] is None, overflow
    assert overflow["scrollWidth"] <= overflow["width"], overflow

    # Every page link can be reached (scrolled to, if the bar scrolls) and followed.
    links = page.locator("#nav a:not([hidden])")
    for i in range(links.count()):
        link = links.nth(i)
        link.scroll_into_view_if_needed()
        box = link.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width + 0.5, box
    page.locator('#nav a[data-view="agents"]').click()
    expect(page.locator("#view-agents")).to_be_visible()
    expect(page.locator('#nav a[data-view="agents"]')).to_have_attribute("aria-current", "page")
    overflow = page.evaluate(OVERFLOW)
    assert overflow["worst"] is None, overflow
