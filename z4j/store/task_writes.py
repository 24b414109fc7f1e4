"""The ``tasks`` table's writes: the projection, inside a drain's transaction.

Writes happen in the transaction that stores the events they come from, so
a task row never runs ahead of, or behind, the events it is derived from.
A batch's task events are grouped by key and folded (`z4j.tasks.TaskState`)
into the stored doc. The fold is idempotent (observations are kept by event
id), so a batch drained twice, or an event an agent sent twice, changes
nothing the second time. ``task_counts`` moves with the rows: each write
takes one from its row's old (project, engine, queue, state) and adds one
to its new.

Postgres drains run concurrently (several workers, several replicas): two
of them folding into one task must not both start from the old row and the
second overwrite the first. Each row carries a ``version``, a fresh random
value at every write (so none a rolled-back write meant). A drain
folds without locks, in no other drain's way, from the fold it last wrote
and still holds in its store's `TaskCache`, or from nothing (a task it does
not know: most are new). It puts its folds in the cache before it writes
them, with the versions the rows are to have: a drain of the same store
that folds one of these tasks meanwhile folds from it, and its write waits
for this one's. Then ONE statement, in key order, inserts the new rows and
updates the others ``WHERE`` the row's version is still the one folded
from. A row it does not write (another drain's, or one changed since) is
locked all the same (``ON CONFLICT DO UPDATE`` locks the row it skips): it
is read, folded again and written in a second round that waits for no one.
A row the statement inserted although the fold came from a stored one was
deleted meanwhile (by retention, or a rollback): it is folded again from
nothing, as if new. Finally the counts' deltas are added, to one of
`SHARDS` rows per counter, so that two drains rarely wait on one row.

Waits only go from a write to another drain's write of the same row, in
key order, so two drains cannot deadlock (a second round that inserts again
a row deleted in between is the rare exception the deadlock detector
covers). A cache entry whose write did not commit names a version no row
has: the next write from it finds the row changed, and folds again.

SQLite has one writer at a time: it reads, folds and upserts.

What this costs (benchmarks/tasks.py): the common write is a fold of the
batch's events into a cached state, one COPY row and one upserted row; no
read, no separate lock, no JSON parse of the stored doc.
"""

from __future__ import annotations

import functools
import os
import random
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import orjson

from ..tasks import TaskEvent, TaskState, TaskSummary
from ._rows import Conn, Dialect

__all__ = ["SHARDS", "TaskCache", "delete_tasks_before", "write_tasks"]

FINAL_STATES = frozenset({"succeeded", "failed", "revoked"})
# (engine, task id, project id bytes): the primary key's order, which the
# tuples' own order follows.
Key = tuple[str, str, bytes]
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
_STAGING = "_z4j_task_writes"
# The order every step takes keys in: Python's (of `Key` tuples), which
# compares strings by code point, as the "C" collation does.
_KEY_ORDER = 'engine COLLATE "C", task_id COLLATE "C", project_id'
# Postgres: the staged rows in one statement, each with the version it was
# folded from (a row taken for new: a fresh one, which no row has). A new
# row keeps it; a stored row is updated only WHERE it is still that version,
# to that version XOR the statement's salt (`_versions`). The rows it wrote
# come back with their versions; a row it did not write stays locked by it
# (ON CONFLICT DO UPDATE locks before its WHERE).
_UPSERT = (
    f"INSERT INTO tasks ({_WRITTEN}, version)"
    f" SELECT {_FROM_STAGING}, version FROM {_STAGING} ORDER BY {_KEY_ORDER}"
    " ON CONFLICT (engine, task_id, project_id) DO UPDATE SET "
    + ", ".join(f"{column} = excluded.{column}" for column, _ in _STAGED[3:])
    + ", version = excluded.version # %s"
    " WHERE tasks.version = excluded.version"
    " RETURNING engine, task_id, uuid_send(project_id), version"
)


# -- the cache --------------------------------------------------------------------------


class _Counted(NamedTuple):
    """What the counts and the finished list need of a row before a write."""

    state: str
    attempts: int
    counter: Counter


class _Before(NamedTuple):
    """Where a fold starts: the row's version (None: taken for new), its doc
    (None: nothing to fold into) and what it counted as."""

    version: int | None
    doc: bytes | None  # the stored doc (orjson)
    counted: _Counted | None


