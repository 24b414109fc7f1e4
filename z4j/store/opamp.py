"""OpAMP in the store: tokens, and each agent's state with its API summary.

One concern justifies the length (past 700 lines): the OpAMP agent's row,
every write that moves it (group commit, desired configuration, status)
and the summary read back from it; rollouts and history have their own
modules.

The core (`z4j.protocol.opamp.state`) works on an `AgentState`; the store
keeps it as one row of ``opamp_agents`` per (project, instance_uid):

- ``state``: the status parts as one deterministic ``AgentToServer`` (what
  ``AgentState.report`` builds, with sequence number 0), so equal states are
  equal bytes and `state_of` gives back the very parts `receive` compares;
- ``sequence_num``, ``full_state_requests`` and ``disconnected_at`` (not
  connected) in their own columns: the narrow "nothing changed" update
  (`touch_agent`) moves the sequence number without rewriting the state;
- the summary the API shows (attributes, health, configuration), derived
  here when the state is written, never parsed from protobuf per request.

OpAMP's sequence number and capabilities are uint64; Postgres has no
unsigned bigint, so both are folded into the signed range (`_signed`).
Attribute text goes into JSON columns: bytes become hex and NUL characters
(which Postgres's jsonb refuses) become U+FFFD.

Each agent's desired configuration is a row of ``opamp_configs`` (an
`OpampConfig`), read with the agent's row in one store call (`load_agent`)
because every message needs both; pushes and deletes write their audit row
in the same transaction (the store passes its `AuditWriter`), and so does
an agent's acknowledgement (the status moving to applied or failed). A
configuration a rollout assigned carries its ``rollout_id``; any other
push clears it (store/opamp_rollouts.py then counts that target as
superseded).

The SQL is shared by both stores over their `Dialect`, as in tasks.py.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from typing import Any, Final, NamedTuple

import attrs

from ..protocol.opamp import opamp_pb2 as pb
from ..protocol.opamp.attributes import AttributeValue, to_dict
from ..protocol.opamp.flags import AgentCapability
from ..protocol.opamp.remote_config import ConfigFile, config_hash
from ..protocol.opamp.state import STATUS_PARTS, AgentState
from . import opamp_history
from ._rows import Conn, Dialect
from ._transactions import AuditWriter
from .base import OpampAgent, OpampConfig, OpampToken

__all__ = [
    "ACKNOWLEDGEMENTS",
    "CONFIG_COLUMNS",
    "AgentPatch",
    "StateWrite",
    "StatusWrite",
    "add_token",
    "delete_config",
    "get_agent",
    "get_config",
    "get_configs",
    "list_agents",
    "list_configs",
    "list_tokens",
    "load_agent",
    "patch_of",
    "put_config",
    "record_of",
    "revoke_token",
    "save_agent",
    "save_patch",
    "set_config_status",
    "state_of",
    "token_project",
    "touch_agents",
    "write_states",
]

_U64: Final = 1 << 64
_I64: Final = 1 << 63
_HEALTH_DEPTH: Final = 4  # nested component health kept this deep in the summary
# Statuses an agent's report settles a configuration in: each is audited once.
ACKNOWLEDGEMENTS: Final = ("applied", "failed")

TOKEN_COLUMNS: Final = "token_hash, project_id, name, created_at"
AGENT_COLUMNS: Final = (
    "project_id, instance_uid, state, sequence_num, capabilities, full_state_requests,"
    " identifying, non_identifying, health, effective_config, remote_config_status,"
    " transport, first_seen, last_seen, disconnected_at"
)
CONFIG_COLUMNS: Final = (
    "project_id, instance_uid, config_hash, files, created_at, created_by, status,"
    " error_message, status_at, rollout_id"
)


def _signed(value: int) -> int:
    return value - _U64 if value >= _I64 else value


def _unsigned(value: int) -> int:
    return value + _U64 if value < 0 else value


# -- the state and its summary -------------------------------------------------------


def record_of(
    project_id: uuid.UUID,
    state: AgentState,
    *,
    transport: str,
    first_seen: float,
    last_seen: float,
    disconnected_at: float | None,
) -> OpampAgent:
    """The row for ``state``: its encoding, and its summary for the API."""
    full = state.report()
    full.sequence_num = 0  # its own column
    description = full.agent_description if full.HasField("agent_description") else None
    return OpampAgent(
        project_id=project_id,
        instance_uid=state.instance_uid.hex(),
        identifying=_attributes(description, "identifying_attributes"),
        non_identifying=_attributes(description, "non_identifying_attributes"),
        capabilities=capability_names(state.capabilities),
        health=_health(full.health, 0) if full.HasField("health") else None,
        effective_config=(
            _effective_config(full.effective_config) if full.HasField("effective_config") else None
        ),
        remote_config_status=(
            _remote_config_status(full.remote_config_status)
            if full.HasField("remote_config_status")
            else None
        ),
        sequence_num=state.sequence_num,
        transport=transport,
        first_seen=first_seen,
        last_seen=last_seen,
        disconnected_at=None if state.connected else disconnected_at,
        state=full.SerializeToString(deterministic=True),
        full_state_requests=state.full_state_requests,
    )


@attrs.frozen(kw_only=True)
class AgentPatch:
    """A known agent whose message moved only its remote configuration status
    and the sequence bookkeeping (every acknowledgement in a rollout): its
    row is updated in place. The summary columns a full write derives
    (attributes, capabilities, health, effective configuration) are not
    derived again, which was most of an acknowledgement's cost (`record_of`).

    Read like the `OpampAgent` it stands for where the fleet needs its
    times and id; ``agent_state`` rebuilds the whole row if the row has
    gone meanwhile (`save_patch`)."""

    project_id: uuid.UUID
    instance_uid: str  # 32 hex digits
    agent_state: AgentState = attrs.field(eq=False, repr=False)
    state: bytes = attrs.field(repr=False)
    remote_config_status: dict[str, Any] | None
    transport: str
    first_seen: float
    last_seen: float
    disconnected_at: float | None

    @property
    def sequence_num(self) -> int:
        return self.agent_state.sequence_num

    @property
    def full_state_requests(self) -> int:
        return self.agent_state.full_state_requests


def patch_of(
    project_id: uuid.UUID,
    state: AgentState,
    *,
    transport: str,
    first_seen: float,
    last_seen: float,
    disconnected_at: float | None,
) -> AgentPatch:
    """What `record_of` would write of ``state`` when only its remote
    configuration status (or the sequence bookkeeping) moved."""
    full = state.report()
    full.sequence_num = 0
    return AgentPatch(
        project_id=project_id,
        instance_uid=state.instance_uid.hex(),
        agent_state=state,
        state=full.SerializeToString(deterministic=True),
        remote_config_status=(
            _remote_config_status(full.remote_config_status)
            if full.HasField("remote_config_status")
            else None
        ),
        transport=transport,
        first_seen=first_seen,
        last_seen=last_seen,
        disconnected_at=None if state.connected else disconnected_at,
    )


def state_of(agent: OpampAgent) -> AgentState:
    """The core's state back from a row `record_of` wrote."""
    full = pb.AgentToServer.FromString(agent.state)
    parts = {
        part.value: getattr(full, part.value).SerializeToString(deterministic=True)
        for part in STATUS_PARTS
        if full.HasField(part.value)
    }
    return AgentState(
        instance_uid=bytes.fromhex(agent.instance_uid),
        sequence_num=agent.sequence_num,
        capabilities=AgentCapability(full.capabilities),
        connected=agent.disconnected_at is None,
        full_state_requests=agent.full_state_requests,
        **parts,
    )


