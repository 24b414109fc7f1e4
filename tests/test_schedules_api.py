"""``/api/v1/schedules``: activation, snapshots from a raw agent, and the actions on a schedule.

A raw agent plays a z4j-bare 1.13 scheduler adapter: its hello names the
scheduler and what it advertises; it waits for the brain's
``schedule.external.activate``, answers it, and publishes snapshots under
the epoch it was given (frames built by z4j.testing.schedules). The real
z4j-hueyperiodic adapter runs the same flow in tests/test_schedule_adapter.py.
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
from z4j.testing.brain import running_brain, wait_until
from z4j.testing.http import http_request
from z4j.testing.schedules import (
    answer_activation,
    control_event,
    publish_events,
    schedule_row,
    snapshot_events,
)

OWNER = "huey-periodic"
FEATURES = ("retry_by_reference", "external_schedule_protocol_v1")
SNAPSHOT = "external_schedule_stable_snapshot_v1"
MUTATION = "external_schedule_mutation_v1"
# z4j-hueyperiodic with durable overrides (NativeScheduleControl), beside its engine.
MANAGED = {
    OWNER: sorted(
        {SNAPSHOT, MUTATION, "list", "read", "trigger_now", "create", "update", "delete"}
        | {"enable", "disable"}
    ),
    "huey": ["cancel_task", "retry_task", "submit_task"],
}


async def call(
    http: tuple[str, int], method: str, path: str, token: str, body: Any = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    if body is not None or method == "POST":
        headers["Content-Type"] = "application/json"
    payload = b"" if body is None else orjson.dumps(body)
    reply = await http_request(http, method, path, body=payload, headers=headers)
    return reply.status, reply.json()


async def next_command(agent: RawAgent, action: str) -> tuple[str, f.Command]:
    """Read frames until a command ``action`` arrives: (its id, the command)."""
    while True:
        frame = await agent.receive()
        if isinstance(frame.payload, f.Command) and frame.payload.action == action:
            return frame.id, frame.payload


async def answer(
    agent: RawAgent, command_id: str, command: f.Command, result: dict[str, Any] | None = None
) -> None:
    """As z4j-bare does: an ack at once, then the result."""
    token = command.delivery_claim_token
    await agent.send(f.CommandAck(delivery_claim_token=token), frame_id=command_id)
    await agent.send(
        f.CommandResult(status="success", result=result or {}, delivery_claim_token=token),
        frame_id=command_id,
    )


def rows(*keys: str, **fields: Any) -> list[dict[str, Any]]:
    return [schedule_row(OWNER, f"app.{k}", **fields) for k in keys]


@asynccontextmanager
async def scheduler_agent(
    http: tuple[str, int],
    token: str,
    secret: str,
    *,
    worker_id: str = "w-1",
    capabilities: dict[str, list[str]] | None = None,
) -> AsyncIterator[tuple[RawAgent, dict[str, Any]]]:
    """A raw agent publishing OWNER, once activated: (the agent, the activation's parameters)."""
    async with raw_agent(
        http,
        token,
        secret,
        worker_id=worker_id,
        prove=True,
        capabilities=MANAGED if capabilities is None else capabilities,
        schedulers=(OWNER,),
        runtime_features=FEATURES,
    ) as agent:
        yield agent, await answer_activation(agent)


async def listed(http: tuple[str, int], admin: str, query: str = "") -> dict[str, dict[str, Any]]:
    status, body = await call(http, "GET", f"/api/v1/schedules{query}", admin)
    assert status == 200, body
    return {s["source_key"]: s for s in body["items"]}


async def until_listed(
    http: tuple[str, int], admin: str, check: Any, what: str
) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}

    async def ready() -> bool:
        nonlocal found
        found = await listed(http, admin)
        return bool(check(found))

    await wait_until(ready, timeout=20)
    return found


