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
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import NamedTuple

import orjson

from .buffer import ClaimedRow

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


def key_prefix(buffer_id: uuid.UUID) -> int:
    return buffer_id.int >> 64


def _kind(record: object, row_id: int) -> str:
    kind = record.get("t") if isinstance(record, dict) else None
    if not isinstance(kind, str):
        # Ingest validates this; a row that fails here was damaged or planted.
        raise ValueError(f"buffer row {row_id}: a record has no string 't' field")
    return kind


def event_rows(buffer_id: uuid.UUID, rows: Iterable[ClaimedRow]) -> Iterator[EventRow]:
    """Expand claimed payloads into event rows (CPU work: run it off the loop).

    The hot loop of the drain: it builds no UUID objects, and checks a
    record's kind with exact type tests first.
    """
    prefix = key_prefix(buffer_id) << 64
    loads, dumps = orjson.loads, orjson.dumps
    for row in rows:
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
