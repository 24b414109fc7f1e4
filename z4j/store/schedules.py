"""The ``schedules`` table: snapshots and control projections applied in a drain, and reads.

What scheduler adapters publish (z4j.schedules) is applied in the
transaction that stores the events carrying it, like the task projection
(store/task_writes.py), under three rules:

- **Only under the brain's grant.** ``schedule_streams`` holds, per
  (project, scheduler), the stream and epoch the brain last granted
  (``schedule.external.activate``). An observation of another stream, an
  older epoch, or the current epoch number with another epoch uuid is not
  applied: a new grant means a new activation snapshot is on its way.
- **Newer only.** Each stream remembers the (epoch, sequence) last applied;
  an observation at or below it changes nothing, so a re-sent or late one
  never overwrites a newer one, and a batch drained twice is a no-op.
- **Whole snapshots.** A snapshot's frames may arrive in several batches,
  re-sent and out of order: each is staged in ``schedule_frames`` (keyed by
  project, stream, epoch, sequence, snapshot id and frame index: a repeat is
  the same row). Once all ``frame_count`` row frames and the terminal frame
  are there and the rows hash to ``snapshot_digest``, the snapshot
  *replaces* the scheduler's rows of that project (rows it no longer has
  are deleted), and the staged frames up to it are dropped.
  Staging is bounded per stream (store/schedule_frames.py): an agent may
  never send a terminal frame.

A control projection (``schedule.updated``) upserts the rows it carries and
deletes its ``deleted_source_keys``.

Postgres drains run concurrently: the stream's row is read ``FOR UPDATE``
before its frames are staged, so two drains holding frames of one
snapshot take turns, and the second sees the first's frames. Streams are
locked in key order, after the tasks a batch touches (store/task_writes.py).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .. import schedules as core
from ..schedules import ScheduleControl, ScheduleFrame, ScheduleRow
from . import schedule_frames as staging
from ._filters import one_of
from ._rows import Conn, Dialect
from .base import ScheduleFilter, ScheduleRecord, ScheduleStream

__all__ = [
    "SCHEDULE_COLUMNS",
    "get_schedules",
    "grant_stream",
    "list_schedules",
    "stream_command",
    "streams",
    "write_schedules",
]

log = logging.getLogger("z4j.store.schedules")

Observation = ScheduleFrame | ScheduleControl

SCHEDULE_COLUMNS = (
    "project_id, scheduler, source_key, engine, name, task_name, kind, expression, timezone,"
    " queue, priority, args, kwargs, is_enabled, last_run_at, next_run_at, total_runs,"
    " external_id, catch_up, source, source_hash, agent_id, worker_id, stream_id,"
    " epoch_number, sequence, snapshot_id, updated_at"
)
STREAM_COLUMNS = (
    "project_id, scheduler, stream_id, epoch_number, epoch_uuid, adapter_instance_id,"
    " agent_id, worker_id, worker_connected_at, command_id, granted_at, applied_epoch,"
    " applied_sequence, applied_at"
)
_CHUNK = 500  # keys per DELETE (SQLite's parameter limit is 32,766)


# -- writes (in the drain's transaction) ---------------------------------------------------


def write_schedules(
    d: Dialect, conn: Conn, observations: Sequence[Observation], now: float | None = None
) -> Counter[str]:
    """Apply what ``observations`` complete, in the caller's transaction; the
    frames dropped to keep staging bounded, by reason (``oversize``, ``over_bound``)."""
    dropped: Counter[str] = Counter()
    if not observations:
        return dropped
    at = time.time() if now is None else now
    by_stream: dict[tuple[bytes, str], list[Observation]] = {}
    for item in observations:
        by_stream.setdefault((item.project_id, item.owner), []).append(item)
    for project, owner in sorted(by_stream):
        items = by_stream[project, owner]
        dropped += _apply_stream(d, conn, uuid.UUID(bytes=project), owner, items, at)
    return dropped


def _apply_stream(
    d: Dialect,
    conn: Conn,
    project_id: uuid.UUID,
    scheduler: str,
    items: list[Observation],
    at: float,
) -> Counter[str]:
    dropped: Counter[str] = Counter()
    row = conn.execute(
        d.sql(
            "SELECT stream_id, epoch_number, epoch_uuid, applied_epoch, applied_sequence"
            " FROM schedule_streams WHERE project_id = ? AND scheduler = ?" + d.lock
        ),
        (d.uuid_in(project_id), scheduler),
    ).fetchone()
    if row is None:
        log.info("%d %s observations with no grant ignored", len(items), scheduler)
        return dropped
    stream, epoch, epoch_uuid, applied_epoch, applied_sequence = row
    applied = (int(applied_epoch), int(applied_sequence))
    current = [
        i
        for i in items
        if (i.stream_id, i.epoch_number, i.epoch_uuid) == (stream, int(epoch), epoch_uuid)
        and (i.epoch_number, i.sequence) > applied
    ]
    current, dropped["oversize"] = staging.fitting(current, project_id, scheduler, stream)
    frames = [i for i in current if isinstance(i, ScheduleFrame)]
    if frames:
        staging.stage(d, conn, project_id, frames, at)
    # Each candidate once, oldest first: a snapshot made whole, or a control.
    candidates: dict[tuple[int, str], Observation] = {}
    for item in current:
        key = (item.sequence, item.snapshot_id if isinstance(item, ScheduleFrame) else "")
        candidates.setdefault(key, item)
    newest = applied
    for (sequence, _), item in sorted(candidates.items(), key=lambda kv: kv[0]):
        if (item.epoch_number, sequence) <= newest:
            continue
        if isinstance(item, ScheduleControl):
            _upsert(d, conn, project_id, item.rows, item, None, at)
            _delete(d, conn, project_id, scheduler, item.deleted)
        else:
            rows = staging.assembled(d, conn, project_id, item)
            if rows is None:
                continue
            _replace(d, conn, project_id, scheduler, rows, item, at)
        newest = (item.epoch_number, sequence)
    if newest != applied:
        conn.execute(
            d.sql(
                "UPDATE schedule_streams SET applied_epoch = ?, applied_sequence = ?,"
                " applied_at = ? WHERE project_id = ? AND scheduler = ?"
            ),
            (*newest, d.ts_in(at), d.uuid_in(project_id), scheduler),
        )
    if newest != applied or frames:
        staging.drop_applied(d, conn, project_id, stream, int(epoch), newest)
    if frames:
        dropped["over_bound"] = staging.trim(d, conn, project_id, scheduler, stream)
    return +dropped


def _replace(
    d: Dialect,
    conn: Conn,
    project_id: uuid.UUID,
    scheduler: str,
    rows: list[ScheduleRow],
    frame: ScheduleFrame,
    at: float,
) -> None:
    """The scheduler's rows of the project become exactly ``rows``."""
    kept = {r.source_key for r in rows}
    stored = conn.execute(
        d.sql("SELECT source_key FROM schedules WHERE project_id = ? AND scheduler = ?"),
        (d.uuid_in(project_id), scheduler),
    ).fetchall()
    _delete(d, conn, project_id, scheduler, [k for (k,) in stored if k not in kept])
    _upsert(d, conn, project_id, rows, frame, frame.snapshot_id, at)


