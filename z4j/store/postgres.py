"""The production store: Postgres, written to with binary COPY.

The drain path per batch, all in one transaction on one pooled connection:

1. expand the claimed payloads into event rows (on the worker thread, so
   the Trio loop stays free);
2. binary COPY them into a temporary staging table (``ON COMMIT DELETE
   ROWS``: emptied by the commit, no TRUNCATE);
3. ``INSERT INTO events SELECT … ON CONFLICT DO NOTHING``: a batch drained
   twice (crash between commit and buffer delete) lands once. Agent events
   also claim their key in ``agent_event_keys``, unique on the key alone,
   so one re-sent by its agent lands once whenever it is filed.

``events`` is range-partitioned by day on ``received_at``; a batch that
touches a day with no partition yet creates it first, under an advisory lock
so that replicas do not race.

One concern justifies the length (past 700 lines): the Postgres side of
the `Store` protocol (the COPY drain, partitions, the pool). Mappers,
filters, the command transaction bodies and the task and schedule
projections' SQL it shares with SQLite live in `_rows`, `_filters`,
`_transactions`, `tasks` and `schedules`.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

import orjson
import psycopg
import trio
from psycopg import postgres
from psycopg.adapt import Dumper
from psycopg.pq import Format
from psycopg.types.json import Jsonb

from ..buffer import ClaimedRow
from ..events import event_rows
from ..schedules import ScheduleControl, ScheduleFrame
from ..tasks import TaskEvent, TaskSummary
from . import (
    _rows,
    accounts,
    event_export,
    event_search,
    federation,
    opamp,
    opamp_history,
    opamp_rollouts,
    provisioning,
    schedule_frames,
    schedules,
    task_writes,
    tasks,
    workers,
)
from ._filters import Where, agents_where, commands_where
from ._rows import (
    AGENT_COLUMNS,
    AUDIT_COLUMNS,
    COMMAND_COLUMNS,
    INSTANCE_COLUMNS,
    PROJECT_COLUMNS,
    TOKEN_COLUMNS,
    WORKER_COLUMNS,
    Dialect,
)
from ._transactions import (
    find_agent,
    find_project,
    insert_command,
    read_worker_registries,
    transition_command,
    update_registry,
)
from .audit_query import AuditFilter, audit_where
from .base import (
    Agent,
    AgentLogin,
    ApiToken,
    AuditRecord,
    CommandRecord,
    CredentialDeadlines,
    DirectoryConflict,
    EngineWorker,
    EventFilter,
    EventHistogram,
    EventPage,
    ExportFormat,
    ExportPage,
    FederationToken,
    InstanceInfo,
    OpampAgent,
    OpampConfig,
    OpampHistoryEntry,
    OpampRollout,
    OpampToken,
    Project,
    ScheduleFilter,
    ScheduleRecord,
    ScheduleStream,
    StoreUnavailable,
    TaskCounts,
    TaskFilter,
    TaskRecord,
    UnstorableRows,
    User,
    UserSession,
    UserToken,
    WorkerInfo,
    WorkerRegistry,
    check_command_state,
)
from .migrations import MIGRATION_LOCK_KEY, MIGRATIONS
from .pg import PgPool
from .replica import ReadReplica, replica_reads_allowed

# What one drain write did: events inserted, the tasks it finished, and the
# staged schedule frames it dropped, by reason.
Written = tuple[int, list[TaskSummary], Counter[str]]

__all__ = ["PostgresStore", "partition_name"]

log = logging.getLogger("z4j.store.postgres")

PARTITIONS_AHEAD = 3  # today and the next two days always exist
PARTITION_LOCK_KEY = int.from_bytes(b"z4j-part", "big", signed=True)
FIRST_TOKEN_LOCK_KEY = int.from_bytes(b"z4j-tokn", "big", signed=True)
FIRST_USER_LOCK_KEY = int.from_bytes(b"z4j-user", "big", signed=True)
_STAGING = "z4j_events_staging"
_FORGET_CHUNK = 10_000  # rows deleted per retention transaction
# A retention delete: (dialect, connection, before, at most) -> rows deleted.
_Delete = Callable[[Dialect, Any, float, int], int]
_COLUMNS = (
    "received_at, idempotency_key, source, kind, buffer_id, body, project_id, agent_id, worker_id"
)
_INSERT_EVENTS = (
    f"INSERT INTO events ({_COLUMNS}) SELECT {_COLUMNS} FROM {_STAGING} ON CONFLICT DO NOTHING"
)
# Agent events are deduplicated by key alone through agent_event_keys: a
# re-sent event may be filed at another time than its first copy (see
# migration 3). Only the keys this statement claims let their event in.
_INSERT_WITH_AGENT_KEYS = f"""
WITH claimed AS (
    INSERT INTO agent_event_keys (idempotency_key, received_at)
    SELECT idempotency_key, min(received_at) FROM {_STAGING}
    WHERE source = 'agent' GROUP BY idempotency_key
    ON CONFLICT DO NOTHING
    RETURNING idempotency_key, received_at
)
INSERT INTO events ({_COLUMNS})
SELECT {_COLUMNS} FROM {_STAGING} WHERE source <> 'agent'
UNION ALL
SELECT DISTINCT ON (s.idempotency_key) {", ".join("s." + c.strip() for c in _COLUMNS.split(","))}
FROM {_STAGING} s JOIN claimed c
  ON c.idempotency_key = s.idempotency_key AND c.received_at = s.received_at
