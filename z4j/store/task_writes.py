"""The ``tasks`` table's writes: the projection, inside a drain's transaction.

Writes happen in the transaction that stores the events they come from, so
a task row never runs ahead of, or behind, the events it is derived from.
A batch's task events are grouped by key and folded with `z4j.tasks.merge`
into the stored doc. The fold is idempotent (observations are kept by event
id), so a batch drained twice, or an event an agent sent twice, changes
nothing the second time. ``task_counts`` moves with the rows: each write
takes one from its row's old (project, engine, queue, state) and adds one
to its new.

Postgres drains run concurrently (several workers, several replicas): two
of them folding into one task must not both read the old row and the
second overwrite the first. The fold runs first, on rows read without a
lock, so that no other drain waits on this one's Python. Then, every step
in key order:

1. New tasks (not there when read) are inserted ``ON CONFLICT DO
   NOTHING``: that waits for a concurrent insert of the same key to
   commit, and the keys it did not insert are "lost" to another drain.
2. The tasks that were there, and the lost ones, are locked ``FOR
   UPDATE``. A row whose version (xmin) moved since it was read, or a lost
   one, is read again and folded again; then all are written back.
3. The counts' deltas are added, to one of `SHARDS` rows per counter, so
   that two drains rarely wait on one row.

Waits only go from an insert to another drain's insert (1) and from a lock
to another's lock (2), each in key order, so two drains cannot deadlock
(a row deleted by retention in between is inserted again, a rare second
round that the deadlock detector covers). SQLite has one writer at a time:
it reads, folds and upserts.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import orjson

from ..tasks import TaskEvent, TaskRow, merge
from ._rows import Conn, Dialect

__all__ = ["SHARDS", "delete_tasks_before", "write_tasks"]

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
_COUNTED = "project_id, engine, queue, state"
SHARDS = 4
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