def _delete(
    d: Dialect, conn: Conn, project_id: uuid.UUID, scheduler: str, keys: Sequence[str]
) -> None:
    for start in range(0, len(keys), _CHUNK):
        chunk = list(keys[start : start + _CHUNK])
        marks = ", ".join([d.param] * len(chunk))
        conn.execute(
            d.sql("DELETE FROM schedules WHERE project_id = ? AND scheduler = ?")
            + f" AND source_key IN ({marks})",
            (d.uuid_in(project_id), scheduler, *chunk),
        )


def _upsert(
    d: Dialect,
    conn: Conn,
    project_id: uuid.UUID,
    rows: Sequence[ScheduleRow],
    origin: Observation,
    snapshot_id: str | None,
    at: float,
) -> None:
    if not rows:
        return
    names = [c.strip() for c in SCHEDULE_COLUMNS.split(",")]
    placeholders = ", ".join([d.param] * len(names))
    updates = ", ".join(f"{c} = excluded.{c}" for c in names[3:])
    agent = d.uuid_in(uuid.UUID(bytes=origin.agent_id))
    conn.cursor().executemany(
        f"INSERT INTO schedules ({SCHEDULE_COLUMNS}) VALUES ({placeholders})"
        f" ON CONFLICT (project_id, scheduler, source_key) DO UPDATE SET {updates}",
        [
            (
                d.uuid_in(project_id),
                r.scheduler,
                r.source_key,
                r.engine,
                r.name,
                r.task_name,
                r.kind,
                r.expression,
                r.timezone,
                r.queue,
                r.priority,
                d.json_in(r.args),
                d.json_in(r.kwargs),
                r.is_enabled,
                d.opt_ts_in(r.last_run_at),
                d.opt_ts_in(r.next_run_at),
                r.total_runs,
                r.external_id,
                r.catch_up,
                r.source,
                r.source_hash,
                agent,
                origin.worker_id,
                origin.stream_id,
                origin.epoch_number,
                origin.sequence,
                snapshot_id,
                d.ts_in(at),
            )
            for r in rows
        ],
    )


