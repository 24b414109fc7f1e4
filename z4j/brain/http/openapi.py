"""The OpenAPI 3.0 document of the REST API (api.py), served at /api/v1/openapi.json.

The operations, parameters and wording are written here by hand, next to
the routes they describe; the schemas of the stored resources (Project,
Agent, Worker, Instance, Event, Command, Audit) are derived from their records by
resources.py, so they cannot drift from the JSON the routes send.
tests/test_api.py runs schemathesis against it, so a route that answers
off this document fails.
The rules for cookie-signed writes (CSRF) and the caps on event listings
are told here too: API users read this document, not api.py.
"""

from __future__ import annotations

from typing import Any

from ..._version import __version__
from ...store.base import COMMAND_STATES
from .resources import RESOURCES, component

__all__ = ["OPENAPI"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


STRING = {"type": "string"}
TIME = {"type": "string", "format": "date-time"}
UUID = {"type": "string", "format": "uuid"}
OBJECT = {"type": "object", "additionalProperties": True}
ANY: dict[str, Any] = {}


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def _page(item: str) -> dict[str, Any]:
    return _object(
        {"items": {"type": "array", "items": _ref(item)}, "next_cursor": _nullable(STRING)}
    )


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    meaning = {
        400: "Bad input",
        401: "Not signed in",
        403: "Refused: a foreign Origin, or a cookie-signed write without its X-CSRF-Token",
        404: "Not found",
        405: "Method not allowed",
        409: "Conflict with the current state",
        413: "Body too large",
        415: "Not JSON: a browser-style write needs Content-Type: application/json",
        429: "Too many failed sign-ins from this address: wait the Retry-After seconds",
        503: "The store is not reachable; try again",
    }
    responses: dict[str, Any] = {
        str(s): {"description": meaning[s], **_json(_ref("Error"))} for s in statuses
    }
    if 429 in statuses:
        responses["429"]["headers"] = {
            "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}
        }
    return responses


def _operation(
    operation_id: str,
    summary: str,
    ok: tuple[int, dict[str, Any] | None],
    *,
    errors: tuple[int, ...] = (401,),
    parameters: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    public: bool = False,
    links: dict[str, Any] | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    status, schema = ok
    success: dict[str, Any] = {"description": "OK", **(_json(schema) if schema else {})}
    if links:
        success["links"] = links
    operation: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "responses": {str(status): success, **_errors(*errors, *(() if public else (503,)))},
    }
    if description:
        operation["description"] = description
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = {"required": True, **_json(body)}
    if public:
        operation["security"] = []
    return operation


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


CSRF_HEADER = {
    "name": "X-CSRF-Token",
    "in": "header",
    "required": False,
    "schema": STRING,
    "description": "Required when signed in by the session cookie (not by a bearer token): "
    "the csrf_token from POST /session (also in the z4j_csrf cookie). Such requests also "
    "need Content-Type: application/json and no foreign Origin (else 403 or 415).",
}


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": UUID}


def _link(operation_id: str, pointer: str) -> dict[str, Any]:
    return {"operationId": operation_id, "parameters": {"id": f"$response.body#{pointer}"}}


FIRST_AGENT = {"getAgent": _link("getAgent", "/items/0/id")}
FIRST_COMMAND = {
    "getCommand": _link("getCommand", "/items/0/id"),
    "cancelCommand": _link("cancelCommand", "/items/0/id"),
}
NEW_COMMAND = {
    "getCommand": _link("getCommand", "/id"),
    "cancelCommand": _link("cancelCommand", "/id"),
}

LIMIT = _query(
    "limit", {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}, "page size"
)
CURSOR = _query("cursor", STRING, "next_cursor of the previous page")
COMMAND_STATE = {"type": "string", "enum": list(COMMAND_STATES)}

SCHEMAS: dict[str, Any] = {
    "Error": _object({"error": STRING, "message": STRING}),
    # Project, Agent, Worker, Instance, Event, Command, Audit: derived from their records.
    **{r.name: component(r) for r in RESOURCES.values()},
    "NewCommand": {
        "type": "object",
        "properties": {
            "agent": {
                "type": "string",
                "minLength": 1,
                "description": "agent id, or name with project",
            },
            "project": STRING,
            "action": {"type": "string", "minLength": 1, "maxLength": 200},
            "target": OBJECT,
            "parameters": OBJECT,
            "timeout_seconds": {"type": "integer", "minimum": 1, "maximum": 3600, "default": 60},
        },
        "required": ["agent", "action"],
    },
    "SignIn": {
        "type": "object",
        "properties": {"token": {"type": "string", "minLength": 1}},
        "required": ["token"],
    },
    "SignedIn": _object(
        {
            "csrf_token": {
                "type": "string",
                "description": "send as X-CSRF-Token on writes signed in by the session cookie",
            },
            "expires_in": {"type": "integer", "description": "seconds the session lasts"},
        }
    ),
}

EVENTS_DESCRIPTION = (
    "Each item's body is left out (null, body_truncated true) when it is larger than "
    "body_max_bytes as JSON (default 65536). A page stops growing past 4 MiB of items, "
    "so it may hold fewer than limit items: continue with next_cursor, which is non-null "
    "whenever more may follow."
)

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "z4j brain API",
        "version": __version__,
        "description": "Read the brain's state and send commands. Sign in with an admin "
        "token as a bearer token, or POST it to /session for a cookie. Writes signed in by "
        "the cookie must send Content-Type: application/json, the session's X-CSRF-Token, "
        "and no foreign Origin; failed sign-ins are limited per address (429).",
    },
    "servers": [{"url": "/api/v1"}],
    "security": [{"bearer": []}, {"session": []}],
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "session": {"type": "apiKey", "in": "cookie", "name": "z4j_session"},
        },
        "schemas": SCHEMAS,
    },
    "paths": {
        "/openapi.json": {
            "get": _operation("openapi", "This document", (200, OBJECT), errors=(), public=True)
        },
        "/session": {
            "post": _operation(
                "signIn",
                "Sign in: a session cookie (and its CSRF token) for an admin token",
                (200, _ref("SignedIn")),
                errors=(400, 401, 403, 413, 415, 429, 503),
                body=_ref("SignIn"),
                public=True,
            ),
            "delete": _operation(
                "signOut",
                "Sign out",
                (204, None),
                errors=(403, 415),
                parameters=[CSRF_HEADER],
                public=True,
            ),
        },
        "/projects": {"get": _operation("listProjects", "Projects", (200, _page("Project")))},
        "/agents": {
            "get": _operation(
                "listAgents",
                "Agents and their workers",
                (200, _page("Agent")),
                errors=(400, 401, 404),
                links=FIRST_AGENT,
                parameters=[_query("project", STRING, "project name or id")],
            )
        },
        "/agents/{id}": {
            "get": _operation(
                "getAgent",
                "One agent",
                (200, _ref("Agent")),
                errors=(400, 401, 404),
                parameters=[_path("id")],
            )
        },
        "/instances": {
            "get": _operation("listInstances", "Brain instances", (200, _page("Instance")))
        },
        "/events": {
            "get": _operation(
                "listEvents",
                "Stored events, newest first",
                (200, _page("Event")),
                errors=(400, 401),
                description=EVENTS_DESCRIPTION,
                parameters=[
                    _query(
                        "body_max_bytes",
                        {"type": "integer", "minimum": 0, "maximum": 16777216, "default": 65536},
                        "leave out bodies larger than this (bytes of JSON)",
                    ),
                    _query("kind", STRING, "only this kind"),
                    _query("agent_id", UUID, "only this agent's events"),
                    _query("since", STRING, "received at or after (ISO-8601 or epoch seconds)"),
                    _query("until", STRING, "received before (ISO-8601 or epoch seconds)"),
                    CURSOR,
                    LIMIT,
                ],
            )
        },
        "/commands": {
            "get": _operation(
                "listCommands",
                "Commands, newest first",
                (200, _page("Command")),
                errors=(400, 401),
                links=FIRST_COMMAND,
                parameters=[
                    _query("agent_id", UUID, "only this agent's commands"),
                    _query("state", COMMAND_STATE, "only commands in this state"),
                    CURSOR,
                    LIMIT,
                ],
            ),
            "post": _operation(
                "createCommand",
                "Send a command to an agent",
                (201, _ref("Command")),
                errors=(400, 401, 403, 404, 409, 413, 415),
                links=NEW_COMMAND,
                parameters=[CSRF_HEADER],
                body=_ref("NewCommand"),
            ),
        },
        "/commands/{id}": {
            "get": _operation(
                "getCommand",
                "One command",
                (200, _ref("Command")),
                errors=(400, 401, 404),
                parameters=[_path("id")],
            )
        },
        "/commands/{id}/cancel": {
            "post": _operation(
                "cancelCommand",
                "Cancel a pending or dispatched command",
                (200, _ref("Command")),
                errors=(400, 401, 403, 404, 409, 415),
                parameters=[_path("id"), CSRF_HEADER],
            )
        },
        "/audit": {
            "get": _operation(
                "listAudit",
                "Audit events, newest first",
                (200, _page("Audit")),
                errors=(400, 401),
                parameters=[CURSOR, LIMIT],
            )
        },
    },
}
