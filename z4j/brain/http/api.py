"""The REST API under ``/api/v1/``: JSON in, JSON out, an OpenAPI document.

Each route is a small async function from a parsed `Request` to a status
and a JSON-ready value; `ApiError` carries every refusal as a status, a
stable code and a message, so bad input gets a 4xx and never a 500. Lists
are newest first, ``{"items": [...], "next_cursor": ...}``; pass the
cursor back to continue. Times are ISO-8601 UTC strings. The document at
``/api/v1/openapi.json`` (openapi.py) describes exactly this.

A browser sends the session cookie with any request to us, even one a
foreign page makes it send, and SameSite is not the whole answer (sibling
subdomains are same-site). So a state-changing request signed in by the
cookie must also have a JSON content type (a foreign form cannot send one
without a preflight we never grant), no foreign ``Origin``, and the
``X-CSRF-Token`` of its session, which only our own pages can read.
Bearer-token callers are not browsers riding a cookie: none of this applies.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson

from ...store.base import (
    COMMAND_STATES,
    CommandRecord,
    Store,
    StoreUnavailable,
)
from ...store.replica import replica_reads
from ..links import CommandDesk, CommandError, OpampNudges
from ._request import (
    ApiError,
    Handler,
    Receive,
    Request,
    Response,
    Scope,
    Send,
    check_text,
    epoch,
    id_cursor_param,
    limit_param,
    page,
    parse_query,
    read_body,
    uuid_param,
)
from .accounts_api import AccountRoutes
from .audit_params import audit_filter
from .auth import (
    CSRF_COOKIE,
    SESSION_COOKIE,
    Auth,
    Principal,
    SignInThrottle,
    credentials,
    header,
    same_origin,
)
from .command_input import command_error, command_fields
from .dead_letters_api import DeadLetterRoutes
from .events_api import EventRoutes
from .federation_api import FederationRoutes
from .federation_peer_api import PeerRoutes
from .narrowing import check_agent, check_narrowed, check_project, projects_of, sees
from .opamp_api import OpampRoutes
from .opamp_rollouts_api import OpampRolloutRoutes
from .openapi import OPENAPI
from .policy import Action, action_of, allowed
from .provisioning_api import ProvisioningRoutes, agent_list
from .provisioning_api import agent_json as _agent_json
from .queues_api import QueueRoutes
from .resources import to_json
from .schedules_api import ScheduleRoutes
from .streaming import Streamed, send_streamed
from .tasks_api import TaskRoutes
from .workers_api import EngineWorkerRoutes

__all__ = ["Api", "ApiError"]

log = logging.getLogger("z4j.api")

# A store failure is logged at most this often (callers see a generic 503).
STORE_ERROR_LOG_SECONDS = 10.0
CSRF_HEADER = b"x-csrf-token"
# Routes whose answer opens a session (its id goes into the cookie, not the body).
_OPENS_SESSION = frozenset({("POST", "/session"), ("POST", "/setup")})


class Api:
    """The ASGI app for paths under ``/api/v1/``."""

    def __init__(
        self,
        store: Store,
        commands: CommandDesk,
        auth: Auth,
        *,
        sign_in_throttle: SignInThrottle | None = None,
        account_throttle: SignInThrottle | None = None,
        project_key: Callable[[uuid.UUID, int], bytes] | None = None,
        opamp_heartbeat_window_seconds: float = 90.0,
        opamp_nudges: OpampNudges | None = None,
        on_opamp_rollout: Callable[[dict[str, Any]], None] | None = None,
        dead_letters: DeadLetterRoutes | None = None,
        provisioning: ProvisioningRoutes | None = None,
        peer: PeerRoutes | None = None,
        federation: FederationRoutes | None = None,
    ) -> None:
        """``project_key``: a project's signing key, for purge tokens (None: no purges).
        ``opamp_heartbeat_window_seconds``: how long an OpAMP agent stays online unheard.
        ``on_opamp_rollout``: called with a rollout's JSON after the API changed it.
        ``dead_letters``: this process's buffer dead letters and the task registry.
        ``provisioning``: the routes that create, archive, revoke and rotate
        (None: not served). ``peer``: what this region serves hubs' federation
        tokens; ``federation``: the hub's federated view (None: not served)."""
        self._store = store
        self._commands = commands
        # Rotated tokens' graces are shown by the clock that ends them.
        self._clock = provisioning.clock if provisioning is not None else time.time
        self._auth = auth
        self._peer = peer
        self._throttle = sign_in_throttle if sign_in_throttle is not None else SignInThrottle()
        self._store_error_logged = -STORE_ERROR_LOG_SECONDS
        # (method, path template, path pattern, handler, action from policy.py);
        # the template also names the route in the request metrics.
        self._routes: list[tuple[str, str, re.Pattern[str], Handler, Action]] = []
        accounts = AccountRoutes(
            store, auth, throttle=self._throttle, account_throttle=account_throttle
        )
        route = self._route
        route("GET", "/openapi.json", self._openapi)
        for method, path, handler in accounts.routes():
            route(method, path, handler)
        route("GET", "/projects", self._projects)
        route("GET", "/agents", self._agents)
        route("GET", "/agents/{id}", self._agent)
        route("GET", "/instances", self._instances)
        route("GET", "/commands", self._list_commands)
        route("POST", "/commands", self._create_command)
        route("GET", "/commands/{id}", self._get_command)
        route("POST", "/commands/{id}/cancel", self._cancel_command)
        route("GET", "/audit", self._audit)
        for method, path, handler in [
            *EventRoutes(store).routes(),
            *TaskRoutes(store, commands).routes(),
            *QueueRoutes(store, commands, project_key).routes(),
            *EngineWorkerRoutes(store, commands).routes(),
            *ScheduleRoutes(store, commands).routes(),
            *OpampRoutes(
                store,
                heartbeat_window_seconds=opamp_heartbeat_window_seconds,
                nudges=opamp_nudges,
            ).routes(),
            *OpampRolloutRoutes(store, on_change=on_opamp_rollout).routes(),
            *(dead_letters.routes() if dead_letters is not None else []),
            *(provisioning.routes() if provisioning is not None else ()),
            *(peer.routes() if peer is not None else ()),
            *(federation.routes() if federation is not None else ()),
        ]:
            route(method, path, handler)

    def _route(self, method: str, path: str, handler: Handler) -> None:
        pattern = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$")
        self._routes.append((method, path, pattern, handler, action_of(method, path)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A GET may read the read replica (lists, searches, statistics: the
        # store methods that allow it); a write request reads the primary
        # throughout, so that what it checks is what it changes. So does the
        # GET that operates (it asks an agent for a queue's dead letters by
        # sending it a command, once its workers are seen to offer it).
        action = self._action(scope["method"], scope["path"].removeprefix("/api/v1"))
        with replica_reads(scope["method"] in ("GET", "HEAD") and action not in (None, "operate")):
            await self._respond(scope, receive, send)

    def _action(self, method: str, path: str) -> Action | None:
        """The policy action of the route ``method path`` names; None if none does."""
        for route_method, _, pattern, _, action in self._routes:
            if route_method == method and pattern.match(path):
                return action
        return None

    async def _respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        extra_headers: list[tuple[bytes, bytes]] = []
        try:
            status, body = await self._dispatch(scope, receive, extra_headers)
            if isinstance(body, Streamed):  # an export: sent as it is made
                headers = [(b"cache-control", b"no-store"), *extra_headers]
                await send_streamed(status, body, headers, receive, send)
                return
        except ApiError as exc:
            status, body = exc.status, {"error": exc.code, "message": exc.message, **exc.detail}
            extra_headers.extend(exc.headers)
        except StoreUnavailable as exc:
            # The detail names files, hosts and users: for the log, not the caller.
            self._log_store_error(exc)
            status = 503
            body = {"error": "store_unavailable", "message": "the store is unavailable; try again"}
        payload = b"" if body is None else orjson.dumps(body)
        headers = [(b"cache-control", b"no-store"), *extra_headers]
        if body is not None:
            headers.append((b"content-type", b"application/json"))
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    def _log_store_error(self, exc: StoreUnavailable) -> None:
        now = time.monotonic()
        if now - self._store_error_logged >= STORE_ERROR_LOG_SECONDS:
            self._store_error_logged = now
            log.warning("API request failed, store unavailable: %s", exc)

    async def _dispatch(
        self, scope: Scope, receive: Receive, extra_headers: list[tuple[bytes, bytes]]
    ) -> Response:
        path = scope["path"].removeprefix("/api/v1")
        method = scope["method"]
        methods = []
        for route_method, template, pattern, handler, action in self._routes:
            match = pattern.match(path)
            if match is None:
                continue
            scope.setdefault("route", "/api/v1" + template)  # a 405 counts under it
            methods.append(route_method)
            if route_method != method:
                continue
            scope["route"] = "/api/v1" + template
            principal: Principal | None = None
            if action != "public":
                principal = await self._auth.principal(scope["headers"])
                if principal is None:
                    raise ApiError(401, "unauthorized", "sign in: a bearer token or a session")
            if method not in ("GET", "HEAD"):
                if (method, template) in _OPENS_SESSION:
                    _check_browser_write(scope)
                elif (method, template) == ("DELETE", "/session"):
                    token, session = credentials(scope["headers"])
                    if session is not None and token is None:
                        self._check_cookie_write(scope, session)
                elif principal is not None and principal.session is not None:
                    self._check_cookie_write(scope, principal.session)
            if principal is not None and not allowed(action, principal.role, principal.scope):
                if action == "federation_write" and principal.federation and self._peer:
                    await self._peer.refused(
                        principal.name,
                        "not_granted",
                        f"the federation token {principal.name!r} is read-only: a region takes "
                        "commands from a hub only through a token made with "
                        "`z4j federation token create --allow-commands`",
                        detail={"action": action, "role": principal.role, "scope": None},
                    )
                how = f" through a {principal.scope}-scoped token" if principal.scope else ""
                raise ApiError(
                    403,
                    "forbidden",
                    f"{principal.actor} ({principal.role}{how}) may not take the "
                    f"{action!r} action of {method} {template}",
                    detail={"action": action, "role": principal.role, "scope": principal.scope},
                )
            client = scope.get("client")
            request = Request(
                method=method,
                query=parse_query(scope.get("query_string", b"")),
                params=match.groupdict(),
                body=await read_body(receive),
                headers=scope["headers"],
                source=str(client[0]) if client else "unknown",
                actor="anonymous" if principal is None else principal.actor,
                principal=principal,
            )
            if principal is not None:
                check_narrowed(principal, method, template)
            status, body = await handler(request)
            secure = scope.get("scheme") == "https"
            if (method, template) in _OPENS_SESSION and isinstance(body, dict):
                max_age = int(self._auth.session_seconds)
                extra_headers.append(
                    (b"set-cookie", _cookie(body.pop("session"), max_age=max_age, secure=secure))
                )
                extra_headers.append(
                    (
                        b"set-cookie",
                        _csrf_cookie(body["csrf_token"], max_age=max_age, secure=secure),
                    )
                )
            elif (method, template) == ("DELETE", "/session"):
                extra_headers.append((b"set-cookie", _cookie("", max_age=0, secure=secure)))
                extra_headers.append((b"set-cookie", _csrf_cookie("", max_age=0, secure=secure)))
            return status, body
        if methods:
            raise ApiError(405, "method_not_allowed", f"use {' or '.join(sorted(set(methods)))}")
        raise ApiError(404, "not_found", f"no route for {scope['path']}")

    # -- routes ------------------------------------------------------------------------

    async def _openapi(self, request: Request) -> Response:
        return 200, OPENAPI

    def _check_cookie_write(self, scope: Scope, session: str) -> None:
        _check_browser_write(scope)
        if not self._auth.csrf_matches(session, header(scope["headers"], CSRF_HEADER)):
            raise ApiError(
                403,
                "csrf",
                "a request signed in by the session cookie needs the session's "
                "X-CSRF-Token header (see the z4j_csrf cookie)",
            )

    async def _projects(self, request: Request) -> Response:
        projects = await self._store.list_projects()
        return 200, page([to_json(p) for p in projects if sees(request, p.id)], None)

    async def _agents(self, request: Request) -> Response:
        project_id = None
        if "project" in request.query:
            check_text(request.query["project"])
            project = await self._store.find_project(request.query["project"])
            if project is None:
                raise ApiError(404, "not_found", f"no project {request.query['project']!r}")
            check_project(request, project.id, request.query["project"])
            project_id = project.id
        items = await agent_list(self._store, self._clock(), project_id, lambda p: sees(request, p))
        return 200, page(items, None)

    async def _agent(self, request: Request) -> Response:
        agent_id = uuid_param(request.params["id"], "id")
        agent = await check_agent(self._store, request, agent_id)
        if agent is None:
            raise ApiError(404, "not_found", f"no agent {agent_id}")
        project = await self._store.find_project(str(agent.project_id))
        workers = [to_json(w) for w in await self._store.list_workers(agent.id)]
        grace = (await self._store.token_graces(now=self._clock())).get(agent.id)
        return 200, _agent_json(agent, None if project is None else project.name, workers, grace)

    async def _instances(self, request: Request) -> Response:
        return 200, page([to_json(i) for i in await self._store.list_instances()], None)

    async def _list_commands(self, request: Request) -> Response:
        q = request.query
        limit = limit_param(q)
        state = q.get("state")
        if state is not None and state not in COMMAND_STATES:
            raise ApiError(400, "bad_request", f"state must be one of {', '.join(COMMAND_STATES)}")
        agent_id = uuid_param(q["agent_id"], "agent_id") if "agent_id" in q else None
        if agent_id is not None:
            await check_agent(self._store, request, agent_id)
        records = await self._store.list_commands(
            agent_id=agent_id,
            state=state,
            before=_command_cursor(q["cursor"]) if "cursor" in q else None,
            limit=limit,
            projects=projects_of(request),
        )
        cursor = None
        if len(records) == limit:
            cursor = f"{records[-1].created_at!r}_{records[-1].id}"
        return 200, page([to_json(c) for c in records], cursor)

    async def _create_command(self, request: Request) -> Response:
        fields = command_fields(request.json_object())
        if projects_of(request) is not None:
            await self._check_command_target(request, fields.agent, fields.project)
        try:
            record = await self._commands.send(
                fields.agent,
                fields.action,
                project=fields.project,
                target=fields.target,
                parameters=fields.parameters,
                timeout_seconds=fields.timeout_seconds,
                issued_by=request.actor,
            )
        except CommandError as exc:
            raise command_error(exc) from None
        return 201, to_json(record)

    async def _check_command_target(
        self, request: Request, agent: str, project: str | None
    ) -> None:
        """404 unless the agent a new command names (as Commands.send finds
        it) is of one of the caller's projects."""
        check_text(agent)
        project_id = None
        if project is not None:
            check_text(project)
            found = await self._store.find_project(project)
            if found is None:
                raise ApiError(404, "not_found", f"no project {project!r}")
            check_project(request, found.id, project)
            project_id = found.id
        target = await self._store.find_agent(agent, project_id)
        if target is None or not sees(request, target.project_id):
            raise ApiError(404, "not_found", f"no agent {agent!r}")

    async def _seen_command(self, request: Request) -> tuple[uuid.UUID, CommandRecord | None]:
        """The command the path names (None: there is none), 404 if another project's."""
        command_id = uuid_param(request.params["id"], "id")
        record = await self._store.get_command(command_id)
        if record is not None and not sees(request, record.project_id):
            raise ApiError(404, "not_found", f"no command {command_id}")
        return command_id, record

    async def _get_command(self, request: Request) -> Response:
        command_id, record = await self._seen_command(request)
        if record is None:
            raise ApiError(404, "not_found", f"no command {command_id}")
        return 200, to_json(record)

    async def _cancel_command(self, request: Request) -> Response:
        command_id, _ = await self._seen_command(request)
        record = await self._commands.cancel(command_id, actor=request.actor)
        if record is not None:
            return 200, to_json(record)
        current = await self._store.get_command(command_id)
        if current is None:
            raise ApiError(404, "not_found", f"no command {command_id}")
        raise ApiError(409, "already_final", f"command {command_id} is {current.state}")

    async def _audit(self, request: Request) -> Response:
        q = request.query
        limit = limit_param(q)
        before = None
        if "cursor" in q:
            before = id_cursor_param(q["cursor"])
        query = audit_filter(q)
        records = await self._store.list_audit(before_id=before, limit=limit, query=query)
        cursor = str(records[-1].id) if len(records) == limit else None
        return 200, page([to_json(a) for a in records], cursor)


# -- input ---------------------------------------------------------------------------------


def _command_cursor(raw: str) -> tuple[float, uuid.UUID]:
    at, _, last = raw.partition("_")
    try:
        return epoch(float(at), "cursor"), uuid.UUID(last)
    except ValueError:
        raise ApiError(400, "bad_request", "cursor: as given by the last page") from None


def _check_browser_write(scope: Scope) -> None:
    """A state-changing request a browser may have been made to send: it must
    have a JSON content type (a foreign form cannot send that without a CORS
    preflight, which we never answer) and no foreign ``Origin``."""
    headers = scope["headers"]
    content_type = header(headers, b"content-type") or ""
    if content_type.partition(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "unsupported_media_type", "send Content-Type: application/json")
    origin = header(headers, b"origin")
    if origin is not None and not same_origin(origin, header(headers, b"host")):
        raise ApiError(403, "foreign_origin", "requests from another origin are refused")


def _cookie(session: str, *, max_age: int, secure: bool = False) -> bytes:
    # Served over TLS, the cookie is Secure: never sent back over plain HTTP.
    # Plain HTTP (loopback by default) cannot set Secure cookies at all.
    flags = "; Secure" if secure else ""
    return (
        f"{SESSION_COOKIE}={session}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{flags}"
    ).encode()


def _csrf_cookie(csrf: str, *, max_age: int, secure: bool = False) -> bytes:
    # Not HttpOnly: the dashboard's script reads it to send X-CSRF-Token.
    # Other origins cannot read it; it is useless without the session cookie.
    flags = "; Secure" if secure else ""
    return (f"{CSRF_COOKIE}={csrf}; Path=/; SameSite=Strict; Max-Age={max_age}{flags}").encode()
