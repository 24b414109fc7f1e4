"""The supervisor: one root nursery that runs a whole brain.

Start order follows dependencies, each step through ``nursery.start`` so
that it returns only once the service can serve:

    buffer (opened) → group-commit writer → store migrations (retried in
    the background until the store answers) → drains → ingest server →
    HTTP → heartbeat → maintenance (partitions, retention) → report
    addresses.

Any child failing cancels the tree. A graceful stop (``shutdown`` set) runs
in reverse, under a deadline of Z4J_SHUTDOWN_GRACE_SECONDS:

    stop accepting ingest, let connections answer what they hold → the
    writer commits what is queued → drains finish the batch in hand (rows
    not drained stay in the buffer file for the next start) → last
    heartbeat → HTTP stops → cancel whatever is left.

Nothing acknowledged can be lost on any of these paths, graceful or not:
an acknowledgement is only ever sent after its rows are committed in the
buffer file, and rows leave that file only after the store has them.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import sys
import time
import uuid
from pathlib import Path

import attrs
import trio

from . import keys
from ._datadir import SqliteBrainLock, check_single_brain
from ._fds import with_descriptor_caps
from ._net import open_tcp_socket
from .agent_endpoint import AgentEndpoint, Session
from .api import Api
from .auth import Auth
from .buffer import Buffer
from .commands import Commands
from .config import Config, ConfigError, is_loopback_bind
from .dashboard_hub import DashboardHub
from .drain import Drainer
from .heartbeat import Heartbeat
from .http import HealthChecks, HttpStats, Pages, build_app, serve_http, tls_context
from .ingest_server import IngestServer
from .links import CommandSignals, DashboardOutbox, SessionTable
from .maintenance import Maintenance
from .metrics import brain_registry, render
from .registry import Registry, registry_for, replicated
from .resources import to_json
from .stats import BrainStats
from .store import Store, StoreUnavailable, store_for
from .store.base import InstanceInfo

__all__ = ["Brain", "serve_brain"]

log = logging.getLogger("z4j.brain")

MIGRATE_RETRY_SECONDS = 2.0


@attrs.frozen(kw_only=True)
class Brain:
    """A running brain: where it listens (the real ports, when 0 was asked
    for), its instance id, and its command service."""

    ingest: tuple[str, int]
    http: tuple[str, int]
    instance_id: uuid.UUID
    commands: Commands = attrs.field(repr=False)

    @property
    def http_url(self) -> str:
        host, port = self.http
        return f"http://{host}:{port}"


async def _migrate_until_ready(store: Store, ready: trio.Event) -> None:
    """Apply migrations, retrying while the store is unreachable.

    The buffer takes ingest meanwhile; drains and the heartbeat wait on
    ``ready``.
    """
    attempt = 0
    while True:
        try:
            applied = await store.migrate()
        except Exception as exc:
            attempt += 1
            if attempt == 1 or attempt % 30 == 0:
                first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                if isinstance(exc, StoreUnavailable):
                    log.warning(
                        "store not available (%s); ingest goes on into the buffer, "
                        "retrying every %gs",
                        first_line,
                        MIGRATE_RETRY_SECONDS,
                    )
                else:
                    # Reachable but refusing (permissions, a broken schema):
                    # an operator must act; keep trying so the fix is picked up.
                    log.error(
                        "migrating the store failed (%s: %s); ingest goes on into the "
                        "buffer, retrying every %gs",
                        type(exc).__name__,
                        first_line,
                        MIGRATE_RETRY_SECONDS,
                    )
            await trio.sleep(MIGRATE_RETRY_SECONDS)
            continue
        if applied:
            log.info("schema migrated to version %d", applied[-1])
        ready.set()
        return


async def serve_brain(
    config: Config,
    *,
    shutdown: trio.Event | None = None,
    stats: BrainStats | None = None,
    task_status: trio.TaskStatus[Brain] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a brain until cancelled, or until ``shutdown`` is set (graceful).

    Reports a `Brain` (addresses, command service) when every service is ready::

        brain = await nursery.start(z4j.serve_brain, config)
    """
    # Refusals first, then the ports: a brain that cannot serve creates,
    # locks and migrates nothing.
    check_bind_is_safe(config)
    check_single_brain(config)
    tls_context(config)  # a lone or unreadable TLS file
    # Services get caps that fit the descriptor limit (see z4j._fds).
    config = with_descriptor_caps(config)
    stats = stats if stats is not None else BrainStats()
    instance_id = uuid.uuid4()
    ingest_sock, http_sock = _bind_ports(config)
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
        observe_query=stats.db_query_seconds.observe,
    )
    try:
        async with trio.open_nursery() as nursery:
            store_ready = trio.Event()
            http_shutdown = trio.Event()

            writer_done = trio.Event()

            async def run_writer(task_status: trio.TaskStatus[None]) -> None:
                try:
                    await buffer.run_writer(task_status=task_status)
                finally:
                    writer_done.set()

            await nursery.start(run_writer)
            nursery.start_soon(_migrate_until_ready, store, store_ready)

            # The links first: each is handed to both sides of a meeting
            # that would otherwise make two services hold each other.
            sessions: SessionTable[Session] = SessionTable()
            signals = CommandSignals()
            outbox = DashboardOutbox() if replicated(config, store.pool) else None
            auth = Auth(store, keys.master_secret(config))
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
            )
            drainer = Drainer(
                buffer,
                store,
                stats,
                batch_rows=config.drain_batch_rows,
                lease_seconds=config.drain_lease_seconds,
                store_ready=store_ready,
                linger_seconds=config.drain_linger_ms / 1000,
                on_stored=functools.partial(hub.publish_stored, buffer.buffer_id),
            )
            for worker in range(config.drain_workers):
                await nursery.start(drainer.run, worker)

            ingest = IngestServer(config, buffer, stats)
            ingest_done = trio.Event()

            async def run_ingest(task_status: trio.TaskStatus[tuple[str, int]]) -> None:
                try:
                    await ingest.serve(ingest_sock, task_status=task_status)
                finally:
                    ingest_done.set()

            ingest_address = await nursery.start(run_ingest)

            health = _health_checks(store, store_ready, buffer, registry)
            http_stats = HttpStats()
            metrics_registry = brain_registry(
                stats,
                buffer,
                instance_id=str(instance_id),
                pool_statistics=None if store.pool is None else store.pool.statistics,
                http_stats=http_stats,
            )
            commands = Commands(
                store,
                stats=stats,
                master_secret=keys.master_secret(config),
                sessions=sessions,
                signals=signals,
                replicas=registry,
                on_change=lambda record: hub.publish(
                    {"type": "command", "command": to_json(record)}
                ),
            )
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
                on_worker=lambda agent_id, worker_id, state: hub.publish(
                    {
                        "type": "agent",
                        "agent_id": str(agent_id),
                        "worker_id": worker_id,
                        "state": state,
                    }
                ),
            )
            await nursery.start(agents.run)
            await nursery.start(commands.run_sweeper, store_ready)
            api = Api(store, commands, auth)
            if registry.backend != "local":
                log.info(
                    "registry: %s (sessions, commands and the dashboard cross replicas)",
                    registry.backend,
                )
            await nursery.start(registry.run)
            http_done = trio.Event()

            async def run_http(task_status: trio.TaskStatus[tuple[str, int]]) -> None:
                try:
                    await serve_http(
                        config,
                        build_app(
                            health,
                            metrics=functools.partial(render, metrics_registry),
                            api=api,
                            auth=auth,
                            pages=_dashboard_pages(auth),
                        ),
                        shutdown=http_shutdown,
                        stats=http_stats,
                        websockets={"/ws/agent": agents, "/ws/dashboard": hub},
                        sock=http_sock,
                        task_status=task_status,
                    )
                finally:
                    http_done.set()

            http_address = await nursery.start(run_http)
            scheme = "http" if config.tls_cert_file is None else "https"
            sign_in_url = f"{scheme}://{_url_host(config.http_bind, http_address)}/login"
            nursery.start_soon(_announce_admin_token, auth, store_ready, config, sign_in_url)

            info = InstanceInfo(
                id=instance_id,
                name=config.instance_name or f"{socket.gethostname()}:{os.getpid()}",
                host=socket.gethostname(),
                pid=os.getpid(),
                buffer_id=buffer.buffer_id,
                started_at=time.time(),
                last_seen=time.time(),
            )
            heartbeat = Heartbeat(
                store,
                buffer,
                stats,
                info,
                interval=config.heartbeat_seconds,
                store_ready=store_ready,
                on_beat=lambda info: hub.publish({"type": "instance", "instance": to_json(info)}),
            )
            heartbeat_scope = trio.CancelScope()

            async def run_heartbeat(task_status: trio.TaskStatus[None]) -> None:
                with heartbeat_scope:
                    await heartbeat.run(task_status=task_status)

            await nursery.start(run_heartbeat)
            maintenance = Maintenance(
                store,
                retention_days=config.event_retention_days,
                store_ready=store_ready,
                is_leader=lambda: registry.is_leader,
            )
            await nursery.start(maintenance.run)

            brain = Brain(
                ingest=ingest_address, http=http_address, instance_id=instance_id, commands=commands
            )
            log.info(
                "brain %s ready: ingest %s:%d, http %s:%d, store %s, buffer %s",
                instance_id,
                *ingest_address,
                *http_address,
                store.kind,
                config.resolved_buffer_path,
            )
            task_status.started(brain)

            if shutdown is None:
                return  # run until cancelled; the children keep the nursery open
            await shutdown.wait()
            log.info("graceful shutdown: %g s to finish", config.shutdown_grace_seconds)
            with trio.move_on_after(config.shutdown_grace_seconds) as deadline:
                # Producers first (agents get 1001, HTTP requests in flight
                # finish), so the buffer's last commits are theirs.
                ingest.stop_accepting()
                agents.close_all()  # 1001: agents reconnect to another brain
                http_shutdown.set()
                await ingest_done.wait()
                await http_done.wait()
                buffer.close_writer()
                await writer_done.wait()
                drainer.stop()
                await drainer.all_stopped.wait()
                heartbeat_scope.cancel()
                if store_ready.is_set():
                    await heartbeat.beat(stopped=True)
            if deadline.cancelled_caught:
                log.warning("graceful shutdown ran past its deadline; cancelling the rest")
            nursery.cancel_scope.cancel()
    finally:
        # Closed by their servers once handed over; these cover a start cut short.
        ingest_sock.close()
        http_sock.close()
        with trio.CancelScope(shield=True):
            await buffer.aclose()
            await store.aclose()
        if brain_lock is not None:
            brain_lock.release()
        log.info("brain %s stopped", instance_id)


