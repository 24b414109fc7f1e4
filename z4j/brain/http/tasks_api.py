"""``/api/v1/tasks``: the task projection, and the actions an operator takes on a task.

An action is a command to the agent the projection names for the task, in
the shape the real z4j adapters take (``retry_task``, ``cancel_task``), with
what the engine needs filled in from the projection, so that the operator
types nothing: the task name always; the original inputs as both overrides
for engines that cannot retry by reference (every one but celery). An
action is offered only where a worker of that agent advertises it for the
task's engine (its hello's capabilities); taskiq retries through
``submit_task``, which its adapter does for ``retry_task`` when it has the
name and both inputs.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import attrs
import orjson

from ...store.base import Store, TaskFilter, TaskRecord
from ...tasks import TASK_STATES
from ..links import CommandDesk, CommandError
from ._request import (
    MAX_LIMIT,
    ApiError,
    Handler,
    Request,
    Response,
    check_text,
    epoch,
    limit_param,
    page,
    time_param,
    uuid_param,
)
from .narrowing import check_agent, narrowed, projects_of, sees
from .resources import is_time, iso, to_json

__all__ = ["RETRY_BY_REFERENCE", "TaskRoutes", "actions_for", "retry_parameters"]

# Engines whose adapter retries a task from the broker's own record of it;
# the others re-send it, and need its inputs (z4j_dramatiq/z4j_huey say so
# in their refusals). Celery's needs the result backend's extended results.
RETRY_BY_REFERENCE = frozenset({"celery"})
MAX_TEXT = 200
RUNTIME_SAMPLE = 10_000  # runtimes the names' percentiles are taken over
DEFAULT_BULK = 100
MAX_BULK = 1000  # celery's adapter takes up to 10,000; a page of the UI is far less


class TaskRoutes:
    """The task routes of `Api`; they share its store and command desk."""

    def __init__(self, store: Store, commands: CommandDesk) -> None:
        self._store = store
        self._commands = commands

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("GET", "/tasks", self.list_tasks),
            ("POST", "/tasks/retry", self.bulk_retry),
            ("GET", "/tasks/names", self.names),
            ("GET", "/tasks/{engine}/{task_id}", self.detail),
            ("POST", "/tasks/{engine}/{task_id}/retry", self.retry),
            ("POST", "/tasks/{engine}/{task_id}/cancel", self.cancel),
        ]

    async def _filter(self, request: Request, q: dict[str, str]) -> TaskFilter:
        """The filter of ``q``, kept to the caller's projects (narrowing.py)."""
        query = narrowed(request, _task_filter(q))
        if query.agent_id is not None and query.projects is not None:
            await check_agent(self._store, request, query.agent_id)
        return query

    async def list_tasks(self, request: Request) -> Response:
        query = await self._filter(request, request.query)
        tasks = await self._store.list_tasks(query)
        cursor = None
        if len(tasks) == query.limit:
            last = tasks[-1]
            cursor = _cursor_out(last.last_event_at, last.engine, last.task_id)
        body = page([to_json(t) for t in tasks], cursor)
        if query.before is None:  # the next pages' counts are the first's
            counts = await self._store.count_tasks(query)
            body["counts"] = {state: counts.by_state.get(state, 0) for state in TASK_STATES}
            body["counts_exact"] = counts.exact
        return 200, body

    async def names(self, request: Request) -> Response:
        """The task names seen per engine over a window (``since``, default
        the last day): tasks by state, failure rate, runtime percentiles (over
        the newest RUNTIME_SAMPLE runtimes of the window)."""
        q = request.query
        since = time_param(q["since"], "since") if "since" in q else time.time() - 86400
        projects = projects_of(request)
        known: dict[tuple[str, str | None], dict[str, Any]] = {}
        for engine, name, state, n in await self._store.task_outcomes(
            since=since, by="name", projects=projects
        ):
            entry = known.setdefault((engine, name), {"engine": engine, "name": name, "states": {}})
            entry["states"][state] = n
        runtimes: dict[tuple[str, str | None], list[float]] = {}
        for engine, name, ms in await self._store.recent_runtimes(
            since=since, limit=RUNTIME_SAMPLE, projects=projects
        ):
            runtimes.setdefault((engine, name), []).append(ms)
        items = []
        for key, entry in sorted(known.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
            states = entry["states"]
            finished = states.get("succeeded", 0) + states.get("failed", 0)
            entry["tasks"] = sum(states.values())
            entry["failure_rate"] = states.get("failed", 0) / finished if finished else None
            entry["runtime_ms"] = _percentiles(sorted(runtimes.get(key, [])))
            items.append(entry)
        return 200, {"items": items, "next_cursor": None, "since": iso(since)}

    async def detail(self, request: Request) -> Response:
        task = await self._one(request)
        item = to_json(task)
        # Times are ISO text on the wire, inside the timeline too.
        item["timeline"] = [
            {
                k: iso(v) if is_time(k) and isinstance(v, int | float) else v
                for k, v in attempt.items()
            }
            for attempt in item["timeline"] or []
        ]
        item["commands"] = [
            to_json(c)
            for c in await self._store.commands_for_task(task.project_id, task.engine, task.task_id)
        ]
        item["actions"] = await self._actions(task)
        return 200, item

    async def retry(self, request: Request) -> Response:
        task = await self._one(request)
        body = request.json_object() if request.body else {}
        if "retry" not in await self._actions(task):
            raise ApiError(
                409,
                "not_offered",
                f"no worker of agent {task.agent_id} advertises retry for {task.engine}",
            )
        try:
            parameters = retry_parameters(task, body.get("args"), body.get("kwargs"))
        except ValueError as exc:
            raise ApiError(409, "inputs_unknown", str(exc)) from None
        return 201, await self._command(task, "retry_task", parameters, request.actor)

    async def bulk_retry(self, request: Request) -> Response:
        """Retry every task a filter matches, up to ``max`` (at most
        MAX_BULK), in two steps: without ``confirm_count`` the brain answers
        409 confirm with how many it would retry; with it, it sends them.

        Per agent and engine: one ``bulk_retry`` where the workers advertise
        it (celery's adapter takes ``filter.task_ids`` and their names),
        else one ``retry_task`` per task. Tasks whose inputs are needed and
        unknown, or whose agent offers no retry, are skipped and listed."""
        body = request.json_object()
        where = body.get("filter", {})
        if not isinstance(where, dict) or not all(isinstance(v, str) for v in where.values()):
            raise ApiError(400, "bad_request", "filter: an object of the list's query parameters")
        most = body.get("max", DEFAULT_BULK)
        if not isinstance(most, int) or isinstance(most, bool) or not 1 <= most <= MAX_BULK:
            raise ApiError(400, "bad_request", f"max: an integer from 1 to {MAX_BULK}")
        query = await self._filter(request, {**where, "limit": str(min(most, MAX_LIMIT))})
        chosen: list[TaskRecord] = []
        while len(chosen) < most:
            page = await self._store.list_tasks(query)
            chosen += page[: most - len(chosen)]
            if len(page) < query.limit:
                break
            last = page[-1]
            query = attrs.evolve(query, before=(last.last_event_at, last.engine, last.task_id))
        if body.get("confirm_count") != len(chosen):
            raise ApiError(
                409,
                "confirm",
                f"this retries {len(chosen)} tasks (at most {most}): send confirm_count "
                f"{len(chosen)} to go ahead",
                detail={"count": len(chosen)},
            )
        groups: dict[tuple[uuid.UUID | None, str], list[TaskRecord]] = {}
        for task in chosen:
            groups.setdefault((task.agent_id, task.engine), []).append(task)
        created: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []
        for (agent_id, engine), tasks in groups.items():
            advertised = await self._advertised(agent_id, engine)
            if "bulk_retry" in advertised and engine in RETRY_BY_REFERENCE:
                names = {t.task_id: t.name for t in tasks if t.name is not None}
                record = await self._command(
                    tasks[0],
                    "bulk_retry",
                    {
                        "filter": {
                            "engine": engine,
                            "task_ids": [t.task_id for t in tasks],
                            "task_names": names,
                        },
                        "max": len(tasks),
                    },
                    request.actor,
                )
                created.append(record)
                continue
            for task in tasks:
                if "retry" not in actions_for(advertised):
                    skipped.append({"task_id": task.task_id, "reason": "no retry offered"})
                    continue
                if engine not in RETRY_BY_REFERENCE:  # a list leaves the inputs out
                    found = await self._store.get_tasks(engine, task.task_id, task.project_id)
                    if not found:
                        skipped.append({"task_id": task.task_id, "reason": "gone"})
                        continue
                    task = found[0]
                try:
                    parameters = retry_parameters(task)
                except ValueError as exc:
                    skipped.append({"task_id": task.task_id, "reason": str(exc)})
                    continue
                record = await self._command(task, "retry_task", parameters, request.actor)
                created.append(record)
        return 201, {"commands": created, "skipped": skipped}

    async def cancel(self, request: Request) -> Response:
        task = await self._one(request)
        if "cancel" not in await self._actions(task):
            raise ApiError(
                409,
                "not_offered",
                f"no worker of agent {task.agent_id} advertises cancel for {task.engine}",
            )
        return 201, await self._command(
            task, "cancel_task", {"task_id": task.task_id}, request.actor
        )

    # -- helpers -------------------------------------------------------------------------

    async def _one(self, request: Request) -> TaskRecord:
        engine, task_id = request.params["engine"], request.params["task_id"]
        check_text(engine)
        check_text(task_id)
        project = request.query.get("project_id")
        project_id = uuid_param(project, "project_id") if project is not None else None
        # Another project's task is not there for a narrowed caller, even to
        # make an id ambiguous.
        tasks = [
            t
            for t in await self._store.get_tasks(engine, task_id, project_id)
            if sees(request, t.project_id)
        ]
        if not tasks:
            raise ApiError(404, "not_found", f"no {engine} task {task_id}")
        if len(tasks) > 1:
            projects = ", ".join(str(t.project_id) for t in tasks)
            raise ApiError(
                409, "ambiguous", f"task {task_id} is in projects {projects}: give project_id"
            )
        return tasks[0]

    async def _actions(self, task: TaskRecord) -> list[str]:
        return actions_for(await self._advertised(task.agent_id, task.engine))

    async def _advertised(self, agent_id: uuid.UUID | None, engine: str) -> set[str]:
        """What the agent's workers advertise for ``engine`` (any of them may get a command)."""
        advertised: set[str] = set()
        if agent_id is not None:
            for worker in await self._store.list_workers(agent_id):
                advertised.update(worker.capabilities.get(engine, ()))
        return advertised

    async def _command(
        self, task: TaskRecord, action: str, parameters: dict[str, Any], issued_by: str
    ) -> dict[str, Any]:
        """Send ``action`` about ``task`` to its agent: the command as the API shows it."""
        assert task.agent_id is not None  # _actions offered nothing otherwise
        try:
            record = await self._commands.send(
                task.agent_id,
                action,
                target={"engine": task.engine, "task_id": task.task_id},
                parameters={"engine": task.engine, **parameters},
                issued_by=issued_by,
            )
        except CommandError as exc:
            raise ApiError(409, "command_refused", str(exc)) from None
        return to_json(record)


def actions_for(advertised: set[str]) -> list[str]:
    """The task actions a worker advertising ``advertised`` (for the task's
    engine) takes: retry (natively, or as a submit with both inputs), cancel."""
    actions = []
    if "retry_task" in advertised or "submit_task" in advertised:
        actions.append("retry")
    if "cancel_task" in advertised:
        actions.append("cancel")
    return actions


def retry_parameters(task: TaskRecord, args: Any = None, kwargs: Any = None) -> dict[str, Any]:
    """What ``retry_task`` needs for ``task``: its name, and the inputs to
    run it with — the operator's (``args``/``kwargs``, both or neither), or
    its own as the projection kept them for engines that need them.
    ValueError when they are needed and unknown (the engine did not send them)."""
    if (args is None) != (kwargs is None):
        raise ValueError("give both args and kwargs, or neither")
    if args is not None and (not isinstance(args, list) or not isinstance(kwargs, dict)):
        raise ValueError("args must be a list and kwargs an object")
    parameters: dict[str, Any] = {"task_id": task.task_id}
    if task.name is not None:
        parameters["task_name"] = task.name
    if args is None and task.engine not in RETRY_BY_REFERENCE:
        if task.args is None and task.kwargs is None:
            raise ValueError(
                f"{task.engine} re-sends a task with its inputs, and this one's were not "
                "reported by the engine: retry with inputs (args and kwargs)"
            )
        args = task.args if isinstance(task.args, list) else []
        kwargs = task.kwargs if isinstance(task.kwargs, dict) else {}
    if args is not None:
        parameters["override_args"] = args
        parameters["override_kwargs"] = kwargs
    return parameters


def _percentiles(ordered: list[float]) -> dict[str, float] | None:
    """p50, p95 and p99 of sorted values (nearest rank), None for none."""
    if not ordered:
        return None
    last = len(ordered) - 1
    return {
        f"p{round(p * 100)}": ordered[min(last, int(p * len(ordered)))] for p in (0.5, 0.95, 0.99)
    }


def _task_filter(q: dict[str, str]) -> TaskFilter:
    for name in ("engine", "queue", "name", "q"):
        if name in q:
            check_text(q[name])
            if len(q[name]) > MAX_TEXT:
                raise ApiError(400, "bad_request", f"{name}: at most {MAX_TEXT} characters")
    state = q.get("state")
    if state is not None and state not in TASK_STATES:
        raise ApiError(400, "bad_request", f"state must be one of {', '.join(TASK_STATES)}")
    return TaskFilter(
        state=state,
        engine=q.get("engine"),
        queue=q.get("queue"),
        name=q.get("name"),
        agent_id=uuid_param(q["agent_id"], "agent_id") if "agent_id" in q else None,
        project_id=uuid_param(q["project_id"], "project_id") if "project_id" in q else None,
        since=time_param(q["since"], "since") if "since" in q else None,
        until=time_param(q["until"], "until") if "until" in q else None,
        text=q.get("q") or None,
        before=_cursor_in(q["cursor"]) if "cursor" in q else None,
        limit=limit_param(q),
    )


def _cursor_out(at: float, engine: str, task_id: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([at, engine, task_id])).decode().rstrip("=")


def _cursor_in(raw: str) -> tuple[float, str, str]:
    try:
        at, engine, task_id = orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        if isinstance(at, int | float) and isinstance(engine, str) and isinstance(task_id, str):
            check_text(engine)
            check_text(task_id)
            return epoch(float(at), "cursor"), engine, task_id
    except (ValueError, TypeError, orjson.JSONDecodeError):
        pass
    raise ApiError(400, "bad_request", "cursor: as given by the last page")
