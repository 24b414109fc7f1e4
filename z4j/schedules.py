"""Schedules: the z4j external-schedule protocol (z4j-bare 1.13), read sans-IO.

A scheduler adapter (z4j-hueyperiodic, z4j-celerybeat, ...) publishes
nothing until the brain grants it a stream epoch with the command
``schedule.external.activate``. From then on every observation of the
scheduler's schedules is one **snapshot**, sequenced within its epoch and
cut into frames, each an agent event of kind ``schedule.snapshot``::

    data = {"external_snapshot_frame": {protocol_version: 1, stream_id, epoch_uuid,
              epoch_number, sequence, owner, source_scope, adapter_instance_id,
              snapshot_id, frame_kind: "rows" | "terminal", frame_index,
              frame_count, row_count, snapshot_digest, stable_source,
              schedules: [row, ...]},
            "frame_digest": sha256 of the frame's canonical JSON,
            "reason": "activation" | "command" | "periodic" | ...}

Row frames are numbered 0..frame_count-1, then one terminal frame
(index frame_count, no rows). ``snapshot_digest`` is the sha256 of the
whole snapshot's canonical projection body (all its rows, sorted by
source key), so a snapshot put together from frames can be checked. A
``schedule.external.control`` operation publishes ``schedule.updated``
(``data.external_projection``: a partial projection with its own
sequence, and ``payload_digest``).

This module names the protocol's identities (`stream_id`, `source_scope`),
parses and checks events (`schedule_event`), checks an assembled snapshot
(`snapshot_digest`) and turns rows into typed values (`schedule_row`); the
store (store/schedules.py) keeps them. Canonical JSON is the adapters':
keys sorted, no spaces, UTF-8, no NaN (z4j_core.schedule_external).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import attrs

from .protocol.agent.untrusted import loggable

__all__ = [
    "MUTATION_CAPABILITY",
    "RUNTIME_FEATURE",
    "SNAPSHOT_CAPABILITY",
    "ScheduleControl",
    "ScheduleFrame",
    "ScheduleRow",
    "activation",
    "canonical_json",
    "digest",
    "projection",
    "schedule_event",
    "schedule_row",
    "snapshot_digest",
    "source_scope",
    "stream_id",
]

log = logging.getLogger("z4j.schedules")

PROTOCOL_VERSION = 1
# The runtime speaks the protocol (hello.runtime_features) ...
RUNTIME_FEATURE = "external_schedule_protocol_v1"
# ... and the scheduler can be read as one stable snapshot (its capabilities):
# only then may the brain activate it with stable_source true.
SNAPSHOT_CAPABILITY = "external_schedule_stable_snapshot_v1"
# Native writes fenced by the stream and followed by a snapshot (schedule.external.mutate).
MUTATION_CAPABILITY = "external_schedule_mutation_v1"

# Identities go into primary keys: bounded, so no index entry is too large.
MAX_KEY = 1000
MAX_ID = 200
_STREAM_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://z4j.dev/schedule-stream/v1")
# The row fields of the protocol (normalize_external_schedule), in its order.
ROW_FIELDS = (
    "source_key",
    "engine",
    "scheduler",
    "name",
    "task_name",
    "kind",
    "expression",
    "timezone",
    "queue",
    "priority",
    "args",
    "kwargs",
    "is_enabled",
    "last_run_at",
    "next_run_at",
    "total_runs",
    "external_id",
    "catch_up",
    "source",
    "source_hash",
)
_TIMES = ("last_run_at", "next_run_at")


def canonical_json(value: Any) -> bytes:
    """The adapters' canonical encoding: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def digest(value: Any) -> str:
    """sha256 of the canonical encoding, hex."""
    return hashlib.sha256(canonical_json(value)).hexdigest()


def source_scope(owner: str) -> str:
    """The canonical whole-scheduler source scope of the protocol's version 1."""
    return canonical_json({"kind": "scheduler-owner", "owner": owner, "version": 1}).decode()