def capability_names(capabilities: AgentCapability) -> list[str]:
    return list(_capability_names(int(capabilities)))


@functools.lru_cache(maxsize=256)
def _capability_names(bits: int) -> tuple[str, ...]:
    """Agents of a fleet share a few capability sets: named once each
    (iterating the flag enum per message cost more than the message)."""
    capabilities = AgentCapability(bits)
    return tuple(c.name for c in AgentCapability if c in capabilities and c.name is not None)


def _clean(value: AttributeValue) -> Any:
    """An attribute value JSON (and jsonb) can hold."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    return value


def _attributes(description: pb.AgentDescription | None, field: str) -> dict[str, Any]:
    if description is None:
        return {}
    cleaned: dict[str, Any] = _clean(to_dict(getattr(description, field)))
    return cleaned


def _health(health: pb.ComponentHealth, depth: int) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "healthy": health.healthy,
        "status": _clean(health.status),
        "last_error": _clean(health.last_error),
        "start_time_unix_nano": health.start_time_unix_nano,
        "status_time_unix_nano": health.status_time_unix_nano,
    }
    if depth < _HEALTH_DEPTH and health.component_health_map:
        summary["components"] = {
            _clean(name): _health(component, depth + 1)
            for name, component in sorted(health.component_health_map.items())
        }
    return summary


def _effective_config(config: pb.EffectiveConfig) -> dict[str, Any]:
    """File names, types, sizes and digests, and the hash z4j would give these
    files as a remote configuration (`config_hash`), so the two compare."""
    files = config.config_map.config_map
    return {
        "config_hash": config_hash(
            {
                name: ConfigFile(body=f.body, content_type=f.content_type)
                for name, f in files.items()
            }
        ).hex(),
        "files": [
            {
                "name": _clean(name),
                "content_type": _clean(f.content_type),
                "bytes": len(f.body),
                "sha256": hashlib.sha256(f.body).hexdigest(),
            }
            for name, f in sorted(files.items())
        ],
    }


_CONFIG_STATUS: Final = {
    pb.RemoteConfigStatus.STATUS_UNSET: "unset",
    pb.RemoteConfigStatus.STATUS_APPLIED: "applied",
    pb.RemoteConfigStatus.STATUS_APPLYING: "applying",
    pb.RemoteConfigStatus.STATUS_FAILED: "failed",
}


def _remote_config_status(status: pb.RemoteConfigStatus) -> dict[str, Any]:
    return {
        "last_remote_config_hash": status.last_remote_config_hash.hex(),
        "status": _CONFIG_STATUS.get(status.status, str(status.status)),
        "error_message": _clean(status.error_message),
    }


# -- SQL --------------------------------------------------------------------------------


def add_token(
    d: Dialect, conn: Conn, project_id: uuid.UUID, token_hash: bytes, name: str, now: float
) -> None:
    project = d.uuid_in(project_id)
    if conn.execute(d.sql("SELECT 1 FROM projects WHERE id = ?"), (project,)).fetchone() is None:
        raise LookupError(f"no project with id {project_id}")
    conn.execute(
        d.sql(
            "INSERT INTO opamp_tokens (token_hash, project_id, name, created_at)"
            " VALUES (?, ?, ?, ?)"
        ),
        (token_hash, project, name, d.ts_in(now)),
    )


def token_project(d: Dialect, conn: Conn, token_hash: bytes) -> uuid.UUID | None:
    row = conn.execute(
        d.sql("SELECT project_id FROM opamp_tokens WHERE token_hash = ?"), (token_hash,)
    ).fetchone()
    return None if row is None else d.uuid_out(row[0])


def list_tokens(d: Dialect, conn: Conn) -> list[OpampToken]:
    rows = conn.execute(
        f"SELECT {TOKEN_COLUMNS} FROM opamp_tokens ORDER BY created_at, token_hash"
    ).fetchall()
    return [
        OpampToken(
            token_hash=bytes(token_hash),
            project_id=d.uuid_out(project_id),
            name=name,
            created_at=d.ts_out(created_at),
        )
        for token_hash, project_id, name, created_at in rows
    ]


def revoke_token(d: Dialect, conn: Conn, token_hash: bytes) -> bool:
    cur = conn.execute(d.sql("DELETE FROM opamp_tokens WHERE token_hash = ?"), (token_hash,))
    return bool(cur.rowcount == 1)


def get_agent(
    d: Dialect, conn: Conn, project_id: uuid.UUID, instance_uid: bytes
) -> OpampAgent | None:
    row = conn.execute(
        d.sql(
            f"SELECT {AGENT_COLUMNS} FROM opamp_agents WHERE project_id = ? AND instance_uid = ?"
        ),
        (d.uuid_in(project_id), instance_uid),
    ).fetchone()
    return None if row is None else _agent(d, row)


def list_agents(
    d: Dialect, conn: Conn, project_id: uuid.UUID | None, instance_uid: bytes | None
) -> list[OpampAgent]:
    terms, params = [], []
    if project_id is not None:
        terms.append("project_id = ?")
        params.append(d.uuid_in(project_id))
    if instance_uid is not None:
        terms.append("instance_uid = ?")
        params.append(instance_uid)
    where = (" WHERE " + " AND ".join(terms)) if terms else ""
    rows = conn.execute(
        d.sql(f"SELECT {AGENT_COLUMNS} FROM opamp_agents{where} ORDER BY project_id, instance_uid"),
        params,
    ).fetchall()
    return [_agent(d, row) for row in rows]


def save_agent(d: Dialect, conn: Conn, agent: OpampAgent, replaces: bytes | None) -> None:
    """Insert or replace the row; the caller holds the transaction."""
    project = d.uuid_in(agent.project_id)
    if replaces is not None:
        conn.execute(
            d.sql("DELETE FROM opamp_agents WHERE project_id = ? AND instance_uid = ?"),
            (project, replaces),
        )
        # Its desired configuration follows it to the new id (which has none).
        conn.execute(
            d.sql(
                "UPDATE opamp_configs SET instance_uid = ? WHERE project_id = ? AND instance_uid = ?"
                " AND NOT EXISTS (SELECT 1 FROM opamp_configs"
                " WHERE project_id = ? AND instance_uid = ?)"
            ),
            (
                bytes.fromhex(agent.instance_uid),
                project,
                replaces,
                project,
                bytes.fromhex(agent.instance_uid),
            ),
        )
    columns = [c.strip() for c in AGENT_COLUMNS.split(",")]
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns[2:])
    conn.execute(
        d.sql(
            f"INSERT INTO opamp_agents ({AGENT_COLUMNS}) VALUES ({', '.join('?' * len(columns))})"
            f" ON CONFLICT (project_id, instance_uid) DO UPDATE SET {updates}"
        ),
        (
            project,
            bytes.fromhex(agent.instance_uid),
            agent.state,
            _signed(agent.sequence_num),
            _signed(int(AgentCapability(_names_to_bits(agent.capabilities)))),
            agent.full_state_requests,
            d.json_in(agent.identifying),
            d.json_in(agent.non_identifying),
            d.opt_json_in(agent.health),
            d.opt_json_in(agent.effective_config),
            d.opt_json_in(agent.remote_config_status),
            agent.transport,
            d.ts_in(agent.first_seen),
            d.ts_in(agent.last_seen),
            d.opt_ts_in(agent.disconnected_at),
        ),
    )


def save_patch(d: Dialect, conn: Conn, patch: AgentPatch) -> None:
    """Update the columns a patch moves; the caller holds the transaction.
    A row gone meanwhile (replaced or forgotten by another replica) is
    written whole from the patch's state, as `save_agent` would."""
    cur = conn.execute(
        d.sql(
            "UPDATE opamp_agents SET state = ?, sequence_num = ?, full_state_requests = ?,"
            " remote_config_status = ?, transport = ?, last_seen = ?, disconnected_at = ?"
            " WHERE project_id = ? AND instance_uid = ?"
        ),
        (
            patch.state,
            _signed(patch.sequence_num),
            patch.full_state_requests,
            d.opt_json_in(patch.remote_config_status),
            patch.transport,
            d.ts_in(patch.last_seen),
            d.opt_ts_in(patch.disconnected_at),
            d.uuid_in(patch.project_id),
            bytes.fromhex(patch.instance_uid),
        ),
    )
    if cur.rowcount == 0:
        record = record_of(
            patch.project_id,
            patch.agent_state,
            transport=patch.transport,
            first_seen=patch.first_seen,
            last_seen=patch.last_seen,
            disconnected_at=patch.disconnected_at,
        )
        save_agent(d, conn, record, None)


