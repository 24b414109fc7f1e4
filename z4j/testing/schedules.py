"""Schedule observations as a z4j-bare 1.13 agent publishes them, for tests.

Written from the external-schedule protocol itself (z4j_core's
``schedule_external``), not from the brain's reading of it, so that a test
built on these catches the brain misreading the wire: `snapshot_events`
cuts a snapshot into its row frames and terminal frame with their digests;
`control_event` is the ``schedule.updated`` a ``schedule.external.control``
publishes; `schedule_row` is one normalised row. For a `RawAgent` playing
the adapter: `answer_activation` waits for the brain's grant and answers
it, `publish_events` sends events as one batch.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from ..protocol.agent import frames as f
from .agents import RawAgent

__all__ = [
    "answer_activation",
    "control_event",
    "publish_events",
    "schedule_row",
    "snapshot_events",
]

OCCURRED_AT = "2027-01-15T08:00:00+00:00"


def _canonical(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _sha(value: Any) -> str:
    return hashlib.sha256(_canonical(value)).hexdigest()


def schedule_row(scheduler: str, source_key: str, **fields: Any) -> dict[str, Any]:
    """A normalised row (every protocol field), as ``normalize_external_schedule``
    makes it; ``fields`` override the defaults (a five-minute cron, enabled)."""
    row: dict[str, Any] = {
        "source_key": source_key,
        "engine": scheduler.split("-", 1)[0],
        "scheduler": scheduler,
        "name": source_key.rsplit(".", 1)[-1],
        "task_name": source_key,
        "kind": "cron",
        "expression": "*/5 * * * *",
        "timezone": "UTC",
        "queue": None,
        "priority": "normal",
        "args": [],
        "kwargs": {},
        "is_enabled": True,
        "last_run_at": None,
        "next_run_at": None,
        "total_runs": 0,
        "external_id": source_key,
        "catch_up": "skip",
        "source": f"{scheduler}:code",
        "source_hash": None,
    }
    row.update(fields)
    return row


def _event(kind: str, scheduler: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "kind": kind,
        "engine": scheduler,
        "task_id": "",
        "occurred_at": OCCURRED_AT,
        "data": data,
    }


def snapshot_events(
    activation: Mapping[str, Any],
    sequence: int,
    rows: Sequence[Mapping[str, Any]],
    *,
    rows_per_frame: int = 1,
    snapshot_id: str | None = None,
    reason: str = "command",
) -> list[dict[str, Any]]:
    """One snapshot under ``activation`` (the parameters of the
    ``schedule.external.activate`` that granted it): its row frames, then
    the terminal frame, each a ``schedule.snapshot`` agent event."""
    owner = str(activation["owner"])
    ordered = sorted((dict(r) for r in rows), key=lambda r: r["source_key"])
    identity = {
        "stream_id": activation["stream_id"],
        "epoch_uuid": activation["epoch_uuid"],
        "epoch_number": activation["epoch_number"],
        "sequence": sequence,
        "owner": owner,
        "source_scope": activation["source_scope"],
        "adapter_instance_id": activation["adapter_instance_id"],
    }
    whole = {
        "protocol_version": 1,
        **identity,
        "kind": "snapshot",
        "complete": True,
        "stable_source": True,
        "operation_id": None,
        "schedules": ordered,
        "deleted_source_keys": [],
    }
    chunks = [ordered[i : i + rows_per_frame] for i in range(0, len(ordered), rows_per_frame)]
    snapshot = snapshot_id or str(uuid.uuid4())
    events = []
    for index, chunk in enumerate([*chunks, []]):
        frame = {
            "protocol_version": 1,
            **identity,
            "snapshot_id": snapshot,
            "frame_kind": "rows" if chunk else "terminal",
            "frame_index": index,
            "frame_count": len(chunks),
            "row_count": len(ordered),
            "snapshot_digest": _sha(whole),
            "stable_source": True,
            "schedules": chunk,
        }
        data = {"external_snapshot_frame": frame, "frame_digest": _sha(frame), "reason": reason}
        events.append(_event("schedule.snapshot", owner, data))
    return events


def control_event(
    activation: Mapping[str, Any],
    sequence: int,
    rows: Sequence[Mapping[str, Any]],
    *,
    deleted: Sequence[str] = (),
) -> dict[str, Any]:
    """The ``schedule.updated`` event of one control operation under ``activation``."""
    owner = str(activation["owner"])
    body = {
        "protocol_version": 1,
        "stream_id": activation["stream_id"],
        "epoch_uuid": activation["epoch_uuid"],
        "epoch_number": activation["epoch_number"],
        "sequence": sequence,
        "kind": "control",
        "owner": owner,
        "source_scope": activation["source_scope"],
        "adapter_instance_id": activation["adapter_instance_id"],
        "complete": False,
        "stable_source": True,
        "operation_id": str(uuid.uuid4()),
        "schedules": sorted((dict(r) for r in rows), key=lambda r: r["source_key"]),
        "deleted_source_keys": sorted(set(deleted)),
    }
    data = {"external_projection": body, "payload_digest": _sha(body), "reason": "external-control"}
    return _event("schedule.updated", owner, data)


async def answer_activation(agent: RawAgent) -> dict[str, Any]:
    """Read frames until the brain's ``schedule.external.activate`` arrives;
    answer it as z4j-bare does (an ack, then success); its parameters."""
    while True:
        frame = await agent.receive()
        command = frame.payload
        if isinstance(command, f.Command) and command.action == "schedule.external.activate":
            token = command.delivery_claim_token
            await agent.send(f.CommandAck(delivery_claim_token=token), frame_id=frame.id)
            result = {"scheduler": command.target.get("scheduler"), "sequence": 1}
            await agent.send(
                f.CommandResult(status="success", result=result, delivery_claim_token=token),
                frame_id=frame.id,
            )
            return dict(command.parameters)


async def publish_events(agent: RawAgent, events: Sequence[Mapping[str, Any]]) -> None:
    """``events`` as one event batch of the agent."""
    batch = tuple(f.AgentEvent(id=e["id"], kind=e["kind"], raw=dict(e)) for e in events)
    await agent.send(f.EventBatch(events=batch), frame_id=f"b-{uuid.uuid4().hex[:16]}")
