"""``/api/v1/engine-workers``: the engines' own workers, and celery's worker controls.

An engine worker is what the engine calls a worker (celery's hostname
``name@host``, dramatiq's ``host@pid``), as its tasks name it in the task
projection (``tasks.worker``; huey and taskiq send none). It is listed per
agent that reported it, beside that agent's own WebSocket workers, since
a command about it goes to that agent.

The controls are the commands the z4j adapters take for one worker
(``restart_worker``, ``pool_grow``, ``pool_shrink``, ``add_consumer``,
``cancel_consumer``, ``rate_limit``; the worker named as
``parameters.worker_name`` and ``target.id``), offered only where the
agent's workers advertise them for the engine: celery alone, in 1.13.
Celery's controls are broadcasts with no reply: its adapter reports them
completed once sent, whether the worker applied them, ignored them (a solo
pool has no pool to restart) or was not there. Every answer says so
(`CONTROL_WARNING`). Dramatiq and the others take ``restart_worker`` as a
restart of the agent's own process, which is not this: it is never offered
where not advertised.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from ...store.base import EngineWorker, Store, WorkerInfo
from ..links import CommandDesk, CommandError
from ._request import ApiError, Handler, Request, Response, check_text, time_param, uuid_param
from .narrowing import projects_of
from .resources import WORKER_ACTIONS, iso, to_json

__all__ = ["CONTROL_WARNING", "EngineWorkerRoutes", "engine_worker_json"]

WINDOW_SECONDS = 86400.0  # the list's default window: a day of tasks
# A control names a worker seen this recently (a worker not heard of in a
# week is gone; it also bounds the scan, which no index on workers serves).
CONTROL_LOOKBACK_SECONDS = 7 * 86400.0
MAX_DELTA = 100
MAX_TEXT = 200
# Celery's rate grammar (z4j_celery/actions/rate_limit.py): "0" clears.
RATE = re.compile(r"(?:0|[1-9]\d{0,8}(?:/[smh])?)")
CONTROL_WARNING = (
    "Celery's worker controls are fire-and-forget broadcasts: the agent reports them "
    "completed once sent, even when the worker refused or ignored them (a solo pool "
    "cannot restart or grow, a worker that is gone hears nothing). Check the worker itself."
)


class EngineWorkerRoutes:
    def __init__(
        self, store: Store, commands: CommandDesk, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._commands = commands
        self._clock = clock

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("GET", "/engine-workers", self.list_workers),
            ("POST", "/engine-workers/{engine}/{worker}/{action}", self.control),
        ]

    async def list_workers(self, request: Request) -> Response:
        q = request.query
        since = time_param(q["since"], "since") if "since" in q else self._clock() - WINDOW_SECONDS
        found = await self._store.engine_workers(since=since, projects=projects_of(request))
        by_agent: dict[uuid.UUID, list[WorkerInfo]] = {}
        for worker in await self._store.list_workers():
            by_agent.setdefault(worker.agent_id, []).append(worker)
        items = []
        for engine_worker in found:
            workers = by_agent.get(engine_worker.agent_id, []) if engine_worker.agent_id else []
            items.append(engine_worker_json(engine_worker, workers))
        return 200, {
            "items": items,
            "next_cursor": None,
            "since": iso(since),
            "warning": CONTROL_WARNING,
        }

    async def control(self, request: Request) -> Response:
        engine, worker, action = (request.params[k] for k in ("engine", "worker", "action"))
        check_text(engine)
        check_text(worker)
        if action not in WORKER_ACTIONS:
            raise ApiError(
                404,
                "not_found",
                f"no worker control {action!r}: one of {', '.join(WORKER_ACTIONS)}",
            )
        body = request.json_object() if request.body else {}
        chosen = await self._reporter(engine, worker, body.get("agent_id"), projects_of(request))
        assert chosen.agent_id is not None  # _reporter picks only agents
        advertised = {
            a
            for w in await self._store.list_workers(chosen.agent_id)
            for a in w.capabilities.get(engine, ())
        }
        if action not in advertised:
            raise ApiError(
                409,
                "not_offered",
                f"no worker of agent {chosen.agent_id} advertises {action} for {engine}",
            )
        parameters = {"engine": engine, "worker_name": worker, **_control_parameters(action, body)}
        try:
            record = await self._commands.send(
                chosen.agent_id,
                action,
                target={"engine": engine, "id": worker},
                parameters=parameters,
                issued_by=request.actor,
            )
        except CommandError as exc:
            raise ApiError(409, "command_refused", str(exc)) from None
        return 201, {"command": to_json(record), "warning": CONTROL_WARNING}

    async def _reporter(
        self, engine: str, worker: str, agent: Any, projects: frozenset[uuid.UUID] | None
    ) -> EngineWorker:
        """The (engine, worker) as the agent that reported it (``agent``: its
        id, needed when several did; celery's event monitor sees every
        worker on its broker, so several agents may name one); only the
        reports of ``projects``' tasks count, unless None."""
        if agent is not None and not isinstance(agent, str):
            raise ApiError(400, "bad_request", "agent_id: the agent that reported the worker")
        seen = await self._store.engine_workers(
            since=self._clock() - CONTROL_LOOKBACK_SECONDS,
            engine=engine,
            worker=worker,
            projects=projects,
        )
        seen = [w for w in seen if w.agent_id is not None]
        if agent is not None:
            agent_id = uuid_param(agent, "agent_id")
            seen = [w for w in seen if w.agent_id == agent_id]
        if not seen:
            raise ApiError(
                404,
                "not_found",
                f"no {engine} worker {worker!r} in the tasks of the last week"
                + ("" if agent is None else f" reported by agent {agent}"),
            )
        if len(seen) > 1:
            agents = ", ".join(str(w.agent_id) for w in seen)
            raise ApiError(409, "ambiguous", f"agents {agents} reported {worker!r}: give agent_id")
        return seen[0]


