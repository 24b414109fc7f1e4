"""Rows to records, once for both stores, over a small `Dialect` value.

Postgres hands back ``uuid.UUID``, ``datetime`` and decoded jsonb; SQLite
hands back text, epoch floats and JSON text. That is the whole difference
between the two stores' mappers, so each store names its conversions in a
`Dialect` and the column lists and mappers here serve both: a column added
to a record is one edit here (plus the migration).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, Protocol

import attrs

from .base import (
    Agent,
    ApiToken,
    AuditRecord,
    CommandRecord,
    EventRecord,
    InstanceInfo,
    Project,
    WorkerInfo,
)

__all__ = [
    "AGENT_COLUMNS",
    "AGENT_WIDTH",
    "AUDIT_COLUMNS",
    "COMMAND_COLUMNS",
    "EVENT_COLUMNS",
    "INSTANCE_COLUMNS",
    "PROJECT_COLUMNS",
    "TOKEN_COLUMNS",
    "WORKER_COLUMNS",
    "Conn",
    "Dialect",
    "agent",
    "api_token",
    "audit",
    "command",
    "event",
    "instance",
    "project",
    "worker",
]


class Conn(Protocol):
    """What shared SQL needs of a connection: psycopg's and sqlite3's both fit."""

    def execute(self, sql: Any, params: Any = ..., /) -> Any: ...
    def cursor(self) -> Any: ...


@attrs.frozen(kw_only=True)
class Dialect:
    """How one store spells parameters and carries values (to the database: ``*_in``)."""

    param: str  # the placeholder: "%s" (psycopg) or "?" (sqlite3)
    lock: str  # appended to a read that a transition then writes: " FOR UPDATE" or ""
    ts_in: Callable[[float], Any]
    ts_out: Callable[[Any], float]
    uuid_in: Callable[[uuid.UUID], Any]
    uuid_out: Callable[[Any], uuid.UUID]
    json_in: Callable[[Any], Any]
    json_out: Callable[[Any], Any]
    key_hex: Callable[[Any], str]  # an event's idempotency key, as hex
    json_text: Callable[[str, str], str]  # SQL for a JSON column's field at a dotted path, as text

    def sql(self, text: str) -> str:
        """``text`` written with ``?`` placeholders, in this dialect's."""
        return text if self.param == "?" else text.replace("?", self.param)

    def opt_ts_in(self, value: float | None) -> Any:
        return None if value is None else self.ts_in(value)

    def opt_ts_out(self, value: Any) -> float | None:
        return None if value is None else self.ts_out(value)

    def opt_uuid_in(self, value: uuid.UUID | None) -> Any:
        return None if value is None else self.uuid_in(value)

    def opt_uuid_out(self, value: Any) -> uuid.UUID | None:
        return None if value is None else self.uuid_out(value)

    def opt_json_in(self, value: Any) -> Any:
        return None if value is None else self.json_in(value)

    def opt_json_out(self, value: Any) -> Any:
        return None if value is None else self.json_out(value)


PROJECT_COLUMNS = "id, name, archived_at, secret_generation, previous_secret_expires_at"
AGENT_COLUMNS = "a.id, a.project_id, a.name, a.revoked_at IS NOT NULL, a.created_at"
AGENT_WIDTH = AGENT_COLUMNS.count(",") + 1  # where a row's agent columns end
COMMAND_COLUMNS = (
    "id, project_id, agent_id, action, target, parameters, timeout_seconds, issued_by,"
    " state, worker_id, delivery_claim_token, created_at, dispatched_at, finished_at,"
    " result, error"
)
INSTANCE_COLUMNS = (
    "id, name, host, pid, buffer_id, started_at, last_seen, ingest_rate,"
    " drain_rate, buffer_depth, stopped_at"
)
WORKER_COLUMNS = (
    "agent_id, worker_id, role, instance_id, connected_at, last_seen, disconnected_at, status,"
    " hello, health"
)
EVENT_COLUMNS = (
    "id, idempotency_key, received_at, source, kind, project_id, agent_id, worker_id, body"
)
AUDIT_COLUMNS = "id, at, actor, action, subject, details"
TOKEN_COLUMNS = "token_hash, name, created_at, last_used_at"


def project(d: Dialect, row: Any) -> Project:
    id, name, archived_at, generation, previous_until = row
    return Project(
        d.uuid_out(id),
        name,
        archived_at=d.opt_ts_out(archived_at),
        secret_generation=int(generation),
        previous_secret_expires_at=d.opt_ts_out(previous_until),
    )


