"""``/metrics``: the brain's counters in the Prometheus text format.

Nothing here runs on the hot path. The ingest, agent and drain code bump
plain integers on `BrainStats`; at scrape time `BrainCollector` reads them,
with the buffer's and the pool's state, and renders metric families. Each
brain has its own registry, so several brains in one process (tests, an
embedding program) do not mix.

Prometheus' conventions: counters and histograms, never a precomputed rate
(``rate()`` is PromQL's); gauges only for levels (depth, connections,
leadership); every label takes the values it names, from a bounded set (route
templates, not paths); the process's and Python's families are the standard
collectors' (``process_*``, ``python_*``); the info metric's labels are not
Prometheus' own target labels (``instance``, ``job``).

Every metric is listed, with its type, labels and meaning, in
docs/operations.md; ``tests/test_metrics.py`` checks the two agree, and
``tests/test_deploy_promql.py`` checks deploy/'s dashboard and alerts use
only those.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from .._version import __version__
from ..buffer import Buffer
from ..opamp_rollouts import ROLLOUT_STATES
from ..stats import COMMAND_BUCKETS, BrainStats, Histogram, HttpStats
from ..store.base import FINAL_COMMAND_STATES
from ..store.replica import ReplicaStatistics

__all__ = ["CONTENT_TYPE_LATEST", "BrainCollector", "brain_registry", "render"]

FINAL_STATES = sorted(FINAL_COMMAND_STATES)


def brain_registry(
    stats: BrainStats,
    buffer: Buffer,
    *,
    replica: str,
    replica_id: str,
    pool_statistics: Callable[[], Any] | None = None,
    http_stats: HttpStats | None = None,
    readiness: Callable[[], Mapping[str, str]] | None = None,
    read_replica: Callable[[], ReplicaStatistics] | None = None,
) -> CollectorRegistry:
    """A registry with this brain's metrics and the standard process and Python ones.

    ``replica``: this process's name in ``instances`` (Z4J_INSTANCE_NAME, or
    host:pid); ``replica_id``: its id there. ``readiness``: the readiness
    checks' last verdicts, by check (``"ok"`` or why not). ``read_replica``:
    the read replica's counts, when there is one (Z4J_DATABASE_READ_URL).
    """
    registry = CollectorRegistry(auto_describe=True)
    registry.register(
        BrainCollector(
            stats,
            buffer,
            replica=replica,
            replica_id=replica_id,
            pool_statistics=pool_statistics,
            http_stats=http_stats or HttpStats(),
            readiness=readiness,
            read_replica=read_replica,
        )
    )
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


class BrainCollector(Collector):
    def __init__(
        self,
        stats: BrainStats,
        buffer: Buffer,
        *,
        replica: str,
        replica_id: str,
        pool_statistics: Callable[[], Any] | None,
        http_stats: HttpStats,
        readiness: Callable[[], Mapping[str, str]] | None,
        read_replica: Callable[[], ReplicaStatistics] | None = None,
    ) -> None:
        self._stats = stats
        self._http = http_stats
        self._buffer = buffer
        self._replica = replica
        self._replica_id = replica_id
        self._pool_statistics = pool_statistics
        self._readiness = readiness
        self._read_replica = read_replica

    def collect(self) -> Iterator[Metric]:
        s = self._stats
        info = GaugeMetricFamily(
            "z4j_build_info",
            "Always 1: this brain's version, and its replica's name and id in instances",
            labels=["version", "replica", "replica_id"],
        )
        info.add_metric([__version__, self._replica, self._replica_id], 1)
        yield info
        if self._readiness is not None:
            checks = self._readiness()
            yield _gauge(
                "z4j_ready",
                "1 when every readiness check passes (/health/ready answers 200)",
                float(all(verdict == "ok" for verdict in checks.values())),
            )
            ready_checks = GaugeMetricFamily(
                "z4j_ready_check",
                "1 per readiness check that passes, 0 per one that fails",
                labels=["check"],
            )
            for check, verdict in sorted(checks.items()):
                ready_checks.add_metric([check], float(verdict == "ok"))
            yield ready_checks

        # -- ingest (TCP) ----------------------------------------------------------
        yield _gauge(
            "z4j_ingest_connections_open", "Open ingest connections", s.ingest_connections_open
        )
        yield _counter(
            "z4j_ingest_connections", "Ingest connections accepted", s.ingest_connections_total
        )
        payloads = CounterMetricFamily(
            "z4j_ingest_payloads",
            "Ingest payloads answered, by outcome (ok, or the rejection reason)",
            labels=["outcome"],
        )
        payloads.add_metric(["ok"], s.ingest_payloads_ok)
        for reason, n in sorted(s.ingest_rejected.items()):
            payloads.add_metric([reason], n)
        yield payloads
        yield _counter(
            "z4j_ingest_records", "Records in payloads answered 2:OK", s.ingest_records_ok
        )
        yield _counter("z4j_ingest_pings", "Ingest pings answered", s.ingest_pings)

        # -- HTTP port ---------------------------------------------------------------
        http = self._http
        yield _gauge(
            "z4j_http_connections_open",
            "Open HTTP connections (agent and dashboard WebSockets included)",
            http.connections_open,
        )
        yield _counter("z4j_http_connections", "HTTP connections accepted", http.connections_total)
        yield _counter(
            "z4j_http_connections_refused",
            "HTTP connections answered 503 at Z4J_HTTP_MAX_CONNECTIONS",
            http.connections_refused,
        )
        requests = CounterMetricFamily(
            "z4j_http_requests",
            "HTTP requests answered, by route template, method and status",
            labels=["route", "method", "status"],
        )
        for (route, method, status), n in sorted(http.requests.items()):
            requests.add_metric([route, method, status], n)
        yield requests
        request_seconds = HistogramMetricFamily(
            "z4j_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template and method",
            labels=["route", "method"],
        )
        for (route, method), histogram in sorted(http.request_seconds.items()):
            request_seconds.add_metric(
                [route, method], buckets=_buckets(histogram), sum_value=histogram.sum
            )
        yield request_seconds

        # -- agents ----------------------------------------------------------------
        yield _gauge(
            "z4j_agent_sessions",
            "Live agent sessions (workers) on this brain",
            s.agent_sessions_open,
        )
        frames = CounterMetricFamily(
            "z4j_agent_frames_received", "Agent frames accepted, by frame type", labels=["type"]
        )
        for kind, n in sorted(s.agent_frames.items()):
            frames.add_metric([kind], n)
        yield frames
        rejected = CounterMetricFamily(
            "z4j_agent_rejections",
            "Agent connections, frames and batches refused, by reason",
            labels=["reason"],
        )
        for reason, n in sorted(s.agent_rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected
        for name, documentation, label, counts in (
            (
                "z4j_opamp_messages",
                "OpAMP messages accepted, by type (status, heartbeat, disconnect)",
                "type",
                s.opamp_messages,
            ),
            (
                "z4j_opamp_frames_rejected",
                "OpAMP requests and messages refused, by reason",
                "reason",
                s.opamp_rejected,
            ),
        ):
            family = CounterMetricFamily(name, documentation, labels=[label])
            for value, n in sorted(counts.items()):
                family.add_metric([value], n)
            yield family
        writes = CounterMetricFamily(
            "z4j_opamp_state_writes",
            "OpAMP agent-state write statements: a full row, a last_seen flush (many agents),"
            " a remote configuration's status",
            labels=["kind"],
        )
        for kind in ("full", "last_seen", "config_status"):
            writes.add_metric([kind], s.opamp_writes[kind])
        yield writes
        yield _counter(
            "z4j_opamp_last_seen_rows",
            "Agent rows the last_seen flushes wrote",
            s.opamp_writes["last_seen_rows"],
        )
        yield _counter(
            "z4j_opamp_messages_coalesced",
            "OpAMP messages that wrote nothing (last_seen fresh or already queued)",
            s.opamp_writes["coalesced"],
        )
        sessions = GaugeMetricFamily(
            "z4j_opamp_active_sessions",
            "OpAMP agents served by this brain: open WebSocket sessions, and HTTP agents"
            " heard within Z4J_OPAMP_HEARTBEAT_WINDOW_SECONDS",
            labels=["transport"],
        )
        for transport in ("http", "websocket"):
            sessions.add_metric([transport], s.opamp_sessions[transport])
        yield sessions
        opamp_dispatch = CounterMetricFamily(
            "z4j_opamp_dispatch",
            "OpAMP configuration changes for an agent: pushed on a session here (local),"
            " announced to other replicas (forwarded), or with no live session (no_session)",
            labels=["route"],
        )
        for route in ("local", "forwarded", "no_session"):
            opamp_dispatch.add_metric([route], s.opamp_dispatch[route])
        yield opamp_dispatch
        yield _counter(
            "z4j_opamp_pushes",
            "OpAMP configurations pushed to a WebSocket agent unasked",
            s.opamp_pushes,
        )
        for name, documentation, label, gauge in (
            (
                "z4j_opamp_rollouts",
                "OpAMP rollouts by state (running, halted, completed, cancelled;"
                " set by the leader)",
                "state",
                {state: s.opamp_rollouts.get(state, 0) for state in ROLLOUT_STATES},
            ),
            (
                "z4j_opamp_rollout_stage",
                "The stage each running OpAMP rollout has assigned, by rollout id"
                " (running rollouts only; set by the leader)",
                "rollout",
                s.opamp_rollout_stage,
            ),
            (
                "z4j_opamp_config_status",
                "OpAMP agents' desired configurations by status (pending, applying,"
                " applied, failed; set by the leader)",
                "status",
                s.opamp_config_status,
            ),
        ):
            g = GaugeMetricFamily(name, documentation, labels=[label])
            for value, n in sorted(gauge.items()):
                g.add_metric([value], n)
            yield g
        yield _counter(
            "z4j_agent_events",
            "Agent events acknowledged (durable in the buffer)",
            s.agent_events_ok,
        )
        dispatch = CounterMetricFamily(
            "z4j_command_dispatch",
            "Commands sent to a worker on this brain (local), or minted with none live (no_session)",
            labels=["route"],
        )
        for route in ("local", "forwarded", "no_session"):
            dispatch.add_metric([route], s.command_dispatch[route])
        yield dispatch
        finished = CounterMetricFamily(
            "z4j_commands_finished",
            "Commands that reached a final state on this brain: completed, failed,"
            " timeout, cancelled",
            labels=["state"],
        )
        for state in FINAL_STATES:
            finished.add_metric([state], s.commands_finished[state])
        yield finished
        command_seconds = HistogramMetricFamily(
            "z4j_command_duration_seconds",
            "Time from a command's minting to its final state, by that state",
            labels=["state"],
        )
        for state in FINAL_STATES:
            histogram = s.command_seconds.get(state) or Histogram(COMMAND_BUCKETS)
            command_seconds.add_metric(
                [state], buckets=_buckets(histogram), sum_value=histogram.sum
            )
        yield command_seconds
        yield _counter(
            "z4j_command_sweep_deliveries",
            "Commands the one-second sweep delivered (a notification was missed or late)",
            s.sweep_deliveries,
        )

        # -- replica registry --------------------------------------------------------
        ownership = CounterMetricFamily(
            "z4j_registry_ownership",
            "Agent session ownership changes: new, renewed, takeover (from another replica), lost",
            labels=["outcome"],
        )
        for outcome in ("new", "renewed", "takeover", "lost"):
            ownership.add_metric([outcome], s.ownership[outcome])
        yield ownership
        notifications = CounterMetricFamily(
            "z4j_registry_notifications", "NOTIFY messages received, by channel", labels=["channel"]
        )
        for channel, n in sorted(s.notifications.items()):
            notifications.add_metric([channel], n)
        yield notifications
        yield _counter(
            "z4j_registry_listener_reconnects",
            "Times the LISTEN connection was lost and opened again",
            s.listener_reconnects,
        )
        yield _counter(
            "z4j_registry_lease_acquisitions",
            "Times this replica took the leader lease",
            s.lease_acquisitions,
        )
        yield _gauge(
            "z4j_registry_leader", "1 while this replica holds the leader lease", float(s.leader)
        )

        # -- dashboard ---------------------------------------------------------------
        yield _gauge(
            "z4j_dashboard_subscribers", "Live /ws/dashboard subscribers", s.dashboard_subscribers
        )
        yield _counter(
            "z4j_dashboard_messages", "Dashboard messages published", s.dashboard_messages
        )
        yield _counter(
            "z4j_dashboard_coalesced",
            "Dashboard event messages merged into one already queued",
            s.dashboard_coalesced,
        )
        yield _counter(
            "z4j_dashboard_drops",
            "Dashboard subscribers dropped for falling behind",
            s.dashboard_drops,
        )

        # -- buffer ----------------------------------------------------------------
        buffer = self._buffer.statistics()
        yield _gauge("z4j_buffer_depth_rows", "Payloads in the buffer file", buffer.depth)
        yield _gauge("z4j_buffer_capacity_rows", "Z4J_BUFFER_MAX_ROWS", buffer.max_rows)
        yield _gauge(
            "z4j_buffer_utilisation_ratio",
            "Buffer depth (and admitted, uncommitted rows) over capacity",
            (buffer.depth + buffer.reserved) / buffer.max_rows,
        )
        yield _counter("z4j_buffer_commits", "Buffer group commits", buffer.commits_total)
        yield _gauge(
            "z4j_dead_letter_rows",
            "Payloads in this buffer's dead_letter table",
            buffer.dead_letter_rows,
        )
        yield _counter(
            "z4j_dead_letters_requeued",
            "Dead letters put back for the drain (API and CLI; kept in the buffer file)",
            buffer.dead_letters_requeued,
        )
        yield _counter(
            "z4j_dead_letters_discarded",
            "Dead letters deleted (API and CLI; kept in the buffer file)",
            buffer.dead_letters_discarded,
        )
        yield _counter(
            "z4j_buffer_appended_rows", "Payloads written to the buffer", buffer.appended_total
        )
        yield _counter(
            "z4j_buffer_completed_rows",
            "Buffered payloads the drains are done with (stored or set aside)",
            buffer.completed_total,
        )

        # -- drain -----------------------------------------------------------------
        yield _counter("z4j_drain_batches", "Batches drained into the store", s.drain_batches)
        yield _counter("z4j_drain_records", "Records stored by the drains", s.drain_records_stored)
        yield _counter(
            "z4j_drain_failures", "Drain batches that failed (retried)", s.drain_failures
        )
        yield _counter(
            "z4j_drain_quarantined_rows",
            "Buffered payloads the store refused, moved to dead_letter",
            s.drain_quarantined,
        )
        yield _histogram(
            "z4j_drain_batch_duration_seconds",
            "Time to store one drained batch",
            s.drain_batch_seconds,
        )

        # -- tasks (the projection; names past MAX_TASK_LABELS count as "other") ------
        t = s.tasks
        finished = CounterMetricFamily(
            "z4j_tasks_finished",
            "Task runs the projection saw end, by engine, task name and state",
            labels=["engine", "task", "state"],
        )
        for (engine, name, state), n in sorted(t.finished.items()):
            finished.add_metric([engine, name, state], n)
        yield finished
        runtime = HistogramMetricFamily(
            "z4j_task_runtime_seconds",
            "Runtime of finished tasks (last attempt), by engine and task name",
            labels=["engine", "task"],
        )
        for (engine, name), histogram in sorted(t.runtime.items()):
            runtime.add_metric([engine, name], buckets=_buckets(histogram), sum_value=histogram.sum)
        yield runtime
        stuck = GaugeMetricFamily(
            "z4j_tasks_stuck",
            "Tasks received or started longer ago than Z4J_TASK_STUCK_SECONDS, "
            "by engine (counted by the reconciler)",
            labels=["engine"],
        )
        for engine, n in sorted(t.stuck.items()):
            stuck.add_metric([engine], n)
        yield stuck
        depth = GaugeMetricFamily(
            "z4j_queue_depth",
            "Messages waiting, from the workers' last heartbeats (read by the reconciler)",
            labels=["engine", "queue"],
        )
        for (engine, queue), n in sorted(t.queue_depth.items()):
            depth.add_metric([engine, queue], n)
        yield depth

        # -- schedules ---------------------------------------------------------------
        frames_dropped = CounterMetricFamily(
            "z4j_schedule_frames_dropped",
            "Staged schedule snapshot frames dropped: oversize, over_bound, expired",
            labels=["reason"],
        )
        for reason in ("oversize", "over_bound", "expired"):
            frames_dropped.add_metric([reason], s.schedule_frames_dropped[reason])
        yield frames_dropped

        # -- federation (brain/federation/client.py, the federation routes) ---------
        fed = s.federation
        peer_up = GaugeMetricFamily(
            "z4j_federation_peer_up",
            "1 when the hub's last read of the peer region answered (2xx, in its deadline)",
            labels=["peer"],
        )
        for peer, up in sorted(fed.peer_up.items()):
            peer_up.add_metric([peer], up)
        yield peer_up
        peer_seconds = HistogramMetricFamily(
            "z4j_federation_request_duration_seconds",
            "Calls to a peer region, by peer: answered, refused or cut at the deadline",
            labels=["peer"],
        )
        for peer, histogram in sorted(fed.request_seconds.items()):
            peer_seconds.add_metric([peer], buckets=_buckets(histogram), sum_value=histogram.sum)
        yield peer_seconds
        partial = CounterMetricFamily(
            "z4j_federation_partial_responses",
            "Federated answers that lacked a region (marked partial), by route",
            labels=["route"],
        )
        for route, n in sorted(fed.partial.items()):
            partial.add_metric([route], n)
        yield partial
        refused = CounterMetricFamily(
            "z4j_federation_refused_writes",
            "Cross-region commands refused here: not_confirmed, not_granted (a read-only "
            "token), peer_refused (the region said no)",
            labels=["reason"],
        )
        for reason, n in sorted(fed.refused_writes.items()):
            refused.add_metric([reason], n)
        yield refused
        yield CounterMetricFamily(
            "z4j_federation_busy",
            "Federated requests refused with 503: every fan-out slot of the hub was taken",
            value=fed.busy,
        )

        # -- store -----------------------------------------------------------------
        queries = HistogramMetricFamily(
            "z4j_db_query_duration_seconds",
            "Store calls by operation (the store method), from the Trio side"
            " (waiting for a connection included)",
            labels=["operation"],
        )
        for operation, histogram in sorted(s.db_queries.items()):
            queries.add_metric([operation], buckets=_buckets(histogram), sum_value=histogram.sum)
        yield queries
        if self._pool_statistics is not None:
            pool = self._pool_statistics()
            connections = GaugeMetricFamily(
                "z4j_db_pool_connections", "Postgres pool connections by state", labels=["state"]
            )
            connections.add_metric(["in_use"], pool.in_use)
            connections.add_metric(["idle"], pool.idle)
            yield connections
            yield _gauge("z4j_db_pool_size", "Z4J_DB_POOL_SIZE", pool.size)
            yield _gauge(
                "z4j_db_pool_waiting", "Tasks waiting for a pooled connection", pool.waiting
            )
        if self._read_replica is not None:
            yield from _read_replica_metrics(self._read_replica())


def _read_replica_metrics(r: ReplicaStatistics) -> Iterator[Metric]:
    yield _gauge(
        "z4j_read_replica_serving",
        "1 while API reads go to the read replica, 0 while they fall back to the primary",
        float(r.serving),
    )
    lag = GaugeMetricFamily(
        "z4j_read_replica_lag_seconds",
        "Replication lag of the read replica as last measured on it (no sample when unknown)",
    )
    if r.lag_seconds is not None:
        lag.add_metric([], r.lag_seconds)
    yield lag
    yield _counter("z4j_read_replica_reads", "Reads the read replica served", r.reads)
    fallbacks = CounterMetricFamily(
        "z4j_read_replica_fallbacks",
        "Reads that could have gone to the read replica and went to the primary, by reason",
        labels=["reason"],
    )
    for reason, n in r.fallbacks.items():
        fallbacks.add_metric([reason], n)
    yield fallbacks


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _histogram(name: str, documentation: str, histogram: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(
        name, documentation, buckets=_buckets(histogram), sum_value=histogram.sum
    )


def _buckets(histogram: Histogram) -> list[tuple[str, float]]:
    """Cumulative buckets as the exposition writes them: "le" text, count."""
    return [
        ("+Inf" if bound == float("inf") else repr(bound), count)
        for bound, count in histogram.cumulative()
    ]
