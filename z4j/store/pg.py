"""Postgres under Trio: a bounded pool of sync psycopg connections.

psycopg 3's async API is asyncio-only, so every database call here runs a
plain function on a worker thread (``trio.to_thread.run_sync``): the Trio
loop never waits on the network. Work is batched per call (one thread hop
costs ~130 µs), so callers pass a whole function, not single statements.

Cancellation is where pools usually go wrong. A cancelled call must not
leave its connection in an unknown state, and must not make the caller wait
for a slow query. So a call runs with ``abandon_on_cancel=True``: on cancel
we stop waiting at once, ask the server to cancel the query
(``cancel_safe``) and mark the connection abandoned. The worker thread, when
the query ends, sees the mark and closes the connection instead of returning
it. The pool slot is free at once; a fresh connection replaces the old one
on next use.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import psycopg
import trio

__all__ = ["PgPool", "PoolStatistics"]

log = logging.getLogger("z4j.store.pg")

P = ParamSpec("P")
T = TypeVar("T")


class _Abandoned(Exception):
    """The caller was cancelled before the call started."""


class _Guard:
    """Who closes a connection whose call was cancelled: the thread or us.

    A cancel can land before the worker thread starts (trio checks for
    cancellation before handing the job over), while it runs, or after it
    finished. Whoever comes second under the lock closes the connection.
    """

    __slots__ = ("abandoned", "finished", "lock", "started")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = False
        self.finished = False
        self.abandoned = False

    def start(self) -> bool:
        """Called by the thread first; False means the caller gave up already."""
        with self.lock:
            if self.abandoned:
                return False
            self.started = True
            return True


def _call_in_transaction(
    conn: psycopg.Connection[Any],
    guard: _Guard,
    fn: Callable[..., T],
    args: tuple[Any, ...],
    autocommit: bool,
) -> T:
    if not guard.start():
        raise _Abandoned  # nobody waits for this outcome; the caller closed conn
    try:
        if conn.autocommit != autocommit:
            conn.autocommit = autocommit
        if autocommit:
            return fn(conn, *args)
        with conn.transaction():
            return fn(conn, *args)
    finally:
        with guard.lock:
            guard.finished = True
            abandoned = guard.abandoned
        if abandoned:
            conn.close()


class PoolStatistics:
    __slots__ = ("idle", "in_use", "size", "waiting")

    def __init__(self, *, in_use: int, idle: int, size: int, waiting: int) -> None:
        self.in_use, self.idle, self.size, self.waiting = in_use, idle, size, waiting


class PgPool:
    """At most ``size`` connections, each used by one call at a time."""

    def __init__(
        self,
        url: str,
        *,
        size: int,
        statement_timeout_ms: int,
        application_name: str = "z4j",
        connect_timeout: float = 5.0,
        configure: Callable[[psycopg.Connection[Any]], None] | None = None,
    ) -> None:
        self.url = url
        self.size = size
        self._kwargs: dict[str, Any] = {
            "options": f"-c statement_timeout={int(statement_timeout_ms)}",
            "application_name": application_name,
            "connect_timeout": max(1, round(connect_timeout)),
        }
        self._configure = configure
        self._slots = trio.Semaphore(size)
        self._limiter = trio.CapacityLimiter(size)
        self._idle: list[psycopg.Connection[Any]] = []
        self._closed = False

    def statistics(self) -> PoolStatistics:
        free = self._slots.value
        return PoolStatistics(
            in_use=self.size - free,
            idle=len(self._idle),
            size=self.size,
            waiting=self._slots.statistics().tasks_waiting,
        )

    def connect_sync(self, *, autocommit: bool = False) -> psycopg.Connection[Any]:
        """A new connection with the pool's settings (blocking: use a thread)."""
        conn = psycopg.connect(self.url, autocommit=autocommit, **self._kwargs)
        if self._configure is not None:
            self._configure(conn)
        return conn

    async def run(
        self,
        fn: Callable[Concatenate[psycopg.Connection[Any], P], T],
        *args: Any,
        autocommit: bool = False,
    ) -> T:
        """Run ``fn(conn, *args)`` on a pooled connection, in a transaction.

        The transaction commits when ``fn`` returns and rolls back when it
        raises. With ``autocommit=True`` no transaction is opened (for DDL
        that must not hold locks long, or for statements that manage their
        own transactions).
        """
        if self._closed:
            raise RuntimeError("pool is closed")
        async with self._slots:
            conn = self._idle.pop() if self._idle else None
            if conn is None or conn.closed or conn.broken:
                conn = await self._connect()
            guard = _Guard()
            try:
                result = await trio.to_thread.run_sync(
                    _call_in_transaction,
                    conn,
                    guard,
                    fn,
                    args,
                    autocommit,
                    abandon_on_cancel=True,
                    limiter=self._limiter,
                )
            except trio.Cancelled:
                self._abandon(conn, guard)
                raise
            except BaseException:
                if not (conn.closed or conn.broken):
                    self._idle.append(conn)
                raise
            self._idle.append(conn)
            return result

    async def _connect(self) -> psycopg.Connection[Any]:
        guard = _Guard()
        made: list[psycopg.Connection[Any]] = []

        def connect() -> psycopg.Connection[Any] | None:
            if not guard.start():
                return None
            conn = self.connect_sync()
            with guard.lock:
                guard.finished = True
                made.append(conn)
                abandoned = guard.abandoned
            if abandoned:
                conn.close()
            return conn

        try:
            conn = await trio.to_thread.run_sync(
                connect, abandon_on_cancel=True, limiter=self._limiter
            )
            assert conn is not None  # only None after we abandoned it
            return conn
        except trio.Cancelled:
            with guard.lock:
                guard.abandoned = True
                finished = guard.finished
            if finished:
                made[0].close()
            raise

    def _abandon(self, conn: psycopg.Connection[Any], guard: _Guard) -> None:
        with guard.lock:
            guard.abandoned = True
            running = guard.started and not guard.finished
        if not running:
            # The call never started, or ended while we were being
            # cancelled: no thread will touch the connection again, and its
            # state is unknown to the caller, so it goes.
            conn.close()
            return
        # Ask the server to stop the query so the abandoned thread ends soon
        # and closes the connection itself.
        threading.Thread(
            target=_cancel_quietly, args=(conn,), name="z4j-pg-cancel", daemon=True
        ).start()

    async def aclose(self) -> None:
        """Close idle connections and refuse new calls.

        Call it once no call is running (the brain does, after its tree has
        ended); an abandoned call's thread closes its own connection.
        """
        self._closed = True
        idle, self._idle = self._idle, []
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            for conn in idle:
                await trio.to_thread.run_sync(conn.close)


def _cancel_quietly(conn: psycopg.Connection[Any]) -> None:
    try:
        conn.cancel_safe(timeout=3.0)
    except Exception as exc:  # the connection may be gone already
        log.debug("cancelling an abandoned query failed: %s", exc)