Touch = tuple[uuid.UUID, bytes, int, float]  # (project, instance_uid, sequence_num, seen at)


def touch_agents(d: Dialect, conn: Conn, touches: list[Touch]) -> None:
    """Move ``last_seen`` and ``sequence_num`` of agents whose messages changed
    nothing, in one statement per batch. A row written since the touch was
    made (``last_seen`` already at or past it, by a change here or on
    another replica) is left alone: the newer row wins."""
    conn.cursor().executemany(
        d.sql(
            "UPDATE opamp_agents SET last_seen = ?, sequence_num = ?"
            " WHERE project_id = ? AND instance_uid = ? AND last_seen < ?"
        ),
        [
            (d.ts_in(now), _signed(seq), d.uuid_in(project), uid, d.ts_in(now))
            for project, uid, seq, now in touches
        ],
    )


def _names_to_bits(names: list[str]) -> int:
    bits = 0
    for name in names:
        bits |= AgentCapability[name]
    return bits


def _agent(d: Dialect, row: Any) -> OpampAgent:
    (
        project_id,
        instance_uid,
        state,
        sequence_num,
        capabilities,
        full_state_requests,
        identifying,
        non_identifying,
        health,
        effective_config,
        remote_config_status,
        transport,
        first_seen,
        last_seen,
        disconnected_at,
    ) = row
    return OpampAgent(
        project_id=d.uuid_out(project_id),
        instance_uid=bytes(instance_uid).hex(),
        identifying=d.json_out(identifying),
        non_identifying=d.json_out(non_identifying),
        capabilities=capability_names(AgentCapability(_unsigned(capabilities))),
        health=d.opt_json_out(health),
        effective_config=d.opt_json_out(effective_config),
        remote_config_status=d.opt_json_out(remote_config_status),
        sequence_num=_unsigned(sequence_num),
        transport=transport,
        first_seen=d.ts_out(first_seen),
        last_seen=d.ts_out(last_seen),
        disconnected_at=d.opt_ts_out(disconnected_at),
        state=bytes(state),
        full_state_requests=full_state_requests,
    )


