"""The ``schedule_frames`` table: where a snapshot's frames wait until it is whole.

store/schedules.py stages each frame of the current grant here, in the
drain's transaction and under the stream's lock, asks whether its snapshot
is whole (`assembled`), and drops the frames of what it applied
(`drop_applied`). An agent may send frames and never the terminal one, so
what a stream keeps staged is bounded:

- at most `MAX_STAGED_SNAPSHOTS` snapshots and `MAX_STAGED_FRAMES` frames
  per stream, the oldest snapshots' frames going first (`trim`);
- a snapshot that needs more frames than that is not staged (`fitting`);
- frames staged over `FRAME_MAX_AGE_SECONDS` ago are deleted by the
  maintenance (`expire_frames`).

Each drop is logged, naming the stream, and counted by the caller.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from .. import schedules as core
from ..schedules import ScheduleControl, ScheduleFrame, ScheduleRow
from ..stats import ThrottledLog
from ._rows import Conn, Dialect

__all__ = [
    "FRAME_MAX_AGE_SECONDS",
    "MAX_STAGED_FRAMES",
    "MAX_STAGED_SNAPSHOTS",
    "assembled",
    "drop_applied",
    "expire_frames",
    "fitting",
    "stage",
    "trim",
]

log = logging.getLogger("z4j.store.schedules")  # one logger for the schedule tables
# A hostile agent can trip the bounds on every batch: one line a minute per stream.
_warn = ThrottledLog(log, interval=60.0)

Observation = ScheduleFrame | ScheduleControl

_FRAME_COLUMNS = (
    "project_id, stream_id, epoch_number, sequence, snapshot_id, frame_index, scheduler,"
    " epoch_uuid, source_scope, adapter_instance_id, stable_source, frame_kind, frame_count,"
    " row_count, snapshot_digest, rows, agent_id, worker_id, received_at"
)

# What one stream may keep staged: every agent may be hostile, and frames of
# a snapshot whose terminal frame never comes would otherwise stay for ever.
# A snapshot needs frame_count + 1 staged frames, all read at once to
# assemble it, so MAX_STAGED_FRAMES bounds a stream's staged rows and the
# memory of one assembly at 256 agent messages (Z4J_WS_MAX_FRAME_BYTES, 1 MiB
# by default). z4j-bare fills a frame to ~768 KiB, some 1,400 rows of ~0.5 KiB:
# 255 row frames hold ~350k schedules, far more than any scheduler has.
MAX_STAGED_FRAMES = 256
# Snapshots staged at once per stream: a newer one may start while an older
# one is still arriving; more than a few means frames that never complete.
MAX_STAGED_SNAPSHOTS = 4
# An adapter sends a snapshot's frames together: frames older than this
# belong to a snapshot that was abandoned, and the maintenance deletes them.
FRAME_MAX_AGE_SECONDS = 3600.0


def stage(
    d: Dialect, conn: Conn, project_id: uuid.UUID, frames: list[ScheduleFrame], at: float
) -> None:
    placeholders = ", ".join([d.param] * 19)
    conn.cursor().executemany(
        f"INSERT INTO schedule_frames ({_FRAME_COLUMNS}) VALUES ({placeholders})"
        " ON CONFLICT DO NOTHING",
        [
            (
                d.uuid_in(project_id),
                f.stream_id,
                f.epoch_number,
                f.sequence,
                f.snapshot_id,
                f.frame_index,
                f.owner,
                f.epoch_uuid,
                f.source_scope,
                f.adapter_instance_id,
                f.stable_source,
                f.frame_kind,
                f.frame_count,
                f.row_count,
                f.snapshot_digest,
                d.json_in(f.rows),
                d.uuid_in(uuid.UUID(bytes=f.agent_id)),
                f.worker_id,
                d.ts_in(at),
            )
            for f in frames
        ],
    )


def assembled(
    d: Dialect, conn: Conn, project_id: uuid.UUID, frame: ScheduleFrame
) -> list[ScheduleRow] | None:
    """The snapshot's rows once all its frames are staged and check out; None
    while frames are missing. A snapshot whose frames disagree or whose rows
    do not hash to its digest is dropped (logged): it can never be applied."""
    staged = conn.execute(
        d.sql(
            "SELECT frame_index, frame_kind, frame_count, row_count, snapshot_digest, rows"
            " FROM schedule_frames WHERE project_id = ? AND stream_id = ? AND epoch_number = ?"
            " AND sequence = ? AND snapshot_id = ? ORDER BY frame_index"
        ),
        (
            d.uuid_in(project_id),
            frame.stream_id,
            frame.epoch_number,
            frame.sequence,
            frame.snapshot_id,
        ),
    ).fetchall()
    if len(staged) < frame.frame_count + 1:
        return None
    rows: list[dict[str, Any]] = []
    problem = None
    for expected, (index, kind, count, row_count, checksum, body) in enumerate(staged):
        last = expected == frame.frame_count
        if (index, kind) != (expected, "terminal" if last else "rows") or (
            count,
            row_count,
            checksum,
        ) != (frame.frame_count, frame.row_count, frame.snapshot_digest):
            problem = "its frames disagree"
            break
        rows += d.json_out(body)
    if problem is None and len(staged) != frame.frame_count + 1:
        problem = "it has frames beyond its count"
    if problem is None and len(rows) != frame.row_count:
        problem = f"{len(rows)} rows, not its row_count {frame.row_count}"
    if problem is None and core.snapshot_digest(frame, rows) != frame.snapshot_digest:
        problem = "its rows do not match its snapshot_digest"
    typed: list[ScheduleRow] = []
    if problem is None:
        try:
            typed = [core.schedule_row(r, frame.owner) for r in rows]
        except (TypeError, ValueError) as exc:
            problem = str(exc)
    if problem is None and len({r.source_key for r in typed}) != len(typed):
        problem = "it repeats a source key"
    if problem is not None:
        log.warning(
            "%s snapshot %s (epoch %d, sequence %d) not applied: %s",
            frame.owner,
            frame.snapshot_id,
            frame.epoch_number,
            frame.sequence,
            problem,
        )
        conn.execute(
            d.sql(
                "DELETE FROM schedule_frames WHERE project_id = ? AND stream_id = ?"
                " AND epoch_number = ? AND sequence = ? AND snapshot_id = ?"
            ),
            (
                d.uuid_in(project_id),
                frame.stream_id,
                frame.epoch_number,
                frame.sequence,
                frame.snapshot_id,
            ),
        )
        return None
    return typed


def drop_applied(
    d: Dialect,
    conn: Conn,
    project_id: uuid.UUID,
    stream: str,
    epoch: int,
    applied: tuple[int, int],
) -> None:
    """Delete the frames of the applied observation and older ones, and of older epochs."""
    conn.execute(
        d.sql(
            "DELETE FROM schedule_frames WHERE project_id = ? AND stream_id = ?"
            " AND (epoch_number < ? OR (epoch_number = ? AND sequence <= ?))"
        ),
        (d.uuid_in(project_id), stream, epoch, applied[0], applied[1]),
    )


def fitting(
    items: list[Observation], project_id: uuid.UUID, scheduler: str, stream: str
) -> tuple[list[Observation], int]:
    """``items`` without frames of snapshots that need more frames staged than
    a stream may keep (they could never be applied), and how many went."""
    kept = [
        i for i in items if not isinstance(i, ScheduleFrame) or i.frame_count < MAX_STAGED_FRAMES
    ]
    if len(kept) < len(items):
        _refused(project_id, scheduler, stream, len(items) - len(kept))
    return kept, len(items) - len(kept)


def _refused(project_id: uuid.UUID, scheduler: str, stream: str, n: int) -> None:
    _warn.warning(
        f"oversize {stream}",
        "schedule stream %s (%s of project %s): %d frames not staged, their snapshots"
        " need more frames than the %d a stream may stage",
        stream,
        scheduler,
        project_id,
        n,
        MAX_STAGED_FRAMES,
    )


def trim(d: Dialect, conn: Conn, project_id: uuid.UUID, scheduler: str, stream: str) -> int:
    """Keep the stream's newest staged snapshots within the bounds; delete the
    frames of older ones (a newer snapshot applied would drop them anyway).
    How many frames went."""
    newest = conn.execute(
        d.sql(
            "SELECT epoch_number, sequence, snapshot_id, count(*) FROM schedule_frames"
            " WHERE project_id = ? AND stream_id = ? GROUP BY epoch_number, sequence, snapshot_id"
            " ORDER BY epoch_number DESC, sequence DESC, snapshot_id DESC LIMIT ?"
        ),
        (d.uuid_in(project_id), stream, MAX_STAGED_SNAPSHOTS + 1),
    ).fetchall()
    cut = _first_over([int(count) for *_, count in newest])
    if cut is None:
        return 0
    epoch, sequence, snapshot, _ = newest[cut]  # it and every older snapshot go
    gone: int = conn.execute(
        d.sql(
            "DELETE FROM schedule_frames WHERE project_id = ? AND stream_id = ? AND"
            " (epoch_number < ? OR (epoch_number = ? AND (sequence < ?"
            " OR (sequence = ? AND snapshot_id <= ?))))"
        ),
        (d.uuid_in(project_id), stream, epoch, epoch, sequence, sequence, snapshot),
    ).rowcount
    _warn.warning(
        f"bound {stream}",
        "schedule stream %s (%s of project %s): %d staged frames dropped, of snapshots"
        " up to epoch %d sequence %d (at most %d snapshots and %d frames are staged"
        " per stream)",
        stream,
        scheduler,
        project_id,
        gone,
        epoch,
        sequence,
        MAX_STAGED_SNAPSHOTS,
        MAX_STAGED_FRAMES,
    )
    return gone


def _first_over(counts: list[int]) -> int | None:
    """Of snapshots' frame counts, newest first: the first past the bounds, if any."""
    kept = 0
    for n, count in enumerate(counts):
        kept += count
        if n == MAX_STAGED_SNAPSHOTS or kept > MAX_STAGED_FRAMES:
            return n
    return None


