"""The OpenAPI 3.0 document of the REST API (api.py), served at /api/v1/openapi.json.

The operations, parameters and wording are written here by hand, next to
the routes they describe; the schemas of the stored resources (Project,
Agent, Worker, Instance, Event, Command, Audit, Task, EngineWorker,
Schedule, OpampAgent) are derived from their records by resources.py, so they cannot
drift from the JSON the routes send.
tests/test_api.py runs schemathesis against it, so a route that answers
off this document fails.
The rules for cookie-signed writes (CSRF) and the caps on event listings
are told here too: API users read this document, not api.py.

Past 700 lines, it is still one concern: the one document API users read,
every operation's wording beside the others'. Splitting it by route module
would scatter what the schemathesis run checks as a whole.
"""

from __future__ import annotations

from typing import Any

from ..._version import __version__
from ...store.base import COMMAND_STATES
from ...tasks import TASK_STATES
from .limits import (
    ACCOUNT_NAME_CHARS,
    COMMAND_ACTION_CHARS,
    COMMAND_TIMEOUT_SECONDS,
    FILTER_TEXT_CHARS,
    PAGE_LIMIT,
    PASSWORD_CHARS,
)
from .resources import RESOURCES, SCHEDULE_ACTIONS, WORKER_ACTIONS, component

__all__ = ["OPENAPI"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


STRING = {"type": "string"}
TEXT = {"type": "string", "maxLength": FILTER_TEXT_CHARS}
TIME = {"type": "string", "format": "date-time"}
UUID = {"type": "string", "format": "uuid"}
OBJECT = {"type": "object", "additionalProperties": True}
ANY: dict[str, Any] = {}
PASSWORD = {"type": "string", "minLength": PASSWORD_CHARS[0], "maxLength": PASSWORD_CHARS[1]}


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
        403: "Refused: the caller's role or token scope does not allow it (see "
        "docs/security.md), a foreign Origin, or a cookie-signed write without its X-CSRF-Token",
        404: "Not found",
        405: "Method not allowed",
        409: "Conflict with the current state",
        413: "Body too large",
        415: "Not JSON: a browser-style write needs Content-Type: application/json",
        429: "Too many failed sign-ins from this address: wait the Retry-After seconds",
        502: "The agent answered with a failure (command_id names the command)",
        503: "The store is not reachable; or, on /federation routes, every federated "
        "request this hub runs at once is in flight (federation_busy, with Retry-After); "
        "try again",
        504: "The agent did not answer in time (command_id names the command, which "
        "keeps its answer when it lands)",
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
        "responses": {
            str(status): success,
            **_errors(*sorted({*errors, *(() if public else (403, 503))})),
        },
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
    """A path parameter: ``id`` is a UUID; engines, queues, workers and task ids are text."""
    schema = UUID if name == "id" else {"type": "string", "minLength": 1}
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _text_path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": STRING}


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
    "limit", {"type": "integer", "minimum": 1, "maximum": PAGE_LIMIT, "default": 50}, "page size"
)
CURSOR = _query("cursor", STRING, "next_cursor of the previous page")
AUDIT_TEXT = {"type": "string", "minLength": 1, "maxLength": FILTER_TEXT_CHARS}
COMMAND_STATE = {"type": "string", "enum": list(COMMAND_STATES)}
TASK_STATE = {"type": "string", "enum": list(TASK_STATES)}
TASK_PATH = [
    _path("engine"),
    _path("task_id"),
    _query("project_id", UUID, "when two projects have the id"),
]

FIRST_SCHEDULE = {
    f"{action}Schedule": {
        "operationId": f"{action}Schedule",
        "parameters": {
            "scheduler": "$response.body#/items/0/scheduler",
            "source_key": "$response.body#/items/0/source_key",
        },
    }
    for action in ("get", *SCHEDULE_ACTIONS)
}
SCHEDULE_PATH = [
    _text_path("scheduler"),
    _text_path("source_key"),
    _query("project_id", UUID, "when two projects have the schedule"),
]
SCHEDULE_ACTION_TEXT = {
    "enable": "Enable a schedule",
    "disable": "Disable a schedule (it stays, and does not fire)",
    "trigger": "Run a schedule's task now, out of its cadence",
    "delete": "Delete a schedule from its scheduler",
}
SCHEDULE_ACTION_DESCRIPTION = (
    "A command to the worker publishing the schedule's scheduler, offered only where it "
    "advertises what the action needs (the schedule's actions; else 409 not_offered). "
    "enable, disable and delete: schedule.external.mutate (fenced by the stream's epoch, "
    "compared against the row as the brain has it; the adapter publishes a new snapshot) "
    "where the scheduler advertises external_schedule_mutation_v1, else schedule.enable, "
    "schedule.disable or schedule.delete followed by schedule.resync. trigger: "
    "schedule.trigger_now, else schedule.fire to a worker of the agent whose engine takes "
    "submit_task. The answer is the command; the schedule changes when the adapter's next "
    "snapshot is applied."
)

OPAMP_FILES: dict[str, Any] = {
    "type": "object",
    "minProperties": 1,
    "maxProperties": 100,
    "description": "by name (1 to 255 characters); bodies of 512 KiB in all, "
    "as UTF-8; a body whose content_type is JSON (application/json, +json) must "
    "parse, and one whose content_type is YAML (application/yaml, text/yaml, "
    "application/x-yaml, text/x-yaml, +yaml) must load (safe_load, at most 64 "
    "levels deep)",
    "additionalProperties": {
        "type": "object",
        "properties": {
            "body": {"type": "string"},
            "content_type": {"type": "string", "maxLength": 255},
        },
        "required": ["body"],
    },
}