# -- the desired configuration ------------------------------------------------------------


def get_config(
    d: Dialect, conn: Conn, project_id: uuid.UUID, instance_uid: bytes
) -> OpampConfig | None:
    row = conn.execute(
        d.sql(
            f"SELECT {CONFIG_COLUMNS} FROM opamp_configs WHERE project_id = ? AND instance_uid = ?"
        ),
        (d.uuid_in(project_id), instance_uid),
    ).fetchone()
    return None if row is None else _config(d, row)


def get_configs(
    d: Dialect, conn: Conn, project_id: uuid.UUID, instance_uids: list[bytes]
) -> dict[bytes, OpampConfig]:
    """Many agents' desired configurations, by instance_uid (those that have one)."""
    found: dict[bytes, OpampConfig] = {}
    for start in range(0, len(instance_uids), 500):
        chunk = instance_uids[start : start + 500]
        rows = conn.execute(
            d.sql(
                f"SELECT {CONFIG_COLUMNS} FROM opamp_configs WHERE project_id = ?"
                f" AND instance_uid IN ({', '.join('?' * len(chunk))})"
            ),
            (d.uuid_in(project_id), *chunk),
        ).fetchall()
        for row in rows:
            config = _config(d, row)
            found[bytes.fromhex(config.instance_uid)] = config
    return found