_NEW = _Before(None, None, None)
# Without the Python-level __new__ a NamedTuple call runs (one a task written).
_new_before: Callable[[Iterable[Any]], _Before] = functools.partial(tuple.__new__, _Before)
_new_counted: Callable[[Iterable[Any]], _Counted] = functools.partial(tuple.__new__, _Counted)

# The cache's budget, in bytes of stored doc (each entry adds ~200 bytes of its own).
CACHE_BYTES = 8 << 20
# A doc larger than this share of the budget is not kept.
_CACHE_ENTRY_SHARE = 64


class TaskCache:
    """The tasks a drain wrote last, by key: the version each row was written
    as, its doc and what it counted as; least recently written go first past
    ``max_bytes`` (of doc). Shared by a store's drains (threads). A hit saves
    reading the row back; whether the row is still that version is checked
    by the write itself. Docs are kept as the bytes stored, not as the
    objects a fold works on: a third of the memory, and nothing for the
    cyclic garbage collector to walk (a drain of 100,000 one-event rows, one
    worker, A/B twice: 2.9 and 3.5 s of the brain's CPU from bytes, 3.5 and
    4.4 s from objects, of which the collector 0.25-0.37 s and 0.6-0.8 s)."""

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Key, tuple[_Before, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        """Bytes of stored doc held."""
        return self._bytes

    def get(self, key: Key) -> _Before | None:
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def put(self, entries: Iterable[tuple[Key, _Before, int]]) -> None:
        """Keep ``(key, before, doc size)`` entries, newest last."""
        limit = self.max_bytes // _CACHE_ENTRY_SHARE
        with self._lock:
            held, pop = self._entries, self._entries.pop
            for key, before, size in entries:
                old = pop(key, None)
                if old is not None:
                    self._bytes -= old[1]
                if size <= limit:
                    held[key] = (before, size)
                    self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, size) = held.popitem(last=False)
                self._bytes -= size

    def discard(self, keys: Iterable[Key]) -> None:
        with self._lock:
            for key in keys:
                old = self._entries.pop(key, None)
                if old is not None:
                    self._bytes -= old[1]


# -- writes ---------------------------------------------------------------------------


# A key's fold: the doc as stored, and the row's columns.
_Folded = tuple[bytes, TaskSummary]


def write_tasks(
    d: Dialect, conn: Conn, events: Sequence[TaskEvent], cache: TaskCache | None = None
) -> list[TaskSummary]:
    """Fold ``events`` into their tasks' rows and counts, in the caller's transaction.

    ``cache`` (Postgres): the tasks this store's drains wrote last.
    Returns the rows this write finished: now in a final state, and not in
    that state and attempt before (so that a replayed batch finishes none,
    and the outcome metrics count each run once)."""
    if not events:
        return []
    by_key: dict[Key, list[TaskEvent]] = {}
    for event in events:
        key = (event[5], event[6], event[0])  # engine, task_id, project_id
        group = by_key.get(key)
        if group is None:
            by_key[key] = [event]
        else:
            group.append(event)
    keys = sorted(by_key)
    if d.lock:
        befores, folded = _write_postgres(d, conn, by_key, keys, cache)
    else:
        befores = {key: _NEW for key in keys}
        befores.update(_read(d, conn, keys))
        folded = {key: _fold(befores[key], by_key[key]) for key in keys}
        _upsert_sqlite(d, conn, [folded[key] for key in keys])
    deltas: dict[Counter, int] = {}
    finished: list[TaskSummary] = []
    for key in keys:
        _count(deltas, befores[key].counted, folded[key][1], finished)
    _add_counts(d, conn, deltas)
    return finished