def _url_host(bind: str, address: tuple[str, int]) -> str:
    """HOST:PORT for a URL to this brain: the bound port, the host as configured."""
    host = bind.rpartition(":")[0].strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"


async def _announce_admin_token(
    auth: Auth, store_ready: trio.Event, config: Config, sign_in_url: str
) -> None:
    """On a store with no admin token yet, make one and show it, once."""
    await store_ready.wait()
    try:
        token = await auth.ensure_admin_token()
    except Exception as exc:
        log.warning("could not check for an admin token: %s", exc)
        return
    if token is not None:
        # Logs are kept, shipped and shared: they get the file's path, never the token.
        try:
            path = write_first_admin_token(config, token)
        except OSError as exc:
            log.warning(
                "could not save the first admin token (`z4j admin token` makes one): %s", exc
            )
        else:
            log.warning(
                "first start: an admin token was made and written to %s (readable by this "
                "user only; delete it once you have signed in). Sign in at %s",
                path,
                sign_in_url,
            )
        if sys.stderr.isatty():
            print(f"z4j: the first admin token is {token}", file=sys.stderr, flush=True)


FIRST_ADMIN_TOKEN_FILE = "first-admin-token"


def write_first_admin_token(config: Config, token: str) -> Path:
    """Write the first admin token to a file only this user can read (0600)."""
    config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = config.data_dir / FIRST_ADMIN_TOKEN_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an older file may have been made with another mode
        os.write(fd, (token + "\n").encode())
    finally:
        os.close(fd)
    return path


