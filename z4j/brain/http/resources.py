"""The API shape of each stored record, derived from its attrs class.

Why: Command, Worker, Instance, Event, Audit, Agent and Project were each
written out three times (the record in store/base.py, a ``*_json`` function
also feeding the dashboard's messages, an OpenAPI component), and the copies
could drift. Here the record is the one source:
one cattrs converter turns a record into its JSON, and `component` turns the
same class into its OpenAPI schema, so a field added to a record shows up in
both (tests/test_resources.py holds the three together).

What is written here by hand is only what the record cannot say: which
fields stay internal (`Resource.hidden`), fields the API adds
(`Resource.extra`), and the enums and descriptions API readers need
(`Resource.refine`). Times are epoch-second floats in the records and
ISO-8601 strings on the wire; a float field is a time when its name says so
(`at`, ``*_at``, `last_seen`).
"""

from __future__ import annotations

import types
import typing
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import attrs
import cattrs
import orjson
from cattrs.gen import make_dict_unstructure_fn, override

from ...opamp_rollouts import ROLLOUT_STATES, TARGET_STATUSES
from ...store.base import (
    COMMAND_STATES,
    Agent,
    AuditRecord,
    CommandRecord,
    EngineWorker,
    EventRecord,
    InstanceInfo,
    OpampAgent,
    OpampConfig,
    OpampHistoryEntry,
    OpampRollout,
    Project,
    ScheduleRecord,
    TaskRecord,
    WorkerInfo,
)
from ...store.opamp_history import HISTORY_CHANGES
from ...tasks import TASK_STATES

__all__ = [
    "RESOURCES",
    "SCHEDULE_ACTIONS",
    "WORKER_ACTIONS",
    "Extra",
    "Resource",
    "component",
    "converter",
    "is_time",
    "iso",
    "to_json",
]


# Celery's worker controls, as the z4j adapters name the commands (the
# engine-workers routes send them; resources lists them for the API).
WORKER_ACTIONS = (
    "restart_worker",
    "pool_grow",
    "pool_shrink",
    "add_consumer",
    "cancel_consumer",
    "rate_limit",
)


def iso(value: float | None) -> str | None:
    """Epoch seconds as the API writes times (ISO-8601, UTC offset), None kept."""
    return None if value is None else datetime.fromtimestamp(value, UTC).isoformat()


def is_time(name: str) -> bool:
    """Whether a float field named ``name`` holds epoch seconds (shown as a time)."""
    return name == "at" or name.endswith("_at") or name in ("last_seen", "first_seen")


@attrs.frozen(kw_only=True)
class Extra:
    """A field the API adds to a record: its schema, and how to compute it."""

    name: str
    schema: dict[str, Any]
    value: Callable[[Any], Any]
    after: str | None = None  # place it after this key (None: at the end)


@attrs.frozen(kw_only=True)
class Resource:
    """How one record class is shown by the API, beyond its own fields."""

    name: str  # the OpenAPI component
    cls: type
    hidden: frozenset[str] = frozenset()
    extra: tuple[Extra, ...] = ()
    refine: Mapping[str, dict[str, Any]] = attrs.field(factory=dict)


SCHEDULE_ACTIONS = ("enable", "disable", "trigger", "delete")


def _body_bytes(e: EventRecord) -> int:
    return len(orjson.dumps(e.body))