_LOAD_COLUMNS: Final = CONFIG_COLUMNS.replace(
    "files", "CASE WHEN status = 'applied' THEN NULL ELSE files END"
)


def load_agent(
    d: Dialect, conn: Conn, project_id: uuid.UUID, instance_uid: bytes
) -> tuple[OpampAgent | None, OpampConfig | None]:
    """Both reads on one connection, in one trip to the store's thread. An
    applied configuration comes without its files (``{}``): a poll from an
    agent that runs it does not need them (brain/http/opamp.py)."""
    row = conn.execute(
        d.sql(
            f"SELECT {_LOAD_COLUMNS} FROM opamp_configs WHERE project_id = ? AND instance_uid = ?"
        ),
        (d.uuid_in(project_id), instance_uid),
    ).fetchone()
    return get_agent(d, conn, project_id, instance_uid), None if row is None else _config(d, row)


_SUMMARY_COLUMNS: Final = CONFIG_COLUMNS.replace("files", "NULL")


def list_configs(d: Dialect, conn: Conn, project_id: uuid.UUID | None) -> list[OpampConfig]:
    """Every desired configuration (of one project or all) without its files
    (``{}``): hash and status are what a fleet listing shows."""
    where, params = "", []
    if project_id is not None:
        where = " WHERE project_id = ?"
        params.append(d.uuid_in(project_id))
    rows = conn.execute(
        d.sql(f"SELECT {_SUMMARY_COLUMNS} FROM opamp_configs{where}"), params
    ).fetchall()
    return [_config(d, row) for row in rows]


