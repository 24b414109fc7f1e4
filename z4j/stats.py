"""Counters the brain keeps about itself.

Plain integers on one object, bumped on the Trio thread: cheap enough for
the per-payload hot path. The heartbeat turns them into rates, the health
endpoint and (later) /metrics read them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import attrs

__all__ = ["BrainStats", "RateMeter", "ThrottledLog"]


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
    agent_sessions_open: int = 0
    agent_events_ok: int = 0
    agent_rejected: Counter[str] = attrs.field(factory=Counter)


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