RESOURCES: dict[type, Resource] = {
    r.cls: r
    for r in (
        Resource(name="Project", cls=Project),
        Resource(
            name="Agent",
            cls=Agent,
            # Both filled in by the route, which looks them up: placeholders here.
            extra=(
                Extra(
                    name="project",
                    schema={"type": "string", "nullable": True},
                    value=lambda a: None,
                    after="project_id",
                ),
                Extra(
                    name="workers",
                    schema={"type": "array", "items": {"$ref": "#/components/schemas/Worker"}},
                    value=lambda a: [],
                ),
                Extra(
                    name="last_seen",
                    schema={
                        "type": "string",
                        "format": "date-time",
                        "nullable": True,
                        "description": "the latest last_seen of its workers",
                    },
                    value=lambda a: None,
                ),
                Extra(
                    name="versions",
                    schema={
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "the agent versions its workers said hello with",
                    },
                    value=lambda a: [],
                ),
                Extra(
                    name="token_grace_until",
                    schema={
                        "type": "string",
                        "format": "date-time",
                        "nullable": True,
                        "description": "a token rotated away still works until then",
                    },
                    value=lambda a: None,
                ),
            ),
        ),
        Resource(
            name="Worker",
            cls=WorkerInfo,
            hidden=frozenset({"agent_id"}),  # listed under its agent
            extra=(
                Extra(
                    name="connected",
                    schema={"type": "boolean"},
                    value=lambda w: w.disconnected_at is None,
                    after="role",
                ),
            ),
        ),
        Resource(name="Instance", cls=InstanceInfo, hidden=frozenset({"buffer_id"})),
        Resource(
            name="Event",
            cls=EventRecord,
            # event_json in events_api.py drops a body over the caller's limit.
            extra=(
                Extra(
                    name="body_bytes",
                    schema={"type": "integer", "description": "the body's size as JSON"},
                    value=_body_bytes,
                ),
                Extra(
                    name="body_truncated",
                    schema={
                        "type": "boolean",
                        "description": "the body was left out for its size: list again from "
                        "this event with a larger body_max_bytes to read it",
                    },
                    value=lambda e: False,
                ),
            ),
            refine={
                "key": {"description": "idempotency key (hex)"},
                "source": {"enum": ["tcp", "agent"]},
                "body": {
                    "description": "the record; null when it is over body_max_bytes "
                    "(body_truncated is then true)",
                    "nullable": True,
                },
            },
        ),
        Resource(
            name="Command",
            cls=CommandRecord,
            hidden=frozenset({"delivery_claim_token"}),  # the delivery lease, internal
            refine={"state": {"enum": list(COMMAND_STATES)}},
        ),
        Resource(name="Audit", cls=AuditRecord),
        Resource(
            name="Task",
            cls=TaskRecord,
            refine={
                "state": {"enum": list(TASK_STATES)},
                "attempts": {"description": "runs of the task: 1 plus its retries"},
                "worker": {"description": "the engine's worker name, when the engine sends it"},
                "runtime_ms": {"description": "of the last attempt"},
                "timeline": {
                    "description": "its attempts, oldest first (null in a list); their times "
                    "(received_at, started_at, finished_at) are ISO-8601 text like the task's",
                    "nullable": True,
                },
            },
        ),
        Resource(
            name="EngineWorker",
            cls=EngineWorker,
            # Both filled in by the route, from the agent's workers: placeholders here.
            extra=(
                Extra(
                    name="agent_workers",
                    schema={
                        "type": "array",
                        "description": "the WebSocket workers of the agent that reported it",
                        "items": {
                            "type": "object",
                            "properties": {
                                "worker_id": {"type": "string"},
                                "connected": {"type": "boolean"},
                                "last_seen": {"type": "string", "format": "date-time"},
                            },
                            "required": ["worker_id", "connected", "last_seen"],
                            "additionalProperties": False,
                        },
                    },
                    value=lambda w: [],
                ),
                Extra(
                    name="actions",
                    schema={
                        "type": "array",
                        "items": {"type": "string", "enum": list(WORKER_ACTIONS)},
                        "description": "the worker controls the agent's workers advertise for "
                        "the engine (celery's; fire-and-forget: see the list's warning)",
                    },
                    value=lambda w: [],
                ),
            ),
            refine={
                "worker": {
                    "description": "the engine's name for it: celery's name@host, "
                    "dramatiq's host@pid"
                },
                "agent_id": {"description": "the agent whose events named it"},
                "last_seen": {"description": "the last event of its tasks in the window"},
                "tasks": {"description": "its tasks in the window"},
                "states": {
                    "type": "object",
                    "additionalProperties": {"type": "integer"},
                    "description": "its tasks in the window, per state",
                },
            },
        ),
        Resource(
            name="OpampAgent",
            cls=OpampAgent,
            hidden=frozenset({"state", "full_state_requests"}),  # the core's, internal
            # Both filled in by the route: placeholders here.
            extra=(
                Extra(
                    name="project",
                    schema={"type": "string", "nullable": True},
                    value=lambda a: None,
                    after="project_id",
                ),
                Extra(
                    name="online",
                    schema={
                        "type": "boolean",
                        "description": "not disconnected, and heard from within "
                        "Z4J_OPAMP_HEARTBEAT_WINDOW_SECONDS",
                    },
                    value=lambda a: False,
                    after="instance_uid",
                ),
                Extra(
                    name="desired_config",
                    schema={
                        "type": "object",
                        "nullable": True,
                        "description": "the configuration pushed to it, without its files "
                        "(GET .../config has them); null if none",
                        "properties": {
                            "config_hash": {"type": "string"},
                            "status": {"enum": ["pending", "applying", "applied", "failed"]},
                            "error_message": {"type": "string"},
                            "status_at": {"type": "string", "format": "date-time"},
                        },
                    },
                    value=lambda a: None,
                ),
            ),
            refine={
                "instance_uid": {"description": "the agent's 16-byte id, as 32 hex digits"},
                "identifying": {"description": "identifying attributes of its description"},
                "non_identifying": {"description": "non-identifying attributes of its description"},
                "capabilities": {"description": "AgentCapabilities it reported, by name"},
                "health": {
                    "description": "its last ComponentHealth: healthy, status, last_error, "
                    "times, and components (nested)",
                    "nullable": True,
                },
                "effective_config": {
                    "description": "its last effective configuration: config_hash (z4j's "
                    "remote-config hash of these files, hex) and files (name, content_type, "
                    "bytes, sha256)",
                    "nullable": True,
                },
                "remote_config_status": {
                    "description": "last_remote_config_hash (hex), status (unset, applying, "
                    "applied, failed) and error_message",
                    "nullable": True,
                },
                "sequence_num": {"description": "of the last message written"},
                "transport": {"enum": ["http", "websocket"]},
                "last_seen": {
                    "description": "lags its last message by up to a third of the heartbeat window"
                },
                "disconnected_at": {"description": "when it said agent_disconnect"},
            },
        ),
        Resource(
            name="OpampHistoryEntry",
            cls=OpampHistoryEntry,
            hidden=frozenset({"project_id", "instance_uid"}),  # listed under its agent
            refine={
                "id": {"description": "the cursor of the next page, counting down"},
                "changes": {
                    "items": {"type": "string", "enum": list(HISTORY_CHANGES)},
                    "description": "what changed, by name",
                },
                "details": {
                    "description": "the new summary of each changed part, as the agent shows "
                    "it (config_status: config_hash, status, error_message); a summary past "
                    "64 KiB is replaced by {truncated, bytes}"
                },
            },
        ),
        Resource(
            name="OpampConfig",
            cls=OpampConfig,
            refine={
                "instance_uid": {"description": "the agent's 16-byte id, as 32 hex digits"},
                "config_hash": {
                    "description": "SHA-256 of the files (hex), sorted by name: what the agent "
                    "reports back as last_remote_config_hash"
                },
                "files": {
                    "description": "by name: body (text) and content_type",
                    "additionalProperties": {
                        "type": "object",
                        "properties": {
                            "body": {"type": "string"},
                            "content_type": {"type": "string"},
                        },
                    },
                },
                "created_by": {"description": "who pushed it"},
                "status": {
                    "enum": ["pending", "applying", "applied", "failed"],
                    "description": "the agent's last report about this hash; pending until "
                    "it reports one",
                },
                "error_message": {"description": "the agent's, when failed"},
                "status_at": {"description": "when the status last moved"},
                "rollout_id": {"description": "the rollout that assigned it, if one did"},
            },
        ),
        Resource(
            name="OpampRollout",
            cls=OpampRollout,
            # Filled in by the route: a placeholder here.
            extra=(
                Extra(
                    name="project",
                    schema={"type": "string", "nullable": True},
                    value=lambda r: None,
                    after="project_id",
                ),
            ),
            refine={
                "selector": {
                    "description": "attribute name to value: an agent is a target when each "
                    "equals its identifying or non-identifying attribute (as text)",
                    "additionalProperties": {"type": "string"},
                },
                "config_hash": {"description": "SHA-256 of the files (hex), as for one agent"},
                "state": {"enum": list(ROLLOUT_STATES)},
                "stage": {"description": "stages assigned so far (0: none yet)"},
                "stages": {"description": "the canary (if any), then batches"},
                "targets": {"description": "agents the selector matched when it started"},
                "assigned": {"description": "targets given the configuration so far"},
                "accepted_failures": {"description": "failures accepted by the last resume"},
                "counts": {
                    "description": "the assigned targets by status; superseded: their "
                    "configuration was replaced or deleted since",
                    "properties": {s: {"type": "integer"} for s in TARGET_STATUSES},
                    "required": list(TARGET_STATUSES),
                    "additionalProperties": False,
                },
                "halted_reason": {"description": "why it halted, while halted"},
            },
        ),
        Resource(
            name="Schedule",
            cls=ScheduleRecord,
            # Filled in by the route, from the workers connected now.
            extra=(
                Extra(
                    name="actions",
                    schema={
                        "type": "array",
                        "items": {"type": "string", "enum": list(SCHEDULE_ACTIONS)},
                        "description": "what the worker publishing its scheduler offers now "
                        "(POST .../{action})",
                    },
                    value=lambda s: [],
                ),
            ),
            refine={
                "source_key": {"description": "the schedule's identity in its scheduler"},
                "engine": {"description": "the engine its task runs on"},
                "kind": {"description": "cron, interval, ... as the scheduler says"},
                "is_enabled": {"description": "false: it exists but does not fire"},
                "source": {"description": "where its definition lives, e.g. huey-periodic:code"},
                "agent_id": {"description": "the agent whose worker published it"},
                "stream_id": {"description": "the stream it was published on (see epoch_number)"},
                "sequence": {"description": "of the observation it comes from, in its epoch"},
                "snapshot_id": {
                    "description": "the snapshot it comes from; null after a control projection",
                    "nullable": True,
                },
                "updated_at": {"description": "when the brain applied it"},
            },
        ),
    )
}