def stream_id(project_id: uuid.UUID, scheduler: str) -> str:
    """The stream of one scheduler in one project: the same on every brain and
    every epoch (an adapter refuses a new epoch on another stream). A UUID,
    as ``schedule.external.control`` requires."""
    return str(uuid.uuid5(_STREAM_NAMESPACE, f"{project_id}/{scheduler}"))


class Grant(Protocol):
    """What an activation names (store.base.ScheduleStream has it)."""

    @property
    def scheduler(self) -> str: ...
    @property
    def stream_id(self) -> str: ...
    @property
    def epoch_uuid(self) -> str: ...
    @property
    def epoch_number(self) -> int: ...
    @property
    def adapter_instance_id(self) -> str: ...


def activation(grant: Grant) -> dict[str, Any]:
    """The parameters of ``schedule.external.activate`` for a grant, as z4j-bare
    1.13 checks them. ``stable_source`` is the brain's word that the scheduler
    is read as one stable snapshot: it is given only to schedulers that
    advertise `SNAPSHOT_CAPABILITY`."""
    return {
        "owner": grant.scheduler,
        "source_scope": source_scope(grant.scheduler),
        "stream_id": grant.stream_id,
        "epoch_uuid": grant.epoch_uuid,
        "epoch_number": grant.epoch_number,
        "adapter_instance_id": grant.adapter_instance_id,
        "stable_source": True,
    }


@attrs.frozen(kw_only=True)
class ScheduleRow:
    """One schedule as a snapshot or a control projection carries it, typed.
    Times are epoch seconds."""

    source_key: str
    engine: str
    scheduler: str
    name: str
    task_name: str
    kind: str
    expression: str
    timezone: str
    queue: str | None
    priority: str
    args: list[Any]
    kwargs: dict[str, Any]
    is_enabled: bool
    last_run_at: float | None
    next_run_at: float | None
    total_runs: int
    external_id: str | None
    catch_up: str
    source: str
    source_hash: str | None


@attrs.frozen(kw_only=True)
class _Published:
    """Who published an observation, and under which grant."""

    project_id: bytes  # 16-byte UUIDs, as the drain carries them
    agent_id: bytes
    worker_id: str | None
    event_id: str
    owner: str  # the scheduler
    stream_id: str
    epoch_uuid: str
    epoch_number: int
    sequence: int
    source_scope: str
    adapter_instance_id: str
    stable_source: bool


@attrs.frozen(kw_only=True)
class ScheduleFrame(_Published):
    """One frame of a snapshot (``schedule.snapshot``); rows as received."""

    snapshot_id: str
    frame_kind: str  # "rows" | "terminal"
    frame_index: int
    frame_count: int
    row_count: int
    snapshot_digest: str
    rows: list[dict[str, Any]]


@attrs.frozen(kw_only=True)
class ScheduleControl(_Published):
    """A partial projection (``schedule.updated``): rows to upsert, keys to delete."""

    rows: list[ScheduleRow]
    deleted: list[str]


def schedule_event(
    project_id: bytes,
    agent_id: bytes,
    worker_id: str | None,
    event: Mapping[str, Any],
) -> ScheduleFrame | ScheduleControl | None:
    """The observation an agent event carries, checked (digest, bounds, rows);
    None for any other event, and for a malformed one (logged)."""
    kind, data = event.get("kind"), event.get("data")
    if kind not in ("schedule.snapshot", "schedule.updated") or not isinstance(data, Mapping):
        return None
    try:
        if kind == "schedule.snapshot":
            return _frame(project_id, agent_id, worker_id, event, data)
        return _control(project_id, agent_id, worker_id, event, data)
    except (KeyError, TypeError, ValueError) as exc:
        log.warning(
            "a %s event %s was not applied: %s",
            kind,
            loggable(event.get("id")),
            loggable(str(exc), 300),
        )
        return None


