"""A command as an API body gives it, checked; and a refusal to mint it, as a status.

Shared by ``POST /api/v1/commands`` and the federation's cross-region
command (a peer mints what a hub forwards), so both check alike.
"""

from __future__ import annotations

from typing import Any

import attrs

from ..links import CommandError
from ._request import ApiError
from .limits import COMMAND_ACTION_CHARS, COMMAND_TIMEOUT_SECONDS

__all__ = ["CommandFields", "command_error", "command_fields"]


@attrs.frozen(kw_only=True)
class CommandFields:
    agent: str
    action: str
    project: str | None
    target: dict[str, Any]
    parameters: dict[str, Any]
    timeout_seconds: int


def command_fields(body: dict[str, Any]) -> CommandFields:
    """The command ``body`` asks for; a 400 `ApiError` names what is wrong."""
    agent, action = body.get("agent"), body.get("action")
    if not isinstance(agent, str) or not agent:
        raise ApiError(400, "bad_request", "agent: an agent id (or name, with project)")
    if not isinstance(action, str) or not 0 < len(action) <= COMMAND_ACTION_CHARS:
        raise ApiError(
            400, "bad_request", f"action: a string of 1 to {COMMAND_ACTION_CHARS} characters"
        )
    project = body.get("project")
    target = body.get("target", {})
    parameters = body.get("parameters", {})
    timeout = body.get("timeout_seconds", 60)
    if project is not None and not isinstance(project, str):
        raise ApiError(400, "bad_request", "project: a project name or id")
    if not isinstance(target, dict) or not isinstance(parameters, dict):
        raise ApiError(400, "bad_request", "target and parameters must be JSON objects")
    low, high = COMMAND_TIMEOUT_SECONDS
    if not isinstance(timeout, int) or isinstance(timeout, bool) or not low <= timeout <= high:
        raise ApiError(400, "bad_request", f"timeout_seconds: an integer from {low} to {high}")
    return CommandFields(
        agent=agent,
        action=action,
        project=project,
        target=target,
        parameters=parameters,
        timeout_seconds=timeout,
    )


def command_error(exc: CommandError) -> ApiError:
    """The API's answer to a command the service would not mint."""
    message = str(exc)
    if message.startswith(("no agent", "no project")):
        return ApiError(404, "not_found", message)
    if "revoked" in message:
        return ApiError(409, "agent_revoked", message)
    return ApiError(400, "bad_request", message)
