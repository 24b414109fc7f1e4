"""``/api/v1/engine-workers`` and a queue's dead letters, with raw agents.

Raw agents (no engine) send task events naming the engines' own workers,
advertise capabilities and answer commands as the z4j adapters would, so
that each rule is seen on its own: what the list shows and beside what,
what a worker control or a dead-letter command carries and to whom, and
when the brain refuses. The real adapters run the same routes end to end in
tests/test_engine_adapters.py.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
import trio

import z4j.brain.http.queues_api
from z4j.brain.http.resources import WORKER_ACTIONS
from z4j.brain.http.workers_api import CONTROL_WARNING
from z4j.config import Config
from z4j.protocol.agent import frames as f
from z4j.testing.agents import RawAgent, admin_token, provision, raw_agent
from z4j.testing.brain import running_brain, wait_until
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


def event(kind: str, task_id: str, engine: str, **data: Any) -> f.AgentEvent:
    raw = {
        "id": f"{engine}-{task_id}-{kind}",
        "kind": kind,
        "engine": engine,
        "task_id": task_id,
        "occurred_at": datetime.now(UTC).isoformat(),
        "data": data,
    }
    return f.AgentEvent(id=raw["id"], kind=kind, raw=raw)


CELERY_CONTROLS = {"celery": [*WORKER_ACTIONS, "retry_task"], "dramatiq": ["retry_task"]}


def events() -> tuple[f.AgentEvent, ...]:
    """The agent's task events, stamped now (a suite may run long after import)."""
    return (
        event("task.started", "c-1", "celery", task_name="app.add", worker="alpha@h1"),
        event("task.succeeded", "c-1", "celery", task_name="app.add"),
        event("task.failed", "c-2", "celery", task_name="app.add", worker="alpha@h1"),
        event("task.started", "c-3", "celery", task_name="app.mul", worker="beta@h2"),
        event("task.received", "c-4", "celery", task_name="app.add"),  # no worker yet: not listed
        event("task.failed", "d-1", "dramatiq", task_name="boom", worker="host@123"),
    )


async def next_command(agent: RawAgent) -> f.Frame:
    """The next command the brain sends the agent (acks and the rest skipped)."""
    while True:
        frame = await agent.receive()
        if isinstance(frame.payload, f.Command):
            return frame


async def test_engine_workers_are_listed_beside_their_agents_workers(config: Config) -> None:
    token, secret, agent_id = await provision(config)
    admin = await admin_token(config)
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            async with raw_agent(
                http, token, secret, prove=True, capabilities=CELERY_CONTROLS
            ) as agent:
                await agent.send(f.EventBatch(events=events()), frame_id="b-1")

                async def listed() -> bool:
                    _, body = await call(http, "GET", "/api/v1/engine-workers", admin)
                    return len(body["items"]) == 3 and body["items"][0]["tasks"] == 2

                await wait_until(listed, timeout=30)
                status, body = await call(http, "GET", "/api/v1/engine-workers", admin)
    assert status == 200
    assert body["warning"] == CONTROL_WARNING and "completed" in body["warning"]
    alpha, beta, dramatiq = body["items"]
    assert [(w["engine"], w["worker"]) for w in body["items"]] == [
        ("celery", "alpha@h1"),
        ("celery", "beta@h2"),
        ("dramatiq", "host@123"),
    ]
    assert (alpha["tasks"], alpha["states"]) == (2, {"succeeded": 1, "failed": 1})
    assert beta["states"] == {"started": 1}
    assert alpha["agent_id"] == str(agent_id)
    assert datetime.fromisoformat(alpha["last_seen"]).timestamp() > time.time() - 60
    # Beside the agent's own (WebSocket) workers, with the controls they advertise.
    [worker] = alpha["agent_workers"]
    assert (worker["worker_id"], worker["connected"]) == ("w-1", True)
    assert alpha["actions"] == list(WORKER_ACTIONS)
    assert dramatiq["actions"] == []  # the agent advertises no control for dramatiq


