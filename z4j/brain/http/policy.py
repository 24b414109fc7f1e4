"""Who may do what: the one table of actions by route, and of roles by action.

Every API route names one action; a caller may take it when their role
allows it and, for a personal token, when the token's scope does too. A
route missing from ``ROUTES`` cannot be registered (api.py asks
``action_of`` at start), so a new route without a policy fails at once,
and tests/test_policy.py walks the OpenAPI document against this table
with every role.

Actions, from least to most:
- ``public``: no sign-in (the OpenAPI document, sign-in itself);
- ``self``: any signed-in caller, about themselves (their own tokens);
- ``read``: look at anything in the caller's projects;
- ``operate``: change what runs (commands, retries, purges, configurations,
  rollouts, dead letters);
- ``admin``: change who may do things and what exists (users, tokens of
  others, projects, agents, audit).

Two more actions belong to no user's role: the federation peer routes a
peer region's hub calls with a federation token (`z4j federation token
create`): ``federation`` (read this region) and ``federation_write`` (send a
command here, only for a token made with ``--allow-commands``). A
federation token takes no other action (but ``public``, open to anyone),
and no user takes these.
"""

from __future__ import annotations

from typing import Final, Literal

__all__ = [
    "ACTIONS",
    "DASHBOARD_ACTION",
    "ROLES",
    "ROUTES",
    "SCOPES",
    "USER_ACTIONS",
    "Action",
    "action_of",
    "allowed",
]

Action = Literal["public", "self", "read", "operate", "admin", "federation", "federation_write"]
USER_ACTIONS: Final[tuple[Action, ...]] = ("public", "self", "read", "operate", "admin")
ACTIONS: Final[tuple[Action, ...]] = (*USER_ACTIONS, "federation", "federation_write")

# Role -> the actions it may take. The federation roles are tokens', never users'.
ROLES: Final[dict[str, frozenset[str]]] = {
    "viewer": frozenset({"public", "self", "read"}),
    "operator": frozenset({"public", "self", "read", "operate"}),
    "admin": frozenset(USER_ACTIONS),
    "federation": frozenset({"public", "federation"}),
    "federation_commands": frozenset({"public", "federation", "federation_write"}),
}

# A personal token's scope -> the actions it may take (narrowed further by its owner's role).
SCOPES: Final[dict[str, frozenset[str]]] = {
    "read": frozenset({"public", "self", "read"}),
    "commands": frozenset({"public", "self", "read", "operate"}),
    "admin": frozenset(USER_ACTIONS),
}

