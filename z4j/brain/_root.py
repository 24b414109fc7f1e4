"""The composition root: build every service, nest their nurseries, report.

It only assembles. Each service is finished when its constructor returns:
hooks are constructor arguments, and where two services would need each
other they are both handed one small object from `z4j.brain.links` built first
(tests/test_wiring.py holds the rules).

Start order follows dependencies, each step through ``nursery.start`` so
that it returns only once the service can serve:

    store migrations (retried in the background until the store answers)
    → group-commit writer → drains → ingest server → agent endpoint →
    command sweep → registry → the read replica's probe (with
    Z4J_DATABASE_READ_URL) → federation peers' connections → HTTP →
    heartbeat → maintenance → the
    reconciler, schedule streams and OpAMP rollouts → report addresses.

Any child failing cancels the tree. A graceful stop (``shutdown`` set) runs
from the inside out, because that is how the nurseries nest (as hypercorn
nests lifespan ⊃ server ⊃ accept), under a deadline of
Z4J_SHUTDOWN_GRACE_SECONDS:

    supporting layer ⊃ heartbeat layer ⊃ drain layer ⊃ writer layer ⊃ producers

    producers stop on ``shutdown``: ingest stops accepting and connections
    answer what they hold, agents get 1001, HTTP requests in flight finish
    → the writer commits what they queued → drains finish the batch in hand
    (rows not drained stay in the buffer file for the next start) → last
    heartbeat (``stopped_at``) → the command sweep, the registry and
    maintenance return → what is left around them (migrations, the
    deadline, the first admin token) is cancelled.

Nothing acknowledged can be lost on any of these paths, graceful or not:
an acknowledgement is only ever sent after its rows are committed in the
buffer file, and rows leave that file only after the store has them.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import attrs
import trio

from .. import keys
from .._datadir import SqliteBrainLock, check_single_brain
from .._fds import with_descriptor_caps
from .._federation_peers import load_peers
from .._net import bind_ports, open_tcp_socket
from ..buffer import Buffer
from ..config import Config, check_bind_is_safe
from ..stats import BrainStats, HttpStats
from ..store import health_checks as store_health_checks
from ..store import health_notes as store_health_notes
from ..store import migrate_until_ready, store_for
from ..store.base import Agent
from .agents import AgentEndpoint, Session
from .commands import Commands
from .dashboard_hub import DashboardHub
from .drain import Drainer
from .federation.client import FederationClient
from .heartbeat import Heartbeat, instance_info
from .http.api import Api
from .http.auth import Auth, announce_setup, sign_in_url
from .http.dashboard_page import dashboard_pages
from .http.dead_letters_api import DeadLetterRoutes
from .http.federation_api import FederationRoutes
from .http.federation_peer_api import PeerRoutes
from .http.opamp import OPAMP_PATH, OpampEndpoint
from .http.opamp_ws import OpampSession, OpampSockets
from .http.provisioning_api import ProvisioningRoutes
from .http.resources import to_json
from .http.server import HealthChecks, build_app, serve_http, tls_context
from .ingest import IngestServer
from .lifetime import grace_deadline, layer
from .links import (
    CommandSignals,
    DashboardOutbox,
    OpampNudges,
    OpampSessionTable,
    SessionTable,
)
from .maintenance import Maintenance
from .metrics import brain_registry, render
from .opamp_fleet import OpampFleet
from .read_replica import serve_read_replica
from .reconciler import Reconciler
from .registry import registry_for, replicated
from .rollouts import Rollouts
from .schedule_streams import ScheduleStreams

__all__ = ["Brain", "serve_brain"]

log = logging.getLogger("z4j.brain")


@attrs.frozen(kw_only=True)
class Brain:
    """A running brain: where it listens (the real ports, when 0 was asked
    for), its instance id, and its command service."""

    ingest: tuple[str, int]
    http: tuple[str, int]
    instance_id: uuid.UUID
    commands: Commands = attrs.field(repr=False)
    opamp: tuple[str, int] | None = None  # Z4J_OPAMP_BIND's listener, when set

    @property
    def http_url(self) -> str:
        host, port = self.http
        return f"http://{host}:{port}"


async def serve_brain(
    config: Config,
    *,
    shutdown: trio.Event | None = None,
    stats: BrainStats | None = None,
    clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[Brain] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a brain until cancelled, or until ``shutdown`` is set (graceful).

    ``clock``: the wall clock the grace periods of rotated agent tokens and
    signing secrets start from and end by (tests move it past a grace).

    Reports a `Brain` (addresses, command service) when every service is ready::

        brain = await nursery.start(z4j.serve_brain, config)
    """
    # Refusals first, then the ports: a brain that cannot serve creates,
    # locks and migrates nothing.
    check_bind_is_safe(config)
    peers = load_peers(config)  # a bad peers file refuses the start
    check_single_brain(config)
    tls_context(config)  # a lone or unreadable TLS file
    # Services get caps that fit the descriptor limit (see z4j._fds).
    config = with_descriptor_caps(config)
    stats = stats if stats is not None else BrainStats()
    instance_id = uuid.uuid4()
    ingest_sock, http_sock = bind_ports(config)
    opamp_sock = None
    if config.opamp_bind is not None:
        try:
            opamp_sock = open_tcp_socket(config.opamp_bind, reuse_port=config.so_reuseport)
        except BaseException:
            ingest_sock.close()
            http_sock.close()
            raise
    brain_lock = None
    try:
        brain_lock = None if config.uses_postgres else SqliteBrainLock(config.data_dir)
        buffer = await Buffer.open(config.resolved_buffer_path, max_rows=config.buffer_max_rows)
    except BaseException:
        ingest_sock.close()
        http_sock.close()
        if brain_lock is not None:
            brain_lock.release()
        raise
    store = store_for(
        config,
        application_name=f"z4j-{instance_id.hex[:8]}",
        observe_query=stats.observe_query,
        on_tasks=stats.tasks.observe_finished,
        on_frames_dropped=stats.schedule_frames_dropped.update,
    )
    shutdown = shutdown if shutdown is not None else trio.Event()  # None: until cancelled
    try:
        # Tasks that are not services (migrations, the grace deadline, the
        # first admin token) run here and are cancelled last.
        async with trio.open_nursery() as support:
            store_ready = trio.Event()
            support.start_soon(migrate_until_ready, store, store_ready)
            support.start_soon(
                grace_deadline, shutdown, config.shutdown_grace_seconds, support.cancel_scope
            )

            # The links first: each is handed to both sides of a meeting
            # that would otherwise make two services hold each other.
            sessions: SessionTable[Session] = SessionTable()
            signals = CommandSignals()
            nudges = OpampNudges(replicated=replicated(config, store.pool))
            opamp_sessions: OpampSessionTable[OpampSession] = OpampSessionTable()
            outbox = DashboardOutbox() if replicated(config, store.pool) else None
            master = keys.master_secret(config)  # read once: a file on first use
            auth = Auth(
                store,
                master,
                session_seconds=config.session_max_seconds,
                idle_seconds=config.session_idle_seconds,
            )
            hub = DashboardHub(
                stats,
                auth,
                instance_id=str(instance_id),
                relay=None if outbox is None else outbox.put,
            )
            registry = registry_for(
                config,
                store.pool,
                stats,
                instance_id=instance_id,
                store_ready=store_ready,
                sessions=sessions,
                signals=signals,
                on_dashboard=hub.publish_local,
                outbox=outbox,
                opamp_sessions=opamp_sessions,
                nudges=nudges,
            )
            drainer = Drainer(
                buffer,
                store,
                stats,
                batch_rows=config.drain_batch_rows,
                lease_seconds=config.drain_lease_seconds,
                batch_bytes=config.drain_batch_bytes,
                store_ready=store_ready,
                linger_seconds=config.drain_linger_ms / 1000,
                on_stored=functools.partial(hub.publish_stored, buffer.buffer_id),
            )
            ingest = IngestServer(config, buffer, stats)
            commands = Commands(
                store,
                stats=stats,
                master_secret=master,
                sessions=sessions,
                signals=signals,
                replicas=registry,
                store_ready=store_ready,
                on_change=lambda record: hub.publish(
                    {"type": "command", "command": to_json(record)}
                ),
            )
            streams = ScheduleStreams(
                store,
                commands,
                store_ready=store_ready,
                is_leader=lambda: registry.is_leader,
            )

            def worker_changed(agent: Agent, worker_id: str, state: str) -> None:
                hub.publish(
                    {
                        "type": "agent",
                        "agent_id": str(agent.id),
                        "project_id": str(agent.project_id),
                        "worker_id": worker_id,
                        "state": state,
                    }
                )
                streams.worker_changed(agent.id, worker_id, state)

            agents = AgentEndpoint(
                config,
                store,
                buffer,
                stats,
                instance_id=instance_id,
                store_ready=store_ready,
                sessions=sessions,
                commands=commands,
                ownership=registry,
                on_worker=worker_changed,
                clock=clock,
            )
            rollouts = Rollouts(
                store,
                stats,
                store_ready=store_ready,
                nudges=nudges,
                on_change=lambda item: hub.publish({"type": "opamp_rollout", "rollout": item}),
                is_leader=lambda: registry.is_leader,
            )

            def opamp_agent_changed(project_id: uuid.UUID, instance_uid: str, what: str) -> None:
                hub.publish(
                    {
                        "type": "opamp_agent",
                        "project_id": str(project_id),
                        "instance_uid": instance_uid,
                        "change": what,
                    }
                )
                if what == "config":
                    rollouts.poke()  # an acknowledgement may end a stage: look now

            fleet = OpampFleet(
                store,
                master,
                stats,
                max_message_bytes=config.opamp_max_message_bytes,
                heartbeat_window_seconds=config.opamp_heartbeat_window_seconds,
                # One brain per SQLite store: no other process writes OpAMP state.
                sole_writer=(lambda: nudges.generation) if store.kind == "sqlite" else None,
                on_change=opamp_agent_changed,
            )
            opamp_sockets = OpampSockets(
                fleet,
                stats,
                table=opamp_sessions,
                ownership=registry,
                nudges=nudges,
                heartbeat_window_seconds=config.opamp_heartbeat_window_seconds,
                store_ready=store_ready,
            )
            opamp_http = OpampEndpoint(fleet, stats, store_ready=store_ready)

            def rollout_changed(item: dict[str, Any]) -> None:
                hub.publish({"type": "opamp_rollout", "rollout": item})
                rollouts.poke()  # a new or resumed rollout starts now, not at the next round

            health = HealthChecks(
                {
                    **store_health_checks(store, store_ready),
                    **buffer.health_checks(),
                    **registry.health_checks(),
                },
                notes=store_health_notes(store),
            )
            instance_row = instance_info(config, instance_id, buffer)
            federation = FederationClient(
                peers,
                stats.federation,
                region=config.region_name,
                timeout_seconds=config.federation_timeout_ms / 1000,
                cache_seconds=config.federation_cache_ms / 1000,
                max_response_bytes=config.federation_max_response_bytes,
            )
            region = PeerRoutes(
                store,
                commands,
                stats.federation,
                region=config.region_name,
                readiness=health.run,
                live_seconds=max(3 * config.heartbeat_seconds, 5.0),
                clock=clock,
            )
            http_stats = HttpStats()
            app = build_app(
                health,
                metrics_token=config.metrics_token,
                metrics=functools.partial(
                    render,
                    brain_registry(
                        stats,
                        buffer,
                        replica=instance_row.name,
                        replica_id=str(instance_id),
                        pool_statistics=None if store.pool is None else store.pool.statistics,
                        http_stats=http_stats,
                        readiness=lambda: health.last,
                        read_replica=(
                            None if store.read_replica is None else store.read_replica.statistics
                        ),
                    ),
                ),
                api=Api(
                    store,
                    commands,
                    auth,
                    project_key=functools.partial(keys.project_key, master),
                    opamp_heartbeat_window_seconds=config.opamp_heartbeat_window_seconds,
                    opamp_nudges=nudges,
                    on_opamp_rollout=rollout_changed,
                    dead_letters=DeadLetterRoutes(
                        store, buffer, instance_id=instance_id, name=instance_row.name
                    ),
                    provisioning=ProvisioningRoutes(
                        store,
                        master,
                        clock=clock,
                        default_grace_seconds=config.rotation_grace_seconds,
                    ),
                    peer=region,
                    federation=FederationRoutes(federation, region, store),
                ),
                pages=dashboard_pages(auth.signed_in),
                opamp=opamp_http,
                stats=http_stats,
            )
            heartbeat = Heartbeat(
                store,
                buffer,
                stats,
                instance_row,
                interval=config.heartbeat_seconds,
                store_ready=store_ready,
                on_beat=lambda info: hub.publish({"type": "instance", "instance": to_json(info)}),
            )
            reconciler = Reconciler(
                store,
                commands,
                stats,
                store_ready=store_ready,
                stuck_seconds=config.task_stuck_seconds,
                interval=config.task_reconcile_seconds,
                is_leader=lambda: registry.is_leader,
            )
            maintenance = Maintenance(
                store,
                retention_days=config.event_retention_days,
                task_retention_days=config.task_retention_days,
                store_ready=store_ready,
                is_leader=lambda: registry.is_leader,
            )
            if registry.backend != "local":
                log.info(
                    "registry: %s (sessions, commands and the dashboard cross replicas)",
                    registry.backend,
                )

            # The nesting is the graceful order: each layer is told to stop
            # when the block inside it has ended. Producers stop on
            # `shutdown` (ingest answers what it holds, agents get 1001, HTTP
            # requests in flight finish) -> the writer commits what they
            # queued -> drains finish the batch in hand -> the last heartbeat
            # -> the command sweep, the registry and maintenance.
            async with (
                layer() as (supporting, support_stop),  # stops last
                layer() as (beating, heartbeat_stop),
                layer() as (draining, drain_stop),
                layer() as (writing, writer_stop),
                trio.open_nursery() as producers,  # stops first, on `shutdown`
            ):
                # Started in dependency order, each once it can serve.
                await writing.start(functools.partial(buffer.serve_writer, shutdown=writer_stop))
                await draining.start(
                    functools.partial(drainer.serve, config.drain_workers, shutdown=drain_stop)
                )
                ingest_address = await producers.start(
                    functools.partial(ingest.serve, ingest_sock, shutdown=shutdown)
                )
                await producers.start(functools.partial(agents.serve, shutdown=shutdown))
                await producers.start(functools.partial(opamp_sockets.serve, shutdown=shutdown))
                await supporting.start(functools.partial(commands.serve, shutdown=support_stop))
                await supporting.start(functools.partial(registry.serve, shutdown=support_stop))
                if store.read_replica is not None:
                    await supporting.start(
                        functools.partial(
                            serve_read_replica, store.read_replica, shutdown=support_stop
                        )
                    )
                await supporting.start(functools.partial(federation.serve, shutdown=support_stop))
                http_address = await producers.start(
                    functools.partial(
                        serve_http,
                        config,
                        app,
                        shutdown=shutdown,
                        stats=http_stats,
                        websockets={
                            "/ws/agent": agents,
                            "/ws/dashboard": hub,
                            OPAMP_PATH: opamp_sockets,
                        },
                        sock=http_sock,
                    )
                )
                opamp_address = None
                if opamp_sock is not None:
                    opamp_address = await producers.start(
                        functools.partial(
                            serve_http,
                            config,
                            build_app(health, opamp=opamp_http, stats=http_stats),
                            shutdown=shutdown,
                            websockets={OPAMP_PATH: opamp_sockets},
                            sock=opamp_sock,
                            bind_setting="Z4J_OPAMP_BIND",
                        )
                    )
                    log.info("opamp listening on %s:%d (Z4J_OPAMP_BIND)", *opamp_address)
                support.start_soon(
                    announce_setup,
                    auth,
                    store_ready,
                    config,
                    sign_in_url(config, http_address),
                )
                await beating.start(functools.partial(heartbeat.serve, shutdown=heartbeat_stop))
                await supporting.start(functools.partial(maintenance.serve, shutdown=support_stop))
                await beating.start(functools.partial(fleet.serve, shutdown=heartbeat_stop))
                await supporting.start(functools.partial(reconciler.serve, shutdown=support_stop))
                await supporting.start(functools.partial(streams.serve, shutdown=support_stop))
                await supporting.start(functools.partial(rollouts.serve, shutdown=support_stop))
                log.info(
                    "brain %s ready: ingest %s:%d, http %s:%d, store %s, buffer %s",
                    instance_id,
                    *ingest_address,
                    *http_address,
                    store.kind,
                    config.resolved_buffer_path,
                )
                task_status.started(
                    Brain(
                        ingest=ingest_address,
                        http=http_address,
                        instance_id=instance_id,
                        commands=commands,
                        opamp=opamp_address,
                    )
                )
            support.cancel_scope.cancel()
    finally:
        # Closed by their servers once handed over; these cover a start cut short.
        ingest_sock.close()
        http_sock.close()
        if opamp_sock is not None:
            opamp_sock.close()
        with trio.CancelScope(shield=True):
            await buffer.aclose()
            await store.aclose()
        if brain_lock is not None:
            brain_lock.release()
        log.info("brain %s stopped", instance_id)
