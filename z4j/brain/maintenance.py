"""Periodic upkeep of the store: partitions ahead, retention (events, tasks, workers gone,
OpAMP history), abandoned schedule frames.

Runs once the store is migrated, then every MAINTENANCE_INTERVAL_SECONDS.
Every step is idempotent and serialised in the store (advisory lock on
Postgres); with replicas, only the holder of the leader lease runs it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from ..stats import ThrottledLog
from ..store.base import Store
from .lifetime import until

__all__ = ["MAINTENANCE_INTERVAL_SECONDS", "Maintenance"]

log = logging.getLogger("z4j.maintenance")

MAINTENANCE_INTERVAL_SECONDS = 3600.0


class Maintenance:
    def __init__(
        self,
        store: Store,
        *,
        retention_days: int,
        task_retention_days: int | None = None,
        store_ready: trio.Event,
        clock: Callable[[], float] = time.time,
        interval: float = MAINTENANCE_INTERVAL_SECONDS,
        is_leader: Callable[[], bool] = lambda: True,
    ) -> None:
        self._store = store
        self._retention_days = retention_days
        self._task_retention_days = (
            retention_days if task_retention_days is None else task_retention_days
        )
        self._store_ready = store_ready
        self._clock = clock
        self._interval = interval
        self._is_leader = is_leader
        self._log = ThrottledLog(log, interval=interval)

    async def run_once(self) -> int:
        """One round of upkeep: events, workers gone and OpAMP history past
        retention, tasks past theirs, schedule frames staged too long. Returns what went of the events (partitions or rows)."""
        now = self._clock()
        removed = await self._store.enforce_retention(now=now, keep_days=self._retention_days)
        forgotten = await self._store.forget_tasks(before=now - self._task_retention_days * 86400)
        if forgotten:
            log.info("retention (%d days): removed %d tasks", self._task_retention_days, forgotten)
        if removed:
            log.info(
                "retention (%d days): removed %d %s",
                self._retention_days,
                removed,
                "partitions" if self._store.kind == "postgres" else "events",
            )
        gone = await self._store.forget_workers(before=now - self._retention_days * 86400)
        if gone:
            log.info(
                "retention (%d days): removed %d workers not seen since", self._retention_days, gone
            )
        faded = await self._store.forget_opamp_history(before=now - self._retention_days * 86400)
        if faded:
            log.info(
                "retention (%d days): removed %d OpAMP history rows", self._retention_days, faded
            )
        expired = await self._store.expire_schedule_frames(now=now)
        if expired:
            log.info("removed %d schedule frames of snapshots never completed", expired)
        return removed

    async def serve(
        self, *, shutdown: trio.Event, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Upkeep every interval while this replica leads, until ``shutdown``."""
        async with until(shutdown):
            task_status.started()
            await self._store_ready.wait()
            await self._upkeep_forever()

    async def _upkeep_forever(self) -> None:
        while True:
            if not self._is_leader():  # one replica at a time does upkeep
                await trio.sleep(1.0)
                continue
            try:
                await self.run_once()
            except Exception as exc:
                self._log.warning("run", "maintenance failed, will retry: %s", exc)
            await trio.sleep(self._interval)
