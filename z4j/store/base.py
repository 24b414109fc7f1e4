"""What the rest of the brain needs from shared persistence.

Two implementations: `PostgresStore` (production, many replicas) and
`SqliteStore` (the embedded default). The brain only talks to this protocol,
so tests and future stores slot in without touching the drain or heartbeat.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Literal, Protocol

import attrs

from ..buffer import ClaimedRow

__all__ = ["InstanceInfo", "Store", "StoreUnavailable"]


class StoreUnavailable(Exception):
    """The store could not be reached or refused the write; retry later."""


class UnstorableRows(Exception):
    """The store rejected the data itself: retrying the same rows cannot help.

    The drain splits the batch to find the rows at fault and sets them
    aside in the buffer's dead-letter table (kept, counted, logged).
    """


@attrs.frozen(kw_only=True)
class InstanceInfo:
    """This process's row in ``instances``."""

    id: uuid.UUID
    name: str
    host: str
    pid: int
    buffer_id: uuid.UUID
    started_at: float
    last_seen: float
    ingest_rate: float = 0.0
    drain_rate: float = 0.0
    buffer_depth: int = 0
    stopped_at: float | None = None


class Store(Protocol):
    @property
    def kind(self) -> Literal["postgres", "sqlite"]: ...

    async def migrate(self) -> list[int]:
        """Apply pending migrations; return the versions applied now."""
        ...

    async def write_events(self, buffer_id: uuid.UUID, rows: Sequence[ClaimedRow]) -> int:
        """Store every record of ``rows`` idempotently; return rows newly stored."""
        ...

    async def check(self) -> None:
        """Raise `StoreUnavailable` unless a trivial query succeeds now."""
        ...

    async def enforce_retention(self, *, now: float, keep_days: int) -> int:
        """Remove events received more than ``keep_days`` days before ``now``.

        Returns what went: partitions dropped (Postgres) or rows deleted
        (SQLite). Postgres also creates the partitions of the next days.
        """
        ...

    async def upsert_instance(self, info: InstanceInfo) -> None: ...

    async def aclose(self) -> None: ...