# (method, path template under /api/v1) -> action. Keep in the order of the API.
ROUTES: Final[dict[tuple[str, str], Action]] = {
    ("GET", "/openapi.json"): "public",
    # accounts: sign-in, first-run setup, users, personal tokens (accounts_api.py)
    ("POST", "/session"): "public",
    ("GET", "/session"): "self",
    ("DELETE", "/session"): "public",
    ("DELETE", "/sessions"): "self",
    ("GET", "/setup"): "public",
    ("POST", "/setup"): "public",
    ("GET", "/users"): "admin",
    ("POST", "/users"): "admin",
    ("POST", "/users/{id}/disable"): "admin",
    ("POST", "/users/{id}/enable"): "admin",
    ("POST", "/users/{id}/password"): "admin",
    ("GET", "/tokens"): "self",
    ("POST", "/tokens"): "self",
    ("DELETE", "/tokens/{id}"): "self",
    ("GET", "/projects"): "read",
    ("GET", "/agents"): "read",
    ("GET", "/agents/{id}"): "read",
    # provisioning
    ("POST", "/projects"): "admin",
    ("POST", "/projects/{id}/archive"): "admin",
    ("POST", "/projects/{id}/rotate-secret"): "admin",
    ("POST", "/agents"): "admin",
    ("POST", "/agents/{id}/revoke"): "admin",
    ("POST", "/agents/{id}/rotate-token"): "admin",
    ("GET", "/instances"): "read",
    ("GET", "/events"): "read",
    ("GET", "/events/histogram"): "read",
    ("GET", "/events/export"): "read",
    ("GET", "/commands"): "read",
    ("POST", "/commands"): "operate",
    ("GET", "/commands/{id}"): "read",
    ("POST", "/commands/{id}/cancel"): "operate",
    ("GET", "/audit"): "admin",
    # tasks
    ("GET", "/tasks"): "read",
    ("POST", "/tasks/retry"): "operate",
    ("GET", "/tasks/names"): "read",
    ("GET", "/tasks/{engine}/{task_id}"): "read",
    ("POST", "/tasks/{engine}/{task_id}/retry"): "operate",
    ("POST", "/tasks/{engine}/{task_id}/cancel"): "operate",
    # queues (listing dead letters sends the agent a command)
    ("GET", "/queues"): "read",
    ("POST", "/queues/{engine}/{queue}/purge"): "operate",
    ("GET", "/queues/{engine}/{queue}/dead-letters"): "operate",
    ("POST", "/queues/{engine}/{queue}/dead-letters/{task_id}/requeue"): "operate",
    # engine workers
    ("GET", "/engine-workers"): "read",
    ("POST", "/engine-workers/{engine}/{worker}/{action}"): "operate",
    # schedules
    ("GET", "/schedules"): "read",
    ("POST", "/schedules/resync"): "operate",
    ("GET", "/schedules/{scheduler}/{source_key}"): "read",
    ("POST", "/schedules/{scheduler}/{source_key}/enable"): "operate",
    ("POST", "/schedules/{scheduler}/{source_key}/disable"): "operate",
    ("POST", "/schedules/{scheduler}/{source_key}/trigger"): "operate",
    ("POST", "/schedules/{scheduler}/{source_key}/delete"): "operate",
    # this instance's buffer dead letters, and the task registry
    ("GET", "/dead-letters"): "read",
    ("POST", "/dead-letters/requeue"): "operate",
    ("POST", "/dead-letters/discard"): "operate",
    ("GET", "/dead-letters/{id}"): "read",
    ("POST", "/dead-letters/{id}/requeue"): "operate",
    ("POST", "/dead-letters/{id}/discard"): "operate",
    ("GET", "/task-registry"): "read",
    # OpAMP fleet
    ("GET", "/opamp/agents"): "read",
    ("GET", "/opamp/agents/{instance_uid}"): "read",
    ("GET", "/opamp/agents/{instance_uid}/config"): "read",
    ("PUT", "/opamp/agents/{instance_uid}/config"): "operate",
    ("DELETE", "/opamp/agents/{instance_uid}/config"): "operate",
    ("GET", "/opamp/agents/{instance_uid}/history"): "read",
    ("GET", "/opamp/rollouts"): "read",
    ("POST", "/opamp/rollouts"): "operate",
    ("GET", "/opamp/rollouts/{id}"): "read",
    ("POST", "/opamp/rollouts/{id}/halt"): "operate",
    ("POST", "/opamp/rollouts/{id}/resume"): "operate",
    ("POST", "/opamp/rollouts/{id}/cancel"): "operate",
    # federation, the hub's side: every region's view (federation_api.py)
    ("GET", "/federation/regions"): "read",
    ("GET", "/federation/agents"): "read",
    ("GET", "/federation/events"): "read",
    ("GET", "/federation/commands"): "read",
    ("GET", "/federation/audit"): "admin",
    ("POST", "/federation/regions/{name}/commands"): "operate",
    # federation, a region's side: what a hub's federation token may call
    ("GET", "/federation/peer/summary"): "federation",
    ("GET", "/federation/peer/agents"): "federation",
    ("GET", "/federation/peer/events"): "federation",
    ("GET", "/federation/peer/commands"): "federation",
    ("GET", "/federation/peer/audit"): "federation",
    ("POST", "/federation/peer/commands"): "federation_write",
}


# The dashboard socket (/ws/dashboard) streams what the read routes show.
DASHBOARD_ACTION: Final[Action] = "read"


def action_of(method: str, path: str) -> Action:
    """The action a route takes; KeyError names a route the table forgot."""
    try:
        return ROUTES[(method, path)]
    except KeyError:
        raise KeyError(
            f"no policy for {method} {path}: add it to z4j/brain/http/policy.py"
        ) from None


def allowed(action: str, role: str, scope: str | None = None) -> bool:
    """Whether a caller of ``role`` (through a token of ``scope``, if any) may take ``action``."""
    if action not in ROLES.get(role, ()):
        return False
    return scope is None or action in SCOPES.get(scope, ())