# -- grants --------------------------------------------------------------------------------


def grant_stream(
    d: Dialect,
    conn: Conn,
    project_id: uuid.UUID,
    scheduler: str,
    *,
    agent_id: uuid.UUID,
    worker_id: str,
    worker_connected_at: float,
    expected_epoch: int,
    at: float,
) -> ScheduleStream | None:
    """The next epoch of the stream, granted to that worker (in the caller's
    transaction); None if its epoch is not ``expected_epoch`` any more."""
    found = conn.execute(
        d.sql(
            "SELECT epoch_number FROM schedule_streams WHERE project_id = ? AND scheduler = ?"
            + d.lock
        ),
        (d.uuid_in(project_id), scheduler),
    ).fetchone()
    if (0 if found is None else int(found[0])) != expected_epoch:
        return None
    epoch = expected_epoch + 1
    values = (
        d.uuid_in(project_id),
        scheduler,
        core.stream_id(project_id, scheduler),
        epoch,
        str(uuid.uuid4()),
        f"{agent_id}/{worker_id}",
        d.uuid_in(agent_id),
        worker_id,
        d.ts_in(worker_connected_at),
        None,
        d.ts_in(at),
    )
    if found is None:
        inserted = conn.execute(
            d.sql(
                "INSERT INTO schedule_streams (project_id, scheduler, stream_id, epoch_number,"
                " epoch_uuid, adapter_instance_id, agent_id, worker_id, worker_connected_at,"
                " command_id, granted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING"
            ),
            values,
        )
        if inserted.rowcount != 1:
            return None  # a concurrent first grant
    else:
        conn.execute(
            d.sql(
                "UPDATE schedule_streams SET stream_id = ?, epoch_number = ?, epoch_uuid = ?,"
                " adapter_instance_id = ?, agent_id = ?, worker_id = ?, worker_connected_at = ?,"
                " command_id = ?, granted_at = ? WHERE project_id = ? AND scheduler = ?"
            ),
            (*values[2:], values[0], values[1]),
        )
    return _stream(d, _one_stream(d, conn, project_id, scheduler))


def stream_command(
    d: Dialect,
    conn: Conn,
    project_id: uuid.UUID,
    scheduler: str,
    epoch_number: int,
    command_id: uuid.UUID,
) -> None:
    conn.execute(
        d.sql(
            "UPDATE schedule_streams SET command_id = ?"
            " WHERE project_id = ? AND scheduler = ? AND epoch_number = ?"
        ),
        (d.uuid_in(command_id), d.uuid_in(project_id), scheduler, epoch_number),
    )


def _one_stream(d: Dialect, conn: Conn, project_id: uuid.UUID, scheduler: str) -> Any:
    return conn.execute(
        d.sql(
            f"SELECT {STREAM_COLUMNS} FROM schedule_streams WHERE project_id = ? AND scheduler = ?"
        ),
        (d.uuid_in(project_id), scheduler),
    ).fetchone()


def streams(d: Dialect, conn: Conn) -> list[ScheduleStream]:
    rows = conn.execute(
        f"SELECT {STREAM_COLUMNS} FROM schedule_streams ORDER BY project_id, scheduler"
    ).fetchall()
    return [_stream(d, row) for row in rows]