SCHEMAS: dict[str, Any] = {
    "Error": {
        **_object({"error": STRING, "message": STRING}),
        "properties": {
            "error": STRING,
            "message": STRING,
            # A two-step action's first answer (409 confirm) says what to confirm.
            "count": {"type": "integer", "description": "bulk retry: the tasks it would retry"},
            "depth": {
                "type": "integer",
                "nullable": True,
                "description": "purge: the queue's last seen depth (null: unknown)",
            },
            "command_id": {
                **UUID,
                "description": "an answer the brain waited for (502, 504): the command sent",
            },
            # A refusal by the policy (403 forbidden) names what was refused.
            "action": {**STRING, "description": "403: the action refused (policy.py)"},
            "role": {**STRING, "description": "403: the caller's role"},
            "scope": {**STRING, "nullable": True, "description": "403: the token's scope"},
            # A federation refusal names the region and why.
            "region": {**STRING, "description": "federation: the region concerned"},
            "reason": {**STRING, "description": "federation: why it was refused"},
        },
    },
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
            "action": {"type": "string", "minLength": 1, "maxLength": COMMAND_ACTION_CHARS},
            "target": OBJECT,
            "parameters": OBJECT,
            "timeout_seconds": {
                "type": "integer",
                "minimum": COMMAND_TIMEOUT_SECONDS[0],
                "maximum": COMMAND_TIMEOUT_SECONDS[1],
                "default": 60,
            },
        },
        "required": ["agent", "action"],
    },
    "TaskPage": {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": _ref("Task")},
            "next_cursor": {"type": "string", "nullable": True},
            "counts": {
                "type": "object",
                "description": "tasks matching the filters (state aside), per state; on the "
                "first page only (no cursor)",
                "properties": {state: {"type": "integer"} for state in TASK_STATES},
            },
            "counts_exact": {
                "type": "boolean",
                "description": "false: a filter by name, agent, time or text was counted over "
                "the newest 100,000 matching tasks, and each count is a lower bound",
            },
        },
    },
    "TaskDetail": {
        "allOf": [
            _ref("Task"),
            _object(
                {
                    "commands": {
                        "type": "array",
                        "items": _ref("Command"),
                        "description": "commands that named this task: as target, or as the "
                        "new task their result reports (a retry links old and new)",
                    },
                    "actions": {
                        "type": "array",
                        "items": {"type": "string", "enum": ["retry", "cancel"]},
                        "description": "what the task's agent advertises for its engine",
                    },
                }
            ),
        ]
    },
    "QueuePage": _object(
        {
            "items": {
                "type": "array",
                "items": _object(
                    {
                        "engine": STRING,
                        "queue": STRING,
                        "depths": {
                            "type": "array",
                            "description": "per connected worker reporting it",
                            "items": _object(
                                {
                                    "agent_id": UUID,
                                    "worker_id": STRING,
                                    "depth": {"type": "integer"},
                                    "seen_at": TIME,
                                    "broker_connected": {"type": "boolean", "nullable": True},
                                    "broker_type": {"type": "string", "nullable": True},
                                }
                            ),
                        },
                        "outcomes": {
                            "type": "object",
                            "additionalProperties": {"type": "integer"},
                            "description": "tasks per state, last event within the window",
                        },
                        "finished_per_minute": {"type": "number"},
                        "failure_rate": {"type": "number", "nullable": True},
                    }
                ),
            },
            "next_cursor": {"type": "string", "nullable": True},
            "window_seconds": {"type": "number"},
        }
    ),
    "DeadLetterPage": _object(
        {
            "items": {
                "type": "array",
                "description": "as the agent's engine lists them, newest first",
                "items": _object(
                    {
                        "task_id": STRING,
                        "task_name": {"type": "string", "description": "empty when unknown"},
                        "queue": STRING,
                        "failed_at": _nullable(TIME),
                        "error_excerpt": {
                            "type": "string",
                            "description": "the tail of the failure, redacted by the agent",
                        },
                        "attempts": {"type": "integer", "nullable": True},
                    }
                ),
            },
            "next_cursor": {
                "type": "string",
                "nullable": True,
                "description": "the agent's own cursor: pass it back for the next page",
            },
            "total": {"type": "integer", "nullable": True},
            "agent_id": UUID,
            "command_id": {**UUID, "description": "the dlq.list command that listed them"},
            "actions": {
                "type": "array",
                "items": {"type": "string", "enum": ["requeue"]},
                "description": "requeue: the agent advertises requeue_dead_letter",
            },
        }
    ),
    "RequeueDeadLetter": {
        "type": "object",
        "properties": {
            "agent_id": UUID,
            "task_name": {"type": "string", "maxLength": 500},
        },
        "required": ["agent_id"],
    },
    "EngineWorkerPage": _object(
        {
            "items": {"type": "array", "items": _ref("EngineWorker")},
            "next_cursor": {"type": "string", "nullable": True},
            "since": TIME,
            "warning": {
                "type": "string",
                "description": "what the worker controls' outcomes do not say",
            },
        }
    ),
    "WorkerControl": {
        "type": "object",
        "properties": {
            "agent_id": {
                **UUID,
                "description": "the agent that reported the worker, when several did",
            },
            "delta": {
                "type": "integer",
                "minimum": 1,
                "maximum": 100,
                "default": 1,
                "description": "pool_grow, pool_shrink: processes",
            },
            "queue": {
                "type": "string",
                "minLength": 1,
                "maxLength": 200,
                "description": "add_consumer, cancel_consumer",
            },
            "task_name": {
                "type": "string",
                "minLength": 1,
                "maxLength": 200,
                "description": "rate_limit",
            },
            "rate": {
                "type": "string",
                "pattern": "^(0|[1-9][0-9]{0,8}(/[smh])?)$",
                "description": "rate_limit: '0' clears; '<n>', '<n>/s', '<n>/m', '<n>/h'",
            },
        },
    },
    "BufferDeadLetter": _object(
        {
            "id": {"type": "integer", "description": "its row id in the buffer file"},
            "buffer_id": UUID,
            "source": STRING,
            "origin": _nullable(ANY),
            "received_at": TIME,
            "failed_at": TIME,
            "error": {"type": "string", "description": "why the store refused it (cut)"},
            "body": {"type": "string", "description": "the payload, cut (see body_truncated)"},
            "body_encoding": {"type": "string", "enum": ["utf-8", "base64"]},
            "body_bytes": {"type": "integer", "description": "the whole payload's size"},
            "body_truncated": {"type": "boolean"},
        }
    ),
    "BufferInstance": _object({"id": UUID, "name": STRING, "buffer_id": UUID}),
    "BufferDeadLetterPage": _object(
        {
            "items": {"type": "array", "items": _ref("BufferDeadLetter")},
            "next_cursor": _nullable(STRING),
            "instance": _ref("BufferInstance"),
            "total": {"type": "integer"},
        }
    ),
    "BufferDeadLetterIds": _object(
        {
            "ids": {
                "type": "array",
                "items": {"type": "integer", "minimum": 1},
                "minItems": 1,
                "maxItems": 500,
            }
        }
    ),
    "BufferDeadLettersRequeued": {
        "type": "object",
        "properties": {
            "requeued": {
                "type": "array",
                "items": _object(
                    {
                        "id": {"type": "integer"},
                        "row_id": {"type": "integer", "description": "its new payload row id"},
                    }
                ),
            },
            "missing": {"type": "array", "items": {"type": "integer"}},
        },
        "required": ["requeued"],
        "additionalProperties": False,
    },
    "BufferDeadLettersDiscarded": {
        "type": "object",
        "properties": {
            "discarded": {"type": "array", "items": {"type": "integer"}},
            "missing": {"type": "array", "items": {"type": "integer"}},
        },
        "required": ["discarded"],
        "additionalProperties": False,
    },
    "WorkerRegistry": _object(
        {
            "agent_id": UUID,
            "worker_id": STRING,
            "engines": {
                "type": "object",
                "additionalProperties": {"type": "array", "items": OBJECT},
                "description": "engine -> its known tasks, as the adapter described them",
            },
        }
    ),
    "WorkerControlSent": _object(
        {
            "command": _ref("Command"),
            "warning": {
                "type": "string",
                "description": "celery reports its worker controls completed even when the "
                "worker refused them",
            },
        }
    ),
    "PurgeQueue": {
        "type": "object",
        "properties": {
            "agent_id": UUID,
            "confirm_depth": {"type": "integer", "minimum": 0},
        },
        "required": ["agent_id"],
    },
    "TaskNamePage": _object(
        {
            "items": {
                "type": "array",
                "items": _object(
                    {
                        "engine": STRING,
                        "name": {"type": "string", "nullable": True},
                        "states": {"type": "object", "additionalProperties": {"type": "integer"}},
                        "tasks": {"type": "integer"},
                        "failure_rate": {"type": "number", "nullable": True},
                        "runtime_ms": {
                            "type": "object",
                            "nullable": True,
                            "properties": {
                                "p50": {"type": "number"},
                                "p95": {"type": "number"},
                                "p99": {"type": "number"},
                            },
                        },
                    }
                ),
            },
            "next_cursor": {"type": "string", "nullable": True},
            "since": TIME,
        }
    ),
    "BulkRetry": {
        "type": "object",
        "properties": {
            "filter": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "the query parameters of GET /tasks (state, engine, queue, ...)",
            },
            "max": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
            "confirm_count": {"type": "integer", "minimum": 0},
        },
    },
    "BulkRetried": _object(
        {
            "commands": {"type": "array", "items": _ref("Command")},
            "skipped": {
                "type": "array",
                "items": _object({"task_id": STRING, "reason": STRING}),
            },
        }
    ),
    "RetryInputs": _object(
        {
            "args": {"type": "array", "items": {}},
            "kwargs": OBJECT,
        }
    ),
    "SchedulePage": _page("Schedule"),
    "ScheduleCommands": _object(
        {
            "commands": {
                "type": "array",
                "items": _ref("Command"),
                "description": "one schedule.resync per connected worker with a scheduler",
            }
        }
    ),
    "OpampConfigPush": {
        "type": "object",
        "properties": {"files": OPAMP_FILES},
        "required": ["files"],
    },
    "OpampRolloutPage": _page("OpampRollout"),
    "OpampRolloutNew": {
        "type": "object",
        "properties": {
            "project": {"type": "string", "minLength": 1, "description": "name or id"},
            "selector": {
                "type": "object",
                "maxProperties": 32,
                "additionalProperties": {"type": "string"},
                "description": "attribute name to value; an agent is a target when each "
                "equals its identifying or non-identifying attribute (as text). Empty or "
                "left out: every agent of the project",
            },
            "files": OPAMP_FILES,
            "canary_percent": {"type": "integer", "minimum": 0, "maximum": 100, "default": 10},
            "batch_size": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 100},
            "failure_threshold_percent": {
                "type": "integer",
                "minimum": 0,
                "maximum": 100,
                "default": 10,
                "description": "halt when failed agents, past those accepted by a resume, "
                "are more than this share of the agents assigned",
            },
        },
        "required": ["project", "files"],
    },
    "SignIn": {
        "type": "object",
        "description": "a user's name and password, or a token (an admin or personal one)",
        "properties": {
            "token": {"type": "string", "minLength": 1},
            "name": {"type": "string", "minLength": 1},
            "password": {"type": "string"},
        },
    },
    "Setup": _object(
        {
            "code": {"type": "string", "description": "from the setup link the brain wrote"},
            "name": {"type": "string", "minLength": 1, "maxLength": ACCOUNT_NAME_CHARS},
            "password": PASSWORD,
        }
    ),
    "SetupDone": _object(
        {
            "csrf_token": STRING,
            "expires_in": {"type": "integer"},
            "user": {"$ref": "#/components/schemas/User"},
        }
    ),
    "SetupState": _object({"needed": {"type": "boolean"}}),
    "Whoami": _object(
        {
            "name": STRING,
            "actor": {"type": "string", "description": "how audit rows and commands name you"},
            "kind": {"type": "string", "enum": ["user", "token", "legacy_token"]},
            "user_id": _nullable(UUID),
            "role": {"type": "string", "enum": ["admin", "operator", "viewer"]},
            "scope": _nullable({"type": "string", "enum": ["read", "commands", "admin"]}),
            "projects": _nullable({"type": "array", "items": UUID}),
            "by_cookie": {"type": "boolean"},
        }
    ),
    "SessionsEnded": _object({"sessions_ended": {"type": "integer"}}),
    "User": _object(
        {
            "id": UUID,
            "name": STRING,
            "role": {"type": "string", "enum": ["admin", "operator", "viewer"]},
            "projects": _nullable(
                {
                    "type": "array",
                    "items": _object({"id": UUID, "name": _nullable(STRING)}),
                }
            ),
            "disabled": {"type": "boolean"},
            "created_at": TIME,
            "updated_at": TIME,
        }
    ),
    "NewUser": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": ACCOUNT_NAME_CHARS},
            "password": PASSWORD,
            "role": {"type": "string", "enum": ["admin", "operator", "viewer"]},
            "projects": _nullable({"type": "array", "items": STRING}),
        },
        "required": ["name", "password"],
    },
    "NewPassword": {
        "type": "object",
        "properties": {"password": {"type": "string", "minLength": 10, "maxLength": 1024}},
        "required": ["password"],
    },
    "Token": _object(
        {
            "id": {"type": "string", "description": "a uuid; a legacy admin token's hash prefix"},
            "kind": {"type": "string", "enum": ["personal", "legacy"]},
            "user_id": _nullable(UUID),
            "user": _nullable(STRING),
            "name": STRING,
            "scope": {"type": "string", "enum": ["read", "commands", "admin"]},
            "created_at": TIME,
            "expires_at": _nullable(TIME),
            "last_used_at": _nullable(TIME),
            "revoked_at": _nullable(TIME),
        }
    ),
    "NewToken": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": ACCOUNT_NAME_CHARS},
            "scope": {"type": "string", "enum": ["read", "commands", "admin"]},
            "expires_in_days": _nullable({"type": "integer", "minimum": 1, "maximum": 1830}),
        },
        "required": ["name"],
    },
    "CreatedToken": {
        "allOf": [
            {"$ref": "#/components/schemas/Token"},
            {
                "type": "object",
                "properties": {
                    "token": {"type": "string", "description": "the secret: shown only now"}
                },
                "required": ["token"],
            },
        ]
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

EVENT_FILTER = [
    _query("project_id", UUID, "only this project's events"),
    _query("agent_id", UUID, "only this agent's events"),
    _query("worker_id", TEXT, "only this worker's events"),
    _query("kind", TEXT, "only this kind"),
    _query("task_id", TEXT, "only agent events about this task id"),
    _query("engine", TEXT, "only agent events of this engine"),
    _query("task_name", TEXT, "only agent events about tasks of this name"),
    _query("since", STRING, "received at or after (ISO-8601 or epoch seconds)"),
    _query("until", STRING, "received before (ISO-8601 or epoch seconds)"),
    _query(
        "q",
        TEXT,
        "a text inside the body: any string value containing it, case-insensitive "
        "(ASCII only on SQLite); read at most 10,000 rows of the other filters a page",
    ),
]
EVENT_HISTOGRAM = _object(
    {
        "since": TIME,
        "until": TIME,
        "bucket_seconds": {"type": "number"},
        "buckets": {
            "type": "array",
            "items": _object({"start": TIME, "count": {"type": "integer", "minimum": 0}}),
        },
        "complete": {"type": "boolean"},
        "counted_since": _nullable(TIME),
    }
)
HISTOGRAM_DESCRIPTION = (
    "Buckets of a width chosen from the range (1 s to days, at most 120 buckets) from "
    "since (default: a day before until) to until (default: now). At most the newest "
    "1,000,000 matching rows are counted (100,000 rows read with q): complete is false "
    "then, and counted_since says from when the counts are whole."
)
EXPORT_DESCRIPTION = (
    "Every event the filter matches, newest first, streamed (chunked) as NDJSON (one "
    "object a line: id, key, received_at, source, kind, project_id, agent_id, worker_id, "
    "body) or CSV (those columns with a header row; body as JSON text). The brain holds "
    "two pages at a time (the one sent, the next). A body that ends without its last "
    "chunk was cut short by an error: start again from the last received_at."
)


def _export_operation() -> dict[str, Any]:
    operation = _operation(
        "exportEvents",
        "Export the events a filter matches, streamed as NDJSON or CSV",
        (200, None),
        errors=(400, 401),
        description=EXPORT_DESCRIPTION,
        parameters=[
            _query("format", {"type": "string", "enum": ["ndjson", "csv"]}, "default ndjson"),
            _query(
                "max",
                {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
                "stop after this many events (default: all)",
            ),
            *EVENT_FILTER,
        ],
    )
    operation["responses"]["200"]["content"] = {
        "application/x-ndjson": {"schema": STRING},
        "text/csv": {"schema": STRING},
    }
    return operation


EVENTS_DESCRIPTION = (
    "Each item's body is left out (null, body_truncated true) when it is larger than "
    "body_max_bytes as JSON (default 65536). A page stops growing past 4 MiB of items, "
    "so it may hold fewer than limit items: continue with next_cursor, which is non-null "
    "whenever more may follow."
)

OPAMP_DESCRIPTION = (
    "Agents that speak OpAMP to POST /v1/opamp (not under /api/v1: see docs/opamp.md). "
    "An agent is online while it has not sent agent_disconnect and was heard from within "
    "Z4J_OPAMP_HEARTBEAT_WINDOW_SECONDS."
)

OPAMP_UID: dict[str, Any] = {
    "name": "instance_uid",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9a-fA-F]{32}$"},
}

OPAMP_CONFIG_DESCRIPTION = (
    "Offered on the agent's next poll, if it accepts remote configuration, until it reports "
    "config_hash APPLIED; status follows its reports (pending, applying, applied, failed). "
    "An agent not heard from yet needs ?project=. Audited as opamp.config.pushed."
)

OPAMP_ROLLOUT_DESCRIPTION = (
    "The project's agents that the selector matches now and that accept remote "
    "configuration are its targets (agents seen later do not join). The leader assigns "
    "a canary share first, then batches, each once every agent assigned before has "
    "applied or failed, and halts it when failures pass the threshold. Audited as "
    "opamp.rollout.created, .stage, .halted, .completed; each agent's push as "
    "opamp.config.pushed. See docs/opamp.md."
)

DEAD_LETTERS_DESCRIPTION = (
    "Payloads the store refused as data, set aside in the buffer file of the instance that "
    "answers (named in instance): with several replicas, ask each one (GET /instances shows "
    "them). Bodies are cut to 256 bytes here and 64 KiB in GET /dead-letters/{id}."
)
DEAD_LETTER_ID: dict[str, Any] = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "minimum": 1, "maximum": 9223372036854775807},
}

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
                "Sign in: a session cookie (and its CSRF token) for a name and password, "
                "or a token",
                (200, _ref("SignedIn")),
                errors=(400, 401, 403, 413, 415, 429, 503),
                body=_ref("SignIn"),
                public=True,
            ),
            "get": _operation(
                "whoami",
                "Who is signed in: name, role, token scope, projects",
                (200, _ref("Whoami")),
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
        "/sessions": {
            "delete": _operation(
                "signOutEverywhere",
                "Sign out everywhere: end every session of the caller (user or admin token)",
                (200, _ref("SessionsEnded")),
                errors=(401, 415),
                parameters=[CSRF_HEADER],
            )
        },
        "/setup": {
            "get": _operation(
                "setupState",
                "Whether the first admin is still to be created",
                (200, _ref("SetupState")),
                errors=(),
                public=True,
            ),
            "post": _operation(
                "setup",
                "Create the first admin with the one-time setup code, and sign in as them",
                (201, _ref("SetupDone")),
                errors=(400, 401, 403, 409, 413, 415, 429, 503),
                body=_ref("Setup"),
                public=True,
                description="Works only while the store has no user (else 409); the code is in "
                "the link the brain wrote to its data directory at its first start.",
            ),
        },
        "/users": {
            "get": _operation("listUsers", "Users (admin)", (200, _page("User"))),
            "post": _operation(
                "createUser",
                "Create a user (admin)",
                (201, _ref("User")),
                errors=(400, 401, 404, 409, 413, 415),
                body=_ref("NewUser"),
                parameters=[CSRF_HEADER],
            ),
        },
        "/users/{id}/disable": {
            "post": _operation(
                "disableUser",
                "Disable a user (admin): their sessions and tokens stop working at once",
                (200, _ref("User")),
                errors=(400, 401, 404, 409, 415),
                parameters=[_path("id"), CSRF_HEADER],
            )
        },
        "/users/{id}/enable": {
            "post": _operation(
                "enableUser",
                "Enable a disabled user (admin)",
                (200, _ref("User")),
                errors=(400, 401, 404, 415),
                parameters=[_path("id"), CSRF_HEADER],
            )
        },
        "/users/{id}/password": {
            "post": _operation(
                "resetPassword",
                "Set a user's password (admin): their sessions end",
                (200, _ref("User")),
                errors=(400, 401, 404, 413, 415),
                body=_ref("NewPassword"),
                parameters=[_path("id"), CSRF_HEADER],
            )
        },
        "/tokens": {
            "get": _operation(
                "listTokens",
                "Your personal tokens with their last use; ?all=true: everyone's and the "
                "legacy admin tokens (admin)",
                (200, _page("Token")),
                errors=(401, 409),
                parameters=[
                    _query(
                        "all", {"type": "string", "enum": ["true", "false"]}, "admin: every token"
                    )
                ],
            ),
            "post": _operation(
                "createToken",
                "Make a personal token (its secret is in this answer only)",
                (201, _ref("CreatedToken")),
                errors=(400, 401, 404, 409, 413, 415),
                body=_ref("NewToken"),
                parameters=[CSRF_HEADER],
            ),
        },
        "/tokens/{id}": {
            "delete": _operation(
                "revokeToken",
                "Revoke a token: yours, or (admin) anyone's or a legacy admin token; its "
                "sessions and dashboard sockets end",
                (200, _ref("Token")),
                errors=(400, 401, 404, 415),
                parameters=[_text_path("id"), CSRF_HEADER],
            )
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
        "/opamp/agents": {
            "get": _operation(
                "listOpampAgents",
                "OpAMP agents: description, health, capabilities, online",
                (200, _page("OpampAgent")),
                errors=(400, 401, 404),
                description=OPAMP_DESCRIPTION,
                parameters=[_query("project", STRING, "project name or id")],
            )
        },
        "/opamp/agents/{instance_uid}": {
            "get": _operation(
                "getOpampAgent",
                "One OpAMP agent, by instance_uid (32 hex digits)",
                (200, _ref("OpampAgent")),
                errors=(400, 401, 404, 409),
                description="409 when several projects have an agent with this instance_uid: "
                "name one with ?project=.",
                parameters=[
                    {
                        "name": "instance_uid",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "pattern": "^[0-9a-fA-F]{32}$"},
                    },
                    _query("project", STRING, "project name or id"),
                ],
            )
        },
        "/opamp/agents/{instance_uid}/history": {
            "get": _operation(
                "listOpampHistory",
                "What changed on one OpAMP agent, newest first",
                (200, _page("OpampHistoryEntry")),
                errors=(400, 401, 404, 409),
                description="One entry per message that changed what the agent shows "
                "(description, capabilities, health, configuration, connection) and per move "
                "of its configuration's status; heartbeats add none. Kept for "
                "Z4J_EVENT_RETENTION_DAYS.",
                parameters=[
                    OPAMP_UID,
                    _query("project", STRING, "project name or id"),
                    CURSOR,
                    LIMIT,
                ],
            )
        },
        "/opamp/agents/{instance_uid}/config": {
            "get": _operation(
                "getOpampConfig",
                "The configuration an OpAMP agent should run, and its status",
                (200, _ref("OpampConfig")),
                errors=(400, 401, 404, 409),
                parameters=[OPAMP_UID, _query("project", STRING, "project name or id")],
            ),
            "put": _operation(
                "putOpampConfig",
                "Push a configuration to one OpAMP agent (replacing any before it)",
                (200, _ref("OpampConfig")),
                errors=(400, 401, 403, 404, 409, 413, 415),
                description=OPAMP_CONFIG_DESCRIPTION,
                parameters=[
                    OPAMP_UID,
                    _query("project", STRING, "project name or id"),
                    CSRF_HEADER,
                ],
                body=_ref("OpampConfigPush"),
            ),
            "delete": _operation(
                "deleteOpampConfig",
                "Stop offering the agent its configuration (it keeps what it runs)",
                (204, None),
                errors=(400, 401, 403, 404, 409),
                parameters=[
                    OPAMP_UID,
                    _query("project", STRING, "project name or id"),
                    CSRF_HEADER,
                ],
            ),
        },
        "/opamp/rollouts": {
            "get": _operation(
                "listOpampRollouts",
                "OpAMP rollouts, newest first",
                (200, _ref("OpampRolloutPage")),
                errors=(400, 401, 404),
                parameters=[_query("project", STRING, "project name or id")],
            ),
            "post": _operation(
                "createOpampRollout",
                "Roll a configuration out to the agents a selector matches, in stages",
                (201, _ref("OpampRollout")),
                errors=(400, 401, 403, 404, 413, 415),
                description=OPAMP_ROLLOUT_DESCRIPTION,
                parameters=[CSRF_HEADER],
                body=_ref("OpampRolloutNew"),
            ),
        },
        "/opamp/rollouts/{id}": {
            "get": _operation(
                "getOpampRollout",
                "One OpAMP rollout, with its agents' statuses",
                (200, _ref("OpampRollout")),
                errors=(400, 401, 404),
                parameters=[_path("id")],
            )
        },
        **{
            f"/opamp/rollouts/{{id}}/{verb}": {
                "post": _operation(
                    f"{verb}OpampRollout",
                    summary,
                    (200, _ref("OpampRollout")),
                    errors=(400, 401, 403, 404, 409, 415),
                    description="409 when the rollout's state does not allow it. Audited as "
                    f"opamp.rollout.{done}.",
                    parameters=[_path("id"), CSRF_HEADER],
                )
            }
            for verb, done, summary in (
                ("halt", "halted", "Halt a running rollout: no further stages"),
                (
                    "resume",
                    "resumed",
                    "Resume a halted rollout, accepting the failures seen so far",
                ),
                (
                    "cancel",
                    "cancelled",
                    "Cancel a running or halted rollout (assigned agents keep their configuration)",
                ),
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
                    *EVENT_FILTER,
                    CURSOR,
                    LIMIT,
                ],
            )
        },
        "/events/histogram": {
            "get": _operation(
                "eventHistogram",
                "How many events match a filter, per time bucket",
                (200, EVENT_HISTOGRAM),
                errors=(400, 401),
                description=HISTOGRAM_DESCRIPTION,
                parameters=EVENT_FILTER,
            )
        },
        "/events/export": {
            "get": _export_operation(),
        },
        "/tasks": {
            "get": _operation(
                "listTasks",
                "Tasks, newest first by their last event, with counts by state",
                (200, _ref("TaskPage")),
                errors=(400, 401),
                parameters=[
                    _query("state", TASK_STATE, "only tasks in this state"),
                    _query("engine", STRING, "only this engine's tasks"),
                    _query("queue", STRING, "only this queue's tasks"),
                    _query("name", STRING, "only tasks of this name"),
                    _query("agent_id", UUID, "only tasks this agent acts on"),
                    _query("project_id", UUID, "only this project's tasks"),
                    _query("since", STRING, "last event at or after (ISO-8601 or epoch seconds)"),
                    _query("until", STRING, "last event before (ISO-8601 or epoch seconds)"),
                    _query("q", STRING, "a substring of the name, task id, exception or message"),
                    CURSOR,
                    LIMIT,
                ],
            )
        },
        "/tasks/names": {
            "get": _operation(
                "listTaskNames",
                "The task names seen per engine: tasks by state, failure rate, runtime percentiles",
                (200, _ref("TaskNamePage")),
                errors=(400, 401),
                parameters=[
                    _query("since", STRING, "the window's start (default: a day ago)"),
                ],
            )
        },
        "/tasks/retry": {
            "post": _operation(
                "retryTasks",
                "Retry every task a filter matches (capped), in two steps",
                (201, _ref("BulkRetried")),
                errors=(400, 401, 403, 409, 415),
                description="Without confirm_count the brain answers 409 confirm with the "
                "number of tasks it would retry (count); send that number as confirm_count. "
                "Per agent and engine it sends one bulk_retry where the workers advertise it "
                "(celery), else one retry_task per task; tasks it cannot retry are listed "
                "in skipped.",
                parameters=[CSRF_HEADER],
                body=_ref("BulkRetry"),
            )
        },
        "/tasks/{engine}/{task_id}": {
            "get": _operation(
                "getTask",
                "One task: its attempts, inputs, result, traceback and the commands that named it",
                (200, _ref("TaskDetail")),
                errors=(400, 401, 404, 409),
                parameters=TASK_PATH,
            )
        },
        "/tasks/{engine}/{task_id}/retry": {
            "post": _operation(
                "retryTask",
                "Retry a task: a retry_task command to its agent, filled from the projection",
                (201, _ref("Command")),
                errors=(400, 401, 403, 404, 409, 415),
                description="Without a body the task runs again as it ran (celery by reference; "
                "other engines with the inputs they reported: 409 inputs_unknown when they "
                "reported none). With args and kwargs, it runs with those instead.",
                parameters=[*TASK_PATH, CSRF_HEADER],
                body=_ref("RetryInputs"),
            )
        },
        "/tasks/{engine}/{task_id}/cancel": {
            "post": _operation(
                "cancelTask",
                "Cancel a task: a cancel_task command to its agent",
                (201, _ref("Command")),
                errors=(400, 401, 403, 404, 409, 415),
                parameters=[*TASK_PATH, CSRF_HEADER],
            )
        },
        "/queues": {
            "get": _operation(
                "listQueues",
                "Queues: depths from the workers' heartbeats, outcomes of the last hour",
                (200, _ref("QueuePage")),
                errors=(401,),
            )
        },
        "/queues/{engine}/{queue}/purge": {
            "post": _operation(
                "purgeQueue",
                "Purge a queue, in two steps: 409 confirm with the last seen depth, then "
                "again with confirm_depth",
                (201, _ref("Command")),
                errors=(400, 401, 403, 404, 409, 415),
                description="The brain sends purge_queue with the confirm token the z4j "
                "adapters verify (HMAC-SHA256 under the project's key of "
                "purge|queue|depth); the agent measures the depth again and refuses a "
                "mismatch.",
                parameters=[_path("engine"), _path("queue"), CSRF_HEADER],
                body=_ref("PurgeQueue"),
            )
        },
        "/queues/{engine}/{queue}/dead-letters": {
            "get": _operation(
                "listDeadLetters",
                "A queue's dead letters, as the agent lists them now (dlq.list)",
                (200, _ref("DeadLetterPage")),
                errors=(400, 401, 404, 409, 502, 504),
                description="The brain sends dlq.list to the agent, where its workers "
                "advertise list_dead_letters for the engine (else 409 not_offered), and "
                "waits up to 10 s for the answer: 504 no_answer with the command_id when "
                "it does not come in time (GET /commands/{id} shows it once it does), 502 "
                "agent_failed when the agent refuses.",
                parameters=[
                    _path("engine"),
                    _path("queue"),
                    {
                        **_query("agent_id", UUID, "the agent whose broker holds the queue"),
                        "required": True,
                    },
                    _query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": 200, "default": 50},
                        "page size",
                    ),
                    _query("cursor", STRING, "next_cursor of the previous page"),
                ],
            )
        },
        "/queues/{engine}/{queue}/dead-letters/{task_id}/requeue": {
            "post": _operation(
                "requeueDeadLetter",
                "Put a dead letter back on its queue: a requeue_dead_letter command",
                (201, _ref("Command")),
                errors=(400, 401, 403, 404, 409, 415),
                description="Offered where the agent's workers advertise requeue_dead_letter "
                "for the engine (no z4j 1.13 adapter does: 409 not_offered).",
                parameters=[_path("engine"), _path("queue"), _path("task_id"), CSRF_HEADER],
                body=_ref("RequeueDeadLetter"),
            )
        },
        "/engine-workers": {
            "get": _operation(
                "listEngineWorkers",
                "The engines' own workers the tasks name, per agent that reported them",
                (200, _ref("EngineWorkerPage")),
                errors=(400, 401),
                description="Celery's hostnames, dramatiq's host@pid, as the task projection "
                "holds them (huey and taskiq name none), with their tasks by state over the "
                "window, the WebSocket workers of their agent, and the worker controls that "
                "agent advertises for the engine.",
                parameters=[_query("since", STRING, "the window's start (default: a day ago)")],
            )
        },
        "/engine-workers/{engine}/{worker}/{action}": {
            "post": _operation(
                "controlEngineWorker",
                "A worker control (celery's): a command to the agent that reported the worker",
                (201, _ref("WorkerControlSent")),
                errors=(400, 401, 403, 404, 409, 415),
                description="Offered where the agent's workers advertise the action for the "
                "engine. The body carries what the action takes: delta (pool_grow, "
                "pool_shrink), queue (add_consumer, cancel_consumer), task_name and rate "
                "(rate_limit); agent_id when several agents reported the worker (else 409 "
                "ambiguous). Celery's controls are fire-and-forget: the command completes "
                "once the broadcast is sent, even if the worker refused it.",
                parameters=[
                    _path("engine"),
                    _path("worker"),
                    {
                        "name": "action",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "enum": list(WORKER_ACTIONS)},
                    },
                    CSRF_HEADER,
                ],
                body=_ref("WorkerControl"),
            )
        },
        "/schedules": {
            "get": _operation(
                "listSchedules",
                "Schedules, as their scheduler adapters last published them",
                (200, _ref("SchedulePage")),
                errors=(400, 401, 404),
                links=FIRST_SCHEDULE,
                description="One per (project, scheduler, source key), by scheduler, then "
                "source key. A scheduler adapter publishes once the brain has activated its "
                "stream (schedule.external.activate, sent when a worker that can publish it "
                "connects); each snapshot replaces that scheduler's schedules of the project.",
                parameters=[
                    _query("scheduler", STRING, "only this scheduler's (e.g. huey-periodic)"),
                    _query("engine", STRING, "only schedules of tasks on this engine"),
                    _query("project", STRING, "only this project's (name or id)"),
                    _query(
                        "enabled",
                        {"type": "string", "enum": ["true", "false"]},
                        "only enabled, or only disabled, schedules",
                    ),
                    CURSOR,
                    LIMIT,
                ],
            )
        },
        "/schedules/resync": {
            "post": _operation(
                "resyncSchedules",
                "Sync now: every connected worker with a scheduler publishes a new snapshot",
                (201, _ref("ScheduleCommands")),
                errors=(401, 403, 409, 415),
                description="schedule.resync to each connected worker whose hello names a "
                "scheduler; 409 not_offered when there is none.",
                parameters=[CSRF_HEADER],
            )
        },
        "/schedules/{scheduler}/{source_key}": {
            "get": _operation(
                "getSchedule",
                "One schedule",
                (200, _ref("Schedule")),
                errors=(400, 401, 404, 409),
                parameters=SCHEDULE_PATH,
            )
        },
        **{
            f"/schedules/{{scheduler}}/{{source_key}}/{action}": {
                "post": _operation(
                    f"{action}Schedule",
                    SCHEDULE_ACTION_TEXT[action],
                    (201, _ref("Command")),
                    errors=(400, 401, 403, 404, 409, 415),
                    description=SCHEDULE_ACTION_DESCRIPTION,
                    parameters=[*SCHEDULE_PATH, CSRF_HEADER],
                )
            }
            for action in SCHEDULE_ACTIONS
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
        "/dead-letters": {
            "get": _operation(
                "listDeadLetters",
                "This instance's buffer dead letters, newest first",
                (200, _ref("BufferDeadLetterPage")),
                errors=(400, 401),
                description=DEAD_LETTERS_DESCRIPTION,
                parameters=[CURSOR, LIMIT],
            )
        },
        "/dead-letters/requeue": {
            "post": _operation(
                "requeueDeadLetters",
                "Re-queue several dead letters for the drain",
                (200, _ref("BufferDeadLettersRequeued")),
                errors=(400, 401, 403, 409, 415),
                description="Ids not in this instance's buffer are listed as missing. 409 "
                "buffer_full when the buffer has no room. Each is audited as "
                "dead_letter.requeued.",
                parameters=[CSRF_HEADER],
                body=_ref("BufferDeadLetterIds"),
            )
        },
        "/dead-letters/discard": {
            "post": _operation(
                "discardDeadLetters",
                "Delete several dead letters for good",
                (200, _ref("BufferDeadLettersDiscarded")),
                errors=(400, 401, 403, 415),
                description="Ids not in this instance's buffer are listed as missing. Each is "
                "audited as dead_letter.discarded.",
                parameters=[CSRF_HEADER],
                body=_ref("BufferDeadLetterIds"),
            )
        },
        "/dead-letters/{id}": {
            "get": _operation(
                "getDeadLetter",
                "One dead letter: its payload (up to 64 KiB) and why the store refused it",
                (200, _ref("BufferDeadLetter")),
                errors=(400, 401, 404),
                parameters=[DEAD_LETTER_ID],
            )
        },
        "/dead-letters/{id}/requeue": {
            "post": _operation(
                "requeueDeadLetter",
                "Put a dead letter back for the drain (a new payload row id)",
                (200, _ref("BufferDeadLettersRequeued")),
                errors=(400, 401, 403, 404, 409, 415),
                description="If the store refuses it again, the drain sets it aside again "
                "(counted in z4j_drain_quarantined_rows). Audited as dead_letter.requeued.",
                parameters=[DEAD_LETTER_ID, CSRF_HEADER],
            )
        },
        "/dead-letters/{id}/discard": {
            "post": _operation(
                "discardDeadLetter",
                "Delete a dead letter for good",
                (200, _ref("BufferDeadLettersDiscarded")),
                errors=(400, 401, 403, 404, 415),
                description="Audited as dead_letter.discarded.",
                parameters=[DEAD_LETTER_ID, CSRF_HEADER],
            )
        },
        "/task-registry": {
            "get": _operation(
                "listTaskRegistries",
                "The tasks each worker's adapters registered (registry_delta frames)",
                (200, _page("WorkerRegistry")),
                errors=(400, 401),
                description="By agent, then worker id; tasks by name within each engine.",
                parameters=[
                    _query("agent_id", UUID, "only this agent's workers"),
                    CURSOR,
                    _query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": 100, "default": 50},
                        "workers per page",
                    ),
                ],
            )
        },
        "/audit": {
            "get": _operation(
                "listAudit",
                "Audit events, newest first; every filter given must hold",
                (200, _page("Audit")),
                errors=(400, 401),
                parameters=[
                    _query("actor", AUDIT_TEXT, "who acted, exactly (a user, token or cli:NAME)"),
                    _query("action", AUDIT_TEXT, "the action, exactly; ending in * a prefix"),
                    _query(
                        "subject", AUDIT_TEXT, "what it acted on, exactly; ending in * a prefix"
                    ),
                    _query("outcome", {"type": "string", "enum": ["ok", "refused"]}, "the outcome"),
                    _query("project_id", UUID, "rows about this project"),
                    _query("since", STRING, "at or after (ISO-8601 or epoch seconds)"),
                    _query("until", STRING, "before (ISO-8601 or epoch seconds)"),
                    CURSOR,
                    LIMIT,
                ],
            )
        },
    },
}


