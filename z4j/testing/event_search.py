"""Events to search: written through the drain's own write, read back outside the store.

`seed_events` writes receipts from two agents of two projects (three
workers) and from TCP ingest, several events to a receipt time so the id
breaks ties, with bodies that are hard to quote (commas, quotes, line
breaks, non-ASCII). `stored_events` reads every event back with plain SQL
(z4j.testing.store.query), so a test checks search and export answers
against rows the code under test did not read.
"""

from __future__ import annotations

import uuid
from typing import Any

import attrs
import orjson

from ..buffer import ClaimedRow
from ..config import Config
from ..store.base import Store
from .store import json_of, query

__all__ = ["StoredEvent", "body_contains", "seed_events", "stored_events"]

# The seed's receipt times, projects and agents (importable from this module).

T0 = 1_800_000_000.0
P1, P2 = uuid.UUID(int=1), uuid.UUID(int=2)
A1, A2 = uuid.UUID(int=11), uuid.UUID(int=12)


@attrs.frozen(kw_only=True)
class StoredEvent:
    """One events row as plain values: uuids as text, the key as lower hex."""

    id: int
    key: str
    received_at: float
    source: str
    kind: str
    project_id: str | None
    agent_id: str | None
    worker_id: str | None
    body: Any


async def seed_events(store: Store, *, receipts: int = 40) -> None:
    """``receipts`` receipts one second apart from `T0`: every fourth a TCP
    record of two events (the first of three), the rest an agent's three events."""
    rows = []
    for i in range(receipts):
        at = T0 + i
        if i % 4 == 0:
            records = [
                {"t": "log", "msg": f'Disk FULL, host "h{i}"\nsecond line', "n": i},
                {"t": "metric", "name": "cpu", "value": i, "tags": {"host": f"h{i}"}},
            ]
            if i == 0:  # a kind a CSV must quote
                records.append({"t": 'odd, "kind"\nline two', "n": i})
            rows.append(
                ClaimedRow(
                    id=i + 1, received_at=at, source="tcp", body=orjson.dumps(records), origin=None
                )
            )
            continue
        agent, project, worker = [(A1, P1, "w-1"), (A2, P2, "w-2"), (A1, P1, "w-3")][i % 4 - 1]
        events = [
            {
                "id": f"e-{i}-{n}",
                "kind": "custom.note" if n else "custom.ping",
                "data": {"text": f"note {i}/{n}: 100% done_ok, a;b", "deep": [{"x": "Żółw"}]},
            }
            for n in range(3)
        ]
        origin = {"project_id": str(project), "agent_id": str(agent), "worker_id": worker}
        rows.append(
            ClaimedRow(
                id=i + 1,
                received_at=at,
                source="agent",
                body=orjson.dumps(events),
                origin=orjson.dumps(origin),
            )
        )
    await store.write_events(uuid.uuid4(), rows)


def stored_events(config: Config) -> list[StoredEvent]:
    """Every event row, newest first (by received_at, then id), read with plain SQL."""
    key = (
        "replace(idempotency_key::text, '-', '')"
        if config.database_url is not None
        else "lower(hex(idempotency_key))"
    )
    rows = query(
        config,
        f"SELECT id, {key}, received_at, source, kind, project_id, agent_id, worker_id, body"
        " FROM events ORDER BY received_at DESC, id DESC",
    )
    return [
        StoredEvent(
            id=int(r[0]),
            key=r[1],
            received_at=float(r[2]),
            source=r[3],
            kind=r[4],
            project_id=None if r[5] is None else str(r[5]),
            agent_id=None if r[6] is None else str(r[6]),
            worker_id=r[7],
            body=json_of(config, r[8]),
        )
        for r in rows
    ]


def body_contains(event: StoredEvent, text: str) -> bool:
    """Whether a string value inside the body contains ``text`` (case folded)."""
    return any(text.lower() in s.lower() for s in _strings(event.body))


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []
