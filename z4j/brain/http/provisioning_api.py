"""Provisioning under ``/api/v1``: create and archive projects, create, revoke
and rotate agents, rotate a project's signing secret, without a shell on the
brain's host.

An agent's token is shown once, when it is made (create, rotate-token): the
store keeps only its keyed hash. The answer carries a ready-to-paste
z4j-bare configuration (its ``Z4J_*`` variables). Rotations take a grace in
seconds (default a day, 0: at once): until it ends the old token opens
sessions and the previous signing key verifies, so live agents move over
without being cut off; the agent endpoint closes what outlives its grace
(brain/agents.py). Every change is audited with the caller as actor.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Final

from ... import keys
from ...store.base import Agent, DirectoryConflict, Project, Store, WorkerInfo
from ._request import ApiError, Handler, Request, Response, check_text, uuid_param
from .resources import iso, to_json

__all__ = [
    "DEFAULT_GRACE_SECONDS",
    "MAX_GRACE_SECONDS",
    "MAX_NAME_CHARS",
    "ProvisioningRoutes",
    "agent_json",
    "agent_list",
    "agent_page",
    "bare_config",
]

DEFAULT_GRACE_SECONDS: Final = 86_400
MAX_GRACE_SECONDS: Final = 30 * 86_400
MAX_NAME_CHARS: Final = 200
MAX_URL_CHARS: Final = 2048


def bare_config(brain_url: str, token: str, project_id: uuid.UUID, secret: str) -> str:
    """The environment a z4j-bare agent runs with, one ``NAME=value`` a line."""
    return (
        f"Z4J_BRAIN_URL={brain_url}\n"
        f"Z4J_TOKEN={token}\n"
        f"Z4J_PROJECT_ID={project_id}\n"
        f"Z4J_HMAC_SECRET={secret}\n"
    )


class ProvisioningRoutes:
    """The provisioning routes of `Api`."""

    def __init__(
        self,
        store: Store,
        master: bytes,
        *,
        clock: Callable[[], float] = time.time,
        default_grace_seconds: int = DEFAULT_GRACE_SECONDS,
    ) -> None:
        """``master``: the brain's master secret (token hashes, signing keys).
        ``clock``: the wall clock grace periods start from (the agent
        endpoint holds their ends against the same one).
        ``default_grace_seconds``: a rotation's grace when the request gives
        none (Z4J_ROTATION_GRACE_SECONDS)."""
        self._store = store
        self._master = master
        self._clock = clock
        self._default_grace = default_grace_seconds

    @property
    def clock(self) -> Callable[[], float]:
        return self._clock

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("POST", "/projects", self.create_project),
            ("POST", "/projects/{id}/archive", self.archive_project),
            ("POST", "/projects/{id}/rotate-secret", self.rotate_secret),
            ("POST", "/agents", self.create_agent),
            ("POST", "/agents/{id}/revoke", self.revoke_agent),
            ("POST", "/agents/{id}/rotate-token", self.rotate_token),
        ]

    # -- projects ------------------------------------------------------------------------

    async def create_project(self, request: Request) -> Response:
        name = _name(request.json_object(), "name")
        try:
            project = await self._store.create_project(name)
        except DirectoryConflict:
            raise await self._refused(
                request,
                "project.create",
                "project:",
                {"name": name},
                "name_taken",
                f"a project named {name!r} exists",
            ) from None
        await self._audit(request, "project.create", f"project:{project.id}", {"name": name})
        return 201, to_json(project)

    async def archive_project(self, request: Request) -> Response:
        project = await self._project(request)
        revoked = await self._store.archive_project(project.id, now=self._clock())
        subject = f"project:{project.id}"
        if revoked is None:
            raise await self._refused(
                request,
                "project.archive",
                subject,
                {"name": project.name},
                "archived",
                f"project {project.name!r} is archived already",
            )
        await self._audit(
            request,
            "project.archive",
            subject,
            {"name": project.name, "agents_revoked": [str(a.id) for a in revoked]},
        )
        return 200, to_json(await self._project(request))

    async def rotate_secret(self, request: Request) -> Response:
        project = await self._project(request)
        grace = _grace(request.json_object(), self._default_grace)
        rotated = await self._store.rotate_project_secret(
            project.id, now=self._clock(), grace_seconds=grace
        )
        subject = f"project:{project.id}"
        if rotated is None:
            raise await self._refused(
                request,
                "project.secret.rotate",
                subject,
                {"name": project.name},
                "archived",
                f"project {project.name!r} is archived",
            )
        await self._audit(
            request,
            "project.secret.rotate",
            subject,
            {"generation": rotated.secret_generation, "grace_seconds": grace},
        )
        return 200, {
            "project": to_json(rotated),
            "signing_secret": self._secret(rotated),
            "previous_secret_expires_at": iso(rotated.previous_secret_expires_at),
        }

    # -- agents --------------------------------------------------------------------------

    async def create_agent(self, request: Request) -> Response:
        body = request.json_object()
        ref = body.get("project")
        if not isinstance(ref, str) or not 0 < len(ref) <= MAX_NAME_CHARS:
            raise ApiError(400, "bad_request", "project: a project name or id")
        name = _name(body, "name")
        brain_url = _brain_url(body, request)
        project = await self._store.find_project(ref)
        if project is None:
            raise ApiError(404, "not_found", f"no project {ref!r}")
        details = {"project_id": str(project.id), "name": name}
        if project.archived:
            raise await self._refused(
                request,
                "agent.create",
                "agent:",
                details,
                "archived",
                f"project {project.name!r} is archived",
            )
        token = keys.new_agent_token()
        try:
            agent = await self._store.create_agent(
                project.id, name, keys.token_hash(self._master, token)
            )
        except DirectoryConflict:
            raise await self._refused(
                request,
                "agent.create",
                "agent:",
                details,
                "name_taken",
                f"project {project.name!r} has an agent named {name!r}",
            ) from None
        except LookupError as exc:  # archived under us
            raise await self._refused(
                request, "agent.create", "agent:", details, "archived", str(exc)
            ) from None
        await self._audit(request, "agent.create", f"agent:{agent.id}", details)
        return 201, await self._shown_once(agent, project, token, brain_url)

    async def revoke_agent(self, request: Request) -> Response:
        agent = await self._agent(request)
        details = {"project_id": str(agent.project_id), "name": agent.name}
        if not await self._store.revoke_agent(agent.id):
            raise await self._refused(
                request,
                "agent.revoke",
                f"agent:{agent.id}",
                details,
                "revoked",
                f"agent {agent.name!r} is revoked already",
            )
        await self._audit(request, "agent.revoke", f"agent:{agent.id}", details)
        return 200, to_json(await self._agent(request))

    async def rotate_token(self, request: Request) -> Response:
        agent = await self._agent(request)
        body = request.json_object()
        grace = _grace(body, self._default_grace)
        brain_url = _brain_url(body, request)
        token = keys.new_agent_token()
        ends = await self._store.rotate_agent_token(
            agent.id, keys.token_hash(self._master, token), now=self._clock(), grace_seconds=grace
        )
        details: dict[str, Any] = {"project_id": str(agent.project_id), "grace_seconds": grace}
        if ends is None:
            raise await self._refused(
                request,
                "agent.token.rotate",
                f"agent:{agent.id}",
                details,
                "revoked",
                f"agent {agent.name!r} is revoked",
            )
        project = await self._store.find_project(str(agent.project_id))
        assert project is not None  # an agent's project is never deleted
        await self._audit(request, "agent.token.rotate", f"agent:{agent.id}", details)
        shown = await self._shown_once(agent, project, token, brain_url, ends)
        shown["old_tokens_expire_at"] = iso(ends)
        return 200, shown

    # -- helpers -------------------------------------------------------------------------

    async def _audit(
        self,
        request: Request,
        action: str,
        subject: str,
        details: dict[str, Any],
        outcome: str = "ok",
    ) -> None:
        """One audit row: who (the actor), from where, what, and how it ended."""
        await self._store.audit(
            action,
            subject,
            {**details, "source": request.source, "outcome": outcome},
            actor=request.actor,
        )

    async def _refused(
        self,
        request: Request,
        action: str,
        subject: str,
        details: dict[str, Any],
        code: str,
        message: str,
    ) -> ApiError:
        """A 409 to raise, audited first (outcome ``refused:CODE``)."""
        await self._audit(request, action, subject, details, outcome=f"refused:{code}")
        return ApiError(409, code, message)

    def _secret(self, project: Project) -> str:
        return keys.project_secret_text(self._master, project.id, project.secret_generation)

    async def _shown_once(
        self,
        agent: Agent,
        project: Project,
        token: str,
        brain_url: str,
        grace_until: float | None = None,
    ) -> dict[str, Any]:
        secret = self._secret(project)
        workers = [to_json(w) for w in await self._store.list_workers(agent.id)]
        return {
            "agent": agent_json(agent, project.name, workers, grace_until),
            "token": token,
            "signing_secret": secret,
            "config": bare_config(brain_url, token, project.id, secret),
        }

    async def _project(self, request: Request) -> Project:
        project_id = uuid_param(request.params["id"], "id")
        project = await self._store.find_project(str(project_id))
        if project is None:
            raise ApiError(404, "not_found", f"no project {project_id}")
        return project

    async def _agent(self, request: Request) -> Agent:
        agent_id = uuid_param(request.params["id"], "id")
        agent = await self._store.find_agent(str(agent_id))
        if agent is None:
            raise ApiError(404, "not_found", f"no agent {agent_id}")
        return agent


def agent_json(
    a: Agent,
    project: str | None,
    workers: list[dict[str, Any]],
    grace_until: float | None = None,
) -> dict[str, Any]:
    """An agent as the API shows it, with its project's name, its workers (when
    last seen, which versions) and the end of a rotated token's grace."""
    item = to_json(a)
    item["project"] = project
    item["workers"] = workers
    # ISO-8601 UTC strings of one format: their order is their text's.
    item["last_seen"] = max((w["last_seen"] for w in workers), default=None)
    item["versions"] = sorted({w["agent_version"] for w in workers if w["agent_version"]})
    item["token_grace_until"] = iso(grace_until)
    return item


