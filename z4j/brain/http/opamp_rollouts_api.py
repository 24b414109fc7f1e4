"""``/api/v1/opamp/rollouts``: staged rollouts of a configuration to a selector of agents.

``POST`` starts one: the project's stored agents that the selector matches
(and that accept remote configuration) are its targets, fixed now; the
leader's rollout task (brain/rollouts.py) assigns them stage by stage and
halts it when failures pass its threshold (z4j/opamp_rollouts.py says
how). ``halt``, ``resume`` and ``cancel`` are the operator's; every step is
audited (store/opamp_rollouts.py). The files are checked as for one agent
(`config_files`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, Final

from ...protocol.opamp.remote_config import ConfigFile, config_hash
from ...store.base import OpampRollout, Store
from ._request import ApiError, Handler, Request, Response, check_text, page
from .narrowing import check_project, projects_of, sees
from .opamp_api import config_files
from .resources import to_json

__all__ = ["MAX_BATCH_SIZE", "MAX_SELECTOR_KEYS", "OpampRolloutRoutes", "rollout_json"]

MAX_SELECTOR_KEYS: Final = 32
MAX_BATCH_SIZE: Final = 10_000  # a stage is one transaction: three writes per agent
_PERCENTS: Final = ("canary_percent", "failure_threshold_percent")
_DEFAULTS: Final = {"canary_percent": 10, "batch_size": 100, "failure_threshold_percent": 10}
# The operator's moves: the path's last word -> the state it moves the rollout to
_MOVES: Final = {"halt": "halted", "resume": "running", "cancel": "cancelled"}


def rollout_json(rollout: OpampRollout, project: str | None) -> dict[str, Any]:
    """A rollout as the API and the dashboard's ``opamp_rollout`` message show it."""
    item = to_json(rollout)
    item["project"] = project
    return item


def _ignore(item: dict[str, Any]) -> None:
    pass


class OpampRolloutRoutes:
    """The rollout routes of `Api`."""

    def __init__(
        self,
        store: Store,
        *,
        on_change: Callable[[dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``on_change``: called with a rollout's JSON after each change made
        here (the dashboard message, and a poke for the rollout task)."""
        self._store = store
        self._on_change = on_change if on_change is not None else _ignore
        self._clock = clock

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("GET", "/opamp/rollouts", self.list_rollouts),
            ("POST", "/opamp/rollouts", self.create),
            ("GET", "/opamp/rollouts/{id}", self.detail),
            *(
                ("POST", f"/opamp/rollouts/{{id}}/{verb}", self._mover(verb))
                for verb in ("halt", "resume", "cancel")
            ),
        ]

    async def _names(self) -> dict[uuid.UUID, str]:
        return {p.id: p.name for p in await self._store.list_projects()}

    async def list_rollouts(self, request: Request) -> Response:
        project_id = None
        ref = request.query.get("project")
        if ref is not None:
            check_text(ref)
            project = await self._store.find_project(ref)
            if project is None:
                raise ApiError(404, "not_found", f"no project {ref!r}")
            check_project(request, project.id, ref)
            project_id = project.id
        rollouts = await self._store.list_opamp_rollouts(project_id)
        names = await self._names()
        return 200, page(
            [
                rollout_json(r, names.get(r.project_id))
                for r in rollouts
                if sees(request, r.project_id)
            ],
            None,
        )

    async def _seen(self, request: Request) -> OpampRollout:
        """The rollout the path names; 404 if there is none, or it is another project's."""
        rollout_id = _id(request)
        rollout = await self._store.get_opamp_rollout(rollout_id)
        if rollout is None or not sees(request, rollout.project_id):
            raise ApiError(404, "not_found", f"no rollout {rollout_id}")
        return rollout

    async def detail(self, request: Request) -> Response:
        rollout = await self._seen(request)
        return 200, rollout_json(rollout, (await self._names()).get(rollout.project_id))

    async def create(self, request: Request) -> Response:
        body = request.json_object()
        files = config_files(body)
        ref = body.get("project")
        if not isinstance(ref, str) or not ref:
            raise ApiError(400, "bad_request", "project: a project name or id")
        check_text(ref)
        selector = _selector(body.get("selector", {}))
        numbers = {name: _number(body, name) for name in _DEFAULTS}
        project = await self._store.find_project(ref)
        if project is None:
            raise ApiError(404, "not_found", f"no project {ref!r}")
        check_project(request, project.id, ref)
        digest = config_hash(
            {
                name: ConfigFile(body=f["body"].encode(), content_type=f["content_type"])
                for name, f in files.items()
            }
        )
        rollout = await self._store.create_opamp_rollout(
            uuid.uuid4(),
            project_id=project.id,
            selector=selector,
            files=files,
            config_hash=digest.hex(),
            actor=request.actor,
            now=self._clock(),
            **numbers,
        )
        item = rollout_json(rollout, project.name)
        self._on_change(item)
        return 201, item

    def _mover(self, verb: str) -> Handler:
        async def move(request: Request) -> Response:
            rollout_id = _id(request)
            if projects_of(request) is not None:
                await self._seen(request)  # (a rollout never changes project)
            try:
                rollout = await self._store.transition_opamp_rollout(
                    rollout_id, to_state=_MOVES[verb], actor=request.actor, now=self._clock()
                )
            except LookupError:
                raise ApiError(404, "not_found", f"no rollout {rollout_id}") from None
            except ValueError as exc:
                raise ApiError(409, "conflict", str(exc)) from None
            item = rollout_json(rollout, (await self._names()).get(rollout.project_id))
            self._on_change(item)
            return 200, item

        return move


def _id(request: Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.params["id"])
    except ValueError:
        raise ApiError(400, "bad_request", "id: a rollout id (UUID)") from None


def _selector(value: Any) -> dict[str, str]:
    """``{attribute: value}``, text to text: all must equal the agent's attribute."""
    if not isinstance(value, dict) or len(value) > MAX_SELECTOR_KEYS:
        raise ApiError(
            400,
            "bad_request",
            f"selector: an object of at most {MAX_SELECTOR_KEYS} attributes, each to a text value",
        )
    for key, want in value.items():
        if not key or not isinstance(want, str):
            raise ApiError(400, "bad_request", f"selector[{key!r}]: a non-empty name to a text")
        check_text(key)
        check_text(want)
    return dict(value)


def _number(body: dict[str, Any], name: str) -> int:
    value = body.get(name, _DEFAULTS[name])
    low, high = (0, 100) if name in _PERCENTS else (1, MAX_BATCH_SIZE)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, "bad_request", f"{name}: an integer from {low} to {high}")
    return value
