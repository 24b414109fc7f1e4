"""The embedded default store: one SQLite file in the data directory.

Same logical schema as Postgres, without partitions. It serves one process
(the registry is forced to ``local`` on SQLite), so one connection behind a
capacity limiter of one is enough, and every call runs on a worker thread.
"""

from __future__ import annotations

import logging
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import orjson
import trio

from ..buffer import ClaimedRow
from ..events import event_rows
from .base import InstanceInfo, StoreUnavailable, UnstorableRows
from .migrations import MIGRATIONS

__all__ = ["SqliteStore"]

log = logging.getLogger("z4j.store.sqlite")
T = TypeVar("T")


class SqliteStore:
    kind: Literal["sqlite"] = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._limiter = trio.CapacityLimiter(1)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        def call() -> T:
            if self._db is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.execute("PRAGMA busy_timeout=5000")
                self._db = db
            return fn(self._db, *args)

        try:
            return await trio.to_thread.run_sync(call, limiter=self._limiter)
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"sqlite store {self.path}: {exc}") from exc

    async def aclose(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(close, limiter=self._limiter)

    async def migrate(self) -> list[int]:
        return await self._run(_migrate)

    async def write_events(self, buffer_id: uuid.UUID, rows: Sequence[ClaimedRow]) -> int:
        try:
            return await self._run(_write_events, buffer_id, rows)
        except (
            sqlite3.DataError,
            sqlite3.IntegrityError,
            ValueError,
            orjson.JSONEncodeError,
        ) as exc:
            raise UnstorableRows(str(exc).strip()) from exc

    async def check(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone())

    async def upsert_instance(self, info: InstanceInfo) -> None:
        await self._run(_upsert_instance, info)

    async def enforce_retention(self, *, now: float, keep_days: int) -> int:
        cutoff = now - keep_days * 86400
        deleted = 0
        while True:  # in chunks, so other writers get the lock in between
            n = await self._run(_delete_older_than, cutoff, 10_000)
            deleted += n
            if n < 10_000:
                return deleted


def _transaction(db: sqlite3.Connection, fn: Callable[[], T]) -> T:
    db.execute("BEGIN IMMEDIATE")
    try:
        result = fn()
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return result


def _migrate(db: sqlite3.Connection) -> list[int]:
    def run() -> list[int]:
        db.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY,"
            " name TEXT NOT NULL, applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
        )
        done = {v for (v,) in db.execute("SELECT version FROM schema_version")}
        applied = []
        for migration in MIGRATIONS:
            if migration.version in done:
                continue
            log.info("applying migration %d: %s", migration.version, migration.name)
            for statement in migration.sqlite.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(
                "INSERT INTO schema_version (version, name) VALUES (?, ?)",
                (migration.version, migration.name),
            )
            applied.append(migration.version)
        return applied

    return _transaction(db, run)


def _write_events(db: sqlite3.Connection, buffer_id: uuid.UUID, rows: Sequence[ClaimedRow]) -> int:
    buffer_text = str(buffer_id)
    params = [
        (
            e.received_at.timestamp(),
            e.idempotency_key,
            e.source,
            e.kind,
            buffer_text,
            e.body.decode(),
        )
        for e in event_rows(buffer_id, rows)
    ]

    def run() -> int:
        before = db.total_changes
        db.executemany(
            "INSERT OR IGNORE INTO events (received_at, idempotency_key, source, kind,"
            " buffer_id, body) VALUES (?, ?, ?, ?, ?, ?)",
            params,
        )
        return db.total_changes - before

    return _transaction(db, run)


def _delete_older_than(db: sqlite3.Connection, cutoff: float, limit: int) -> int:
    def run() -> int:
        cur = db.execute(
            "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE received_at < ? LIMIT ?)",
            (cutoff, limit),
        )
        return cur.rowcount

    return _transaction(db, run)


def _upsert_instance(db: sqlite3.Connection, info: InstanceInfo) -> None:
    db.execute(
        "INSERT INTO instances (id, name, host, pid, buffer_id, started_at, last_seen,"
        " ingest_rate, drain_rate, buffer_depth, stopped_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen,"
        " ingest_rate = excluded.ingest_rate, drain_rate = excluded.drain_rate,"
        " buffer_depth = excluded.buffer_depth, stopped_at = excluded.stopped_at",
        (
            str(info.id),
            info.name,
            info.host,
            info.pid,
            str(info.buffer_id),
            info.started_at,
            info.last_seen,
            info.ingest_rate,
            info.drain_rate,
            info.buffer_depth,
            info.stopped_at,
        ),
    )
