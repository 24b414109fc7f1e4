"""Counters the brain keeps about itself.

Plain integers on one object, bumped on the Trio thread: cheap enough for
the per-payload hot path. /metrics (z4j/brain/metrics.py) reads them at
scrape time, so the hot path never touches the Prometheus client; rates are
PromQL's. The heartbeat keeps its own rates for the ``instances`` rows the
dashboard reads.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import Counter
from collections.abc import Iterable
from typing import Protocol

import attrs

__all__ = [
    "BrainStats",
    "FederationStats",
    "Histogram",
    "HttpStats",
    "RateMeter",
    "TaskStats",
    "ThrottledLog",
]

# Seconds: from a fast SQLite read to a store write that waits on a lock.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@attrs.define
class HttpStats:
    """Counters of the HTTP port, read by /metrics.

    Requests are counted by route template (``/api/v1/commands/{id}``, not the
    path asked for), method and status, so the label set is bounded by the
    routes, whatever clients send (brain/http/request_metrics.py).
    """

    connections_total: int = 0
    connections_open: int = 0
    connections_refused: int = 0
    requests: Counter[tuple[str, str, str]] = attrs.field(factory=Counter)  # route, method, status
    request_seconds: dict[tuple[str, str], Histogram] = attrs.field(factory=dict)  # route, method

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests[route, method, str(status)] += 1
        histogram = self.request_seconds.get((route, method))
        if histogram is None:
            histogram = self.request_seconds[route, method] = Histogram()
        histogram.observe(seconds)


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


# Command latency, seconds: a worker answering at once, to a timeout.
COMMAND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

# Task runtimes, seconds: from a quick job to an hour's batch.
RUNTIME_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
# Task names become metric labels; past this many (engine, name) pairs, the
# rest count under "other", so no engine can grow /metrics without bound.
MAX_TASK_LABELS = 200


class FinishedTask(Protocol):
    """What the metrics read of a task the drain finished (z4j.tasks.TaskSummary)."""

    @property
    def engine(self) -> str: ...
    @property
    def name(self) -> str | None: ...
    @property
    def state(self) -> str: ...
    @property
    def runtime_ms(self) -> float | None: ...


@attrs.define
class TaskStats:
    """Task outcomes and runtimes by engine and task name (a bounded label set),
    and what the reconciler last counted: stuck tasks, queue depths."""

    finished: Counter[tuple[str, str, str]] = attrs.field(factory=Counter)  # engine, name, state
    runtime: dict[tuple[str, str], Histogram] = attrs.field(factory=dict)
    stuck: dict[str, int] = attrs.field(factory=dict)  # by engine
    queue_depth: dict[tuple[str, str], int] = attrs.field(factory=dict)  # engine, queue
    _labels: set[tuple[str, str]] = attrs.field(factory=set)

    def label(self, engine: str, name: str | None) -> str:
        """The task label of ``name``: itself while there is room, else "other"."""
        key = (engine, name or "")
        if key in self._labels:
            return key[1]
        if len(self._labels) < MAX_TASK_LABELS:
            self._labels.add(key)
            return key[1]
        return "other"

    def observe_finished(self, tasks: Iterable[FinishedTask]) -> None:
        """Count tasks the drain just finished (the store's ``on_tasks``)."""
        for task in tasks:
            self.observe(task.engine, task.name, task.state, task.runtime_ms)

    def observe(self, engine: str, name: str | None, state: str, runtime_ms: float | None) -> None:
        label = self.label(engine, name)
        self.finished[engine, label, state] += 1
        if runtime_ms is not None and runtime_ms >= 0:
            histogram = self.runtime.get((engine, label))
            if histogram is None:
                histogram = self.runtime[engine, label] = Histogram(RUNTIME_BUCKETS)
            histogram.observe(runtime_ms / 1000)


# A call to a peer region, seconds: a LAN round trip to a deadline's worth.
FEDERATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@attrs.define
class FederationStats:
    """What a hub knows of its peer regions (brain/federation/client.py), and
    the cross-region commands refused here, hub or peer side. Peers are a
    configured few, routes and reasons fixed sets: bounded labels."""

    peer_up: dict[str, int] = attrs.field(factory=dict)  # by peer: 1 last call answered
    request_seconds: dict[str, Histogram] = attrs.field(factory=dict)  # by peer
    partial: Counter[str] = attrs.field(factory=Counter)  # by route template
    refused_writes: Counter[str] = attrs.field(factory=Counter)  # by reason
    busy: int = 0  # federated reads refused: every fan-out slot taken (503)

    def observe_call(self, peer: str, seconds: float) -> None:
        histogram = self.request_seconds.get(peer)
        if histogram is None:
            histogram = self.request_seconds[peer] = Histogram(FEDERATION_BUCKETS)
        histogram.observe(max(seconds, 0.0))


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
    # Store calls by operation (the store method's name), from the Trio side.
    db_queries: dict[str, Histogram] = attrs.field(factory=dict)
    # Commands that reached a final state here, by state, and minted-to-final seconds.
    commands_finished: Counter[str] = attrs.field(factory=Counter)
    command_seconds: dict[str, Histogram] = attrs.field(factory=dict)
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
    # Staged schedule frames dropped: oversize, over_bound, expired (store/schedule_frames.py).
    schedule_frames_dropped: Counter[str] = attrs.field(factory=Counter)
    # OpAMP (brain/http/opamp.py): messages by type (status, heartbeat,
    # disconnect), refusals by reason, and state writes by kind (full,
    # last_seen, coalesced: none; config_status: a remote configuration's status).
    opamp_messages: Counter[str] = attrs.field(factory=Counter)
    opamp_rejected: Counter[str] = attrs.field(factory=Counter)
    opamp_writes: Counter[str] = attrs.field(factory=Counter)
    # Agents served by transport: open WebSocket sessions, and HTTP agents
    # heard by this replica within the heartbeat window (brain/opamp_fleet.py).
    opamp_sessions: Counter[str] = attrs.field(factory=Counter)
    # Configuration changes for agents: pushed on a session here (local),
    # announced to the other replicas (forwarded), or no session (no_session).
    opamp_dispatch: Counter[str] = attrs.field(factory=Counter)
    opamp_pushes: int = 0  # configurations pushed on a WebSocket unasked
    # Set by the rollout task on the leader (brain/rollouts.py): rollouts by
    # state, the stage of each running rollout (by id: running rollouts are few),
    # and desired configurations by status.
    opamp_rollouts: dict[str, int] = attrs.field(factory=dict)
    opamp_rollout_stage: dict[str, int] = attrs.field(factory=dict)
    opamp_config_status: dict[str, int] = attrs.field(factory=dict)
    tasks: TaskStats = attrs.field(factory=TaskStats)
    federation: FederationStats = attrs.field(factory=FederationStats)
    # Set by the heartbeat, for its ``instances`` row (not /metrics): records/s
    # over its last interval.
    ingest_rate: float = 0.0
    drain_rate: float = 0.0

    def observe_query(self, operation: str, seconds: float) -> None:
        """A store call's time (the stores' ``observe_query``)."""
        histogram = self.db_queries.get(operation)
        if histogram is None:
            histogram = self.db_queries[operation] = Histogram()
        histogram.observe(seconds)

    def observe_command(self, state: str, seconds: float) -> None:
        """A command reached final ``state`` ``seconds`` after it was minted."""
        self.commands_finished[state] += 1
        histogram = self.command_seconds.get(state)
        if histogram is None:
            histogram = self.command_seconds[state] = Histogram(COMMAND_BUCKETS)
        histogram.observe(max(seconds, 0.0))


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