def _subject(project_id: uuid.UUID, instance_uid: str) -> str:
    return f"opamp:{project_id}/{instance_uid}"


def put_config(
    d: Dialect, conn: Conn, config: OpampConfig, actor: str | None, audit: AuditWriter
) -> None:
    """Insert or replace; the caller holds the transaction."""
    columns = [c.strip() for c in CONFIG_COLUMNS.split(",")]
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns[2:])
    conn.execute(
        d.sql(
            f"INSERT INTO opamp_configs ({CONFIG_COLUMNS})"
            f" VALUES ({', '.join('?' * len(columns))})"
            f" ON CONFLICT (project_id, instance_uid) DO UPDATE SET {updates}"
        ),
        (
            d.uuid_in(config.project_id),
            bytes.fromhex(config.instance_uid),
            bytes.fromhex(config.config_hash),
            d.json_in(config.files),
            d.ts_in(config.created_at),
            config.created_by,
            config.status,
            config.error_message,
            d.ts_in(config.status_at),
            d.opt_uuid_in(config.rollout_id),
        ),
    )
    details: dict[str, Any] = {
        "config_hash": config.config_hash,
        "files": sorted(config.files),
        "bytes": sum(len(f["body"].encode()) for f in config.files.values()),
        "status": config.status,
    }
    if config.rollout_id is not None:
        details["rollout_id"] = str(config.rollout_id)
    audit(
        conn,
        actor,
        "opamp.config.pushed",
        _subject(config.project_id, config.instance_uid),
        details,
    )


def delete_config(
    d: Dialect,
    conn: Conn,
    project_id: uuid.UUID,
    instance_uid: bytes,
    actor: str | None,
    audit: AuditWriter,
) -> bool:
    found = get_config(d, conn, project_id, instance_uid)
    if found is None:
        return False
    conn.execute(
        d.sql("DELETE FROM opamp_configs WHERE project_id = ? AND instance_uid = ?"),
        (d.uuid_in(project_id), instance_uid),
    )
    audit(
        conn,
        actor,
        "opamp.config.deleted",
        _subject(project_id, instance_uid.hex()),
        {"config_hash": found.config_hash, "status": found.status},
    )
    return True


@attrs.frozen
class StatusWrite:
    """A configuration's status to move (`set_config_status`'s arguments)."""

    project_id: uuid.UUID
    instance_uid: bytes
    config_hash: bytes
    status: str
    error_message: str
    now: float


class StateWrite(NamedTuple):
    """One agent's writes after one message: its row (and the instance_uid it
    replaces), its configuration's status (either may be None), and what in
    the row changed that its history keeps (opamp_history.HISTORY_CHANGES)."""

    record: OpampAgent | AgentPatch | None
    replaces: bytes | None
    status: StatusWrite | None
    changes: tuple[str, ...] = ()