def _write_postgres(
    d: Dialect,
    conn: Conn,
    by_key: dict[Key, list[TaskEvent]],
    keys: list[Key],
    cache: TaskCache | None,
) -> tuple[dict[Key, _Before], dict[Key, _Folded]]:
    """Fold from the cache (else as new), write in one statement, then fold
    again and write what another drain had changed (see the module's docstring)."""
    get = cache.get if cache is not None else _no_entry
    befores = {key: get(key) or _NEW for key in keys}
    folded = {key: _fold(befores[key], by_key[key]) for key in keys}
    pending = keys
    while pending:
        salt, staged, meant = _versions(pending, befores)
        if cache is not None:
            # Before the write: a drain beside this one that folds one of these
            # tasks now folds from this fold, and its write waits for this one's
            # to commit. Should this one not write it, the version is not the row's.
            _keep(cache, pending, meant, folded)
        written = _upsert_postgres(conn, pending, staged, salt, folded)
        again: list[Key] = []
        reborn: list[Key] = []
        for key in pending:
            version = written.get(key)
            if version == meant[key]:
                continue
            if version is None:
                again.append(key)  # not the row folded from: read it (ours, locked) and again
            else:
                reborn.append(key)  # deleted meanwhile, and inserted from the old fold
        stored = _read(d, conn, again)
        for key in again:
            befores[key] = stored.get(key, _NEW)
        for key in reborn:
            befores[key] = _Before(staged[key], None, None)
        pending = sorted(again + reborn)
        for key in pending:
            folded[key] = _fold(befores[key], by_key[key])
    return befores, folded


def _versions(
    keys: list[Key], befores: dict[Key, _Before]
) -> tuple[int, dict[Key, int], dict[Key, int]]:
    """A statement's salt, the version each row is staged with (the one it was
    folded from, else a fresh one), and the version each is meant to have
    after it. Random 63-bit values, from the OS (forked processes draw
    different ones): a version a rolled-back write meant is no row's."""
    salt = int.from_bytes(os.urandom(8)) >> 1
    fresh = int.from_bytes(os.urandom(8)) >> 1
    staged: dict[Key, int] = {}
    meant: dict[Key, int] = {}
    for n, key in enumerate(keys, 1):
        version = befores[key].version
        if version is None:
            staged[key] = meant[key] = fresh ^ n
        else:
            staged[key] = version
            meant[key] = version ^ salt
    return salt, staged, meant


def _keep(
    cache: TaskCache, keys: list[Key], meant: dict[Key, int], folded: dict[Key, _Folded]
) -> None:
    entries = []
    for key in keys:
        doc, row = folded[key]
        entries.append((key, _new_before((meant[key], doc, _counted(row))), len(doc)))
    cache.put(entries)


def _no_entry(key: Key) -> None:
    return None


def _fold(before: _Before, events: list[TaskEvent]) -> _Folded:
    if before.doc is not None:
        task = TaskState.load(orjson.loads(before.doc))
    else:
        first = events[0]
        task = TaskState((first[0], first[5], first[6]))  # project_id, engine, task_id
    for event in events:
        task.add(event)
    return task.stored()


def _counted(row: TaskSummary) -> _Counted:
    project, engine, _, _, queue, state, attempts = row[:7]
    return _new_counted((state, attempts, (project, engine, queue or "", state)))


def _count(
    deltas: dict[Counter, int],
    before: _Counted | None,
    row: TaskSummary,
    finished: list[TaskSummary],
) -> None:
    state = row.state
    after = (row.project_id, row.engine, row.queue or "", state)
    if before is None or before.counter != after:
        if before is not None:
            deltas[before.counter] = deltas.get(before.counter, 0) - 1
        deltas[after] = deltas.get(after, 0) + 1
    if state in FINAL_STATES and (
        before is None or before.state != state or before.attempts != row.attempts
    ):
        finished.append(row)


def _columns(pg: bool, doc: bytes, row: TaskSummary) -> tuple[Any, ...]:
    """A row's stored values, in `_STAGED`'s order: the doc as orjson bytes,
    times as epoch seconds; uuids as 16 bytes on Postgres (its binary COPY
    takes them so), as text on SQLite."""
    agent = row.agent_id
    if pg:
        return (
            row.engine,
            row.task_id,
            row.project_id,
            *row[3:7],  # name, queue, state, attempts
            agent or None,
            *row[8:],  # worker ... last_event_at
            doc,
        )
    return (
        row.engine,
        row.task_id,
        _text_uuid(row.project_id),
        *row[3:7],
        _text_uuid(agent) if agent else None,
        *row[8:],
        doc,
    )


def _text_uuid(value: bytes) -> str:
    return str(uuid.UUID(bytes=value))