def expire_frames(d: Dialect, conn: Conn, now: float) -> int:
    """Delete frames staged over `FRAME_MAX_AGE_SECONDS` before ``now`` (in
    the caller's transaction): their snapshot was abandoned. How many went.

    The streams concerned are locked first, in the drains' order, so a
    drain assembling a snapshot never sees its frames go half-way.
    """
    cutoff = d.ts_in(now - FRAME_MAX_AGE_SECONDS)
    if d.lock:
        concerned = conn.execute(
            d.sql(
                "SELECT DISTINCT s.project_id, s.scheduler FROM schedule_streams s"
                " JOIN schedule_frames f ON f.project_id = s.project_id"
                " AND f.stream_id = s.stream_id WHERE f.received_at < ?"
            ),
            (cutoff,),
        ).fetchall()
        for project, scheduler in sorted((d.uuid_out(p).bytes, s) for p, s in concerned):
            conn.execute(
                d.sql(
                    "SELECT 1 FROM schedule_streams WHERE project_id = ? AND scheduler = ?" + d.lock
                ),
                (d.uuid_in(uuid.UUID(bytes=project)), scheduler),
            ).fetchall()
    gone: int = conn.execute(
        d.sql("DELETE FROM schedule_frames WHERE received_at < ?"), (cutoff,)
    ).rowcount
    return gone
