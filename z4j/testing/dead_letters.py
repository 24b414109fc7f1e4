"""Make the store refuse one kind of event, the way a database can: for dead-letter tests.

Ingest and the agent endpoint refuse what no store can keep, so a payload
that reaches the buffer is storable unless the store itself says otherwise.
Here it does, for real: a CHECK constraint on Postgres, a trigger raising
ABORT on SQLite (both an integrity error, which the drain treats as bad
data), as a constraint an operator added and later lifts. The drain then
sets the payload aside in the buffer's dead letters, and once the rule is
lifted a re-queued payload drains.
"""

from __future__ import annotations

import re
import sqlite3

import psycopg

from ..config import Config

__all__ = ["accept_kind", "refuse_kind"]


def _name(kind: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,40}", kind):
        raise ValueError("a kind of lowercase letters, digits and _")
    return f"z4j_test_refuse_{kind}"


def refuse_kind(config: Config, kind: str) -> None:
    """From now on the store refuses events of ``kind`` (blocking; after migrate)."""
    name = _name(kind)
    if config.database_url is not None:
        with psycopg.connect(config.database_url, autocommit=True) as conn:
            conn.execute(f"ALTER TABLE events ADD CONSTRAINT {name} CHECK (kind <> '{kind}')")
        return
    db = sqlite3.connect(config.sqlite_store_path, timeout=30)
    try:
        db.execute(
            f"CREATE TRIGGER {name} BEFORE INSERT ON events WHEN NEW.kind = '{kind}'"
            f" BEGIN SELECT RAISE(ABORT, 'events of kind {kind} are refused here'); END"
        )
    finally:
        db.close()


def accept_kind(config: Config, kind: str) -> None:
    """Lift `refuse_kind` (blocking)."""
    name = _name(kind)
    if config.database_url is not None:
        with psycopg.connect(config.database_url, autocommit=True) as conn:
            conn.execute(f"ALTER TABLE events DROP CONSTRAINT {name}")
        return
    db = sqlite3.connect(config.sqlite_store_path, timeout=30)
    try:
        db.execute(f"DROP TRIGGER {name}")
    finally:
        db.close()
