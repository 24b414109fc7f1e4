"""The dashboard's event search page in a real headless Chromium.

Events come from the module's agent ("shop / checkout", through its spool
and /ws/agent) and from TCP ingest, each carrying a fresh marker that the
page's text search narrows to. The exports are downloaded by the browser
from the page's links and read back from the saved files.
"""

from __future__ import annotations

import csv
import io
import json
import time
import urllib.request
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from playwright.sync_api import Page, expect

if TYPE_CHECKING:
    from conftest import Dashboard  # tests/browser/conftest.py

# Bounds on failures only (each passes as soon as the page shows it).
expect.set_options(timeout=60_000)


def sign_in(page: Page, dashboard: Dashboard) -> None:
    page.goto(f"{dashboard.url}/")
    expect(page).to_have_url(f"{dashboard.url}/login")
    page.fill("#token", dashboard.admin_token)
    page.click("#login-submit")
    expect(page).to_have_url(f"{dashboard.url}/")


def api_get(dashboard: Dashboard, path: str) -> Any:
    request = urllib.request.Request(
        f"{dashboard.url}{path}", headers={"Authorization": f"Bearer {dashboard.admin_token}"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def stored(dashboard: Dashboard, marker: str, count: int) -> list[dict[str, Any]]:
    """The events whose body holds ``marker``, once ``count`` are stored (the drain is async)."""
    deadline = time.monotonic() + 60
    while True:
        items = api_get(dashboard, f"/api/v1/events?q={marker}&limit=500")["items"]
        if len(items) >= count:
            assert len(items) == count
            return list(items)
        assert time.monotonic() < deadline, f"{len(items)} of {count} events stored in 60 s"
        time.sleep(0.05)


def download(page: Page, link: str) -> tuple[str, str]:
    """Click an export link: the saved file's suggested name and its text."""
    with page.expect_download() as info:
        page.click(link)
    saved = info.value
    return saved.suggested_filename, Path(saved.path()).read_text(encoding="utf-8")


def test_search_events_page_through_them_and_export_them(page: Page, dashboard: Dashboard) -> None:
    m = uuid.uuid4().hex[:10]
    for n in range(25):
        dashboard.emit(
            {
                "kind": "search.note",
                "task_id": f"{m}-{n}",
                "data": {"text": f'{m} note {n}, "quoted"\nsecond line'},
            }
        )
    dashboard.ingest([{"t": "search.tcp", "msg": f"{m} from tcp {n}"} for n in range(3)])
    events = stored(dashboard, m, 28)

    sign_in(page, dashboard)
    page.click('#nav a[data-view="search"]')
    expect(page.locator("#view-search")).to_be_visible()
    expect(page).to_have_url(f"{dashboard.url}/#/search")

    # The text box, 20 a page, then "Older" for the rest: newest first, none twice.
    page.select_option("#sf-limit", "20")
    page.fill("#sf-q", m)
    page.click("#sf-submit")
    rows = page.locator("#search-table tbody tr")
    expect(rows).to_have_count(20)
    expect(page.locator("#search-older")).to_be_visible()
    page.click("#search-older")
    expect(rows).to_have_count(28)
    expect(page.locator("#search-older")).to_be_hidden()
    shown = rows.evaluate_all("rs => rs.map(r => Number(r.dataset.id))")
    assert shown == [e["id"] for e in events]
    expect(page.locator("#search-hint")).to_contain_text("28 shown")
    expect(rows.first).to_contain_text(m)

    # The histogram counts the same events (the default range: the last day).
    hint = page.locator("#search-histogram-hint")
    expect(hint).to_have_attribute("data-total", "28")
    bars = page.locator("#search-histogram rect.bar")
    assert sum(bars.evaluate_all("bs => bs.map(b => Number(b.dataset.count))")) == 28

    # Narrowed to the agent and a kind.
    page.select_option("#sf-limit", "50")
    page.select_option("#sf-agent", dashboard.agent_id)
    expect(page.locator("#sf-agent option:checked")).to_have_text("shop / checkout")
    page.fill("#sf-kind", "search.note")
    page.click("#sf-submit")
    expect(rows).to_have_count(25)
    assert set(rows.evaluate_all("rs => rs.map(r => r.dataset.kind)")) == {"search.note"}
    expect(rows.first).to_contain_text("checkout-1")
    expect(hint).to_have_attribute("data-total", "25")

    # The exports of what is shown, as files the browser saved.
    name, text = download(page, "#search-export-ndjson")
    assert name.startswith("z4j-events-") and name.endswith(".ndjson")
    lines = [json.loads(line) for line in text.splitlines()]
    notes = [e for e in events if e["kind"] == "search.note"]
    assert [line["id"] for line in lines] == [e["id"] for e in notes]
    assert {line["agent_id"] for line in lines} == {dashboard.agent_id}
    assert {line["worker_id"] for line in lines} == {"checkout-1"}
    assert [line["body"] for line in lines] == [e["body"] for e in notes]

    name, text = download(page, "#search-export-csv")
    assert name.endswith(".csv")
    table = list(csv.reader(io.StringIO(text, newline="")))
    assert table[0][:5] == ["id", "key", "received_at", "source", "kind"]
    assert [int(row[0]) for row in table[1:]] == [e["id"] for e in notes]
    bodies = [json.loads(row[-1]) for row in table[1:]]
    assert bodies == [e["body"] for e in notes]
    assert all('"quoted"\nsecond line' in b["data"]["text"] for b in bodies)

    # A range with nothing in it; then a bad one is refused with the brain's reason.
    page.fill("#sf-since", "2099-01-01T00:00:00")
    page.click("#sf-submit")
    expect(page.locator("#search-empty")).to_be_visible()
    expect(rows).to_have_count(0)
    page.fill("#sf-since", "")
    page.fill("#sf-worker", "w" * 201)
    page.click("#sf-submit")
    expect(page.locator("#search-error")).to_contain_text("worker_id: at most 200 characters")