def _frame(
    project_id: bytes,
    agent_id: bytes,
    worker_id: str | None,
    event: Mapping[str, Any],
    data: Mapping[str, Any],
) -> ScheduleFrame:
    body = data["external_snapshot_frame"]
    if not isinstance(body, dict):
        raise TypeError("external_snapshot_frame is not an object")
    if data.get("frame_digest") != digest(body):
        raise ValueError("frame_digest does not match the frame")
    published = _published(project_id, agent_id, worker_id, event, body)
    frame_kind = _text(body, "frame_kind")
    index, count = _count(body, "frame_index"), _count(body, "frame_count")
    row_count = _count(body, "row_count")
    rows = body["schedules"]
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise TypeError("schedules is not a list of objects")
    if frame_kind == "rows":
        if not (0 <= index < count and rows):
            raise ValueError("a rows frame out of bounds or empty")
    elif frame_kind != "terminal" or index != count or rows:
        raise ValueError("a malformed terminal frame")
    for row in rows:
        schedule_row(row, published.owner)  # every row must be readable
    snapshot = _text(body, "snapshot_id", MAX_ID)
    checksum = _text(body, "snapshot_digest")
    if len(checksum) != 64 or any(c not in "0123456789abcdef" for c in checksum):
        raise ValueError("snapshot_digest is not a sha256 hex digest")
    return ScheduleFrame(
        **attrs.asdict(published, recurse=False),
        snapshot_id=snapshot,
        frame_kind=frame_kind,
        frame_index=index,
        frame_count=count,
        row_count=row_count,
        snapshot_digest=checksum,
        rows=rows,
    )


def _control(
    project_id: bytes,
    agent_id: bytes,
    worker_id: str | None,
    event: Mapping[str, Any],
    data: Mapping[str, Any],
) -> ScheduleControl:
    body = data["external_projection"]
    if not isinstance(body, dict):
        raise TypeError("external_projection is not an object")
    if data.get("payload_digest") != digest(body):
        raise ValueError("payload_digest does not match the projection")
    if body.get("kind") not in ("control", "created", "updated", "deleted") or body.get("complete"):
        raise ValueError("not a partial projection")
    published = _published(project_id, agent_id, worker_id, event, body)
    rows = body["schedules"]
    deleted = body.get("deleted_source_keys", [])
    if not isinstance(rows, list) or not isinstance(deleted, list):
        raise TypeError("schedules and deleted_source_keys must be lists")
    if not all(isinstance(k, str) and 0 < len(k) <= MAX_KEY for k in deleted):
        raise ValueError("deleted_source_keys holds something other than source keys")
    return ScheduleControl(
        **attrs.asdict(published, recurse=False),
        rows=[schedule_row(row, published.owner) for row in rows],
        deleted=list(deleted),
    )


def _published(
    project_id: bytes,
    agent_id: bytes,
    worker_id: str | None,
    event: Mapping[str, Any],
    body: Mapping[str, Any],
) -> _Published:
    if body.get("protocol_version") != PROTOCOL_VERSION:
        raise ValueError(f"protocol_version {body.get('protocol_version')!r}")
    owner = _text(body, "owner", MAX_ID)
    if event.get("engine") != owner:
        raise ValueError("the event's engine is not the projection's owner")
    epoch, sequence = _count(body, "epoch_number"), _count(body, "sequence")
    if epoch < 1 or sequence < 1:
        raise ValueError("epoch_number and sequence start at 1")
    stable = body.get("stable_source")
    if not isinstance(stable, bool):
        raise TypeError("stable_source is not a boolean")
    return _Published(
        project_id=project_id,
        agent_id=agent_id,
        worker_id=worker_id,
        event_id=str(event.get("id")),
        owner=owner,
        stream_id=_text(body, "stream_id", MAX_ID),
        epoch_uuid=_text(body, "epoch_uuid", MAX_ID),
        epoch_number=epoch,
        sequence=sequence,
        source_scope=_text(body, "source_scope", MAX_KEY),
        adapter_instance_id=_text(body, "adapter_instance_id", MAX_KEY),
        stable_source=stable,
    )


