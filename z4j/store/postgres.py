"""The production store: Postgres, written to with binary COPY.

The drain path per batch, all in one transaction on one pooled connection:

1. expand the claimed payloads into event rows (on the worker thread, so
   the Trio loop stays free);
2. binary COPY them into a temporary staging table (``ON COMMIT DELETE
   ROWS``: emptied by the commit, no TRUNCATE);
3. ``INSERT INTO events SELECT … ON CONFLICT DO NOTHING``: a batch drained
   twice (crash between commit and buffer delete) lands once.

``events`` is range-partitioned by day on ``received_at``; a batch that
touches a day with no partition yet creates it first, under an advisory lock
so that replicas do not race.
"""

from __future__ import annotations

import logging
import uuid
import weakref
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

import orjson
import psycopg
from psycopg import postgres
from psycopg.adapt import Dumper
from psycopg.pq import Format

from ..buffer import ClaimedRow
from ..events import event_rows
from .base import InstanceInfo, StoreUnavailable, UnstorableRows
from .migrations import MIGRATION_LOCK_KEY, MIGRATIONS
from .pg import PgPool

__all__ = ["PostgresStore", "partition_name"]

log = logging.getLogger("z4j.store.postgres")

PARTITIONS_AHEAD = 3  # today and the next two days always exist
PARTITION_LOCK_KEY = int.from_bytes(b"z4j-part", "big", signed=True)
_STAGING = "z4j_events_staging"
_COLUMNS = "received_at, idempotency_key, source, kind, buffer_id, body"


class JsonText(bytes):
    """Bytes that already hold serialised JSON, to be stored as jsonb as-is."""


class _JsonTextBinaryDumper(Dumper):
    """jsonb binary format is a version byte then the JSON text.

    psycopg's own jsonb dumper would serialise ``bytes``/``str`` again and
    store a JSON *string*; this one passes pre-serialised JSON through.
    """

    format = Format.BINARY
    oid = postgres.types["jsonb"].oid

    def dump(self, obj: Any) -> bytes:
        return b"\x01" + bytes(obj)


class _UuidBinaryDumper(Dumper):
    """uuid in binary: 16 bytes as they are, or a `uuid.UUID`.

    Registered by oid only, so it serves the COPY of `_copy_events` (which
    passes idempotency keys as bytes, saving a UUID object per event) and
    leaves how query parameters are dumped alone.
    """

    format = Format.BINARY
    oid = postgres.types["uuid"].oid

    def dump(self, obj: Any) -> bytes:
        return obj if type(obj) is bytes else obj.bytes


def _configure(conn: psycopg.Connection[Any]) -> None:
    conn.adapters.register_dumper(JsonText, _JsonTextBinaryDumper)
    conn.adapters.register_dumper(None, _UuidBinaryDumper)


def partition_name(day: date) -> str:
    return f"events_p{day:%Y%m%d}"


