"""How services end: told by an event, layer by layer.

Every service has one shape, ``async def serve(..., *, shutdown,
task_status)``: it reports with ``task_status.started(...)`` once it can
serve, hands over what it holds when ``shutdown`` is set, and returns. The
composition root nests `layer` blocks so that each is told to stop only once
the block inside it has ended: the graceful order is the nesting, as
hypercorn nests lifespan ⊃ server ⊃ accept.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import trio

__all__ = ["grace_deadline", "layer", "until"]

log = logging.getLogger("z4j.brain")


@contextlib.asynccontextmanager
async def layer() -> AsyncIterator[tuple[trio.Nursery, trio.Event]]:
    """A nursery whose services are told to stop (the event) once the block
    inside it has ended, and which then waits for them to hand over."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        try:
            yield nursery, stop
        finally:
            stop.set()


@contextlib.asynccontextmanager
async def until(shutdown: trio.Event) -> AsyncIterator[trio.Nursery]:
    """A nursery cancelled once ``shutdown`` is set: for a service whose
    loops hold nothing to hand over (a sweep, a listener, upkeep). The block
    should wait (``trio.sleep_forever`` or a loop); it ends with the nursery."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_when_set, shutdown, nursery.cancel_scope)
        yield nursery


async def _cancel_when_set(shutdown: trio.Event, scope: trio.CancelScope) -> None:
    await shutdown.wait()
    scope.cancel()


async def grace_deadline(
    shutdown: trio.Event, seconds: float, everything: trio.CancelScope
) -> None:
    """Once ``shutdown`` is set, give the graceful stop its deadline
    (Z4J_SHUTDOWN_GRACE_SECONDS), then cancel whatever is left."""
    await shutdown.wait()
    log.info("graceful shutdown: %g s to finish", seconds)
    await trio.sleep(seconds)
    log.warning("graceful shutdown ran past its deadline; cancelling the rest")
    everything.cancel()
