"""The ``tasks`` table: the projection's writes inside a drain, and its reads.

Writes happen in the transaction that stores the events they come from, so
a task row never runs ahead of, or behind, the events it is derived from.
A batch's task events are grouped by key; the rows they touch are read
locked, folded with `z4j.tasks.merge` and written back. The fold is
idempotent (observations are kept by event id), so a batch drained twice,
or an event an agent sent twice, changes nothing the second time.

Postgres drains run concurrently (several workers, several replicas): two
of them folding into one task must not both read the old row and the
second overwrite the first. Missing rows are first inserted as
placeholders (``ON CONFLICT DO NOTHING`` waits for a concurrent insert of
the same key to commit), then every touched row is read ``FOR UPDATE`` in
key order, so the second drain reads what the first wrote. SQLite has one
writer at a time, and needs neither.

Reads: the list is newest first by ``last_event_at``, keyset-paged by
(``last_event_at``, ``engine``, ``task_id``); every filter has an index
that serves that order (migration 7).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import attrs

from ..tasks import TaskEvent, TaskRow, merge
from . import _rows
from ._rows import COMMAND_COLUMNS, Conn, Dialect
from .base import CommandRecord, EngineWorker, TaskFilter, TaskRecord

__all__ = [
    "TASK_COLUMNS",
    "TASK_DETAIL_COLUMNS",
    "commands_for_task",
    "count_by_state",
    "engine_workers",
    "get_tasks",
    "list_tasks",
    "recent_runtimes",
    "stuck_counts",
    "task_outcomes",
    "write_tasks",
]

FINAL_STATES = frozenset({"succeeded", "failed", "revoked"})
Key = tuple[bytes, str, str]  # (project id bytes, engine, task id)

# The derived columns, in TaskRow's order; `doc` is written beside them.
_WRITTEN = (
    "project_id, engine, task_id, name, queue, state, attempts, agent_id, worker, args,"
    " kwargs, result, exception, message, traceback, runtime_ms, parent_id, root_id, tags,"
    " priority, first_seen, received_at, started_at, finished_at, last_event_at, timeline, doc"
)
TASK_COLUMNS = (
    "project_id, engine, task_id, name, queue, state, attempts, agent_id, worker,"
    " exception, message, runtime_ms, first_seen, received_at, started_at, finished_at,"
    " last_event_at"
)
TASK_DETAIL_COLUMNS = (
    TASK_COLUMNS + ", args, kwargs, result, traceback, parent_id, root_id, tags, priority, timeline"
)
# Chunks of keys per statement: SQLite's parameter limit is 32,766 (3 a key).
_CHUNK = 1000


# -- writes ---------------------------------------------------------------------------


def write_tasks(d: Dialect, conn: Conn, events: Sequence[TaskEvent]) -> list[TaskRow]:
    """Fold ``events`` into their tasks' rows, in the caller's transaction.

    Returns the rows this write finished: now in a final state, and not in
    that state and attempt before (so that a replayed batch finishes none,
    and the outcome metrics count each run once)."""
    if not events:
        return []
    by_key: dict[Key, list[TaskEvent]] = {}
    for event in events:
        by_key.setdefault((event.project_id, event.engine, event.task_id), []).append(event)
    keys = sorted(by_key)
    stored = _lock_and_read(d, conn, keys)
    params = []
    finished = []
    for key in keys:
        before = stored.get(key)
        doc, row = merge(None if before is None else before[0], by_key[key])
        params.append(_row_params(d, row, doc))
        if row.state in FINAL_STATES and (
            before is None or before[1:] != (row.state, row.attempts)
        ):
            finished.append(row)
    placeholders = ", ".join([d.param] * 27)
    updates = ", ".join(
        f"{column} = excluded.{column}" for column in _WRITTEN.replace(" ", "").split(",")[3:]
    )
    conn.cursor().executemany(
        f"INSERT INTO tasks ({_WRITTEN}) VALUES ({placeholders})"
        f" ON CONFLICT (project_id, engine, task_id) DO UPDATE SET {updates}",
        params,
    )
    return finished


def _lock_and_read(d: Dialect, conn: Conn, keys: list[Key]) -> dict[Key, tuple[Any, str, int]]:
    """The stored (doc, state, attempts) of ``keys`` (absent: not there yet),
    locked on Postgres."""
    docs: dict[Key, tuple[Any, str, int]] = {}
    for start in range(0, len(keys), _CHUNK):
        chunk = keys[start : start + _CHUNK]
        if d.lock:  # Postgres: placeholders first, so that every row can be locked
            columns = (
                [uuid.UUID(bytes=k[0]) for k in chunk],
                [k[1] for k in chunk],
                [k[2] for k in chunk],
            )
            conn.execute(
                "INSERT INTO tasks (project_id, engine, task_id, state, attempts,"
                " first_seen, last_event_at)"
                " SELECT p, e, t, 'received', 0, now(), now()"
                " FROM unnest(%s::uuid[], %s::text[], %s::text[]) AS k (p, e, t)"
                " ORDER BY p, e, t ON CONFLICT DO NOTHING",
                columns,
            )
            rows = conn.execute(
                "SELECT project_id, engine, task_id, doc, state, attempts FROM tasks"
                " WHERE (project_id, engine, task_id) IN"
                " (SELECT * FROM unnest(%s::uuid[], %s::text[], %s::text[]))"
                " ORDER BY project_id, engine, task_id FOR UPDATE",
                columns,
            ).fetchall()
        else:
            values = ", ".join(["(?, ?, ?)"] * len(chunk))
            flat = [v for k in chunk for v in (str(uuid.UUID(bytes=k[0])), k[1], k[2])]
            rows = conn.execute(
                "SELECT project_id, engine, task_id, doc, state, attempts FROM tasks"
                f" WHERE (project_id, engine, task_id) IN (VALUES {values})",
                flat,
            ).fetchall()
        for project_id, engine, task_id, doc, state, attempts in rows:
            stored = d.json_out(doc)
            if stored:  # a placeholder's {} is a new task
                docs[d.uuid_out(project_id).bytes, engine, task_id] = (stored, state, attempts)
    return docs


def _row_params(d: Dialect, row: TaskRow, doc: dict[str, Any]) -> tuple[Any, ...]:
    return (
        d.uuid_in(uuid.UUID(bytes=row.project_id)),
        row.engine,
        row.task_id,
        row.name,
        row.queue,
        row.state,
        row.attempts,
        d.uuid_in(uuid.UUID(bytes=row.agent_id)),
        row.worker,
        d.opt_json_in(row.args),
        d.opt_json_in(row.kwargs),
        d.opt_json_in(row.result),
        row.exception,
        row.message,
        row.traceback,
        row.runtime_ms,
        row.parent_id,
        row.root_id,
        d.opt_json_in(row.tags),
        d.opt_json_in(row.priority),
        d.ts_in(row.first_seen),
        d.opt_ts_in(row.received_at),
        d.opt_ts_in(row.started_at),
        d.opt_ts_in(row.finished_at),
        d.ts_in(row.last_event_at),
        d.json_in(row.timeline),
        d.json_in(doc),
    )


# -- reads ----------------------------------------------------------------------------


def _where(d: Dialect, query: TaskFilter, *, with_state: bool = True) -> tuple[str, list[Any]]:
    terms: list[str] = []
    params: list[Any] = []

    def add(condition: str, *values: Any) -> None:
        terms.append(d.sql(condition))
        params.extend(values)

    if with_state and query.state is not None:
        add("state = ?", query.state)
    if query.engine is not None:
        add("engine = ?", query.engine)
    if query.queue is not None:
        add("queue = ?", query.queue)
    if query.name is not None:
        add("name = ?", query.name)
    if query.agent_id is not None:
        add("agent_id = ?", d.uuid_in(query.agent_id))
    if query.project_id is not None:
        add("project_id = ?", d.uuid_in(query.project_id))
    if query.since is not None:
        add("last_event_at >= ?", d.ts_in(query.since))
    if query.until is not None:
        add("last_event_at < ?", d.ts_in(query.until))
    if query.text:
        # Substring over name, id and exception: a scan of what the other
        # filters leave (bounded by the page), documented as such.
        pattern = "%" + query.text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern += "%"
        like = "ILIKE" if d.lock else "LIKE"
        add(
            f"(name {like} ? ESCAPE '\\' OR task_id {like} ? ESCAPE '\\'"
            f" OR exception {like} ? ESCAPE '\\' OR message {like} ? ESCAPE '\\')",
            pattern,
            pattern,
            pattern,
            pattern,
        )
    return (" WHERE " + " AND ".join(terms)) if terms else "", params


def list_tasks(d: Dialect, conn: Conn, query: TaskFilter) -> list[TaskRecord]:
    """One page of tasks, newest first, after ``query.before`` (a keyset cursor)."""
    where, params = _where(d, query)
    if query.before is not None:
        at, engine, task_id = query.before
        page = d.sql(
            "(last_event_at, engine, task_id) < (?, ?, ?)"
            if d.row_values
            else "(last_event_at < ? OR (last_event_at = ? AND (engine < ?"
            " OR (engine = ? AND task_id < ?))))"
        )
        values = (
            [d.ts_in(at), engine, task_id]
            if d.row_values
            else [d.ts_in(at), d.ts_in(at), engine, engine, task_id]
        )
        where = f"{where} AND {page}" if where else f" WHERE {page}"
        params += values
    sql = d.sql(
        f"SELECT {TASK_COLUMNS} FROM tasks{where}"
        " ORDER BY last_event_at DESC, engine DESC, task_id DESC LIMIT ?"
    )
    rows = conn.execute(sql, [*params, query.limit]).fetchall()
    return [task_record(d, row) for row in rows]


def count_by_state(d: Dialect, conn: Conn, query: TaskFilter) -> dict[str, int]:
    """How many tasks match ``query`` (its state aside), per state."""
    where, params = _where(d, query, with_state=False)
    rows = conn.execute(
        d.sql(f"SELECT state, count(*) FROM tasks{where} GROUP BY state"), params
    ).fetchall()
    return {state: int(n) for state, n in rows}


def get_tasks(
    d: Dialect, conn: Conn, engine: str, task_id: str, project_id: uuid.UUID | None = None
) -> list[TaskRecord]:
    """The task(s) with this engine and id: one per project that has it."""
    sql = f"SELECT {TASK_DETAIL_COLUMNS} FROM tasks WHERE engine = ? AND task_id = ?"
    params: list[Any] = [engine, task_id]
    if project_id is not None:
        sql += " AND project_id = ?"
        params.append(d.uuid_in(project_id))
    rows = conn.execute(d.sql(sql + " ORDER BY project_id"), params).fetchall()
    return [task_record(d, row, detail=True) for row in rows]


def task_record(d: Dialect, row: Any, *, detail: bool = False) -> TaskRecord:
    (
        project_id,
        engine,
        task_id,
        name,
        queue,
        state,
        attempts,
        agent_id,
        worker,
        exception,
        message,
        runtime_ms,
        first_seen,
        received_at,
        started_at,
        finished_at,
        last_event_at,
        *more,
    ) = row
    record = TaskRecord(
        project_id=d.uuid_out(project_id),
        engine=engine,
        task_id=task_id,
        name=name,
        queue=queue,
        state=state,
        attempts=attempts,
        agent_id=d.opt_uuid_out(agent_id),
        worker=worker,
        exception=exception,
        message=message,
        runtime_ms=runtime_ms,
        first_seen=d.ts_out(first_seen),
        received_at=d.opt_ts_out(received_at),
        started_at=d.opt_ts_out(started_at),
        finished_at=d.opt_ts_out(finished_at),
        last_event_at=d.ts_out(last_event_at),
    )
    if not detail:
        return record
    args, kwargs, result, traceback, parent_id, root_id, tags, priority, timeline = more
    return attrs.evolve(
        record,
        args=d.opt_json_out(args),
        kwargs=d.opt_json_out(kwargs),
        result=d.opt_json_out(result),
        traceback=traceback,
        parent_id=parent_id,
        root_id=root_id,
        tags=d.opt_json_out(tags),
        priority=d.opt_json_out(priority),
        timeline=d.json_out(timeline),
    )


def commands_for_task(
    d: Dialect, conn: Conn, task_id: str, *, limit: int = 100
) -> list[CommandRecord]:
    """Commands that named ``task_id``: as their target or parameter, or as
    the new task their result reports (a retry links old and new), newest first."""
    fields = [
        d.json_text("target", "task_id"),
        d.json_text("parameters", "task_id"),
        d.json_text("result", "new_task_id"),
        d.json_text("result", "task_id"),
    ]
    where = " OR ".join(f"{field} = ?" for field in fields)
    rows = conn.execute(
        d.sql(
            f"SELECT {COMMAND_COLUMNS} FROM commands WHERE {where} ORDER BY created_at DESC LIMIT ?"
        ),
        [task_id] * len(fields) + [limit],
    ).fetchall()
    return [_rows.command(d, row) for row in rows]


def task_outcomes(
    d: Dialect, conn: Conn, since: float, by: str = "queue"
) -> list[tuple[str, str | None, str, int]]:
    """(engine, queue or name, state, tasks) of the tasks whose last event is
    at or after ``since``; ``by`` is "queue" or "name"."""
    if by not in ("queue", "name"):
        raise ValueError(f"by: queue or name, not {by!r}")
    rows = conn.execute(
        d.sql(
            f"SELECT engine, {by}, state, count(*) FROM tasks WHERE last_event_at >= ?"
            f" GROUP BY engine, {by}, state"
        ),
        [d.ts_in(since)],
    ).fetchall()
    return [(engine, group, state, int(n)) for engine, group, state, n in rows]


def engine_workers(
    d: Dialect,
    conn: Conn,
    since: float,
    engine: str | None = None,
    worker: str | None = None,
) -> list[EngineWorker]:
    """The engines' own workers that tasks last heard of at or after ``since``
    name (``tasks.worker``), one per (engine, worker, agent): when last heard
    of and their tasks by state; sorted by engine, worker, then agent.

    The window's range is served by ``tasks_recent``; there is no index on
    the worker (a migration would add one), so ``worker`` narrows that range."""
    sql = (
        "SELECT engine, worker, agent_id, state, count(*), max(last_event_at) FROM tasks"
        " WHERE last_event_at >= ? AND worker IS NOT NULL"
    )
    params: list[Any] = [d.ts_in(since)]
    if engine is not None:
        sql += " AND engine = ?"
        params.append(engine)
    if worker is not None:
        sql += " AND worker = ?"
        params.append(worker)
    rows = conn.execute(d.sql(sql + " GROUP BY engine, worker, agent_id, state"), params).fetchall()
    found: dict[tuple[str, str, uuid.UUID | None], tuple[float, dict[str, int]]] = {}
    for engine_name, worker_name, agent_id, state, n, last in rows:
        key = (engine_name, worker_name, d.opt_uuid_out(agent_id))
        seen, states = found.get(key, (0.0, {}))
        states[state] = int(n)
        found[key] = (max(seen, d.ts_out(last)), states)
    return [
        EngineWorker(
            engine=engine_name,
            worker=worker_name,
            agent_id=agent_id,
            last_seen=seen,
            tasks=sum(states.values()),
            states=states,
        )
        for (engine_name, worker_name, agent_id), (seen, states) in sorted(
            found.items(), key=lambda kv: (kv[0][0], kv[0][1], str(kv[0][2] or ""))
        )
    ]


UNFINISHED = ("received", "started")


def stuck_counts(d: Dialect, conn: Conn, before: float) -> dict[str, int]:
    """Per engine, the tasks still received or started whose last event is before ``before``."""
    rows = conn.execute(
        d.sql(
            "SELECT engine, count(*) FROM tasks WHERE state IN (?, ?) AND last_event_at < ?"
            " GROUP BY engine"
        ),
        [*UNFINISHED, d.ts_in(before)],
    ).fetchall()
    return {engine: int(n) for engine, n in rows}


def recent_runtimes(
    d: Dialect, conn: Conn, since: float, limit: int
) -> list[tuple[str, str | None, float]]:
    """(engine, name, runtime_ms) of the newest ``limit`` tasks with a runtime since ``since``."""
    rows = conn.execute(
        d.sql(
            "SELECT engine, name, runtime_ms FROM tasks WHERE last_event_at >= ?"
            " AND runtime_ms IS NOT NULL ORDER BY last_event_at DESC LIMIT ?"
        ),
        [d.ts_in(since), limit],
    ).fetchall()
    return [(engine, name, float(ms)) for engine, name, ms in rows]
