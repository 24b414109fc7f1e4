"""The ``tasks`` table: the projection's writes inside a drain, and its reads.

Writes happen in the transaction that stores the events they come from, so
a task row never runs ahead of, or behind, the events it is derived from.
A batch's task events are grouped by key and folded with `z4j.tasks.merge`
into the stored doc. The fold is idempotent (observations are kept by event
id), so a batch drained twice, or an event an agent sent twice, changes
nothing the second time. ``task_counts`` moves with the rows: each write
takes one from its row's old (dimensions, state) and adds one to its new.

Postgres drains run concurrently (several workers, several replicas): two
of them folding into one task must not both read the old row and the
second overwrite the first. A write goes in three steps, every one in key
order:

1. New tasks (not there when looked up) are inserted as folded from this
   batch alone, ``ON CONFLICT DO NOTHING``: that waits for a concurrent
   insert of the same key to commit, and the keys it did not insert are
   "lost" to another drain.
2. The tasks that were there, and the lost ones, are read ``FOR UPDATE``,
   folded into and written back.
3. The counts' deltas are added, to one of `SHARDS` rows per counter, so
   that two drains rarely wait on one row.

Waits only go from an insert to another drain's insert (1) and from a lock
to another's lock (2), each in key order, so two drains cannot deadlock.
Most tasks are new to the batch that first sees them, so most rows cost one
insert. SQLite has one writer at a time, and reads and upserts.

Reads: the list is newest first by ``last_event_at``, keyset-paged by
(``last_event_at``, ``engine``, ``task_id``); every filter has an index
that serves that order (migrations 7 and 9). Inputs, result, traceback and
the timeline are derived from the doc, for one task at a time.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import attrs
import orjson

from ..tasks import TaskEvent, TaskRow, merge, task_row
from . import _rows
from ._rows import COMMAND_COLUMNS, Conn, Dialect
from .base import CommandRecord, EngineWorker, TaskCounts, TaskFilter, TaskRecord

__all__ = [
    "COUNT_WINDOW",
    "SHARDS",
    "TASK_COLUMNS",
    "commands_for_task",
    "count_by_state",
    "delete_tasks_before",
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
# A counter's dimensions: (project, engine, queue or '', state).
Counter = tuple[bytes, str, str, str]

# The stored columns, in the order `_columns` gives them, and their staging
# types: times travel as epoch seconds and become timestamptz in the INSERT.
_STAGED = (
    ("engine", "text"),
    ("task_id", "text"),
    ("project_id", "uuid"),
    ("name", "text"),
    ("queue", "text"),
    ("state", "text"),
    ("attempts", "int4"),
    ("agent_id", "uuid"),
    ("worker", "text"),
    ("exception", "text"),
    ("message", "text"),
    ("runtime_ms", "float8"),
    ("parent_id", "text"),
    ("root_id", "text"),
    ("first_seen", "float8"),
    ("received_at", "float8"),
    ("started_at", "float8"),
    ("finished_at", "float8"),
    ("last_event_at", "float8"),
    ("doc", "bytea"),
)
_TIMES = frozenset({"first_seen", "received_at", "started_at", "finished_at", "last_event_at"})
_WRITTEN = ", ".join(column for column, _ in _STAGED)
_FROM_STAGING = ", ".join(
    f"to_timestamp({column})" if column in _TIMES else column for column, _ in _STAGED
)
TASK_COLUMNS = (
    "project_id, engine, task_id, name, queue, state, attempts, agent_id, worker,"
    " exception, message, runtime_ms, first_seen, received_at, started_at, finished_at,"
    " last_event_at"
)
_COUNTED = "project_id, engine, queue, state"
SHARDS = 4
# Counts the counters cannot answer are counted over at most this many of
# the newest matching tasks (see `count_by_state`).
COUNT_WINDOW = 100_000
# Keys per statement: SQLite's parameter limit is 32,766 (3 a key).
_CHUNK = 1000
_STAGING = "_z4j_task_rows"
# The order every step takes keys in: Python's (`_pk_order`), which compares
# strings by code point, as the "C" collation does.
_KEY_ORDER = 'engine COLLATE "C", task_id COLLATE "C", project_id'


# -- writes ---------------------------------------------------------------------------


class _Stored(NamedTuple):
    """What a write needs of a row already there."""

    doc: Any
    state: str
    attempts: int
    counter: Counter
    version: str | None  # Postgres: the row version's xmin


# A key's fold: the doc, the row, and the row's stored values (`_columns`).
_Folded = tuple[dict[str, Any], TaskRow, tuple[Any, ...]]


def write_tasks(d: Dialect, conn: Conn, events: Sequence[TaskEvent]) -> list[TaskRow]:
    """Fold ``events`` into their tasks' rows and counts, in the caller's transaction.

    Returns the rows this write finished: now in a final state, and not in
    that state and attempt before (so that a replayed batch finishes none,
    and the outcome metrics count each run once)."""
    if not events:
        return []
    by_key: dict[Key, list[TaskEvent]] = {}
    for event in events:
        by_key.setdefault((event.project_id, event.engine, event.task_id), []).append(event)
    keys = sorted(by_key, key=_pk_order)
    pg = bool(d.lock)
    seen = _read(d, conn, keys)
    befores: dict[Key, _Stored | None] = {key: seen.get(key) for key in keys}
    folded = {key: _fold(pg, befores[key], by_key[key]) for key in keys}
    update = _take_rows(d, conn, by_key, befores, folded) if pg else keys
    _upsert(d, conn, [folded[key] for key in update])
    deltas: dict[Counter, int] = {}
    finished: list[TaskRow] = []
    for key in keys:
        _count(deltas, befores[key], folded[key][1], finished)
    _add_counts(d, conn, deltas)
    return finished


def _take_rows(
    d: Dialect,
    conn: Conn,
    by_key: dict[Key, list[TaskEvent]],
    befores: dict[Key, _Stored | None],
    folded: dict[Key, _Folded],
) -> list[Key]:
    """On Postgres, after the fold (which ran without locks, in no other
    drain's way): insert the new rows, lock the others, fold again what
    another drain changed meanwhile. Returns the keys still to write, in
    order; ``befores`` and ``folded`` are brought up to date."""
    new = [key for key in folded if befores[key] is None]
    update: list[Key] = []
    while True:
        inserted = _insert_new(conn, [folded[key][2] for key in new])
        taken = [key for key in new if key not in inserted]  # lost to another drain
        taken += [key for key in folded if befores[key] is not None and key not in update]
        taken.sort(key=_pk_order)
        versions = _lock(conn, taken)
        stale = [key for key in taken if _version(befores[key]) != versions.get(key)]
        now = _read(d, conn, [key for key in stale if key in versions])
        new = []
        for key in stale:
            befores[key] = now.get(key)
            folded[key] = _fold(True, befores[key], by_key[key])
            if befores[key] is None:  # deleted meanwhile: insert it again
                new.append(key)
        update += [key for key in taken if key not in new]
        if not new:
            return sorted(update, key=_pk_order)


def _version(stored: _Stored | None) -> str | None:
    return None if stored is None else stored.version


def _fold(pg: bool, before: _Stored | None, events: list[TaskEvent]) -> _Folded:
    doc, row = merge(None if before is None else before.doc, events)
    return doc, row, _columns(pg, doc, row)


def _pk_order(key: Key) -> tuple[str, str, bytes]:
    return key[1], key[2], key[0]


def _count(
    deltas: dict[Counter, int], before: _Stored | None, row: TaskRow, finished: list[TaskRow]
) -> None:
    after = (row.project_id, row.engine, row.queue or "", row.state)
    if before is None or before.counter != after:
        if before is not None:
            deltas[before.counter] = deltas.get(before.counter, 0) - 1
        deltas[after] = deltas.get(after, 0) + 1
    if row.state in FINAL_STATES and (
        before is None or (before.state, before.attempts) != (row.state, row.attempts)
    ):
        finished.append(row)


def _columns(pg: bool, doc: dict[str, Any], row: TaskRow) -> tuple[Any, ...]:
    """A row's stored values, in `_STAGED`'s order: the doc as orjson bytes,
    times as epoch seconds; uuids as 16 bytes on Postgres (its binary COPY
    takes them so), as text on SQLite."""
    uuid_in = _raw_uuid if pg else _text_uuid
    return (
        row.engine,
        row.task_id,
        uuid_in(row.project_id),
        row.name,
        row.queue,
        row.state,
        row.attempts,
        uuid_in(row.agent_id) if row.agent_id else None,
        row.worker,
        row.exception,
        row.message,
        row.runtime_ms,
        row.parent_id,
        row.root_id,
        row.first_seen,
        row.received_at,
        row.started_at,
        row.finished_at,
        row.last_event_at,
        orjson.dumps(doc),
    )


def _raw_uuid(value: bytes) -> bytes:
    return value


def _text_uuid(value: bytes) -> str:
    return str(uuid.UUID(bytes=value))


def _groups(keys: Sequence[Key]) -> Iterator[tuple[uuid.UUID, str, list[str]]]:
    """Keys (in `_pk_order`) as (project, engine, task ids), by engine and
    project: a batch has few of those, so a lookup sends one array per pair."""
    by_pair: dict[tuple[bytes, str], list[str]] = {}
    for project, engine, task_id in keys:
        by_pair.setdefault((project, engine), []).append(task_id)
    # Every drain takes the pairs in one order, and the ids in each in theirs.
    for (project, engine), task_ids in sorted(by_pair.items(), key=lambda kv: kv[0][::-1]):
        for start in range(0, len(task_ids), _CHUNK):
            yield uuid.UUID(bytes=project), engine, task_ids[start : start + _CHUNK]


# One (project, engine)'s task ids, each looked up by its own index probe, in
# the order given. A plain join or ``task_id = ANY(...)`` lets the planner
# pick a hash join over every task of the engine when the table's statistics
# are stale (a table that grew since its last ANALYZE, as drains make it):
# the subquery, kept apart by its OFFSET 0 or FOR UPDATE, cannot be flattened.
def _keyed(columns: str, lock: str) -> str:
    fence = lock or " OFFSET 0"
    return (
        f"SELECT t.* FROM unnest(%s::text[]) AS k (task_id), LATERAL"
        f" (SELECT {columns} FROM tasks WHERE engine = %s AND task_id = k.task_id"
        f" AND project_id = %s{fence}) AS t"
    )


def _lock(conn: Conn, keys: list[Key]) -> dict[Key, str]:
    """Lock the rows of ``keys``, in key order; their versions (absent: no row)."""
    versions: dict[Key, str] = {}
    for project, engine, task_ids in _groups(keys):
        rows = conn.execute(
            _keyed("task_id, xmin::text AS version", " FOR UPDATE"), (task_ids, engine, project)
        ).fetchall()
        versions.update(((project.bytes, engine, task_id), v) for task_id, v in rows)
    return versions


def _stage(conn: Conn, rows: Sequence[tuple[Any, ...]]) -> None:
    """Copy rows (`_columns`) into this transaction's staging table (created
    once per session; a rolled-back transaction takes it along, hence IF NOT
    EXISTS)."""
    cur = conn.cursor()
    cur.execute(
        f"CREATE TEMP TABLE IF NOT EXISTS {_STAGING} ("
        + ", ".join(f"{column} {kind}" for column, kind in _STAGED)
        + ") ON COMMIT DELETE ROWS"
    )
    cur.execute(f"DELETE FROM {_STAGING}")
    with cur.copy(f"COPY {_STAGING} ({_WRITTEN}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types([kind for _, kind in _STAGED])
        write_row = copy.write_row
        for values in rows:
            write_row(values)


def _insert_new(conn: Conn, rows: list[tuple[Any, ...]]) -> set[Key]:
    """Insert rows for tasks that had none; the keys it inserted (the others
    were inserted by a concurrent drain meanwhile)."""
    if not rows:
        return set()
    _stage(conn, rows)
    inserted = conn.execute(
        f"INSERT INTO tasks ({_WRITTEN}) SELECT {_FROM_STAGING} FROM {_STAGING}"
        f" ORDER BY {_KEY_ORDER} ON CONFLICT DO NOTHING"
        " RETURNING engine, task_id, project_id"
    ).fetchall()
    return {(project.bytes, engine, task_id) for engine, task_id, project in inserted}


def _read(d: Dialect, conn: Conn, keys: list[Key]) -> dict[Key, _Stored]:
    """The stored rows of ``keys`` (absent: none). Takes no lock."""
    found: dict[Key, _Stored] = {}
    if d.lock:
        for project, engine, task_ids in _groups(keys):
            rows = conn.execute(
                _keyed("task_id, doc, state, attempts, queue, xmin::text AS version", ""),
                (task_ids, engine, project),
            ).fetchall()
            _found(found, project.bytes, engine, rows)
        return found
    for start in range(0, len(keys), _CHUNK):
        chunk = keys[start : start + _CHUNK]
        values = ", ".join(["(?, ?, ?)"] * len(chunk))
        flat = [v for k in chunk for v in (k[1], k[2], _text_uuid(k[0]))]
        rows = conn.execute(
            "SELECT project_id, engine, task_id, doc, state, attempts, queue, NULL FROM tasks"
            f" WHERE (engine, task_id, project_id) IN (VALUES {values})",
            flat,
        ).fetchall()
        for project, engine, *read in rows:
            _found(found, uuid.UUID(project).bytes, engine, [read])
    return found


def _found(found: dict[Key, _Stored], project: bytes, engine: str, rows: Iterable[Any]) -> None:
    for task_id, doc, state, attempts, queue, version in rows:
        found[project, engine, task_id] = _Stored(
            orjson.loads(doc), state, attempts, (project, engine, queue or "", state), version
        )


def _upsert(d: Dialect, conn: Conn, written: list[_Folded]) -> None:
    """Write folded rows over their stored ones (locked by `_lock` on Postgres),
    or as new rows (on SQLite, or deleted meanwhile on Postgres)."""
    if not written:
        return
    updates = ", ".join(f"{column} = excluded.{column}" for column, _ in _STAGED[3:])
    conflict = f" ON CONFLICT (engine, task_id, project_id) DO UPDATE SET {updates}"
    if d.lock:
        _stage(conn, [values for _, _, values in written])
        conn.execute(
            f"INSERT INTO tasks ({_WRITTEN}) SELECT {_FROM_STAGING} FROM {_STAGING}"
            f" ORDER BY {_KEY_ORDER}{conflict}"
        )
    else:
        placeholders = ", ".join("?" * len(_STAGED))
        conn.cursor().executemany(
            f"INSERT INTO tasks ({_WRITTEN}) VALUES ({placeholders}){conflict}",
            [values for _, _, values in written],
        )


def _add_counts(d: Dialect, conn: Conn, deltas: dict[Counter, int]) -> None:
    """Add the deltas to the counters (one shard of each on Postgres), in key order."""
    changed = sorted((counter, n) for counter, n in deltas.items() if n)
    if not changed:
        return
    shard = random.randrange(SHARDS) if d.lock else 0
    sql = d.sql(
        f"INSERT INTO task_counts ({_COUNTED}, shard, n) VALUES (?, ?, ?, ?, ?, ?)"
        f" ON CONFLICT ({_COUNTED}, shard) DO UPDATE SET n = task_counts.n + excluded.n"
    )
    uuid_in = d.uuid_in
    conn.cursor().executemany(
        sql,
        [(uuid_in(uuid.UUID(bytes=c[0])), c[1], c[2], c[3], shard, n) for c, n in changed],
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


def delete_tasks_before(d: Dialect, conn: Conn, before: float, limit: int) -> int:
    """Delete up to ``limit`` of the tasks whose last event is before ``before``
    (oldest first), with their counts; how many went. On Postgres rows a drain
    holds are skipped, not waited for: the next run takes them."""
    lock = " FOR UPDATE SKIP LOCKED" if d.lock else ""
    rows = conn.execute(
        d.sql(
            "DELETE FROM tasks WHERE (engine, task_id, project_id) IN"
            " (SELECT engine, task_id, project_id FROM tasks WHERE last_event_at < ?"
            f" ORDER BY last_event_at LIMIT ?{lock})"
            f" RETURNING {_COUNTED}"
        ),
        [d.ts_in(before), limit],
    ).fetchall()
    deltas: dict[Counter, int] = {}
    for project, engine, queue, state in rows:
        counter = (d.uuid_out(project).bytes, engine, queue or "", state)
        deltas[counter] = deltas.get(counter, 0) - 1
    _add_counts(d, conn, deltas)
    return len(rows)


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
