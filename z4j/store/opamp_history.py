"""Each OpAMP agent's history: one row per change an operator sees.

Writes scale with changes (issue 16): a row is added only when a message
changed the agent's description, capabilities, health, effective or
remote configuration status, connection or instance id (the core's
`Change`, less its bookkeeping), or when its desired configuration's
status moved. A heartbeat adds none. Each row holds what changed and the
new summary of each part the API shows on the agent (store/opamp.py's
`record_of`), so a row is bounded by what the agent row is: digests of
configuration files, never their bodies; a summary past `MAX_DETAILS_BYTES`
is kept as its size only.

Rows are written in the same transaction as the state they describe
(`write_history`, called by opamp.write_states), follow an agent given a
new instance id (`move_history`) and go with the leader's upkeep past the
events' retention (`forget_history_before`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any, Final

import orjson

from ._rows import Conn, Dialect
from .base import OpampAgent, OpampHistoryEntry

__all__ = [
    "HISTORY_CHANGES",
    "MAX_DETAILS_BYTES",
    "HistoryRow",
    "forget_history_before",
    "history_details",
    "list_history",
    "move_history",
    "write_history",
]

# What a history row may name, in the order the API lists them.
HISTORY_CHANGES: Final = (
    "connected",
    "disconnected",
    "instance_uid",
    "capabilities",
    "agent_description",
    "health",
    "effective_config",
    "remote_config_status",
    "package_statuses",
    "custom_capabilities",
    "available_components",
    "connection_settings_status",
    "config_status",
)
MAX_DETAILS_BYTES: Final = 64 * 1024

_COLUMNS: Final = "id, project_id, instance_uid, at, changes, details"


def history_details(agent: OpampAgent, changes: Iterable[str]) -> dict[str, Any]:
    """The new summary of each changed part of ``agent`` (the row just written)."""
    details: dict[str, Any] = {}
    for change in changes:
        if change == "agent_description":
            details[change] = {
                "identifying": agent.identifying,
                "non_identifying": agent.non_identifying,
            }
        elif change == "capabilities":
            details[change] = agent.capabilities
        elif change == "health":
            details[change] = agent.health
        elif change == "effective_config":
            details[change] = agent.effective_config
        elif change == "remote_config_status":
            details[change] = agent.remote_config_status
        elif change == "instance_uid":
            details[change] = agent.instance_uid
    return details


HistoryRow = tuple[uuid.UUID, bytes, float, list[str], dict[str, Any]]
"""project, instance uid, when, what changed, the changed parts' new summaries."""


def write_history(d: Dialect, conn: Conn, rows: list[HistoryRow]) -> None:
    """Add the rows in one statement batch; the caller holds the transaction."""
    params = []
    for project_id, instance_uid, at, changes, details in rows:
        size = len(orjson.dumps(details))
        if size > MAX_DETAILS_BYTES:
            details = {"truncated": True, "bytes": size}
        params.append(
            (
                d.uuid_in(project_id),
                instance_uid,
                d.ts_in(at),
                d.json_in(changes),
                d.json_in(details),
            )
        )
    if params:
        conn.cursor().executemany(
            d.sql(
                "INSERT INTO opamp_agent_history (project_id, instance_uid, at, changes, details)"
                " VALUES (?, ?, ?, ?, ?)"
            ),
            params,
        )


def move_history(
    d: Dialect, conn: Conn, project_id: uuid.UUID, old_uid: bytes, new_uid: bytes
) -> None:
    """An agent given a new instance id keeps its history under it."""
    conn.execute(
        d.sql(
            "UPDATE opamp_agent_history SET instance_uid = ?"
            " WHERE project_id = ? AND instance_uid = ?"
        ),
        (new_uid, d.uuid_in(project_id), old_uid),
    )


def list_history(
    d: Dialect,
    conn: Conn,
    project_id: uuid.UUID,
    instance_uid: bytes,
    *,
    before_id: int | None,
    limit: int,
) -> list[OpampHistoryEntry]:
    """Newest first; ``before_id`` continues a page (keyset on ``id``)."""
    sql = f"SELECT {_COLUMNS} FROM opamp_agent_history WHERE project_id = ? AND instance_uid = ?"
    params: list[Any] = [d.uuid_in(project_id), instance_uid]
    if before_id is not None:
        sql += " AND id < ?"
        params.append(before_id)
    sql += " ORDER BY id DESC LIMIT ?"
    params.append(limit)
    return [
        OpampHistoryEntry(
            id=row[0],
            project_id=d.uuid_out(row[1]),
            instance_uid=bytes(row[2]).hex(),
            at=d.ts_out(row[3]),
            changes=list(d.json_out(row[4])),
            details=d.json_out(row[5]),
        )
        for row in conn.execute(d.sql(sql), params).fetchall()
    ]


def forget_history_before(d: Dialect, conn: Conn, before: float, chunk: int) -> int:
    """Delete up to ``chunk`` of the oldest rows older than ``before``; how many went."""
    cur = conn.execute(
        d.sql(
            "DELETE FROM opamp_agent_history WHERE id IN"
            " (SELECT id FROM opamp_agent_history WHERE at < ? ORDER BY at LIMIT ?)"
        ),
        (d.ts_in(before), chunk),
    )
    return int(cur.rowcount)
