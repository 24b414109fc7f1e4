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

__all__ = [
    "MAX_RECORDS_PER_PAYLOAD",
    "EventRow",
    "copy_rows",
    "event_rows",
    "idempotency_key",
]

MAX_RECORDS_PER_PAYLOAD = 1 << 24
_ROW_LIMIT = 1 << 40


class EventRow(NamedTuple):
    """One row of the ``events`` table, in column order."""

    received_at: datetime
    idempotency_key: uuid.UUID
    source: str
    kind: str
    buffer_id: uuid.UUID
    body: bytes  # serialised JSON object


def idempotency_key(buffer_prefix: int, row_id: int, index: int) -> uuid.UUID:
    """The key of record ``index`` of buffer row ``row_id``.

    ``buffer_prefix`` is the top 64 bits of the buffer id (see `key_prefix`).
    """
    if not 0 <= row_id < _ROW_LIMIT or not 0 <= index < MAX_RECORDS_PER_PAYLOAD:
        raise ValueError(f"row {row_id} / record {index} is out of the key's range")
    return uuid.UUID(int=(buffer_prefix << 64) | (row_id << 24) | index)


def key_prefix(buffer_id: uuid.UUID) -> int:
    return buffer_id.int >> 64


def _kind(record: object, row_id: int) -> str:
    kind = record.get("t") if isinstance(record, dict) else None
    if not isinstance(kind, str):
        # Ingest validates this; a row that fails here was damaged or planted.
        raise ValueError(f"buffer row {row_id}: a record has no string 't' field")
    return kind


def event_rows(buffer_id: uuid.UUID, rows: Iterable[ClaimedRow]) -> Iterator[EventRow]:
    """Expand claimed payloads into event rows (CPU work: run it off the loop)."""
    prefix = key_prefix(buffer_id)
    dumps = orjson.dumps
    for row in rows:
        received_at = datetime.fromtimestamp(row.received_at, UTC)
        base = (prefix << 64) | (row.id << 24)
        if row.id >= _ROW_LIMIT:
            raise ValueError(f"buffer row id {row.id} is out of the key's range")
        for index, record in enumerate(orjson.loads(row.body)):
            yield EventRow(
                received_at,
                uuid.UUID(int=base | index),
                row.source,
                _kind(record, row.id),
                buffer_id,
                dumps(record),
            )


def copy_rows(
    buffer_id: uuid.UUID, rows: Iterable[ClaimedRow]
) -> Iterator[tuple[datetime, bytes, str, str, bytes]]:
    """`event_rows` for the COPY path, lean: no UUID objects, no named tuples.

    Yields ``(received_at, idempotency key as 16 bytes, source, kind, body)``
    with the same values, the same keys and the same checks as `event_rows`.
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
            yield received_at, (base | index).to_bytes(16, "big"), source, kind, dumps(record)
