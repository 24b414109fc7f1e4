"""A user narrowed to projects sees those and nothing of the others (narrowing.py).

One world, seeded for real through a running brain: two projects, each
with an agent (a worker advertising celery's actions and a scheduler),
task events (so tasks, engine workers and queues), a schedule, a command,
a dead letter (the store refuses a kind of event), a task registry, an
OpAMP agent and a rollout; and ingest events of no project. A user
narrowed to the first project ("mine") then walks every route of the
OpenAPI document three ways (no filter; filters and ids of their own;
filters and ids of the other project), and no answer may hold anything of
the other project or of no project. Targeted tests check that each route
family gives them their own projects' data, and the dashboard socket.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import attrs
import orjson
import pytest
import trio
import trio_websocket
from test_api import call
from test_dashboard_hub import viewer
from test_policy import _operations
from wsproto.events import TextMessage

import z4j.ingest
from z4j.brain.dashboard_hub import DashboardHub, _Subscriber, for_projects
from z4j.brain.http.narrowing import NARROWABLE
from z4j.brain.http.openapi import OPENAPI
from z4j.brain.http.policy import ROUTES
from z4j.brain.links import merge_events
from z4j.config import Config
from z4j.protocol.agent import frames as f
from z4j.protocol.opamp import AgentCapability, key_values
from z4j.protocol.opamp import opamp_pb2 as pb
from z4j.stats import BrainStats
from z4j.store.base import EventFilter
from z4j.testing.agents import RawAgent, admin_token, provision, raw_agent
from z4j.testing.brain import RunningBrain, running_brain, wait_until
from z4j.testing.dead_letters import refuse_kind
from z4j.testing.event_search import P1, P2, seed_events
from z4j.testing.http import http_request
from z4j.testing.opamp import opamp_token
from z4j.testing.schedules import answer_activation, publish_events, schedule_row, snapshot_events
from z4j.testing.store import open_store

PASSWORD = "correct horse battery"
OWNER = "huey-periodic"
# A worker as z4j-bare 1.13 with celery and z4j-hueyperiodic advertises it.
CAPABILITIES = {
    "celery": [
        "bulk_retry",
        "cancel_task",
        "retry_task",
        "purge_queue",
        "list_dead_letters",
        "requeue_dead_letter",
        "restart_worker",
        "pool_grow",
    ],
    OWNER: sorted(
        {"external_schedule_stable_snapshot_v1", "external_schedule_mutation_v1"}
        | {"trigger_now", "enable", "disable", "delete"}
    ),
}
FEATURES = ("retry_by_reference", "external_schedule_protocol_v1")
FILES = {"a.json": {"body": "{}", "content_type": "application/json"}}
# Every name of the other project holds this; ingest events (no project) hold TCP_MARK.
THEIRS_MARK = "q7x"
TCP_MARK = "tcp-z9k"
MINE_LABEL, THEIRS_LABEL = "mine-a1b", f"theirs-{THEIRS_MARK}"
SHARED = "app.shared"  # a task name both projects use, with these runtimes (ms)
RUNTIMES = {MINE_LABEL: 10.0, THEIRS_LABEL: 7777.0}


@attrs.frozen(kw_only=True)
class Side:
    """One project of the world and what it holds."""

    project: str
    project_id: uuid.UUID
    agent: str
    agent_id: uuid.UUID
    worker_id: str
    task_id: str
    engine_worker: str
    queue: str
    schedule: str
    uid: str  # the OpAMP agent's instance_uid, hex
    command_id: str
    rollout_id: str
    dead_letter: int

    def markers(self) -> list[str]:
        """Strings that only this project's data holds."""
        return [
            self.project,
            str(self.project_id),
            self.agent,
            str(self.agent_id),
            self.worker_id,
            self.task_id,
            self.engine_worker,
            self.queue,
            self.schedule,
            self.uid,
            self.command_id,
            self.rollout_id,
        ]


@attrs.frozen(kw_only=True)
class World:
    brain: RunningBrain
    http: tuple[str, int]
    legacy: str  # an unnarrowed admin token
    mine: Side
    theirs: Side
    token: str  # the narrowed operator's personal token (scope commands)
    cookie: str  # their session, and the headers a cookie write needs
    csrf: dict[str, str]
    agents: dict[str, RawAgent]  # by project name
    credentials: dict[str, tuple[str, str, uuid.UUID]]  # agents' (token, secret, id) likewise


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _task_events(label: str) -> tuple[f.AgentEvent, ...]:
    """A failed task of its own name, and one of a name both projects use
    (``SHARED``), which ran ``RUNTIMES[label]`` ms (or 1 ms)."""
    task_id, name = f"task-{label}", f"app.{label}"
    common = {"task_name": name, "queue": f"q-{label}"}
    shared = {"task_name": SHARED, "queue": f"q-{label}"}
    raw = [
        (task_id, "task.received", {**common, "args": [1], "kwargs": {}}),
        (task_id, "task.started", {**common, "worker": f"celery@{label}"}),
        (task_id, "task.failed", {**common, "worker": f"celery@{label}", "exception": "E"}),
        (f"shared-{label}", "task.received", shared),
        (f"shared-{label}", "task.succeeded", {**shared, "runtime_ms": RUNTIMES.get(label, 1)}),
    ]
    return tuple(
        f.AgentEvent(
            id=f"{task}-{kind}",
            kind=kind,
            raw={
                "id": f"{task}-{kind}",
                "kind": kind,
                "engine": "celery",
                "task_id": task,
                "occurred_at": _now(),
                "data": data,
            },
        )
        for task, kind, data in raw
    )