# -- provisioning (provisioning_api.py): merged into the document above ---------------------

GRACE = {
    "type": "integer",
    "minimum": 0,
    "maximum": 30 * 86_400,
    "description": "seconds the old credential keeps working (0: it stops at once; "
    "default: Z4J_ROTATION_GRACE_SECONDS, a day unless set)",
}
BRAIN_URL = {
    "type": "string",
    "maxLength": 2048,
    "pattern": "^https?://[^\\s]+$",
    "description": "where the agent connects, for the configuration shown (default: "
    "http:// and this request's Host)",
}
NAME = {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "^\\S(.*\\S)?$"}
SHOWN_ONCE_DESCRIPTION = (
    "The token is shown only in this answer: the store keeps its keyed hash. config is the "
    "environment of a z4j-bare agent (Z4J_BRAIN_URL, Z4J_TOKEN, Z4J_PROJECT_ID, "
    "Z4J_HMAC_SECRET), ready to paste."
)

PROVISIONING_SCHEMAS: dict[str, Any] = {
    "NewProject": {"type": "object", "properties": {"name": NAME}, "required": ["name"]},
    "NewAgent": {
        "type": "object",
        "properties": {
            "project": {"type": "string", "minLength": 1, "maxLength": 200},
            "name": NAME,
            "brain_url": BRAIN_URL,
        },
        "required": ["project", "name"],
    },
    "TokenRotation": {
        "type": "object",
        "properties": {"grace_seconds": GRACE, "brain_url": BRAIN_URL},
    },
    "SecretRotation": {"type": "object", "properties": {"grace_seconds": GRACE}},
    "AgentCredentials": {
        "type": "object",
        "properties": {
            "agent": _ref("Agent"),
            "token": {"type": "string", "description": "shown only now"},
            "signing_secret": {
                "type": "string",
                "description": "the project's current signing secret (url-safe base64)",
            },
            "config": {"type": "string", "description": "z4j-bare's environment"},
            "old_tokens_expire_at": {
                **TIME,
                "description": "rotate-token only: when the agent's older tokens stop working",
            },
        },
        "required": ["agent", "token", "signing_secret", "config"],
        "additionalProperties": False,
    },
    "SecretRotated": _object(
        {
            "project": _ref("Project"),
            "signing_secret": {"type": "string", "description": "the new secret"},
            "previous_secret_expires_at": {
                **TIME,
                "description": "until then frames signed with the previous secret verify",
            },
        }
    ),
}

