"""``/api/v1/queues``: what the engines' queues hold and how their tasks fare, and purge.

Depths come from each worker's last heartbeat (``adapter_health``, keys
``<engine>.queue_depths`` — a JSON text — ``<engine>.broker_connected`` and
``<engine>.broker_type``, as the z4j adapters send them; huey and taskiq
send none); outcomes come from the task projection.

Dead letters are read on demand: the brain sends ``dlq.list`` to the agent
(where its workers advertise ``list_dead_letters`` for the engine: dramatiq
with a redis, rabbitmq or stub broker, in 1.13) and waits a bounded time
(`DEAD_LETTER_WAIT_SECONDS`) for its answer, which it returns as a page; an
agent that does not answer in time gets 504 with the command's id, whose
result ``GET /commands/{id}`` shows once it lands. A dead letter is put
back with ``requeue_dead_letter`` where advertised (no 1.13 adapter does).

Purge is two steps, because it destroys work: the first call answers
``409 confirm`` with the depth the brain last saw; the second names that
depth (``confirm_depth``), and the brain sends ``purge_queue`` with the
confirm token the adapters verify: HMAC-SHA256 under the project's key of
``purge|<queue>|<depth>``. The agent measures the depth again when it
purges and refuses a mismatch, so a queue that grew in between is not
emptied of work nobody confirmed.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

from ...store.base import CommandRecord, Store, WorkerInfo
from ..links import CommandDesk, CommandError
from ._request import ApiError, Handler, Request, Response, check_text, limit_param, uuid_param
from .narrowing import check_agent, projects_of
from .resources import iso, to_json

__all__ = ["DEAD_LETTER_WAIT_SECONDS", "QueueRoutes", "purge_token", "queue_health"]

WINDOW_SECONDS = 3600.0  # outcomes are counted over the last hour
# How long a dead-letter listing waits for the agent's answer (read at each
# call). The command itself lives on (its own timeout) and keeps the answer.
DEAD_LETTER_WAIT_SECONDS = 10.0
DEAD_LETTER_LIMIT, MAX_DEAD_LETTER_LIMIT = 50, 200  # z4j-core's dlq.list takes up to 200
MAX_TEXT = 200


class QueueRoutes:
    def __init__(
        self,
        store: Store,
        commands: CommandDesk,
        project_key: Callable[[uuid.UUID, int], bytes] | None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``project_key``: the project's signing key of a generation, which
        purge tokens are keyed with (None: this API cannot purge)."""
        self._store = store
        self._commands = commands
        self._project_key = project_key
        self._clock = clock

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("GET", "/queues", self.list_queues),
            ("POST", "/queues/{engine}/{queue}/purge", self.purge),
            ("GET", "/queues/{engine}/{queue}/dead-letters", self.dead_letters),
            (
                "POST",
                "/queues/{engine}/{queue}/dead-letters/{task_id}/requeue",
                self.requeue_dead_letter,
            ),
        ]

    async def list_queues(self, request: Request) -> Response:
        now = self._clock()
        queues: dict[tuple[str, str], dict[str, Any]] = {}

        def entry(engine: str, queue: str) -> dict[str, Any]:
            return queues.setdefault(
                (engine, queue),
                {"engine": engine, "queue": queue, "depths": [], "outcomes": {}},
            )

        projects = projects_of(request)
        of_agent = (
            {}
            if projects is None
            else {a.id: a.project_id for a in await self._store.list_agents()}
        )
        for worker in await self._store.list_workers():
            if worker.disconnected_at is not None:
                continue
            if projects is not None and of_agent.get(worker.agent_id) not in projects:
                continue  # another project's broker
            for engine, health in queue_health(worker).items():
                for queue, depth in health["depths"].items():
                    entry(engine, queue)["depths"].append(
                        {
                            "agent_id": str(worker.agent_id),
                            "worker_id": worker.worker_id,
                            "depth": depth,
                            "seen_at": iso(worker.last_seen),
                            "broker_connected": health["broker_connected"],
                            "broker_type": health["broker_type"],
                        }
                    )
        for engine, queue, state, n in await self._store.task_outcomes(
            since=now - WINDOW_SECONDS, projects=projects
        ):
            entry(engine, queue or "")["outcomes"][state] = n
        items = []
        for item in queues.values():
            outcomes = item["outcomes"]
            finished = outcomes.get("succeeded", 0) + outcomes.get("failed", 0)
            item["finished_per_minute"] = round(finished / (WINDOW_SECONDS / 60), 3)
            item["failure_rate"] = None if not finished else outcomes.get("failed", 0) / finished
            items.append(item)
        items.sort(key=lambda i: (i["engine"], i["queue"]))
        return 200, {"items": items, "next_cursor": None, "window_seconds": WINDOW_SECONDS}

    async def purge(self, request: Request) -> Response:
        engine, queue = request.params["engine"], request.params["queue"]
        check_text(engine)
        check_text(queue)
        body = request.json_object()
        if not isinstance(body.get("agent_id"), str):
            raise ApiError(400, "bad_request", "agent_id: the agent whose broker holds the queue")
        agent_id = uuid_param(body["agent_id"], "agent_id")
        agent = await check_agent(self._store, request, agent_id)
        if agent is None:
            raise ApiError(404, "not_found", f"no agent {agent_id}")
        workers = await self._store.list_workers(agent_id)
        if not any("purge_queue" in w.capabilities.get(engine, ()) for w in workers):
            raise ApiError(
                409, "not_offered", f"no worker of agent {agent_id} advertises purge for {engine}"
            )
        if self._project_key is None:
            raise ApiError(409, "not_offered", "this API has no project keys to sign purges with")
        confirmed = body.get("confirm_depth")
        if confirmed is None:
            seen = _last_depth(workers, engine, queue)
            raise ApiError(
                409,
                "confirm",
                f"purge {engine} queue {queue!r}: last seen depth "
                + ("unknown (the adapter reports none)" if seen is None else str(seen))
                + "; send confirm_depth with the depth you confirm",
                detail={"depth": seen},
            )
        if not isinstance(confirmed, int) or isinstance(confirmed, bool) or confirmed < 0:
            raise ApiError(400, "bad_request", "confirm_depth: a whole number of messages")
        # Signed with the project's current secret (its generation moves on
        # at each rotation: agents are given the new one within its grace).
        project = await self._store.find_project(str(agent.project_id))
        generation = 0 if project is None else project.secret_generation
        token = purge_token(self._project_key(agent.project_id, generation), queue, confirmed)
        try:
            record = await self._commands.send(
                agent_id,
                "purge_queue",
                target={"engine": engine, "queue": queue},
                parameters={"engine": engine, "queue": queue, "confirm_token": token},
                issued_by=request.actor,
            )
        except CommandError as exc:
            raise ApiError(409, "command_refused", str(exc)) from None
        return 201, to_json(record)

    async def dead_letters(self, request: Request) -> Response:
        """One page of the queue's dead letters, as the agent lists them now."""
        engine, queue = request.params["engine"], request.params["queue"]
        check_text(engine)
        check_text(queue)
        q = request.query
        if "agent_id" not in q:
            raise ApiError(400, "bad_request", "agent_id: the agent whose broker holds the queue")
        agent_id = uuid_param(q["agent_id"], "agent_id")
        limit = limit_param(q, most=MAX_DEAD_LETTER_LIMIT, default=DEAD_LETTER_LIMIT)
        parameters: dict[str, Any] = {"engine": engine, "queue": queue, "limit": limit}
        if "cursor" in q:
            cursor = q["cursor"]
            check_text(cursor)
            if not 0 < len(cursor) <= MAX_TEXT:
                raise ApiError(400, "bad_request", "cursor: as given by the last page")
            parameters["cursor"] = cursor
        advertised = await self._advertised(request, agent_id, engine)
        if "list_dead_letters" not in advertised:
            raise ApiError(
                409,
                "not_offered",
                f"no worker of agent {agent_id} advertises dead letters for {engine}",
            )
        record = await self._send(
            agent_id, "dlq.list", {"engine": engine, "queue": queue}, parameters, request.actor
        )
        done = await self._commands.wait(record.id, within=DEAD_LETTER_WAIT_SECONDS)
        detail = {"command_id": str(record.id)}
        if done is None or done.state in ("pending", "dispatched"):
            raise ApiError(
                504,
                "no_answer",
                f"agent {agent_id} did not list the dead letters within "
                f"{DEAD_LETTER_WAIT_SECONDS:g} s: GET /commands/{record.id} has them once it does",
                detail=detail,
            )
        if done.state != "completed":
            raise ApiError(
                502,
                "agent_failed",
                f"the agent's dlq.list {done.state}: {done.error or 'no reason given'}",
                detail=detail,
            )
        result = done.result or {}
        entries = result.get("entries")
        total, following = result.get("total"), result.get("next_cursor")
        return 200, {
            "items": [
                e for e in map(_dead_letter, entries if isinstance(entries, list) else []) if e
            ],
            "next_cursor": following if isinstance(following, str) and following else None,
            "total": total if isinstance(total, int) and not isinstance(total, bool) else None,
            "agent_id": str(agent_id),
            "command_id": str(record.id),
            "actions": ["requeue"] if "requeue_dead_letter" in advertised else [],
        }

    async def requeue_dead_letter(self, request: Request) -> Response:
        """Put one dead letter back on its queue: ``requeue_dead_letter``."""
        engine, queue, task_id = (request.params[k] for k in ("engine", "queue", "task_id"))
        for text in (engine, queue, task_id):
            check_text(text)
        body = request.json_object()
        if not isinstance(body.get("agent_id"), str):
            raise ApiError(400, "bad_request", "agent_id: the agent whose broker holds the queue")
        agent_id = uuid_param(body["agent_id"], "agent_id")
        task_name = body.get("task_name")
        if task_name is not None and (not isinstance(task_name, str) or len(task_name) > 500):
            raise ApiError(400, "bad_request", "task_name: the dead letter's task name, if known")
        if "requeue_dead_letter" not in await self._advertised(request, agent_id, engine):
            raise ApiError(
                409,
                "not_offered",
                f"no worker of agent {agent_id} advertises requeue_dead_letter for {engine}",
            )
        parameters = {"engine": engine, "queue": queue, "task_id": task_id}
        if task_name:
            parameters["task_name"] = task_name
        record = await self._send(
            agent_id,
            "requeue_dead_letter",
            {"engine": engine, "queue": queue, "task_id": task_id},
            parameters,
            request.actor,
        )
        return 201, to_json(record)

    async def _advertised(self, request: Request, agent_id: uuid.UUID, engine: str) -> set[str]:
        """What the agent's workers advertise for ``engine``; 404 for no such
        agent (or another project's)."""
        if await check_agent(self._store, request, agent_id) is None:
            raise ApiError(404, "not_found", f"no agent {agent_id}")
        return {
            a
            for w in await self._store.list_workers(agent_id)
            for a in w.capabilities.get(engine, ())
        }

    async def _send(
        self,
        agent_id: uuid.UUID,
        action: str,
        target: dict[str, Any],
        parameters: dict[str, Any],
        issued_by: str,
    ) -> CommandRecord:
        try:
            return await self._commands.send(
                agent_id, action, target=target, parameters=parameters, issued_by=issued_by
            )
        except CommandError as exc:
            raise ApiError(409, "command_refused", str(exc)) from None


