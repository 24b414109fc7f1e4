"""OpAMP rollouts in the store: the rollout, its fixed targets, their configurations.

A rollout is one row of ``opamp_rollouts``; its targets (the agents its
selector matched when it started, z4j/opamp_rollouts.py) are rows of
``opamp_rollout_targets`` in stage order. Assigning a stage writes each of
those agents' desired configuration (``opamp_configs``, with the rollout's
id, through `opamp.put_config`, audited per agent) and moves the rollout's
stage in the same transaction, only if no one moved it first (a compare on
the stage under the row lock), so two leaders for a moment cannot assign a
stage twice. A target's status is its configuration's, while that
configuration is still this rollout's; one replaced or deleted since is
``superseded``.

Every step is audited in its transaction: ``opamp.rollout.created``,
``.stage``, ``.halted``, ``.completed``, ``.resumed``, ``.cancelled``
(subject ``opamp-rollout:ID``).

The SQL is shared by both stores over their `Dialect`, as in opamp.py.
"""

from __future__ import annotations

import uuid
from typing import Any, Final

from ..opamp_rollouts import TARGET_STATUSES, Progress, matches, order_targets, stage_ends
from ..protocol.opamp.flags import AgentCapability
from . import opamp
from ._rows import Conn, Dialect
from ._transactions import AuditWriter
from .base import OpampConfig, OpampRollout

__all__ = [
    "assign_stage",
    "create_rollout",
    "gauges",
    "get_rollout",
    "list_rollouts",
    "transition",
]

ROLLOUT_COLUMNS: Final = (
    "id, project_id, selector, config_hash, canary_percent, batch_size,"
    " failure_threshold_percent, state, stage, stages, targets, assigned, accepted_failures,"
    " halted_reason, created_at, created_by, updated_at"
)
# (from, to) -> the audit action's last word
_MOVES: Final = {
    ("running", "halted"): "halted",
    ("running", "completed"): "completed",
    ("halted", "running"): "resumed",
    ("running", "cancelled"): "cancelled",
    ("halted", "cancelled"): "cancelled",
}


def _subject(rollout_id: uuid.UUID) -> str:
    return f"opamp-rollout:{rollout_id}"


def create_rollout(
    d: Dialect,
    conn: Conn,
    rollout_id: uuid.UUID,
    *,
    project_id: uuid.UUID,
    selector: dict[str, str],
    files: dict[str, Any],
    config_hash: str,
    canary_percent: int,
    batch_size: int,
    failure_threshold_percent: int,
    actor: str | None,
    now: float,
    audit: AuditWriter,
) -> OpampRollout:
    """Insert the rollout and its targets; the caller holds the transaction."""
    project = d.uuid_in(project_id)
    if conn.execute(d.sql("SELECT 1 FROM projects WHERE id = ?"), (project,)).fetchone() is None:
        raise LookupError(f"no project with id {project_id}")
    rows = conn.execute(
        d.sql(
            "SELECT instance_uid, identifying, non_identifying, capabilities"
            " FROM opamp_agents WHERE project_id = ?"
        ),
        (project,),
    ).fetchall()
    accepts = int(AgentCapability.ACCEPTS_REMOTE_CONFIG)
    chosen = [
        bytes(uid)
        for uid, identifying, non_identifying, capabilities in rows
        if capabilities & accepts
        and matches(selector, d.json_out(identifying), d.json_out(non_identifying))
    ]
    targets = order_targets(rollout_id, chosen)
    ends = stage_ends(len(targets), canary_percent, batch_size)
    conn.execute(
        d.sql(
            f"INSERT INTO opamp_rollouts ({ROLLOUT_COLUMNS}, files)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, 'running', 0, ?, ?, 0, 0, NULL, ?, ?, ?, ?)"
        ),
        (
            d.uuid_in(rollout_id),
            project,
            d.json_in(selector),
            bytes.fromhex(config_hash),
            canary_percent,
            batch_size,
            failure_threshold_percent,
            len(ends),
            len(targets),
            d.ts_in(now),
            actor,
            d.ts_in(now),
            d.json_in(files),
        ),
    )
    if targets:
        conn.cursor().executemany(
            d.sql(
                "INSERT INTO opamp_rollout_targets (rollout_id, position, instance_uid)"
                " VALUES (?, ?, ?)"
            ),
            [(d.uuid_in(rollout_id), n, uid) for n, uid in enumerate(targets)],
        )
    audit(
        conn,
        actor,
        "opamp.rollout.created",
        _subject(rollout_id),
        {
            "project_id": str(project_id),
            "selector": selector,
            "config_hash": config_hash,
            "canary_percent": canary_percent,
            "batch_size": batch_size,
            "failure_threshold_percent": failure_threshold_percent,
            "targets": len(targets),
            "stages": len(ends),
        },
    )
    found = get_rollout(d, conn, rollout_id)
    assert found is not None
    return found