def _opamp_report(uid: bytes, label: str) -> bytes:
    message = pb.AgentToServer(
        instance_uid=uid,
        sequence_num=0,
        capabilities=int(
            AgentCapability.REPORTS_STATUS
            | AgentCapability.ACCEPTS_REMOTE_CONFIG
            | AgentCapability.REPORTS_REMOTE_CONFIG
        ),
    )
    message.agent_description.identifying_attributes.extend(
        key_values({"service.name": f"svc-{label}"})
    )
    return message.SerializeToString()


async def _answer_commands(agent: RawAgent) -> None:
    """Answer every command as an adapter that did it would (dlq.list: none
    listed), until the connection closes. It ends by itself, never by a
    cancel: a cancel of its nursery while a failure unwinds would turn into
    a Cancelled the nursery swallows, and take the failure with it."""
    try:
        while True:
            frame = await agent.receive()
            command = frame.payload
            if not isinstance(command, f.Command):
                continue
            token = command.delivery_claim_token
            await agent.send(f.CommandAck(delivery_claim_token=token), frame_id=frame.id)
            result: dict[str, Any] = (
                {"entries": [], "total": 0} if command.action == "dlq.list" else {}
            )
            await agent.send(
                f.CommandResult(status="success", result=result, delivery_claim_token=token),
                frame_id=frame.id,
            )
    except trio_websocket.ConnectionClosed:
        return


async def _get(world_http: tuple[str, int], path: str, token: str) -> Any:
    status, _, body = await call(world_http, "GET", path, token=token)
    assert status == 200, (path, status, body)
    return body


async def _seed(
    stack: AsyncExitStack,
    nursery: trio.Nursery,
    http: tuple[str, int],
    legacy: str,
    label: str,
    credentials: tuple[str, str, uuid.UUID],
    opamp: str,
) -> tuple[Side, RawAgent]:
    """One project's data, through the brain as agents and operators make it."""
    token, secret, agent_id = credentials
    agent = await stack.enter_async_context(
        raw_agent(
            http,
            token,
            secret,
            worker_id=f"w-{label}",
            prove=True,
            capabilities=CAPABILITIES,
            schedulers=(OWNER,),
            runtime_features=FEATURES,
        )
    )
    grant = await answer_activation(agent)
    schedule = f"app.sched-{label}"
    await publish_events(agent, snapshot_events(grant, 1, [schedule_row(OWNER, schedule)]))
    nursery.start_soon(_answer_commands, agent)
    await agent.send(f.EventBatch(events=_task_events(label)), frame_id=f"t-{label}")
    await agent.send(
        f.Heartbeat(
            adapter_health={"celery.queue_depths": orjson.dumps({f"q-{label}": 3}).decode()}
        )
    )
    await agent.send(f.RegistryDelta(engine="celery", added=({"name": f"app.reg-{label}"},)))
    poison = {"id": f"poison-{label}", "kind": "poison", "occurred_at": _now(), "data": {}}
    await agent.send(
        f.EventBatch(events=(f.AgentEvent(id=poison["id"], kind="poison", raw=poison),)),
        frame_id=f"p-{label}",
    )
    uid = uuid.uuid4().bytes
    reply = await http_request(
        http,
        "POST",
        "/v1/opamp",
        body=_opamp_report(uid, label),
        headers={"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {opamp}"},
    )
    assert reply.status == 200, reply
    project = f"proj-{label}"
    status, _, command = await call(
        http,
        "POST",
        "/api/v1/commands",
        token=legacy,
        body={"agent": str(agent_id), "action": "ping"},
    )
    assert status == 201, command
    status, _, rollout = await call(
        http,
        "POST",
        "/api/v1/opamp/rollouts",
        token=legacy,
        body={"project": project, "files": FILES, "selector": {}},
    )
    assert status == 201, rollout
    project_id = uuid.UUID(rollout["project_id"])

    async def there() -> bool:
        tasks = await _get(http, f"/api/v1/tasks?project_id={project_id}", legacy)
        schedules = await _get(http, f"/api/v1/schedules?project={project}", legacy)
        letters = await _get(http, "/api/v1/dead-letters", legacy)
        mine = [
            d for d in letters["items"] if (d["origin"] or {}).get("project_id") == str(project_id)
        ]
        registry = await _get(http, f"/api/v1/task-registry?agent_id={agent_id}", legacy)
        queues = await _get(http, "/api/v1/queues", legacy)
        depth = any(q["queue"] == f"q-{label}" and q["depths"] for q in queues["items"])
        return bool(tasks["items"] and schedules["items"] and mine and registry["items"] and depth)

    await wait_until(there, timeout=30)
    letters = await _get(http, "/api/v1/dead-letters", legacy)
    [dead_letter] = [
        d["id"]
        for d in letters["items"]
        if (d["origin"] or {}).get("project_id") == str(project_id)
    ]
    return (
        Side(
            project=project,
            project_id=project_id,
            agent=f"agent-{label}",
            agent_id=agent_id,
            worker_id=f"w-{label}",
            task_id=f"task-{label}",
            engine_worker=f"celery@{label}",
            queue=f"q-{label}",
            schedule=schedule,
            uid=uid.hex(),
            command_id=command["id"],
            rollout_id=rollout["id"],
            dead_letter=dead_letter,
        ),
        agent,
    )


