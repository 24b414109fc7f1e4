"""Counters the brain keeps about itself.

Plain integers on one object, bumped on the Trio thread: cheap enough for
the per-payload hot path. The heartbeat turns them into rates; /metrics
(z4j/brain/metrics.py) reads them at scrape time, so the hot path never touches
the Prometheus client.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import Counter

import attrs

__all__ = ["BrainStats", "Histogram", "HttpStats", "RateMeter", "ThrottledLog"]

# Seconds: from a fast SQLite read to a store write that waits on a lock.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@attrs.define
class HttpStats:
    """Counters of the HTTP port, read by /metrics."""

    connections_total: int = 0
    connections_open: int = 0
    connections_refused: int = 0


@attrs.define
class Histogram:
    """Counts of observations per bucket (upper bounds), their sum and count."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = attrs.field(
        default=attrs.Factory(lambda self: [0] * (len(self.bounds) + 1), takes_self=True)
    )
    sum: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations ≤ it) per bucket, ending with +Inf."""
        total, out = 0, []
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


@attrs.define
class BrainStats:
    ingest_connections_total: int = 0
    ingest_connections_open: int = 0
    ingest_payloads_ok: int = 0
    ingest_records_ok: int = 0
    ingest_pings: int = 0
    ingest_rejected: Counter[str] = attrs.field(factory=Counter)
    drain_batches: int = 0
    drain_rows: int = 0
    drain_records_stored: int = 0
    drain_failures: int = 0
    drain_quarantined: int = 0
    drain_seconds_total: float = 0.0
    drain_batch_seconds: Histogram = attrs.field(factory=Histogram)
    agent_sessions_open: int = 0
    agent_events_ok: int = 0
    agent_frames: Counter[str] = attrs.field(factory=Counter)  # by frame type
    agent_rejected: Counter[str] = attrs.field(factory=Counter)
    command_dispatch: Counter[str] = attrs.field(factory=Counter)  # local, forwarded, no_session
    db_query_seconds: Histogram = attrs.field(factory=Histogram)
    dashboard_subscribers: int = 0
    dashboard_messages: int = 0  # published while someone was subscribed
    dashboard_coalesced: int = 0
    dashboard_drops: int = 0  # subscribers dropped for falling behind
    # The replica registry (z4j/brain/registry.py).
    ownership: Counter[str] = attrs.field(factory=Counter)  # new, renewed, takeover, lost
    notifications: Counter[str] = attrs.field(factory=Counter)  # by channel
    listener_reconnects: int = 0
    lease_acquisitions: int = 0
    leader: bool = False  # holds the leader lease (always, with the local registry)
    sweep_deliveries: int = 0  # commands the sweep delivered (a notification missed)
    # Set by the heartbeat: records/s over its last interval.
    ingest_rate: float = 0.0
    drain_rate: float = 0.0


class RateMeter:
    """Per-second rate of a growing counter between two readings."""

    def __init__(self, value: int = 0) -> None:
        self._last_value = value
        self._last_time = time.monotonic()

    def rate(self, value: int) -> float:
        now = time.monotonic()
        elapsed = now - self._last_time
        rate = (value - self._last_value) / elapsed if elapsed > 0 else 0.0
        self._last_value, self._last_time = value, now
        return rate


class ThrottledLog:
    """At most one log line per key per ``interval`` seconds, with a count of the rest.

    A misbehaving client can send thousands of bad frames a second; the
    operator needs to know, not to read each one. The counters hold the total.
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._log = logger
        self._interval = interval
        self._next: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next.get(key, 0.0):
            self._suppressed[key] += 1
            return
        self._next[key] = now + self._interval
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            msg += " (%d more like it not logged)"
            args += (suppressed,)
        self._log.warning(msg, *args)
