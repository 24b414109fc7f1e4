"""The ``workers`` table's upkeep (workers long gone are forgotten) and counts.

A worker row is one agent process's session (z4j-bare names its worker
``<framework>-<pid>-<start ms>``): every restart of an agent adds a row,
and nothing else ever removes one. Without upkeep the table, and with it
each agent's list of workers in the API, the dashboard and a hub's pages
of a region's agents, grows with every deploy. A worker not seen for as
long as events are kept (Z4J_EVENT_RETENTION_DAYS) has nothing left to
show, so maintenance deletes it. A connected worker's ``last_seen`` moves
with its heartbeats, so only gone ones qualify. The SQL is shared by both
stores over their `Dialect`.

The connected workers and their agents are counted from ``workers_connected``
(migration 21), an index of the connected rows alone.
"""

from __future__ import annotations

from ._rows import Conn, Dialect

__all__ = ["CONNECTED_COUNTS", "connected_counts", "forget_workers_before"]

CONNECTED_COUNTS = (
    "SELECT count(*), count(DISTINCT agent_id) FROM workers WHERE disconnected_at IS NULL"
)


def connected_counts(conn: Conn) -> tuple[int, int]:
    """(connected workers, agents with one)."""
    row = conn.execute(CONNECTED_COUNTS).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def forget_workers_before(d: Dialect, conn: Conn, before: float, chunk: int) -> int:
    """Delete up to ``chunk`` of the workers last seen before ``before``, the
    longest gone first; how many went."""
    cur = conn.execute(
        d.sql(
            "DELETE FROM workers WHERE (agent_id, worker_id) IN"
            " (SELECT agent_id, worker_id FROM workers WHERE last_seen < ?"
            " ORDER BY last_seen LIMIT ?)"
        ),
        (d.ts_in(before), chunk),
    )
    return int(cur.rowcount)