@asynccontextmanager
async def two_projects(config: Config, role: str = "operator") -> AsyncIterator[World]:
    """The world: "mine" and "theirs", and a user of ``role`` narrowed to mine."""
    legacy = await admin_token(config)
    mine_label, theirs_label = MINE_LABEL, THEIRS_LABEL
    credentials = {
        label: await provision(config, project=f"proj-{label}", agent=f"agent-{label}")
        for label in (mine_label, theirs_label)
    }
    opamp = {label: await opamp_token(config, f"proj-{label}") for label in credentials}
    await trio.to_thread.run_sync(refuse_kind, config, "poison")
    async with running_brain(config) as brain, AsyncExitStack() as stack:
        http = brain.addresses.http

        async def ready() -> bool:
            return (await http_request(http, "GET", "/health/ready")).status == 200

        await wait_until(ready)
        client = await z4j.ingest.open_trio(*brain.ingest)
        async with client:
            assert await client.send_many([[{"t": "log", "note": TCP_MARK}]])
        nursery = await stack.enter_async_context(trio.open_nursery())
        sides = {}
        agents = {}
        for label in credentials:
            sides[label], agents[f"proj-{label}"] = await _seed(
                stack, nursery, http, legacy, label, credentials[label], opamp[label]
            )
        mine = sides[mine_label]
        user = {"name": "nina", "password": PASSWORD, "role": role, "projects": [mine.project]}
        status, _, made = await call(http, "POST", "/api/v1/users", token=legacy, body=user)
        assert status == 201, made
        status, headers, session = await call(
            http, "POST", "/api/v1/session", body={"name": "nina", "password": PASSWORD}
        )
        assert status == 200, session
        cookie = headers["set-cookie"].split(";")[0]
        csrf = {"X-CSRF-Token": session["csrf_token"], "Content-Type": "application/json"}
        scope = "commands" if role != "viewer" else "read"
        status, _, token = await call(
            http,
            "POST",
            "/api/v1/tokens",
            cookie=cookie,
            headers=csrf,
            body={"name": "walk", "scope": scope},
        )
        assert status == 201, token
        yield World(
            brain=brain,
            http=http,
            legacy=legacy,
            mine=mine,
            theirs=sides[theirs_label],
            token=token["token"],
            cookie=cookie,
            csrf=csrf,
            agents=agents,
            credentials={f"proj-{label}": c for label, c in credentials.items()},
        )


# -- the walk ---------------------------------------------------------------------------


def _fill(template: str, side: Side) -> str:
    """The template's path with ``side``'s resources in it."""
    by_id = {
        "/agents/": str(side.agent_id),
        "/commands/": side.command_id,
        "/dead-letters/": str(side.dead_letter),
        "/opamp/rollouts/": side.rollout_id,
        "/projects/": str(side.project_id),
    }
    values = {
        "engine": "celery",
        "task_id": side.task_id,
        "queue": side.queue,
        "worker": side.engine_worker,
        "action": "pool_grow",
        "scheduler": OWNER,
        "source_key": side.schedule,
        "instance_uid": side.uid,
        "name": "region-x",  # a federation region: nothing of a project
    }

    def one(match: re.Match[str]) -> str:
        name = match[1]
        if name == "id":
            prefix = template[: match.start()]
            for part, value in by_id.items():
                if prefix.endswith(part):
                    return value
            return str(uuid.uuid4())  # users, tokens: nothing of a project
        return values[name]

    return re.sub(r"\{(\w+)\}", one, template)


def _aimed_at(side: Side) -> tuple[str, dict[str, Any]]:
    """A query string and a body that name ``side``'s project, agent and resources."""
    query = f"project={side.project}&project_id={side.project_id}&agent_id={side.agent_id}"
    body = {
        "agent": str(side.agent_id),
        "agent_id": str(side.agent_id),
        "project": side.project,
        "action": "ping",
        "ids": [side.dead_letter],
        "filter": {"project_id": str(side.project_id)},
        "max": 10,
        "files": FILES,
        "selector": {},
    }
    return query, body


