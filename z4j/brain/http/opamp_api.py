"""``/api/v1/opamp/agents``: the OpAMP fleet as the store last heard it.

Read-only for now. An agent is online while it has not said goodbye
(``agent_disconnect``) and was heard from within
Z4J_OPAMP_HEARTBEAT_WINDOW_SECONDS; ``last_seen`` lags the last message by
at most a third of that window (brain/http/opamp.py coalesces it).
instance_uids are unique per project only, so a uid found in several
projects needs ``?project=``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from ...store.base import OpampAgent, Project, Store
from ._request import ApiError, Handler, Request, Response, check_text, page
from .resources import to_json

__all__ = ["OpampRoutes", "opamp_agent_json"]

_UID = re.compile(r"[0-9a-fA-F]{32}")


def opamp_agent_json(agent: OpampAgent, project: str | None, *, online: bool) -> dict[str, Any]:
    """An OpAMP agent as the API shows it, with its project's name and whether it is online."""
    item = to_json(agent)
    item["project"] = project
    item["online"] = online
    return item


class OpampRoutes:
    """The OpAMP routes of `Api`."""

    def __init__(
        self,
        store: Store,
        *,
        heartbeat_window_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._window = heartbeat_window_seconds
        self._clock = clock

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("GET", "/opamp/agents", self.list_agents),
            ("GET", "/opamp/agents/{instance_uid}", self.detail),
        ]

    def _online(self, agent: OpampAgent, now: float) -> bool:
        return agent.disconnected_at is None and now - agent.last_seen <= self._window

    async def _project(self, request: Request) -> Project | None:
        ref = request.query.get("project")
        if ref is None:
            return None
        check_text(ref)
        project = await self._store.find_project(ref)
        if project is None:
            raise ApiError(404, "not_found", f"no project {ref!r}")
        return project

    async def list_agents(self, request: Request) -> Response:
        project = await self._project(request)
        agents = await self._store.list_opamp_agents(None if project is None else project.id)
        names = {p.id: p.name for p in await self._store.list_projects()}
        now = self._clock()
        items = [
            opamp_agent_json(a, names.get(a.project_id), online=self._online(a, now))
            for a in agents
        ]
        return 200, page(items, None)

    async def detail(self, request: Request) -> Response:
        raw = request.params["instance_uid"]
        if not _UID.fullmatch(raw):
            raise ApiError(400, "bad_request", "instance_uid: 32 hex digits")
        uid = bytes.fromhex(raw)
        project = await self._project(request)
        found = await self._store.list_opamp_agents(
            None if project is None else project.id, instance_uid=uid
        )
        if not found:
            raise ApiError(404, "not_found", f"no OpAMP agent {raw.lower()}")
        if len(found) > 1:
            raise ApiError(
                409,
                "ambiguous",
                f"{len(found)} projects have an OpAMP agent {raw.lower()}: give ?project=",
            )
        [agent] = found
        names = {p.id: p.name for p in await self._store.list_projects()}
        online = self._online(agent, self._clock())
        return 200, opamp_agent_json(agent, names.get(agent.project_id), online=online)