def _groups(keys: Sequence[Key]) -> Iterator[tuple[uuid.UUID, str, list[str]]]:
    """Keys (in order) as (project, engine, task ids), by engine and project:
    a batch has few of those, so a lookup sends one array per pair."""
    by_pair: dict[tuple[bytes, str], list[str]] = {}
    for engine, task_id, project in keys:
        by_pair.setdefault((project, engine), []).append(task_id)
    # Every drain takes the pairs in one order, and the ids in each in theirs.
    for (project, engine), task_ids in sorted(by_pair.items(), key=lambda kv: kv[0][::-1]):
        for start in range(0, len(task_ids), _CHUNK):
            yield uuid.UUID(bytes=project), engine, task_ids[start : start + _CHUNK]


# One (project, engine)'s task ids, each looked up by its own index probe, in
# the order given. A plain join or ``task_id = ANY(...)`` lets the planner
# pick a hash join over every task of the engine when the table's statistics
# are stale (a table that grew since its last ANALYZE, as drains make it):
# the subquery, kept apart by its OFFSET 0, cannot be flattened.
_READ_KEYED = (
    "SELECT t.* FROM unnest(%s::text[]) AS k (task_id), LATERAL"
    " (SELECT task_id, doc, state, attempts, queue, version FROM tasks"
    " WHERE engine = %s AND task_id = k.task_id AND project_id = %s OFFSET 0) AS t"
)


def _upsert_postgres(
    conn: Conn, keys: list[Key], staged: dict[Key, int], salt: int, folded: dict[Key, _Folded]
) -> dict[Key, int]:
    """Write the folds of ``keys`` (in key order) in one statement; the versions
    of the rows it wrote (see `_UPSERT`). The staging table is created once
    per session (a rolled-back transaction takes it along, hence IF NOT
    EXISTS)."""
    cur = conn.cursor()
    cur.execute(
        f"CREATE TEMP TABLE IF NOT EXISTS {_STAGING} ("
        + ", ".join(f"{column} {kind}" for column, kind in _STAGED)
        + ", version int8) ON COMMIT DELETE ROWS"
    )
    cur.execute(f"DELETE FROM {_STAGING}")
    with cur.copy(f"COPY {_STAGING} ({_WRITTEN}, version) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types([kind for _, kind in _STAGED] + ["int8"])
        write_row = copy.write_row
        for key in keys:
            doc, row = folded[key]
            write_row((*_columns(True, doc, row), staged[key]))
    return {
        (engine, task_id, project): version
        for engine, task_id, project, version in cur.execute(_UPSERT, (salt,)).fetchall()
    }


def _read(d: Dialect, conn: Conn, keys: list[Key]) -> dict[Key, _Before]:
    """The stored rows of ``keys`` (absent: none). Takes no lock."""
    found: dict[Key, _Before] = {}
    if not keys:
        return found
    if d.lock:
        for project, engine, task_ids in _groups(keys):
            rows = conn.execute(_READ_KEYED, (task_ids, engine, project)).fetchall()
            _found(found, project.bytes, engine, rows)
        return found
    for start in range(0, len(keys), _CHUNK):
        chunk = keys[start : start + _CHUNK]
        values = ", ".join(["(?, ?, ?)"] * len(chunk))
        flat = [v for k in chunk for v in (k[0], k[1], _text_uuid(k[2]))]
        rows = conn.execute(
            "SELECT project_id, engine, task_id, doc, state, attempts, queue, NULL FROM tasks"
            f" WHERE (engine, task_id, project_id) IN (VALUES {values})",
            flat,
        ).fetchall()
        for project, engine, *read in rows:
            _found(found, uuid.UUID(project).bytes, engine, [read])
    return found


def _found(found: dict[Key, _Before], project: bytes, engine: str, rows: Iterable[Any]) -> None:
    for task_id, doc, state, attempts, queue, version in rows:
        found[engine, task_id, project] = _Before(
            version,
            bytes(doc),
            _Counted(state, attempts, (project, engine, queue or "", state)),
        )


def _upsert_sqlite(d: Dialect, conn: Conn, written: list[_Folded]) -> None:
    """Write folded rows over their stored ones, or as new rows."""
    if not written:
        return
    updates = ", ".join(f"{column} = excluded.{column}" for column, _ in _STAGED[3:])
    placeholders = ", ".join("?" * len(_STAGED))
    conn.cursor().executemany(
        f"INSERT INTO tasks ({_WRITTEN}) VALUES ({placeholders})"
        f" ON CONFLICT (engine, task_id, project_id) DO UPDATE SET {updates}",
        [_columns(False, doc, row) for doc, row in written],
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