WRITE_ERRORS = (400, 401, 403, 404, 409, 413, 415)

PROVISIONING_PATHS: dict[str, Any] = {
    "/projects": {
        "post": _operation(
            "createProject",
            "Create a project",
            (201, _ref("Project")),
            errors=(400, 401, 403, 409, 413, 415),
            parameters=[CSRF_HEADER],
            body=_ref("NewProject"),
            description="409 name_taken when a project has the name. Audited as project.create.",
        )
    },
    "/projects/{id}/archive": {
        "post": _operation(
            "archiveProject",
            "Archive a project: its agents are revoked, and it takes no new ones",
            (200, _ref("Project")),
            errors=WRITE_ERRORS,
            parameters=[_path("id"), CSRF_HEADER],
            description="Live sessions of its agents close (4003) within a second. 409 "
            "archived when it is already. Audited as project.archive.",
        )
    },
    "/projects/{id}/rotate-secret": {
        "post": _operation(
            "rotateProjectSecret",
            "Rotate the project's signing secret, the previous one verifying for a grace",
            (200, _ref("SecretRotated")),
            errors=WRITE_ERRORS,
            parameters=[_path("id"), CSRF_HEADER],
            body=_ref("SecretRotation"),
            description="Until previous_secret_expires_at, agents signing with the previous "
            "secret connect and stream as before (each session keeps the key it proved); "
            "then their sessions close 4403. Give the new secret to the agents within the "
            "grace. A rotation during another's grace ends that older secret at once. "
            "Audited as project.secret.rotate.",
        )
    },
    "/agents": {
        "post": _operation(
            "createAgent",
            "Create an agent: its token, the signing secret and a z4j-bare configuration",
            (201, _ref("AgentCredentials")),
            errors=WRITE_ERRORS,
            parameters=[CSRF_HEADER],
            body=_ref("NewAgent"),
            description=SHOWN_ONCE_DESCRIPTION + " 409 name_taken, or archived. Audited as "
            "agent.create.",
        )
    },
    "/agents/{id}/revoke": {
        "post": _operation(
            "revokeAgent",
            "Revoke an agent: its tokens stop working, its live sessions close (4003)",
            (200, _ref("Agent")),
            errors=WRITE_ERRORS,
            parameters=[_path("id"), CSRF_HEADER],
            description="409 revoked when it is already. Audited as agent.revoke.",
        )
    },
    "/agents/{id}/rotate-token": {
        "post": _operation(
            "rotateAgentToken",
            "A new token for an agent; its older ones keep working for a grace",
            (200, _ref("AgentCredentials")),
            errors=WRITE_ERRORS,
            parameters=[_path("id"), CSRF_HEADER],
            body=_ref("TokenRotation"),
            description=SHOWN_ONCE_DESCRIPTION + " Both tokens open sessions until "
            "old_tokens_expire_at; then sessions opened with an older token close 4401 and "
            "it is refused (4401). 409 revoked. Audited as agent.token.rotate.",
        )
    },
}

