"""The real z4j engine adapters (z4j-celery, -dramatiq, -huey, -taskiq 1.13.0) against a brain.

Each engine runs, unchanged, in its own process (tests/agents/engine_agent.py)
on an in-memory broker, with z4j-bare's agent runtime beside it, connected to
a real brain (SQLite store) over /ws/agent. What is checked is what the
brain shows through its REST API (and, where the API does not show it, its
store), one check function each, in `CHECKS` order:

- `worker_connects`: the agent's worker appears under GET /api/v1/agents,
  connected, with the agent_status it sent; the hello it sent (stored, not
  shown by the API) names the engine and the capabilities the adapter
  advertises.
- `lifecycle_events_land`: the ``ok``, ``boom`` and ``flaky`` tasks'
  events reach GET /api/v1/events, exactly the kinds and counts each engine
  sends (the retries included). Celery's events come both from its signal
  hooks and from its broker-events monitor; `celery_doubles_are_distinct`
  checks that both copies land as distinct events.
- `tasks_appear_with_their_states`: the task projection (GET /api/v1/tasks)
  holds one task per task id, ``ok`` succeeded, ``boom`` failed, ``flaky``
  failed after 3 attempts, each with its real name.
- `celery_doubles_merge_into_one_task`: celery's two copies make one task:
  the real name and native result of the signal copy, the worker hostname
  and runtime of the monitor's.
- `retry_in_one_click`: POST /api/v1/tasks/{engine}/{boom}/retry with no
  body completes with a result naming a new task id (dramatiq reports no
  inputs, so there the brain asks for them: 409 inputs_unknown, then the
  inputs given); the new task appears, and each task lists the command.
- `cancel_where_offered`: POST .../cancel completes where the adapter
  advertises it (celery, huey) on a task scheduled for later; elsewhere
  the brain does not offer it (409 not_offered).
- `purge_after_confirming` (celery): POST /api/v1/queues/.../purge first
  asks for the depth (409 confirm), then a wrong depth fails at the agent
  and the right one purges; the token the brain sent is the adapters' rule
  (HMAC-SHA256 under the project key of ``purge|queue|depth``).
- `engine_workers_appear`: GET /api/v1/engine-workers lists the engine's
  own worker as its tasks name it, beside the agent's worker: celery's
  hostname ``matrix@localhost`` with the six worker controls its adapter
  advertises, dramatiq's ``host@pid`` (the agent process) with none; huey
  and taskiq name no worker.
- `celery_pool_grow_completes`: POST /api/v1/engine-workers/celery/
  matrix@localhost/pool_grow completes, while the worker logs that its solo
  pool cannot grow: celery's controls are fire-and-forget, as the answer
  warns. Dramatiq's worker is offered no control (its restart_worker would
  restart the agent).
- `dramatiq_dead_letters_listed`: GET /api/v1/queues/dramatiq/default/
  dead-letters asks the agent (dlq.list) and returns the StubBroker's dead
  letters: flaky after 3 attempts, boom and its one-click retry after 1,
  newest first, with no time (the stub keeps none); re-queue is not
  offered (no 1.13 adapter advertises it).
  Elsewhere the listing is not offered.
- `nothing_rejected`: the brain refused no frame of the agent's.
And, as the session ends, the agent stops cleanly on SIGTERM.

Every wait polls the API until the expected state appears, up to DEADLINE
seconds, so a slow machine is slower, not failing. A new check is one more
``async def check(s: Session) -> None`` added to `CHECKS`.

A scheduler adapter, z4j-hueyperiodic (1.13.0, with z4j-bare's durable
overrides), runs beside z4j-huey in `test_huey_periodic_schedules_against_brain`
(SCENARIO ``schedules``), through `SCHEDULE_CHECKS`: the brain activates its
stream and lists the periodic tasks; Sync now publishes them again; disable
lands as the adapter's override; a restarted agent (same buffer) accepts the
next epoch and keeps the override; trigger runs the task; delete removes it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs
import orjson
import pytest
import trio

from z4j import keys
from z4j.brain.http.resources import WORKER_ACTIONS
from z4j.brain.http.workers_api import CONTROL_WARNING
from z4j.config import Config
from z4j.protocol.agent.signing import decode_secret
from z4j.testing.agents import admin_token, provision
from z4j.testing.brain import RunningBrain, make_config, running_brain
from z4j.testing.http import http_request
from z4j.testing.store import json_of, query

pytestmark = pytest.mark.slow

ENGINE_AGENT = Path(__file__).parent / "agents" / "engine_agent.py"
DEADLINE = 60.0  # seconds: the most any one wait may take
POLL = 0.1
AGENT_SECONDS = 300  # the agent's own limit; a test stops it (SIGTERM) when done

# -- what each engine does ----------------------------------------------------------------


def kinds(**counts: int) -> Counter[str]:
    """``received=1`` -> Counter({"task.received": 1})."""
    return Counter({f"task.{kind}": n for kind, n in counts.items()})


@attrs.frozen(kw_only=True)
class Engine:
    name: str
    capabilities: frozenset[str]
    """hello.capabilities[name], as the adapter advertises them."""
    events: dict[str, Counter[str]]
    """Event kinds and counts per task (ok, boom, flaky)."""
    retry_result_key: str
    """Where retry_task's result names the new task."""

    @property
    def cancels(self) -> bool:
        return "cancel_task" in self.capabilities


