"""Run brains in tests: in-process under Trio, or as a real `z4j brain` process."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import orjson
import psycopg
import trio

from ..brain._root import Brain, serve_brain
from ..config import Config, load_config
from ..stats import BrainStats
from .http import http_get as http_get  # its old home; it lives in .http

__all__ = [
    "BrainProcess",
    "RunningBrain",
    "buffer_rows",
    "http_get",
    "make_config",
    "read_events",
    "run_z4j",
    "running_brain",
    "wait_until",
]


def make_config(data_dir: Path, database_url: str | None = None, **overrides: Any) -> Config:
    """A config for tests: loopback port 0 binds, quick heartbeat, fast shutdown."""
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": database_url,
        "ingest_bind": "127.0.0.1:0",
        "http_bind": "127.0.0.1:0",
        "heartbeat_seconds": 0.5,
        "shutdown_grace_seconds": 5.0,
    }
    values.update(overrides)
    return load_config(env={}, overrides=values)


@attrs.define
class RunningBrain:
    addresses: Brain
    stats: BrainStats
    config: Config
    shutdown: trio.Event
    cancel_scope: trio.CancelScope

    @property
    def ingest(self) -> tuple[str, int]:
        return self.addresses.ingest

    def buffer_depth(self) -> int:
        """Rows in the buffer file, counted by SQLite itself (not by the brain)."""
        return buffer_rows(self.config)


def buffer_rows(config: Config) -> int:
    db = sqlite3.connect(config.resolved_buffer_path)
    try:
        return int(db.execute("SELECT count(*) FROM payloads").fetchone()[0])
    finally:
        db.close()


@asynccontextmanager
async def running_brain(
    config: Config, *, clock: Callable[[], float] = time.time
) -> AsyncIterator[RunningBrain]:
    """A brain in this Trio run; cancelled (hard stop) when the block exits.
    ``clock``: its wall clock for credentials' grace periods (see `serve_brain`)."""
    stats = BrainStats()
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(
            lambda task_status: serve_brain(
                config, shutdown=shutdown, stats=stats, clock=clock, task_status=task_status
            )
        )
        try:
            yield RunningBrain(addresses, stats, config, shutdown, nursery.cancel_scope)
        finally:
            nursery.cancel_scope.cancel()


async def wait_until(predicate: Any, *, timeout: float = 20.0, interval: float = 0.05) -> None:
    """Poll ``predicate`` (sync or async) until true; fail after ``timeout``."""
    with trio.fail_after(timeout):
        while True:
            result = predicate()
            if hasattr(result, "__await__"):
                result = await result
            if result:
                return
            await trio.sleep(interval)


def read_events(config: Config) -> list[dict[str, Any]]:
    """Every stored event (blocking): source, kind, body (parsed) and key."""
    if config.database_url is not None:
        with psycopg.connect(config.database_url) as conn:
            try:
                rows = conn.execute(
                    "SELECT source, kind, body::text, idempotency_key::text FROM events ORDER BY id"
                ).fetchall()
            except psycopg.errors.UndefinedTable:
                return []
    else:
        path = config.sqlite_store_path
        if not path.exists():
            return []
        db = sqlite3.connect(path)
        try:
            rows = db.execute(
                "SELECT source, kind, body, hex(idempotency_key) FROM events ORDER BY id"
            ).fetchall()
        except sqlite3.OperationalError:
            return []
        finally:
            db.close()
    return [{"source": s, "kind": k, "body": orjson.loads(b), "key": key} for s, k, b, key in rows]


_READY = re.compile(r"ready: ingest ([\d.]+):(\d+), http ([\d.]+):(\d+)")


class BrainProcess:
    """``python -m z4j brain`` as a child process, with its log captured."""

    def __init__(self, env: Mapping[str, str], *, log_path: Path) -> None:
        self.log_path = log_path
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("Z4J_")}
        full_env.update(env)
        self._log_start = log_path.stat().st_size if log_path.exists() else 0
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in wait()/kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "z4j", "brain"],
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.ingest, self.http = self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> tuple[tuple[str, int], tuple[str, int]]:
        deadline = time.monotonic() + timeout
        seen = self._log_start
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            for match in _READY.finditer(text, seen):
                host, port, hhost, hport = match.groups()
                return (host, int(port)), (hhost, int(hport))
            if self.proc.poll() is not None:
                raise RuntimeError(f"brain exited with {self.proc.returncode}:\n{text[-3000:]}")
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"brain not ready in {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.returncode is not None:
                self._log.close()

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM and wait for a graceful exit; SIGKILL after ``grace`` seconds."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.wait(grace)
                return
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def run_z4j(
    *args: str, env: Mapping[str, str], timeout: float = 60, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m z4j ARGS`` to its end, with ``env`` as its only Z4J_* variables.

    ``stdin`` is written to its standard input; without it, that is /dev/null.
    """
    clean = {k: v for k, v in os.environ.items() if not k.startswith("Z4J_")}
    clean.update(env)
    return subprocess.run(
        [sys.executable, "-m", "z4j", *args],
        capture_output=True,
        text=True,
        env=clean,
        timeout=timeout,
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
    )
