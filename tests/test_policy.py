"""The role by route walk: every operation of the OpenAPI document, with every
role and every personal token scope, allowed or refused (403) exactly as
policy.py says; the dashboard socket too.

A route the document lists without a policy row fails here (and an API
route without one cannot even be registered: api.py asks ``action_of``).
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import attrs
import pytest
import trio
from test_api import call
from test_dashboard_hub import viewer
from wsproto.events import CloseConnection

from z4j.brain.http.api import Api
from z4j.brain.http.openapi import OPENAPI
from z4j.brain.http.policy import ACTIONS, DASHBOARD_ACTION, ROLES, ROUTES, SCOPES, allowed
from z4j.config import Config
from z4j.testing.agents import admin_token
from z4j.testing.brain import running_brain
from z4j.testing.federation import federation_token

PASSWORD = "correct horse battery"


def _operations() -> list[tuple[str, str]]:
    return [
        (method.upper(), path)
        for path, operations in OPENAPI["paths"].items()
        for method in operations
        if method in ("get", "post", "put", "patch", "delete")
    ]


def test_every_documented_route_has_a_policy_row_and_every_row_a_route() -> None:
    documented = set(_operations())
    missing = sorted(documented - set(ROUTES))
    assert not missing, f"no policy row in z4j/brain/http/policy.py for {missing}"
    assert set(ROUTES.values()) <= set(ACTIONS)


def test_the_api_registers_exactly_the_policy_table() -> None:
    from types import SimpleNamespace
    from typing import cast

    from z4j.brain.commands import Commands
    from z4j.brain.federation.client import FederationClient
    from z4j.brain.http.auth import Auth
    from z4j.brain.http.dead_letters_api import DeadLetterRoutes
    from z4j.brain.http.federation_api import FederationRoutes
    from z4j.brain.http.federation_peer_api import PeerRoutes
    from z4j.brain.http.provisioning_api import ProvisioningRoutes
    from z4j.buffer import Buffer
    from z4j.stats import FederationStats
    from z4j.store.base import Store

    store = cast(Store, None)
    # Only the route table is read: the routes' objects are never called here.
    buffer = cast(Buffer, SimpleNamespace(buffer_id=uuid.uuid4()))
    stats = FederationStats()
    peer = PeerRoutes(store, cast(Commands, None), stats, region="here")
    client = FederationClient(
        [], stats, region="here", timeout_seconds=1, cache_seconds=0, max_response_bytes=1
    )
    api = Api(
        store,
        cast(Commands, None),
        Auth(store, b"m" * 32),
        dead_letters=DeadLetterRoutes(store, buffer, instance_id=uuid.uuid4(), name="i"),
        provisioning=ProvisioningRoutes(store, b"m" * 32),
        peer=peer,
        federation=FederationRoutes(client, peer, store),
    )
    registered = {(method, template) for method, template, *_ in api._routes}
    assert registered == set(_operations()), "a route the OpenAPI document lacks, or not served"
    assert registered <= set(ROUTES)


def test_scopes_and_roles_only_narrow() -> None:
    # A scope never grants what its owner's role lacks: allowed() needs both.
    for role in ROLES:
        for scope in SCOPES:
            for action in ACTIONS:
                assert allowed(action, role, scope) == (
                    action in ROLES[role] and action in SCOPES[scope]
                )


@attrs.frozen
class Caller:
    label: str
    role: str
    scope: str | None
    token: str | None = None
    cookie: str | None = None
    csrf: str | None = None

    def headers(self) -> dict[str, str]:
        return {"X-CSRF-Token": self.csrf} if self.csrf else {}


def _fill(path: str) -> str:
    return re.sub(r"\{[^}]+\}", lambda m: str(uuid.uuid4()) if m[0] == "{id}" else "x", path)


async def _callers(
    http: tuple[str, int], legacy: str, federation: dict[str, str] | None = None
) -> list[Caller]:
    """A password session for each role, and personal tokens of every scope
    each role may make, plus the legacy admin token (and ``federation``
    tokens, by role, when given)."""
    callers = [Caller("legacy admin token", "admin", None, token=legacy)]
    for role, token in (federation or {}).items():
        callers.append(Caller(f"{role} token", role, None, token=token))
    for role in ("viewer", "operator", "admin"):
        name = f"{role}-{uuid.uuid4().hex[:6]}"
        status, _, body = await call(
            http,
            "POST",
            "/api/v1/users",
            token=legacy,
            body={"name": name, "password": PASSWORD, "role": role},
        )
        assert status == 201, body
        status, headers, body = await call(
            http, "POST", "/api/v1/session", body={"name": name, "password": PASSWORD}
        )
        assert status == 200, body
        cookie, csrf = headers["set-cookie"].split(";")[0], body["csrf_token"]
        callers.append(Caller(f"{role} session", role, None, cookie=cookie, csrf=csrf))
        for scope in SCOPES:
            status, _, body = await call(
                http,
                "POST",
                "/api/v1/tokens",
                cookie=cookie,
                headers={"X-CSRF-Token": csrf},
                body={"name": f"t-{scope}", "scope": scope},
            )
            if not SCOPES[scope] <= ROLES[role]:
                assert status == 403, (role, scope, body)  # no token beyond the role
                continue
            assert status == 201, body
            callers.append(Caller(f"{role} {scope} token", role, scope, token=body["token"]))
    return callers


async def test_every_route_with_every_role_and_scope_is_allowed_or_refused_per_policy(
    config: Config,
) -> None:
    legacy = await admin_token(config)
    federation = {
        "federation": await federation_token(config, "hub-read"),
        "federation_commands": await federation_token(config, "hub-cmd", allow_commands=True),
    }
    # Signing a caller out ends what the next requests need: those go last.
    last = [("DELETE", "/sessions"), ("DELETE", "/session")]
    operations = sorted(_operations(), key=lambda op: last.index(op) + 1 if op in last else 0)
    with trio.fail_after(120):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            callers = await _callers(http, legacy, federation)
            assert {c.scope for c in callers} >= set(SCOPES) and len(callers) == 1 + 2 + 3 + 6
            assert {c.role for c in callers} == set(ROLES)
            refused_somewhere = 0
            for caller in callers:
                for method, template in operations:
                    action = ROUTES[(method, template)]
                    body = {} if method in ("POST", "PUT", "PATCH") else None
                    status, _, answer = await call(
                        http,
                        method,
                        "/api/v1" + _fill(template),
                        token=caller.token,
                        cookie=caller.cookie,
                        headers={**caller.headers(), "Content-Type": "application/json"},
                        body=body,
                    )
                    where = f"{caller.label}: {method} {template} ({action}) -> {status} {answer}"
                    assert status != 401 or action == "public", where  # signed in
                    # The policy's refusal names the action (a handler's own 403s do not).
                    forbidden = status == 403 and answer.get("action") is not None
                    if allowed(action, caller.role, caller.scope):
                        assert not forbidden, where
                        assert status < 500 or status == 504, where
                    else:
                        assert forbidden, where
                        assert answer["action"] == action
                        refused_somewhere += 1
            assert refused_somewhere > 0


@pytest.mark.parametrize("store_kind", ["sqlite"], indirect=True)
async def test_the_dashboard_socket_follows_the_policy_for_every_caller(config: Config) -> None:
    legacy = await admin_token(config)
    federation = {
        "federation": await federation_token(config, "hub-read"),
        "federation_commands": await federation_token(config, "hub-cmd", allow_commands=True),
    }
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            for caller in await _callers(http, legacy, federation):
                session = None if caller.cookie is None else caller.cookie.split("=", 1)[1]
                origin = None if session is None else "http://x"
                opened: Any = viewer(
                    http, caller.token, origin=origin, session=session, csrf=caller.csrf
                )
                async with opened as v:
                    first = await v.next_event()
                    if allowed(DASHBOARD_ACTION, caller.role, caller.scope):
                        assert not isinstance(first, CloseConnection), caller.label
                    else:  # a federation token: the feed is no federation route
                        assert caller.role.startswith("federation"), caller
                        assert isinstance(first, CloseConnection), caller.label
                        assert first.code == 4403, (caller.label, first)
