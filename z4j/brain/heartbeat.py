"""This instance's row in ``instances``: who it is and how it is doing.

Written every Z4J_HEARTBEAT_SECONDS with the ingest and drain rates since
the last beat and the buffer depth, so an operator (and the dashboard) sees
at once how load spreads across instances. A failed write is logged and
retried at the next beat: the heartbeat never takes the brain down.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable

import attrs
import trio

from ..buffer import Buffer
from ..config import Config
from ..stats import BrainStats, RateMeter, ThrottledLog
from ..store.base import InstanceInfo, Store

__all__ = ["Heartbeat", "instance_info"]

log = logging.getLogger("z4j.heartbeat")


class Heartbeat:
    def __init__(
        self,
        store: Store,
        buffer: Buffer,
        stats: BrainStats,
        info: InstanceInfo,
        *,
        interval: float,
        store_ready: trio.Event,
        on_beat: Callable[[InstanceInfo], None] | None = None,
    ) -> None:
        """``on_beat``: called with each beat's row once written (the dashboard's instances)."""
        self._store = store
        self._buffer = buffer
        self._stats = stats
        self._on_beat = on_beat
        self.info = info
        self._interval = interval
        self._store_ready = store_ready
        self._ingest = RateMeter(self._received())
        self._drain = RateMeter(stats.drain_records_stored)
        self._log = ThrottledLog(log, interval=60.0)

    def _received(self) -> int:
        """Records taken in: TCP records and agent events."""
        return self._stats.ingest_records_ok + self._stats.agent_events_ok

    def snapshot(self, *, stopped: bool = False) -> InstanceInfo:
        now = time.time()
        self._stats.ingest_rate = self._ingest.rate(self._received())
        self._stats.drain_rate = self._drain.rate(self._stats.drain_records_stored)
        self.info = attrs.evolve(
            self.info,
            last_seen=now,
            ingest_rate=self._stats.ingest_rate,
            drain_rate=self._stats.drain_rate,
            buffer_depth=self._buffer.statistics().depth,
            stopped_at=now if stopped else None,
        )
        return self.info

    async def beat(self, *, stopped: bool = False) -> None:
        info = self.snapshot(stopped=stopped)
        try:
            await self._store.upsert_instance(info)
        except Exception as exc:
            self._log.warning("beat", "heartbeat write failed: %s", exc)
            return
        if self._on_beat is not None:
            self._on_beat(info)

    async def serve(
        self, *, shutdown: trio.Event, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Beat every interval; once ``shutdown`` is set, write the last beat
        (``stopped_at``, so others see this instance gone at once) and return."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._beat_forever)
            task_status.started()
            await shutdown.wait()
            nursery.cancel_scope.cancel()
        if self._store_ready.is_set():
            await self.beat(stopped=True)

    async def _beat_forever(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        await self._store_ready.wait()
        while True:
            await self.beat()
            await trio.sleep(self._interval)


def instance_info(config: Config, instance_id: uuid.UUID, buffer: Buffer) -> InstanceInfo:
    """This process's row in ``instances``."""
    now = time.time()
    return InstanceInfo(
        id=instance_id,
        name=config.instance_name or f"{socket.gethostname()}:{os.getpid()}",
        host=socket.gethostname(),
        pid=os.getpid(),
        buffer_id=buffer.buffer_id,
        started_at=now,
        last_seen=now,
    )