async def test_the_window_bounds_the_list(config: Config) -> None:
    token, secret, _ = await provision(config)
    admin = await admin_token(config)
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            async with raw_agent(http, token, secret, prove=True) as agent:
                await agent.send(f.EventBatch(events=events()[:2]), frame_id="b-1")

                async def listed() -> bool:
                    _, body = await call(http, "GET", "/api/v1/engine-workers", admin)
                    return bool(body["items"])

                await wait_until(listed, timeout=30)
                later = int(time.time()) + 3600
                _, body = await call(http, "GET", f"/api/v1/engine-workers?since={later}", admin)
                assert body["items"] == []
                status, _ = await call(http, "GET", "/api/v1/engine-workers?since=never", admin)
                assert status == 400


async def test_worker_controls_go_to_the_agent_that_reported_the_worker(config: Config) -> None:
    token, secret, agent_id = await provision(config)
    other_token, other_secret, other_id = await provision(config, project="p2", agent="other")
    admin = await admin_token(config)
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            async with (
                raw_agent(http, token, secret, prove=True, capabilities=CELERY_CONTROLS) as agent,
                raw_agent(
                    http,
                    other_token,
                    other_secret,
                    prove=True,
                    capabilities={"celery": ["pool_grow"]},
                ) as other,
            ):
                await agent.send(f.EventBatch(events=events()), frame_id="b-1")

                async def listed() -> bool:
                    _, body = await call(http, "GET", "/api/v1/engine-workers", admin)
                    return len(body["items"]) == 3

                await wait_until(listed, timeout=30)
                base = "/api/v1/engine-workers/celery/alpha@h1"

                async def control(action: str, body: Any = None) -> tuple[int, Any]:
                    return await call(http, "POST", f"{base}/{action}", admin, body)

                status, sent = await control("pool_grow", {"delta": 2})
                assert status == 201, sent
                assert sent["warning"] == CONTROL_WARNING
                command = sent["command"]
                assert (command["action"], command["agent_id"]) == ("pool_grow", str(agent_id))
                assert command["target"] == {"engine": "celery", "id": "alpha@h1"}
                assert command["parameters"] == {
                    "engine": "celery",
                    "worker_name": "alpha@h1",
                    "delta": 2,
                }
                delivered = await next_command(agent)
                assert delivered.id == command["id"]
                assert isinstance(delivered.payload, f.Command)
                assert delivered.payload.parameters["worker_name"] == "alpha@h1"

                # What each control takes, checked before anything is sent.
                status, sent = await control("restart_worker")
                assert (status, sent["command"]["parameters"]) == (
                    201,
                    {"engine": "celery", "worker_name": "alpha@h1"},
                )
                status, sent = await control("add_consumer", {"queue": "mail"})
                assert sent["command"]["parameters"]["queue"] == "mail"
                status, sent = await control("cancel_consumer", {"queue": "mail"})
                assert (status, sent["command"]["action"]) == (201, "cancel_consumer")
                status, sent = await control("pool_shrink")
                assert sent["command"]["parameters"]["delta"] == 1  # the default
                status, sent = await control("rate_limit", {"task_name": "app.add", "rate": "10/m"})
                assert status == 201
                assert sent["command"]["parameters"] == {
                    "engine": "celery",
                    "worker_name": "alpha@h1",
                    "task_name": "app.add",
                    "rate": "10/m",
                }
                for action, body in [
                    ("pool_grow", {"delta": 0}),
                    ("pool_grow", {"delta": "2"}),
                    ("add_consumer", {}),
                    ("rate_limit", {"task_name": "app.add", "rate": "fast"}),
                    ("rate_limit", {"rate": "5/s"}),
                ]:
                    status, refused = await control(action, body)
                    assert (status, refused["error"]) == (400, "bad_request"), (action, body)
                status, refused = await control("shutdown")
                assert (status, refused["error"]) == (404, "not_found")
                status, refused = await call(
                    http, "POST", "/api/v1/engine-workers/celery/nobody@h9/pool_grow", admin
                )
                assert (status, refused["error"]) == (404, "not_found")
                # Offered only where advertised for the worker's engine.
                status, refused = await call(
                    http, "POST", "/api/v1/engine-workers/dramatiq/host@123/restart_worker", admin
                )
                assert (status, refused["error"]) == (409, "not_offered")

                # A second agent names the same worker (celery's event monitor sees
                # every worker on its broker): the caller says which agent.
                await other.send(
                    f.EventBatch(
                        events=(event("task.started", "o-1", "celery", worker="alpha@h1"),)
                    ),
                    frame_id="b-1",
                )

                async def both() -> bool:
                    _, body = await call(http, "GET", "/api/v1/engine-workers", admin)
                    return len(body["items"]) == 4

                await wait_until(both, timeout=30)
                status, refused = await control("pool_grow")
                assert (status, refused["error"]) == (409, "ambiguous")
                status, sent = await control("pool_grow", {"agent_id": str(other_id)})
                assert (status, sent["command"]["agent_id"]) == (201, str(other_id))
                status, refused = await control("restart_worker", {"agent_id": str(other_id)})
                assert (status, refused["error"]) == (409, "not_offered")
                status, sent = await control("pool_grow", {"agent_id": str(agent_id)})
                assert (status, sent["command"]["agent_id"]) == (201, str(agent_id))
                status, refused = await control("pool_grow", {"agent_id": str(uuid.uuid4())})
                assert (status, refused["error"]) == (404, "not_found")