def purge_token(project_key: bytes, queue: str, depth: int) -> str:
    """The confirm token z4j adapters check before a purge (z4j-core's purge_token)."""
    return hmac.new(project_key, f"purge|{queue}|{depth}".encode(), hashlib.sha256).hexdigest()


def queue_health(worker: WorkerInfo) -> dict[str, dict[str, Any]]:
    """Per engine, what a worker's last heartbeat said of its broker and queues."""
    health = worker.health or {}
    found: dict[str, dict[str, Any]] = {}
    for key, value in health.items():
        engine, _, name = str(key).partition(".")
        if name not in ("queue_depths", "broker_connected", "broker_type"):
            continue
        entry = found.setdefault(
            engine, {"depths": {}, "broker_connected": None, "broker_type": None}
        )
        if name == "queue_depths":
            entry["depths"] = _depths(value)
        elif name == "broker_connected":
            entry["broker_connected"] = {"True": True, "False": False}.get(str(value))
        else:
            entry["broker_type"] = str(value)
    return found


def _depths(value: Any) -> dict[str, int]:
    try:
        depths = orjson.loads(value) if isinstance(value, str) else value
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(depths, dict):
        return {}
    return {
        str(q): int(d)
        for q, d in depths.items()
        if isinstance(d, int | float) and not isinstance(d, bool) and d >= 0
    }


def _last_depth(workers: list[WorkerInfo], engine: str, queue: str) -> int | None:
    seen = [
        (w.last_seen, health["depths"][queue])
        for w in workers
        if (health := queue_health(w).get(engine)) is not None and queue in health["depths"]
    ]
    return max(seen)[1] if seen else None


def _dead_letter(entry: Any) -> dict[str, Any] | None:
    """One entry of an agent's ``dlq.list`` page in the API's shape (z4j-core's
    DeadLetterEntry), None when it is not one."""
    if not isinstance(entry, dict) or not isinstance(entry.get("task_id"), str):
        return None

    def text(name: str) -> str:
        value = entry.get(name)
        return value if isinstance(value, str) else ""

    attempts = entry.get("attempts")
    return {
        "task_id": entry["task_id"],
        "task_name": text("task_name"),
        "queue": text("queue"),
        "failed_at": _iso_text(entry.get("failed_at")),
        "error_excerpt": text("error_excerpt"),
        "attempts": attempts
        if isinstance(attempts, int) and not isinstance(attempts, bool)
        else None,
    }


def _iso_text(value: Any) -> str | None:
    """An agent's ISO-8601 time as the API writes times; None if it is not one."""
    if not isinstance(value, str) or not value:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return iso((when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp())
