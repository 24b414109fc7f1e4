"""``/api/v1/schedules``: what the scheduler adapters publish, and what an operator does with it.

Rows come from the drain (store/schedules.py), as the scheduler's holder
of the stream last published them (brain/schedule_streams.py grants it).
An action is a command to that worker, in the shape z4j-bare 1.13 takes,
offered only where its hello advertises what it needs for that scheduler:

- **enable, disable, delete**: with ``external_schedule_mutation_v1``,
  ``schedule.external.mutate`` (``update`` of ``is_enabled``, or
  ``delete``) under the stream's current epoch, with the row as the brain
  has it as ``expected``: the adapter changes the schedule only if the
  source still holds that, and publishes a new snapshot at once. Without
  it, where the scheduler advertises ``enable``, ``disable`` or ``delete``:
  ``schedule.enable`` / ``.disable`` / ``.delete``, then ``schedule.resync``
  to the same worker (it handles commands in order), since these publish
  nothing themselves. (``schedule.external.control``, the set-to-state
  operation, is not used: it fails, and holds the stream's sequence until
  an operator recovers it, when the adapter changes anything besides
  ``is_enabled``, as z4j-hueyperiodic does with ``source``.)
- **trigger**: ``schedule.trigger_now`` where advertised, else
  ``schedule.fire`` (the task, its inputs and queue, submitted by the
  engine adapter) to a worker of the same agent whose engine takes
  ``submit_task``.
- **resync** (the dashboard's *Sync now*): ``schedule.resync`` to every
  connected worker with a scheduler.
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

import orjson

from ...schedules import MUTATION_CAPABILITY, projection, source_scope
from ...store.base import ScheduleFilter, ScheduleRecord, ScheduleStream, Store, WorkerInfo
from ..links import CommandDesk, CommandError
from ._request import (
    ApiError,
    Handler,
    Request,
    Response,
    check_text,
    limit_param,
    page,
    uuid_param,
)
from .narrowing import narrowed, projects_of, sees
from .resources import SCHEDULE_ACTIONS, to_json

__all__ = ["ScheduleRoutes", "schedule_actions"]

MAX_TEXT = 200


class ScheduleRoutes:
    """The schedule routes of `Api`; they share its store and command desk."""

    def __init__(self, store: Store, commands: CommandDesk) -> None:
        self._store = store
        self._commands = commands

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("GET", "/schedules", self.list_schedules),
            ("POST", "/schedules/resync", self.resync),
            ("GET", "/schedules/{scheduler}/{source_key}", self.detail),
            *[
                ("POST", f"/schedules/{{scheduler}}/{{source_key}}/{action}", self._action(action))
                for action in SCHEDULE_ACTIONS
            ],
        ]

    async def list_schedules(self, request: Request) -> Response:
        query = await self._filter(request)
        schedules = await self._store.list_schedules(query)
        offered = await self._offered()
        cursor = None
        if len(schedules) == query.limit:
            last = schedules[-1]
            cursor = _cursor_out(last.scheduler, last.source_key, last.project_id)
        items = [_json(s, offered.actions(s)) for s in schedules]
        return 200, page(items, cursor)

    async def detail(self, request: Request) -> Response:
        schedule = await self._one(request)
        offered = await self._offered()
        return 200, _json(schedule, offered.actions(schedule))

    async def resync(self, request: Request) -> Response:
        """``schedule.resync`` to every connected worker with a scheduler."""
        created = []
        projects = projects_of(request)
        of_agent = (
            {}
            if projects is None
            else {a.id: a.project_id for a in await self._store.list_agents()}
        )
        for worker in await self._store.list_workers():
            if projects is not None and of_agent.get(worker.agent_id) not in projects:
                continue  # another project's scheduler
            if worker.disconnected_at is None and worker.schedulers:
                created.append(
                    await self._send(
                        worker.agent_id, "schedule.resync", worker, {}, {}, request.actor
                    )
                )
        if not created:
            raise ApiError(409, "not_offered", "no connected worker has a scheduler")
        return 201, {"commands": created}

    def _action(self, action: str) -> Handler:
        async def act(request: Request) -> Response:
            schedule = await self._one(request)
            offered = await self._offered()
            if action not in offered.actions(schedule):
                raise ApiError(
                    409,
                    "not_offered",
                    f"no connected worker offers {action} for {schedule.scheduler} schedules",
                )
            return 201, await self._act(schedule, action, offered, request.actor)

        return act

    # -- the commands ------------------------------------------------------------------

    async def _act(
        self, schedule: ScheduleRecord, action: str, offered: _Offered, actor: str
    ) -> Any:
        scheduler = schedule.scheduler
        schedule_id = schedule.external_id or schedule.source_key
        holder = offered.holder(schedule)
        if action == "trigger" and (holder is None or not _takes(holder, scheduler, "trigger_now")):
            worker = offered.submitter(schedule)
            assert worker is not None  # offered
            return await self._send(
                worker.agent_id,
                "schedule.fire",
                worker,
                {"engine": schedule.engine},
                {
                    "task_name": schedule.task_name,
                    "engine": schedule.engine,
                    "queue": schedule.queue,
                    "args": schedule.args,
                    "kwargs": schedule.kwargs,
                    "fire_id": str(uuid.uuid4()),
                    "schedule": schedule.source_key,
                },
                actor,
            )
        assert holder is not None  # offered
        stream = offered.stream(schedule)
        assert stream is not None
        target = {"scheduler": scheduler}
        if action == "trigger":
            return await self._send(
                holder.agent_id,
                "schedule.trigger_now",
                holder,
                {**target, "schedule_id": schedule_id},
                {"schedule_id": schedule_id},
                actor,
            )
        if _takes(holder, scheduler, MUTATION_CAPABILITY):
            return await self._send(
                holder.agent_id,
                "schedule.external.mutate",
                holder,
                target,
                _mutation(stream, schedule, action),
                actor,
            )
        record = await self._send(
            holder.agent_id,
            f"schedule.{action}",
            holder,
            {**target, "schedule_id": schedule_id},
            {"schedule_id": schedule_id},
            actor,
        )
        # These publish nothing of their own: a snapshot right after shows the change.
        await self._send(holder.agent_id, "schedule.resync", holder, {}, {}, actor)
        return record

    async def _send(
        self,
        agent_id: uuid.UUID,
        action: str,
        worker: WorkerInfo,
        target: dict[str, Any],
        parameters: dict[str, Any],
        issued_by: str,
    ) -> dict[str, Any]:
        try:
            record = await self._commands.send(
                agent_id,
                action,
                target={**target, "worker_id": worker.worker_id},
                parameters=parameters,
                issued_by=issued_by,
            )
        except CommandError as exc:
            raise ApiError(409, "command_refused", str(exc)) from None
        return to_json(record)

    # -- helpers -------------------------------------------------------------------------

    async def _one(self, request: Request) -> ScheduleRecord:
        scheduler, source_key = request.params["scheduler"], request.params["source_key"]
        check_text(scheduler)
        check_text(source_key)
        project = request.query.get("project_id")
        project_id = uuid_param(project, "project_id") if project is not None else None
        # Another project's schedule is not there for a narrowed caller, even
        # to make a key ambiguous.
        found = [
            s
            for s in await self._store.get_schedules(scheduler, source_key, project_id)
            if sees(request, s.project_id)
        ]
        if not found:
            raise ApiError(404, "not_found", f"no {scheduler} schedule {source_key}")
        if len(found) > 1:
            projects = ", ".join(str(s.project_id) for s in found)
            raise ApiError(
                409,
                "ambiguous",
                f"schedule {source_key} is in projects {projects}: give project_id",
            )
        return found[0]

    async def _filter(self, request: Request) -> ScheduleFilter:
        """The query's filter, kept to the caller's projects (narrowing.py)."""
        q = request.query
        for name in ("scheduler", "engine", "project"):
            if name in q:
                check_text(q[name])
                if len(q[name]) > MAX_TEXT:
                    raise ApiError(400, "bad_request", f"{name}: at most {MAX_TEXT} characters")
        enabled = q.get("enabled")
        if enabled not in (None, "true", "false"):
            raise ApiError(400, "bad_request", "enabled: true or false")
        project_id = None
        if "project" in q:
            found = await self._store.find_project(q["project"])
            if found is None:
                raise ApiError(404, "not_found", f"no project {q['project']!r}")
            project_id = found.id
        query = ScheduleFilter(
            scheduler=q.get("scheduler"),
            engine=q.get("engine"),
            project_id=project_id,
            enabled=None if enabled is None else enabled == "true",
            after=_cursor_in(q["cursor"]) if "cursor" in q else None,
            limit=limit_param(q),
        )
        return narrowed(request, query)

    async def _offered(self) -> _Offered:
        return _Offered(
            {(s.project_id, s.scheduler): s for s in await self._store.schedule_streams()},
            [w for w in await self._store.list_workers() if w.disconnected_at is None],
        )


class _Offered:
    """Who can act on schedules now: the streams' holders and the live workers."""

    def __init__(
        self, streams: dict[tuple[uuid.UUID, str], ScheduleStream], live: list[WorkerInfo]
    ) -> None:
        self._streams = streams
        self._live = {(w.agent_id, w.worker_id): w for w in live}

    def stream(self, schedule: ScheduleRecord) -> ScheduleStream | None:
        return self._streams.get((schedule.project_id, schedule.scheduler))

    def holder(self, schedule: ScheduleRecord) -> WorkerInfo | None:
        """The connected worker holding the schedule's stream (its scheduler's publisher)."""
        stream = self.stream(schedule)
        return None if stream is None else self._live.get((stream.agent_id, stream.worker_id))

    def submitter(self, schedule: ScheduleRecord) -> WorkerInfo | None:
        """A connected worker of the schedule's agent whose engine submits tasks."""
        workers = sorted(self._live.values(), key=lambda w: w.worker_id)
        return next(
            (
                w
                for w in workers
                if w.agent_id == schedule.agent_id and _takes(w, schedule.engine, "submit_task")
            ),
            None,
        )

    def actions(self, schedule: ScheduleRecord) -> list[str]:
        holder = self.holder(schedule)
        advertised = (
            set() if holder is None else set(holder.capabilities.get(schedule.scheduler, ()))
        )
        return schedule_actions(advertised, can_submit=self.submitter(schedule) is not None)