def _stream(d: Dialect, row: Any) -> ScheduleStream:
    (
        project_id,
        scheduler,
        stream,
        epoch_number,
        epoch_uuid,
        adapter_instance_id,
        agent_id,
        worker_id,
        worker_connected_at,
        command_id,
        granted_at,
        applied_epoch,
        applied_sequence,
        applied_at,
    ) = row
    return ScheduleStream(
        project_id=d.uuid_out(project_id),
        scheduler=scheduler,
        stream_id=stream,
        epoch_number=int(epoch_number),
        epoch_uuid=epoch_uuid,
        adapter_instance_id=adapter_instance_id,
        agent_id=d.uuid_out(agent_id),
        worker_id=worker_id,
        worker_connected_at=d.ts_out(worker_connected_at),
        command_id=d.opt_uuid_out(command_id),
        granted_at=d.ts_out(granted_at),
        applied_epoch=int(applied_epoch),
        applied_sequence=int(applied_sequence),
        applied_at=d.opt_ts_out(applied_at),
    )


# -- reads ---------------------------------------------------------------------------------


def list_schedules(d: Dialect, conn: Conn, query: ScheduleFilter) -> list[ScheduleRecord]:
    """One page, by (scheduler, source_key, project_id), after ``query.after``."""
    terms: list[str] = []
    params: list[Any] = []
    if query.scheduler is not None:
        terms.append("scheduler = ?")
        params.append(query.scheduler)
    if query.engine is not None:
        terms.append("engine = ?")
        params.append(query.engine)
    if query.project_id is not None:
        terms.append("project_id = ?")
        params.append(d.uuid_in(query.project_id))
    if query.projects is not None:
        condition, values = one_of(d, "project_id", query.projects)
        terms.append(condition)
        params.extend(values)
    if query.enabled is not None:
        terms.append("is_enabled = ?")
        params.append(query.enabled)
    if query.after is not None:
        scheduler, source_key, project_id = query.after
        terms.append(
            "(scheduler > ? OR (scheduler = ? AND (source_key > ?"
            " OR (source_key = ? AND project_id > ?))))"
        )
        params += [scheduler, scheduler, source_key, source_key, d.uuid_in(project_id)]
    where = (" WHERE " + " AND ".join(terms)) if terms else ""
    rows = conn.execute(
        d.sql(
            f"SELECT {SCHEDULE_COLUMNS} FROM schedules{where}"
            " ORDER BY scheduler, source_key, project_id LIMIT ?"
        ),
        [*params, query.limit],
    ).fetchall()
    return [schedule_record(d, row) for row in rows]


def get_schedules(
    d: Dialect,
    conn: Conn,
    scheduler: str,
    source_key: str,
    project_id: uuid.UUID | None = None,
) -> list[ScheduleRecord]:
    sql = f"SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE scheduler = ? AND source_key = ?"
    params: list[Any] = [scheduler, source_key]
    if project_id is not None:
        sql += " AND project_id = ?"
        params.append(d.uuid_in(project_id))
    rows = conn.execute(d.sql(sql + " ORDER BY project_id"), params).fetchall()
    return [schedule_record(d, row) for row in rows]


def schedule_record(d: Dialect, row: Any) -> ScheduleRecord:
    (
        project_id,
        scheduler,
        source_key,
        engine,
        name,
        task_name,
        kind,
        expression,
        timezone,
        queue,
        priority,
        args,
        kwargs,
        is_enabled,
        last_run_at,
        next_run_at,
        total_runs,
        external_id,
        catch_up,
        source,
        source_hash,
        agent_id,
        worker_id,
        stream,
        epoch_number,
        sequence,
        snapshot_id,
        updated_at,
    ) = row
    return ScheduleRecord(
        project_id=d.uuid_out(project_id),
        scheduler=scheduler,
        source_key=source_key,
        engine=engine,
        name=name,
        task_name=task_name,
        kind=kind,
        expression=expression,
        timezone=timezone,
        queue=queue,
        priority=priority,
        args=d.json_out(args),
        kwargs=d.json_out(kwargs),
        is_enabled=bool(is_enabled),
        last_run_at=d.opt_ts_out(last_run_at),
        next_run_at=d.opt_ts_out(next_run_at),
        total_runs=int(total_runs),
        external_id=external_id,
        catch_up=catch_up,
        source=source,
        source_hash=source_hash,
        agent_id=d.uuid_out(agent_id),
        worker_id=worker_id,
        stream_id=stream,
        epoch_number=int(epoch_number),
        sequence=int(sequence),
        snapshot_id=snapshot_id,
        updated_at=d.ts_out(updated_at),
    )