async def agent_list(
    store: Store,
    now: float,
    project_id: uuid.UUID | None = None,
    keep: Callable[[uuid.UUID], bool] = lambda project_id: True,
) -> list[dict[str, Any]]:
    """The agents (of one project, or all) whose project ``keep`` allows, as
    `agent_json` shows them: three store reads for the whole list."""
    agents = [a for a in await store.list_agents(project_id) if keep(a.project_id)]
    return await _shown(store, agents, await store.list_workers(), now)


async def agent_page(store: Store, agents: Sequence[Agent], now: float) -> list[dict[str, Any]]:
    """A page of ``agents`` as `agent_json` shows them, reading their workers only."""
    workers = await store.list_workers(agent_ids=frozenset(a.id for a in agents))
    return await _shown(store, agents, workers, now)


async def _shown(
    store: Store, agents: Sequence[Agent], workers: Sequence[WorkerInfo], now: float
) -> list[dict[str, Any]]:
    projects = {p.id: p.name for p in await store.list_projects()}
    theirs: dict[uuid.UUID, list[dict[str, Any]]] = {}
    for worker in workers:
        theirs.setdefault(worker.agent_id, []).append(to_json(worker))
    graces = await store.token_graces(now=now)
    return [
        agent_json(a, projects.get(a.project_id), theirs.get(a.id, []), graces.get(a.id))
        for a in agents
    ]


