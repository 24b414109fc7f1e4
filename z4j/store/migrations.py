"""The schema, as numbered migrations of our own, for both stores.

Each migration is applied once, in order, inside one transaction with its
row in ``schema_version``. On Postgres the whole run holds an advisory lock,
so replicas starting together apply each migration exactly once; on SQLite
``BEGIN IMMEDIATE`` does the same for processes sharing the file.

Never edit a migration that has shipped: add the next one.
"""

from __future__ import annotations

import attrs

__all__ = ["MIGRATIONS", "MIGRATION_LOCK_KEY", "Migration"]

# pg_advisory_xact_lock key: "z4j-migr" as a big-endian int64.
MIGRATION_LOCK_KEY = int.from_bytes(b"z4j-migr", "big", signed=True)


@attrs.frozen(kw_only=True)
class Migration:
    version: int
    name: str
    postgres: str
    sqlite: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        version=1,
        name="instances and events",
        postgres="""
CREATE TABLE instances (
    id           uuid PRIMARY KEY,
    name         text NOT NULL,
    host         text NOT NULL,
    pid          integer NOT NULL,
    buffer_id    uuid NOT NULL,
    started_at   timestamptz NOT NULL,
    last_seen    timestamptz NOT NULL,
    ingest_rate  double precision NOT NULL DEFAULT 0,
    drain_rate   double precision NOT NULL DEFAULT 0,
    buffer_depth bigint NOT NULL DEFAULT 0,
    stopped_at   timestamptz
);

CREATE TABLE events (
    id              bigserial NOT NULL,
    received_at     timestamptz NOT NULL,
    idempotency_key uuid NOT NULL,
    source          text NOT NULL,
    kind            text NOT NULL,
    buffer_id       uuid,
    project_id      uuid,
    agent_id        uuid,
    worker_id       text,
    body            jsonb NOT NULL,
    CONSTRAINT events_idempotency UNIQUE (idempotency_key, received_at)
) PARTITION BY RANGE (received_at);

CREATE INDEX events_kind_received ON events (kind, received_at);
""",
        sqlite="""
CREATE TABLE instances (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    buffer_id    TEXT NOT NULL,
    started_at   REAL NOT NULL,
    last_seen    REAL NOT NULL,
    ingest_rate  REAL NOT NULL DEFAULT 0,
    drain_rate   REAL NOT NULL DEFAULT 0,
    buffer_depth INTEGER NOT NULL DEFAULT 0,
    stopped_at   REAL
);

CREATE TABLE events (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at     REAL NOT NULL,
    idempotency_key BLOB NOT NULL UNIQUE,
    source          TEXT NOT NULL,
    kind            TEXT NOT NULL,
    buffer_id       TEXT,
    project_id      TEXT,
    agent_id        TEXT,
    worker_id       TEXT,
    body            TEXT NOT NULL
);

CREATE INDEX events_kind_received ON events (kind, received_at);
CREATE INDEX events_received ON events (received_at);
""",
    ),
)