DEAD = [
    {
        "task_id": "d-9",
        "task_name": "flaky",
        "queue": "default",
        "failed_at": "2026-10-02T12:00:00Z",
        "error_excerpt": "RuntimeError: flaky",
        "attempts": 3,
    },
    {
        "task_id": "d-8",
        "task_name": "",
        "queue": "default",
        "failed_at": None,
        "error_excerpt": "",
        "attempts": None,
    },
]


async def answering(
    agent: RawAgent,
    answer: Callable[[f.Command], Awaitable[f.CommandResult | None]],
    seen: list[f.Command],
) -> None:
    """Answer every command as ``answer`` says (None: never answer), with its claim token."""
    while True:
        frame = await next_command(agent)
        command = frame.payload
        assert isinstance(command, f.Command)
        seen.append(command)
        claim = command.delivery_claim_token
        await agent.send(f.CommandAck(delivery_claim_token=claim), frame_id=frame.id)
        result = await answer(command)
        if result is not None:
            await agent.send(
                f.CommandResult(
                    status=result.status,
                    result=result.result,
                    error=result.error,
                    delivery_claim_token=claim,
                ),
                frame_id=frame.id,
            )


async def as_dramatiq_would(command: f.Command) -> f.CommandResult | None:
    """dlq.list pages as z4j-dramatiq's: by offset cursor; "silent" is never answered."""
    cursor = command.parameters.get("cursor")
    if command.action == "requeue_dead_letter":
        return f.CommandResult(status="success", result={"task_id": "d-9", "requeued": True})
    if cursor == "silent":
        return None
    if cursor == "broken":
        return f.CommandResult(status="failed", error="dlq.list: broker unreachable")
    if cursor == "odd":  # what the brain cannot show is left out, not passed on
        entries: list[Any] = [{"task_name": "no id"}, "junk", {**DEAD[0], "attempts": "3"}]
        return f.CommandResult(status="success", result={"entries": entries, "engine": "x"})
    start = int(cursor or 0)
    page = DEAD[start : start + command.parameters["limit"]]
    following = str(start + len(page)) if start + len(page) < len(DEAD) else None
    return f.CommandResult(
        status="success",
        result={"entries": page, "next_cursor": following, "total": 2, "engine": "dramatiq"},
    )