async def _theirs_state(world: World) -> Any:
    """What the walk must not change of the other project (read unnarrowed)."""
    theirs, legacy, http = world.theirs, world.legacy, world.http
    commands = await _get(http, f"/api/v1/commands?agent_id={theirs.agent_id}&limit=200", legacy)
    rollout = await _get(http, f"/api/v1/opamp/rollouts/{theirs.rollout_id}", legacy)
    letter = await call(http, "GET", f"/api/v1/dead-letters/{theirs.dead_letter}", token=legacy)
    config = await call(
        http,
        "GET",
        f"/api/v1/opamp/agents/{theirs.uid}/config?project={theirs.project}",
        token=legacy,
    )
    return (
        sorted(c["id"] for c in commands["items"]),
        rollout["state"],
        letter[0],
        config[0],
        (config[2] or {}).get("config_hash"),
    )


async def test_every_route_gives_a_narrowed_user_nothing_of_another_project(
    config: Config,
) -> None:
    """Every operation of the document, as a narrowed operator, three ways:
    no answer holds another project's (or no project's) names and ids, none
    fails with a 5xx, and one aimed at the other project's resources is
    refused (403) or not found (404), changing nothing of theirs."""
    last = [("DELETE", "/sessions"), ("DELETE", "/session")]
    operations = sorted(_operations(), key=lambda op: last.index(op) + 1 if op in last else 0)
    with trio.fail_after(240):
        async with two_projects(config) as world:
            mine, theirs = world.mine, world.theirs
            leaks = [*theirs.markers(), TCP_MARK]
            before = await _theirs_state(world)
            answered = 0
            for method, template in operations:
                for aim, side in (("none", mine), ("mine", mine), ("theirs", theirs)):
                    path = "/api/v1" + _fill(template, side)
                    query, body = _aimed_at(side)
                    if aim != "none":
                        path += f"?{query}"
                    sent = body if aim != "none" else {}
                    payload = orjson.dumps(sent) if method in ("POST", "PUT", "PATCH") else None
                    reply = await http_request(
                        world.http,
                        method,
                        path,
                        body=payload,
                        headers={
                            "Authorization": f"Bearer {world.token}",
                            "Content-Type": "application/json",
                        },
                    )
                    where = f"{aim}: {method} {path} -> {reply.status} {reply.body[:300]!r}"
                    assert reply.status < 500, where
                    request = path + (payload or b"").decode()
                    text = reply.body.decode("utf-8", "replace")
                    leaked = [m for m in leaks if m in text and m not in request]
                    assert not leaked, f"{where}: holds {leaked}"
                    if aim == "theirs" and "{" in template:
                        assert reply.status in (403, 404), where
                    answered += 1
            assert answered == 3 * len(operations)
            assert await _theirs_state(world) == before


def test_a_route_not_taught_stays_refused_and_every_taught_route_exists() -> None:
    """NARROWABLE names only real routes; what it does not name is refused
    (403 narrowed) to a narrowed caller, whatever their role allows."""
    from z4j.brain.http._request import ApiError
    from z4j.brain.http.narrowing import check_narrowed
    from z4j.brain.http.principal import Principal

    assert set(NARROWABLE) <= set(ROUTES)
    narrowed = Principal(name="n", role="admin", user_id=uuid.uuid4(), projects=frozenset())
    whole = Principal(name="w", role="admin", user_id=uuid.uuid4())
    refused = 0
    for method, template in ROUTES:
        check_narrowed(whole, method, template)  # an unnarrowed caller: never
        if (method, template) in NARROWABLE or ROUTES[(method, template)] in ("public", "self"):
            check_narrowed(narrowed, method, template)
            continue
        with pytest.raises(ApiError) as refusal:
            check_narrowed(narrowed, method, template)
        assert (refusal.value.status, refusal.value.code) == (403, "narrowed")
        refused += 1
    # Brain-wide by nature: never taught.
    for route in [
        ("GET", "/users"),
        ("POST", "/users"),
        ("GET", "/instances"),
        ("GET", "/audit"),
        ("POST", "/projects"),
        ("POST", "/agents"),
    ]:
        assert route in ROUTES and route not in NARROWABLE, route
    assert refused >= 6
    assert all(path in OPENAPI["paths"] for _, path in NARROWABLE)


# -- route families ---------------------------------------------------------------------


