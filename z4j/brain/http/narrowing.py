"""Project narrowing: what a user limited to some projects may reach.

A user's role says which actions they may take; their projects (if set)
say where. A route lets a narrowed caller through only once it has been
taught to keep to their projects (`NARROWABLE`); any other route answers
them ``403 narrowed`` rather than show more, so a new route is closed to
them until it is added here and its handler narrowed. Routes that are
brain-wide by nature (users, others' tokens, provisioning, instances,
the audit log) are never added.

How a taught route keeps to the caller's projects (the handlers call the
helpers below, which do nothing for an unnarrowed caller):

- a list or search is restricted to their projects in the store's query
  (`narrowed`, or a ``projects`` argument from `projects_of`); a project or
  agent the caller names as a filter must be theirs (`check_project`,
  `check_agent`);
- a route about one resource (an agent, a command, a task, a schedule, an
  OpAMP agent, a rollout, a dead letter) answers 404 when its project is
  not theirs, as if it did not exist; where an id names a resource in
  several projects, only theirs are considered, so an ambiguity never
  names another project;
- an action checks its target the same way before it acts.

Their own account (``public`` and ``self`` routes) is theirs whatever the
projects; an admin narrowed to projects is not an admin of other users'
tokens (accounts_api.py). The dashboard socket sends them only their
projects' messages (dashboard_hub.py).
"""

from __future__ import annotations

import uuid
from typing import Final, TypeVar

import attrs

from ...store.base import Agent, EventFilter, ScheduleFilter, Store, TaskFilter
from ._request import ApiError, Request
from .policy import ROUTES
from .principal import Principal

__all__ = [
    "NARROWABLE",
    "check_agent",
    "check_narrowed",
    "check_project",
    "narrowed",
    "projects_of",
    "sees",
]

# Routes a narrowed caller may use beyond their own account's: each handler
# keeps to the caller's projects as the docstring says.
NARROWABLE: Final[frozenset[tuple[str, str]]] = frozenset(
    {
        ("GET", "/projects"),
        ("GET", "/agents"),
        ("GET", "/agents/{id}"),
        ("GET", "/events"),
        ("GET", "/events/histogram"),
        ("GET", "/events/export"),
        ("GET", "/commands"),
        ("POST", "/commands"),
        ("GET", "/commands/{id}"),
        ("POST", "/commands/{id}/cancel"),
        ("GET", "/tasks"),
        ("POST", "/tasks/retry"),
        ("GET", "/tasks/names"),
        ("GET", "/tasks/{engine}/{task_id}"),
        ("POST", "/tasks/{engine}/{task_id}/retry"),
        ("POST", "/tasks/{engine}/{task_id}/cancel"),
        ("GET", "/queues"),
        ("POST", "/queues/{engine}/{queue}/purge"),
        ("GET", "/queues/{engine}/{queue}/dead-letters"),
        ("POST", "/queues/{engine}/{queue}/dead-letters/{task_id}/requeue"),
        ("GET", "/engine-workers"),
        ("POST", "/engine-workers/{engine}/{worker}/{action}"),
        ("GET", "/schedules"),
        ("POST", "/schedules/resync"),
        ("GET", "/schedules/{scheduler}/{source_key}"),
        ("POST", "/schedules/{scheduler}/{source_key}/enable"),
        ("POST", "/schedules/{scheduler}/{source_key}/disable"),
        ("POST", "/schedules/{scheduler}/{source_key}/trigger"),
        ("POST", "/schedules/{scheduler}/{source_key}/delete"),
        ("GET", "/dead-letters"),
        ("POST", "/dead-letters/requeue"),
        ("POST", "/dead-letters/discard"),
        ("GET", "/dead-letters/{id}"),
        ("POST", "/dead-letters/{id}/requeue"),
        ("POST", "/dead-letters/{id}/discard"),
        ("GET", "/task-registry"),
        ("GET", "/opamp/agents"),
        ("GET", "/opamp/agents/{instance_uid}"),
        ("GET", "/opamp/agents/{instance_uid}/config"),
        ("PUT", "/opamp/agents/{instance_uid}/config"),
        ("DELETE", "/opamp/agents/{instance_uid}/config"),
        ("GET", "/opamp/agents/{instance_uid}/history"),
        ("GET", "/opamp/rollouts"),
        ("POST", "/opamp/rollouts"),
        ("GET", "/opamp/rollouts/{id}"),
        ("POST", "/opamp/rollouts/{id}/halt"),
        ("POST", "/opamp/rollouts/{id}/resume"),
        ("POST", "/opamp/rollouts/{id}/cancel"),
    }
)

F = TypeVar("F", EventFilter, TaskFilter, ScheduleFilter)


def check_narrowed(principal: Principal, method: str, template: str) -> None:
    """Refuse (403 ``narrowed``) a route not taught to keep to ``principal``'s projects."""
    if principal.projects is None or ROUTES.get((method, template)) in ("public", "self"):
        return
    if (method, template) not in NARROWABLE:
        raise ApiError(
            403,
            "narrowed",
            f"{method} {template} is not available to a user narrowed to projects",
        )


def projects_of(request: Request) -> frozenset[uuid.UUID] | None:
    """The projects the caller is narrowed to; None: every project."""
    return None if request.principal is None else request.principal.projects


def sees(request: Request, project_id: uuid.UUID | None) -> bool:
    """Is the project one of the caller's (None: a thing of no project, such
    as an ingest payload, is seen only by an unnarrowed caller)?"""
    return request.principal is None or request.principal.sees(project_id)


def check_project(request: Request, project_id: uuid.UUID, shown_as: str | None = None) -> None:
    """404 unless the caller sees the project (named as they named it: ``shown_as``)."""
    if not sees(request, project_id):
        name = shown_as if shown_as is not None else str(project_id)
        raise ApiError(404, "not_found", f"no project {name!r}")


async def check_agent(store: Store, request: Request, agent_id: uuid.UUID) -> Agent | None:
    """The agent, or 404 when it is another project's; None (no check
    made) when it does not exist: the handler answers that as it does."""
    agent = await store.find_agent(str(agent_id))
    if agent is not None and not sees(request, agent.project_id):
        raise ApiError(404, "not_found", f"no agent {agent_id}")
    return agent


def narrowed(request: Request, query: F) -> F:
    """``query`` kept to the caller's projects: a project it names must be
    theirs (else 404), and it matches only their projects' rows."""
    projects = projects_of(request)
    if projects is None:
        return query
    if query.project_id is not None:
        check_project(request, query.project_id)
    return attrs.evolve(query, projects=projects)
