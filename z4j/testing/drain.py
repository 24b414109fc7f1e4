"""Drains run on their own, over a buffer and a store a test or benchmark chose.

The brain starts its drains only once the store answers; here the store is
given ready, so a test can put a fake store behind the drain and a
benchmark can time drains with nothing else running.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from ..brain.drain import Drainer
from ..buffer import Buffer
from ..stats import BrainStats
from ..store import Store

__all__ = ["draining"]


@asynccontextmanager
async def draining(
    buffer: Buffer,
    store: Store,
    *,
    batch_rows: int,
    lease_seconds: float,
    batch_bytes: int | None = None,
    workers: int = 1,
    linger_seconds: float = 0.0,
    stats: BrainStats | None = None,
) -> AsyncIterator[Drainer]:
    """``workers`` drains of ``buffer`` into ``store``, running through the block.

    They are stopped when it ends (each finishes the batch in hand); the
    block may stop them sooner with ``drainer.stop()``.
    """
    ready = trio.Event()
    ready.set()
    drainer = Drainer(
        buffer,
        store,
        BrainStats() if stats is None else stats,
        batch_rows=batch_rows,
        batch_bytes=batch_bytes,
        lease_seconds=lease_seconds,
        store_ready=ready,
        linger_seconds=linger_seconds,
    )
    async with trio.open_nursery() as nursery:
        for worker in range(workers):
            await nursery.start(drainer.run, worker)
        try:
            yield drainer
        finally:
            drainer.stop()