async def test_each_route_family_keeps_to_the_callers_projects(config: Config) -> None:
    """What a narrowed operator gets of each family: their own project's
    data, a 404 for a filter or a resource of another project, and actions
    on their own resources only."""
    with trio.fail_after(180):
        async with two_projects(config) as world:
            http, mine, theirs = world.http, world.mine, world.theirs

            async def get(path: str) -> tuple[int, Any]:
                status, _, body = await call(http, "GET", "/api/v1" + path, token=world.token)
                return status, body

            async def post(path: str, body: Any = None) -> tuple[int, Any]:
                status, _, answer = await call(
                    http, "POST", "/api/v1" + path, token=world.token, body=body or {}
                )
                return status, answer

            def ids(body: Any, key: str) -> set[str]:
                return {str(item[key]) for item in body["items"]}

            # Projects and agents: theirs only; a project filter of another's is 404.
            assert ids((await get("/projects"))[1], "name") == {mine.project}
            assert ids((await get("/agents"))[1], "id") == {str(mine.agent_id)}
            assert (await get(f"/agents?project={theirs.project}"))[0] == 404
            assert (await get(f"/agents/{theirs.agent_id}"))[0] == 404
            # Events: search, histogram and export without a filter keep to
            # theirs (no 400 any more); another project's filter is 404.
            status, events = await get("/events?limit=200")
            assert status == 200 and events["items"]
            assert {e["project_id"] for e in events["items"]} == {str(mine.project_id)}
            for path in ("/events", "/events/histogram", "/events/export"):
                assert (await get(f"{path}?project_id={theirs.project_id}"))[0] == 404, path
                assert (await get(f"{path}?agent_id={theirs.agent_id}"))[0] == 404, path
            _, histogram = await get("/events/histogram")
            _, _, everything = await call(
                http, "GET", "/api/v1/events/histogram", token=world.legacy
            )
            counted = sum(b["count"] for b in histogram["buckets"])
            assert 0 < counted < sum(b["count"] for b in everything["buckets"])
            export = await http_request(
                http,
                "GET",
                "/api/v1/events/export",
                headers={"Authorization": f"Bearer {world.token}"},
            )
            rows = [orjson.loads(line) for line in export.body.splitlines()]
            assert rows and {r["project_id"] for r in rows} == {str(mine.project_id)}
            # Commands: theirs listed without agent_id; sent only to their agents.
            assert ids((await get("/commands?limit=200"))[1], "project_id") == {
                str(mine.project_id)
            }
            assert (await get(f"/commands/{theirs.command_id}"))[0] == 404
            assert (await post(f"/commands/{theirs.command_id}/cancel"))[0] == 404
            ping = {"action": "ping"}
            assert (await post("/commands", {**ping, "agent": str(theirs.agent_id)}))[0] == 404
            named = {**ping, "agent": theirs.agent, "project": theirs.project}
            assert (await post("/commands", named))[0] == 404
            status, sent = await post("/commands", {**ping, "agent": str(mine.agent_id)})
            assert status == 201 and sent["project_id"] == str(mine.project_id)
            # Tasks: the list, names, one task and its actions.
            status, tasks = await get("/tasks")
            assert status == 200 and ids(tasks, "task_id") == {mine.task_id, f"shared-{MINE_LABEL}"}
            assert sum(tasks["counts"].values()) == 2
            assert (await get(f"/tasks?project_id={theirs.project_id}"))[0] == 404
            assert (await get(f"/tasks?agent_id={theirs.agent_id}"))[0] == 404
            _, names = await get("/tasks/names")
            by_name = {n["name"]: n for n in names["items"]}
            assert set(by_name) == {f"app.{MINE_LABEL}", SHARED}
            assert by_name[SHARED]["tasks"] == 1  # their task of that name is not counted
            assert by_name[SHARED]["runtime_ms"]["p99"] == RUNTIMES[MINE_LABEL]
            assert (await get(f"/tasks/celery/{theirs.task_id}"))[0] == 404
            assert (await get(f"/tasks/celery/{mine.task_id}"))[0] == 200
            assert (await post(f"/tasks/celery/{theirs.task_id}/retry"))[0] == 404
            assert (await post(f"/tasks/celery/{theirs.task_id}/cancel"))[0] == 404
            status, retried = await post(f"/tasks/celery/{mine.task_id}/retry")
            assert status == 201 and retried["agent_id"] == str(mine.agent_id), retried
            status, confirm = await post("/tasks/retry", {"max": 10})
            assert (status, confirm["count"]) == (409, 2)  # theirs not counted
            refused = await post("/tasks/retry", {"filter": {"project_id": str(theirs.project_id)}})
            assert refused[0] == 404
            # Queues: their brokers and outcomes; purge and dead letters of their agents only.
            _, queues = await get("/queues")
            assert {q["queue"] for q in queues["items"]} == {mine.queue}
            purge = f"/queues/celery/{theirs.queue}/purge"
            assert (await post(purge, {"agent_id": str(theirs.agent_id)}))[0] == 404
            status, confirm = await post(
                f"/queues/celery/{mine.queue}/purge", {"agent_id": str(mine.agent_id)}
            )
            assert (status, confirm["depth"]) == (409, 3)
            letters = f"/queues/celery/{theirs.queue}/dead-letters?agent_id={theirs.agent_id}"
            assert (await get(letters))[0] == 404
            requeue = f"/queues/celery/{theirs.queue}/dead-letters/x/requeue"
            assert (await post(requeue, {"agent_id": str(theirs.agent_id)}))[0] == 404
            mine_letters = f"/queues/celery/{mine.queue}/dead-letters?agent_id={mine.agent_id}"
            assert (await get(mine_letters))[0] == 200
            # Engine workers: theirs; a control of another project's worker is 404.
            _, workers = await get("/engine-workers")
            assert ids(workers, "worker") == {mine.engine_worker}
            control = f"/engine-workers/celery/{theirs.engine_worker}/pool_grow"
            assert (await post(control))[0] == 404
            assert (await post(control, {"agent_id": str(theirs.agent_id)}))[0] == 404
            status, grown = await post(f"/engine-workers/celery/{mine.engine_worker}/pool_grow")
            assert status == 201 and grown["command"]["agent_id"] == str(mine.agent_id)
            # Schedules: list, one, actions, resync to their workers only.
            _, schedules = await get("/schedules")
            assert ids(schedules, "source_key") == {mine.schedule}
            assert (await get(f"/schedules?project={theirs.project}"))[0] == 404
            assert (await get(f"/schedules/{OWNER}/{theirs.schedule}"))[0] == 404
            assert (await post(f"/schedules/{OWNER}/{theirs.schedule}/disable"))[0] == 404
            assert (await post(f"/schedules/{OWNER}/{mine.schedule}/trigger"))[0] == 201
            status, resynced = await post("/schedules/resync")
            assert status == 201
            assert {c["agent_id"] for c in resynced["commands"]} == {str(mine.agent_id)}
            # Dead letters: theirs only (ingest payloads have no project), by id too.
            _, dead = await get("/dead-letters")
            assert ids(dead, "id") == {str(mine.dead_letter)} and dead["total"] == 1
            assert (await get(f"/dead-letters/{theirs.dead_letter}"))[0] == 404
            assert (await post(f"/dead-letters/{theirs.dead_letter}/discard"))[0] == 404
            assert (await post(f"/dead-letters/{theirs.dead_letter}/requeue"))[0] == 404
            both = {"ids": [theirs.dead_letter, mine.dead_letter]}
            status, discarded = await post("/dead-letters/discard", both)
            assert status == 200 and discarded == {
                "discarded": [mine.dead_letter],
                "missing": [theirs.dead_letter],
            }
            status, _, letter = await call(
                http, "GET", f"/api/v1/dead-letters/{theirs.dead_letter}", token=world.legacy
            )
            assert status == 200, letter  # still there
            # The task registry: their agents' workers.
            _, registry = await get("/task-registry")
            assert ids(registry, "agent_id") == {str(mine.agent_id)}
            assert (await get(f"/task-registry?agent_id={theirs.agent_id}"))[0] == 404
            # OpAMP: agents, one agent, its configuration, rollouts.
            _, fleet = await get("/opamp/agents")
            assert ids(fleet, "instance_uid") == {mine.uid}
            assert (await get(f"/opamp/agents?project={theirs.project}"))[0] == 404
            for path in ("", "/config", "/history"):
                assert (await get(f"/opamp/agents/{theirs.uid}{path}"))[0] == 404, path
            assert (await get(f"/opamp/agents/{mine.uid}"))[0] == 200
            # Cancel mine while it runs: once the PUT below replaces its one
            # target's configuration (superseded, so settled), the leader may
            # complete it, and a completed rollout cannot be cancelled (409).
            assert (await post(f"/opamp/rollouts/{mine.rollout_id}/cancel"))[0] == 200
            status, _, _ = await call(
                http,
                "PUT",
                f"/api/v1/opamp/agents/{theirs.uid}/config?project={theirs.project}",
                token=world.token,
                body={"files": FILES},
            )
            assert status == 404
            status, _, _ = await call(
                http,
                "PUT",
                f"/api/v1/opamp/agents/{mine.uid}/config",
                token=world.token,
                body={"files": FILES},
            )
            assert status == 200
            _, rollouts = await get("/opamp/rollouts")
            assert ids(rollouts, "id") == {mine.rollout_id}
            assert (await get(f"/opamp/rollouts/{theirs.rollout_id}"))[0] == 404
            assert (await get(f"/opamp/rollouts?project={theirs.project}"))[0] == 404
            for verb in ("halt", "resume", "cancel"):
                assert (await post(f"/opamp/rollouts/{theirs.rollout_id}/{verb}"))[0] == 404
            new = {"project": theirs.project, "files": FILES, "selector": {}}
            assert (await post("/opamp/rollouts", new))[0] == 404
            # Brain-wide: refused.
            for path in ("/instances", "/audit", "/users"):
                status, body = await get(path)
                assert status == 403, (path, body)


