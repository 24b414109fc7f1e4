"""The dashboard's tasks, task and queues pages in a real headless Chromium.

A real brain; an agent (`task_agent`) that reports tasks of engine ``trio``
and answers ``retry_task`` and ``cancel_task`` as an adapter would; a raw
agent (`queue_agent`) whose heartbeats report a celery broker's queue
depths. Each test marks its tasks with a fresh marker in their ids and
names, and narrows the page to them with the text search, so the tests of
this module (one brain) do not see each other's tasks.

What the page sends is checked where it lands: the commands the brain
stored (GET /api/v1/commands/{id}) and what the agent was given.
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import pytest
from playwright.sync_api import Page, expect

from z4j.brain.http.queues_api import purge_token
from z4j.store import tasks as task_sql

if TYPE_CHECKING:
    from conftest import Dashboard, QueueAgent, TaskAgent  # tests/browser/conftest.py

# Bounds on failures only (each passes as soon as the page shows it): generous.
expect.set_options(timeout=60_000)
# Except for what must come over the socket: under it the page also reads the
# API every 30 s (app.js POLL_MS), which would bring it too, only later. A
# live change takes well under a second; half the poll period tells the two apart.
LIVE_MS = 15_000


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


def api_get(dashboard: Dashboard, path: str) -> Any:
    request = urllib.request.Request(
        f"{dashboard.url}{path}", headers={"Authorization": f"Bearer {dashboard.admin_token}"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def wait_for(what: str, check: Callable[[], bool]) -> None:
    """Until ``check()`` holds (it asks the brain's API), for at most 60 s."""
    deadline = time.monotonic() + 60
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within 60 s"
        time.sleep(0.05)


def wait_tasks(dashboard: Dashboard, count: int, **query: str) -> None:
    """Until the projection lists ``count`` tasks for ``query`` (events drain asynchronously)."""
    path = f"/api/v1/tasks?{urlencode({**query, 'limit': 500})}"
    wait_for(f"{count} tasks for {query}", lambda: len(api_get(dashboard, path)["items"]) == count)


def commands(dashboard: Dashboard, action: str, task_ids: set[str]) -> list[dict[str, Any]]:
    """The stored commands of ``action`` whose parameters name one of ``task_ids``."""
    items = api_get(dashboard, "/api/v1/commands?limit=500")["items"]
    return [
        c for c in items if c["action"] == action and c["parameters"].get("task_id") in task_ids
    ]


def marker() -> str:
    return uuid.uuid4().hex[:10]


def open_tasks(page: Page, search: str) -> None:
    page.click('#nav a[data-view="tasks"]')
    expect(page.locator("#view-tasks")).to_be_visible()
    expect(page.locator('#nav a[data-view="tasks"]')).to_have_attribute("aria-current", "page")
    page.fill("#tf-q", search)


def row(page: Page, task_id: str) -> Any:
    return page.locator(f'#tasks-table tbody tr[data-task-id="{task_id}"]')


def tab(page: Page, state: str) -> Any:
    return page.locator(f'#state-tabs [data-state="{state}"]')


def open_task(page: Page, task_id: str) -> None:
    """From the tasks page (narrowed to the task), to the task's own page."""
    page.click("#nav a[data-view='tasks']")
    page.fill("#tf-q", task_id)
    row(page, task_id).locator("td").nth(3).click()  # the id cell: the whole row opens it
    expect(page.locator("#view-task")).to_be_visible()
    expect(page.locator('#task-summary dd[data-field="task_id"]')).to_have_text(task_id)


def test_state_tabs_and_search_narrow_the_list_and_it_updates_live(
    page: Page, dashboard: Dashboard, task_agent: TaskAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = marker()
    name = f"shop.{m}.charge"
    ids = {k: f"{m}-{k}" for k in ("ok", "bad", "bad2", "run")}
    emit = task_agent.emit
    emit("received", ids["ok"], task_name=name, queue="payments", args=[1], kwargs={})
    emit("started", ids["ok"], task_name=name, worker="runner@host-1")
    emit("succeeded", ids["ok"], task_name=name, runtime_ms=120, result={"charged": 1})
    emit("received", ids["bad"], task_name=name, queue="payments")
    emit(
        "failed",
        ids["bad"],
        task_name=name,
        exception="ValueError",
        exception_message=f"card declined {m}",
    )
    emit("failed", ids["bad2"], task_name=name, exception="KeyError: 'customer'")
    emit("started", ids["run"], task_name=name, queue="payments")
    wait_tasks(dashboard, 4, q=m)

    sign_in(page, dashboard)
    open_tasks(page, m)
    rows = page.locator("#tasks-table tbody tr")
    expect(rows).to_have_count(4)
    # Newest first: the order the tasks last changed in.
    assert rows.evaluate_all("rs => rs.map(r => r.dataset.taskId)") == [
        ids["run"],
        ids["bad2"],
        ids["bad"],
        ids["ok"],
    ]
    for state, count in [("", 4), ("failed", 2), ("succeeded", 1), ("started", 1)]:
        expect(tab(page, state).locator(".count")).to_have_text(str(count))
    expect(tab(page, "received").locator(".count")).to_have_text("0")
    ok = row(page, ids["ok"])
    expect(ok.locator(".pill")).to_have_text("succeeded")
    expect(ok).to_contain_text(name)
    expect(ok).to_contain_text("trio")
    expect(ok).to_contain_text("payments")
    expect(ok).to_contain_text("runner@host-1")
    expect(ok).to_contain_text("120 ms")
    expect(ok.locator("td").nth(5)).to_have_text("1")  # attempts

    # A state tab: only that state, the others' counts kept.
    tab(page, "failed").click()
    expect(tab(page, "failed")).to_have_attribute("aria-selected", "true")
    expect(rows).to_have_count(2)
    assert set(rows.evaluate_all("rs => rs.map(r => r.dataset.state)")) == {"failed"}
    expect(tab(page, "").locator(".count")).to_have_text("4")

    # The search reaches the exception's message.
    page.fill("#tf-q", f"card declined {m}")
    expect(rows).to_have_count(1)
    expect(row(page, ids["bad"])).to_be_visible()

    # Live: a task that fails now shows up, in this tab, without a reload.
    page.fill("#tf-q", m)
    expect(rows).to_have_count(2)
    late = f"{m}-late"
    emit("failed", late, task_name=name, exception="RuntimeError")
    expect(row(page, late)).to_be_visible(timeout=LIVE_MS)
    expect(rows).to_have_count(3)
    expect(tab(page, "failed").locator(".count")).to_have_text("3")
    expect(tab(page, "").locator(".count")).to_have_text("5")
    assert rows.first.get_attribute("data-task-id") == late

    # A search is counted over its newest matches (COUNT_WINDOW, lowered
    # here, in the brain this test runs): once that window fills, each
    # count is a lower bound, and says so.
    monkeypatch.setattr(task_sql, "COUNT_WINDOW", 1)
    page.fill("#tf-q", late)
    expect(rows).to_have_count(1)
    expect(tab(page, "").locator(".count")).to_have_text("1+")
    expect(tab(page, "failed").locator(".count")).to_have_text("1+")
    expect(page.locator("#tasks-hint")).to_contain_text("1 of 1+ shown")
    assert_no_reload(page)


def test_task_page_and_retry_with_different_inputs(
    page: Page, dashboard: Dashboard, task_agent: TaskAgent
) -> None:
    m = marker()
    task_id = f"{m}-pay"
    name = f"shop.{m}.pay"
    emit = task_agent.emit
    emit(
        "received",
        task_id,
        task_name=name,
        queue="payments",
        args=[10, "eur"],
        kwargs={"customer": "c-1"},
        parent_task_id=f"{m}-order",
    )
    emit("started", task_id, task_name=name, worker="runner@host-1")
    emit(
        "retried",
        task_id,
        task_name=name,
        exception="TimeoutError",
        exception_message="gateway slow",
    )
    emit("started", task_id, task_name=name, worker="runner@host-2")
    emit(
        "failed",
        task_id,
        task_name=name,
        exception="ValueError",
        exception_message="card declined",
        runtime_ms=42,
        traceback='Traceback (most recent call last):\n  File "pay.py", line 9\nValueError',
    )
    wait_tasks(dashboard, 1, q=task_id, state="failed")  # its last event is in

    sign_in(page, dashboard)
    open_task(page, task_id)
    assert f"#/tasks/trio/{task_id}?project=" in page.url  # the address names the task
    expect(page.locator("#task-title")).to_have_text(name)
    expect(page.locator("#task-state .pill")).to_have_text("failed")
    summary = page.locator("#task-summary")
    expect(summary.locator('dd[data-field="queue"]')).to_have_text("payments")
    expect(summary.locator('dd[data-field="attempts"]')).to_have_text("2")
    expect(summary.locator('dd[data-field="worker"]')).to_have_text("runner@host-2")
    expect(summary.locator('dd[data-field="agent"]')).to_have_text("jobs / runner")
    attempts = page.locator("#task-timeline tbody tr")
    expect(attempts).to_have_count(2)
    expect(attempts.nth(0)).to_have_attribute("data-state", "retried")
    expect(attempts.nth(0)).to_contain_text("TimeoutError: gateway slow")
    expect(attempts.nth(0)).to_contain_text("runner@host-1")
    expect(attempts.nth(1)).to_have_attribute("data-state", "failed")
    expect(attempts.nth(1)).to_contain_text("42 ms")
    assert json.loads(page.locator("#task-args").text_content() or "") == [10, "eur"]
    assert json.loads(page.locator("#task-kwargs").text_content() or "") == {"customer": "c-1"}
    expect(page.locator("#task-exception .exc-type")).to_have_text("ValueError")
    expect(page.locator("#task-exception .exc-message")).to_have_text("card declined")
    expect(page.locator("#task-traceback")).to_contain_text('File "pay.py", line 9')
    expect(page.locator('#task-lineage dd[data-field="parent"]')).to_have_text(f"{m}-order")
    expect(page.locator("#task-commands")).to_have_text("No command has named this task.")

    # The form starts from the task's own inputs.
    page.click("#task-retry-inputs")
    expect(page.locator("#retry-form")).to_be_visible()
    assert json.loads(page.input_value("#retry-args")) == [10, "eur"]
    assert json.loads(page.input_value("#retry-kwargs")) == {"customer": "c-1"}
    # What is not JSON, or not a list and an object, is caught before sending.
    page.fill("#retry-args", "[10, ")
    page.click("#retry-form-send")
    expect(page.locator("#retry-form-error")).to_contain_text("args is not valid JSON")
    page.fill("#retry-args", '[25, "usd"]')
    page.fill("#retry-kwargs", "[1]")
    page.click("#retry-form-send")
    expect(page.locator("#retry-form-error")).to_contain_text("kwargs must be a JSON object")
    assert commands(dashboard, "retry_task", {task_id}) == []

    page.fill("#retry-kwargs", '{"customer": "c-2", "note": "by hand"}')
    page.click("#retry-form-send")
    result = page.locator("#task-action-result")
    expect(result).to_contain_text("Retry with new inputs sent as command")
    expect(page.locator("#retry-form")).to_be_hidden()
    command_id = result.get_attribute("data-command")
    assert command_id
    command = api_get(dashboard, f"/api/v1/commands/{command_id}")
    assert command["action"] == "retry_task"
    assert command["target"] == {"engine": "trio", "task_id": task_id}
    assert command["parameters"]["override_args"] == [25, "usd"]
    assert command["parameters"]["override_kwargs"] == {"customer": "c-2", "note": "by hand"}
    assert command["parameters"]["task_name"] == name

    # The agent answers with the new task's id: the command's row links to it.
    line = page.locator(f'#task-commands tr[data-id="{command_id}"]')
    expect(line).to_have_attribute("data-state", "completed")
    new_id = api_get(dashboard, f"/api/v1/commands/{command_id}")["result"]["new_task_id"]
    assert ("retry_task", command["target"], command["parameters"]) in task_agent.commands
    expect(line.locator(".new-task-link")).to_have_text(new_id)
    expect(page.locator('#task-lineage dd[data-field="retried_as"]')).to_have_text(new_id)
    line.locator(".new-task-link").click()
    expect(page.locator('#task-summary dd[data-field="task_id"]')).to_have_text(new_id)
    expect(page.locator("#task-title")).to_have_text(name)
    expect(page.locator("#task-state .pill")).to_have_text("received")
    assert json.loads(page.locator("#task-args").text_content() or "") == [25, "usd"]
    expect(page.locator('#task-lineage dd[data-field="retry_of"]')).to_have_text(task_id)
    assert_no_reload(page)


def test_one_click_retry_cancel_and_only_the_offered_actions(
    page: Page, dashboard: Dashboard, task_agent: TaskAgent
) -> None:
    m = marker()
    with_inputs, without, elsewhere = f"{m}-in", f"{m}-bare", f"{m}-else"
    name = f"shop.{m}.mail"
    task_agent.emit("received", with_inputs, task_name=name, args=[3], kwargs={"to": "a@b"})
    task_agent.emit("failed", with_inputs, task_name=name, exception="OSError")
    task_agent.emit("failed", without, task_name=name, exception="OSError")  # inputs unknown
    # The first agent takes no task action: its tasks offer none.
    dashboard.emit(
        {
            "kind": "task.failed",
            "engine": "trio",
            "task_id": elsewhere,
            "data": {"task_name": name, "args": [], "kwargs": {}},
        }
    )
    wait_tasks(dashboard, 3, q=m)

    sign_in(page, dashboard)
    open_task(page, with_inputs)
    page.click("#task-retry")
    result = page.locator("#task-action-result")
    expect(result).to_contain_text("Retry sent as command")
    command_id = result.get_attribute("data-command")
    command = api_get(dashboard, f"/api/v1/commands/{command_id}")
    assert command["action"] == "retry_task"
    # trio sends a task again with its inputs: the brain filled in the reported ones.
    assert command["parameters"] == {
        "engine": "trio",
        "task_id": with_inputs,
        "task_name": name,
        "override_args": [3],
        "override_kwargs": {"to": "a@b"},
    }
    expect(page.locator(f'#task-commands tr[data-id="{command_id}"]')).to_have_attribute(
        "data-state", "completed"
    )

    page.click("#task-cancel")
    expect(result).to_contain_text("Cancel sent as command")
    cancel_id = result.get_attribute("data-command")
    assert cancel_id != command_id
    cancel = api_get(dashboard, f"/api/v1/commands/{cancel_id}")
    assert (cancel["action"], cancel["parameters"]) == (
        "cancel_task",
        {"engine": "trio", "task_id": with_inputs},
    )
    expect(page.locator(f'#task-commands tr[data-id="{cancel_id}"]')).to_contain_text("cancelled")

    # Inputs never reported: a one-click retry opens the form, with [] and {}, and says why.
    open_task(page, without)
    expect(page.locator("#retry-form")).to_be_hidden()
    page.click("#task-retry")
    expect(page.locator("#retry-form")).to_be_visible()
    expect(page.locator("#retry-form-note")).to_contain_text("never reported")
    assert page.input_value("#retry-args") == "[]"
    assert page.input_value("#retry-kwargs") == "{}"
    expect(result).to_be_hidden()
    assert commands(dashboard, "retry_task", {without}) == []
    page.click("#retry-form-send")  # [] and {} are inputs too
    expect(result).to_contain_text("Retry with new inputs sent as command")
    sent = commands(dashboard, "retry_task", {without})
    assert [c["parameters"]["override_args"] for c in sent] == [[]]

    # No worker of the first agent offers either action: no button.
    open_task(page, elsewhere)
    expect(page.locator("#task-actions")).to_contain_text("no worker of its agent offers")
    expect(page.locator("#task-retry")).to_have_count(0)
    expect(page.locator("#task-retry-inputs")).to_have_count(0)
    expect(page.locator("#task-cancel")).to_have_count(0)
    assert_no_reload(page)


def test_more_pages_and_a_bulk_retry_capped_and_confirmed(
    page: Page, dashboard: Dashboard, task_agent: TaskAgent
) -> None:
    many, few = marker(), marker()
    for i in range(105):
        task_agent.emit(
            "failed",
            f"{many}-{i:03d}",
            task_name=f"shop.{many}.job",
            args=[i],
            kwargs={},
            exception="OSError",
        )
    failing = {f"{few}-{i}" for i in range(3)}
    for task_id in sorted(failing):
        task_agent.emit(
            "failed", task_id, task_name=f"shop.{few}.job", args=[], kwargs={}, exception="OSError"
        )
    task_agent.emit("succeeded", f"{few}-ok", task_name=f"shop.{few}.job", args=[], kwargs={})
    wait_tasks(dashboard, 105, q=many)
    wait_tasks(dashboard, 4, q=few)

    sign_in(page, dashboard)
    open_tasks(page, many)
    rows = page.locator("#tasks-table tbody tr")
    expect(rows).to_have_count(50)
    expect(page.locator("#tasks-hint")).to_have_text("50 of 105 shown, newest first")
    page.click("#tasks-more")
    expect(rows).to_have_count(100)
    page.click("#tasks-more")
    expect(rows).to_have_count(105)
    expect(page.locator("#tasks-more")).to_be_hidden()
    ids = rows.evaluate_all("rs => rs.map(r => r.dataset.taskId)")
    assert ids == [f"{many}-{i:03d}" for i in reversed(range(105))]  # no gap, no repeat

    # More than one bulk retry takes: it says so, and cancelling sends nothing.
    tab(page, "failed").click()
    expect(tab(page, "failed").locator(".count")).to_have_text("105")
    page.click("#bulk-retry")
    panel = page.locator("#bulk-panel")
    expect(panel).to_be_visible()
    expect(panel).to_contain_text("Retry 100 tasks?")
    expect(panel).to_contain_text("105 tasks match this filter")
    expect(panel).to_contain_text("at most 100")
    expect(page.locator("#bulk-confirm")).to_have_text("Retry 100 tasks")
    page.click("#bulk-cancel")
    expect(panel).to_be_hidden()
    all_many = {f"{many}-{i:03d}" for i in range(105)}
    assert commands(dashboard, "retry_task", all_many) == []

    # The failed ones of the other group: the count, then one retry each.
    page.fill("#tf-q", few)
    expect(rows).to_have_count(3)
    page.click("#bulk-retry")
    expect(panel).to_contain_text("Retry 3 tasks?")
    expect(panel).to_contain_text("These are the 3 tasks that match this filter.")
    expect(page.locator("#bulk-confirm")).to_have_text("Retry 3 tasks")
    assert commands(dashboard, "retry_task", failing | {f"{few}-ok"}) == []
    page.click("#bulk-confirm")
    report = page.locator("#bulk-result")
    expect(report).to_have_attribute("data-state", "done")
    expect(report).to_have_text("Retry sent for 3 of 3 tasks.")
    sent = commands(dashboard, "retry_task", failing | {f"{few}-ok"})
    assert sorted(c["parameters"]["task_id"] for c in sent) == sorted(failing)
    assert commands(dashboard, "retry_task", all_many) == []
    assert_no_reload(page)


def test_queues_page_and_purge_confirms_the_depth(
    page: Page, dashboard: Dashboard, queue_agent: QueueAgent
) -> None:
    def reported() -> bool:
        items = api_get(dashboard, "/api/v1/queues")["items"]
        return any(q["queue"] == "emails" and q["depths"] for q in items)

    wait_for("the queue agent's depths", reported)
    sign_in(page, dashboard)
    page.click('#nav a[data-view="queues"]')
    expect(page.locator("#view-queues")).to_be_visible()
    line = page.locator('#queues-table tr[data-engine="celery"][data-queue="emails"]')
    expect(line.locator(".depth")).to_have_text("7")
    expect(line).to_contain_text("mail / broker · broker-1: 7")
    expect(line).to_contain_text("redis")

    # Step one asks the brain, which answers with the depth it last saw.
    with page.expect_request(lambda r: r.method == "POST" and "/purge" in r.url) as first:
        line.get_by_role("button", name="Purge").click()
    assert first.value.post_data_json == {"agent_id": queue_agent.agent_id}
    panel = page.locator("#purge-panel")
    expect(panel).to_be_visible()
    expect(panel).to_have_attribute("data-depth", "7")
    expect(panel).to_contain_text("celery queue “emails” on mail / broker")
    expect(panel).to_contain_text("The brain last saw 7 messages in it.")
    expect(page.locator("#purge-confirm")).to_have_text("Purge 7 messages")
    purges = [
        c
        for c in api_get(dashboard, "/api/v1/commands?limit=500")["items"]
        if c["action"] == "purge_queue"
    ]
    assert purges == []  # nothing is purged before the operator confirms

    # Step two names that depth; the brain signs it for the agent to check.
    with page.expect_request(lambda r: r.method == "POST" and "/purge" in r.url) as second:
        page.click("#purge-confirm")
    assert second.value.post_data_json == {"agent_id": queue_agent.agent_id, "confirm_depth": 7}
    result = page.locator("#purge-result")
    expect(result).to_contain_text("Purge sent as command")
    expect(panel).to_be_hidden()
    command = api_get(dashboard, f"/api/v1/commands/{result.get_attribute('data-command')}")
    assert command["action"] == "purge_queue"
    assert command["agent_id"] == queue_agent.agent_id
    assert command["target"] == {"engine": "celery", "queue": "emails"}
    assert command["parameters"]["confirm_token"] == purge_token(
        queue_agent.project_key, "emails", 7
    )
    assert_no_reload(page)


def test_events_list_filters_by_task_engine_and_task_name(
    page: Page, dashboard: Dashboard, task_agent: TaskAgent
) -> None:
    m = marker()
    a, b, h = f"{m}-a", f"{m}-b", f"{m}-h"
    task_agent.emit("received", a, task_name=f"shop.{m}.a")
    task_agent.emit("succeeded", a, task_name=f"shop.{m}.a")
    task_agent.emit("received", b, task_name=f"shop.{m}.b")
    dashboard.emit(
        {
            "kind": "task.received",
            "engine": "huey",
            "task_id": h,
            "data": {"task_name": f"shop.{m}.h"},
        }
    )
    wait_for(
        "the events stored",
        lambda: (
            len(api_get(dashboard, f"/api/v1/events?engine=huey&task_id={h}")["items"]) == 1
            and len(api_get(dashboard, f"/api/v1/events?task_id={a}")["items"]) == 2
        ),
    )

    sign_in(page, dashboard)
    feed = page.locator("#feed li")
    page.fill("#ff-task", a)
    page.press("#ff-task", "Enter")
    expect(feed).to_have_count(2)
    expect(page.locator("#feed li", has_text=a)).to_have_count(2)
    expect(page.locator("#feed-hint")).to_contain_text(f"only task id {a}")

    # Live, under the filter: the task's new event shows, another task's does not.
    task_agent.emit("received", b, task_name=f"shop.{m}.b", note="not this one")
    task_agent.emit("retried", a, task_name=f"shop.{m}.a")
    expect(page.locator("#feed li", has_text=a)).to_have_count(3, timeout=LIVE_MS)
    expect(feed).to_have_count(3)
    expect(page.locator("#feed li", has_text=b)).to_have_count(0)

    page.fill("#ff-task", "")
    page.fill("#ff-engine", "huey")
    page.fill("#ff-name", f"shop.{m}.h")
    page.press("#ff-name", "Enter")
    expect(feed).to_have_count(1)
    expect(feed.first).to_contain_text(h)

    page.fill("#ff-engine", "")
    page.fill("#ff-name", f"shop.{m}.b")
    page.press("#ff-name", "Enter")
    expect(feed).to_have_count(2)
    expect(page.locator("#feed li", has_text=b)).to_have_count(2)

    page.click("#ff-clear")
    expect(page.locator("#feed li", has_text=h)).to_have_count(1)  # the whole list again
    assert_no_reload(page)