# -- JSON ------------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    """The fields of ``cls`` and their resolved types, in declaration order."""
    hints = typing.get_type_hints(cls)
    return {a.name: hints[a.name] for a in attrs.fields(cls)}


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` as ``(X, True)``; any other type as ``(type, False)``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _is_json(tp: Any) -> bool:
    """Fields already holding parsed JSON: passed through, never copied."""
    return tp is Any or typing.get_origin(tp) is dict


def _same(value: Any) -> Any:
    return value


def _unstructure_fn(cls: type, conv: cattrs.Converter) -> Callable[[Any], dict[str, Any]]:
    resource = RESOURCES[cls]
    overrides: dict[str, Any] = {}
    for name, tp in _field_types(cls).items():
        inner, _ = _split_optional(tp)
        if name in resource.hidden:
            overrides[name] = override(omit=True)
        elif inner is float and is_time(name):
            overrides[name] = override(unstruct_hook=iso)
        elif _is_json(inner):
            overrides[name] = override(unstruct_hook=_same)
    base: Callable[[Any], dict[str, Any]] = make_dict_unstructure_fn(cls, conv, **overrides)
    if not resource.extra:
        return base
    after = {x.after: x for x in resource.extra if x.after is not None}
    at_end = [x for x in resource.extra if x.after is None]

    def unstructure(obj: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in base(obj).items():
            out[key] = value
            if key in after:
                out[after[key].name] = after[key].value(obj)
        for x in at_end:
            out[x.name] = x.value(obj)
        return out

    return unstructure


converter = cattrs.Converter()
"""The one converter from records to API JSON: UUIDs as text, times as ISO-8601."""
converter.register_unstructure_hook(uuid.UUID, str)
converter.register_unstructure_hook_factory(
    lambda cls: cls in RESOURCES, lambda cls: _unstructure_fn(cls, converter)
)


def to_json(record: Any) -> dict[str, Any]:
    """``record`` (one of `RESOURCES`) as the API shows it."""
    out: dict[str, Any] = converter.unstructure(record)
    return out


# -- OpenAPI ---------------------------------------------------------------------------------

_SCALARS: dict[Any, dict[str, Any]] = {
    str: {"type": "string"},
    int: {"type": "integer"},
    float: {"type": "number"},
    bool: {"type": "boolean"},
    uuid.UUID: {"type": "string", "format": "uuid"},
}


def _schema(name: str, tp: Any) -> dict[str, Any]:
    inner, nullable = _split_optional(tp)
    if inner is float and is_time(name):
        schema: dict[str, Any] = {"type": "string", "format": "date-time"}
    elif inner is Any:
        schema = {}
    elif typing.get_origin(inner) is dict:
        schema = {"type": "object", "additionalProperties": True}
    elif typing.get_origin(inner) is list:
        schema = {"type": "array", "items": _schema(name, typing.get_args(inner)[0])}
    elif inner in _SCALARS:
        schema = dict(_SCALARS[inner])
    else:
        raise TypeError(f"no API schema for {name}: {tp!r}")
    return {**schema, "nullable": True} if nullable else schema


def component(resource: Resource) -> dict[str, Any]:
    """The OpenAPI 3.0 schema of ``resource``: the JSON `to_json` gives, property for property."""
    properties: dict[str, Any] = {}
    after = {x.after: x for x in resource.extra if x.after is not None}
    for name, tp in _field_types(resource.cls).items():
        if name in resource.hidden:
            continue
        properties[name] = {**_schema(name, tp), **resource.refine.get(name, {})}
        if name in after:
            properties[after[name].name] = after[name].schema
    for x in resource.extra:
        if x.after is None:
            properties[x.name] = x.schema
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }
