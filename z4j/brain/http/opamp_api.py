"""``/api/v1/opamp/agents``: the OpAMP fleet as the store last heard it, and
the configuration each agent should run.

An agent is online while it has not said goodbye
(``agent_disconnect``) and was heard from within
Z4J_OPAMP_HEARTBEAT_WINDOW_SECONDS; ``last_seen`` lags the last message by
at most a third of that window (brain/http/opamp.py coalesces it).
instance_uids are unique per project only, so a uid found in several
projects needs ``?project=``, and so does configuring an agent not heard
from yet.

``PUT .../{instance_uid}/config`` stores a desired configuration (files of
text, checked here: JSON and YAML bodies must parse) with its
`config_hash`; brain/http/opamp.py offers
it on the agent's next poll until the agent reports that hash APPLIED, and
follows its status. The status starts from what the agent last reported,
so pushing again what it already runs shows applied at once. Pushes and
deletes are audited (store/opamp.py).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from typing import Any, Final

import trio
import yaml

from ...protocol.opamp import opamp_pb2 as pb
from ...protocol.opamp.remote_config import ConfigFile, ConfigProgress, config_hash, progress
from ...store import opamp as stored
from ...store.base import OpampAgent, OpampConfig, Project, Store
from ..links import OpampNudges
from ._request import (
    ApiError,
    Handler,
    Request,
    Response,
    check_text,
    id_cursor_param,
    limit_param,
    page,
)
from .narrowing import check_project, sees
from .resources import to_json

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_CONFIG_FILES",
    "MAX_YAML_DEPTH",
    "OpampRoutes",
    "config_files",
    "desired_summary",
    "opamp_agent_json",
]

_UID = re.compile(r"[0-9a-fA-F]{32}")
MAX_CONFIG_BYTES: Final = 512 * 1024  # all bodies of one configuration, as UTF-8
MAX_CONFIG_FILES: Final = 100
MAX_NAME_CHARS: Final = 255
# YAML nested deeper than this is refused before it is loaded: libyaml's
# scanner is quadratic in open flow collections ("[" * 100000 took 25 s) and
# PyYAML's C constructor recurses without a bound (the same text crashed the
# process). Real configurations nest a dozen levels.
MAX_YAML_DEPTH: Final = 64
_YAML_LOADER: Final = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def opamp_agent_json(
    agent: OpampAgent,
    project: str | None,
    *,
    online: bool,
    desired: OpampConfig | None = None,
) -> dict[str, Any]:
    """An OpAMP agent as the API shows it, with its project's name, whether it
    is online, and the summary of its desired configuration (if any)."""
    item = to_json(agent)
    item["project"] = project
    item["online"] = online
    item["desired_config"] = None if desired is None else desired_summary(desired)
    return item


def desired_summary(config: OpampConfig) -> dict[str, Any]:
    """What a listing shows of a desired configuration: no files."""
    return {
        "config_hash": config.config_hash,
        "status": config.status,
        "error_message": config.error_message,
        "status_at": to_json(config)["status_at"],
    }


class OpampRoutes:
    """The OpAMP routes of `Api`."""

    def __init__(
        self,
        store: Store,
        *,
        heartbeat_window_seconds: float,
        nudges: OpampNudges | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``nudges``: told of each configuration written, so that WebSocket
        agents get it at once (None: they get it on their next message)."""
        self._store = store
        self._nudges = nudges
        self._window = heartbeat_window_seconds
        self._clock = clock
        # Checking a configuration (parsing up to 512 KiB of YAML: about a
        # second of GIL-holding work) runs on a worker thread, one at a time.
        self._checks = trio.CapacityLimiter(1)

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("GET", "/opamp/agents", self.list_agents),
            ("GET", "/opamp/agents/{instance_uid}", self.detail),
            ("GET", "/opamp/agents/{instance_uid}/history", self.history),
            ("GET", "/opamp/agents/{instance_uid}/config", self.get_config),
            ("PUT", "/opamp/agents/{instance_uid}/config", self.put_config),
            ("DELETE", "/opamp/agents/{instance_uid}/config", self.delete_config),
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
        check_project(request, project.id, ref)
        return project

    async def _agents(
        self, request: Request, project: Project | None, uid: bytes | None = None
    ) -> list[OpampAgent]:
        """The OpAMP agents of the project (or all), of the caller's projects only."""
        found = await self._store.list_opamp_agents(
            None if project is None else project.id, instance_uid=uid
        )
        return [a for a in found if sees(request, a.project_id)]

    async def list_agents(self, request: Request) -> Response:
        project = await self._project(request)
        project_id = None if project is None else project.id
        agents = await self._agents(request, project)
        configs = {
            (c.project_id, c.instance_uid): c
            for c in await self._store.list_opamp_configs(project_id)
        }
        names = {p.id: p.name for p in await self._store.list_projects()}
        now = self._clock()
        items = [
            opamp_agent_json(
                a,
                names.get(a.project_id),
                online=self._online(a, now),
                desired=configs.get((a.project_id, a.instance_uid)),
            )
            for a in agents
        ]
        return 200, page(items, None)

    async def detail(self, request: Request) -> Response:
        raw, uid = _uid(request)
        project = await self._project(request)
        found = await self._agents(request, project, uid)
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
        desired = await self._store.get_opamp_config(agent.project_id, bytes.fromhex(raw))
        return 200, opamp_agent_json(
            agent, names.get(agent.project_id), online=online, desired=desired
        )

    async def _target(self, request: Request) -> tuple[bytes, uuid.UUID, OpampAgent | None]:
        """The agent a config route names: its uid, project, and row if heard from."""
        raw, uid = _uid(request)
        project = await self._project(request)
        found = await self._agents(request, project, uid)
        if len(found) > 1:
            raise ApiError(
                409,
                "ambiguous",
                f"{len(found)} projects have an OpAMP agent {raw.lower()}: give ?project=",
            )
        if found:
            return uid, found[0].project_id, found[0]
        if project is None:
            raise ApiError(
                404,
                "not_found",
                f"no OpAMP agent {raw.lower()}: give ?project= for one not heard from yet",
            )
        return uid, project.id, None

    async def history(self, request: Request) -> Response:
        """What changed, newest first (store/opamp_history.py); ``cursor`` continues."""
        limit = limit_param(request.query)
        before = None
        if "cursor" in request.query:
            before = id_cursor_param(request.query["cursor"])
        uid, project_id, agent = await self._target(request)
        if agent is None:
            raise ApiError(404, "not_found", f"no OpAMP agent {uid.hex()}")
        entries = await self._store.list_opamp_history(
            project_id, uid, before_id=before, limit=limit
        )
        cursor = str(entries[-1].id) if len(entries) == limit else None
        return 200, page([to_json(e) for e in entries], cursor)

    async def get_config(self, request: Request) -> Response:
        uid, project_id, _ = await self._target(request)
        config = await self._store.get_opamp_config(project_id, uid)
        if config is None:
            raise ApiError(404, "not_found", f"no configuration for OpAMP agent {uid.hex()}")
        return 200, to_json(config)

    async def put_config(self, request: Request) -> Response:
        body = request.json_object()
        files = await trio.to_thread.run_sync(config_files, body, limiter=self._checks)
        uid, project_id, agent = await self._target(request)
        digest = config_hash(
            {
                name: ConfigFile(body=f["body"].encode(), content_type=f["content_type"])
                for name, f in files.items()
            }
        )
        status, error = ConfigProgress.PENDING, ""
        if agent is not None:
            state = stored.state_of(agent)
            if state.remote_config_status is not None:
                reported = pb.RemoteConfigStatus.FromString(state.remote_config_status)
                status = progress(reported, digest)
                if status is ConfigProgress.FAILED:
                    error = reported.error_message
        now = self._clock()
        config = OpampConfig(
            project_id=project_id,
            instance_uid=uid.hex(),
            config_hash=digest.hex(),
            files=files,
            created_at=now,
            created_by=request.actor,
            status=status.value,
            error_message=error,
            status_at=now,
        )
        await self._store.put_opamp_config(config, actor=request.actor)
        if self._nudges is not None:
            self._nudges.changed(project_id, [uid])
        return 200, to_json(config)

    async def delete_config(self, request: Request) -> Response:
        uid, project_id, _ = await self._target(request)
        if not await self._store.delete_opamp_config(project_id, uid, actor=request.actor):
            raise ApiError(404, "not_found", f"no configuration for OpAMP agent {uid.hex()}")
        if self._nudges is not None:
            self._nudges.changed(project_id, [uid])
        return 204, None