# Celery (solo pool): started, succeeded, failed and retried come twice
# (signal hooks and broker-events monitor); received once. A retry is
# received again. Dramatiq reports a retry's re-enqueue twice (to the delay
# queue, then back). Taskiq sends no new received on a retry.
ENGINES = {
    e.name: e
    for e in [
        Engine(
            name="celery",
            capabilities=frozenset(
                {
                    "add_consumer",
                    "bulk_retry",
                    "cancel_consumer",
                    "cancel_task",
                    "pool_grow",
                    "pool_shrink",
                    "purge_queue",
                    "rate_limit",
                    "restart_worker",
                    "retry_by_reference_v1",
                    "retry_task",
                    "submit_task",
                }
            ),
            events={
                "ok": kinds(received=1, started=2, succeeded=2),
                "boom": kinds(received=1, started=2, failed=2),
                "flaky": kinds(received=3, started=6, retried=4, failed=2),
            },
            retry_result_key="new_task_id",
        ),
        Engine(
            name="dramatiq",
            capabilities=frozenset(
                {
                    "list_dead_letters",
                    "purge_queue",
                    "retry_by_reference_v1",
                    "retry_task",
                    "submit_task",
                }
            ),
            events={
                "ok": kinds(received=1, started=1, succeeded=1),
                "boom": kinds(received=1, started=1, failed=1),
                "flaky": kinds(received=5, started=3, retried=2, failed=1),
            },
            retry_result_key="task_id",
        ),
        Engine(
            name="huey",
            capabilities=frozenset(
                {"cancel_task", "retry_by_reference_v1", "retry_task", "submit_task"}
            ),
            events={
                "ok": kinds(received=1, started=1, succeeded=1),
                "boom": kinds(received=1, started=1, failed=1),
                "flaky": kinds(received=3, started=3, retried=2, failed=1),
            },
            retry_result_key="new_task_id",
        ),
        Engine(
            name="taskiq",
            capabilities=frozenset({"submit_task"}),
            events={
                "ok": kinds(received=1, started=1, succeeded=1),
                "boom": kinds(received=1, started=1, failed=1),
                "flaky": kinds(received=1, started=3, retried=2, failed=1),
            },
            retry_result_key="task_id",
        ),
    ]
}

# -- a session: a brain, and one engine's agent connected to it ---------------------------


