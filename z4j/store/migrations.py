"""The schema, as numbered migrations of our own, for both stores.

Each migration is applied once, in order, inside one transaction with its
row in ``schema_version``. On Postgres the whole run holds an advisory lock,
so replicas starting together apply each migration exactly once; on SQLite
``BEGIN IMMEDIATE`` does the same for processes sharing the file.

Never edit a migration that has shipped: add the next one.

One concern justifies the length (past 700 lines): the schema's history,
which only grows; each migration is a short block of SQL for each store.
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
    Migration(
        version=2,
        name="projects, agents, workers, commands, audit",
        postgres="""
CREATE TABLE projects (
    id         uuid PRIMARY KEY,
    name       text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE agents (
    id         uuid PRIMARY KEY,
    project_id uuid NOT NULL REFERENCES projects (id),
    name       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz,
    UNIQUE (project_id, name)
);

CREATE TABLE agent_tokens (
    token_hash bytea PRIMARY KEY,
    agent_id   uuid NOT NULL REFERENCES agents (id),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE workers (
    agent_id        uuid NOT NULL REFERENCES agents (id),
    worker_id       text NOT NULL,
    role            text,
    hello           jsonb NOT NULL,
    instance_id     uuid,
    connected_at    timestamptz NOT NULL,
    last_seen       timestamptz NOT NULL,
    disconnected_at timestamptz,
    status          jsonb,
    registry        jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (agent_id, worker_id)
);

CREATE TABLE commands (
    id                   uuid PRIMARY KEY,
    project_id           uuid NOT NULL REFERENCES projects (id),
    agent_id             uuid NOT NULL REFERENCES agents (id),
    action               text NOT NULL,
    target               jsonb NOT NULL DEFAULT '{}',
    parameters           jsonb NOT NULL DEFAULT '{}',
    timeout_seconds      integer NOT NULL,
    issued_by            text,
    state                text NOT NULL,
    worker_id            text,
    delivery_claim_token text,
    created_at           timestamptz NOT NULL,
    dispatched_at        timestamptz,
    finished_at          timestamptz,
    result               jsonb,
    error                text
);
CREATE INDEX commands_open ON commands (agent_id, created_at) WHERE state IN ('pending', 'dispatched');

CREATE TABLE audit_events (
    id         bigserial PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    actor      text,
    action     text NOT NULL,
    subject    text NOT NULL,
    details    jsonb NOT NULL DEFAULT '{}'
);
""",
        sqlite="""
CREATE TABLE projects (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);

CREATE TABLE agents (
    id         TEXT PRIMARY KEY,
    project_id TEXT NOT NULL REFERENCES projects (id),
    name       TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL,
    UNIQUE (project_id, name)
);

CREATE TABLE agent_tokens (
    token_hash BLOB PRIMARY KEY,
    agent_id   TEXT NOT NULL REFERENCES agents (id),
    created_at REAL NOT NULL
);

CREATE TABLE workers (
    agent_id        TEXT NOT NULL REFERENCES agents (id),
    worker_id       TEXT NOT NULL,
    role            TEXT,
    hello           TEXT NOT NULL,
    instance_id     TEXT,
    connected_at    REAL NOT NULL,
    last_seen       REAL NOT NULL,
    disconnected_at REAL,
    status          TEXT,
    registry        TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (agent_id, worker_id)
);

CREATE TABLE commands (
    id                   TEXT PRIMARY KEY,
    project_id           TEXT NOT NULL REFERENCES projects (id),
    agent_id             TEXT NOT NULL REFERENCES agents (id),
    action               TEXT NOT NULL,
    target               TEXT NOT NULL DEFAULT '{}',
    parameters           TEXT NOT NULL DEFAULT '{}',
    timeout_seconds      INTEGER NOT NULL,
    issued_by            TEXT,
    state                TEXT NOT NULL,
    worker_id            TEXT,
    delivery_claim_token TEXT,
    created_at           REAL NOT NULL,
    dispatched_at        REAL,
    finished_at          REAL,
    result               TEXT,
    error                TEXT
);
CREATE INDEX commands_open ON commands (agent_id, created_at) WHERE state IN ('pending', 'dispatched');

CREATE TABLE audit_events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      REAL NOT NULL,
    actor   TEXT,
    action  TEXT NOT NULL,
    subject TEXT NOT NULL,
    details TEXT NOT NULL DEFAULT '{}'
);
""",
    ),
    Migration(
        version=3,
        name="agent event keys",
        # On Postgres the events key is unique only per filing time (the
        # partition key must be in every unique constraint). An agent event
        # re-sent after a reconnect can be filed at another time, so agent
        # event keys also go in a table of their own, unique on the key.
        postgres="""
CREATE TABLE agent_event_keys (
    idempotency_key uuid PRIMARY KEY,
    received_at     timestamptz NOT NULL
);
CREATE INDEX agent_event_keys_received ON agent_event_keys (received_at);
""",
        # SQLite's events.idempotency_key is unique on its own already.
        sqlite="SELECT 1",
    ),
    Migration(
        version=4,
        name="api credentials, event listing",
        postgres="""
CREATE TABLE api_tokens (
    token_hash bytea PRIMARY KEY,
    name       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE api_sessions (
    session_hash bytea PRIMARY KEY,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);
CREATE INDEX events_received_id ON events (received_at, id);
""",
        sqlite="""
CREATE TABLE api_tokens (
    token_hash BLOB PRIMARY KEY,
    name       TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE api_sessions (
    session_hash BLOB PRIMARY KEY,
    created_at   REAL NOT NULL,
    expires_at   REAL NOT NULL
);
""",
        # (SQLite's index on received_at already orders by (received_at, rowid).)
    ),
    Migration(
        version=5,
        name="replica registry: session ownership, leader lease",
        postgres="""
CREATE SEQUENCE z4j_fencing_tokens;
CREATE TABLE agent_sessions (
    agent_id      uuid NOT NULL,
    worker_id     text NOT NULL,
    instance_id   uuid NOT NULL,
    fencing_token bigint NOT NULL,
    acquired_at   timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    PRIMARY KEY (agent_id, worker_id)
);
CREATE INDEX agent_sessions_instance ON agent_sessions (instance_id);
CREATE TABLE leader_lease (
    name          text PRIMARY KEY,
    holder        uuid NOT NULL,
    fencing_token bigint NOT NULL,
    expires_at    timestamptz NOT NULL
);
""",
        # One process on SQLite: the local registry needs no tables.
        sqlite="SELECT 1",
    ),
    Migration(
        version=6,
        name="api sessions name their token; tokens record their last use",
        # A session must end with the token that opened it (revocation), so
        # it carries the token's hash. Older sessions cannot say which token
        # opened them: they end here (their users sign in again).
        postgres="""
DELETE FROM api_sessions;
ALTER TABLE api_sessions ADD COLUMN token_hash bytea NOT NULL;
CREATE INDEX api_sessions_token ON api_sessions (token_hash);
ALTER TABLE api_tokens ADD COLUMN last_used_at timestamptz;
""",
        sqlite="""
DELETE FROM api_sessions;
ALTER TABLE api_sessions ADD COLUMN token_hash BLOB NOT NULL DEFAULT x'';
CREATE INDEX api_sessions_token ON api_sessions (token_hash);
ALTER TABLE api_tokens ADD COLUMN last_used_at REAL;
""",
    ),
    Migration(
        version=7,
        name="the task projection",
        # One row per (project, engine, task id), written by the drain in
        # the transaction of the events it is derived from (z4j.tasks,
        # store/tasks.py). `doc` is the projection's own state (its
        # observations and chosen values); the other columns are derived
        # from it, for the API's filters. Every list is newest first by
        # last_event_at, paged by (last_event_at, engine, task_id).
        # workers.health keeps each worker's latest heartbeat adapter_health
        # (broker connected, broker type, queue depths).
        postgres="""
CREATE TABLE tasks (
    project_id    uuid NOT NULL,
    engine        text NOT NULL,
    task_id       text NOT NULL,
    name          text,
    queue         text,
    state         text NOT NULL,
    attempts      integer NOT NULL,
    agent_id      uuid,
    worker        text,
    args          jsonb,
    kwargs        jsonb,
    result        jsonb,
    exception     text,
    message       text,
    traceback     text,
    runtime_ms    double precision,
    parent_id     text,
    root_id       text,
    tags          jsonb,
    priority      jsonb,
    first_seen    timestamptz NOT NULL,
    received_at   timestamptz,
    started_at    timestamptz,
    finished_at   timestamptz,
    last_event_at timestamptz NOT NULL,
    timeline      jsonb NOT NULL DEFAULT '[]',
    doc           jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (project_id, engine, task_id)
);
CREATE INDEX tasks_recent ON tasks (last_event_at DESC, engine DESC, task_id DESC);
CREATE INDEX tasks_by_state ON tasks (state, last_event_at DESC, engine DESC, task_id DESC);
CREATE INDEX tasks_by_name ON tasks (name, last_event_at DESC, engine DESC, task_id DESC);
CREATE INDEX tasks_by_queue ON tasks (queue, last_event_at DESC, engine DESC, task_id DESC);
CREATE INDEX tasks_by_agent ON tasks (agent_id, last_event_at DESC, engine DESC, task_id DESC);
CREATE INDEX tasks_by_task_id ON tasks (task_id);
ALTER TABLE workers ADD COLUMN health jsonb;
""",
        sqlite="""
CREATE TABLE tasks (
    project_id    TEXT NOT NULL,
    engine        TEXT NOT NULL,
    task_id       TEXT NOT NULL,
    name          TEXT,
    queue         TEXT,
    state         TEXT NOT NULL,
    attempts      INTEGER NOT NULL,
    agent_id      TEXT,
    worker        TEXT,
    args          TEXT,
    kwargs        TEXT,
    result        TEXT,
    exception     TEXT,
    message       TEXT,
    traceback     TEXT,
    runtime_ms    REAL,
    parent_id     TEXT,
    root_id       TEXT,
    tags          TEXT,
    priority      TEXT,
    first_seen    REAL NOT NULL,
    received_at   REAL,
    started_at    REAL,
    finished_at   REAL,
    last_event_at REAL NOT NULL,
    timeline      TEXT NOT NULL DEFAULT '[]',
    doc           TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (project_id, engine, task_id)
);
CREATE INDEX tasks_recent ON tasks (last_event_at DESC, engine DESC, task_id DESC);
CREATE INDEX tasks_by_state ON tasks (state, last_event_at DESC, engine DESC, task_id DESC);
CREATE INDEX tasks_by_name ON tasks (name, last_event_at DESC, engine DESC, task_id DESC);
CREATE INDEX tasks_by_queue ON tasks (queue, last_event_at DESC, engine DESC, task_id DESC);
CREATE INDEX tasks_by_agent ON tasks (agent_id, last_event_at DESC, engine DESC, task_id DESC);
CREATE INDEX tasks_by_task_id ON tasks (task_id);
ALTER TABLE workers ADD COLUMN health TEXT;
""",
    ),
    Migration(
        version=8,
        name="schedules",
        # The schedules scheduler adapters publish (z4j.schedules): one row per
        # (project, scheduler, source key), replaced by each newer snapshot of
        # that scheduler, written by the drain in the events' transaction
        # (store/schedules.py). schedule_streams holds the brain's grant per
        # (project, scheduler) (stream, epoch, the worker holding it, the
        # activation command) and the last observation applied;
        # schedule_frames keeps the frames of snapshots not yet complete.
        postgres="""
CREATE TABLE schedules (
    project_id   uuid NOT NULL,
    scheduler    text NOT NULL,
    source_key   text NOT NULL,
    engine       text NOT NULL,
    name         text NOT NULL,
    task_name    text NOT NULL,
    kind         text NOT NULL,
    expression   text NOT NULL,
    timezone     text NOT NULL,
    queue        text,
    priority     text NOT NULL,
    args         jsonb NOT NULL,
    kwargs       jsonb NOT NULL,
    is_enabled   boolean NOT NULL,
    last_run_at  timestamptz,
    next_run_at  timestamptz,
    total_runs   bigint NOT NULL,
    external_id  text,
    catch_up     text NOT NULL,
    source       text NOT NULL,
    source_hash  text,
    agent_id     uuid NOT NULL,
    worker_id    text,
    stream_id    text NOT NULL,
    epoch_number bigint NOT NULL,
    sequence     bigint NOT NULL,
    snapshot_id  text,
    updated_at   timestamptz NOT NULL,
    PRIMARY KEY (project_id, scheduler, source_key)
);
CREATE INDEX schedules_listed ON schedules (scheduler, source_key, project_id);
CREATE TABLE schedule_streams (
    project_id          uuid NOT NULL,
    scheduler           text NOT NULL,
    stream_id           text NOT NULL,
    epoch_number        bigint NOT NULL,
    epoch_uuid          text NOT NULL,
    adapter_instance_id text NOT NULL,
    agent_id            uuid NOT NULL,
    worker_id           text NOT NULL,
    worker_connected_at timestamptz NOT NULL,
    command_id          uuid,
    granted_at          timestamptz NOT NULL,
    applied_epoch       bigint NOT NULL DEFAULT 0,
    applied_sequence    bigint NOT NULL DEFAULT 0,
    applied_at          timestamptz,
    PRIMARY KEY (project_id, scheduler)
);
CREATE TABLE schedule_frames (
    project_id          uuid NOT NULL,
    stream_id           text NOT NULL,
    epoch_number        bigint NOT NULL,
    sequence            bigint NOT NULL,
    snapshot_id         text NOT NULL,
    frame_index         bigint NOT NULL,
    scheduler           text NOT NULL,
    epoch_uuid          text NOT NULL,
    source_scope        text NOT NULL,
    adapter_instance_id text NOT NULL,
    stable_source       boolean NOT NULL,
    frame_kind          text NOT NULL,
    frame_count         bigint NOT NULL,
    row_count           bigint NOT NULL,
    snapshot_digest     text NOT NULL,
    rows                jsonb NOT NULL,
    agent_id            uuid NOT NULL,
    worker_id           text,
    received_at         timestamptz NOT NULL,
    PRIMARY KEY (project_id, stream_id, epoch_number, sequence, snapshot_id, frame_index)
);
""",
        sqlite="""
CREATE TABLE schedules (
    project_id   TEXT NOT NULL,
    scheduler    TEXT NOT NULL,
    source_key   TEXT NOT NULL,
    engine       TEXT NOT NULL,
    name         TEXT NOT NULL,
    task_name    TEXT NOT NULL,
    kind         TEXT NOT NULL,
    expression   TEXT NOT NULL,
    timezone     TEXT NOT NULL,
    queue        TEXT,
    priority     TEXT NOT NULL,
    args         TEXT NOT NULL,
    kwargs       TEXT NOT NULL,
    is_enabled   INTEGER NOT NULL,
    last_run_at  REAL,
    next_run_at  REAL,
    total_runs   INTEGER NOT NULL,
    external_id  TEXT,
    catch_up     TEXT NOT NULL,
    source       TEXT NOT NULL,
    source_hash  TEXT,
    agent_id     TEXT NOT NULL,
    worker_id    TEXT,
    stream_id    TEXT NOT NULL,
    epoch_number INTEGER NOT NULL,
    sequence     INTEGER NOT NULL,
    snapshot_id  TEXT,
    updated_at   REAL NOT NULL,
    PRIMARY KEY (project_id, scheduler, source_key)
);
CREATE INDEX schedules_listed ON schedules (scheduler, source_key, project_id);
CREATE TABLE schedule_streams (
    project_id          TEXT NOT NULL,
    scheduler           TEXT NOT NULL,
    stream_id           TEXT NOT NULL,
    epoch_number        INTEGER NOT NULL,
    epoch_uuid          TEXT NOT NULL,
    adapter_instance_id TEXT NOT NULL,
    agent_id            TEXT NOT NULL,
    worker_id           TEXT NOT NULL,
    worker_connected_at REAL NOT NULL,
    command_id          TEXT,
    granted_at          REAL NOT NULL,
    applied_epoch       INTEGER NOT NULL DEFAULT 0,
    applied_sequence    INTEGER NOT NULL DEFAULT 0,
    applied_at          REAL,
    PRIMARY KEY (project_id, scheduler)
);
CREATE TABLE schedule_frames (
    project_id          TEXT NOT NULL,
    stream_id           TEXT NOT NULL,
    epoch_number        INTEGER NOT NULL,
    sequence            INTEGER NOT NULL,
    snapshot_id         TEXT NOT NULL,
    frame_index         INTEGER NOT NULL,
    scheduler           TEXT NOT NULL,
    epoch_uuid          TEXT NOT NULL,
    source_scope        TEXT NOT NULL,
    adapter_instance_id TEXT NOT NULL,
    stable_source       INTEGER NOT NULL,
    frame_kind          TEXT NOT NULL,
    frame_count         INTEGER NOT NULL,
    row_count           INTEGER NOT NULL,
    snapshot_digest     TEXT NOT NULL,
    rows                TEXT NOT NULL,
    agent_id            TEXT NOT NULL,
    worker_id           TEXT,
    received_at         REAL NOT NULL,
    PRIMARY KEY (project_id, stream_id, epoch_number, sequence, snapshot_id, frame_index)
);
""",
    ),
    Migration(
        version=9,
        name="tasks: lean rows, counts by state",
        # What made the projection cost most of a drain (benchmarks/tasks.py):
        # every write stored the large values twice (in the doc and in their
        # own jsonb columns, with the timeline beside them) and paid for a
        # seventh index. The doc is the one copy now, opaque bytes (orjson)
        # that Postgres neither parses nor checks; inputs, result, traceback,
        # tags, priority and timeline are derived from it when a task is read
        # (z4j.tasks.task_row). The primary key leads with (engine, task_id),
        # which is how a task is looked up, so tasks_by_task_id goes. The
        # indexes that serve the filters task_counts cannot count (name,
        # agent, time) carry the state, so that the newest matches are
        # counted from the index alone (store/tasks.py, count_by_state).
        # task_counts keeps how many tasks there are per (project, engine,
        # queue, state) -- a null queue as '' -- so the API's counts by state
        # read a few rows, not millions. The drain keeps it
        # in the events' transaction (store/task_writes.py); concurrent drains add
        # to different shards, so they rarely wait on one counter row.
        postgres="""
ALTER TABLE tasks DROP COLUMN args, DROP COLUMN kwargs, DROP COLUMN result,
    DROP COLUMN traceback, DROP COLUMN tags, DROP COLUMN priority, DROP COLUMN timeline;
ALTER TABLE tasks ALTER COLUMN doc DROP DEFAULT;
ALTER TABLE tasks ALTER COLUMN doc TYPE bytea USING convert_to(doc::text, 'UTF8');
ALTER TABLE tasks DROP CONSTRAINT tasks_pkey;
ALTER TABLE tasks ADD PRIMARY KEY (engine, task_id, project_id);
DROP INDEX tasks_by_task_id;
DROP INDEX tasks_recent;
DROP INDEX tasks_by_name;
DROP INDEX tasks_by_agent;
CREATE INDEX tasks_recent ON tasks (last_event_at DESC, engine DESC, task_id DESC)
    INCLUDE (state);
CREATE INDEX tasks_by_name ON tasks (name, last_event_at DESC, engine DESC, task_id DESC)
    INCLUDE (state);
CREATE INDEX tasks_by_agent ON tasks (agent_id, last_event_at DESC, engine DESC, task_id DESC)
    INCLUDE (state);
CREATE TABLE task_counts (
    project_id uuid NOT NULL,
    engine     text NOT NULL,
    queue      text NOT NULL,
    state      text NOT NULL,
    shard      smallint NOT NULL,
    n          bigint NOT NULL,
    PRIMARY KEY (project_id, engine, queue, state, shard)
);
INSERT INTO task_counts
    SELECT project_id, engine, coalesce(queue, ''), state, 0, count(*)
    FROM tasks GROUP BY 1, 2, 3, 4;
""",
        sqlite="""
CREATE TABLE tasks_lean (
    engine        TEXT NOT NULL,
    task_id       TEXT NOT NULL,
    project_id    TEXT NOT NULL,
    name          TEXT,
    queue         TEXT,
    state         TEXT NOT NULL,
    attempts      INTEGER NOT NULL,
    agent_id      TEXT,
    worker        TEXT,
    exception     TEXT,
    message       TEXT,
    runtime_ms    REAL,
    parent_id     TEXT,
    root_id       TEXT,
    first_seen    REAL NOT NULL,
    received_at   REAL,
    started_at    REAL,
    finished_at   REAL,
    last_event_at REAL NOT NULL,
    doc           BLOB NOT NULL,
    PRIMARY KEY (engine, task_id, project_id)
);
INSERT INTO tasks_lean
    SELECT engine, task_id, project_id, name, queue, state, attempts, agent_id, worker,
        exception, message, runtime_ms, parent_id, root_id, first_seen, received_at,
        started_at, finished_at, last_event_at, doc
    FROM tasks;
DROP TABLE tasks;
ALTER TABLE tasks_lean RENAME TO tasks;
CREATE INDEX tasks_recent ON tasks (last_event_at DESC, engine DESC, task_id DESC);
CREATE INDEX tasks_by_state ON tasks (state, last_event_at DESC, engine DESC, task_id DESC);
CREATE INDEX tasks_by_name ON tasks (name, last_event_at DESC, engine DESC, task_id DESC);
CREATE INDEX tasks_by_queue ON tasks (queue, last_event_at DESC, engine DESC, task_id DESC);
CREATE INDEX tasks_by_agent ON tasks (agent_id, last_event_at DESC, engine DESC, task_id DESC);
CREATE TABLE task_counts (
    project_id TEXT NOT NULL,
    engine     TEXT NOT NULL,
    queue      TEXT NOT NULL,
    state      TEXT NOT NULL,
    shard      INTEGER NOT NULL,
    n          INTEGER NOT NULL,
    PRIMARY KEY (project_id, engine, queue, state, shard)
);
INSERT INTO task_counts
    SELECT project_id, engine, coalesce(queue, ''), state, 0, count(*)
    FROM tasks GROUP BY 1, 2, 3, 4;
""",
    ),
    Migration(
        version=10,
        name="opamp: tokens and agents",
        # OpAMP agents are not z4j agents: they identify by a 16-byte
        # instance_uid within the project their bearer token belongs to,
        # so a token can only ever read or write its own project's rows.
        # ``state`` holds what z4j.protocol.opamp.state needs to apply the
        # next message (store/opamp.py); the other columns are its
        # summary for the API, written with it. ``sequence_num`` and
        # ``capabilities`` are OpAMP's uint64s, kept in a signed bigint
        # (store/opamp.py folds them).
        postgres="""
CREATE TABLE opamp_tokens (
    token_hash bytea PRIMARY KEY,
    project_id uuid NOT NULL REFERENCES projects(id),
    name       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE opamp_agents (
    project_id           uuid NOT NULL REFERENCES projects(id),
    instance_uid         bytea NOT NULL,
    state                bytea NOT NULL,
    sequence_num         bigint NOT NULL,
    capabilities         bigint NOT NULL,
    full_state_requests  integer NOT NULL,
    identifying          jsonb NOT NULL,
    non_identifying      jsonb NOT NULL,
    health               jsonb,
    effective_config     jsonb,
    remote_config_status jsonb,
    transport            text NOT NULL,
    first_seen           timestamptz NOT NULL,
    last_seen            timestamptz NOT NULL,
    disconnected_at      timestamptz,
    PRIMARY KEY (project_id, instance_uid)
);
""",
        sqlite="""
CREATE TABLE opamp_tokens (
    token_hash BLOB PRIMARY KEY,
    project_id TEXT NOT NULL REFERENCES projects(id),
    name       TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE opamp_agents (
    project_id           TEXT NOT NULL REFERENCES projects(id),
    instance_uid         BLOB NOT NULL,
    state                BLOB NOT NULL,
    sequence_num         INTEGER NOT NULL,
    capabilities         INTEGER NOT NULL,
    full_state_requests  INTEGER NOT NULL,
    identifying          TEXT NOT NULL,
    non_identifying      TEXT NOT NULL,
    health               TEXT,
    effective_config     TEXT,
    remote_config_status TEXT,
    transport            TEXT NOT NULL,
    first_seen           REAL NOT NULL,
    last_seen            REAL NOT NULL,
    disconnected_at      REAL,
    PRIMARY KEY (project_id, instance_uid)
);
""",
    ),
    Migration(
        version=11,
        name="opamp: the desired configuration per agent",
        # One row per agent that should run a configuration of ours (the
        # agent may not have connected yet). ``files`` maps each name to
        # {"body": text, "content_type": text}; ``config_hash`` is
        # remote_config.config_hash of them, what the agent reports back.
        # ``status`` (pending, applying, applied, failed) and
        # ``error_message`` follow the agent's remote_config_status for
        # that hash (brain/http/opamp.py writes them when they change).
        postgres="""
CREATE TABLE opamp_configs (
    project_id    uuid NOT NULL REFERENCES projects(id),
    instance_uid  bytea NOT NULL,
    config_hash   bytea NOT NULL,
    files         jsonb NOT NULL,
    created_at    timestamptz NOT NULL,
    created_by    text,
    status        text NOT NULL,
    error_message text NOT NULL,
    status_at     timestamptz NOT NULL,
    PRIMARY KEY (project_id, instance_uid)
);
""",
        sqlite="""
CREATE TABLE opamp_configs (
    project_id    TEXT NOT NULL REFERENCES projects(id),
    instance_uid  BLOB NOT NULL,
    config_hash   BLOB NOT NULL,
    files         TEXT NOT NULL,
    created_at    REAL NOT NULL,
    created_by    TEXT,
    status        TEXT NOT NULL,
    error_message TEXT NOT NULL,
    status_at     REAL NOT NULL,
    PRIMARY KEY (project_id, instance_uid)
);
""",
    ),
    Migration(
        version=12,
        name="opamp: staged rollouts to a selector of agents",
        # A rollout gives one configuration (``files``, ``config_hash``) to
        # the agents of a project its ``selector`` matched when it started:
        # they are its targets, fixed, one row each in stage order
        # (``position``; z4j/opamp_rollouts.py orders and cuts them). The
        # first ``assigned`` targets have been given the configuration: their
        # opamp_configs rows carry the rollout's id (``rollout_id``), which a
        # later push to that agent clears (the target is then superseded).
        # ``accepted_failures``: failures an operator accepted by resuming.
        postgres="""
CREATE TABLE opamp_rollouts (
    id                        uuid PRIMARY KEY,
    project_id                uuid NOT NULL REFERENCES projects(id),
    selector                  jsonb NOT NULL,
    config_hash               bytea NOT NULL,
    files                     jsonb NOT NULL,
    canary_percent            integer NOT NULL,
    batch_size                integer NOT NULL,
    failure_threshold_percent integer NOT NULL,
    state                     text NOT NULL,
    stage                     integer NOT NULL,
    stages                    integer NOT NULL,
    targets                   integer NOT NULL,
    assigned                  integer NOT NULL,
    accepted_failures         integer NOT NULL,
    halted_reason             text,
    created_at                timestamptz NOT NULL,
    created_by                text,
    updated_at                timestamptz NOT NULL
);
CREATE INDEX opamp_rollouts_by_state ON opamp_rollouts (state);
CREATE INDEX opamp_rollouts_by_project ON opamp_rollouts (project_id, created_at DESC);
CREATE TABLE opamp_rollout_targets (
    rollout_id   uuid NOT NULL REFERENCES opamp_rollouts(id) ON DELETE CASCADE,
    position     integer NOT NULL,
    instance_uid bytea NOT NULL,
    PRIMARY KEY (rollout_id, position)
);
ALTER TABLE opamp_configs ADD COLUMN rollout_id uuid;
CREATE INDEX opamp_configs_by_rollout ON opamp_configs (rollout_id) WHERE rollout_id IS NOT NULL;
""",
        sqlite="""
CREATE TABLE opamp_rollouts (
    id                        TEXT PRIMARY KEY,
    project_id                TEXT NOT NULL REFERENCES projects(id),
    selector                  TEXT NOT NULL,
    config_hash               BLOB NOT NULL,
    files                     TEXT NOT NULL,
    canary_percent            INTEGER NOT NULL,
    batch_size                INTEGER NOT NULL,
    failure_threshold_percent INTEGER NOT NULL,
    state                     TEXT NOT NULL,
    stage                     INTEGER NOT NULL,
    stages                    INTEGER NOT NULL,
    targets                   INTEGER NOT NULL,
    assigned                  INTEGER NOT NULL,
    accepted_failures         INTEGER NOT NULL,
    halted_reason             TEXT,
    created_at                REAL NOT NULL,
    created_by                TEXT,
    updated_at                REAL NOT NULL
);
CREATE INDEX opamp_rollouts_by_state ON opamp_rollouts (state);
CREATE INDEX opamp_rollouts_by_project ON opamp_rollouts (project_id, created_at DESC);
CREATE TABLE opamp_rollout_targets (
    rollout_id   TEXT NOT NULL REFERENCES opamp_rollouts(id) ON DELETE CASCADE,
    position     INTEGER NOT NULL,
    instance_uid BLOB NOT NULL,
    PRIMARY KEY (rollout_id, position)
);
ALTER TABLE opamp_configs ADD COLUMN rollout_id TEXT;
CREATE INDEX opamp_configs_by_rollout ON opamp_configs (rollout_id) WHERE rollout_id IS NOT NULL;
""",
    ),
    Migration(
        version=13,
        name="opamp: per-agent history of what changed",
        # One row per message that changed something an operator sees (its
        # description, capabilities, health, effective configuration, remote
        # configuration status, connection, instance id) and per configuration
        # status that moved; heartbeats write none. ``changes``: the list of
        # what changed; ``details``: the new summary of each (store/opamp.py).
        # Rows older than Z4J_EVENT_RETENTION_DAYS go with the leader's upkeep.
        postgres="""
CREATE TABLE opamp_agent_history (
    id           bigserial PRIMARY KEY,
    project_id   uuid NOT NULL REFERENCES projects(id),
    instance_uid bytea NOT NULL,
    at           timestamptz NOT NULL,
    changes      jsonb NOT NULL,
    details      jsonb NOT NULL
);
CREATE INDEX opamp_agent_history_by_agent ON opamp_agent_history (project_id, instance_uid, id DESC);
CREATE INDEX opamp_agent_history_by_time ON opamp_agent_history (at);
""",
        sqlite="""
CREATE TABLE opamp_agent_history (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id   TEXT NOT NULL REFERENCES projects(id),
    instance_uid BLOB NOT NULL,
    at           REAL NOT NULL,
    changes      TEXT NOT NULL,
    details      TEXT NOT NULL
);
CREATE INDEX opamp_agent_history_by_agent ON opamp_agent_history (project_id, instance_uid, id DESC);
CREATE INDEX opamp_agent_history_by_time ON opamp_agent_history (at);
""",
    ),
    Migration(
        version=14,
        name="accounts: users, personal API tokens, user sessions",
        # A user has one role on this brain; ``projects`` (a JSON list of
        # project ids, NULL: all) narrows it. Personal tokens and sessions
        # keep keyed hashes only (z4j/keys.py). A session opened with a
        # personal token names it, so revoking the token ends the session.
        # Legacy admin tokens (api_tokens) stay as they are; their sessions
        # get a last request time too, for the idle limit (NULL: none yet).
        postgres="""
ALTER TABLE api_sessions ADD COLUMN last_seen_at timestamptz;
CREATE TABLE users (
    id            uuid PRIMARY KEY,
    name          text NOT NULL UNIQUE,
    password_hash text NOT NULL,
    role          text NOT NULL,
    projects      jsonb,
    disabled      boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL
);
CREATE TABLE user_tokens (
    id           uuid PRIMARY KEY,
    token_hash   bytea NOT NULL UNIQUE,
    user_id      uuid NOT NULL REFERENCES users(id),
    name         text NOT NULL,
    scope        text NOT NULL,
    created_at   timestamptz NOT NULL,
    expires_at   timestamptz,
    last_used_at timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX user_tokens_by_user ON user_tokens (user_id, created_at);
CREATE TABLE user_sessions (
    session_hash bytea PRIMARY KEY,
    user_id      uuid NOT NULL REFERENCES users(id),
    token_id     uuid REFERENCES user_tokens(id),
    created_at   timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    last_seen_at timestamptz NOT NULL
);
CREATE INDEX user_sessions_by_user ON user_sessions (user_id);
CREATE INDEX user_sessions_by_token ON user_sessions (token_id) WHERE token_id IS NOT NULL;
""",
        sqlite="""
ALTER TABLE api_sessions ADD COLUMN last_seen_at REAL;
CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    role          TEXT NOT NULL,
    projects      TEXT,
    disabled      INTEGER NOT NULL DEFAULT 0,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL
);
CREATE TABLE user_tokens (
    id           TEXT PRIMARY KEY,
    token_hash   BLOB NOT NULL UNIQUE,
    user_id      TEXT NOT NULL REFERENCES users(id),
    name         TEXT NOT NULL,
    scope        TEXT NOT NULL,
    created_at   REAL NOT NULL,
    expires_at   REAL,
    last_used_at REAL,
    revoked_at   REAL
);
CREATE INDEX user_tokens_by_user ON user_tokens (user_id, created_at);
CREATE TABLE user_sessions (
    session_hash BLOB PRIMARY KEY,
    user_id      TEXT NOT NULL REFERENCES users(id),
    token_id     TEXT REFERENCES user_tokens(id),
    created_at   REAL NOT NULL,
    expires_at   REAL NOT NULL,
    last_seen_at REAL NOT NULL
);
CREATE INDEX user_sessions_by_user ON user_sessions (user_id);
CREATE INDEX user_sessions_by_token ON user_sessions (token_id) WHERE token_id IS NOT NULL;
""",
    ),
    Migration(
        version=15,
        name="provisioning: archived projects, rotated signing secrets and agent tokens",
        # A project's signing key is derived from the master secret, its id
        # and ``secret_generation`` (0: the key of before; keys.project_key).
        # Rotating moves the generation on and keeps the previous one
        # verifying until ``previous_secret_expires_at``. A rotated agent
        # token keeps working until its ``expires_at`` (NULL: no end); the
        # partial index serves the brain's sweep over tokens in their grace.
        postgres="""
ALTER TABLE projects ADD COLUMN archived_at timestamptz;
ALTER TABLE projects ADD COLUMN secret_generation integer NOT NULL DEFAULT 0;
ALTER TABLE projects ADD COLUMN previous_secret_expires_at timestamptz;
ALTER TABLE agent_tokens ADD COLUMN expires_at timestamptz;
CREATE INDEX agent_tokens_by_agent ON agent_tokens (agent_id);
CREATE INDEX agent_tokens_expiring ON agent_tokens (expires_at) WHERE expires_at IS NOT NULL;
""",
        sqlite="""
ALTER TABLE projects ADD COLUMN archived_at REAL;
ALTER TABLE projects ADD COLUMN secret_generation INTEGER NOT NULL DEFAULT 0;
ALTER TABLE projects ADD COLUMN previous_secret_expires_at REAL;
ALTER TABLE agent_tokens ADD COLUMN expires_at REAL;
CREATE INDEX agent_tokens_by_agent ON agent_tokens (agent_id);
CREATE INDEX agent_tokens_expiring ON agent_tokens (expires_at) WHERE expires_at IS NOT NULL;
""",
    ),
    Migration(
        version=16,
        name="event search: an index per filter, newest first",
        # store/event_search.py: each filter of an event search reads its own
        # index in keyset order (received_at, id), so a page reads about as
        # many rows as it returns. Agent rows only carry a project, agent and
        # worker (TCP records have none): those indexes are partial, and a
        # TCP record costs the drain none of them. (kind, received_at, id)
        # replaces (kind, received_at), which left the id tie-break to a sort.
        # On Postgres these are built on the partitioned parent: one per
        # partition, now and for every partition made later. Building them
        # holds the events table's write lock while it reads every kept
        # partition (docs/search.md).
        postgres="""
CREATE INDEX events_project_received ON events (project_id, received_at, id)
    WHERE project_id IS NOT NULL;
CREATE INDEX events_agent_received ON events (agent_id, received_at, id)
    WHERE agent_id IS NOT NULL;
CREATE INDEX events_worker_received ON events (worker_id, received_at, id)
    WHERE worker_id IS NOT NULL;
CREATE INDEX events_kind_received_id ON events (kind, received_at, id);
DROP INDEX events_kind_received;
""",
        # SQLite's indexes end in the rowid, which is the id.
        sqlite="""
CREATE INDEX events_project_received ON events (project_id, received_at)
    WHERE project_id IS NOT NULL;
CREATE INDEX events_agent_received ON events (agent_id, received_at)
    WHERE agent_id IS NOT NULL;
CREATE INDEX events_worker_received ON events (worker_id, received_at)
    WHERE worker_id IS NOT NULL;
""",
    ),
    Migration(
        version=17,
        name="audit: indexes for the audit page's filters",
        # GET /api/v1/audit pages newest first by id; an exact actor, action
        # or subject then reads its own index in id order, and a time range
        # its rows' span (z4j/store/audit_query.py).
        postgres="""
CREATE INDEX audit_events_by_actor ON audit_events (actor, id);
CREATE INDEX audit_events_by_action ON audit_events (action, id);
CREATE INDEX audit_events_by_subject ON audit_events (subject, id);
CREATE INDEX audit_events_by_at ON audit_events (at);
""",
        sqlite="""
CREATE INDEX audit_events_by_actor ON audit_events (actor, id);
CREATE INDEX audit_events_by_action ON audit_events (action, id);
CREATE INDEX audit_events_by_subject ON audit_events (subject, id);
CREATE INDEX audit_events_by_at ON audit_events (at);
""",
    ),
    Migration(
        version=18,
        name="federation tokens",
        # What a peer region's hub signs in with (z4j federation token create):
        # a keyed hash only (z4j/keys.py), a name, whether it may send
        # commands here, and its lifetime. It admits the federation routes
        # alone (brain/http/policy.py); revoking it ends it on the next request.
        postgres="""
CREATE TABLE federation_tokens (
    id             uuid PRIMARY KEY,
    token_hash     bytea NOT NULL UNIQUE,
    name           text NOT NULL,
    allow_commands boolean NOT NULL,
    created_at     timestamptz NOT NULL,
    expires_at     timestamptz,
    last_used_at   timestamptz,
    revoked_at     timestamptz
);
""",
        sqlite="""
CREATE TABLE federation_tokens (
    id             TEXT PRIMARY KEY,
    token_hash     BLOB NOT NULL UNIQUE,
    name           TEXT NOT NULL,
    allow_commands INTEGER NOT NULL,
    created_at     REAL NOT NULL,
    expires_at     REAL,
    last_used_at   REAL,
    revoked_at     REAL
);
""",
    ),
    Migration(
        version=19,
        name="tasks: a version per row write",
        # Postgres drains fold without locks and write a task's row in one
        # statement, only if it is still the version they folded from
        # (store/task_writes.py): every write gives the row a fresh random
        # version. Rows written before have version 0, which a drain that
        # read them folds from like any other. SQLite has one writer and
        # keeps the column for the same schema.
        postgres="""
ALTER TABLE tasks ADD COLUMN version bigint NOT NULL DEFAULT 0;
""",
        sqlite="""
ALTER TABLE tasks ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
""",
    ),
    Migration(
        version=20,
        name="agents: newest first, for pages of them",
        # A hub pages each region's agents newest first by (created_at, id)
        # (GET /federation/peer/agents), a region having tens of thousands:
        # each page reads its own rows of this index, not the whole table.
        postgres="""
CREATE INDEX agents_by_created ON agents (created_at DESC, id DESC);
""",
        sqlite="""
CREATE INDEX agents_by_created ON agents (created_at DESC, id DESC);
""",
    ),
    Migration(
        version=21,
        name="workers: the connected ones",
        # A region's summary (its hub's Regions page, every few seconds) counts
        # the connected workers and their agents; the table keeps every worker
        # seen within the event retention, many times the connected ones after
        # a few deploys: the count reads this index of the connected alone.
        postgres="""
CREATE INDEX workers_connected ON workers (agent_id) WHERE disconnected_at IS NULL;
""",
        sqlite="""
CREATE INDEX workers_connected ON workers (agent_id) WHERE disconnected_at IS NULL;
""",
    ),
)