class PostgresStore:
    kind: Literal["postgres"] = "postgres"

    def __init__(self, pool: PgPool) -> None:
        self.pool = pool
        self._partitions: set[date] = set()
        self._staged: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()

    @classmethod
    def from_url(
        cls, url: str, *, pool_size: int, statement_timeout_ms: int, application_name: str = "z4j"
    ) -> PostgresStore:
        pool = PgPool(
            url,
            size=pool_size,
            statement_timeout_ms=statement_timeout_ms,
            application_name=application_name,
            configure=_configure,
        )
        return cls(pool)

    async def aclose(self) -> None:
        await self.pool.aclose()

    async def _run(self, fn: Any, *args: Any, autocommit: bool = False) -> Any:
        try:
            return await self.pool.run(fn, *args, autocommit=autocommit)
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"postgres: {exc}".strip()) from exc

    # -- schema ------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        applied: list[int] = await self._run(_migrate)
        self._partitions = await self._run(_existing_partitions)
        today = datetime.now(UTC).date()
        await self.ensure_partitions({today + timedelta(days=n) for n in range(PARTITIONS_AHEAD)})
        return applied

    async def ensure_partitions(self, days: set[date]) -> None:
        missing = days - self._partitions
        if missing:
            await self._run(_create_partitions, sorted(missing))
            self._partitions |= missing

    # -- events --------------------------------------------------------------------

    async def write_events(self, buffer_id: uuid.UUID, rows: Sequence[ClaimedRow]) -> int:
        days = {datetime.fromtimestamp(r.received_at, UTC).date() for r in rows}
        await self.ensure_partitions(days)
        try:
            try:
                inserted: int = await self._run(self._copy_events, buffer_id, rows)
            except psycopg.errors.CheckViolation:
                # "no partition found for row": another replica's retention run
                # dropped a partition our cache still lists. Re-read and retry.
                self._partitions = await self._run(_existing_partitions)
                await self.ensure_partitions(days)
                inserted = await self._run(self._copy_events, buffer_id, rows)
        except (
            psycopg.DataError,
            psycopg.IntegrityError,
            ValueError,
            orjson.JSONEncodeError,
        ) as exc:
            raise UnstorableRows(str(exc).strip()) from exc
        return inserted

    def _copy_events(
        self, conn: psycopg.Connection[Any], buffer_id: uuid.UUID, rows: Sequence[ClaimedRow]
    ) -> int:
        try:
            return self._copy_events_once(conn, buffer_id, rows)
        except BaseException:
            # The transaction rolls back, and a staging table created in it
            # goes with it: create it again next time.
            self._staged.discard(conn)
            raise

    def _copy_events_once(
        self, conn: psycopg.Connection[Any], buffer_id: uuid.UUID, rows: Sequence[ClaimedRow]
    ) -> int:
        cur = conn.cursor()
        if conn not in self._staged:
            cur.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {_STAGING} ("
                " received_at timestamptz, idempotency_key uuid, source text,"
                " kind text, buffer_id uuid, body jsonb"
                ") ON COMMIT DELETE ROWS"
            )
            self._staged.add(conn)
        with cur.copy(f"COPY {_STAGING} ({_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
            # Dumped by oid: jsonb by _JsonTextBinaryDumper (the body is
            # serialised JSON already), uuid by _UuidBinaryDumper (bytes).
            copy.set_types(["timestamptz", "uuid", "text", "text", "uuid", "jsonb"])
            write_row = copy.write_row
            buffer_key = buffer_id.bytes
            for received_at, key, source, kind, body in event_rows(buffer_id, rows):
                write_row((received_at, key, source, kind, buffer_key, body))
        cur.execute(
            f"INSERT INTO events ({_COLUMNS}) SELECT {_COLUMNS} FROM {_STAGING} "
            "ON CONFLICT DO NOTHING"
        )
        return cur.rowcount

    # -- instances and health --------------------------------------------------------

    async def check(self) -> None:
        await self._run(lambda conn: conn.execute("SELECT 1").fetchone(), autocommit=True)

    async def upsert_instance(self, info: InstanceInfo) -> None:
        await self._run(_upsert_instance, info)

    async def enforce_retention(self, *, now: float, keep_days: int) -> int:
        today = datetime.fromtimestamp(now, UTC).date()
        await self.ensure_partitions({today + timedelta(days=n) for n in range(PARTITIONS_AHEAD)})
        # A partition for day D holds [D, D+1); it goes once D+1 is past the cutoff.
        cutoff = datetime.fromtimestamp(now, UTC) - timedelta(days=keep_days)
        dropped: list[date] = await self._run(_drop_partitions_before, cutoff)
        self._partitions -= set(dropped)
        for day in dropped:
            log.info("retention: dropped %s", partition_name(day))
        return len(dropped)


def _migrate(conn: psycopg.Connection[Any]) -> list[int]:
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " version integer PRIMARY KEY, name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    done = {v for (v,) in conn.execute("SELECT version FROM schema_version")}
    applied = []
    for migration in MIGRATIONS:
        if migration.version in done:
            continue
        log.info("applying migration %d: %s", migration.version, migration.name)
        conn.execute(migration.postgres)
        conn.execute(
            "INSERT INTO schema_version (version, name) VALUES (%s, %s)",
            (migration.version, migration.name),
        )
        applied.append(migration.version)
    return applied


def _existing_partitions(conn: psycopg.Connection[Any]) -> set[date]:
    names = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'events'::regclass"
    ).fetchall()
    days = set()
    for (name,) in names:
        if name.startswith("events_p") and len(name) == 16:
            days.add(datetime.strptime(name[8:], "%Y%m%d").date())
    return days


def _create_partitions(conn: psycopg.Connection[Any], days: list[date]) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK_KEY,))
    for day in days:
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {partition_name(day)} PARTITION OF events "
            f"FOR VALUES FROM ('{start.isoformat()}') TO ('{(start + timedelta(days=1)).isoformat()}')"
        )


def _drop_partitions_before(conn: psycopg.Connection[Any], cutoff: datetime) -> list[date]:
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK_KEY,))
    dropped = []
    for day in sorted(_existing_partitions(conn)):
        end = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1)
        if end <= cutoff:
            conn.execute(f"DROP TABLE IF EXISTS {partition_name(day)}")
            dropped.append(day)
    return dropped


def _upsert_instance(conn: psycopg.Connection[Any], info: InstanceInfo) -> None:
    def ts(value: float | None) -> datetime | None:
        return None if value is None else datetime.fromtimestamp(value, UTC)

    conn.execute(
        "INSERT INTO instances (id, name, host, pid, buffer_id, started_at, last_seen,"
        " ingest_rate, drain_rate, buffer_depth, stopped_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (id) DO UPDATE SET last_seen = EXCLUDED.last_seen,"
        " ingest_rate = EXCLUDED.ingest_rate, drain_rate = EXCLUDED.drain_rate,"
        " buffer_depth = EXCLUDED.buffer_depth, stopped_at = EXCLUDED.stopped_at",
        (
            info.id,
            info.name,
            info.host,
            info.pid,
            info.buffer_id,
            ts(info.started_at),
            ts(info.last_seen),
            info.ingest_rate,
            info.drain_rate,
            info.buffer_depth,
            ts(info.stopped_at),
        ),
    )