def schedule_actions(advertised: set[str], *, can_submit: bool = False) -> list[str]:
    """The actions on a schedule whose holder advertises ``advertised`` for its
    scheduler (``can_submit``: a worker of its agent submits its engine's tasks)."""
    mutates = MUTATION_CAPABILITY in advertised
    offered = []
    for action in ("enable", "disable"):
        if mutates or action in advertised:
            offered.append(action)
    if "trigger_now" in advertised or can_submit:
        offered.append("trigger")
    if mutates or "delete" in advertised:
        offered.append("delete")
    return offered


def _takes(worker: WorkerInfo, name: str, capability: str) -> bool:
    return capability in worker.capabilities.get(name, ())


def _mutation(stream: ScheduleStream, schedule: ScheduleRecord, action: str) -> dict[str, Any]:
    """``schedule.external.mutate``'s parameters: fenced by the stream's epoch,
    compared against the row the brain holds."""
    return {
        "operation_id": str(uuid.uuid4()),
        "scheduler": schedule.scheduler,
        "operation": "delete" if action == "delete" else "update",
        "schedule_id": schedule.external_id or schedule.source_key,
        "expected": projection(schedule),
        "definition": {} if action == "delete" else {"is_enabled": action == "enable"},
        "stream_id": stream.stream_id,
        "epoch_uuid": stream.epoch_uuid,
        "epoch_number": stream.epoch_number,
        "adapter_instance_id": stream.adapter_instance_id,
        "source_scope": source_scope(schedule.scheduler),
    }


def _json(schedule: ScheduleRecord, actions: list[str]) -> dict[str, Any]:
    item = to_json(schedule)
    item["actions"] = actions
    return item


def _cursor_out(scheduler: str, source_key: str, project_id: uuid.UUID) -> str:
    raw = orjson.dumps([scheduler, source_key, str(project_id)])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _cursor_in(raw: str) -> tuple[str, str, uuid.UUID]:
    try:
        scheduler, source_key, project = orjson.loads(
            base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        )
        if isinstance(scheduler, str) and isinstance(source_key, str) and isinstance(project, str):
            check_text(scheduler)
            check_text(source_key)
            return scheduler, source_key, uuid.UUID(project)
    except (ValueError, TypeError, orjson.JSONDecodeError):
        pass
    raise ApiError(400, "bad_request", "cursor: as given by the last page")
