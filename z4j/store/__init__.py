"""Shared persistence: Postgres in production, SQLite as the embedded default."""

from __future__ import annotations

from collections.abc import Callable

from ..config import Config
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
    "store_for",
]


def store_for(
    config: Config,
    *,
    application_name: str = "z4j",
    observe_query: Callable[[float], None] | None = None,
) -> Store:
    """The store the configuration asks for (not yet connected)."""
    if config.database_url is not None:
        return PostgresStore.from_url(
            config.database_url,
            pool_size=config.db_pool_size,
            statement_timeout_ms=config.db_statement_timeout_ms,
            application_name=application_name,
            observe_query=observe_query,
        )
    return SqliteStore(config.sqlite_store_path, observe_query=observe_query)
