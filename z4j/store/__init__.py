"""Shared persistence: Postgres in production, SQLite as the embedded default."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

import trio

from ..config import Config
from ..tasks import TaskSummary
from .base import (
    COMMAND_STATES,
    FINAL_COMMAND_STATES,
    Agent,
    CommandRecord,
    DirectoryConflict,
    InstanceInfo,
    Project,
    Store,
    StoreUnavailable,
    UnstorableRows,
)
from .postgres import PostgresStore
from .sqlite import SqliteStore

__all__ = [
    "COMMAND_STATES",
    "FINAL_COMMAND_STATES",
    "Agent",
    "CommandRecord",
    "DirectoryConflict",
    "InstanceInfo",
    "PostgresStore",
    "Project",
    "SqliteStore",
    "Store",
    "StoreUnavailable",
    "UnstorableRows",
    "health_checks",
    "health_notes",
    "migrate_until_ready",
    "store_for",
]


def store_for(
    config: Config,
    *,
    application_name: str = "z4j",
    observe_query: Callable[[str, float], None] | None = None,
    on_tasks: Callable[[Sequence[TaskSummary]], None] | None = None,
    on_frames_dropped: Callable[[Mapping[str, int]], None] | None = None,
) -> Store:
    """The store the configuration asks for (not yet connected)."""
    if config.database_url is not None:
        return PostgresStore.from_url(
            config.database_url,
            pool_size=config.db_pool_size,
            statement_timeout_ms=config.db_statement_timeout_ms,
            application_name=application_name,
            observe_query=observe_query,
            project_tasks=config.task_projection,
            on_tasks=on_tasks,
            on_frames_dropped=on_frames_dropped,
            read_url=config.database_read_url,
            read_max_lag_seconds=config.read_max_lag_ms / 1000,
        )
    return SqliteStore(
        config.sqlite_store_path,
        observe_query=observe_query,
        project_tasks=config.task_projection,
        on_tasks=on_tasks,
        on_frames_dropped=on_frames_dropped,
    )


def health_checks(
    store: Store, store_ready: trio.Event
) -> dict[str, Callable[[], Awaitable[str | None]]]:
    """For /health/ready: the store answers (once migrated), and its pool,
    if it has one, is not exhausted."""

    async def store_check() -> str | None:
        if not store_ready.is_set():
            return "store not reachable yet (migrations pending)"
        await store.check()
        return None

    checks: dict[str, Callable[[], Awaitable[str | None]]] = {"store": store_check}
    pool = store.pool
    if pool is not None:

        async def pool_check() -> str | None:
            stats = pool.statistics()
            if stats.in_use >= stats.size and stats.waiting:
                return f"pool exhausted: {stats.in_use} of {stats.size} in use, {stats.waiting} waiting"
            return None

        checks["pool"] = pool_check
    return checks


def health_notes(store: Store) -> dict[str, Callable[[], str | None]]:
    """For /health/ready, beside the checks: conditions that leave the
    brain ready but degraded. A read replica that is behind, down or
    promoted is one: the primary serves its reads, so readiness holds, and
    the note says why the primary works harder."""
    replica = store.read_replica
    return {} if replica is None else {"read_replica": replica.note}


log = logging.getLogger("z4j.store")

MIGRATE_RETRY_SECONDS = 2.0


async def migrate_until_ready(store: Store, ready: trio.Event) -> None:
    """Apply migrations, retrying while the store is unreachable.

    The buffer takes ingest meanwhile; drains and the heartbeat wait on
    ``ready``.
    """
    attempt = 0
    while True:
        try:
            applied = await store.migrate()
        except Exception as exc:
            attempt += 1
            if attempt == 1 or attempt % 30 == 0:
                first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                if isinstance(exc, StoreUnavailable):
                    log.warning(
                        "store not available (%s); ingest goes on into the buffer, "
                        "retrying every %gs",
                        first_line,
                        MIGRATE_RETRY_SECONDS,
                    )
                else:
                    # Reachable but refusing (permissions, a broken schema):
                    # an operator must act; keep trying so the fix is picked up.
                    log.error(
                        "migrating the store failed (%s: %s); ingest goes on into the "
                        "buffer, retrying every %gs",
                        type(exc).__name__,
                        first_line,
                        MIGRATE_RETRY_SECONDS,
                    )
            await trio.sleep(MIGRATE_RETRY_SECONDS)
            continue
        if applied:
            log.info("schema migrated to version %d", applied[-1])
        ready.set()
        return