def _uid(request: Request) -> tuple[str, bytes]:
    raw = request.params["instance_uid"]
    if not _UID.fullmatch(raw):
        raise ApiError(400, "bad_request", "instance_uid: 32 hex digits")
    return raw, bytes.fromhex(raw)


def _is_json(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _is_yaml(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media in ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml") or (
        media.endswith("+yaml")
    )


def _yaml_error(text: str) -> str | None:
    """Why ``text`` is not YAML that `yaml.safe_load` takes (None: it is).

    Every document of a stream is loaded (an agent may take several). The
    nesting is bounded first, from the parser's events, so that a hostile
    body is refused after a few events instead of reaching libyaml's slow
    and recursive paths (`MAX_YAML_DEPTH`).
    """
    try:
        depth = 0
        for event in yaml.parse(text, Loader=_YAML_LOADER):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    return f"nested deeper than {MAX_YAML_DEPTH} levels"
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        for _ in yaml.load_all(text, Loader=_YAML_LOADER):
            pass
    # ValueError, OverflowError: scalars that match a type but do not fit it
    # (a timestamp's month 13, an !!int of 5000 digits).
    except (yaml.YAMLError, ValueError, OverflowError) as exc:
        return str(exc)
    return None


def config_files(body: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The files of a PUT body, checked: ``{"files": {name: {"body", "content_type"}}}``.

    At least one file; names non-empty (OpAMP allows one empty name, but a
    name is what operators and the agent's report go by); at most
    `MAX_CONFIG_FILES` files of `MAX_CONFIG_BYTES` in all; a body whose
    content type is JSON must parse as JSON, and one whose content type is
    YAML (``application/yaml``, ``text/yaml``, ``application/x-yaml``,
    ``text/x-yaml``, ``...+yaml``) as YAML: a typo is refused here, with
    where it is, rather than reported FAILED by each agent it reaches.
    Parsing YAML can take a second of GIL-holding work: call this from a
    worker thread.
    """
    files = body.get("files")
    if not isinstance(files, dict) or not files:
        raise ApiError(400, "bad_request", "files: an object of at least one file by name")
    if len(files) > MAX_CONFIG_FILES:
        raise ApiError(400, "bad_request", f"files: at most {MAX_CONFIG_FILES}")
    out: dict[str, dict[str, str]] = {}
    total = 0
    for name, file in files.items():
        if not name or len(name) > MAX_NAME_CHARS:
            raise ApiError(400, "bad_request", f"files: names of 1 to {MAX_NAME_CHARS} characters")
        if not isinstance(file, dict) or not isinstance(file.get("body"), str):
            raise ApiError(400, "bad_request", f"files[{name!r}]: an object with a body (text)")
        content_type = file.get("content_type", "")
        if not isinstance(content_type, str) or len(content_type) > MAX_NAME_CHARS:
            raise ApiError(
                400,
                "bad_request",
                f"files[{name!r}].content_type: text of at most {MAX_NAME_CHARS} characters",
            )
        text = file["body"]
        total += len(text.encode())
        if total > MAX_CONFIG_BYTES:
            raise ApiError(
                400, "too_large", f"files: at most {MAX_CONFIG_BYTES} bytes of bodies in all"
            )
        if _is_json(content_type):
            try:
                json.loads(text)
            except json.JSONDecodeError as exc:
                raise ApiError(
                    400, "invalid_config", f"files[{name!r}] is not valid JSON: {exc}"
                ) from None
        elif _is_yaml(content_type):
            error = _yaml_error(text)
            if error is not None:
                raise ApiError(400, "invalid_config", f"files[{name!r}] is not valid YAML: {error}")
        out[name] = {"body": text, "content_type": content_type}
    return out
