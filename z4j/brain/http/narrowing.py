"""Project narrowing: what a user limited to some projects may reach.

A user's role says which actions they may take; their projects (if set)
say where. Narrowing is enforced route by route, and a route that does not
yet know how to keep to the caller's projects is refused to narrowed
callers outright (403 ``narrowed``) rather than showing everything: a new
route is closed to them until it is added here.

What a narrowed caller may reach:
- their own account (``public`` and ``self`` routes);
- ``GET /projects`` and ``GET /agents``: filtered by the handlers (api.py);
- one agent, and the events and commands of one agent (``?agent_id=``),
  when that agent is in one of their projects;
- one command (and its cancel), when its project is one of theirs.
Anything else of another project answers 404, as if it did not exist.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Final

from ...store.base import Store
from ._request import ApiError, uuid_param
from .policy import ROUTES
from .principal import Principal

__all__ = ["NARROWABLE", "check_narrowed"]

# Routes a narrowed caller may use beyond their own account's.
NARROWABLE: Final[frozenset[tuple[str, str]]] = frozenset(
    {
        ("GET", "/projects"),
        ("GET", "/agents"),
        ("GET", "/agents/{id}"),
        ("GET", "/events"),
        ("GET", "/commands"),
        ("GET", "/commands/{id}"),
        ("POST", "/commands/{id}/cancel"),
    }
)
_BY_AGENT_QUERY: Final = frozenset({("GET", "/events"), ("GET", "/commands")})
_BY_COMMAND: Final = frozenset({("GET", "/commands/{id}"), ("POST", "/commands/{id}/cancel")})


async def check_narrowed(
    store: Store,
    principal: Principal,
    method: str,
    template: str,
    params: Mapping[str, str],
    query: Mapping[str, str],
) -> None:
    """Refuse (403) or hide (404) what ``principal``'s projects do not cover."""
    if principal.projects is None or ROUTES.get((method, template)) in ("public", "self"):
        return
    if (method, template) not in NARROWABLE:
        raise ApiError(
            403,
            "narrowed",
            f"{method} {template} is not available to a user narrowed to projects",
        )
    if (method, template) == ("GET", "/agents/{id}"):
        await _agent_seen(store, principal, uuid_param(params["id"], "id"))
    elif (method, template) in _BY_AGENT_QUERY:
        if "agent_id" not in query:
            raise ApiError(
                400, "agent_required", "a user narrowed to projects gives ?agent_id= here"
            )
        await _agent_seen(store, principal, uuid_param(query["agent_id"], "agent_id"))
    elif (method, template) in _BY_COMMAND:
        command_id = uuid_param(params["id"], "id")
        record = await store.get_command(command_id)
        if record is None or not principal.sees(record.project_id):
            raise ApiError(404, "not_found", f"no command {command_id}")


async def _agent_seen(store: Store, principal: Principal, agent_id: uuid.UUID) -> None:
    agent = await store.find_agent(str(agent_id))
    if agent is None or not principal.sees(agent.project_id):
        raise ApiError(404, "not_found", f"no agent {agent_id}")
