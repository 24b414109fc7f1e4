"""``z4j migrate [--check]`` and ``z4j backup PATH``: the store chores of a deploy.

``migrate --check`` answers a pipeline's question (is the schema behind this
release?) without changing anything: exit 0 current, 1 behind (the pending
versions named) or ahead (a newer z4j migrated it), 2 when it cannot tell.

``backup`` copies the embedded SQLite store with SQLite's online backup API,
so a running brain keeps writing meanwhile: the copy is one consistent
snapshot (the backup reads under one read transaction, WAL lets the brain
write beside it), checked with ``PRAGMA quick_check`` before it takes the
name it was given. A Postgres store is pg_dump's job.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path

import trio

from .config import Config
from .store.migrations import MIGRATIONS

__all__ = ["SchemaState", "backup", "migrate", "schema_state"]


class SchemaState:
    """Where a store's schema stands against this z4j's migrations."""

    def __init__(self, applied: list[int]) -> None:
        known = [m.version for m in MIGRATIONS]
        self.applied = applied
        self.pending = [v for v in known if v not in set(applied)]
        self.unknown = [v for v in applied if v not in set(known)]

    @property
    def current(self) -> bool:
        return not self.pending and not self.unknown

    def describe(self) -> str:
        if self.unknown:
            return (
                f"the store has migrations this z4j does not know ({_versions(self.unknown)}): "
                "a newer z4j migrated it; run that release"
            )
        if self.pending:
            at = f"at version {max(self.applied)}" if self.applied else "not created yet"
            return (
                f"pending migrations: {_versions(self.pending)} (schema {at}, this z4j needs "
                f"version {MIGRATIONS[-1].version}): run `z4j migrate`, or start the brain"
            )
        return f"schema is up to date (version {max(self.applied)})"


def _versions(versions: list[int]) -> str:
    """``1-17, 19``: consecutive versions as ranges."""
    runs: list[list[int]] = []
    for v in sorted(versions):
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


async def schema_state(config: Config) -> SchemaState:
    """Read the applied versions; an embedded store not made yet is left unmade."""
    from .store import store_for

    if config.database_url is None and not config.sqlite_store_path.exists():
        return SchemaState([])
    store = store_for(config, application_name="z4j-cli")
    try:
        return SchemaState(await store.applied_migrations())
    finally:
        await store.aclose()


async def migrate(config: Config, check: bool) -> int:
    from .store import store_for

    if check:
        try:
            state = await schema_state(config)
        except Exception as exc:
            print(f"z4j migrate --check: cannot read the schema: {_one_line(exc)}", file=sys.stderr)
            return 2
        print(state.describe())
        return 0 if state.current else 1
    store = store_for(config, application_name="z4j-cli")
    try:
        applied = await store.migrate()
    except Exception as exc:
        print(f"z4j migrate: migration failed: {_one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        await store.aclose()
    if applied:
        print(f"applied migrations: {', '.join(map(str, applied))}")
    else:
        print("schema is up to date")
    return 0


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class _Refused(Exception):
    """A one-line refusal for stderr."""


async def backup(config: Config, path: Path) -> int:
    try:
        if config.database_url is not None:
            raise _Refused(
                "the store is Postgres (Z4J_DATABASE_URL); back it up with pg_dump "
                "(docs/operations.md)"
            )
        source = config.sqlite_store_path
        size, version = await trio.to_thread.run_sync(_backup, source, path)
    except (_Refused, OSError, sqlite3.Error) as exc:
        print(f"z4j backup: {_one_line(exc)}", file=sys.stderr)
        return 1
    print(f"backed up {source} to {path}: {size} bytes, schema version {version}")
    if config.secret is None:
        print(
            f"keep {config.data_dir / 'secret'} with it (agent tokens, signing secrets and "
            "admin tokens are keyed with it; it never changes), or set Z4J_SECRET",
            file=sys.stderr,
        )
    return 0


def _backup(source: Path, path: Path) -> tuple[int, int]:
    """Copy ``source`` to ``path`` (which must not exist); return its size and
    schema version. Written beside ``path`` first, so a failed or interrupted
    backup never leaves a file that looks whole."""
    from ._datadir import private_file

    if not source.exists():
        raise _Refused(f"no store at {source} (set --data-dir)")
    if path.exists():
        raise _Refused(f"{path} exists: give a new file name")
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    private_file(partial)  # 0600: the store holds token hashes
    try:
        src = sqlite3.connect(f"file:{source}?mode=rw", uri=True)
        try:
            src.execute("PRAGMA busy_timeout=5000")
            dst = sqlite3.connect(partial)
            try:
                src.backup(dst)  # all pages in one step: one read transaction
                dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
                (check,) = dst.execute("PRAGMA quick_check").fetchone()
                if check != "ok":
                    raise _Refused(f"the copy failed its check: {check}")
                row = dst.execute("SELECT max(version) FROM schema_version").fetchone()
            finally:
                dst.close()
        finally:
            src.close()
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.link(partial, path)  # fails if path appeared meanwhile: never overwrite
    finally:
        partial.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path.stat().st_size, int(row[0] or 0)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