def agent(d: Dialect, row: Any) -> Agent:
    id, project_id, name, revoked, created_at = row
    return Agent(d.uuid_out(id), d.uuid_out(project_id), name, bool(revoked), d.ts_out(created_at))


def command(d: Dialect, row: Any) -> CommandRecord:
    (
        id,
        project_id,
        agent_id,
        action,
        target,
        parameters,
        timeout_seconds,
        issued_by,
        state,
        worker_id,
        delivery_claim_token,
        created_at,
        dispatched_at,
        finished_at,
        result,
        error,
    ) = row
    return CommandRecord(
        id=d.uuid_out(id),
        project_id=d.uuid_out(project_id),
        agent_id=d.uuid_out(agent_id),
        action=action,
        target=d.json_out(target),
        parameters=d.json_out(parameters),
        timeout_seconds=timeout_seconds,
        issued_by=issued_by,
        state=state,
        worker_id=worker_id,
        delivery_claim_token=delivery_claim_token,
        created_at=d.ts_out(created_at),
        dispatched_at=d.opt_ts_out(dispatched_at),
        finished_at=d.opt_ts_out(finished_at),
        result=d.opt_json_out(result),
        error=error,
    )


def instance(d: Dialect, row: Any) -> InstanceInfo:
    (
        id,
        name,
        host,
        pid,
        buffer_id,
        started_at,
        last_seen,
        ingest_rate,
        drain_rate,
        buffer_depth,
        stopped_at,
    ) = row
    return InstanceInfo(
        id=d.uuid_out(id),
        name=name,
        host=host,
        pid=pid,
        buffer_id=d.uuid_out(buffer_id),
        started_at=d.ts_out(started_at),
        last_seen=d.ts_out(last_seen),
        ingest_rate=ingest_rate,
        drain_rate=drain_rate,
        buffer_depth=buffer_depth,
        stopped_at=d.opt_ts_out(stopped_at),
    )


def worker(d: Dialect, row: Any) -> WorkerInfo:
    (
        agent_id,
        worker_id,
        role,
        instance_id,
        connected_at,
        last_seen,
        disconnected_at,
        status,
        hello,
        health,
    ) = row
    parsed = d.opt_json_out(hello)
    return WorkerInfo(
        agent_id=d.uuid_out(agent_id),
        worker_id=worker_id,
        role=role,
        instance_id=d.opt_uuid_out(instance_id),
        connected_at=d.ts_out(connected_at),
        last_seen=d.ts_out(last_seen),
        disconnected_at=d.opt_ts_out(disconnected_at),
        status=d.opt_json_out(status),
        capabilities=capabilities(parsed),
        health=d.opt_json_out(health),
        schedulers=_names(parsed, "schedulers"),
        runtime_features=_names(parsed, "runtime_features"),
        agent_version=_text(parsed, "agent_version"),
    )


def _text(hello: Any, key: str) -> str | None:
    value = hello.get(key) if isinstance(hello, dict) else None
    return value[:200] if isinstance(value, str) else None


def capabilities(hello: Any) -> dict[str, list[str]]:
    """What a worker's hello advertises, per engine: ``{engine: [action, ...]}``
    (anything else in that field is not a capability and is left out)."""
    advertised = hello.get("capabilities") if isinstance(hello, dict) else None
    if not isinstance(advertised, dict):
        return {}
    return {
        str(engine): sorted(str(a) for a in actions if isinstance(a, str))
        for engine, actions in advertised.items()
        if isinstance(actions, list)
    }


def _names(hello: Any, field: str) -> list[str]:
    """A list of names in the hello (its schedulers, its runtime features)."""
    names = hello.get(field) if isinstance(hello, dict) else None
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def event(d: Dialect, row: Any) -> EventRecord:
    id, key, received_at, source, kind, project_id, agent_id, worker_id, body = row
    return EventRecord(
        id=id,
        key=d.key_hex(key),
        received_at=d.ts_out(received_at),
        source=source,
        kind=kind,
        project_id=d.opt_uuid_out(project_id),
        agent_id=d.opt_uuid_out(agent_id),
        worker_id=worker_id,
        body=d.json_out(body),
    )


def audit(d: Dialect, row: Any) -> AuditRecord:
    id, at, actor, action, subject, details = row
    return AuditRecord(
        id=id,
        at=d.ts_out(at),
        actor=actor,
        action=action,
        subject=subject,
        details=d.json_out(details),
    )


def api_token(d: Dialect, row: Any) -> ApiToken:
    token_hash, name, created_at, last_used_at = row
    return ApiToken(
        token_hash=bytes(token_hash),
        name=name,
        created_at=d.ts_out(created_at),
        last_used_at=d.opt_ts_out(last_used_at),
    )