SCHEMAS.update(PROVISIONING_SCHEMAS)
for _path_name, _operations in PROVISIONING_PATHS.items():
    OPENAPI["paths"].setdefault(_path_name, {}).update(_operations)


# -- federation (federation_api.py, federation_peer_api.py): merged likewise ----------------

REGION_QUERY = _query(
    "region",
    STRING,
    "only these regions (names separated by commas; default every region)",
)
PARTIAL = {
    "partial": {
        "type": "boolean",
        "description": "true when any region asked failed or missed its deadline: the "
        "answer lacks its rows (never silently)",
    },
    "unreachable": {"type": "array", "items": STRING, "description": "the regions that failed"},
    "errors": {
        "type": "object",
        "additionalProperties": STRING,
        "description": "why each unreachable region failed",
    },
}
NUMBER = {"type": "number"}
INTEGER = {"type": "integer"}
FEDERATED_AUDIT_FILTER = [
    _query("actor", AUDIT_TEXT, "who acted, exactly"),
    _query("action", AUDIT_TEXT, "the action, exactly; ending in * a prefix"),
    _query("subject", AUDIT_TEXT, "what it acted on; ending in * a prefix"),
    _query("outcome", {"type": "string", "enum": ["ok", "refused"]}, "the outcome"),
    _query("since", STRING, "at or after (ISO-8601 or epoch seconds)"),
    _query("until", STRING, "before (ISO-8601 or epoch seconds)"),
]