async def test_a_narrowed_admin_is_no_admin_of_other_users_tokens(config: Config) -> None:
    """Tokens of others are brain-wide: a narrowed admin lists and revokes
    only their own (and provisioning and users stay refused)."""
    with trio.fail_after(120):
        async with two_projects(config, role="admin") as world:
            http = world.http
            headers = {**world.csrf}
            status, _, body = await call(
                http, "GET", "/api/v1/tokens?all=true", cookie=world.cookie
            )
            assert (status, body["error"]) == (403, "narrowed")
            status, _, _ = await call(
                http,
                "POST",
                "/api/v1/users",
                token=world.legacy,
                body={"name": "olga", "password": PASSWORD, "role": "viewer"},
            )
            assert status == 201
            status, headers_o, session = await call(
                http, "POST", "/api/v1/session", body={"name": "olga", "password": PASSWORD}
            )
            status, _, token = await call(
                http,
                "POST",
                "/api/v1/tokens",
                cookie=headers_o["set-cookie"].split(";")[0],
                headers={"X-CSRF-Token": session["csrf_token"]},
                body={"name": "olgas", "scope": "read"},
            )
            assert status == 201, token
            status, _, _ = await call(
                http,
                "DELETE",
                f"/api/v1/tokens/{token['id']}",
                cookie=world.cookie,
                headers=headers,
            )
            assert status == 404
            status, _, listed = await call(
                http, "GET", "/api/v1/tokens?all=true", token=world.legacy
            )
            assert any(
                t["id"] == token["id"] and t.get("revoked_at") is None for t in listed["items"]
            )
            for method, path in (("GET", "/api/v1/users"), ("POST", "/api/v1/projects")):
                status, _, body = await call(
                    http, method, path, cookie=world.cookie, headers=headers, body={}
                )
                assert (status, body["error"]) == (403, "narrowed"), (path, body)


