"""Multi-statement bodies both stores run inside one transaction.

The store opens the transaction (a pooled Postgres transaction, or SQLite's
``BEGIN IMMEDIATE``) and passes its connection; the `Dialect` supplies the
placeholders, the value conversions and the row lock (``FOR UPDATE`` on
Postgres; SQLite's write lock already covers the read). Audit rows differ
(SQLite stamps ``at`` itself), so each store passes its own `AuditWriter`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection
from typing import Any

from . import _rows
from ._filters import Where, one_of
from ._rows import AGENT_COLUMNS, COMMAND_COLUMNS, PROJECT_COLUMNS, Conn, Dialect
from .base import (
    FINAL_COMMAND_STATES,
    Agent,
    CommandRecord,
    Project,
    WorkerRegistry,
    apply_registry_delta,
    created_details,
    transition_details,
)

__all__ = [
    "AuditWriter",
    "as_uuid",
    "find_agent",
    "find_project",
    "insert_command",
    "read_worker_registries",
    "transition_command",
    "update_registry",
]

# (conn, actor, action, subject, details)
AuditWriter = Callable[[Any, str | None, str, str, dict[str, Any]], None]


def as_uuid(ref: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(ref)
    except ValueError:
        return None


def find_project(d: Dialect, conn: Conn, ref: str) -> Project | None:
    by_id = as_uuid(ref)
    row = None
    if by_id is not None:
        sql = d.sql(f"SELECT {PROJECT_COLUMNS} FROM projects WHERE id = ?")
        row = conn.execute(sql, (d.uuid_in(by_id),)).fetchone()
    if row is None:
        sql = d.sql(f"SELECT {PROJECT_COLUMNS} FROM projects WHERE name = ?")
        row = conn.execute(sql, (ref,)).fetchone()
    return None if row is None else _rows.project(d, row)


def find_agent(d: Dialect, conn: Conn, ref: str, project_id: uuid.UUID | None) -> Agent | None:
    by_id = as_uuid(ref)
    row = None
    if by_id is not None:
        where = Where(d).add("a.id = ?", d.uuid_in(by_id))
        if project_id is not None:
            where.add("a.project_id = ?", d.uuid_in(project_id))
        row = conn.execute(f"SELECT {AGENT_COLUMNS} FROM agents a{where}", where.params).fetchone()
    if row is None and project_id is not None:
        row = conn.execute(
            d.sql(f"SELECT {AGENT_COLUMNS} FROM agents a WHERE a.project_id = ? AND a.name = ?"),
            (d.uuid_in(project_id), ref),
        ).fetchone()
    return None if row is None else _rows.agent(d, row)


def update_registry(
    d: Dialect,
    conn: Conn,
    key: tuple[uuid.UUID, str],
    engine: str,
    added: list[dict[str, Any]],
    removed: list[str],
    updated: list[dict[str, Any]],
) -> None:
    """Read, change and write a worker's task registry; nothing for an unknown worker."""
    params = (d.uuid_in(key[0]), key[1])
    row = conn.execute(
        d.sql("SELECT registry FROM workers WHERE agent_id = ? AND worker_id = ?") + d.lock,
        params,
    ).fetchone()
    if row is None:
        return
    registry = apply_registry_delta(d.json_out(row[0]), engine, added, removed, updated)
    conn.execute(
        d.sql("UPDATE workers SET registry = ? WHERE agent_id = ? AND worker_id = ?"),
        (d.json_in(registry), *params),
    )


