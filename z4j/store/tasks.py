"""The ``tasks`` table's reads: what the API and the dashboard ask of it.

The list is newest first by ``last_event_at``, keyset-paged by
(``last_event_at``, ``engine``, ``task_id``); every filter has an index
that serves that order (migrations 7 and 9). Inputs, result, traceback and
the timeline are derived from the doc, for one task at a time. Counts by
state come from ``task_counts`` (kept by store/task_writes.py) where they
can. The writes are in store/task_writes.py.
"""

from __future__ import annotations

import uuid
from typing import Any

import attrs
import orjson

from ..tasks import task_row
from . import _rows
from ._filters import one_of
from ._rows import COMMAND_COLUMNS, Conn, Dialect
from .base import CommandRecord, EngineWorker, TaskCounts, TaskFilter, TaskRecord

__all__ = [
    "COUNT_WINDOW",
    "TASK_COLUMNS",
    "commands_for_task",
    "count_by_state",
    "engine_workers",
    "get_tasks",
    "list_tasks",
    "recent_runtimes",
    "stuck_counts",
    "task_outcomes",
]

TASK_COLUMNS = (
    "project_id, engine, task_id, name, queue, state, attempts, agent_id, worker,"
    " exception, message, runtime_ms, first_seen, received_at, started_at, finished_at,"
    " last_event_at"
)
# Counts the counters cannot answer are counted over at most this many of
# the newest matching tasks (see `count_by_state`).
COUNT_WINDOW = 100_000


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
    if query.projects is not None:
        condition, values = one_of(d, "project_id", query.projects)
        terms.append(condition)
        params.extend(values)
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
        page = d.sql("(last_event_at, engine, task_id) < (?, ?, ?)")
        values = [d.ts_in(at), engine, task_id]
        where = f"{where} AND {page}" if where else f" WHERE {page}"
        params += values
    sql = d.sql(
        f"SELECT {TASK_COLUMNS} FROM tasks{where}"
        " ORDER BY last_event_at DESC, engine DESC, task_id DESC LIMIT ?"
    )
    rows = conn.execute(sql, [*params, query.limit]).fetchall()
    return [task_record(d, row) for row in rows]


def count_by_state(d: Dialect, conn: Conn, query: TaskFilter) -> TaskCounts:
    """How many tasks match ``query`` (its state aside), per state.

    From ``task_counts`` when the filter is by project, engine and queue at
    most (exact, a few rows read): the tasks page's tabs, and a queue's. Any
    other filter is counted over the newest `COUNT_WINDOW` matching tasks at
    most, served by that filter's index: a lower bound when the window
    fills. (Counters by name or agent too would multiply the rows each drain
    batch updates by their values; measured in benchmarks/tasks.py.)"""
    by_counters = (
        query.name is None
        and query.agent_id is None
        and query.since is None
        and query.until is None
        and not query.text
    )
    if by_counters:
        terms: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("engine", query.engine),
            ("queue", query.queue),
            ("project_id", None if query.project_id is None else d.uuid_in(query.project_id)),
        ):
            if value is not None:
                terms.append(f"{column} = {d.param}")
                params.append(value)
        if query.projects is not None:
            condition, values = one_of(d, "project_id", query.projects)
            terms.append(condition)
            params.extend(values)
        where = (" WHERE " + " AND ".join(terms)) if terms else ""
        rows = conn.execute(
            f"SELECT state, sum(n) FROM task_counts{where} GROUP BY state", params
        ).fetchall()
        return TaskCounts({state: int(n) for state, n in rows if n}, exact=True)
    where, params = _where(d, query, with_state=False)
    rows = conn.execute(
        d.sql(
            f"SELECT state, count(*) FROM (SELECT state FROM tasks{where}"
            " ORDER BY last_event_at DESC, engine DESC, task_id DESC LIMIT ?) AS newest"
            " GROUP BY state"
        ),
        [*params, COUNT_WINDOW],
    ).fetchall()
    counts = {state: int(n) for state, n in rows}
    return TaskCounts(counts, exact=sum(counts.values()) < COUNT_WINDOW)