def _dashboard_pages(auth: Auth) -> Pages | None:
    """The dashboard's static files, when this install has them (the page
    itself only to a signed-in session, whatever path names it)."""
    try:
        from .dashboard_page import dashboard_pages
    except ImportError:
        return None
    return dashboard_pages(auth.signed_in)


def _bind_ports(config: Config) -> tuple[socket.socket, socket.socket]:
    """The ingest and HTTP listening sockets, bound before anything is created."""
    if config.uses_postgres:
        hint = (
            " (another brain? to share a port, set Z4J_SO_REUSEPORT=true on every instance, "
            "or run `z4j brain --instances N`)"
        )
    else:
        hint = (
            " (another brain or program holds it: stop it, or choose another port; several "
            "brains can share a port only on a shared Postgres store)"
        )
    ingest = open_tcp_socket(config.ingest_bind, reuse_port=config.so_reuseport, in_use_hint=hint)
    try:
        http = open_tcp_socket(config.http_bind, reuse_port=config.so_reuseport, in_use_hint=hint)
    except BaseException:
        ingest.close()
        raise
    return ingest, http


def check_bind_is_safe(config: Config) -> None:
    """Refuse to serve beyond loopback with a master secret nobody chose, or
    ingest there without a token (anyone could write events)."""
    if not is_loopback_bind(config.http_bind) and config.secret is None:
        raise ConfigError(
            f"Z4J_HTTP_BIND={config.http_bind} is reachable beyond this machine: set Z4J_SECRET "
            "(the master secret that admin tokens, sessions and agent tokens are keyed with) "
            "before serving on it"
        )
    if (
        not is_loopback_bind(config.ingest_bind)
        and config.ingest_token is None
        and not config.ingest_allow_no_token
    ):
        raise ConfigError(
            f"Z4J_INGEST_BIND={config.ingest_bind} is reachable beyond this machine: set "
            "Z4J_INGEST_TOKEN (clients send its hash on every frame) before serving on it, "
            "or Z4J_INGEST_ALLOW_NO_TOKEN=true to accept events from anyone who can connect"
        )


def _health_checks(
    store: Store, store_ready: trio.Event, buffer: Buffer, registry: Registry
) -> HealthChecks:
    health = HealthChecks()

    async def store_check() -> str | None:
        if not store_ready.is_set():
            return "store not reachable yet (migrations pending)"
        await store.check()
        return None

    async def buffer_check() -> str | None:
        stats = buffer.statistics()
        if buffer.full:
            return f"buffer full ({stats.depth} of {stats.max_rows} rows)"
        return None

    health.add("store", store_check)
    health.add("buffer", buffer_check)
    if store.pool is not None:
        pool = store.pool

        async def pool_check() -> str | None:
            stats = pool.statistics()
            if stats.in_use >= stats.size and stats.waiting:
                return f"pool exhausted: {stats.in_use} of {stats.size} in use, {stats.waiting} waiting"
            return None

        health.add("pool", pool_check)
    if registry.backend != "local":

        async def listener_check() -> str | None:
            return None if registry.listening else "not listening for notifications (reconnecting)"

        health.add("listener", listener_check)
    return health