# -- the store's queries ------------------------------------------------------------------


async def test_event_queries_keep_to_a_set_of_projects(config: Config) -> None:
    """``projects``: None any, a set its members' (one or several), empty none."""
    async with open_store(config) as store:
        await seed_events(store)
        everything = await store.search_events(EventFilter(limit=200))

        async def found(projects: frozenset[uuid.UUID] | None) -> list[int]:
            page = await store.search_events(EventFilter(projects=projects, limit=200))
            return [e.id for e in page.events]

        assert await found(None) == [e.id for e in everything.events]
        for projects in (frozenset({P1}), frozenset({P2}), frozenset({P1, P2})):
            assert await found(projects) == [
                e.id for e in everything.events if e.project_id in projects
            ]
        assert await found(frozenset()) == []
        assert await found(frozenset({uuid.uuid4()})) == []
        exported = await store.export_events(
            EventFilter(projects=frozenset({P2}), limit=200), "ndjson"
        )
        lines = [orjson.loads(line) for line in exported.data.splitlines()]
        assert exported.rows == len(lines) > 0
        assert {line["project_id"] for line in lines} == {str(P2)}
        one = EventFilter(projects=frozenset({P1}), text="note")
        histogram = await store.event_histogram(one, start=0.0, bucket_seconds=4e9, buckets=1)
        assert histogram.counts == [sum(1 for e in everything.events if e.project_id == P1)]


# -- the dashboard socket -----------------------------------------------------------------


def test_each_message_type_is_cut_to_the_subscribers_projects() -> None:
    mine, theirs = str(uuid.uuid4()), str(uuid.uuid4())
    projects = frozenset({mine})
    events = {
        "type": "events",
        "count": 7,
        "kinds": {"a": 4, "b": 2, "log": 1},
        "sample": [
            {"kind": "a", "project_id": mine},
            {"kind": "b", "project_id": theirs},
            {"kind": "log", "project_id": None},
        ],
        "projects": {
            mine: {"count": 4, "kinds": {"a": 4}},
            theirs: {"count": 2, "kinds": {"b": 2}},
        },
    }
    assert for_projects(events, projects) == {
        "type": "events",
        "count": 4,
        "kinds": {"a": 4},
        "sample": [{"kind": "a", "project_id": mine}],
        "projects": {mine: {"count": 4, "kinds": {"a": 4}}},
    }
    assert for_projects(events, frozenset({str(uuid.uuid4())})) is None
    # Events of no project (ingest) or from a brain that sent no projects: none.
    assert for_projects({**events, "projects": {}}, projects) is None
    assert for_projects({k: v for k, v in events.items() if k != "projects"}, projects) is None
    for message in (
        {"type": "command", "command": {"id": "c", "project_id": mine}},
        {"type": "agent", "agent_id": "a", "project_id": mine, "state": "connected"},
        {"type": "opamp_agent", "project_id": mine, "instance_uid": "u", "change": "state"},
        {"type": "opamp_rollout", "rollout": {"id": "r", "project_id": mine}},
    ):
        assert for_projects(message, projects) is message
        other = orjson.loads(orjson.dumps(message).replace(mine.encode(), theirs.encode()))
        assert for_projects(other, projects) is None
    # Brain-wide, or not known to be of a project: never sent to them.
    assert for_projects({"type": "instance", "instance": {"id": "i"}}, projects) is None
    assert for_projects({"type": "newer", "project_id": mine}, projects) is None


def test_the_hub_queues_a_narrowed_subscriber_only_its_projects_and_coalesces_them() -> None:
    mine, theirs = uuid.uuid4(), uuid.uuid4()
    hub = DashboardHub(BrainStats(), None, instance_id="i")
    narrowed, whole = _Subscriber(frozenset({mine})), _Subscriber()
    hub._subscribers |= {narrowed, whole}

    def batch(project: uuid.UUID, n: int) -> dict[str, Any]:
        p = str(project)
        return {
            "type": "events",
            "count": n,
            "kinds": {"k": n},
            "sample": [{"kind": "k", "project_id": p}],
            "projects": {p: {"count": n, "kinds": {"k": n}}},
        }

    hub.publish(batch(mine, 2))
    hub.publish(batch(theirs, 5))
    hub.publish(batch(mine, 3))
    hub.publish({"type": "instance", "instance": {}})
    hub.publish({"type": "command", "command": {"project_id": str(theirs)}})
    assert [m["type"] for m in whole.queue] == ["events", "instance", "command"]
    assert whole.queue[0]["count"] == 10
    assert whole.queue[0]["projects"][str(theirs)]["count"] == 5
    [only] = narrowed.queue
    assert (only["count"], only["kinds"], list(only["projects"])) == (5, {"k": 5}, [str(mine)])
    merged = merge_events(batch(mine, 1), batch(theirs, 2))
    assert merged["projects"] == {
        str(mine): {"count": 1, "kinds": {"k": 1}},
        str(theirs): {"count": 2, "kinds": {"k": 2}},
    }


