"""``/api/v1/dead-letters`` and ``/api/v1/task-registry``: what an operator
needs to see and settle without a shell.

Dead letters live in the buffer file of the brain process that drained them
(one file per process, locked to it), so each replica's API serves its own
buffer's dead letters and says which instance and buffer they belong to. On
several replicas, reach a replica's letters through that replica's address
(each exports its count as ``z4j_dead_letter_rows``).
Moving them into the shared store instead would put rows the store refused
as data back into the same store, across a second transaction per row.

Re-queue puts the payload back into this buffer's ``payloads`` (a new row
id, claimed like any new row); if the store refuses it again, the drain sets
it aside again and counts it again. Discard deletes it. Both are counted in
the buffer file (metrics) and written to the audit log with the caller.

A user narrowed to projects (narrowing.py) sees and settles the dead
letters of their projects' agents only, as their ``origin`` names them
(buffer.py filters on it); an ingest payload has no project.

The task registry is what agents' ``registry_delta`` frames keep per worker:
``{engine: {task name: task}}`` as the adapters sent it.
"""

from __future__ import annotations

import uuid
from typing import Any

from ..._decimal import parse_decimal
from ...buffer import Buffer, BufferFull
from ...dead_letters import DETAIL_BODY_BYTES, LIST_BODY_BYTES, MAX_IDS, dead_letter_json
from ...store.base import Store
from ._request import ApiError, Handler, Request, Response, limit_param, uuid_param
from .narrowing import check_agent, projects_of, sees

__all__ = ["MAX_REGISTRY_WORKERS", "DeadLetterRoutes"]

MAX_REGISTRY_WORKERS = 100  # workers per registry page (each registry is one agent frame's worth)
_MAX_ROW_ID = 2**63 - 1