def snapshot_digest(frame: ScheduleFrame, rows: list[dict[str, Any]]) -> str:
    """The digest of the snapshot whose frames are ``frame`` (any of them, for
    its identity) and ``rows`` (all of them): the adapters' projection body."""
    body = {
        "protocol_version": PROTOCOL_VERSION,
        "stream_id": frame.stream_id,
        "epoch_uuid": frame.epoch_uuid,
        "epoch_number": frame.epoch_number,
        "sequence": frame.sequence,
        "kind": "snapshot",
        "owner": frame.owner,
        "source_scope": frame.source_scope,
        "adapter_instance_id": frame.adapter_instance_id,
        "complete": True,
        "stable_source": frame.stable_source,
        "operation_id": None,
        "schedules": sorted(rows, key=lambda row: str(row.get("source_key"))),
        "deleted_source_keys": [],
    }
    return digest(body)


def schedule_row(raw: Any, owner: str) -> ScheduleRow:
    """A protocol row, typed; ValueError or TypeError if it is not one of ``owner``'s."""
    if not isinstance(raw, dict):
        raise TypeError("a schedule row is not an object")
    if raw.get("scheduler") != owner:
        raise ValueError("a schedule row of another scheduler")
    args, kwargs = raw.get("args", []), raw.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise TypeError("args must be a list and kwargs an object")
    enabled, runs = raw.get("is_enabled"), raw.get("total_runs", 0)
    if not isinstance(enabled, bool):
        raise TypeError("is_enabled is not a boolean")
    if not isinstance(runs, int) or isinstance(runs, bool) or runs < 0:
        raise ValueError("total_runs is not a count")
    return ScheduleRow(
        source_key=_text(raw, "source_key", MAX_KEY),
        engine=_text(raw, "engine", MAX_ID),
        scheduler=owner,
        name=_text(raw, "name"),
        task_name=_text(raw, "task_name"),
        kind=_text(raw, "kind", allow_empty=True),
        expression=_text(raw, "expression", allow_empty=True),
        timezone=_text(raw, "timezone", allow_empty=True),
        queue=_optional_text(raw, "queue"),
        priority=_text(raw, "priority", allow_empty=True),
        args=args,
        kwargs=kwargs,
        is_enabled=enabled,
        last_run_at=_time(raw.get("last_run_at")),
        next_run_at=_time(raw.get("next_run_at")),
        total_runs=runs,
        external_id=_optional_text(raw, "external_id"),
        catch_up=_text(raw, "catch_up", allow_empty=True),
        source=_text(raw, "source", allow_empty=True),
        source_hash=_optional_text(raw, "source_hash"),
    )


def projection(row: Any) -> dict[str, Any]:
    """A stored schedule (anything with the row's fields) as the adapters
    normalise it: what ``schedule.external.mutate`` expects to find."""
    out: dict[str, Any] = {}
    for name in ROW_FIELDS:
        value = getattr(row, name)
        if name in _TIMES and value is not None:
            value = datetime.fromtimestamp(value, UTC).isoformat(timespec="microseconds")
        out[name] = value
    return out


def _text(
    body: Mapping[str, Any], name: str, limit: int | None = None, *, allow_empty: bool = False
) -> str:
    value = body[name]
    if not isinstance(value, str) or (not value and not allow_empty):
        raise ValueError(f"{name} is not a non-empty string")
    if limit is not None and len(value) > limit:
        raise ValueError(f"{name} is longer than {limit} characters")
    return value


def _optional_text(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} is not a string")
    return value


def _count(body: Mapping[str, Any], name: str) -> int:
    value = body[name]
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**62:
        raise ValueError(f"{name} is not a count")
    return value


def _time(value: Any) -> float | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError("a time is not ISO-8601 text")
    when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = when.timestamp()
    if not math.isfinite(seconds):
        raise ValueError("a time out of range")
    return seconds
