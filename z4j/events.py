"""From buffered payloads to `events` rows.

A TCP payload is a JSON array of records; each record becomes one event row
with ``kind`` = its ``t`` field, ``source`` = the payload's source, and the
record itself as the body. The idempotency key is a pure function of where
the record sits in the buffer, so draining the same buffer row twice yields
the same keys and the store's unique constraint keeps one copy.

Key layout (a UUID, 16 bytes): the first 8 bytes of the buffer's id, the
buffer row id in 5 bytes, the record's index in its payload in 3 bytes.
Row ids are never reused (AUTOINCREMENT), and a payload can hold at most
2**24 records (the inflation cap keeps real payloads far below).

An agent's event batch is one buffer row too (source ``agent``, its origin
naming project, agent and worker), but agents re-send a batch they saw no
acknowledgement for, so its events' keys come from the events' own identity:
a hash of the agent id and the event id. For the same reason an agent event
is filed under its ``occurred_at`` (when it is a sane timestamp), not the
time it reached us: Postgres only finds a duplicate within one partition.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import NamedTuple

import orjson

from ._filing import filing
from .buffer import ClaimedRow
from .schedules import ScheduleControl, ScheduleFrame, schedule_event
from .tasks import TaskEvent, task_event

__all__ = ["MAX_RECORDS_PER_PAYLOAD", "EventRow", "event_rows", "key_prefix"]

MAX_RECORDS_PER_PAYLOAD = 1 << 24
_ROW_LIMIT = 1 << 40


class EventRow(NamedTuple):
    """One ``events`` row: what a drain writes for one record."""

    received_at: datetime
    idempotency_key: bytes  # 16 bytes: a UUID's bytes, without the UUID object
    source: str
    kind: str
    body: bytes  # the record, serialised JSON
    project_id: bytes | None = None  # UUID bytes, agent events only
    agent_id: bytes | None = None
    worker_id: str | None = None


_AGENT_KEY_LABEL = b"z4j-agent-event-v1:"


def key_prefix(buffer_id: uuid.UUID) -> int:
    return buffer_id.int >> 64


def _kind(record: object, row_id: int) -> str:
    kind = record.get("t") if isinstance(record, dict) else None
    if not isinstance(kind, str):
        # Ingest validates this; a row that fails here was damaged or planted.
        raise ValueError(f"buffer row {row_id}: a record has no string 't' field")
    return kind


def event_rows(
    buffer_id: uuid.UUID,
    rows: Iterable[ClaimedRow],
    tasks: list[TaskEvent] | None = None,
    schedules: list[ScheduleFrame | ScheduleControl] | None = None,
) -> Iterator[EventRow]:
    """Expand claimed payloads into event rows (CPU work: run it off the loop).

    The hot loop of the drain: it builds no UUID objects, and checks a
    record's kind with exact type tests first. With ``tasks``, the agent
    events about a task are also appended there, parsed once, for the task
    projection written in the same transaction (store/task_writes.py); with
    ``schedules``, the schedule observations (store/schedules.py).
    """
    prefix = key_prefix(buffer_id) << 64
    loads, dumps = orjson.loads, orjson.dumps
    origins: dict[bytes | None, _Origin] = {}  # one per agent session, read once
    for row in rows:
        if row.source == "agent":
            origin = origins.get(row.origin)
            if origin is None:
                origin = origins[row.origin] = _origin(row)
            yield from _agent_event_rows(row, origin, tasks, schedules)
            continue
        if row.id >= _ROW_LIMIT:
            raise ValueError(f"buffer row id {row.id} is out of the key's range")
        received_at = datetime.fromtimestamp(row.received_at, UTC)
        base = prefix | (row.id << 24)
        source = row.source
        for index, record in enumerate(loads(row.body)):
            kind = record.get("t") if type(record) is dict else None
            if type(kind) is not str:
                kind = _kind(record, row.id)  # raises, or accepts a str subclass
            yield EventRow(
                received_at, (base | index).to_bytes(16, "big"), source, kind, dumps(record)
            )


class _Origin(NamedTuple):
    """Who sent an agent payload: project and agent ids (16 bytes each), worker."""

    project: bytes
    agent: bytes
    worker: str | None


def _origin(row: ClaimedRow) -> _Origin:
    origin = orjson.loads(row.origin or b"null")
    if not isinstance(origin, dict):
        raise ValueError(f"buffer row {row.id}: agent payload without its origin")
    worker = origin.get("worker_id")
    return _Origin(
        uuid.UUID(origin["project_id"]).bytes,
        uuid.UUID(origin["agent_id"]).bytes,
        worker if isinstance(worker, str) else None,
    )


def _agent_event_rows(
    row: ClaimedRow,
    origin: _Origin,
    tasks: list[TaskEvent] | None,
    schedules: list[ScheduleFrame | ScheduleControl] | None,
) -> Iterator[EventRow]:
    project, agent, worker = origin
    for event in orjson.loads(row.body):
        event_id = event.get("id") if isinstance(event, dict) else None
        kind = event.get("kind") if isinstance(event, dict) else None
        if not isinstance(event_id, str) or not isinstance(kind, str):
            raise ValueError(f"buffer row {row.id}: an agent event without string id and kind")
        filed, at = filing(event.get("occurred_at"), row.received_at)
        if tasks is not None and kind.startswith("task."):
            about = task_event(project, agent, worker, event, row.received_at, filed_at=at)
            if about is not None:
                tasks.append(about)
        elif schedules is not None and kind.startswith("schedule."):
            observed = schedule_event(project, agent, worker, event)
            if observed is not None:
                schedules.append(observed)
        key = hashlib.blake2b(_AGENT_KEY_LABEL + agent + event_id.encode(), digest_size=16).digest()
        yield EventRow(
            filed,
            key,
            "agent",
            kind,
            orjson.dumps(event),
            project,
            agent,
            worker,
        )