def _labelled(name: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Component ``name`` with more properties (a region label, a peer's cursor)."""
    base = SCHEMAS[name]
    return {
        **base,
        "properties": {**base["properties"], **extra},
        "required": [*base["required"], *extra],
    }


def _federated_page(item: str) -> dict[str, Any]:
    return _object(
        {
            "items": {"type": "array", "items": _ref(item)},
            "next_cursor": _nullable(STRING),
            **PARTIAL,
        }
    )


def _peer_page(item: str) -> dict[str, Any]:
    return _object(
        {
            "items": {"type": "array", "items": _ref(item)},
            "next_cursor": _nullable(STRING),
            "frontier": _nullable(
                {**NUMBER, "description": "epoch seconds down to which this page is complete"}
            ),
        }
    )


REGION = {"region": {**STRING, "description": "the region the row is from"}}
PEER_ROW = {
    "cursor": {**STRING, "description": "this row's keyset cursor in its region"},
    "sort_at": {**NUMBER, "description": "its time, epoch seconds (the merge's order)"},
}
SUMMARY = _object(
    {
        "region": STRING,
        "version": STRING,
        "instances": {**INTEGER, "description": "brain instances heard from lately"},
        "agents_connected": INTEGER,
        "workers_connected": INTEGER,
        "ingest_rate": {**NUMBER, "description": "records/s into the buffers, all instances"},
        "drain_rate": {**NUMBER, "description": "records/s into the store, all instances"},
        "buffer_depth": {**INTEGER, "description": "payloads in the instances' buffers"},
        "ready": {"type": "boolean", "description": "every readiness check passes"},
        "checks": {"type": "object", "additionalProperties": STRING},
    }
)
FEDERATION_SCHEMAS: dict[str, Any] = {
    "RegionSummary": SUMMARY,
    "RegionSummaryShown": {
        **SUMMARY,
        "properties": {k: _nullable(v) for k, v in SUMMARY["properties"].items()},
    },
    "Region": _object(
        {
            "name": STRING,
            "local": {"type": "boolean", "description": "this hub's own region"},
            "url": _nullable(STRING),
            "reachable": {"type": "boolean"},
            "round_trip_ms": _nullable(
                {**NUMBER, "description": "this call's round trip (null: a cached answer)"}
            ),
            "cached": {"type": "boolean"},
            "error": _nullable(STRING),
            "summary": _nullable(_ref("RegionSummaryShown")),
        }
    ),
    "Regions": _object(
        {
            "region": {**STRING, "description": "this hub's region"},
            "items": {"type": "array", "items": _ref("Region")},
            **PARTIAL,
        }
    ),
    "RegionAgent": _labelled("Agent", REGION),
    "RegionEvent": _labelled("Event", REGION),
    "RegionCommand": _labelled("Command", REGION),
    "RegionAudit": _labelled("Audit", REGION),
    "PeerAgent": _labelled("Agent", PEER_ROW),
    "PeerEvent": _labelled("Event", PEER_ROW),
    "PeerCommand": _labelled("Command", PEER_ROW),
    "PeerAudit": _labelled("Audit", PEER_ROW),
    "CrossRegionCommand": {
        **SCHEMAS["NewCommand"],
        "properties": {
            **SCHEMAS["NewCommand"]["properties"],
            "confirm_region": {
                **STRING,
                "description": "the region's name again: the operator's explicit intent",
            },
        },
        "required": [*SCHEMAS["NewCommand"]["required"], "confirm_region"],
    },
    "ForwardedCommand": {
        **SCHEMAS["NewCommand"],
        "properties": {
            **SCHEMAS["NewCommand"]["properties"],
            "confirm_region": {**STRING, "description": "this region's name"},
            "operator": {
                "type": "string",
                "minLength": 1,
                "maxLength": 200,
                "description": "the hub's operator it is sent for",
            },
        },
        "required": [*SCHEMAS["NewCommand"]["required"], "confirm_region", "operator"],
    },
    "RegionCommandSent": _object({"region": STRING, "command": _ref("Command")}),
}
FEDERATION_DESCRIPTION = (
    "Every region is asked at once, each peer within Z4J_FEDERATION_TIMEOUT_MS; rows carry "
    "their region; partial, unreachable and errors say which regions the answer lacks. "
    "docs/scaling.md, Federation."
)
PAGED_DESCRIPTION = (
    FEDERATION_DESCRIPTION + " Pages are merged by time; next_cursor continues every region."
)
PEER_DESCRIPTION = (
    "For a peer hub's federation token only (z4j federation token create): no user, "
    "admin or not, may call it."
)
FEDERATION_PATHS: dict[str, Any] = {
    "/federation/regions": {
        "get": _operation(
            "listFederationRegions",
            "Every region: reachable, round trip, and its summary",
            (200, _ref("Regions")),
            errors=(400, 401, 503),
            description=FEDERATION_DESCRIPTION,
            parameters=[REGION_QUERY],
        )
    },
    "/federation/agents": {
        "get": _operation(
            "listFederationAgents",
            "Agents and their workers, of every region, newest first",
            (200, _federated_page("RegionAgent")),
            errors=(400, 401, 503),
            description=PAGED_DESCRIPTION + " An agent's time is its creation.",
            parameters=[REGION_QUERY, CURSOR, LIMIT],
        )
    },
    "/federation/events": {
        "get": _operation(
            "listFederationEvents",
            "Events of every region, newest first",
            (200, _federated_page("RegionEvent")),
            errors=(400, 401, 503),
            description=PAGED_DESCRIPTION + " The filters are /events'.",
            parameters=[
                _query(
                    "body_max_bytes",
                    {"type": "integer", "minimum": 0, "maximum": 16777216, "default": 65536},
                    "leave out bodies larger than this (bytes of JSON)",
                ),
                *EVENT_FILTER,
                REGION_QUERY,
                CURSOR,
                LIMIT,
            ],
        )
    },
    "/federation/commands": {
        "get": _operation(
            "listFederationCommands",
            "Commands of every region, newest first",
            (200, _federated_page("RegionCommand")),
            errors=(400, 401, 503),
            description=PAGED_DESCRIPTION,
            parameters=[
                _query("state", COMMAND_STATE, "only commands in this state"),
                REGION_QUERY,
                CURSOR,
                LIMIT,
            ],
        )
    },
    "/federation/audit": {
        "get": _operation(
            "listFederationAudit",
            "Audit events of every region, newest first",
            (200, _federated_page("RegionAudit")),
            errors=(400, 401, 503),
            description=PAGED_DESCRIPTION + " The filters are /audit's.",
            parameters=[*FEDERATED_AUDIT_FILTER, REGION_QUERY, CURSOR, LIMIT],
        )
    },
    "/federation/regions/{name}/commands": {
        "post": _operation(
            "sendCrossRegionCommand",
            "Send a command to an agent of another region",
            (201, _ref("RegionCommandSent")),
            errors=(400, 401, 403, 404, 409, 413, 415, 502, 503, 504),
            description="Only with confirm_region naming the region (403 not_confirmed), "
            "and only if that region gave this hub a token made with --allow-commands "
            "(403 not_granted, from the region). Both regions audit it as "
            "federation.command with the operator's name. 504: the region did not answer "
            "in time; the command may have been minted there.",
            parameters=[_text_path("name"), CSRF_HEADER],
            body=_ref("CrossRegionCommand"),
        )
    },
    "/federation/peer/summary": {
        "get": _operation(
            "peerSummary",
            "This region's summary, for a hub",
            (200, _ref("RegionSummary")),
            errors=(401,),
            description=PEER_DESCRIPTION,
        )
    },
    "/federation/peer/agents": {
        "get": _operation(
            "peerAgents",
            "A page of this region's agents and their workers, for a hub",
            (200, _peer_page("PeerAgent")),
            errors=(400, 401),
            description=PEER_DESCRIPTION + " Newest first by creation time (sort_at).",
            parameters=[CURSOR, LIMIT],
        )
    },
    "/federation/peer/events": {
        "get": _operation(
            "peerEvents",
            "A page of this region's events, for a hub",
            (200, _peer_page("PeerEvent")),
            errors=(400, 401),
            description=PEER_DESCRIPTION,
            parameters=[*EVENT_FILTER, CURSOR, LIMIT],
        )
    },
    "/federation/peer/commands": {
        "get": _operation(
            "peerCommands",
            "A page of this region's commands, for a hub",
            (200, _peer_page("PeerCommand")),
            errors=(400, 401),
            description=PEER_DESCRIPTION,
            parameters=[_query("state", COMMAND_STATE, "only this state"), CURSOR, LIMIT],
        ),
        "post": _operation(
            "peerSendCommand",
            "Mint a command a hub forwards for its operator",
            (201, _ref("RegionCommandSent")),
            errors=(400, 401, 403, 404, 409, 413, 415),
            description=PEER_DESCRIPTION + " The token must have been made with "
            "--allow-commands (403 not_granted) and confirm_region name this region "
            "(403 not_confirmed). Audited here as federation.command, by "
            "federation:TOKEN/OPERATOR.",
            body=_ref("ForwardedCommand"),
        ),
    },
    "/federation/peer/audit": {
        "get": _operation(
            "peerAudit",
            "A page of this region's audit events, for a hub",
            (200, _peer_page("PeerAudit")),
            errors=(400, 401),
            description=PEER_DESCRIPTION,
            parameters=[*FEDERATED_AUDIT_FILTER, CURSOR, LIMIT],
        )
    },
}

SCHEMAS.update(FEDERATION_SCHEMAS)
for _path_name, _operations in FEDERATION_PATHS.items():
    OPENAPI["paths"].setdefault(_path_name, {}).update(_operations)