@pytest.mark.parametrize("store_kind", ["sqlite"], indirect=True)
async def test_a_narrowed_dashboard_socket_gets_only_its_projects_updates(config: Config) -> None:
    """The real socket, signed in by the narrowed user's session: of events,
    commands, workers, OpAMP agents and rollouts of both projects (and
    ingest events and heartbeats), it gets its own project's only, while an
    unnarrowed socket gets all of them."""
    with trio.fail_after(120):
        async with two_projects(config) as world:
            http, mine, theirs = world.http, world.mine, world.theirs
            session = world.cookie.split("=", 1)[1]
            csrf = world.csrf["X-CSRF-Token"]
            async with (
                viewer(http, None, origin="http://x", session=session, csrf=csrf) as narrowed,
                viewer(http, world.legacy) as whole,
            ):
                await narrowed.next_message("hello")
                await whole.next_message("hello")
                client = await z4j.ingest.open_trio(*world.brain.ingest)
                async with client:
                    assert await client.send_many([[{"t": "log", "note": TCP_MARK}]])
                for side in (theirs, mine):
                    label = side.task_id.removeprefix("task-")
                    agent = world.agents[side.project]
                    more = _task_events(label + "-2")
                    await agent.send(f.EventBatch(events=more), frame_id=f"again-{label}")
                    status, _, _ = await call(
                        http,
                        "POST",
                        "/api/v1/commands",
                        token=world.legacy,
                        body={"agent": str(side.agent_id), "action": "ping"},
                    )
                    assert status == 201
                    rollout = {"project": side.project, "files": FILES, "selector": {}}
                    status, _, _ = await call(
                        http, "POST", "/api/v1/opamp/rollouts", token=world.legacy, body=rollout
                    )
                    assert status == 201
                # A worker of theirs comes and goes.
                token, secret, _ = world.credentials[theirs.project]
                async with raw_agent(http, token, secret, worker_id="late-q7x", prove=True):
                    pass
                # The unnarrowed socket sees all of it; then a last command of
                # mine marks the end of what the narrowed one could have had.
                seen: list[dict[str, Any]] = []
                wanted = {
                    ("events", str(theirs.project_id)),
                    ("events", str(mine.project_id)),
                    ("events", None),
                    ("command", str(theirs.project_id)),
                    ("opamp_rollout", str(theirs.project_id)),
                    ("agent", None),
                    ("instance", None),
                }
                got: set[tuple[str, str | None]] = set()
                while not wanted <= got:
                    message = await _next(whole)
                    seen.append(message)
                    got |= _tags(message)
                status, _, last = await call(
                    http,
                    "POST",
                    "/api/v1/commands",
                    token=world.legacy,
                    body={"agent": str(mine.agent_id), "action": "last"},
                )
                assert status == 201
                received: list[dict[str, Any]] = []
                while True:
                    message = await _next(narrowed)
                    received.append(message)
                    if message["type"] == "command" and message["command"]["id"] == last["id"]:
                        break
            text = orjson.dumps(received).decode()
            leaked = [m for m in [*theirs.markers(), TCP_MARK, "late-q7x"] if m in text]
            assert not leaked, leaked
            types = {m["type"] for m in received}
            assert {"events", "command", "opamp_rollout"} <= types and "instance" not in types
            for message in received:
                if message["type"] == "events":
                    assert set(message["projects"]) == {str(mine.project_id)}
                    assert message["count"] == sum(p["count"] for p in message["projects"].values())
                    assert all(e["project_id"] == str(mine.project_id) for e in message["sample"])


async def _next(v: Any) -> dict[str, Any]:
    event = await v.next_event()
    assert isinstance(event, TextMessage), event
    message: dict[str, Any] = orjson.loads(event.data)
    return message


def _tags(message: dict[str, Any]) -> set[tuple[str, str | None]]:
    """(type, project) pairs a message shows, for knowing what a socket has had."""
    kind = message["type"]
    if kind == "events":
        tags: set[tuple[str, str | None]] = {(kind, p) for p in message.get("projects", {})}
        if any(e.get("project_id") is None for e in message["sample"]):
            tags.add((kind, None))
        return tags
    if kind == "command":
        return {(kind, message["command"]["project_id"])}
    if kind == "opamp_rollout":
        return {(kind, message["rollout"]["project_id"])}
    return {(kind, None)}


def test_the_walk_covers_every_route_the_document_has() -> None:
    # The walk's fills know every path parameter the document uses.
    known = {
        "id",
        "engine",
        "task_id",
        "queue",
        "worker",
        "action",
        "scheduler",
        "source_key",
        "instance_uid",
        "name",
    }
    used = {name for path in OPENAPI["paths"] for name in re.findall(r"\{(\w+)\}", path)}
    assert used <= known, used - known