class DeadLetterRoutes:
    def __init__(self, store: Store, buffer: Buffer, *, instance_id: uuid.UUID, name: str) -> None:
        self._store = store
        self._buffer = buffer
        self._instance = {
            "id": str(instance_id),
            "name": name,
            "buffer_id": str(buffer.buffer_id),
        }

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("GET", "/dead-letters", self.list_letters),
            ("POST", "/dead-letters/requeue", self.requeue_many),
            ("POST", "/dead-letters/discard", self.discard_many),
            ("GET", "/dead-letters/{id}", self.get_letter),
            ("POST", "/dead-letters/{id}/requeue", self.requeue_one),
            ("POST", "/dead-letters/{id}/discard", self.discard_one),
            ("GET", "/task-registry", self.task_registry),
        ]

    def _json(self, letter: Any) -> dict[str, Any]:
        return dead_letter_json(letter, buffer_id=self._instance["buffer_id"])

    async def list_letters(self, request: Request) -> Response:
        q = request.query
        before = _row_id(q["cursor"], "cursor") if "cursor" in q else None
        limit = limit_param(q)
        projects = projects_of(request)
        letters = await self._buffer.dead_letter_page(
            before=before, limit=limit + 1, body_bytes=LIST_BODY_BYTES, projects=projects
        )
        more = len(letters) > limit
        letters = letters[:limit]
        total = (
            self._buffer.statistics().dead_letter_rows
            if projects is None
            else await self._buffer.dead_letter_count(projects)
        )
        return 200, {
            "items": [self._json(letter) for letter in letters],
            "next_cursor": str(letters[-1].id) if more else None,
            "instance": self._instance,
            "total": total,
        }

    async def _theirs(self, request: Request, ids: list[int]) -> list[int]:
        """The ids of ``ids`` the caller may see: all for an unnarrowed caller,
        else those of their projects' agents (an ingest payload has no project)."""
        if projects_of(request) is None:
            return ids
        found = await self._buffer.dead_letter_projects(ids)
        return [i for i in ids if i in found and sees(request, found[i])]

    async def get_letter(self, request: Request) -> Response:
        row_id = _row_id(request.params["id"], "id")
        if not await self._theirs(request, [row_id]):
            raise _not_here(row_id)
        letter = await self._buffer.dead_letter(row_id, body_bytes=DETAIL_BODY_BYTES)
        if letter is None:
            raise _not_here(row_id)
        return 200, self._json(letter)

    async def requeue_one(self, request: Request) -> Response:
        row_id = _row_id(request.params["id"], "id")
        moved = await self._requeue(request, [row_id])
        if not moved:
            raise _not_here(row_id)
        return 200, {"requeued": [{"id": row_id, "row_id": moved[row_id]}]}

    async def discard_one(self, request: Request) -> Response:
        row_id = _row_id(request.params["id"], "id")
        if not await self._discard(request, [row_id]):
            raise _not_here(row_id)
        return 200, {"discarded": [row_id]}

    async def requeue_many(self, request: Request) -> Response:
        ids = _ids(request)
        moved = await self._requeue(request, ids)
        return 200, {
            "requeued": [{"id": old, "row_id": new} for old, new in moved.items()],
            "missing": [i for i in dict.fromkeys(ids) if i not in moved],
        }

    async def discard_many(self, request: Request) -> Response:
        ids = _ids(request)
        gone = await self._discard(request, ids)
        return 200, {"discarded": gone, "missing": [i for i in dict.fromkeys(ids) if i not in gone]}

    async def _requeue(self, request: Request, ids: list[int]) -> dict[int, int]:
        ids = await self._theirs(request, ids)
        if not ids:
            return {}
        try:
            moved = await self._buffer.requeue(ids)
        except BufferFull as exc:
            raise ApiError(409, "buffer_full", f"no room to re-queue: {exc}") from None
        for old, new in moved.items():
            await self._audit(request, "dead_letter.requeued", old, {"row_id": new})
        return moved

    async def _discard(self, request: Request, ids: list[int]) -> list[int]:
        ids = await self._theirs(request, ids)
        if not ids:
            return []
        gone = await self._buffer.discard(ids)
        for row_id in gone:
            await self._audit(request, "dead_letter.discarded", row_id, {})
        return gone

    async def _audit(
        self, request: Request, action: str, row_id: int, extra: dict[str, Any]
    ) -> None:
        # After the buffer's commit: the buffer file and the store share no
        # transaction; a store outage here leaves the change made, unaudited,
        # and the caller a 503 (logged), never the reverse.
        await self._store.audit(
            action,
            f"{self._instance['buffer_id']}/{row_id}",
            {"instance": self._instance["name"], "source": request.source, **extra},
            actor=request.actor,
        )

    async def task_registry(self, request: Request) -> Response:
        q = request.query
        agent_id = uuid_param(q["agent_id"], "agent_id") if "agent_id" in q else None
        projects = projects_of(request)
        if agent_id is not None and projects is not None:
            await check_agent(self._store, request, agent_id)
        limit = limit_param(q, most=MAX_REGISTRY_WORKERS)
        after = _registry_cursor(q["cursor"]) if "cursor" in q else None
        found = await self._store.worker_registries(
            agent_id=agent_id, after=after, limit=limit + 1, projects=projects
        )
        more = len(found) > limit
        found = found[:limit]
        items = [
            {
                "agent_id": str(w.agent_id),
                "worker_id": w.worker_id,
                "engines": {
                    engine: sorted(tasks.values(), key=lambda t: str(t.get("name")))
                    for engine, tasks in sorted(w.registry.items())
                    if isinstance(tasks, dict)
                },
            }
            for w in found
        ]
        cursor = f"{found[-1].agent_id}/{found[-1].worker_id}" if more else None
        return 200, {"items": items, "next_cursor": cursor}


def _row_id(raw: str, name: str) -> int:
    if (number := parse_decimal(raw)) is None or not 1 <= number <= _MAX_ROW_ID:
        raise ApiError(400, "bad_request", f"{name}: a dead letter's id (a positive integer)")
    return number


def _ids(request: Request) -> list[int]:
    ids = request.json_object().get("ids")
    if (
        not isinstance(ids, list)
        or not 1 <= len(ids) <= MAX_IDS
        or not all(type(i) is int and 1 <= i <= _MAX_ROW_ID for i in ids)
    ):
        raise ApiError(400, "bad_request", f"ids: a list of 1 to {MAX_IDS} dead letter ids")
    return ids


def _registry_cursor(raw: str) -> tuple[uuid.UUID, str]:
    agent, sep, worker = raw.partition("/")
    if not sep or not worker:
        raise ApiError(400, "bad_request", "cursor: the next_cursor of a previous page")
    return uuid_param(agent, "cursor"), worker


def _not_here(row_id: int) -> ApiError:
    return ApiError(
        404,
        "not_found",
        f"no dead letter {row_id} in this instance's buffer (another replica's, or settled)",
    )
