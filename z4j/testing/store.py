"""The store under test, and a way to read what it wrote that does not go through it.

A store that reads back its own mistakes passes its own tests, so store
tests check rows with `query`: plain SQL on a connection of its own, the
same text on SQLite and Postgres, values made comparable across the two.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import orjson
import psycopg
import trio

from ..config import Config
from ..store import Store, store_for

__all__ = ["json_of", "open_store", "query"]


@asynccontextmanager
async def open_store(config: Config, *, timeout: float = 30) -> AsyncIterator[Store]:
    """The config's store, migrated; closed when the block ends (within ``timeout`` in all)."""
    store = store_for(config)
    with trio.fail_after(timeout):
        try:
            await store.migrate()
            yield store
        finally:
            await store.aclose()


def query(config: Config, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` (written with ``?``), read outside the store under test (blocking).

    uuids come back as text, timestamps as epoch floats and bytea as bytes on
    both stores; JSON columns as the driver gives them (see `json_of`).
    """
    if config.database_url is not None:
        with psycopg.connect(config.database_url) as conn:
            rows = conn.execute(sql.replace("?", "%s"), params).fetchall()
        return [tuple(_plain(v) for v in row) for row in rows]
    db = sqlite3.connect(config.sqlite_store_path)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def _plain(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, memoryview):
        return bytes(value)
    return value


def json_of(config: Config, value: Any) -> Any:
    """A JSON column as stored: jsonb arrives parsed, SQLite TEXT is parsed here."""
    if config.database_url is None and isinstance(value, str):
        return orjson.loads(value)
    return value