async def test_dead_letters_are_listed_on_demand_and_requeued_where_offered(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(z4j.brain.http.queues_api, "DEAD_LETTER_WAIT_SECONDS", 1.0)
    token, secret, agent_id = await provision(config)
    other_token, other_secret, other_id = await provision(config, project="p2", agent="other")
    admin = await admin_token(config)
    capabilities = {"dramatiq": ["list_dead_letters", "requeue_dead_letter", "retry_task"]}
    seen: list[f.Command] = []
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            async with (
                raw_agent(http, token, secret, prove=True, capabilities=capabilities) as agent,
                raw_agent(
                    http,
                    other_token,
                    other_secret,
                    prove=True,
                    capabilities={"dramatiq": ["list_dead_letters"]},
                ),
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(answering, agent, as_dramatiq_would, seen)
                await wait_until(lambda: len(brain.addresses.commands.sessions.sessions) == 2)

                async def advertised() -> bool:  # the hello's capabilities are in the store
                    _, body = await call(http, "GET", f"/api/v1/agents/{agent_id}", admin)
                    return any(w["capabilities"] for w in body["workers"])

                await wait_until(advertised, timeout=30)
                path = f"/api/v1/queues/dramatiq/default/dead-letters?agent_id={agent_id}"

                status, page = await call(http, "GET", f"{path}&limit=1", admin)
                assert status == 200, page
                assert page["items"] == [{**DEAD[0], "failed_at": "2026-10-02T12:00:00+00:00"}]
                assert (page["next_cursor"], page["total"]) == ("1", 2)
                assert (page["agent_id"], page["actions"]) == (str(agent_id), ["requeue"])
                assert (seen[-1].action, seen[-1].parameters) == (
                    "dlq.list",
                    {"engine": "dramatiq", "queue": "default", "limit": 1},
                )
                assert seen[-1].target == {"engine": "dramatiq", "queue": "default"}
                status, command = await call(
                    http, "GET", f"/api/v1/commands/{page['command_id']}", admin
                )
                assert (command["action"], command["state"]) == ("dlq.list", "completed")
                # The agent's cursor, passed back as it gave it.
                status, rest = await call(http, "GET", f"{path}&cursor=1", admin)
                assert [e["task_id"] for e in rest["items"]] == ["d-8"]
                assert rest["items"][0]["failed_at"] is None and rest["next_cursor"] is None
                assert seen[-1].parameters == {
                    "engine": "dramatiq",
                    "queue": "default",
                    "limit": 50,
                    "cursor": "1",
                }
                status, odd = await call(http, "GET", f"{path}&cursor=odd", admin)
                assert odd["items"] == [
                    {**DEAD[0], "failed_at": "2026-10-02T12:00:00+00:00", "attempts": None}
                ]
                assert (odd["next_cursor"], odd["total"]) == (None, None)

                # Refused by the agent: 502 with the command; no answer in time: 504.
                status, failed = await call(http, "GET", f"{path}&cursor=broken", admin)
                assert (status, failed["error"]) == (502, "agent_failed"), failed
                assert "broker unreachable" in failed["message"]
                assert uuid.UUID(failed["command_id"])
                started = time.monotonic()
                status, late = await call(http, "GET", f"{path}&cursor=silent", admin)
                assert (status, late["error"]) == (504, "no_answer"), late
                assert 0.9 <= time.monotonic() - started < 10
                _, command = await call(
                    http, "GET", f"/api/v1/commands/{late['command_id']}", admin
                )
                assert (command["action"], command["state"]) == ("dlq.list", "dispatched")

                # Re-queue: a command carrying the dead letter, where advertised.
                requeue = "/api/v1/queues/dramatiq/default/dead-letters/d-9/requeue"
                status, sent = await call(
                    http, "POST", requeue, admin, {"agent_id": str(agent_id), "task_name": "flaky"}
                )
                assert status == 201, sent
                assert (sent["action"], sent["agent_id"]) == ("requeue_dead_letter", str(agent_id))
                assert sent["parameters"] == {
                    "engine": "dramatiq",
                    "queue": "default",
                    "task_id": "d-9",
                    "task_name": "flaky",
                }
                assert sent["target"] == {
                    "engine": "dramatiq",
                    "queue": "default",
                    "task_id": "d-9",
                }

                # Not offered: an agent that lists but does not requeue, another
                # engine, an unknown agent; and bad input.
                status, refused = await call(
                    http, "POST", requeue, admin, {"agent_id": str(other_id)}
                )
                assert (status, refused["error"]) == (409, "not_offered")
                status, refused = await call(
                    http,
                    "GET",
                    f"/api/v1/queues/celery/default/dead-letters?agent_id={agent_id}",
                    admin,
                )
                assert (status, refused["error"]) == (409, "not_offered")
                status, refused = await call(
                    http, "GET", f"{path.split('?')[0]}?agent_id={uuid.uuid4()}", admin
                )
                assert (status, refused["error"]) == (404, "not_found")
                for bad in ("", f"?agent_id={agent_id}&limit=0", f"?agent_id={agent_id}&limit=201"):
                    status, refused = await call(http, "GET", path.split("?")[0] + bad, admin)
                    assert (status, refused["error"]) == (400, "bad_request"), bad
                status, refused = await call(http, "POST", requeue, admin, {})
                assert (status, refused["error"]) == (400, "bad_request")
                assert sum(c.action == "dlq.list" for c in seen) == 5
                nursery.cancel_scope.cancel()