def get_tasks(
    d: Dialect, conn: Conn, engine: str, task_id: str, project_id: uuid.UUID | None = None
) -> list[TaskRecord]:
    """The task(s) with this engine and id: one per project that has it, with
    what only the doc holds (inputs, result, traceback, lineage, timeline)."""
    sql = f"SELECT {TASK_COLUMNS}, doc FROM tasks WHERE engine = ? AND task_id = ?"
    params: list[Any] = [engine, task_id]
    if project_id is not None:
        sql += " AND project_id = ?"
        params.append(d.uuid_in(project_id))
    rows = conn.execute(d.sql(sql + " ORDER BY project_id"), params).fetchall()
    records = []
    for *summary, doc in rows:
        row = task_row(orjson.loads(doc))
        records.append(
            attrs.evolve(
                task_record(d, summary),
                args=row.args,
                kwargs=row.kwargs,
                result=row.result,
                traceback=row.traceback,
                parent_id=row.parent_id,
                root_id=row.root_id,
                tags=row.tags,
                priority=row.priority,
                timeline=row.timeline,
            )
        )
    return records


def task_record(d: Dialect, row: Any) -> TaskRecord:
    """A list's summary of one task, from `TASK_COLUMNS`."""
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
    ) = row
    return TaskRecord(
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


def commands_for_task(
    d: Dialect,
    conn: Conn,
    project_id: uuid.UUID,
    engine: str,
    task_id: str,
    *,
    limit: int = 100,
) -> list[CommandRecord]:
    """Commands of the task's project that named it: as their target or
    parameter, or as the new task their result reports (a retry links old
    and new), newest first. A command whose target names an engine must
    name this one: engines do not share task ids."""
    fields = [
        d.json_text("target", "task_id"),
        d.json_text("parameters", "task_id"),
        d.json_text("result", "new_task_id"),
        d.json_text("result", "task_id"),
    ]
    named = " OR ".join(f"{field} = ?" for field in fields)
    target_engine = d.json_text("target", "engine")
    rows = conn.execute(
        d.sql(
            f"SELECT {COMMAND_COLUMNS} FROM commands WHERE project_id = ?"
            f" AND ({target_engine} IS NULL OR {target_engine} = ?) AND ({named})"
            " ORDER BY created_at DESC LIMIT ?"
        ),
        [d.uuid_in(project_id), engine, *[task_id] * len(fields), limit],
    ).fetchall()
    return [_rows.command(d, row) for row in rows]


def _of_projects(
    d: Dialect, sql: str, params: list[Any], projects: frozenset[uuid.UUID] | None
) -> str:
    """``sql`` (a WHERE already begun) and ``params`` with the tasks of ``projects`` only."""
    if projects is None:
        return sql
    condition, values = one_of(d, "project_id", projects)
    params.extend(values)
    return f"{sql} AND {condition}"


def task_outcomes(
    d: Dialect,
    conn: Conn,
    since: float,
    by: str = "queue",
    projects: frozenset[uuid.UUID] | None = None,
) -> list[tuple[str, str | None, str, int]]:
    """(engine, queue or name, state, tasks) of the tasks whose last event is
    at or after ``since`` (of ``projects`` only, unless None); ``by`` is
    "queue" or "name"."""
    if by not in ("queue", "name"):
        raise ValueError(f"by: queue or name, not {by!r}")
    params: list[Any] = [d.ts_in(since)]
    sql = _of_projects(
        d,
        d.sql(f"SELECT engine, {by}, state, count(*) FROM tasks WHERE last_event_at >= ?"),
        params,
        projects,
    )
    rows = conn.execute(f"{sql} GROUP BY engine, {by}, state", params).fetchall()
    return [(engine, group, state, int(n)) for engine, group, state, n in rows]


def engine_workers(
    d: Dialect,
    conn: Conn,
    since: float,
    engine: str | None = None,
    worker: str | None = None,
    projects: frozenset[uuid.UUID] | None = None,
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
    sql = _of_projects(d, d.sql(sql), params, projects)
    rows = conn.execute(sql + " GROUP BY engine, worker, agent_id, state", params).fetchall()
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
    d: Dialect,
    conn: Conn,
    since: float,
    limit: int,
    projects: frozenset[uuid.UUID] | None = None,
) -> list[tuple[str, str | None, float]]:
    """(engine, name, runtime_ms) of the newest ``limit`` tasks with a runtime
    since ``since`` (of ``projects`` only, unless None)."""
    params: list[Any] = [d.ts_in(since)]
    sql = _of_projects(
        d,
        d.sql(
            "SELECT engine, name, runtime_ms FROM tasks WHERE last_event_at >= ?"
            " AND runtime_ms IS NOT NULL"
        ),
        params,
        projects,
    )
    rows = conn.execute(
        sql + f" ORDER BY last_event_at DESC LIMIT {d.param}", [*params, limit]
    ).fetchall()
    return [(engine, name, float(ms)) for engine, name, ms in rows]
