"""The dashboard's dead letters (#/dead-letters), task registry (#/workers) and
audit log (#/audit), in a real Chromium.

The dead letter is made for real, as tests/test_dead_letters.py makes them:
the store refuses events of one kind (`refuse_kind`), an ingested payload of
that kind is set aside by the drain, the rule is lifted, and the page
re-queues it; it then drains into the store. The registry is what a real
agent connection's ``registry_delta`` frames left. What the page shows is
checked against what the brain stored.
"""

from __future__ import annotations

import functools
import json
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from playwright.sync_api import Page, expect

from z4j.protocol.agent import frames as f
from z4j.testing.agents import provision, raw_agent
from z4j.testing.brain import read_events
from z4j.testing.dead_letters import accept_kind, refuse_kind
from z4j.testing.store import open_store

if TYPE_CHECKING:
    from conftest import Dashboard  # tests/browser/conftest.py

expect.set_options(timeout=60_000)  # bounds failures only


def sign_in(page: Page, dashboard: Dashboard) -> None:
    page.goto(f"{dashboard.url}/")
    expect(page).to_have_url(f"{dashboard.url}/login")
    page.fill("#token", dashboard.admin_token)
    page.click("#login-submit")
    expect(page).to_have_url(f"{dashboard.url}/")
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")