def engine_worker_json(engine_worker: EngineWorker, workers: list[WorkerInfo]) -> dict[str, Any]:
    """An engine worker as the API shows it: with its agent's workers, and the
    controls they advertise for its engine."""
    item = to_json(engine_worker)
    item["agent_workers"] = [
        {
            "worker_id": w.worker_id,
            "connected": w.disconnected_at is None,
            "last_seen": iso(w.last_seen),
        }
        for w in workers
    ]
    advertised = {a for w in workers for a in w.capabilities.get(engine_worker.engine, ())}
    item["actions"] = [a for a in WORKER_ACTIONS if a in advertised]
    return item


def _control_parameters(action: str, body: dict[str, Any]) -> dict[str, Any]:
    """What ``action`` takes beside the worker, from the body, as the adapters read it."""
    if action in ("pool_grow", "pool_shrink"):
        delta = body.get("delta", 1)
        if not isinstance(delta, int) or isinstance(delta, bool) or not 1 <= delta <= MAX_DELTA:
            raise ApiError(400, "bad_request", f"delta: an integer from 1 to {MAX_DELTA}")
        return {"delta": delta}
    if action in ("add_consumer", "cancel_consumer"):
        return {"queue": _text(body, "queue", "the queue to consume from, or stop")}
    if action == "rate_limit":
        task_name = _text(body, "task_name", "the task whose rate to set")
        rate = body.get("rate")
        if not isinstance(rate, str) or not RATE.fullmatch(rate):
            raise ApiError(
                400, "bad_request", "rate: '0' to clear, or '<n>', '<n>/s', '<n>/m' or '<n>/h'"
            )
        return {"task_name": task_name, "rate": rate}
    return {}  # restart_worker


def _text(body: dict[str, Any], name: str, what: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT:
        raise ApiError(400, "bad_request", f"{name}: {what} (1 to {MAX_TEXT} characters)")
    return value