def _name(body: dict[str, Any], key: str) -> str:
    """A project's or agent's name: printable, trimmed, not an id (ids win lookups)."""
    name = body.get(key)
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
        raise ApiError(400, "bad_request", f"{key}: a name of 1 to {MAX_NAME_CHARS} characters")
    if name != name.strip() or not name.isprintable():
        raise ApiError(400, "bad_request", f"{key}: printable, without surrounding spaces")
    try:
        uuid.UUID(name)
    except ValueError:
        return name
    raise ApiError(400, "bad_request", f"{key}: must not look like an id")


def _grace(body: dict[str, Any], default: int) -> int:
    grace = body.get("grace_seconds", default)
    if not isinstance(grace, int) or isinstance(grace, bool) or not 0 <= grace <= MAX_GRACE_SECONDS:
        raise ApiError(
            400, "bad_request", f"grace_seconds: an integer from 0 to {MAX_GRACE_SECONDS}"
        )
    return grace


def _brain_url(body: dict[str, Any], request: Request) -> str:
    """Where the agent should connect: ``brain_url`` if given (the dashboard
    sends its own origin), else this request's Host over plain HTTP."""
    url = body.get("brain_url")
    if url is not None:
        if (
            not isinstance(url, str)
            or len(url) > MAX_URL_CHARS
            or not url.startswith(("http://", "https://"))
            or not url.isprintable()
            or any(c.isspace() for c in url)
        ):
            raise ApiError(400, "bad_request", "brain_url: an http:// or https:// URL")
        return url.rstrip("/")
    for name, value in request.headers:
        if name.lower() == b"host":
            host = value.decode("latin-1")
            if host.isprintable() and not any(c.isspace() for c in host):
                check_text(host)
                return f"http://{host}"
    return "http://127.0.0.1:7700"