async def test_activation_snapshots_and_actions(config: Config) -> None:
    token, secret, agent_id = await provision(config)
    admin = await admin_token(config)
    with trio.fail_after(60):
        async with (
            running_brain(config) as brain,
            scheduler_agent(brain.addresses.http, token, secret) as (agent, grant),
        ):
            http = brain.addresses.http
            # The brain's grant: the protocol's fields, the stream fixed per project and scheduler.
            assert grant["owner"] == OWNER and grant["stable_source"] is True
            assert grant["source_scope"] == (
                '{"kind":"scheduler-owner","owner":"huey-periodic","version":1}'
            )
            assert grant["epoch_number"] == 1
            assert str(uuid.UUID(grant["stream_id"])) == grant["stream_id"]
            assert grant["adapter_instance_id"] == f"{agent_id}/w-1"

            # A snapshot in two batches, the terminal frame first.
            frames = snapshot_events(grant, 1, rows("a", "b", "c"), reason="activation")
            await publish_events(agent, frames[2:])
            await publish_events(agent, frames[:2])
            found = await until_listed(http, admin, lambda s: len(s) == 3, "three schedules")
            a = found["app.a"]
            assert (a["scheduler"], a["engine"], a["name"], a["task_name"]) == (
                OWNER,
                "huey",
                "a",
                "app.a",
            )
            assert (a["is_enabled"], a["expression"], a["agent_id"], a["worker_id"]) == (
                True,
                "*/5 * * * *",
                str(agent_id),
                "w-1",
            )
            assert (a["stream_id"], a["epoch_number"], a["sequence"]) == (grant["stream_id"], 1, 1)
            assert a["actions"] == ["enable", "disable", "trigger", "delete"]

            # Filters and pages.
            assert await listed(http, admin, "?enabled=false") == {}
            assert len(await listed(http, admin, f"?scheduler={OWNER}&engine=huey")) == 3
            assert await listed(http, admin, "?engine=celery") == {}
            assert len(await listed(http, admin, "?project=demo")) == 3
            assert (await call(http, "GET", "/api/v1/schedules?project=nope", admin))[0] == 404
            assert (await call(http, "GET", "/api/v1/schedules?enabled=yes", admin))[0] == 400
            assert (await call(http, "GET", "/api/v1/schedules?cursor=zz", admin))[0] == 400
            _, first = await call(http, "GET", "/api/v1/schedules?limit=2", admin)
            _, rest = await call(
                http, "GET", f"/api/v1/schedules?limit=2&cursor={first['next_cursor']}", admin
            )
            keys = [s["source_key"] for s in first["items"] + rest["items"]]
            assert keys == ["app.a", "app.b", "app.c"] and rest["next_cursor"] is None
            status, one = await call(http, "GET", f"/api/v1/schedules/{OWNER}/app.b", admin)
            assert status == 200 and one == found["app.b"]
            status, body = await call(http, "GET", f"/api/v1/schedules/{OWNER}/app.zz", admin)
            assert (status, body["error"]) == (404, "not_found")

            # Disable: a fenced native write, against the row the brain has.
            status, sent = await call(
                http, "POST", f"/api/v1/schedules/{OWNER}/app.b/disable", admin
            )
            assert status == 201 and sent["action"] == "schedule.external.mutate", sent
            command_id, command = await next_command(agent, "schedule.external.mutate")
            assert command_id == sent["id"]
            assert command.target == {"scheduler": OWNER, "worker_id": "w-1"}
            p = command.parameters
            assert (p["operation"], p["schedule_id"], p["definition"]) == (
                "update",
                "app.b",
                {"is_enabled": False},
            )
            assert p["expected"] == rows("b")[0]  # exactly the row as published
            assert {k: p[k] for k in grant if k not in ("owner", "stable_source")} == {
                k: v for k, v in grant.items() if k not in ("owner", "stable_source")
            }
            assert p["scheduler"] == OWNER and uuid.UUID(p["operation_id"])
            await answer(agent, command_id, command, {"operation_id": p["operation_id"]})
            # The adapter's confirmation is its next snapshot.
            changed = rows("a", "c") + rows("b", is_enabled=False, source=f"{OWNER}:override")
            await publish_events(agent, snapshot_events(grant, 2, changed))
            found = await until_listed(
                http, admin, lambda s: s["app.b"]["is_enabled"] is False, "app.b disabled"
            )
            assert found["app.b"]["source"] == f"{OWNER}:override"
            assert found["app.b"]["sequence"] == 2

            # Trigger: the scheduler's own trigger_now.
            status, sent = await call(
                http, "POST", f"/api/v1/schedules/{OWNER}/app.a/trigger", admin
            )
            assert status == 201 and sent["action"] == "schedule.trigger_now"
            assert sent["target"]["schedule_id"] == "app.a"
            assert sent["parameters"] == {"schedule_id": "app.a"}

            # Delete: a native delete; the next snapshot no longer has it.
            status, sent = await call(
                http, "POST", f"/api/v1/schedules/{OWNER}/app.c/delete", admin
            )
            assert status == 201 and sent["parameters"]["operation"] == "delete"
            assert sent["parameters"]["definition"] == {}

            # Sync now: schedule.resync to the worker; its snapshot replaces the rows.
            status, body = await call(http, "POST", "/api/v1/schedules/resync", admin)
            assert status == 201
            [resync] = body["commands"]
            assert (resync["action"], resync["target"]) == ("schedule.resync", {"worker_id": "w-1"})
            command_id, command = await next_command(agent, "schedule.resync")
            assert command_id == resync["id"]
            await answer(agent, command_id, command, {"schedulers_drained": 1})
            await publish_events(agent, snapshot_events(grant, 3, rows("a", "b", is_enabled=False)))
            found = await until_listed(http, admin, lambda s: "app.c" not in s, "app.c deleted")
            assert sorted(found) == ["app.a", "app.b"]

            # A control projection updates what it carries.
            event = control_event(grant, 4, rows("a", total_runs=3, is_enabled=False))
            await publish_events(agent, [event])
            found = await until_listed(
                http, admin, lambda s: s["app.a"]["total_runs"] == 3, "the control projection"
            )
            assert found["app.a"]["snapshot_id"] is None
            # Late and older: changes nothing.
            await publish_events(agent, snapshot_events(grant, 2, rows("old")))
            await publish_events(agent, [control_event(grant, 5, rows("b", name="renamed"))])
            found = await until_listed(
                http, admin, lambda s: s["app.b"]["name"] == "renamed", "the newer control"
            )
            assert sorted(found) == ["app.a", "app.b"]
        assert brain.stats.agent_rejected == {}