def read_worker_registries(
    d: Dialect,
    conn: Conn,
    agent_id: uuid.UUID | None,
    after: tuple[uuid.UUID, str] | None,
    limit: int,
    projects: frozenset[uuid.UUID] | None = None,
) -> list[WorkerRegistry]:
    """A page of workers' registries (a read: no transaction needed), of
    ``projects``' agents only unless None."""
    where = Where(d)
    if agent_id is not None:
        where.add("agent_id = ?", d.uuid_in(agent_id))
    if projects is not None:
        condition, values = one_of(d, "project_id", projects)
        where.add(f"agent_id IN (SELECT id FROM agents WHERE {condition})", *values)
    if after is not None:
        a, w = d.uuid_in(after[0]), after[1]
        where.add("(agent_id > ? OR (agent_id = ? AND worker_id > ?))", a, a, w)
    rows = conn.execute(
        f"SELECT agent_id, worker_id, registry FROM workers{where}"
        f" ORDER BY agent_id, worker_id LIMIT {int(limit)}",
        where.params,
    ).fetchall()
    result = []
    for agent, worker, registry in rows:
        parsed = d.json_out(registry)
        result.append(
            WorkerRegistry(
                agent_id=d.uuid_out(agent),
                worker_id=worker,
                registry=parsed if isinstance(parsed, dict) else {},
            )
        )
    return result


def insert_command(d: Dialect, conn: Conn, command: CommandRecord, audit: AuditWriter) -> None:
    found = conn.execute(
        d.sql("SELECT 1 FROM agents WHERE id = ? AND project_id = ?"),
        (d.uuid_in(command.agent_id), d.uuid_in(command.project_id)),
    ).fetchone()
    if found is None:
        raise LookupError(f"no agent {command.agent_id} in project {command.project_id}")
    conn.execute(
        d.sql(f"INSERT INTO commands ({COMMAND_COLUMNS}) VALUES ({', '.join('?' * 16)})"),
        (
            d.uuid_in(command.id),
            d.uuid_in(command.project_id),
            d.uuid_in(command.agent_id),
            command.action,
            d.json_in(command.target),
            d.json_in(command.parameters),
            command.timeout_seconds,
            command.issued_by,
            command.state,
            command.worker_id,
            command.delivery_claim_token,
            d.ts_in(command.created_at),
            d.opt_ts_in(command.dispatched_at),
            d.opt_ts_in(command.finished_at),
            d.opt_json_in(command.result),
            command.error,
        ),
    )
    audit(
        conn,
        command.issued_by,
        "command.created",
        f"command:{command.id}",
        created_details(command),
    )


def transition_command(
    d: Dialect,
    conn: Conn,
    audit: AuditWriter,
    command_id: uuid.UUID,
    *,
    from_states: Collection[str],
    to_state: str,
    at: float,
    actor: str | None,
    worker_id: str | None,
    delivery_claim_token: str | None,
    result: dict[str, Any] | None,
    error: str | None,
) -> CommandRecord | None:
    """The compare-and-set of `Store.transition_command`, with its audit row.

    The read holds the row (Postgres ``FOR UPDATE``; SQLite's write lock),
    so of racing transitions the loser reads the winner's state and misses.
    """
    key = d.uuid_in(command_id)
    row = conn.execute(d.sql("SELECT state FROM commands WHERE id = ?") + d.lock, (key,)).fetchone()
    if row is None or row[0] not in from_states:
        return None
    when = d.ts_in(at)
    updated = conn.execute(
        d.sql(
            "UPDATE commands SET state = ?,"
            " worker_id = COALESCE(?, worker_id),"
            " delivery_claim_token = COALESCE(?, delivery_claim_token),"
            " dispatched_at = COALESCE(?, dispatched_at),"
            " finished_at = COALESCE(?, finished_at),"
            " result = COALESCE(?, result),"
            " error = COALESCE(?, error)"
            f" WHERE id = ? RETURNING {COMMAND_COLUMNS}"
        ),
        (
            to_state,
            worker_id,
            delivery_claim_token,
            when if to_state == "dispatched" else None,
            when if to_state in FINAL_COMMAND_STATES else None,
            d.opt_json_in(result),
            error,
            key,
        ),
    ).fetchone()
    assert updated is not None  # the row is held
    audit(
        conn,
        actor,
        f"command.{to_state}",
        f"command:{command_id}",
        transition_details(row[0], worker_id, error),
    )
    return _rows.command(d, updated)
