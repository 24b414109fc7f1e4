"""``/api/v1/tasks``: the projection as the API serves it, and the actions on a task.

A raw agent (no engine) sends the task events and advertises capabilities,
so that each rule is seen on its own: what the API lists and filters, what
a retry or cancel command carries, and when an action is refused. The real
adapters run the same actions end to end in tests/test_engine_adapters.py.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import trio

from z4j.config import Config
from z4j.protocol.agent import frames as f
from z4j.testing.agents import RawAgent, admin_token, provision, raw_agent
from z4j.testing.brain import RunningBrain, running_brain, wait_until
from z4j.testing.http import http_request


async def call(
    http: tuple[str, int], method: str, path: str, token: str, body: Any = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    payload = b""
    if body is not None:
        headers["Content-Type"] = "application/json"
        payload = orjson.dumps(body)
    reply = await http_request(http, method, path, body=payload, headers=headers)
    return reply.status, reply.json()


def event(kind: str, task_id: str, engine: str, n: int, **data: Any) -> f.AgentEvent:
    raw = {
        "id": f"{engine}-{task_id}-{kind}-{n}",
        "kind": kind,
        "engine": engine,
        "task_id": task_id,
        "occurred_at": f"2026-12-06T10:00:{n:02d}+00:00",
        "data": data,
    }
    return f.AgentEvent(id=raw["id"], kind=kind, raw=raw)


CAPABILITIES = {
    "celery": ["bulk_retry", "cancel_task", "retry_task", "submit_task"],
    "huey": ["retry_task", "submit_task"],
}
EVENTS = (
    # celery: by reference; its failed run has inputs, but retry needs only the name.
    event("task.received", "c-1", "celery", 1, task_name="app.add", args=[1, 2], kwargs={}),
    event("task.started", "c-1", "celery", 2, task_name="app.add"),
    event(
        "task.failed",
        "c-1",
        "celery",
        3,
        task_name="app.add",
        exception="ValueError",
        exception_message="boom",
    ),
    # huey: re-sent with its inputs, which it reported.
    event("task.received", "h-1", "huey", 4, task_name="mul", args=[3], kwargs={"k": 1}),
    event("task.failed", "h-1", "huey", 5, task_name="mul", exception="KeyError: 'x'"),
    # huey without inputs: no one-click retry.
    event("task.started", "h-2", "huey", 6, task_name="mul"),
    event("task.succeeded", "h-2", "huey", 7, task_name="mul"),
)
EXTRA = (
    event("task.received", "c-2", "celery", 8, task_name="app.add", args=[], kwargs={}),
    event("task.failed", "c-2", "celery", 9, task_name="app.add", exception="E"),
)


@asynccontextmanager
async def agent_sent(
    config: Config, events: tuple[f.AgentEvent, ...]
) -> AsyncIterator[tuple[RunningBrain, tuple[str, int], str, uuid.UUID, RawAgent]]:
    """(brain, its HTTP address, an admin token, the agent's id, the agent):
    a raw agent advertising CAPABILITIES, whose ``events`` the projection
    holds when the block starts."""
    token, secret, agent_id = await provision(config)
    admin = await admin_token(config)
    tasks = {e.raw["task_id"] for e in events}
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            async with raw_agent(
                http, token, secret, prove=True, capabilities=CAPABILITIES
            ) as agent:
                if events:
                    await agent.send(f.EventBatch(events=events), frame_id="b-1")

                async def all_there() -> bool:
                    status, body = await call(http, "GET", "/api/v1/tasks", admin)
                    return status == 200 and len(body["items"]) == len(tasks)

                await wait_until(all_there, timeout=30)
                yield brain, http, admin, agent_id, agent


async def test_tasks_are_listed_filtered_and_acted_on(config: Config) -> None:
    async with agent_sent(config, EVENTS) as (brain, http, admin, agent_id, agent):
        status, body = await call(http, "GET", "/api/v1/tasks", admin)
        assert [t["task_id"] for t in body["items"]] == ["h-2", "h-1", "c-1"]
        assert body["counts"]["failed"] == 2 and body["counts"]["succeeded"] == 1
        assert body["items"][2]["started_at"].startswith("2026-12-06T10:00:02")
        assert body["items"][2]["args"] is None  # inputs come with the task itself

        _, failed = await call(http, "GET", "/api/v1/tasks?state=failed", admin)
        assert [t["task_id"] for t in failed["items"]] == ["h-1", "c-1"]
        _, boom = await call(http, "GET", "/api/v1/tasks?q=boom", admin)
        assert [t["task_id"] for t in boom["items"]] == ["c-1"]
        _, page = await call(http, "GET", "/api/v1/tasks?limit=2", admin)
        _, rest = await call(
            http, "GET", f"/api/v1/tasks?limit=2&cursor={page['next_cursor']}", admin
        )
        assert [t["task_id"] for t in rest["items"]] == ["c-1"]
        assert body["counts_exact"] is True and page["counts"] == body["counts"]
        assert "counts" not in rest  # a cursor's page: the first page's counts hold
        assert (boom["counts"], boom["counts_exact"]) == (
            {"received": 0, "started": 0, "retried": 0, "succeeded": 0, "failed": 1, "revoked": 0},
            True,
        )
        assert (await call(http, "GET", "/api/v1/tasks?cursor=nope", admin))[0] == 400
        assert (await call(http, "GET", "/api/v1/tasks?state=lost", admin))[0] == 400

        status, c1 = await call(http, "GET", "/api/v1/tasks/celery/c-1", admin)
        assert status == 200
        assert (c1["state"], c1["exception"], c1["message"]) == (
            "failed",
            "ValueError",
            "boom",
        )
        assert (c1["args"], c1["kwargs"], c1["actions"]) == (
            [1, 2],
            {},
            ["retry", "cancel"],
        )
        status, h1 = await call(http, "GET", "/api/v1/tasks/huey/h-1", admin)
        assert h1["actions"] == ["retry"]
        assert (await call(http, "GET", "/api/v1/tasks/huey/nope", admin))[0] == 404

        # The task names seen, per engine, with how they fare.
        _, names = await call(http, "GET", "/api/v1/tasks/names?since=0", admin)
        by_name = {(n["engine"], n["name"]): n for n in names["items"]}
        assert set(by_name) == {("celery", "app.add"), ("huey", "mul")}
        mul = by_name["huey", "mul"]
        assert (mul["tasks"], mul["states"], mul["failure_rate"]) == (
            2,
            {"failed": 1, "succeeded": 1},
            0.5,
        )
        assert mul["runtime_ms"]["p50"] == 1000.0  # started at :06, succeeded at :07

        # Outcomes by engine and task name, each run counted once.
        metrics = (await http_request(http, "GET", "/metrics")).body.decode()
        assert (
            'z4j_tasks_finished_total{engine="celery",state="failed",task="app.add"} 1.0' in metrics
        )
        assert 'z4j_tasks_finished_total{engine="huey",state="succeeded",task="mul"} 1.0' in metrics
        await agent.send(f.EventBatch(events=EVENTS), frame_id="b-2")  # sent again
        await wait_until(lambda: brain.stats.agent_events_ok >= 2 * len(EVENTS))
        await wait_until(lambda: brain.stats.drain_rows >= 2, timeout=30)
        again = (await http_request(http, "GET", "/metrics")).body.decode()
        assert (
            'z4j_tasks_finished_total{engine="celery",state="failed",task="app.add"} 1.0' in again
        )

        # Retry: what each engine needs, filled in from the projection.
        status, command = await call(http, "POST", "/api/v1/tasks/celery/c-1/retry", admin)
        assert status == 201, command
        assert command["action"] == "retry_task"
        assert command["agent_id"] == str(agent_id)
        assert command["target"] == {"engine": "celery", "task_id": "c-1"}
        assert command["parameters"] == {
            "engine": "celery",
            "task_id": "c-1",
            "task_name": "app.add",
        }
        status, command = await call(http, "POST", "/api/v1/tasks/huey/h-1/retry", admin)
        assert status == 201
        assert command["parameters"]["override_args"] == [3]
        assert command["parameters"]["override_kwargs"] == {"k": 1}
        assert command["parameters"]["task_name"] == "mul"
        # Inputs the engine never reported: the operator gives them.
        status, refused = await call(http, "POST", "/api/v1/tasks/huey/h-2/retry", admin)
        assert (status, refused["error"]) == (409, "inputs_unknown")
        status, command = await call(
            http,
            "POST",
            "/api/v1/tasks/huey/h-2/retry",
            admin,
            body={"args": [9], "kwargs": {}},
        )
        assert status == 201
        assert command["parameters"]["override_args"] == [9]
        status, refused = await call(
            http, "POST", "/api/v1/tasks/huey/h-2/retry", admin, body={"args": [9]}
        )
        assert (status, refused["error"]) == (409, "inputs_unknown")
        # Cancel only where advertised.
        status, refused = await call(http, "POST", "/api/v1/tasks/huey/h-1/cancel", admin)
        assert (status, refused["error"]) == (409, "not_offered")
        status, command = await call(http, "POST", "/api/v1/tasks/celery/c-1/cancel", admin)
        assert (status, command["action"]) == (201, "cancel_task")

        # The commands that named c-1 come with it.
        _, c1 = await call(http, "GET", "/api/v1/tasks/celery/c-1", admin)
        assert sorted(c["action"] for c in c1["commands"]) == ["cancel_task", "retry_task"]

        # /events narrows to one task, engine or task name.
        _, events = await call(http, "GET", "/api/v1/events?task_id=h-1", admin)
        assert {e["body"]["task_id"] for e in events["items"]} == {"h-1"}
        assert len(events["items"]) == 2
        _, events = await call(http, "GET", "/api/v1/events?engine=celery", admin)
        assert len(events["items"]) == 3
        _, events = await call(http, "GET", "/api/v1/events?task_name=mul", admin)
        assert len(events["items"]) == 4


async def test_the_workers_capabilities_are_shown(config: Config) -> None:
    async with agent_sent(config, ()) as (_, http, admin, agent_id, _agent):

        async def shown() -> bool:
            _, body = await call(http, "GET", f"/api/v1/agents/{agent_id}", admin)
            return bool(body["workers"])

        await wait_until(shown, timeout=30)
        _, body = await call(http, "GET", f"/api/v1/agents/{agent_id}", admin)
        assert body["workers"][0]["capabilities"] == CAPABILITIES


async def test_bulk_retry_asks_for_the_count_then_sends_per_agent_and_engine(
    config: Config,
) -> None:
    async with agent_sent(config, EVENTS + EXTRA) as (_, http, admin, agent_id, _agent):
        everything = {"filter": {}}
        status, asked = await call(http, "POST", "/api/v1/tasks/retry", admin, everything)
        assert (status, asked["error"], asked["count"]) == (409, "confirm", 4)
        status, asked = await call(
            http, "POST", "/api/v1/tasks/retry", admin, {"filter": {"state": "failed"}}
        )
        assert asked["count"] == 3
        status, asked = await call(
            http,
            "POST",
            "/api/v1/tasks/retry",
            admin,
            {"filter": {"state": "failed"}, "max": 2},
        )
        assert asked["count"] == 2  # the cap
        status, done = await call(
            http,
            "POST",
            "/api/v1/tasks/retry",
            admin,
            {**everything, "confirm_count": 4},
        )
        assert status == 201, done
        by_action: dict[str, list[dict[str, Any]]] = {}
        for command in done["commands"]:
            by_action.setdefault(command["action"], []).append(command)
        # celery: one bulk_retry with both tasks and their names.
        [bulk] = by_action["bulk_retry"]
        assert bulk["agent_id"] == str(agent_id)
        assert sorted(bulk["parameters"]["filter"]["task_ids"]) == ["c-1", "c-2"]
        assert bulk["parameters"]["filter"]["task_names"] == {
            "c-1": "app.add",
            "c-2": "app.add",
        }
        assert bulk["parameters"]["filter"]["engine"] == "celery"
        # huey: one retry_task per task it can re-send; h-2 has no inputs.
        assert "retry_task" in by_action, done
        [one] = by_action["retry_task"]
        assert one["parameters"]["task_id"] == "h-1"
        assert [s["task_id"] for s in done["skipped"]] == ["h-2"]
        status, bad = await call(
            http, "POST", "/api/v1/tasks/retry", admin, {"filter": {"state": "lost"}}
        )
        assert (status, bad["error"]) == (400, "bad_request")