async def test_a_reconnect_gets_a_newer_epoch_and_fences_the_old_one(config: Config) -> None:
    token, secret, agent_id = await provision(config)
    admin = await admin_token(config)
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            async with scheduler_agent(http, token, secret) as (agent, first):
                await publish_events(agent, snapshot_events(first, 1, rows("a")))
                await until_listed(http, admin, lambda s: "app.a" in s, "app.a")
                # A second publisher of the same scheduler is left alone while w-1 holds it.
                async with raw_agent(
                    http,
                    token,
                    secret,
                    worker_id="w-2",
                    prove=True,
                    capabilities=MANAGED,
                    schedulers=(OWNER,),
                    runtime_features=FEATURES,
                ):
                    await trio.sleep(2)
                await wait_until(lambda: _gone(http, admin, agent_id, "w-2"))
            # The same worker back (a restart keeps its worker id, say): a newer epoch.
            async with scheduler_agent(http, token, secret) as (agent, second):
                assert second["stream_id"] == first["stream_id"]
                assert second["epoch_number"] == 2 and second["epoch_uuid"] != first["epoch_uuid"]
                await publish_events(agent, snapshot_events(first, 9, rows("old")))
                await publish_events(agent, snapshot_events(second, 1, rows("new")))
                found = await until_listed(http, admin, lambda s: "app.new" in s, "app.new")
                assert sorted(found) == ["app.new"]
                assert found["app.new"]["epoch_number"] == 2
            _, commands = await call(http, "GET", "/api/v1/commands?limit=500", admin)
            activations = [
                c for c in commands["items"] if c["action"] == "schedule.external.activate"
            ]
            assert sorted(c["target"]["worker_id"] for c in activations) == ["w-1", "w-1"]


