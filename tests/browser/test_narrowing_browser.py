"""A user narrowed to one project, in a real headless Chromium: the overview,
tasks and search pages work for them (no project parameter to give) and
show their project's tasks and events only.

Two projects of the module's brain report a task of the same marker: "jobs"
(`task_agent`), the one the user is narrowed to, and "shop" (the
dashboard's own agent). An admin sees both; the narrowed user one.
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from typing import TYPE_CHECKING, Any

from playwright.sync_api import Page, expect

if TYPE_CHECKING:
    from conftest import Dashboard, TaskAgent  # tests/browser/conftest.py

expect.set_options(timeout=60_000)  # bounds failures only
PASSWORD = "correct horse battery"


def api(dashboard: Dashboard, method: str, path: str, body: Any = None) -> Any:
    request = urllib.request.Request(
        f"{dashboard.url}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "Authorization": f"Bearer {dashboard.admin_token}",
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def until(what: str, check: Any) -> None:
    deadline = time.monotonic() + 60
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within 60 s"
        time.sleep(0.05)


def test_a_narrowed_user_uses_the_tasks_and_search_pages_on_their_project(
    page: Page, dashboard: Dashboard, task_agent: TaskAgent
) -> None:
    m = uuid.uuid4().hex[:10]
    mine, other = f"{m}-jobs", f"{m}-shop"
    task_agent.emit("failed", mine, task_name=f"jobs.{m}", exception="E")
    dashboard.emit(
        {"kind": "task.failed", "engine": "trio", "task_id": other, "data": {"task_name": "x"}}
    )
    until(
        "both tasks",
        lambda: len(api(dashboard, "GET", f"/api/v1/tasks?q={m}")["items"]) == 2,
    )
    name = f"nora-{m}"
    api(
        dashboard,
        "POST",
        "/api/v1/users",
        {"name": name, "password": PASSWORD, "role": "operator", "projects": ["jobs"]},
    )

    page.goto(f"{dashboard.url}/")
    expect(page).to_have_url(f"{dashboard.url}/login")
    page.fill("#name", name)
    page.fill("#password", PASSWORD)
    page.click("#login-submit")
    expect(page).to_have_url(f"{dashboard.url}/")
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")

    page.click('#nav a[data-view="tasks"]')
    expect(page.locator("#view-tasks")).to_be_visible()
    page.fill("#tf-q", m)
    rows = page.locator("#tasks-table tbody tr")
    expect(rows).to_have_count(1)
    expect(page.locator(f'#tasks-table tbody tr[data-task-id="{mine}"]')).to_be_visible()

    page.click('#nav a[data-view="search"]')
    expect(page.locator("#view-search")).to_be_visible()
    page.fill("#sf-q", m)
    page.click("#sf-submit")
    found = page.locator("#search-table tbody tr")
    expect(found).to_have_count(1)
    expect(found.first).to_contain_text(mine)
    expect(page.locator("#search-histogram-hint")).to_have_attribute("data-total", "1")
    assert other not in page.content()