def get_rollout(
    d: Dialect, conn: Conn, rollout_id: uuid.UUID, *, lock: bool = False
) -> OpampRollout | None:
    row = conn.execute(
        d.sql(f"SELECT {ROLLOUT_COLUMNS} FROM opamp_rollouts WHERE id = ?")
        + (d.lock if lock else ""),
        (d.uuid_in(rollout_id),),
    ).fetchone()
    return None if row is None else _rollout(d, conn, row)


def list_rollouts(
    d: Dialect, conn: Conn, project_id: uuid.UUID | None, state: str | None
) -> list[OpampRollout]:
    terms, params = [], []
    if project_id is not None:
        terms.append("project_id = ?")
        params.append(d.uuid_in(project_id))
    if state is not None:
        terms.append("state = ?")
        params.append(state)
    where = (" WHERE " + " AND ".join(terms)) if terms else ""
    rows = conn.execute(
        d.sql(f"SELECT {ROLLOUT_COLUMNS} FROM opamp_rollouts{where} ORDER BY created_at DESC, id"),
        params,
    ).fetchall()
    return [_rollout(d, conn, row) for row in rows]


def _counts(d: Dialect, conn: Conn, rollout_id: Any, project_id: Any, assigned: int) -> Progress:
    """The statuses of the first ``assigned`` targets (one query, grouped)."""
    if not assigned:
        return Progress()
    rows = conn.execute(
        d.sql(
            "SELECT c.status, count(*) FROM opamp_rollout_targets t"
            " LEFT JOIN opamp_configs c ON c.project_id = ? AND c.instance_uid = t.instance_uid"
            " AND c.rollout_id = t.rollout_id"
            " WHERE t.rollout_id = ? AND t.position < ? GROUP BY c.status"
        ),
        (project_id, rollout_id, assigned),
    ).fetchall()
    counts = {status or "superseded": int(n) for status, n in rows}
    return Progress.of({s: counts.get(s, 0) for s in TARGET_STATUSES})


def _rollout(d: Dialect, conn: Conn, row: Any) -> OpampRollout:
    (
        id_,
        project_id,
        selector,
        config_hash,
        canary_percent,
        batch_size,
        failure_threshold_percent,
        state,
        stage,
        stages,
        targets,
        assigned,
        accepted_failures,
        halted_reason,
        created_at,
        created_by,
        updated_at,
    ) = row
    return OpampRollout(
        id=d.uuid_out(id_),
        project_id=d.uuid_out(project_id),
        selector=d.json_out(selector),
        config_hash=bytes(config_hash).hex(),
        canary_percent=canary_percent,
        batch_size=batch_size,
        failure_threshold_percent=failure_threshold_percent,
        state=state,
        stage=stage,
        stages=stages,
        targets=targets,
        assigned=assigned,
        accepted_failures=accepted_failures,
        counts=_counts(d, conn, id_, project_id, assigned).as_dict(),
        halted_reason=halted_reason,
        created_at=d.ts_out(created_at),
        created_by=created_by,
        updated_at=d.ts_out(updated_at),
    )


def _initial_status(d: Dialect, conn: Conn, project: Any, uid: bytes, digest: str) -> str:
    """What the agent last reported about ``digest`` (as the API's push does):
    one that already runs it shows applied at once."""
    row = conn.execute(
        d.sql(
            "SELECT remote_config_status FROM opamp_agents WHERE project_id = ? AND instance_uid = ?"
        ),
        (project, uid),
    ).fetchone()
    reported = None if row is None else d.opt_json_out(row[0])
    if not reported or reported.get("last_remote_config_hash") != digest:
        return "pending"
    status = reported.get("status")
    return status if status in ("applying", "applied", "failed") else "pending"