async def test_actions_follow_what_the_worker_advertises(config: Config) -> None:
    """No mutation capability: enable/disable by name, then a resync. No
    trigger_now: a fire through the engine. Nothing advertised: 409."""
    token, secret, agent_id = await provision(config)
    other_token, other_secret, _ = await provision(config, project="other", agent="o")
    admin = await admin_token(config)
    plain = {OWNER: [SNAPSHOT, "list", "enable", "disable"], "huey": ["submit_task"]}
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            # Not activated: no runtime feature, or no stable snapshot.
            async with (
                raw_agent(
                    http,
                    other_token,
                    other_secret,
                    worker_id="old",
                    prove=True,
                    capabilities={OWNER: [SNAPSHOT]},
                    schedulers=(OWNER,),
                ),
                raw_agent(
                    http,
                    other_token,
                    other_secret,
                    worker_id="unstable",
                    prove=True,
                    capabilities={OWNER: ["list"]},
                    schedulers=(OWNER,),
                    runtime_features=FEATURES,
                ),
                scheduler_agent(http, token, secret, capabilities=plain) as (agent, grant),
            ):
                await publish_events(agent, snapshot_events(grant, 1, rows("a")))
                found = await until_listed(http, admin, lambda s: "app.a" in s, "app.a")
                assert found["app.a"]["actions"] == ["enable", "disable", "trigger"]
                status, body = await call(
                    http, "POST", f"/api/v1/schedules/{OWNER}/app.a/delete", admin
                )
                assert (status, body["error"]) == (409, "not_offered")

                status, sent = await call(
                    http, "POST", f"/api/v1/schedules/{OWNER}/app.a/disable", admin
                )
                assert status == 201 and sent["action"] == "schedule.disable"
                assert sent["target"] == {
                    "scheduler": OWNER,
                    "schedule_id": "app.a",
                    "worker_id": "w-1",
                }
                await next_command(agent, "schedule.disable")
                await next_command(agent, "schedule.resync")  # right behind it

                status, sent = await call(
                    http, "POST", f"/api/v1/schedules/{OWNER}/app.a/trigger", admin
                )
                assert status == 201 and sent["action"] == "schedule.fire"
                p = sent["parameters"]
                assert (p["task_name"], p["engine"], p["args"], p["kwargs"]) == (
                    "app.a",
                    "huey",
                    [],
                    {},
                )
                assert sent["target"] == {"engine": "huey", "worker_id": "w-1"}
                # Sync now reaches every worker with a scheduler, activated or not.
                status, body = await call(http, "POST", "/api/v1/schedules/resync", admin)
                assert status == 201
                assert sorted(c["target"]["worker_id"] for c in body["commands"]) == [
                    "old",
                    "unstable",
                    "w-1",
                ]
            # Once its worker is gone, nothing is offered.
            await wait_until(lambda: _gone(http, admin, agent_id, "w-1"))
            found = await listed(http, admin)
            assert found["app.a"]["actions"] == []
            status, body = await call(
                http, "POST", f"/api/v1/schedules/{OWNER}/app.a/enable", admin
            )
            assert (status, body["error"]) == (409, "not_offered")
            status, body = await call(http, "POST", "/api/v1/schedules/resync", admin)
            assert (status, body["error"]) == (409, "not_offered")
            _, commands = await call(http, "GET", "/api/v1/commands?limit=500", admin)
            activated = [
                c["target"]["worker_id"]
                for c in commands["items"]
                if c["action"] == "schedule.external.activate"
            ]
            assert activated == ["w-1"]


async def _gone(http: tuple[str, int], admin: str, agent_id: uuid.UUID, worker_id: str) -> bool:
    """Whether the brain has recorded that worker's disconnect."""
    _, agent = await call(http, "GET", f"/api/v1/agents/{agent_id}", admin)
    return any(w["worker_id"] == worker_id and not w["connected"] for w in agent["workers"])