ON CONFLICT DO NOTHING
"""


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

    def __init__(
        self,
        pool: PgPool,
        *,
        observe_query: Callable[[str, float], None] | None = None,
        project_tasks: bool = True,
        on_tasks: Callable[[Sequence[TaskSummary]], None] | None = None,
        on_frames_dropped: Callable[[Mapping[str, int]], None] | None = None,
        read_replica: ReadReplica | None = None,
    ) -> None:
        """``observe_query``: called with each store call's operation (the store
        method's name) and seconds (the query histogram).
        ``project_tasks``: keep the ``tasks`` table as events are written;
        ``on_tasks`` is then called with the tasks each write finished.
        ``on_frames_dropped``: called with the staged schedule frames each
        write or expiry dropped, by reason (store/schedule_frames.py).
        ``read_replica``: the standby `_read` methods may use (store/replica.py)."""
        self.pool = pool
        self.read_replica = read_replica
        self._project_tasks = project_tasks
        self._on_tasks = on_tasks
        # The tasks this store's drains wrote last (store/task_writes.py).
        self._task_cache = task_writes.TaskCache()
        self._on_frames_dropped = on_frames_dropped
        self.observe_query = observe_query or _ignore
        self._partitions: set[date] = set()
        self._staged: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        pool_size: int,
        statement_timeout_ms: int,
        application_name: str = "z4j",
        observe_query: Callable[[str, float], None] | None = None,
        project_tasks: bool = True,
        on_tasks: Callable[[Sequence[TaskSummary]], None] | None = None,
        on_frames_dropped: Callable[[Mapping[str, int]], None] | None = None,
        read_url: str | None = None,
        read_max_lag_seconds: float = 5.0,
    ) -> PostgresStore:
        """``read_url``: a hot standby of ``url`` for API reads
        (Z4J_DATABASE_READ_URL), with a pool of its own of ``pool_size``."""
        pool = PgPool(
            url,
            size=pool_size,
            statement_timeout_ms=statement_timeout_ms,
            application_name=application_name,
            configure=_configure,
        )
        replica = None
        if read_url is not None:
            replica = ReadReplica(
                read_url,
                max_lag_seconds=read_max_lag_seconds,
                pool_size=pool_size,
                statement_timeout_ms=statement_timeout_ms,
                application_name=application_name,
                configure=_configure,
            )
        return cls(
            pool,
            observe_query=observe_query,
            project_tasks=project_tasks,
            on_tasks=on_tasks,
            on_frames_dropped=on_frames_dropped,
            read_replica=replica,
        )

    async def aclose(self) -> None:
        await self.pool.aclose()
        if self.read_replica is not None:
            await self.read_replica.aclose()

    async def _run(self, fn: Any, *args: Any, autocommit: bool = False) -> Any:
        """Run ``fn`` on the store's thread; its time goes to the query histogram
        under the calling store method's name (every store method calls this
        directly, so new methods are measured under their own names unasked)."""
        operation = sys._getframe(1).f_code.co_name
        started = time.perf_counter()
        try:
            return await self.pool.run(fn, *args, autocommit=autocommit)
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"postgres: {exc}".strip()) from exc
        finally:
            self.observe_query(operation, time.perf_counter() - started)

    async def _read(self, fn: Any, *args: Any) -> Any:
        """`_run` for a read that may be served stale: on the read replica
        when the caller allows it (`replica_reads`, the API's GET requests)
        and the replica may serve now (`ReadReplica.run`), else on the primary."""
        operation = sys._getframe(1).f_code.co_name
        started = time.perf_counter()
        try:
            replica = self.read_replica
            if replica is not None and replica_reads_allowed():
                served, result = await replica.run(fn, *args)
                if served:
                    return result
            return await self.pool.run(fn, *args)
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"postgres: {exc}".strip()) from exc
        finally:
            self.observe_query(operation, time.perf_counter() - started)

    # -- schema ------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        applied: list[int] = await self._run(_migrate)
        self._partitions = await self._run(_existing_partitions)
        today = datetime.now(UTC).date()
        await self.ensure_partitions({today + timedelta(days=n) for n in range(PARTITIONS_AHEAD)})
        return applied

    async def applied_migrations(self) -> list[int]:
        versions: list[int] = await self._run(_applied_migrations, autocommit=True)
        return versions

    async def database_time(self) -> float:
        seconds: float = await self._run(
            lambda conn: conn.execute(
                "SELECT extract(epoch FROM clock_timestamp())::float8"
            ).fetchone()[0],
            autocommit=True,
        )
        return seconds

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
                written: Written = await self._run(self._copy_events, buffer_id, rows)
            except psycopg.errors.CheckViolation:
                # "no partition found for row": another replica's retention run
                # dropped a partition our cache still lists, or agent events
                # are filed under their own (earlier) time. Re-read, create
                # what the events really need, retry.
                self._partitions = await self._run(_existing_partitions)
                await self.ensure_partitions(
                    await trio.to_thread.run_sync(_event_days, buffer_id, rows)
                )
                written = await self._run(self._copy_events, buffer_id, rows)
        except (
            psycopg.DataError,
            psycopg.IntegrityError,
            ValueError,
            orjson.JSONEncodeError,
        ) as exc:
            raise UnstorableRows(str(exc).strip()) from exc
        inserted, finished, dropped = written
        if finished and self._on_tasks is not None:
            self._on_tasks(finished)
        if dropped and self._on_frames_dropped is not None:
            self._on_frames_dropped(dropped)
        return inserted

    def _copy_events(
        self, conn: psycopg.Connection[Any], buffer_id: uuid.UUID, rows: Sequence[ClaimedRow]
    ) -> Written:
        try:
            return self._copy_events_once(conn, buffer_id, rows)
        except BaseException:
            # The transaction rolls back, and a staging table created in it
            # goes with it: create it again next time.
            self._staged.discard(conn)
            raise

    def _copy_events_once(
        self, conn: psycopg.Connection[Any], buffer_id: uuid.UUID, rows: Sequence[ClaimedRow]
    ) -> Written:
        cur = conn.cursor()
        if conn not in self._staged:
            cur.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {_STAGING} ("
                " received_at timestamptz, idempotency_key uuid, source text,"
                " kind text, buffer_id uuid, body jsonb,"
                " project_id uuid, agent_id uuid, worker_id text"
                ") ON COMMIT DELETE ROWS"
            )
            self._staged.add(conn)
        with cur.copy(f"COPY {_STAGING} ({_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
            # Dumped by oid: jsonb by _JsonTextBinaryDumper (the body is
            # serialised JSON already), uuid by _UuidBinaryDumper (bytes).
            copy.set_types(
                ["timestamptz", "uuid", "text", "text", "uuid", "jsonb", "uuid", "uuid", "text"]
            )
            write_row = copy.write_row
            buffer_key = buffer_id.bytes
            agent_rows = False
            about_tasks: list[TaskEvent] | None = [] if self._project_tasks else None
            about_schedules: list[ScheduleFrame | ScheduleControl] = []
            for at, key, source, kind, body, project, agent, worker in event_rows(
                buffer_id, rows, about_tasks, about_schedules
            ):
                write_row((at, key, source, kind, buffer_key, body, project, agent, worker))
                agent_rows = agent_rows or agent is not None
        cur.execute(_INSERT_WITH_AGENT_KEYS if agent_rows else _INSERT_EVENTS)
        inserted: int = cur.rowcount
        finished = (
            task_writes.write_tasks(PG, conn, about_tasks, self._task_cache) if about_tasks else []
        )
        dropped = schedules.write_schedules(PG, conn, about_schedules)
        return inserted, finished, dropped

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

    async def expire_schedule_frames(self, *, now: float) -> int:
        gone: int = await self._run(lambda conn: schedule_frames.expire_frames(PG, conn, now))
        if gone and self._on_frames_dropped is not None:
            self._on_frames_dropped({"expired": gone})
        return gone

    # -- the agent directory -----------------------------------------------------------

    async def create_project(self, name: str) -> Project:
        project = Project(uuid.uuid4(), name)
        try:
            await self._run(
                lambda conn: conn.execute(
                    "INSERT INTO projects (id, name) VALUES (%s, %s)", (project.id, name)
                )
            )
        except psycopg.errors.UniqueViolation as exc:
            raise DirectoryConflict(f"a project named {name!r} exists already") from exc
        return project

    async def find_project(self, ref: str) -> Project | None:
        result: Project | None = await self._run(lambda conn: find_project(PG, conn, ref))
        return result

    async def list_projects(self) -> list[Project]:
        rows = await self._read(
            lambda conn: conn.execute(
                f"SELECT {PROJECT_COLUMNS} FROM projects ORDER BY name"
            ).fetchall()
        )
        return [_rows.project(PG, row) for row in rows]

    async def create_agent(self, project_id: uuid.UUID, name: str, token_hash: bytes) -> Agent:
        agent_id = uuid.uuid4()
        try:
            created_at = await self._run(_insert_agent, project_id, agent_id, name, token_hash)
        except psycopg.errors.UniqueViolation as exc:
            raise DirectoryConflict(
                f"project {project_id} has an agent named {name!r} already"
            ) from exc
        return Agent(agent_id, project_id, name, revoked=False, created_at=created_at)

    async def agent_by_token(self, token_hash: bytes) -> Agent | None:
        row = await self._run(
            lambda conn: conn.execute(
                f"SELECT {AGENT_COLUMNS} FROM agent_tokens t JOIN agents a ON a.id = t.agent_id"
                " WHERE t.token_hash = %s AND a.revoked_at IS NULL"
                " AND (t.expires_at IS NULL OR t.expires_at > now())",
                (token_hash,),
            ).fetchone()
        )
        return None if row is None else _rows.agent(PG, row)

    async def find_agent(self, ref: str, project_id: uuid.UUID | None = None) -> Agent | None:
        result: Agent | None = await self._run(lambda conn: find_agent(PG, conn, ref, project_id))
        return result

    async def list_agents(self, project_id: uuid.UUID | None = None) -> list[Agent]:
        where = Where(PG)
        if project_id is not None:
            where.add("a.project_id = ?", project_id)
        sql = (
            f"SELECT {AGENT_COLUMNS} FROM agents a JOIN projects p ON p.id = a.project_id{where}"
            " ORDER BY p.name, a.name"
        )
        rows = await self._read(lambda conn: conn.execute(sql, where.params).fetchall())
        return [_rows.agent(PG, row) for row in rows]

    async def agents_page(
        self, *, before: tuple[float, uuid.UUID] | None = None, limit: int = 100
    ) -> list[Agent]:
        where = agents_where(PG, before)
        sql = (
            f"SELECT {AGENT_COLUMNS} FROM agents a{where}"
            " ORDER BY a.created_at DESC, a.id DESC LIMIT %s"
        )
        rows = await self._read(lambda conn: conn.execute(sql, (*where.params, limit)).fetchall())
        return [_rows.agent(PG, row) for row in rows]

    async def revoke_agent(self, agent_id: uuid.UUID) -> bool:
        count: int = await self._run(
            lambda conn: (
                conn.execute(
                    "UPDATE agents SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL",
                    (agent_id,),
                ).rowcount
            )
        )
        return count == 1

    # -- provisioning ------------------------------------------------------------------

    async def archive_project(self, project_id: uuid.UUID, *, now: float) -> list[Agent] | None:
        result: list[Agent] | None = await self._run(
            lambda conn: provisioning.archive_project(PG, conn, project_id, now)
        )
        return result

    async def rotate_agent_token(
        self, agent_id: uuid.UUID, token_hash: bytes, *, now: float, grace_seconds: float
    ) -> float | None:
        result: float | None = await self._run(
            lambda conn: provisioning.rotate_agent_token(
                PG, conn, agent_id, token_hash, now, grace_seconds
            )
        )
        return result

    async def rotate_project_secret(
        self, project_id: uuid.UUID, *, now: float, grace_seconds: float
    ) -> Project | None:
        result: Project | None = await self._run(
            lambda conn: provisioning.rotate_project_secret(
                PG, conn, project_id, now, grace_seconds
            )
        )
        return result

    async def agent_login(self, token_hash: bytes) -> AgentLogin | None:
        result: AgentLogin | None = await self._run(
            lambda conn: provisioning.agent_login(PG, conn, token_hash)
        )
        return result

    async def credential_deadlines(self) -> CredentialDeadlines:
        result: CredentialDeadlines = await self._run(
            lambda conn: provisioning.credential_deadlines(PG, conn)
        )
        return result

    async def token_graces(self, *, now: float) -> dict[uuid.UUID, float]:
        result: dict[uuid.UUID, float] = await self._run(
            lambda conn: provisioning.token_graces(PG, conn, now)
        )
        return result

    async def worker_connected(
        self,
        agent_id: uuid.UUID,
        worker_id: str,
        *,
        role: str | None,
        hello: dict[str, Any],
        instance_id: uuid.UUID,
        at: float,
    ) -> None:
        when = _ts(at)
        await self._run(
            lambda conn: conn.execute(
                "INSERT INTO workers (agent_id, worker_id, role, hello, instance_id,"
                " connected_at, last_seen, disconnected_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, NULL)"
                " ON CONFLICT (agent_id, worker_id) DO UPDATE SET role = EXCLUDED.role,"
                " hello = EXCLUDED.hello, instance_id = EXCLUDED.instance_id,"
                " connected_at = EXCLUDED.connected_at, last_seen = EXCLUDED.last_seen,"
                " disconnected_at = NULL",
                (agent_id, worker_id, role, _jsonb(hello), instance_id, when, when),
            )
        )

    async def worker_seen(
        self,
        agent_id: uuid.UUID,
        worker_id: str,
        *,
        at: float,
        status: dict[str, Any] | None = None,
        health: dict[str, Any] | None = None,
    ) -> None:
        await self._run(
            lambda conn: conn.execute(
                "UPDATE workers SET last_seen = %s, status = COALESCE(%s, status),"
                " health = COALESCE(%s, health) WHERE agent_id = %s AND worker_id = %s",
                (
                    _ts(at),
                    None if status is None else _jsonb(status),
                    None if health is None else _jsonb(health),
                    agent_id,
                    worker_id,
                ),
            )
        )

    async def worker_registry(
        self,
        agent_id: uuid.UUID,
        worker_id: str,
        *,
        engine: str,
        added: list[dict[str, Any]],
        removed: list[str],
        updated: list[dict[str, Any]],
    ) -> None:
        await self._run(
            lambda conn: update_registry(
                PG, conn, (agent_id, worker_id), engine, added, removed, updated
            )
        )

    async def worker_disconnected(self, agent_id: uuid.UUID, worker_id: str, *, at: float) -> None:
        await self._run(
            lambda conn: conn.execute(
                "UPDATE workers SET disconnected_at = %s WHERE agent_id = %s AND worker_id = %s",
                (_ts(at), agent_id, worker_id),
            )
        )

    async def audit(
        self, action: str, subject: str, details: dict[str, Any], *, actor: str | None = None
    ) -> None:
        await self._run(_insert_audit, actor, action, subject, details)

    # -- commands ------------------------------------------------------------------------

    async def create_command(self, command: CommandRecord) -> None:
        check_command_state(command.state)
        await self._run(lambda conn: insert_command(PG, conn, command, _insert_audit))

    async def get_command(self, command_id: uuid.UUID) -> CommandRecord | None:
        row = await self._run(
            lambda conn: conn.execute(
                f"SELECT {COMMAND_COLUMNS} FROM commands WHERE id = %s", (command_id,)
            ).fetchone()
        )
        return None if row is None else _rows.command(PG, row)

    async def open_commands(self, agent_id: uuid.UUID | None = None) -> list[CommandRecord]:
        where = Where(PG).add("state IN ('pending', 'dispatched')")
        if agent_id is not None:
            where.add("agent_id = ?", agent_id)
        sql = f"SELECT {COMMAND_COLUMNS} FROM commands{where} ORDER BY created_at, id"
        rows = await self._run(lambda conn: conn.execute(sql, where.params).fetchall())
        return [_rows.command(PG, row) for row in rows]

    async def list_commands(
        self,
        *,
        agent_id: uuid.UUID | None = None,
        state: str | None = None,
        before: tuple[float, uuid.UUID] | None = None,
        limit: int = 100,
        projects: frozenset[uuid.UUID] | None = None,
    ) -> list[CommandRecord]:
        where = commands_where(PG, agent_id=agent_id, state=state, before=before, projects=projects)
        sql = (
            f"SELECT {COMMAND_COLUMNS} FROM commands{where}"
            " ORDER BY created_at DESC, id DESC LIMIT %s"
        )
        rows = await self._read(lambda conn: conn.execute(sql, (*where.params, limit)).fetchall())
        return [_rows.command(PG, row) for row in rows]

    async def transition_command(
        self,
        command_id: uuid.UUID,
        *,
        from_states: Collection[str],
        to_state: str,
        at: float,
        actor: str | None = None,
        worker_id: str | None = None,
        delivery_claim_token: str | None = None,
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> CommandRecord | None:
        check_command_state(to_state)
        record: CommandRecord | None = await self._run(
            lambda conn: transition_command(
                PG,
                conn,
                _insert_audit,
                command_id,
                from_states=from_states,
                to_state=to_state,
                at=at,
                actor=actor,
                worker_id=worker_id,
                delivery_claim_token=delivery_claim_token,
                result=result,
                error=error,
            )
        )
        return record

    async def overdue_commands(self, *, now: float) -> list[CommandRecord]:
        rows = await self._run(
            lambda conn: conn.execute(
                f"SELECT {COMMAND_COLUMNS} FROM commands WHERE state IN ('pending', 'dispatched')"
                " AND created_at + timeout_seconds * interval '1 second' < %s"
                " ORDER BY created_at, id",
                (_ts(now),),
            ).fetchall()
        )
        return [_rows.command(PG, row) for row in rows]

    # -- read models for the API -------------------------------------------------------

    async def list_instances(self) -> list[InstanceInfo]:
        rows = await self._read(
            lambda conn: conn.execute(
                f"SELECT {INSTANCE_COLUMNS} FROM instances ORDER BY last_seen DESC"
            ).fetchall()
        )
        return [_rows.instance(PG, row) for row in rows]

    async def list_workers(
        self, agent_id: uuid.UUID | None = None, *, agent_ids: frozenset[uuid.UUID] | None = None
    ) -> list[WorkerInfo]:
        where = Where(PG).one_of("agent_id", agent_ids)
        if agent_id is not None:
            where.add("agent_id = ?", agent_id)
        sql = f"SELECT {WORKER_COLUMNS} FROM workers{where} ORDER BY agent_id, worker_id"
        rows = await self._read(lambda conn: conn.execute(sql, where.params).fetchall())
        return [_rows.worker(PG, row) for row in rows]

    async def _forget(self, delete: _Delete, before: float) -> int:
        """``delete`` (retention SQL both stores share) until nothing is left
        before ``before``, in chunks: each a short transaction; how many went."""
        forgotten = 0
        while True:
            n: int = await self._run(lambda conn: delete(PG, conn, before, _FORGET_CHUNK))
            forgotten += n
            if n < _FORGET_CHUNK:
                return forgotten

    async def forget_workers(self, *, before: float) -> int:
        return await self._forget(workers.forget_workers_before, before)

    async def connected_counts(self) -> tuple[int, int]:
        counts: tuple[int, int] = await self._read(workers.connected_counts)
        return counts

    async def worker_registries(
        self,
        *,
        agent_id: uuid.UUID | None = None,
        after: tuple[uuid.UUID, str] | None = None,
        limit: int = 100,
        projects: frozenset[uuid.UUID] | None = None,
    ) -> list[WorkerRegistry]:
        result: list[WorkerRegistry] = await self._read(
            lambda conn: read_worker_registries(PG, conn, agent_id, after, limit, projects)
        )
        return result

    async def search_events(self, query: EventFilter) -> EventPage:
        result: EventPage = await self._read(lambda conn: event_search.search_page(PG, conn, query))
        return result

    async def export_events(self, query: EventFilter, fmt: ExportFormat) -> ExportPage:
        result: ExportPage = await self._read(
            lambda conn: event_export.postgres_page(PG, conn, query, fmt)
        )
        return result

    async def event_histogram(
        self, query: EventFilter, *, start: float, bucket_seconds: float, buckets: int
    ) -> EventHistogram:
        result: EventHistogram = await self._read(
            lambda conn: event_search.event_histogram(
                PG, conn, query, start=start, bucket_seconds=bucket_seconds, buckets=buckets
            )
        )
        return result

    async def list_tasks(self, query: TaskFilter) -> list[TaskRecord]:
        result: list[TaskRecord] = await self._read(lambda conn: tasks.list_tasks(PG, conn, query))
        return result

    async def forget_tasks(self, *, before: float) -> int:
        return await self._forget(task_writes.delete_tasks_before, before)

    async def count_tasks(self, query: TaskFilter) -> TaskCounts:
        result: TaskCounts = await self._read(lambda conn: tasks.count_by_state(PG, conn, query))
        return result

    async def get_tasks(
        self, engine: str, task_id: str, project_id: uuid.UUID | None = None
    ) -> list[TaskRecord]:
        result: list[TaskRecord] = await self._read(
            lambda conn: tasks.get_tasks(PG, conn, engine, task_id, project_id)
        )
        return result

    async def task_outcomes(
        self,
        *,
        since: float,
        by: Literal["queue", "name"] = "queue",
        projects: frozenset[uuid.UUID] | None = None,
    ) -> list[tuple[str, str | None, str, int]]:
        result: list[tuple[str, str | None, str, int]] = await self._read(
            lambda conn: tasks.task_outcomes(PG, conn, since, by, projects)
        )
        return result

    async def recent_runtimes(
        self, *, since: float, limit: int, projects: frozenset[uuid.UUID] | None = None
    ) -> list[tuple[str, str | None, float]]:
        result: list[tuple[str, str | None, float]] = await self._read(
            lambda conn: tasks.recent_runtimes(PG, conn, since, limit, projects)
        )
        return result

    async def stuck_counts(self, *, before: float) -> dict[str, int]:
        result: dict[str, int] = await self._run(lambda conn: tasks.stuck_counts(PG, conn, before))
        return result

    async def fold_task_events(self, events: Sequence[TaskEvent]) -> None:
        finished: list[TaskSummary] = await self._run(
            lambda conn: task_writes.write_tasks(PG, conn, events, self._task_cache)
        )
        if finished and self._on_tasks is not None:
            self._on_tasks(finished)

    async def engine_workers(
        self,
        *,
        since: float,
        engine: str | None = None,
        worker: str | None = None,
        projects: frozenset[uuid.UUID] | None = None,
    ) -> list[EngineWorker]:
        result: list[EngineWorker] = await self._read(
            lambda conn: tasks.engine_workers(PG, conn, since, engine, worker, projects)
        )
        return result

    async def commands_for_task(
        self, project_id: uuid.UUID, engine: str, task_id: str
    ) -> list[CommandRecord]:
        result: list[CommandRecord] = await self._read(
            lambda conn: tasks.commands_for_task(PG, conn, project_id, engine, task_id)
        )
        return result

    async def list_schedules(self, query: ScheduleFilter) -> list[ScheduleRecord]:
        result: list[ScheduleRecord] = await self._read(
            lambda conn: schedules.list_schedules(PG, conn, query)
        )
        return result

    async def get_schedules(
        self, scheduler: str, source_key: str, project_id: uuid.UUID | None = None
    ) -> list[ScheduleRecord]:
        result: list[ScheduleRecord] = await self._read(
            lambda conn: schedules.get_schedules(PG, conn, scheduler, source_key, project_id)
        )
        return result

    async def schedule_streams(self) -> list[ScheduleStream]:
        result: list[ScheduleStream] = await self._read(lambda conn: schedules.streams(PG, conn))
        return result

    async def grant_schedule_stream(
        self,
        project_id: uuid.UUID,
        scheduler: str,
        *,
        agent_id: uuid.UUID,
        worker_id: str,
        worker_connected_at: float,
        expected_epoch: int,
        at: float,
    ) -> ScheduleStream | None:
        result: ScheduleStream | None = await self._run(
            lambda conn: schedules.grant_stream(
                PG,
                conn,
                project_id,
                scheduler,
                agent_id=agent_id,
                worker_id=worker_id,
                worker_connected_at=worker_connected_at,
                expected_epoch=expected_epoch,
                at=at,
            )
        )
        return result

    async def schedule_stream_command(
        self, project_id: uuid.UUID, scheduler: str, epoch_number: int, command_id: uuid.UUID
    ) -> None:
        await self._run(
            lambda conn: schedules.stream_command(
                PG, conn, project_id, scheduler, epoch_number, command_id
            )
        )

    async def list_audit(
        self, *, before_id: int | None = None, limit: int = 50, query: AuditFilter | None = None
    ) -> list[AuditRecord]:
        where = audit_where(PG, query or AuditFilter(), before_id)
        sql = f"SELECT {AUDIT_COLUMNS} FROM audit_events{where} ORDER BY id DESC LIMIT %s"
        rows = await self._read(lambda conn: conn.execute(sql, (*where.params, limit)).fetchall())
        return [_rows.audit(PG, row) for row in rows]

    # -- API credentials ---------------------------------------------------------------

    async def add_api_token(self, token_hash: bytes, name: str) -> None:
        await self._run(
            lambda conn: conn.execute(
                "INSERT INTO api_tokens (token_hash, name) VALUES (%s, %s)", (token_hash, name)
            )
        )

    async def add_first_api_token(self, token_hash: bytes, name: str) -> bool:
        added: bool = await self._run(_add_first_api_token, token_hash, name)
        return added

    async def api_token_known(self, token_hash: bytes) -> bool:
        row = await self._run(
            lambda conn: conn.execute(
                "SELECT 1 FROM api_tokens WHERE token_hash = %s", (token_hash,)
            ).fetchone()
        )
        return row is not None

    async def list_api_tokens(self) -> list[ApiToken]:
        rows = await self._run(
            lambda conn: conn.execute(
                f"SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY created_at, token_hash"
            ).fetchall()
        )
        return [_rows.api_token(PG, row) for row in rows]

    async def api_token_used(self, token_hash: bytes, *, now: float) -> None:
        await self._run(
            lambda conn: conn.execute(
                "UPDATE api_tokens SET last_used_at = %s WHERE token_hash = %s",
                (_ts(now), token_hash),
            )
        )

    async def revoke_api_token(self, token_hash: bytes) -> bool:
        def revoke(conn: psycopg.Connection[Any]) -> bool:
            conn.execute("DELETE FROM api_sessions WHERE token_hash = %s", (token_hash,))
            cur = conn.execute("DELETE FROM api_tokens WHERE token_hash = %s", (token_hash,))
            return cur.rowcount == 1

        revoked: bool = await self._run(revoke)
        return revoked

    async def add_api_session(
        self, session_hash: bytes, *, token_hash: bytes, expires_at: float
    ) -> None:
        await self._run(
            lambda conn: conn.execute(
                "INSERT INTO api_sessions (session_hash, token_hash, expires_at)"
                " VALUES (%s, %s, %s)",
                (session_hash, token_hash, _ts(expires_at)),
            )
        )

    async def api_session_token(
        self, session_hash: bytes, *, now: float, idle_seconds: float | None = None
    ) -> bytes | None:
        # The join ends a session with its token, on the next request.
        row = await self._run(
            lambda conn: conn.execute(
                "SELECT s.expires_at, t.token_hash, s.last_seen_at FROM api_sessions s"
                " LEFT JOIN api_tokens t ON t.token_hash = s.token_hash"
                " WHERE s.session_hash = %s",
                (session_hash,),
            ).fetchone()
        )
        idle = bool(
            row is not None
            and idle_seconds is not None
            and row[2] is not None
            and row[2].timestamp() + idle_seconds <= now
        )
        if row is not None and row[0].timestamp() > now and row[1] is not None and not idle:
            return bytes(row[1])
        if row is not None:
            await self.drop_api_session(session_hash)
        return None

    async def touch_api_session(self, session_hash: bytes, *, now: float) -> None:
        await self._run(
            lambda conn: conn.execute(
                "UPDATE api_sessions SET last_seen_at = %s WHERE session_hash = %s",
                (_ts(now), session_hash),
            )
        )

    async def drop_api_session(self, session_hash: bytes) -> None:
        await self._run(
            lambda conn: conn.execute(
                "DELETE FROM api_sessions WHERE session_hash = %s", (session_hash,)
            )
        )

    async def drop_api_token_sessions(self, token_hash: bytes) -> int:
        count: int = await self._run(
            lambda conn: (
                conn.execute(
                    "DELETE FROM api_sessions WHERE token_hash = %s", (token_hash,)
                ).rowcount
            )
        )
        return count

    # -- accounts (store/accounts.py) -----------------------------------------------------

    async def count_users(self) -> int:
        count: int = await self._run(lambda conn: accounts.user_count(PG, conn))
        return count

    async def create_user(
        self, user: User, password_hash: str, *, only_if_first: bool = False
    ) -> bool:
        def create(conn: psycopg.Connection[Any]) -> bool:
            if only_if_first:
                # Under READ COMMITTED two "no user yet" checks can both pass.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (FIRST_USER_LOCK_KEY,))
            return accounts.create_user(PG, conn, user, password_hash, only_if_first=only_if_first)

        try:
            created: bool = await self._run(create)
        except psycopg.errors.UniqueViolation as exc:
            raise DirectoryConflict(f"a user named {user.name!r} exists already") from exc
        return created

    async def list_users(self) -> list[User]:
        users: list[User] = await self._run(lambda conn: accounts.list_users(PG, conn))
        return users

    async def find_user(self, ref: str) -> User | None:
        user: User | None = await self._run(lambda conn: accounts.find_user(PG, conn, ref))
        return user

    async def user_password(self, name: str) -> tuple[User, str] | None:
        found: tuple[User, str] | None = await self._run(
            lambda conn: accounts.password_of(PG, conn, name)
        )
        return found

    async def update_user(
        self,
        user_id: uuid.UUID,
        *,
        disabled: bool | None = None,
        password_hash: str | None = None,
        role: str | None = None,
        projects: tuple[uuid.UUID, ...] | bool | None = False,
    ) -> User | None:
        user: User | None = await self._run(
            lambda conn: accounts.update_user(
                PG,
                conn,
                user_id,
                time.time(),
                disabled=disabled,
                password_hash=password_hash,
                role=role,
                projects=projects,
            )
        )
        return user

    async def add_user_token(self, token: UserToken, token_hash: bytes) -> None:
        await self._run(lambda conn: accounts.add_token(PG, conn, token, token_hash))

    async def user_token_owner(
        self, token_hash: bytes, *, now: float
    ) -> tuple[UserToken, User] | None:
        found: tuple[UserToken, User] | None = await self._run(
            lambda conn: accounts.token_owner(PG, conn, token_hash, now)
        )
        return found

    async def user_token_used(self, token_hash: bytes, *, now: float) -> None:
        await self._run(lambda conn: accounts.token_used(PG, conn, token_hash, now))

    async def list_user_tokens(self, user_id: uuid.UUID | None = None) -> list[UserToken]:
        tokens: list[UserToken] = await self._run(
            lambda conn: accounts.list_tokens(PG, conn, user_id)
        )
        return tokens

    async def revoke_user_token(
        self, token_id: uuid.UUID, *, user_id: uuid.UUID | None = None, now: float
    ) -> UserToken | None:
        token: UserToken | None = await self._run(
            lambda conn: accounts.revoke_token(PG, conn, token_id, user_id, now)
        )
        return token

    async def add_user_session(
        self,
        session_hash: bytes,
        *,
        user_id: uuid.UUID,
        token_id: uuid.UUID | None,
        now: float,
        expires_at: float,
    ) -> None:
        await self._run(
            lambda conn: accounts.add_session(
                PG,
                conn,
                session_hash,
                user_id=user_id,
                token_id=token_id,
                now=now,
                expires_at=expires_at,
            )
        )

    async def user_session(
        self, session_hash: bytes, *, now: float, idle_seconds: float
    ) -> UserSession | None:
        session: UserSession | None = await self._run(
            lambda conn: accounts.session_of(PG, conn, session_hash, now, idle_seconds)
        )
        return session

    async def touch_user_session(self, session_hash: bytes, *, now: float) -> None:
        await self._run(lambda conn: accounts.touch_session(PG, conn, session_hash, now))

    async def drop_user_session(self, session_hash: bytes) -> None:
        await self._run(lambda conn: accounts.drop_session(PG, conn, session_hash))

    async def drop_user_sessions(self, user_id: uuid.UUID) -> int:
        count: int = await self._run(lambda conn: accounts.drop_sessions(PG, conn, user_id))
        return count

    # -- federation tokens (store/federation.py) --------------------------------------

    async def add_federation_token(self, token: FederationToken) -> None:
        await self._run(lambda conn: federation.add_token(PG, conn, token))

    async def federation_token(self, token_hash: bytes, *, now: float) -> FederationToken | None:
        found: FederationToken | None = await self._run(
            lambda conn: federation.live_token(PG, conn, token_hash, now)
        )
        return found

    async def federation_token_used(self, token_hash: bytes, *, now: float) -> None:
        await self._run(lambda conn: federation.token_used(PG, conn, token_hash, now))

    async def list_federation_tokens(self) -> list[FederationToken]:
        tokens: list[FederationToken] = await self._run(
            lambda conn: federation.list_tokens(PG, conn)
        )
        return tokens

    async def revoke_federation_token(
        self, token_id: uuid.UUID, *, now: float
    ) -> FederationToken | None:
        revoked: FederationToken | None = await self._run(
            lambda conn: federation.revoke_token(PG, conn, token_id, now)
        )
        return revoked

    # -- OpAMP ---------------------------------------------------------------------------

    async def add_opamp_token(self, project_id: uuid.UUID, token_hash: bytes, name: str) -> None:
        await self._run(
            lambda conn: opamp.add_token(PG, conn, project_id, token_hash, name, time.time())
        )

    async def opamp_token_project(self, token_hash: bytes) -> uuid.UUID | None:
        result: uuid.UUID | None = await self._run(
            lambda conn: opamp.token_project(PG, conn, token_hash)
        )
        return result

    async def list_opamp_tokens(self) -> list[OpampToken]:
        result: list[OpampToken] = await self._run(lambda conn: opamp.list_tokens(PG, conn))
        return result

    async def revoke_opamp_token(self, token_hash: bytes) -> bool:
        result: bool = await self._run(lambda conn: opamp.revoke_token(PG, conn, token_hash))
        return result

    async def touch_opamp_agents(self, touches: list[tuple[uuid.UUID, bytes, int, float]]) -> None:
        await self._run(lambda conn: opamp.touch_agents(PG, conn, touches))

    async def list_opamp_agents(
        self, project_id: uuid.UUID | None = None, instance_uid: bytes | None = None
    ) -> list[OpampAgent]:
        result: list[OpampAgent] = await self._read(
            lambda conn: opamp.list_agents(PG, conn, project_id, instance_uid)
        )
        return result

    async def list_opamp_history(
        self,
        project_id: uuid.UUID,
        instance_uid: bytes,
        *,
        before_id: int | None = None,
        limit: int = 50,
    ) -> list[OpampHistoryEntry]:
        result: list[OpampHistoryEntry] = await self._read(
            lambda conn: opamp_history.list_history(
                PG, conn, project_id, instance_uid, before_id=before_id, limit=limit
            )
        )
        return result

    async def forget_opamp_history(self, *, before: float) -> int:
        return await self._forget(opamp_history.forget_history_before, before)

    async def load_opamp_agent(
        self, project_id: uuid.UUID, instance_uid: bytes
    ) -> tuple[OpampAgent | None, OpampConfig | None]:
        result: tuple[OpampAgent | None, OpampConfig | None] = await self._run(
            lambda conn: opamp.load_agent(PG, conn, project_id, instance_uid)
        )
        return result

    async def get_opamp_config(
        self, project_id: uuid.UUID, instance_uid: bytes
    ) -> OpampConfig | None:
        result: OpampConfig | None = await self._run(
            lambda conn: opamp.get_config(PG, conn, project_id, instance_uid)
        )
        return result

    async def list_opamp_configs(self, project_id: uuid.UUID | None = None) -> list[OpampConfig]:
        result: list[OpampConfig] = await self._read(
            lambda conn: opamp.list_configs(PG, conn, project_id)
        )
        return result

    async def put_opamp_config(self, config: OpampConfig, *, actor: str | None) -> None:
        await self._run(lambda conn: opamp.put_config(PG, conn, config, actor, _insert_audit))

    async def delete_opamp_config(
        self, project_id: uuid.UUID, instance_uid: bytes, *, actor: str | None
    ) -> bool:
        result: bool = await self._run(
            lambda conn: opamp.delete_config(
                PG, conn, project_id, instance_uid, actor, _insert_audit
            )
        )
        return result

    async def get_opamp_configs(
        self, project_id: uuid.UUID, instance_uids: list[bytes]
    ) -> dict[bytes, OpampConfig]:
        result: dict[bytes, OpampConfig] = await self._run(
            lambda conn: opamp.get_configs(PG, conn, project_id, instance_uids)
        )
        return result

    async def data_version(self) -> int | None:
        return None  # replicas share it by design: nothing keeps rows it could make stale

    async def write_opamp_states(self, writes: list[opamp.StateWrite]) -> int:
        moved: int = await self._run(
            lambda conn: opamp.write_states(PG, conn, writes, _insert_audit)
        )
        return moved

    async def create_opamp_rollout(
        self,
        rollout_id: uuid.UUID,
        *,
        project_id: uuid.UUID,
        selector: dict[str, str],
        files: dict[str, Any],
        config_hash: str,
        canary_percent: int,
        batch_size: int,
        failure_threshold_percent: int,
        actor: str | None,
        now: float,
    ) -> OpampRollout:
        def create(conn: Any) -> OpampRollout:
            return opamp_rollouts.create_rollout(
                PG,
                conn,
                rollout_id,
                project_id=project_id,
                selector=selector,
                files=files,
                config_hash=config_hash,
                canary_percent=canary_percent,
                batch_size=batch_size,
                failure_threshold_percent=failure_threshold_percent,
                actor=actor,
                now=now,
                audit=_insert_audit,
            )

        result: OpampRollout = await self._run(lambda conn: create(conn))
        return result

    async def get_opamp_rollout(self, rollout_id: uuid.UUID) -> OpampRollout | None:
        result: OpampRollout | None = await self._run(
            lambda conn: opamp_rollouts.get_rollout(PG, conn, rollout_id)
        )
        return result

    async def list_opamp_rollouts(
        self, project_id: uuid.UUID | None = None, *, state: str | None = None
    ) -> list[OpampRollout]:
        result: list[OpampRollout] = await self._read(
            lambda conn: opamp_rollouts.list_rollouts(PG, conn, project_id, state)
        )
        return result

    async def assign_opamp_rollout_stage(
        self, rollout_id: uuid.UUID, *, stage: int, end: int, now: float
    ) -> list[bytes] | None:
        result: list[bytes] | None = await self._run(
            lambda conn: opamp_rollouts.assign_stage(
                PG, conn, rollout_id, stage, end, now, _insert_audit
            )
        )
        return result

    async def transition_opamp_rollout(
        self,
        rollout_id: uuid.UUID,
        *,
        to_state: str,
        reason: str | None = None,
        actor: str | None,
        now: float,
    ) -> OpampRollout:
        result: OpampRollout = await self._run(
            lambda conn: opamp_rollouts.transition(
                PG, conn, rollout_id, to_state, reason, actor, now, _insert_audit
            )
        )
        return result

    async def opamp_gauges(self) -> tuple[dict[str, int], dict[str, int]]:
        result: tuple[dict[str, int], dict[str, int]] = await self._run(
            lambda conn: opamp_rollouts.gauges(PG, conn)
        )
        return result


def _applied_migrations(conn: psycopg.Connection[Any]) -> list[int]:
    row = conn.execute("SELECT to_regclass('schema_version')").fetchone()
    if row is None or row[0] is None:
        return []
    return [v for (v,) in conn.execute("SELECT version FROM schema_version ORDER BY version")]


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


def _add_first_api_token(conn: psycopg.Connection[Any], token_hash: bytes, name: str) -> bool:
    # Under READ COMMITTED two NOT EXISTS checks can both pass: serialise them.
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (FIRST_TOKEN_LOCK_KEY,))
    cur = conn.execute(
        "INSERT INTO api_tokens (token_hash, name) SELECT %s, %s"
        " WHERE NOT EXISTS (SELECT 1 FROM api_tokens)",
        (token_hash, name),
    )
    return cur.rowcount == 1


def _event_days(buffer_id: uuid.UUID, rows: Sequence[ClaimedRow]) -> set[date]:
    return {event.received_at.date() for event in event_rows(buffer_id, rows)}


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
    conn.execute("DELETE FROM agent_event_keys WHERE received_at < %s", (cutoff,))
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


# -- the agent directory ---------------------------------------------------------------


def _ts(at: float) -> datetime:
    return datetime.fromtimestamp(at, UTC)


def _jsonb(obj: dict[str, Any]) -> Jsonb:
    """A JSON object for a jsonb parameter, serialised by orjson as on SQLite."""
    return Jsonb(obj, dumps=orjson.dumps)


def _same(value: Any) -> Any:
    return value


# psycopg adapts uuid, timestamptz and jsonb itself: only times and JSON need help.
PG = Dialect(
    param="%s",
    lock=" FOR UPDATE",
    ts_in=_ts,
    ts_out=datetime.timestamp,
    uuid_in=_same,
    uuid_out=_same,
    json_in=_jsonb,
    json_out=_same,
    key_hex=lambda key: key.hex,
    json_text=lambda column, path: f"{column} #>> '{{{path.replace('.', ',')}}}'",
)


def _insert_agent(
    conn: psycopg.Connection[Any],
    project_id: uuid.UUID,
    agent_id: uuid.UUID,
    name: str,
    token_hash: bytes,
) -> float:
    """Insert the agent and its token; when it was created (the database's clock)."""
    row = conn.execute("SELECT archived_at FROM projects WHERE id = %s", (project_id,)).fetchone()
    if row is None:
        raise LookupError(f"no project with id {project_id}")
    if row[0] is not None:
        raise LookupError(f"project {project_id} is archived")
    created = conn.execute(
        "INSERT INTO agents (id, project_id, name) VALUES (%s, %s, %s) RETURNING created_at",
        (agent_id, project_id, name),
    ).fetchone()
    conn.execute(
        "INSERT INTO agent_tokens (token_hash, agent_id) VALUES (%s, %s)", (token_hash, agent_id)
    )
    assert created is not None
    return PG.ts_out(created[0])


def _insert_audit(
    conn: psycopg.Connection[Any],
    actor: str | None,
    action: str,
    subject: str,
    details: dict[str, Any],
) -> None:
    conn.execute(
        "INSERT INTO audit_events (actor, action, subject, details) VALUES (%s, %s, %s, %s)",
        (actor, action, subject, _jsonb(details)),
    )


# -- commands ----------------------------------------------------------------------------


def _ignore(operation: str, seconds: float) -> None:
    pass
