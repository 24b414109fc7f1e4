"""Provisioning in the store: archived projects, rotated tokens and signing secrets.

Rotation never cuts a live agent off mid-stream: a rotated token keeps
working until its ``expires_at``, and a project's previous signing-key
generation keeps verifying until ``previous_secret_expires_at``. The
brain's agent endpoint compares those ends with its clock, at connect
(`agent_login`) and on a sweep over live sessions (`credential_deadlines`);
the store only keeps them. Each function runs inside one transaction of
the calling store; the SQL is shared by both stores over their `Dialect`.
"""

from __future__ import annotations

import uuid

from . import _rows
from ._rows import AGENT_COLUMNS, AGENT_WIDTH, PROJECT_COLUMNS, Conn, Dialect
from .base import Agent, AgentLogin, CredentialDeadlines, Project

__all__ = [
    "agent_login",
    "archive_project",
    "credential_deadlines",
    "rotate_agent_token",
    "rotate_project_secret",
    "token_graces",
]

ENDED_TOKENS_KEPT_SECONDS = 3600.0  # a rotation forgets tokens that ended this long ago
_P_COLUMNS = ", ".join(f"p.{c.strip()}" for c in PROJECT_COLUMNS.split(","))


def archive_project(
    d: Dialect, conn: Conn, project_id: uuid.UUID, now: float
) -> list[Agent] | None:
    project = d.uuid_in(project_id)
    cur = conn.execute(
        d.sql("UPDATE projects SET archived_at = ? WHERE id = ? AND archived_at IS NULL"),
        (d.ts_in(now), project),
    )
    if cur.rowcount != 1:
        return None
    rows = conn.execute(
        d.sql(
            f"SELECT {AGENT_COLUMNS} FROM agents a WHERE a.project_id = ? AND a.revoked_at IS NULL"
        ),
        (project,),
    ).fetchall()
    conn.execute(
        d.sql("UPDATE agents SET revoked_at = ? WHERE project_id = ? AND revoked_at IS NULL"),
        (d.ts_in(now), project),
    )
    return [_rows.agent(d, row) for row in rows]


def rotate_agent_token(
    d: Dialect, conn: Conn, agent_id: uuid.UUID, token_hash: bytes, now: float, grace: float
) -> float | None:
    agent = d.uuid_in(agent_id)
    row = conn.execute(
        d.sql("SELECT 1 FROM agents WHERE id = ? AND revoked_at IS NULL") + d.lock, (agent,)
    ).fetchone()
    if row is None:
        return None
    ends = d.ts_in(now + grace)
    # Tokens that ended long ago: the brain's sweep closed their sessions
    # within a second, so keeping them would only grow its reads.
    conn.execute(
        d.sql("DELETE FROM agent_tokens WHERE agent_id = ? AND expires_at <= ?"),
        (agent, d.ts_in(now - ENDED_TOKENS_KEPT_SECONDS)),
    )
    conn.execute(
        d.sql(
            "UPDATE agent_tokens SET expires_at = ? WHERE agent_id = ?"
            " AND (expires_at IS NULL OR expires_at > ?)"
        ),
        (ends, agent, ends),
    )
    conn.execute(
        d.sql("INSERT INTO agent_tokens (token_hash, agent_id, created_at) VALUES (?, ?, ?)"),
        (token_hash, agent, d.ts_in(now)),
    )
    return now + grace


def rotate_project_secret(
    d: Dialect, conn: Conn, project_id: uuid.UUID, now: float, grace: float
) -> Project | None:
    cur = conn.execute(
        d.sql(
            "UPDATE projects SET secret_generation = secret_generation + 1,"
            " previous_secret_expires_at = ? WHERE id = ? AND archived_at IS NULL"
        ),
        (d.ts_in(now + grace), d.uuid_in(project_id)),
    )
    if cur.rowcount != 1:
        return None
    row = conn.execute(
        d.sql(f"SELECT {PROJECT_COLUMNS} FROM projects WHERE id = ?"), (d.uuid_in(project_id),)
    ).fetchone()
    return _rows.project(d, row)


def agent_login(d: Dialect, conn: Conn, token_hash: bytes) -> AgentLogin | None:
    row = conn.execute(
        d.sql(
            f"SELECT {AGENT_COLUMNS}, t.expires_at, {_P_COLUMNS} FROM agent_tokens t"
            " JOIN agents a ON a.id = t.agent_id JOIN projects p ON p.id = a.project_id"
            " WHERE t.token_hash = ? AND a.revoked_at IS NULL"
        ),
        (token_hash,),
    ).fetchone()
    if row is None:
        return None
    return AgentLogin(
        agent=_rows.agent(d, row[:AGENT_WIDTH]),
        token_expires_at=d.opt_ts_out(row[AGENT_WIDTH]),
        project=_rows.project(d, row[AGENT_WIDTH + 1 :]),
    )


def credential_deadlines(d: Dialect, conn: Conn) -> CredentialDeadlines:
    tokens = conn.execute(
        "SELECT token_hash, expires_at FROM agent_tokens WHERE expires_at IS NOT NULL"
    ).fetchall()
    projects = conn.execute(f"SELECT {PROJECT_COLUMNS} FROM projects").fetchall()
    return CredentialDeadlines(
        tokens={bytes(h): d.ts_out(at) for h, at in tokens},
        projects={p.id: p for p in (_rows.project(d, row) for row in projects)},
    )


def token_graces(d: Dialect, conn: Conn, now: float) -> dict[uuid.UUID, float]:
    rows = conn.execute(
        d.sql(
            "SELECT agent_id, max(expires_at) FROM agent_tokens WHERE expires_at > ?"
            " GROUP BY agent_id"
        ),
        (d.ts_in(now),),
    ).fetchall()
    return {d.uuid_out(agent): d.ts_out(at) for agent, at in rows}
