"""The embedded default store: one SQLite file in the data directory.

Same logical schema as Postgres, without partitions. It serves one process
(the registry is forced to ``local`` on SQLite), so one connection behind a
capacity limiter of one is enough, and every call runs on a worker thread.

One concern justifies the length (past 700 lines): the SQLite side of the
`Store` protocol, one thin method per protocol method; the SQL it shares
with Postgres lives in `_rows`, `_filters`, `_transactions`, `leases`,
`tasks` and `schedules`.
"""

from __future__ import annotations

import logging
import sqlite3
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import orjson
import trio

from .._datadir import private_file
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
from .migrations import MIGRATIONS

__all__ = ["SqliteStore"]

log = logging.getLogger("z4j.store.sqlite")
_FORGET_CHUNK = 10_000  # rows deleted per retention transaction
# A retention delete: (dialect, connection, before, at most) -> rows deleted.
_Delete = Callable[[Dialect, Any, float, int], int]
T = TypeVar("T")


class SqliteStore:
    kind: Literal["sqlite"] = "sqlite"
    pool: None = None  # one connection, on a worker thread
    read_replica: None = None  # refused by the configuration (Z4J_DATABASE_READ_URL)

    def __init__(
        self,
        path: Path,
        *,
        observe_query: Callable[[str, float], None] | None = None,
        project_tasks: bool = True,
        on_tasks: Callable[[Sequence[TaskSummary]], None] | None = None,
        on_frames_dropped: Callable[[Mapping[str, int]], None] | None = None,
    ) -> None:
        """``observe_query``: called with each store call's operation (the store
        method's name) and seconds (the query histogram).
        ``project_tasks``: keep the ``tasks`` table as events are written;
        ``on_tasks`` is then called with the tasks each write finished.
        ``on_frames_dropped``: called with the staged schedule frames each
        write or expiry dropped, by reason (store/schedule_frames.py)."""
        self.path = path
        self._project_tasks = project_tasks
        self._on_tasks = on_tasks
        self._on_frames_dropped = on_frames_dropped
        self._db: sqlite3.Connection | None = None
        self._limiter = trio.CapacityLimiter(1)
        self.observe_query = observe_query or _ignore

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the store's thread; its time goes to the query histogram
        under the calling store method's name (every store method calls this
        directly, so new methods are measured under their own names unasked)."""
        operation = sys._getframe(1).f_code.co_name

        def call() -> T:
            if self._db is None:
                private_file(self.path)  # 0600, and SQLite gives -wal/-shm the same mode
                db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.execute("PRAGMA busy_timeout=5000")
                self._db = db
            return fn(self._db, *args)

        started = time.perf_counter()
        try:
            return await trio.to_thread.run_sync(call, limiter=self._limiter)
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"sqlite store {self.path}: {exc}") from exc
        finally:
            self.observe_query(operation, time.perf_counter() - started)

    async def aclose(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(close, limiter=self._limiter)

    async def migrate(self) -> list[int]:
        return await self._run(_migrate)

    async def applied_migrations(self) -> list[int]:
        return await self._run(_applied_migrations)

    async def database_time(self) -> None:
        return None

    async def write_events(self, buffer_id: uuid.UUID, rows: Sequence[ClaimedRow]) -> int:
        try:
            inserted, finished, dropped = await self._run(
                _write_events, buffer_id, rows, self._project_tasks
            )
        except (
            sqlite3.DataError,
            sqlite3.IntegrityError,
            ValueError,
            orjson.JSONEncodeError,
        ) as exc:
            raise UnstorableRows(str(exc).strip()) from exc
        if finished and self._on_tasks is not None:
            self._on_tasks(finished)
        if dropped and self._on_frames_dropped is not None:
            self._on_frames_dropped(dropped)
        return inserted

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

    async def expire_schedule_frames(self, *, now: float) -> int:
        gone = await self._run(
            lambda db: _transaction(db, lambda: schedule_frames.expire_frames(SQ, db, now))
        )
        if gone and self._on_frames_dropped is not None:
            self._on_frames_dropped({"expired": gone})
        return gone

    # -- the agent directory -----------------------------------------------------------

    async def create_project(self, name: str) -> Project:
        project = Project(uuid.uuid4(), name)
        try:
            await self._run(
                _execute,
                "INSERT INTO projects (id, name, created_at) VALUES (?, ?, ?)",
                (str(project.id), name, time.time()),
            )
        except sqlite3.IntegrityError as exc:
            raise DirectoryConflict(f"a project named {name!r} exists already") from exc
        return project

    async def find_project(self, ref: str) -> Project | None:
        return await self._run(lambda db: find_project(SQ, db, ref))

    async def list_projects(self) -> list[Project]:
        rows = await self._run(
            _fetch_all, f"SELECT {PROJECT_COLUMNS} FROM projects ORDER BY name", ()
        )
        return [_rows.project(SQ, row) for row in rows]

    async def create_agent(self, project_id: uuid.UUID, name: str, token_hash: bytes) -> Agent:
        agent_id = uuid.uuid4()
        try:
            created_at = await self._run(_insert_agent, project_id, agent_id, name, token_hash)
        except sqlite3.IntegrityError as exc:
            raise DirectoryConflict(
                f"project {project_id} has an agent named {name!r} already"
            ) from exc
        return Agent(agent_id, project_id, name, revoked=False, created_at=created_at)

    async def agent_by_token(self, token_hash: bytes) -> Agent | None:
        rows = await self._run(
            _fetch_all,
            f"SELECT {AGENT_COLUMNS} FROM agent_tokens t JOIN agents a ON a.id = t.agent_id"
            " WHERE t.token_hash = ? AND a.revoked_at IS NULL"
            " AND (t.expires_at IS NULL OR t.expires_at > ?)",
            (token_hash, time.time()),
        )
        return _rows.agent(SQ, rows[0]) if rows else None

    async def find_agent(self, ref: str, project_id: uuid.UUID | None = None) -> Agent | None:
        return await self._run(lambda db: find_agent(SQ, db, ref, project_id))

    async def list_agents(self, project_id: uuid.UUID | None = None) -> list[Agent]:
        where = Where(SQ)
        if project_id is not None:
            where.add("a.project_id = ?", str(project_id))
        rows = await self._run(
            _fetch_all,
            f"SELECT {AGENT_COLUMNS} FROM agents a JOIN projects p ON p.id = a.project_id{where}"
            " ORDER BY p.name, a.name",
            tuple(where.params),
        )
        return [_rows.agent(SQ, row) for row in rows]

    async def agents_page(
        self, *, before: tuple[float, uuid.UUID] | None = None, limit: int = 100
    ) -> list[Agent]:
        where = agents_where(SQ, before)
        rows = await self._run(
            _fetch_all,
            f"SELECT {AGENT_COLUMNS} FROM agents a{where}"
            " ORDER BY a.created_at DESC, a.id DESC LIMIT ?",
            (*where.params, limit),
        )
        return [_rows.agent(SQ, row) for row in rows]

    async def revoke_agent(self, agent_id: uuid.UUID) -> bool:
        count = await self._run(
            _execute,
            "UPDATE agents SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            (time.time(), str(agent_id)),
        )
        return count == 1

    # -- provisioning ------------------------------------------------------------------

    async def archive_project(self, project_id: uuid.UUID, *, now: float) -> list[Agent] | None:
        return await self._run(
            lambda db: _transaction(
                db, lambda: provisioning.archive_project(SQ, db, project_id, now)
            )
        )

    async def rotate_agent_token(
        self, agent_id: uuid.UUID, token_hash: bytes, *, now: float, grace_seconds: float
    ) -> float | None:
        return await self._run(
            lambda db: _transaction(
                db,
                lambda: provisioning.rotate_agent_token(
                    SQ, db, agent_id, token_hash, now, grace_seconds
                ),
            )
        )

    async def rotate_project_secret(
        self, project_id: uuid.UUID, *, now: float, grace_seconds: float
    ) -> Project | None:
        return await self._run(
            lambda db: _transaction(
                db,
                lambda: provisioning.rotate_project_secret(SQ, db, project_id, now, grace_seconds),
            )
        )

    async def agent_login(self, token_hash: bytes) -> AgentLogin | None:
        return await self._run(lambda db: provisioning.agent_login(SQ, db, token_hash))

    async def credential_deadlines(self) -> CredentialDeadlines:
        return await self._run(lambda db: provisioning.credential_deadlines(SQ, db))

    async def token_graces(self, *, now: float) -> dict[uuid.UUID, float]:
        return await self._run(lambda db: provisioning.token_graces(SQ, db, now))

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
        await self._run(
            _execute,
            "INSERT INTO workers (agent_id, worker_id, role, hello, instance_id,"
            " connected_at, last_seen, disconnected_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, NULL)"
            " ON CONFLICT (agent_id, worker_id) DO UPDATE SET role = excluded.role,"
            " hello = excluded.hello, instance_id = excluded.instance_id,"
            " connected_at = excluded.connected_at, last_seen = excluded.last_seen,"
            " disconnected_at = NULL",
            (str(agent_id), worker_id, role, _json(hello), str(instance_id), at, at),
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
            _execute,
            "UPDATE workers SET last_seen = ?, status = COALESCE(?, status),"
            " health = COALESCE(?, health) WHERE agent_id = ? AND worker_id = ?",
            (
                at,
                None if status is None else _json(status),
                None if health is None else _json(health),
                str(agent_id),
                worker_id,
            ),
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
        key = (agent_id, worker_id)
        await self._run(
            lambda db: _transaction(
                db, lambda: update_registry(SQ, db, key, engine, added, removed, updated)
            )
        )

    async def worker_disconnected(self, agent_id: uuid.UUID, worker_id: str, *, at: float) -> None:
        await self._run(
            _execute,
            "UPDATE workers SET disconnected_at = ? WHERE agent_id = ? AND worker_id = ?",
            (at, str(agent_id), worker_id),
        )

    async def audit(
        self, action: str, subject: str, details: dict[str, Any], *, actor: str | None = None
    ) -> None:
        await self._run(
            lambda db: _transaction(db, lambda: _insert_audit(db, actor, action, subject, details))
        )

    # -- commands ------------------------------------------------------------------------

    async def create_command(self, command: CommandRecord) -> None:
        check_command_state(command.state)
        await self._run(
            lambda db: _transaction(db, lambda: insert_command(SQ, db, command, _insert_audit))
        )

    async def get_command(self, command_id: uuid.UUID) -> CommandRecord | None:
        rows = await self._run(
            _fetch_all, f"SELECT {COMMAND_COLUMNS} FROM commands WHERE id = ?", (str(command_id),)
        )
        return _rows.command(SQ, rows[0]) if rows else None

    async def open_commands(self, agent_id: uuid.UUID | None = None) -> list[CommandRecord]:
        where = Where(SQ).add("state IN ('pending', 'dispatched')")
        if agent_id is not None:
            where.add("agent_id = ?", str(agent_id))
        rows = await self._run(
            _fetch_all,
            f"SELECT {COMMAND_COLUMNS} FROM commands{where} ORDER BY created_at, id",
            tuple(where.params),
        )
        return [_rows.command(SQ, row) for row in rows]

    async def list_commands(
        self,
        *,
        agent_id: uuid.UUID | None = None,
        state: str | None = None,
        before: tuple[float, uuid.UUID] | None = None,
        limit: int = 100,
        projects: frozenset[uuid.UUID] | None = None,
    ) -> list[CommandRecord]:
        where = commands_where(SQ, agent_id=agent_id, state=state, before=before, projects=projects)
        rows = await self._run(
            _fetch_all,
            f"SELECT {COMMAND_COLUMNS} FROM commands{where}"
            " ORDER BY created_at DESC, id DESC LIMIT ?",
            (*where.params, limit),
        )
        return [_rows.command(SQ, row) for row in rows]

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

        def change(db: sqlite3.Connection) -> CommandRecord | None:
            return transition_command(
                SQ,
                db,
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

        # BEGIN IMMEDIATE: the read and the write hold the write lock together.
        return await self._run(lambda db: _transaction(db, lambda: change(db)))

    async def overdue_commands(self, *, now: float) -> list[CommandRecord]:
        rows = await self._run(
            _fetch_all,
            f"SELECT {COMMAND_COLUMNS} FROM commands WHERE state IN ('pending', 'dispatched')"
            " AND created_at + timeout_seconds < ? ORDER BY created_at, id",
            (now,),
        )
        return [_rows.command(SQ, row) for row in rows]

    # -- read models for the API -------------------------------------------------------

    async def list_instances(self) -> list[InstanceInfo]:
        rows = await self._run(
            _fetch_all, f"SELECT {INSTANCE_COLUMNS} FROM instances ORDER BY last_seen DESC", ()
        )
        return [_rows.instance(SQ, row) for row in rows]

    async def list_workers(
        self, agent_id: uuid.UUID | None = None, *, agent_ids: frozenset[uuid.UUID] | None = None
    ) -> list[WorkerInfo]:
        where = Where(SQ).one_of("agent_id", agent_ids)
        if agent_id is not None:
            where.add("agent_id = ?", str(agent_id))
        rows = await self._run(
            _fetch_all,
            f"SELECT {WORKER_COLUMNS} FROM workers{where} ORDER BY agent_id, worker_id",
            tuple(where.params),
        )
        return [_rows.worker(SQ, row) for row in rows]

    async def _forget(self, delete: _Delete, before: float) -> int:
        """``delete`` (retention SQL both stores share) until nothing is left
        before ``before``, in chunks, so other writers get the lock in between;
        how many went."""
        forgotten = 0
        while True:
            n = await self._run(
                lambda db: _transaction(db, lambda: delete(SQ, db, before, _FORGET_CHUNK))
            )
            forgotten += n
            if n < _FORGET_CHUNK:
                return forgotten

    async def forget_workers(self, *, before: float) -> int:
        return await self._forget(workers.forget_workers_before, before)

    async def connected_counts(self) -> tuple[int, int]:
        counts: tuple[int, int] = await self._run(workers.connected_counts)
        return counts

    async def worker_registries(
        self,
        *,
        agent_id: uuid.UUID | None = None,
        after: tuple[uuid.UUID, str] | None = None,
        limit: int = 100,
        projects: frozenset[uuid.UUID] | None = None,
    ) -> list[WorkerRegistry]:
        result: list[WorkerRegistry] = await self._run(
            lambda db: read_worker_registries(SQ, db, agent_id, after, limit, projects)
        )
        return result

    async def search_events(self, query: EventFilter) -> EventPage:
        return await self._run(lambda db: event_search.search_page(SQ, db, query))

    async def export_events(self, query: EventFilter, fmt: ExportFormat) -> ExportPage:
        return await self._run(lambda db: event_export.sqlite_page(SQ, db, query, fmt))

    async def event_histogram(
        self, query: EventFilter, *, start: float, bucket_seconds: float, buckets: int
    ) -> EventHistogram:
        return await self._run(
            lambda db: event_search.event_histogram(
                SQ, db, query, start=start, bucket_seconds=bucket_seconds, buckets=buckets
            )
        )

    async def list_tasks(self, query: TaskFilter) -> list[TaskRecord]:
        return await self._run(lambda db: tasks.list_tasks(SQ, db, query))

    async def forget_tasks(self, *, before: float) -> int:
        return await self._forget(task_writes.delete_tasks_before, before)

    async def count_tasks(self, query: TaskFilter) -> TaskCounts:
        return await self._run(lambda db: tasks.count_by_state(SQ, db, query))

    async def get_tasks(
        self, engine: str, task_id: str, project_id: uuid.UUID | None = None
    ) -> list[TaskRecord]:
        return await self._run(lambda db: tasks.get_tasks(SQ, db, engine, task_id, project_id))

    async def task_outcomes(
        self,
        *,
        since: float,
        by: Literal["queue", "name"] = "queue",
        projects: frozenset[uuid.UUID] | None = None,
    ) -> list[tuple[str, str | None, str, int]]:
        return await self._run(lambda db: tasks.task_outcomes(SQ, db, since, by, projects))

    async def recent_runtimes(
        self, *, since: float, limit: int, projects: frozenset[uuid.UUID] | None = None
    ) -> list[tuple[str, str | None, float]]:
        return await self._run(lambda db: tasks.recent_runtimes(SQ, db, since, limit, projects))

    async def stuck_counts(self, *, before: float) -> dict[str, int]:
        return await self._run(lambda db: tasks.stuck_counts(SQ, db, before))

    async def fold_task_events(self, events: Sequence[TaskEvent]) -> None:
        finished = await self._run(
            lambda db: _transaction(db, lambda: task_writes.write_tasks(SQ, db, events))
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
        return await self._run(
            lambda db: tasks.engine_workers(SQ, db, since, engine, worker, projects)
        )

    async def commands_for_task(
        self, project_id: uuid.UUID, engine: str, task_id: str
    ) -> list[CommandRecord]:
        return await self._run(
            lambda db: tasks.commands_for_task(SQ, db, project_id, engine, task_id)
        )

    async def list_schedules(self, query: ScheduleFilter) -> list[ScheduleRecord]:
        return await self._run(lambda db: schedules.list_schedules(SQ, db, query))

    async def get_schedules(
        self, scheduler: str, source_key: str, project_id: uuid.UUID | None = None
    ) -> list[ScheduleRecord]:
        return await self._run(
            lambda db: schedules.get_schedules(SQ, db, scheduler, source_key, project_id)
        )

    async def schedule_streams(self) -> list[ScheduleStream]:
        return await self._run(lambda db: schedules.streams(SQ, db))

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
        def grant(db: sqlite3.Connection) -> ScheduleStream | None:
            return _transaction(
                db,
                lambda: schedules.grant_stream(
                    SQ,
                    db,
                    project_id,
                    scheduler,
                    agent_id=agent_id,
                    worker_id=worker_id,
                    worker_connected_at=worker_connected_at,
                    expected_epoch=expected_epoch,
                    at=at,
                ),
            )

        return await self._run(grant)

    async def schedule_stream_command(
        self, project_id: uuid.UUID, scheduler: str, epoch_number: int, command_id: uuid.UUID
    ) -> None:
        await self._run(
            lambda db: schedules.stream_command(
                SQ, db, project_id, scheduler, epoch_number, command_id
            )
        )

    async def list_audit(
        self, *, before_id: int | None = None, limit: int = 50, query: AuditFilter | None = None
    ) -> list[AuditRecord]:
        where = audit_where(SQ, query or AuditFilter(), before_id)
        rows = await self._run(
            _fetch_all,
            f"SELECT {AUDIT_COLUMNS} FROM audit_events{where} ORDER BY id DESC LIMIT ?",
            (*where.params, limit),
        )
        return [_rows.audit(SQ, row) for row in rows]

    # -- API credentials ---------------------------------------------------------------

    async def add_api_token(self, token_hash: bytes, name: str) -> None:
        await self._run(
            _execute,
            "INSERT INTO api_tokens (token_hash, name, created_at) VALUES (?, ?, ?)",
            (token_hash, name, time.time()),
        )

    async def add_first_api_token(self, token_hash: bytes, name: str) -> bool:
        # One statement: SQLite runs one write at a time, across processes too.
        added = await self._run(
            _execute,
            "INSERT INTO api_tokens (token_hash, name, created_at) SELECT ?, ?, ?"
            " WHERE NOT EXISTS (SELECT 1 FROM api_tokens)",
            (token_hash, name, time.time()),
        )
        return added == 1

    async def api_token_known(self, token_hash: bytes) -> bool:
        rows = await self._run(
            _fetch_all, "SELECT 1 FROM api_tokens WHERE token_hash = ?", (token_hash,)
        )
        return bool(rows)

    async def list_api_tokens(self) -> list[ApiToken]:
        rows = await self._run(
            _fetch_all,
            f"SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY created_at, token_hash",
            (),
        )
        return [_rows.api_token(SQ, row) for row in rows]

    async def api_token_used(self, token_hash: bytes, *, now: float) -> None:
        await self._run(
            _execute,
            "UPDATE api_tokens SET last_used_at = ? WHERE token_hash = ?",
            (now, token_hash),
        )

    async def revoke_api_token(self, token_hash: bytes) -> bool:
        def revoke(db: sqlite3.Connection) -> bool:
            def run() -> bool:
                db.execute("DELETE FROM api_sessions WHERE token_hash = ?", (token_hash,))
                cur = db.execute("DELETE FROM api_tokens WHERE token_hash = ?", (token_hash,))
                return cur.rowcount == 1

            return _transaction(db, run)

        return await self._run(revoke)

    async def add_api_session(
        self, session_hash: bytes, *, token_hash: bytes, expires_at: float
    ) -> None:
        await self._run(
            _execute,
            "INSERT INTO api_sessions (session_hash, token_hash, created_at, expires_at)"
            " VALUES (?, ?, ?, ?)",
            (session_hash, token_hash, time.time(), expires_at),
        )

    async def api_session_token(
        self, session_hash: bytes, *, now: float, idle_seconds: float | None = None
    ) -> bytes | None:
        # The join ends a session with its token, on the next request.
        rows = await self._run(
            _fetch_all,
            "SELECT s.expires_at, t.token_hash, s.last_seen_at FROM api_sessions s"
            " LEFT JOIN api_tokens t ON t.token_hash = s.token_hash"
            " WHERE s.session_hash = ?",
            (session_hash,),
        )
        idle = bool(
            rows
            and idle_seconds is not None
            and rows[0][2] is not None
            and rows[0][2] + idle_seconds <= now
        )
        if rows and rows[0][0] > now and rows[0][1] is not None and not idle:
            return bytes(rows[0][1])
        if rows:
            await self.drop_api_session(session_hash)
        return None

    async def touch_api_session(self, session_hash: bytes, *, now: float) -> None:
        await self._run(
            _execute,
            "UPDATE api_sessions SET last_seen_at = ? WHERE session_hash = ?",
            (now, session_hash),
        )

    async def drop_api_session(self, session_hash: bytes) -> None:
        await self._run(
            _execute, "DELETE FROM api_sessions WHERE session_hash = ?", (session_hash,)
        )

    async def drop_api_token_sessions(self, token_hash: bytes) -> int:
        return await self._run(
            _execute, "DELETE FROM api_sessions WHERE token_hash = ?", (token_hash,)
        )

    # -- accounts (store/accounts.py) -----------------------------------------------------

    async def count_users(self) -> int:
        return await self._run(lambda db: accounts.user_count(SQ, db))

    async def create_user(
        self, user: User, password_hash: str, *, only_if_first: bool = False
    ) -> bool:
        return await self._run(
            lambda db: _transaction(
                db,
                lambda: accounts.create_user(
                    SQ, db, user, password_hash, only_if_first=only_if_first
                ),
            )
        )

    async def list_users(self) -> list[User]:
        return await self._run(lambda db: accounts.list_users(SQ, db))

    async def find_user(self, ref: str) -> User | None:
        return await self._run(lambda db: accounts.find_user(SQ, db, ref))

    async def user_password(self, name: str) -> tuple[User, str] | None:
        return await self._run(lambda db: accounts.password_of(SQ, db, name))

    async def update_user(
        self,
        user_id: uuid.UUID,
        *,
        disabled: bool | None = None,
        password_hash: str | None = None,
        role: str | None = None,
        projects: tuple[uuid.UUID, ...] | bool | None = False,
    ) -> User | None:
        return await self._run(
            lambda db: _transaction(
                db,
                lambda: accounts.update_user(
                    SQ,
                    db,
                    user_id,
                    time.time(),
                    disabled=disabled,
                    password_hash=password_hash,
                    role=role,
                    projects=projects,
                ),
            )
        )

    async def add_user_token(self, token: UserToken, token_hash: bytes) -> None:
        await self._run(
            lambda db: _transaction(db, lambda: accounts.add_token(SQ, db, token, token_hash))
        )

    async def user_token_owner(
        self, token_hash: bytes, *, now: float
    ) -> tuple[UserToken, User] | None:
        return await self._run(lambda db: accounts.token_owner(SQ, db, token_hash, now))

    async def user_token_used(self, token_hash: bytes, *, now: float) -> None:
        await self._run(
            lambda db: _transaction(db, lambda: accounts.token_used(SQ, db, token_hash, now))
        )

    async def list_user_tokens(self, user_id: uuid.UUID | None = None) -> list[UserToken]:
        return await self._run(lambda db: accounts.list_tokens(SQ, db, user_id))

    async def revoke_user_token(
        self, token_id: uuid.UUID, *, user_id: uuid.UUID | None = None, now: float
    ) -> UserToken | None:
        return await self._run(
            lambda db: _transaction(
                db, lambda: accounts.revoke_token(SQ, db, token_id, user_id, now)
            )
        )

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
            lambda db: _transaction(
                db,
                lambda: accounts.add_session(
                    SQ,
                    db,
                    session_hash,
                    user_id=user_id,
                    token_id=token_id,
                    now=now,
                    expires_at=expires_at,
                ),
            )
        )

    async def user_session(
        self, session_hash: bytes, *, now: float, idle_seconds: float
    ) -> UserSession | None:
        return await self._run(
            lambda db: _transaction(
                db, lambda: accounts.session_of(SQ, db, session_hash, now, idle_seconds)
            )
        )

    async def touch_user_session(self, session_hash: bytes, *, now: float) -> None:
        await self._run(
            lambda db: _transaction(db, lambda: accounts.touch_session(SQ, db, session_hash, now))
        )

    async def drop_user_session(self, session_hash: bytes) -> None:
        await self._run(
            lambda db: _transaction(db, lambda: accounts.drop_session(SQ, db, session_hash))
        )

    async def drop_user_sessions(self, user_id: uuid.UUID) -> int:
        return await self._run(
            lambda db: _transaction(db, lambda: accounts.drop_sessions(SQ, db, user_id))
        )

    # -- federation tokens (store/federation.py) --------------------------------------

    async def add_federation_token(self, token: FederationToken) -> None:
        await self._run(lambda db: _transaction(db, lambda: federation.add_token(SQ, db, token)))

    async def federation_token(self, token_hash: bytes, *, now: float) -> FederationToken | None:
        found: FederationToken | None = await self._run(
            lambda db: federation.live_token(SQ, db, token_hash, now)
        )
        return found

    async def federation_token_used(self, token_hash: bytes, *, now: float) -> None:
        await self._run(
            lambda db: _transaction(db, lambda: federation.token_used(SQ, db, token_hash, now))
        )

    async def list_federation_tokens(self) -> list[FederationToken]:
        tokens: list[FederationToken] = await self._run(lambda db: federation.list_tokens(SQ, db))
        return tokens

    async def revoke_federation_token(
        self, token_id: uuid.UUID, *, now: float
    ) -> FederationToken | None:
        revoked: FederationToken | None = await self._run(
            lambda db: _transaction(db, lambda: federation.revoke_token(SQ, db, token_id, now))
        )
        return revoked

    # -- OpAMP ---------------------------------------------------------------------------

    async def add_opamp_token(self, project_id: uuid.UUID, token_hash: bytes, name: str) -> None:
        await self._run(
            lambda db: _transaction(
                db, lambda: opamp.add_token(SQ, db, project_id, token_hash, name, time.time())
            )
        )

    async def opamp_token_project(self, token_hash: bytes) -> uuid.UUID | None:
        return await self._run(lambda db: opamp.token_project(SQ, db, token_hash))

    async def list_opamp_tokens(self) -> list[OpampToken]:
        return await self._run(lambda db: opamp.list_tokens(SQ, db))

    async def revoke_opamp_token(self, token_hash: bytes) -> bool:
        return await self._run(
            lambda db: _transaction(db, lambda: opamp.revoke_token(SQ, db, token_hash))
        )

    async def touch_opamp_agents(self, touches: list[tuple[uuid.UUID, bytes, int, float]]) -> None:
        await self._run(lambda db: _transaction(db, lambda: opamp.touch_agents(SQ, db, touches)))

    async def list_opamp_agents(
        self, project_id: uuid.UUID | None = None, instance_uid: bytes | None = None
    ) -> list[OpampAgent]:
        return await self._run(lambda db: opamp.list_agents(SQ, db, project_id, instance_uid))

    async def list_opamp_history(
        self,
        project_id: uuid.UUID,
        instance_uid: bytes,
        *,
        before_id: int | None = None,
        limit: int = 50,
    ) -> list[OpampHistoryEntry]:
        return await self._run(
            lambda db: opamp_history.list_history(
                SQ, db, project_id, instance_uid, before_id=before_id, limit=limit
            )
        )

    async def forget_opamp_history(self, *, before: float) -> int:
        return await self._forget(opamp_history.forget_history_before, before)

    async def load_opamp_agent(
        self, project_id: uuid.UUID, instance_uid: bytes
    ) -> tuple[OpampAgent | None, OpampConfig | None]:
        return await self._run(lambda db: opamp.load_agent(SQ, db, project_id, instance_uid))

    async def get_opamp_config(
        self, project_id: uuid.UUID, instance_uid: bytes
    ) -> OpampConfig | None:
        return await self._run(lambda db: opamp.get_config(SQ, db, project_id, instance_uid))

    async def list_opamp_configs(self, project_id: uuid.UUID | None = None) -> list[OpampConfig]:
        return await self._run(lambda db: opamp.list_configs(SQ, db, project_id))

    async def put_opamp_config(self, config: OpampConfig, *, actor: str | None) -> None:
        await self._run(
            lambda db: _transaction(
                db, lambda: opamp.put_config(SQ, db, config, actor, _insert_audit)
            )
        )

    async def delete_opamp_config(
        self, project_id: uuid.UUID, instance_uid: bytes, *, actor: str | None
    ) -> bool:
        return await self._run(
            lambda db: _transaction(
                db,
                lambda: opamp.delete_config(SQ, db, project_id, instance_uid, actor, _insert_audit),
            )
        )

    async def get_opamp_configs(
        self, project_id: uuid.UUID, instance_uids: list[bytes]
    ) -> dict[bytes, OpampConfig]:
        return await self._run(lambda db: opamp.get_configs(SQ, db, project_id, instance_uids))

    async def data_version(self) -> int | None:
        return int(await self._run(lambda db: db.execute("PRAGMA data_version").fetchone()[0]))

    async def write_opamp_states(self, writes: list[opamp.StateWrite]) -> int:
        return await self._run(
            lambda db: _transaction(db, lambda: opamp.write_states(SQ, db, writes, _insert_audit))
        )

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
        def create(db: Any) -> OpampRollout:
            return opamp_rollouts.create_rollout(
                SQ,
                db,
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

        return await self._run(lambda db: _transaction(db, lambda: create(db)))

    async def get_opamp_rollout(self, rollout_id: uuid.UUID) -> OpampRollout | None:
        return await self._run(lambda db: opamp_rollouts.get_rollout(SQ, db, rollout_id))

    async def list_opamp_rollouts(
        self, project_id: uuid.UUID | None = None, *, state: str | None = None
    ) -> list[OpampRollout]:
        return await self._run(lambda db: opamp_rollouts.list_rollouts(SQ, db, project_id, state))

    async def assign_opamp_rollout_stage(
        self, rollout_id: uuid.UUID, *, stage: int, end: int, now: float
    ) -> list[bytes] | None:
        return await self._run(
            lambda db: _transaction(
                db,
                lambda: opamp_rollouts.assign_stage(
                    SQ, db, rollout_id, stage, end, now, _insert_audit
                ),
            )
        )

    async def transition_opamp_rollout(
        self,
        rollout_id: uuid.UUID,
        *,
        to_state: str,
        reason: str | None = None,
        actor: str | None,
        now: float,
    ) -> OpampRollout:
        return await self._run(
            lambda db: _transaction(
                db,
                lambda: opamp_rollouts.transition(
                    SQ, db, rollout_id, to_state, reason, actor, now, _insert_audit
                ),
            )
        )

    async def opamp_gauges(self) -> tuple[dict[str, int], dict[str, int]]:
        return await self._run(lambda db: opamp_rollouts.gauges(SQ, db))


def _transaction(db: sqlite3.Connection, fn: Callable[[], T]) -> T:
    db.execute("BEGIN IMMEDIATE")
    try:
        result = fn()
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return result


def _applied_migrations(db: sqlite3.Connection) -> list[int]:
    exists = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if exists is None:
        return []
    return [v for (v,) in db.execute("SELECT version FROM schema_version ORDER BY version")]


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


def _write_events(
    db: sqlite3.Connection, buffer_id: uuid.UUID, rows: Sequence[ClaimedRow], project_tasks: bool
) -> tuple[int, list[TaskSummary], Counter[str]]:
    buffer_text = str(buffer_id)
    ids: dict[bytes | None, str | None] = {None: None}  # the few agents of a batch, as text

    def text(raw: bytes | None) -> str | None:
        if raw not in ids:
            ids[raw] = str(uuid.UUID(bytes=raw))
        return ids[raw]

    about_tasks: list[TaskEvent] | None = [] if project_tasks else None
    about_schedules: list[ScheduleFrame | ScheduleControl] = []
    params = [
        (
            e.received_at.timestamp(),
            e.idempotency_key,
            e.source,
            e.kind,
            buffer_text,
            e.body.decode(),
            text(e.project_id),
            text(e.agent_id),
            e.worker_id,
        )
        for e in event_rows(buffer_id, rows, about_tasks, about_schedules)
    ]

    def run() -> tuple[int, list[TaskSummary], Counter[str]]:
        before = db.total_changes
        db.executemany(
            "INSERT OR IGNORE INTO events (received_at, idempotency_key, source, kind,"
            " buffer_id, body, project_id, agent_id, worker_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            params,
        )
        inserted = db.total_changes - before
        finished = task_writes.write_tasks(SQ, db, about_tasks) if about_tasks else []
        dropped = schedules.write_schedules(SQ, db, about_schedules)
        return inserted, finished, dropped

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


# -- the agent directory ---------------------------------------------------------------


def _json(obj: dict[str, Any]) -> str:
    return orjson.dumps(obj).decode()


def _same(value: Any) -> Any:
    return value


# Ids are stored as text, times as epoch REAL, JSON as text, event keys as blobs.
SQ = Dialect(
    param="?",
    lock="",
    ts_in=_same,
    ts_out=_same,
    uuid_in=str,
    uuid_out=uuid.UUID,
    json_in=_json,
    json_out=orjson.loads,
    key_hex=lambda key: bytes(key).hex(),
    json_text=lambda column, key: f"json_extract({column}, '$.{key}')",
)


def _execute(db: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> int:
    """One write in its own transaction; the rows it changed."""
    return _transaction(db, lambda: db.execute(sql, params).rowcount)


def _fetch_all(db: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> list[Any]:
    return db.execute(sql, params).fetchall()


def _insert_agent(
    db: sqlite3.Connection,
    project_id: uuid.UUID,
    agent_id: uuid.UUID,
    name: str,
    token_hash: bytes,
) -> float:
    """Insert the agent and its token; when it was created."""
    now = time.time()

    def run() -> None:
        project = str(project_id)
        row = db.execute("SELECT archived_at FROM projects WHERE id = ?", (project,)).fetchone()
        if row is None:
            raise LookupError(f"no project with id {project_id}")
        if row[0] is not None:
            raise LookupError(f"project {project_id} is archived")
        db.execute(
            "INSERT INTO agents (id, project_id, name, created_at) VALUES (?, ?, ?, ?)",
            (str(agent_id), project, name, now),
        )
        db.execute(
            "INSERT INTO agent_tokens (token_hash, agent_id, created_at) VALUES (?, ?, ?)",
            (token_hash, str(agent_id), now),
        )

    _transaction(db, run)
    return now


def _insert_audit(
    db: sqlite3.Connection,
    actor: str | None,
    action: str,
    subject: str,
    details: dict[str, Any],
) -> None:
    db.execute(
        "INSERT INTO audit_events (at, actor, action, subject, details) VALUES (?, ?, ?, ?, ?)",
        (time.time(), actor, action, subject, _json(details)),
    )


# -- commands ----------------------------------------------------------------------------


def _ignore(operation: str, seconds: float) -> None:
    pass