def write_states(d: Dialect, conn: Conn, writes: list[StateWrite], audit: AuditWriter) -> int:
    """Many agents' writes in the caller's one transaction (a group commit:
    one fsync for a burst of acknowledgements, not two per agent), each with
    its history row; how many configuration statuses moved (one that
    another has replaced stays)."""
    moved = 0
    history: list[opamp_history.HistoryRow] = []
    for record, replaces, status, changes in writes:
        names = list(changes)
        details: dict[str, Any] = {}
        if isinstance(record, AgentPatch):
            save_patch(d, conn, record)
            if "remote_config_status" in changes:  # the one part a patch can move
                details["remote_config_status"] = record.remote_config_status
        elif record is not None:
            save_agent(d, conn, record, replaces)
            if replaces is not None:
                opamp_history.move_history(
                    d, conn, record.project_id, replaces, bytes.fromhex(record.instance_uid)
                )
            details = opamp_history.history_details(record, changes)
        if status is not None and set_config_status(
            d,
            conn,
            status.project_id,
            status.instance_uid,
            status.config_hash,
            status.status,
            status.error_message,
            status.now,
            audit,
        ):
            moved += 1
            names.append("config_status")
            details["config_status"] = {
                "config_hash": status.config_hash.hex(),
                "status": status.status,
                "error_message": status.error_message,
            }
        if not names:
            continue
        if record is not None:
            project_id, uid, at = (
                record.project_id,
                bytes.fromhex(record.instance_uid),
                record.last_seen,
            )
        else:
            assert status is not None  # a status moved: it named "config_status"
            project_id, uid, at = status.project_id, status.instance_uid, status.now
        history.append((project_id, uid, at, names, details))
    opamp_history.write_history(d, conn, history)
    return moved


def set_config_status(
    d: Dialect,
    conn: Conn,
    project_id: uuid.UUID,
    instance_uid: bytes,
    config_hash: bytes,
    status: str,
    error_message: str,
    now: float,
    audit: AuditWriter,
) -> bool:
    """Move the status; an acknowledgement (applied, failed) is audited with it,
    and the caller writes only when the status moves, so never per poll."""
    # RETURNING: the rollout an acknowledgement is audited under comes with
    # the update, not from a second statement per agent.
    rows = conn.execute(
        d.sql(
            "UPDATE opamp_configs SET status = ?, error_message = ?, status_at = ?"
            " WHERE project_id = ? AND instance_uid = ? AND config_hash = ?"
            " RETURNING rollout_id"
        ),
        (
            status,
            error_message,
            d.ts_in(now),
            d.uuid_in(project_id),
            instance_uid,
            config_hash,
        ),
    ).fetchall()  # all of it, so the statement is done before the next
    if not rows:
        return False
    row = rows[0]
    if status in ACKNOWLEDGEMENTS:
        details: dict[str, Any] = {"config_hash": config_hash.hex()}
        if status == "failed":
            details["error_message"] = error_message
        if row[0] is not None:
            details["rollout_id"] = str(d.uuid_out(row[0]))
        audit(
            conn,
            "opamp-agent",
            f"opamp.config.{status}",
            _subject(project_id, instance_uid.hex()),
            details,
        )
    return True


def _config(d: Dialect, row: Any) -> OpampConfig:
    (
        project_id,
        instance_uid,
        hash_,
        files,
        created_at,
        created_by,
        status,
        error_message,
        status_at,
        rollout_id,
    ) = row
    return OpampConfig(
        project_id=d.uuid_out(project_id),
        instance_uid=bytes(instance_uid).hex(),
        config_hash=bytes(hash_).hex(),
        files={} if files is None else d.json_out(files),
        created_at=d.ts_out(created_at),
        created_by=created_by,
        status=status,
        error_message=error_message,
        status_at=d.ts_out(status_at),
        rollout_id=d.opt_uuid_out(rollout_id),
    )