def assign_stage(
    d: Dialect,
    conn: Conn,
    rollout_id: uuid.UUID,
    stage: int,
    end: int,
    now: float,
    audit: AuditWriter,
) -> list[bytes] | None:
    """Assign stage ``stage`` up to target ``end``; the caller holds the transaction."""
    rollout = get_rollout(d, conn, rollout_id, lock=True)
    if rollout is None or rollout.state != "running" or rollout.stage != stage - 1:
        return None
    key = d.uuid_in(rollout_id)
    files = d.json_out(
        conn.execute(d.sql("SELECT files FROM opamp_rollouts WHERE id = ?"), (key,)).fetchone()[0]
    )
    uids = [
        bytes(uid)
        for (uid,) in conn.execute(
            d.sql(
                "SELECT instance_uid FROM opamp_rollout_targets"
                " WHERE rollout_id = ? AND position >= ? AND position < ? ORDER BY position"
            ),
            (key, rollout.assigned, end),
        ).fetchall()
    ]
    actor = f"rollout:{rollout_id}"
    project = d.uuid_in(rollout.project_id)
    for uid in uids:
        status = _initial_status(d, conn, project, uid, rollout.config_hash)
        opamp.put_config(
            d,
            conn,
            OpampConfig(
                project_id=rollout.project_id,
                instance_uid=uid.hex(),
                config_hash=rollout.config_hash,
                files=files,
                created_at=now,
                created_by=actor,
                status=status,
                error_message="",
                status_at=now,
                rollout_id=rollout_id,
            ),
            actor,
            audit,
        )
    conn.execute(
        d.sql("UPDATE opamp_rollouts SET stage = ?, assigned = ?, updated_at = ? WHERE id = ?"),
        (stage, max(end, rollout.assigned), d.ts_in(now), key),
    )
    audit(
        conn,
        actor,
        "opamp.rollout.stage",
        _subject(rollout_id),
        {"stage": stage, "stages": rollout.stages, "agents": len(uids), "assigned": end},
    )
    return uids


def transition(
    d: Dialect,
    conn: Conn,
    rollout_id: uuid.UUID,
    to_state: str,
    reason: str | None,
    actor: str | None,
    now: float,
    audit: AuditWriter,
) -> OpampRollout:
    """Move the rollout (see `_MOVES`); the caller holds the transaction."""
    rollout = get_rollout(d, conn, rollout_id, lock=True)
    if rollout is None:
        raise LookupError(f"no rollout {rollout_id}")
    action = _MOVES.get((rollout.state, to_state))
    if action is None:
        raise ValueError(f"rollout {rollout_id} is {rollout.state}: it cannot be {to_state}")
    accepted = rollout.counts["failed"] if action == "resumed" else rollout.accepted_failures
    halted_reason = reason if to_state == "halted" else None
    conn.execute(
        d.sql(
            "UPDATE opamp_rollouts SET state = ?, halted_reason = ?, accepted_failures = ?,"
            " updated_at = ? WHERE id = ?"
        ),
        (to_state, halted_reason, accepted, d.ts_in(now), d.uuid_in(rollout_id)),
    )
    details: dict[str, Any] = {"stage": rollout.stage, "counts": rollout.counts}
    if reason is not None:
        details["reason"] = reason
    audit(conn, actor, f"opamp.rollout.{action}", _subject(rollout_id), details)
    found = get_rollout(d, conn, rollout_id)
    assert found is not None
    return found


def gauges(d: Dialect, conn: Conn) -> tuple[dict[str, int], dict[str, int]]:
    """Rollouts by state, and desired configurations by status."""
    rollouts = conn.execute("SELECT state, count(*) FROM opamp_rollouts GROUP BY state").fetchall()
    configs = conn.execute("SELECT status, count(*) FROM opamp_configs GROUP BY status").fetchall()
    return {s: int(n) for s, n in rollouts}, {s: int(n) for s, n in configs}