@attrs.define
class Session:
    engine: Engine
    brain: RunningBrain
    config: Config
    admin: str
    agent_id: uuid.UUID
    secret: str
    home: Path
    proc: subprocess.Popen[bytes]
    tasks: dict[str, dict[str, str]] = attrs.field(factory=dict)
    """From the agent's "enqueued" milestone: {"ok": {"id", "name"}, ...}."""
    queued: dict[str, int] = attrs.field(factory=dict)
    token: str = ""
    """The agent's token (to start it again)."""

    def agent_log(self) -> str:
        return (self.home / "agent.log").read_text(errors="replace")[-4000:]

    def milestones(self) -> list[dict[str, Any]]:
        # Whole lines only: the last piece may be a line still being written.
        lines = (self.home / "milestones.jsonl").read_bytes().split(b"\n")[:-1]
        return [orjson.loads(line) for line in lines if line.startswith(b"{")]

    async def eventually(
        self,
        probe: Callable[[], Awaitable[Any]],
        what: str,
        until: Callable[[Any], bool] = bool,
    ) -> Any:
        """Poll ``probe`` until ``until`` holds for what it returns (by default:
        until that is truthy) and return that; fail after DEADLINE seconds, or at
        once if the agent has exited, saying ``what`` and the last value seen."""
        last: Any = None
        with trio.move_on_after(DEADLINE):
            while True:
                last = await probe()
                if until(last):
                    return last
                if self.proc.poll() is not None:
                    pytest.fail(
                        f"{self.engine.name} agent exited ({self.proc.returncode}) waiting for"
                        f" {what}; last: {last!r}\n{self.agent_log()}"
                    )
                await trio.sleep(POLL)
        pytest.fail(
            f"{self.engine.name}: no {what} within {DEADLINE}s; last: {last!r}\n"
            f"agent log (tail):\n{self.agent_log()[-2000:]}"
        )

    async def milestone(self, key: str) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            return next((m for m in self.milestones() if key in m), None)

        found: dict[str, Any] = await self.eventually(probe, f"milestone {key!r}")
        return found

    async def api(self, method: str, path: str, body: Any = None) -> Any:
        """A call that must succeed: its parsed body."""
        status, parsed = await self.api_status(method, path, body)
        assert 200 <= status < 300, (method, path, status, parsed)
        return parsed

    async def api_status(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Like `api`, for calls that may be refused: (status, parsed body)."""
        headers = {"Authorization": f"Bearer {self.admin}"}
        if body is not None or method == "POST":
            headers["Content-Type"] = "application/json"
        reply = await http_request(
            self.brain.addresses.http,
            method,
            path,
            body=None if body is None else orjson.dumps(body),
            headers=headers,
        )
        return reply.status, reply.json()

    async def finished(self, command_id: str) -> dict[str, Any]:
        """Poll a command until it is final: its record."""

        async def final() -> dict[str, Any] | None:
            record: dict[str, Any] = await self.api("GET", f"/api/v1/commands/{command_id}")
            return record if record["state"] in ("completed", "failed", "timeout") else None

        done: dict[str, Any] = await self.eventually(final, f"end of command {command_id}")
        return done

    async def events(self) -> list[dict[str, Any]]:
        """Every event of this agent, oldest first, through GET /api/v1/events."""
        items: list[dict[str, Any]] = []
        cursor = None
        while True:
            path = f"/api/v1/events?agent_id={self.agent_id}&limit=500"
            if cursor is not None:
                path += f"&cursor={quote(cursor)}"
            page = await self.api("GET", path)
            items += page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                return items[::-1]

    async def task_events(self, task_id: str) -> list[dict[str, Any]]:
        return [e for e in await self.events() if e["body"]["task_id"] == task_id]


def start_engine_agent(
    engine: str,
    url: str,
    token: str,
    secret: str,
    project: str,
    home: Path,
    scenario: str = "lifecycle",
) -> subprocess.Popen[bytes]:
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("Z4J_")}
    env.update(
        {
            "Z4J_HOME": str(home),
            "Z4J_HMAC_SECRET": secret,  # purge_queue reads it from here
            "NO_PROXY": "127.0.0.1,localhost",
        }
    )
    args = [engine, url, token, secret, project, str(AGENT_SECONDS), scenario]
    with open(home / "milestones.jsonl", "ab") as out, open(home / "agent.log", "ab") as log:
        return subprocess.Popen(  # the child keeps its own copies of the files
            [sys.executable, str(ENGINE_AGENT), *args], env=env, stdout=out, stderr=log
        )


async def stop_agent(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM; SIGKILL if it has not exited in 30 s. Its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return await trio.to_thread.run_sync(proc.wait, 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        await trio.to_thread.run_sync(proc.wait, 10)
        raise


@asynccontextmanager
async def engine_session(engine: Engine, tmp_path: Path) -> AsyncIterator[Session]:
    config = make_config(tmp_path / "data")
    admin = await admin_token(config)
    token, secret, agent_id = await provision(config, agent=f"matrix-{engine.name}")
    async with running_brain(config) as brain:
        home = tmp_path / "agent"
        proc = start_engine_agent(
            engine.name, brain.addresses.http_url, token, secret, "demo", home
        )
        s = Session(engine, brain, config, admin, agent_id, secret, home, proc)
        try:
            enqueued = await s.milestone("enqueued")
            s.tasks, s.queued = enqueued["enqueued"], enqueued.get("queued", {})
            yield s
        except BaseException:
            await stop_agent(proc)
            raise
        code = await stop_agent(proc)
        assert code == 0, f"agent exit {code}\n{s.agent_log()}"
        assert {"stopped": True} in s.milestones(), s.agent_log()


# -- the checks ---------------------------------------------------------------------------


async def worker_connects(s: Session) -> None:
    async def connected() -> dict[str, Any] | None:
        agents = (await s.api("GET", "/api/v1/agents"))["items"]
        [agent] = [a for a in agents if a["id"] == str(s.agent_id)]
        assert agent["project"] == "demo" and agent["name"] == f"matrix-{s.engine.name}"
        live = [w for w in agent["workers"] if w["connected"] and w["status"]]
        return live[0] if len(live) == 1 else None

    worker = await s.eventually(connected, "connected worker with its agent_status")
    assert worker["status"]["engines"] == [s.engine.name]
    assert worker["status"]["protocol_version"] == "2"
    [(raw,)] = query(
        s.config,
        "SELECT hello FROM workers WHERE agent_id = ? AND worker_id = ?",
        str(s.agent_id),
        worker["worker_id"],
    )
    hello = json_of(s.config, raw)
    assert hello["framework"] == "bare" and hello["engines"] == [s.engine.name]
    assert set(hello["capabilities"]) == {s.engine.name}
    assert set(hello["capabilities"][s.engine.name]) == s.engine.capabilities


def kinds_by_task(events: list[dict[str, Any]], ids: dict[str, str]) -> dict[str, Counter[str]]:
    got: dict[str, Counter[str]] = {key: Counter() for key in ids}
    for event in events:
        for key, task_id in ids.items():
            if event["body"]["task_id"] == task_id:
                got[key][event["kind"]] += 1
    return got


async def lifecycle_events_land(s: Session) -> None:
    ids = {key: s.tasks[key]["id"] for key in s.engine.events}
    expected = s.engine.events

    async def counts() -> dict[str, Counter[str]]:
        return kinds_by_task(await s.events(), ids)

    await s.eventually(
        counts,
        "task lifecycle events",
        until=lambda got: all(got[k] >= expected[k] for k in expected),
    )
    events = await s.events()
    assert kinds_by_task(events, ids) == expected  # and nothing more
    mine = [e for e in events if e["body"]["task_id"] in ids.values()]
    assert len({e["body"]["id"] for e in mine}) == len(mine)  # each event its own id
    assert {e["body"]["engine"] for e in mine} == {s.engine.name}
    assert all(e["source"] == "agent" for e in mine)
    for event in mine:
        if event["kind"] == "task.failed" and event["body"]["task_id"] == ids["boom"]:
            assert "ValueError" in event["body"]["data"]["exception"]


async def celery_doubles_are_distinct(s: Session) -> None:
    if s.engine.name != "celery":
        return
    ok = s.tasks["ok"]
    succeeded = [e for e in await s.task_events(ok["id"]) if e["kind"] == "task.succeeded"]
    signal_copy, monitor_copy = sorted(
        succeeded, key=lambda e: e["body"]["data"]["task_name"] != ok["name"]
    )
    assert signal_copy["body"]["id"] != monitor_copy["body"]["id"]
    assert signal_copy["key"] != monitor_copy["key"]
    assert signal_copy["body"]["data"]["task_name"] == ok["name"]
    assert signal_copy["body"]["data"]["result"] == 42
    assert monitor_copy["body"]["data"]["task_name"].startswith("<unknown:")
    assert monitor_copy["body"]["data"]["worker"] == "matrix@localhost"
    assert monitor_copy["body"]["data"]["result"] == "42"


async def tasks_appear_with_their_states(s: Session) -> None:
    """The projection: one task per task id, in its final state, with its name."""
    expected = {"ok": ("succeeded", 1), "boom": ("failed", 1), "flaky": ("failed", 3)}
    ids = {s.tasks[key]["id"]: key for key in expected}

    async def projected() -> dict[str, dict[str, Any]]:
        body = await s.api("GET", f"/api/v1/tasks?engine={s.engine.name}&limit=500")
        return {t["task_id"]: t for t in body["items"] if t["task_id"] in ids}

    def settled(got: dict[str, dict[str, Any]]) -> bool:
        return all(
            task_id in got and (got[task_id]["state"], got[task_id]["attempts"]) == expected[key]
            for task_id, key in ids.items()
        )

    got = await s.eventually(projected, "tasks in their final states", until=settled)
    for task in got.values():
        assert task["name"] and not task["name"].startswith("<unknown"), task
        assert task["agent_id"] == str(s.agent_id)
    boom = got[s.tasks["boom"]["id"]]
    assert boom["exception"] and "ValueError" in boom["exception"], boom
    body = await s.api("GET", f"/api/v1/tasks?engine={s.engine.name}&limit=500")
    listed = [t["task_id"] for t in body["items"] if t["task_id"] in ids]
    assert sorted(listed) == sorted(ids)  # one row each, whatever the engine sent twice


async def celery_doubles_merge_into_one_task(s: Session) -> None:
    """Signal and broker-monitor copies: the real name and native result from
    the first, the worker's hostname and the runtime from the second."""
    if s.engine.name != "celery":
        return
    ok = s.tasks["ok"]

    async def merged() -> dict[str, Any]:
        task: dict[str, Any] = await s.api("GET", f"/api/v1/tasks/celery/{ok['id']}")
        return task

    task = await s.eventually(
        merged, "the broker copy's worker on the task", until=lambda t: t["worker"] is not None
    )
    assert task["name"] == ok["name"]
    assert task["result"] == 42  # not the monitor's repr "42"
    assert task["worker"] == "matrix@localhost"
    assert task["runtime_ms"] is not None
    assert len(task["timeline"]) == 1


async def retry_in_one_click(s: Session) -> None:
    """POST /tasks/{engine}/{id}/retry with nothing typed: the brain fills in
    what the engine needs; the result's new task links back to the old one."""
    boom = s.tasks["boom"]
    path = f"/api/v1/tasks/{s.engine.name}/{boom['id']}"
    detail = await s.api("GET", path)
    assert "retry" in detail["actions"], detail["actions"]
    created = await s.api_status("POST", f"{path}/retry")
    if s.engine.name == "dramatiq":
        # Dramatiq's events carry no inputs: the operator confirms them.
        assert created[0] == 409 and created[1]["error"] == "inputs_unknown", created
        created = await s.api_status("POST", f"{path}/retry", {"args": [], "kwargs": {}})
    assert created[0] == 201, created
    done = await s.finished(created[1]["id"])
    assert done["state"] == "completed", done
    new_id = done["result"][s.engine.retry_result_key]
    assert isinstance(new_id, str) and new_id and new_id != boom["id"], done["result"]

    async def new_task() -> dict[str, Any] | None:
        status, task = await s.api_status("GET", f"/api/v1/tasks/{s.engine.name}/{new_id}")
        return task if status == 200 and task["state"] == "failed" else None

    task = await s.eventually(new_task, f"the retried task {new_id}, failed")
    assert [c["id"] for c in task["commands"]] == [done["id"]]  # new -> old
    old = await s.api("GET", path)
    assert done["id"] in [c["id"] for c in old["commands"]]  # old -> new


async def cancel_where_offered(s: Session) -> None:
    if not s.engine.cancels:
        boom = s.tasks["boom"]["id"]
        status, refused = await s.api_status("POST", f"/api/v1/tasks/{s.engine.name}/{boom}/cancel")
        assert (status, refused["error"]) == (409, "not_offered")
        return
    later = s.tasks["later"]["id"]

    async def known() -> bool:
        status, _ = await s.api_status("GET", f"/api/v1/tasks/{s.engine.name}/{later}")
        return status == 200

    await s.eventually(known, f"the task {later} scheduled for later")
    status, created = await s.api_status("POST", f"/api/v1/tasks/{s.engine.name}/{later}/cancel")
    assert status == 201, created
    done = await s.finished(created["id"])
    assert done["state"] == "completed", done
    assert done["result"]["task_id"] == later
    flag = {"celery": "terminated", "huey": "revoked"}[s.engine.name]
    assert done["result"][flag] is True, done["result"]


def purge_token(project_key: bytes, queue: str, depth: int) -> str:
    """purge_queue's confirm token, computed here from the adapters' rule, not
    the brain's: HMAC-SHA256 under the project's 32-byte key."""
    message = f"purge|{queue}|{depth}".encode()
    return hmac.new(project_key, message, hashlib.sha256).hexdigest()


async def purge_after_confirming(s: Session) -> None:
    if s.engine.name != "celery":
        return
    [(queue, depth)] = s.queued.items()
    path = f"/api/v1/queues/celery/{queue}/purge"
    status, asked = await s.api_status("POST", path, {"agent_id": str(s.agent_id)})
    # The in-memory broker reports no depths: the brain does not know it.
    assert (status, asked["error"], asked["depth"]) == (409, "confirm", None), asked
    status, created = await s.api_status(
        "POST", path, {"agent_id": str(s.agent_id), "confirm_depth": depth + 1}
    )
    wrong = await s.finished(created["id"])
    assert wrong["state"] == "failed" and "mismatch" in wrong["error"], wrong
    status, created = await s.api_status(
        "POST", path, {"agent_id": str(s.agent_id), "confirm_depth": depth}
    )
    assert status == 201
    # The token the brain sent is the adapters' own rule, under the project key.
    agent = await s.api("GET", f"/api/v1/agents/{s.agent_id}")
    key = keys.project_key(keys.master_secret(s.config), uuid.UUID(agent["project_id"]))
    assert key == decode_secret(s.secret)
    assert created["parameters"]["confirm_token"] == purge_token(key, queue, depth)
    right = await s.finished(created["id"])
    assert right["state"] == "completed", right
    assert right["result"] == {
        "queue": queue,
        "depth_before": depth,
        "purged": depth,
        "force": False,
    }


async def engine_workers_appear(s: Session) -> None:
    """The engine's own worker, as the projection's tasks name it, per agent."""
    expected = {
        "celery": "matrix@localhost",
        "dramatiq": f"{socket.gethostname()}@{s.proc.pid}",  # its host@pid
    }.get(s.engine.name)

    async def mine() -> list[dict[str, Any]]:
        body = await s.api("GET", "/api/v1/engine-workers")
        assert body["warning"] == CONTROL_WARNING
        return [w for w in body["items"] if w["agent_id"] == str(s.agent_id)]

    if expected is None:  # huey and taskiq send no worker
        assert await mine() == []
        return
    [worker] = await s.eventually(
        mine,
        f"engine worker {expected}",
        until=lambda got: (
            [w["worker"] for w in got] == [expected] and got[0]["states"].get("failed", 0) >= 2
        ),
    )
    assert worker["engine"] == s.engine.name
    assert worker["states"].get("succeeded") == 1  # ok; boom, flaky and boom's retry failed
    [beside] = [w for w in worker["agent_workers"] if w["connected"]]
    assert beside["worker_id"].startswith("bare-")  # z4j-bare's own worker id
    if s.engine.name == "celery":
        assert worker["actions"] == list(WORKER_ACTIONS)  # all six, advertised by z4j-celery
    else:
        assert worker["actions"] == []


async def celery_pool_grow_completes(s: Session) -> None:
    """Celery's controls are broadcasts: the command completes once sent,
    whatever the worker did with it (a solo pool has no pool to grow)."""
    if s.engine.name == "dramatiq":
        worker = f"{socket.gethostname()}@{s.proc.pid}"
        for action in ("restart_worker", "pool_grow"):
            status, refused = await s.api_status(
                "POST", f"/api/v1/engine-workers/dramatiq/{worker}/{action}"
            )
            assert (status, refused["error"]) == (409, "not_offered"), refused
        return
    if s.engine.name != "celery":
        return
    status, sent = await s.api_status(
        "POST", "/api/v1/engine-workers/celery/matrix@localhost/pool_grow", {"delta": 1}
    )
    assert status == 201, sent
    assert sent["warning"] == CONTROL_WARNING
    assert sent["command"]["agent_id"] == str(s.agent_id)
    done = await s.finished(sent["command"]["id"])
    assert done["state"] == "completed", done
    assert done["result"] == {"worker": "matrix@localhost", "delta": 1}

    # ...while the worker itself refused it: a solo pool cannot grow.
    async def refused() -> bool:
        return "object has no attribute 'grow'" in s.agent_log()

    await s.eventually(refused, "the worker's own error for pool_grow")


async def dramatiq_dead_letters_listed(s: Session) -> None:
    path = f"/api/v1/queues/{s.engine.name}/default/dead-letters?agent_id={s.agent_id}"
    if s.engine.name != "dramatiq":
        status, refused = await s.api_status("GET", path)
        assert (status, refused["error"]) == (409, "not_offered"), refused
        return

    async def listed() -> dict[str, Any]:
        page: dict[str, Any] = await s.api("GET", path)
        return page

    boom, flaky = s.tasks["boom"]["id"], s.tasks["flaky"]["id"]
    page = await s.eventually(
        listed,
        "the dead letters",
        until=lambda p: {boom, flaky} <= {e["task_id"] for e in p["items"]},
    )
    entries = {e["task_id"]: e for e in page["items"]}
    # boom's one-click retry (retry_in_one_click) failed too: a third dead letter.
    [retried] = set(entries) - {boom, flaky}
    assert (page["total"], page["next_cursor"], page["actions"]) == (3, None, [])
    assert entries[flaky]["attempts"] == 3 and entries[boom]["attempts"] == 1
    assert entries[retried]["attempts"] == 1
    assert {e["queue"] for e in page["items"]} == {"default"}
    assert {e["task_name"] for e in page["items"]} == {"boom", "flaky"}
    assert "RuntimeError" in entries[flaky]["error_excerpt"]
    assert "ValueError" in entries[boom]["error_excerpt"]
    # The StubBroker keeps no dead-letter time (redis would: its sorted set's score).
    assert all(e["failed_at"] is None for e in page["items"])
    command = await s.api("GET", f"/api/v1/commands/{page['command_id']}")
    assert (command["action"], command["state"]) == ("dlq.list", "completed")
    # The agent's own cursor pages them.
    first = await s.api("GET", f"{path}&limit=2")
    assert [e["task_id"] for e in first["items"]] == [e["task_id"] for e in page["items"][:2]]
    rest = await s.api("GET", f"{path}&limit=2&cursor={first['next_cursor']}")
    assert [e["task_id"] for e in rest["items"]] == [page["items"][2]["task_id"]]
    status, refused = await s.api_status(
        "POST",
        f"/api/v1/queues/dramatiq/default/dead-letters/{boom}/requeue",
        {"agent_id": str(s.agent_id)},
    )
    assert (status, refused["error"]) == (409, "not_offered"), refused


async def nothing_rejected(s: Session) -> None:
    assert s.brain.stats.agent_rejected == {}


CHECKS: list[Callable[[Session], Awaitable[None]]] = [
    worker_connects,
    lifecycle_events_land,
    celery_doubles_are_distinct,
    tasks_appear_with_their_states,
    celery_doubles_merge_into_one_task,
    retry_in_one_click,
    cancel_where_offered,
    purge_after_confirming,
    engine_workers_appear,
    celery_pool_grow_completes,
    dramatiq_dead_letters_listed,
    nothing_rejected,
]


@pytest.mark.parametrize("engine", sorted(ENGINES))
async def test_engine_adapter_against_brain(engine: str, tmp_path: Path) -> None:
    with trio.fail_after(8 * DEADLINE):  # a backstop only: each wait has its own deadline
        async with engine_session(ENGINES[engine], tmp_path) as session:
            for check in CHECKS:
                await check(session)


# -- a scheduler adapter: z4j-hueyperiodic -------------------------------------------------

PERIODIC = "huey-periodic"
PERIODIC_TASKS = {"every5": "*/5 * * * *", "nightly": "0 3 * * *"}


async def periodic_schedules(s: Session) -> dict[str, dict[str, Any]]:
    body = await s.api("GET", f"/api/v1/schedules?scheduler={PERIODIC}")
    return {item["name"]: item for item in body["items"]}


async def schedules_where(
    s: Session, what: str, until: Callable[[dict[str, dict[str, Any]]], bool]
) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = await s.eventually(
        lambda: periodic_schedules(s), what, until=until
    )
    return found


async def activated_schedules_are_listed(s: Session) -> None:
    """Once the brain activates the stream, the periodic tasks are listed."""
    found = await schedules_where(s, "the periodic tasks", lambda f: set(f) == set(PERIODIC_TASKS))
    for name, expression in PERIODIC_TASKS.items():
        item = found[name]
        assert (item["scheduler"], item["engine"], item["kind"], item["timezone"]) == (
            PERIODIC,
            "huey",
            "cron",
            "UTC",
        ), item
        assert item["expression"] == expression and item["is_enabled"] is True
        assert item["task_name"] == item["source_key"] == f"__main__.{name}"
        assert item["source"] == f"{PERIODIC}:code" and item["agent_id"] == str(s.agent_id)
        assert (item["epoch_number"], item["sequence"]) == (1, 1)
        assert item["actions"] == ["enable", "disable", "trigger", "delete"]
    commands = await s.api("GET", f"/api/v1/commands?agent_id={s.agent_id}&limit=500")
    [activation] = [c for c in commands["items"] if c["action"] == "schedule.external.activate"]
    assert activation["state"] == "completed", activation
    assert activation["result"]["schedule_count"] == 2 and activation["result"]["sequence"] == 1


async def sync_now_publishes_again(s: Session) -> None:
    before = await periodic_schedules(s)
    sent = await s.api("POST", "/api/v1/schedules/resync")
    [command] = sent["commands"]
    done = await s.finished(command["id"])
    assert (done["state"], done["result"]) == ("completed", {"schedulers_drained": 1}), done
    after = await schedules_where(
        s, "the resynced snapshot", lambda f: f["every5"]["sequence"] > before["every5"]["sequence"]
    )
    assert after["every5"]["updated_at"] > before["every5"]["updated_at"]


async def schedule_action(s: Session, name: str, action: str) -> dict[str, Any]:
    """POST the action on a periodic task; its command once finished."""
    path = f"/api/v1/schedules/{PERIODIC}/__main__.{name}/{action}"
    sent = await s.api("POST", path)
    done = await s.finished(sent["id"])
    assert done["state"] == "completed", done
    return done


async def disable_takes_effect(s: Session) -> None:
    done = await schedule_action(s, "every5", "disable")
    assert done["action"] == "schedule.external.mutate"
    found = await schedules_where(s, "every5 disabled", lambda f: not f["every5"]["is_enabled"])
    assert found["every5"]["source"] == f"{PERIODIC}:override"  # the adapter's durable override
    assert found["nightly"]["is_enabled"] is True


async def a_restart_gets_a_newer_epoch(s: Session) -> None:
    """A new process of the agent (same home, so the same adapter buffer) is a
    new worker: the brain grants it the next epoch, which the adapter accepts,
    and the override it keeps is still there."""
    assert await stop_agent(s.proc) == 0, s.agent_log()
    ready = len([m for m in s.milestones() if "ready" in m])
    s.proc = start_engine_agent(
        "huey", s.brain.addresses.http_url, s.token, s.secret, "demo", s.home, "schedules"
    )
    await s.eventually(lambda: _count_ready(s), "the restarted agent", until=lambda n: n > ready)
    found = await schedules_where(
        s, "the new epoch's snapshot", lambda f: f["every5"]["epoch_number"] == 2
    )
    assert found["every5"]["is_enabled"] is False and found["every5"]["sequence"] == 1
    done = await schedule_action(s, "every5", "enable")
    assert done["parameters"]["epoch_number"] == 2
    await schedules_where(s, "every5 enabled again", lambda f: f["every5"]["is_enabled"])


async def _count_ready(s: Session) -> int:
    return len([m for m in s.milestones() if "ready" in m])


async def trigger_runs_the_task(s: Session) -> None:
    done = await schedule_action(s, "nightly", "trigger")
    assert done["action"] == "schedule.trigger_now"
    task_id = done["result"]["task_id"]

    async def ran() -> dict[str, Any] | None:
        status, task = await s.api_status("GET", f"/api/v1/tasks/huey/{task_id}")
        return task if status == 200 and task["state"] == "succeeded" else None

    task = await s.eventually(ran, f"the triggered task {task_id}")
    assert task["name"] == "nightly"


async def delete_removes_it(s: Session) -> None:
    await schedule_action(s, "nightly", "delete")
    await schedules_where(s, "nightly deleted", lambda f: set(f) == {"every5"})


SCHEDULE_CHECKS: list[Callable[[Session], Awaitable[None]]] = [
    activated_schedules_are_listed,
    sync_now_publishes_again,
    disable_takes_effect,
    a_restart_gets_a_newer_epoch,
    trigger_runs_the_task,
    delete_removes_it,
    nothing_rejected,
]


async def test_huey_periodic_schedules_against_brain(tmp_path: Path) -> None:
    """z4j-hueyperiodic beside z4j-huey (SCENARIO schedules): activation, the
    listed periodic tasks, Sync now, disable, a restart, trigger and delete."""
    config = make_config(tmp_path / "data")
    admin = await admin_token(config)
    token, secret, agent_id = await provision(config, agent="matrix-huey-periodic")
    with trio.fail_after(8 * DEADLINE):
        async with running_brain(config) as brain:
            home = tmp_path / "agent"
            url = brain.addresses.http_url
            proc = start_engine_agent("huey", url, token, secret, "demo", home, "schedules")
            s = Session(
                ENGINES["huey"], brain, config, admin, agent_id, secret, home, proc, token=token
            )
            try:
                await s.milestone("enqueued")
                for check in SCHEDULE_CHECKS:
                    await check(s)
            finally:
                code = await stop_agent(s.proc)
            assert code == 0, s.agent_log()
