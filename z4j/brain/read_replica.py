"""The read replica's probe: its lag measured every second, its standing logged.

The store decides per read whether the standby serves it (z4j/store/replica.py);
it decides from the last measure, so the measure must keep coming. This
service takes it every PROBE_INTERVAL_SECONDS, each probe bounded by its own
deadline, and logs each change of standing once (to the replica, or to the
primary and why), where the readiness note and the metrics show the
current one. A probe needs no migrated store: it reads only the standby's
recovery functions.
"""

from __future__ import annotations

import logging

import trio

from ..store.replica import ReadReplica
from .lifetime import until

__all__ = ["PROBE_INTERVAL_SECONDS", "serve_read_replica"]

log = logging.getLogger("z4j.brain.read_replica")

# The lag a read is judged by is this old at most (plus the probe's time):
# well under the smallest sensible Z4J_READ_MAX_LAG_MS.
PROBE_INTERVAL_SECONDS = 1.0


async def serve_read_replica(
    replica: ReadReplica,
    *,
    interval: float = PROBE_INTERVAL_SECONDS,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Probe ``replica`` every ``interval`` seconds until ``shutdown``."""
    async with until(shutdown):
        task_status.started()
        last: str | None = "unchecked"
        while True:
            standing = await replica.probe()
            if standing.fallback != last:
                if standing.fallback is None:
                    log.info("reads go to the read replica")
                else:
                    log.warning("%s", standing.note)
                last = standing.fallback
            await trio.sleep(interval)