def api(dashboard: Dashboard, method: str, path: str, body: Any = None) -> Any:
    request = urllib.request.Request(
        f"{dashboard.url}/api/v1{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "Authorization": f"Bearer {dashboard.admin_token}",
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60  # bounds failures only
    while not predicate():
        assert time.monotonic() < deadline, f"still not {what} after 60 s"
        time.sleep(0.05)


def dead_letter(dashboard: Dashboard, kind: str, n: int) -> int:
    """A real dead letter: a payload of ``kind`` the store refuses, set aside by the drain."""
    before = {d["id"] for d in api(dashboard, "GET", "/dead-letters")["items"]}
    refuse_kind(dashboard.config, kind)
    try:
        dashboard.ingest([{"t": kind, "n": n}])
        found: list[int] = []

        def set_aside() -> bool:
            found[:] = [
                d["id"]
                for d in api(dashboard, "GET", "/dead-letters")["items"]
                if d["id"] not in before
            ]
            return bool(found)

        wait_for(set_aside, "set aside")
    finally:
        accept_kind(dashboard.config, kind)
    return found[0]


def test_a_dead_letter_is_inspected_and_requeued_and_drains(
    page: Page, dashboard: Dashboard, tmp_path: Path
) -> None:
    letter = dead_letter(dashboard, "poison", 7)
    sign_in(page, dashboard)
    page.click("#nav a[data-view='dead-letters']")
    row = page.locator(f"#bdl-table tbody tr[data-id='{letter}']")
    expect(row).to_contain_text("tcp")
    expect(row).to_contain_text("poison")  # the store's refusal names the kind

    row.locator(".bdl-inspect").click()
    expect(page.locator("#bdl-detail")).to_be_visible()
    expect(page.locator("#bdl-detail-title")).to_have_text(f"Dead letter {letter}")
    expect(page.locator("#bdl-detail-body")).to_contain_text('"n": 7')
    expect(page.locator("#bdl-detail-error")).to_contain_text("poison")
    page.screenshot(path=str(tmp_path / "dead-letters.png"), full_page=True)

    # Re-queue asks first; cancelling leaves it there.
    row.locator(".bdl-requeue").click()
    expect(page.locator("#bdl-panel")).to_be_visible()
    expect(page.locator("#bdl-text")).to_contain_text(f"Re-queue dead letter {letter}?")
    page.click("#bdl-cancel")
    expect(page.locator("#bdl-panel")).to_be_hidden()
    expect(row).to_be_visible()

    row.locator(".bdl-requeue").click()
    page.click("#bdl-confirm")
    expect(page.locator("#bdl-result")).to_contain_text(f"Re-queued dead letter {letter}")
    expect(row).to_have_count(0)
    expect(page.locator("#bdl-detail")).to_be_hidden()

    # It drained: the store holds it now, and no dead letter is left of it.
    wait_for(
        lambda: any(e["body"] == {"t": "poison", "n": 7} for e in read_events(dashboard.config)),
        "stored",
    )
    assert api(dashboard, "GET", "/dead-letters")["items"] == []
    page.click("#bdl-refresh")
    expect(page.locator("#bdl-empty")).to_be_visible()


def test_a_dead_letter_is_discarded_after_asking(page: Page, dashboard: Dashboard) -> None:
    letter = dead_letter(dashboard, "junk", 1)
    sign_in(page, dashboard)
    page.goto(f"{dashboard.url}/#/dead-letters")
    row = page.locator(f"#bdl-table tbody tr[data-id='{letter}']")
    row.locator(".bdl-discard").click()
    expect(page.locator("#bdl-text")).to_contain_text("deleted for good")
    page.click("#bdl-confirm")
    expect(page.locator("#bdl-result")).to_contain_text(f"Discarded dead letter {letter}")
    expect(row).to_have_count(0)
    assert all(e["body"].get("t") != "junk" for e in read_events(dashboard.config))


def test_the_workers_page_shows_each_workers_task_registry(
    page: Page, dashboard: Dashboard
) -> None:
    token, secret, _ = dashboard.loop.run(
        functools.partial(provision, dashboard.config, project="reg", agent="tasks")
    )
    agent = dashboard.loop.enter(
        raw_agent(dashboard.brain.addresses.http, token, secret, worker_id="reg-1")
    )
    dashboard.loop.run(
        agent.send,
        f.RegistryDelta(
            engine="celery", added=({"name": "mail.send", "queue": "outbox"}, {"name": "a.b"})
        ),
    )
    sign_in(page, dashboard)
    page.click("#nav a[data-view='workers']")
    row = page.locator("#registry-table tbody tr[data-worker='reg-1']")
    expect(row).to_contain_text("reg / tasks")
    expect(row).to_contain_text("celery")
    expect(row.locator(".registry-tasks .pill")).to_have_text(["a.b", "mail.send"])


def test_the_audit_page_lists_an_api_action_with_its_actor(
    page: Page, dashboard: Dashboard, tmp_path: Path
) -> None:
    shots = tmp_path
    letter = dead_letter(dashboard, "stale", 1)
    api(dashboard, "POST", f"/dead-letters/{letter}/discard", {})
    rows = api(dashboard, "GET", "/audit?action=dead_letter.discarded&limit=500")["items"]
    (record,) = [r for r in rows if r["subject"].endswith(f"/{letter}")]
    actor = record["actor"]

    sign_in(page, dashboard)
    page.click("#nav a[data-view='audit']")
    row = page.locator(f"#audit-table tbody tr[data-id='{record['id']}']")
    expect(row.locator(".audit-actor")).to_have_text(actor)
    expect(row).to_contain_text("dead_letter.discarded")

    # Filters narrow the list; one that matches nothing empties it.
    page.fill("#af-action", "dead_letter.*")
    expect(page.locator("#audit-table tbody tr:not([data-action^='dead_letter.'])")).to_have_count(
        0
    )
    expect(row).to_be_visible()
    page.fill("#af-actor", f"{actor}-nobody")
    expect(page.locator("#audit-empty")).to_be_visible()
    page.fill("#af-actor", actor)
    expect(row).to_be_visible()
    page.select_option("#af-outcome", "refused")  # it went through
    expect(row).to_have_count(0)
    page.select_option("#af-outcome", "ok")
    expect(row).to_be_visible()
    page.screenshot(path=str(shots / "audit.png"), full_page=True)


def test_the_audit_page_pages_older_rows(page: Page, dashboard: Dashboard) -> None:
    async def write(n: int) -> None:
        async with open_store(dashboard.config) as store:
            for i in range(n):
                await store.audit("test.step", f"step:{i}", {}, actor="pager")

    dashboard.loop.run(write, 60)
    sign_in(page, dashboard)
    page.goto(f"{dashboard.url}/#/audit")
    page.fill("#af-actor", "pager")
    expect(page.locator("#audit-card")).to_have_attribute("data-query", "limit=50&actor=pager")
    rows = page.locator("#audit-table tbody tr")
    expect(rows).to_have_count(50)
    expect(rows.first).to_contain_text("step:59")
    page.click("#audit-more")
    expect(rows).to_have_count(60)
    expect(rows.last).to_contain_text("step:0")
    expect(page.locator("#audit-more")).to_be_hidden()
