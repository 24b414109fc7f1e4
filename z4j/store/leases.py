"""The SQL of replica coordination: session ownership, the leader lease, NOTIFY.

`z4j.brain.registry` decides when to run these (its docstring has the theory of
operation); they live here because all SQL lives in `z4j.store`. Each is a
plain function run on a pooled connection by `PgPool.run` (a worker thread),
so the registry keeps no SQL and this module keeps no Trio.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

import psycopg

__all__ = [
    "LEASE_NAME",
    "Key",
    "acquire",
    "announce_command",
    "leader_upkeep",
    "listen_on",
    "notify",
    "release",
    "renew",
    "take_lease",
]

LEASE_NAME = "maintenance"

Key = tuple[uuid.UUID, str]


def acquire(
    conn: psycopg.Connection[Any], agent_id: uuid.UUID, worker_id: str, me: uuid.UUID, ttl: float
) -> tuple[int, uuid.UUID | None]:
    """Own the worker's session under a fresh fencing token; (token, previous live owner)."""
    previous = conn.execute(
        "SELECT instance_id FROM agent_sessions WHERE agent_id = %s AND worker_id = %s"
        " AND expires_at > now() FOR UPDATE",
        (agent_id, worker_id),
    ).fetchone()
    row = conn.execute(
        "INSERT INTO agent_sessions (agent_id, worker_id, instance_id, fencing_token, expires_at)"
        " VALUES (%s, %s, %s, nextval('z4j_fencing_tokens'), now() + %s * interval '1 second')"
        " ON CONFLICT (agent_id, worker_id) DO UPDATE SET instance_id = EXCLUDED.instance_id,"
        " fencing_token = EXCLUDED.fencing_token, acquired_at = now(),"
        " expires_at = EXCLUDED.expires_at RETURNING fencing_token",
        (agent_id, worker_id, me, ttl),
    ).fetchone()
    assert row is not None
    return int(row[0]), None if previous is None else previous[0]


def release(conn: psycopg.Connection[Any], agent_id: uuid.UUID, worker_id: str, token: int) -> None:
    """Drop the session row, only if it is still held under ``token``."""
    conn.execute(
        "DELETE FROM agent_sessions WHERE agent_id = %s AND worker_id = %s AND fencing_token = %s",
        (agent_id, worker_id, token),
    )


def announce_command(
    conn: psycopg.Connection[Any], channel: str, agent_id: uuid.UUID, me: uuid.UUID
) -> bool:
    """NOTIFY the replicas, and tell whether one of them holds the agent: one round trip."""
    row = conn.execute(
        "SELECT pg_notify(%s, 'minted:' || %s::text), EXISTS (SELECT 1 FROM agent_sessions"
        " WHERE agent_id = %s AND instance_id <> %s AND expires_at > now())",
        (channel, agent_id, agent_id, me),
    ).fetchone()
    return bool(row and row[1])


def renew(
    conn: psycopg.Connection[Any], me: uuid.UUID, claims: list[tuple[Key, int]], ttl: float
) -> set[Key]:
    """Extend the rows still ours under our tokens; the keys kept."""
    rows = conn.execute(
        "UPDATE agent_sessions s SET expires_at = now() + %s * interval '1 second'"
        " FROM unnest(%s::uuid[], %s::text[], %s::bigint[]) AS c(agent_id, worker_id, token)"
        " WHERE s.agent_id = c.agent_id AND s.worker_id = c.worker_id"
        " AND s.fencing_token = c.token AND s.instance_id = %s"
        " RETURNING s.agent_id, s.worker_id",
        (
            ttl,
            [key[0] for key, _ in claims],
            [key[1] for key, _ in claims],
            [token for _, token in claims],
            me,
        ),
    ).fetchall()
    return {(agent, worker) for agent, worker in rows}


def notify(conn: psycopg.Connection[Any], channel: str, payload: str) -> None:
    conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


def listen_on(conn: psycopg.Connection[Any], channels: Iterable[str]) -> None:
    """LISTEN on each channel (names are the registry's constants, never input)."""
    for channel in channels:
        conn.execute(f"LISTEN {channel}")


def take_lease(conn: psycopg.Connection[Any], me: uuid.UUID, seconds: float) -> bool:
    """Take the lease if it is free or expired, or renew it if ours: do we hold it now?"""
    row = conn.execute(
        "INSERT INTO leader_lease (name, holder, fencing_token, expires_at)"
        " VALUES (%s, %s, nextval('z4j_fencing_tokens'), now() + %s * interval '1 second')"
        " ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder,"
        " fencing_token = CASE WHEN leader_lease.holder = EXCLUDED.holder"
        "   THEN leader_lease.fencing_token ELSE EXCLUDED.fencing_token END,"
        " expires_at = EXCLUDED.expires_at"
        " WHERE leader_lease.holder = EXCLUDED.holder OR leader_lease.expires_at < now()"
        " RETURNING holder",
        (LEASE_NAME, me, seconds),
    ).fetchone()
    return row is not None and row[0] == me


def leader_upkeep(conn: psycopg.Connection[Any], dead_after: float) -> None:
    """The leader's chores: drop expired session rows, mark silent instances stopped."""
    conn.execute("DELETE FROM agent_sessions WHERE expires_at < now()")
    conn.execute(
        "UPDATE instances SET stopped_at = last_seen WHERE stopped_at IS NULL"
        " AND last_seen < now() - %s * interval '1 second'",
        (dead_after,),
    )
