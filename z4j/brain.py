"""The composition root: build every service, nest their nurseries, report.

It only assembles. Each service is finished when its constructor returns:
hooks are constructor arguments, and where two services would need each
other they are both handed one small object from `z4j.links` built first
(tests/test_wiring.py holds the rules).

Start order follows dependencies, each step through ``nursery.start`` so
that it returns only once the service can serve:

    store migrations (retried in the background until the store answers)
    → group-commit writer → drains → ingest server → agent endpoint →
    command sweep → registry → HTTP → heartbeat → maintenance → report
    addresses.

Any child failing cancels the tree. A graceful stop (``shutdown`` set) runs
from the inside out, because that is how the nurseries nest (as hypercorn
nests lifespan ⊃ server ⊃ accept), under a deadline of
Z4J_SHUTDOWN_GRACE_SECONDS:

    heartbeat layer ⊃ drain layer ⊃ writer layer ⊃ producers

    producers stop on ``shutdown``: ingest stops accepting and connections
    answer what they hold, agents get 1001, HTTP requests in flight finish
    → the writer commits what they queued → drains finish the batch in hand
    (rows not drained stay in the buffer file for the next start) → last
    heartbeat (``stopped_at``) → the rest (sweep, registry, maintenance) is
    cancelled.

Nothing acknowledged can be lost on any of these paths, graceful or not:
an acknowledgement is only ever sent after its rows are committed in the
buffer file, and rows leave that file only after the store has them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import trio

from . import keys
from ._datadir import SqliteBrainLock, check_single_brain, private_dir
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
from .registry import registry_for, replicated
from .resources import to_json
from .stats import BrainStats
from .store import Store, StoreUnavailable, store_for
from .store import health_checks as store_health_checks
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
    shutdown = shutdown if shutdown is not None else trio.Event()  # None: until cancelled
    try:
        # Tasks with nothing to hand over (migrations, the command sweep, the
        # registry, maintenance) run here and are cancelled last.
        async with trio.open_nursery() as support:
            store_ready = trio.Event()
            support.start_soon(_migrate_until_ready, store, store_ready)
            support.start_soon(_grace_deadline, shutdown, config, support.cancel_scope)

            # The links first: each is handed to both sides of a meeting
            # that would otherwise make two services hold each other.
            sessions: SessionTable[Session] = SessionTable()
            signals = CommandSignals()
            outbox = DashboardOutbox() if replicated(config, store.pool) else None
            master = keys.master_secret(config)  # read once: a file on first use
            auth = Auth(store, master)
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
            ingest = IngestServer(config, buffer, stats)
            commands = Commands(
                store,
                stats=stats,
                master_secret=master,
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
            health = HealthChecks(
                {
                    **store_health_checks(store, store_ready),
                    **buffer.health_checks(),
                    **registry.health_checks(),
                }
            )
            http_stats = HttpStats()
            app = build_app(
                health,
                metrics=functools.partial(
                    render,
                    brain_registry(
                        stats,
                        buffer,
                        instance_id=str(instance_id),
                        pool_statistics=None if store.pool is None else store.pool.statistics,
                        http_stats=http_stats,
                    ),
                ),
                api=Api(store, commands, auth),
                pages=_dashboard_pages(auth),
            )
            heartbeat = Heartbeat(
                store,
                buffer,
                stats,
                _instance_info(config, instance_id, buffer),
                interval=config.heartbeat_seconds,
                store_ready=store_ready,
                on_beat=lambda info: hub.publish({"type": "instance", "instance": to_json(info)}),
            )
            maintenance = Maintenance(
                store,
                retention_days=config.event_retention_days,
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
            # queued -> drains finish the batch in hand -> the last heartbeat.
            async with (
                _layer() as (beating, heartbeat_stop),  # stops last
                _layer() as (draining, drain_stop),
                _layer() as (writing, writer_stop),
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
                await producers.start(functools.partial(agents.run, shutdown=shutdown))
                await support.start(commands.run_sweeper, store_ready)
                await support.start(registry.run)
                http_address = await producers.start(
                    functools.partial(
                        serve_http,
                        config,
                        app,
                        shutdown=shutdown,
                        stats=http_stats,
                        websockets={"/ws/agent": agents, "/ws/dashboard": hub},
                        sock=http_sock,
                    )
                )
                support.start_soon(
                    _announce_admin_token,
                    auth,
                    store_ready,
                    config,
                    _sign_in_url(config, http_address),
                )
                await beating.start(functools.partial(heartbeat.serve, shutdown=heartbeat_stop))
                await support.start(maintenance.run)
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
                    )
                )
            support.cancel_scope.cancel()
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


@contextlib.asynccontextmanager
async def _layer() -> AsyncIterator[tuple[trio.Nursery, trio.Event]]:
    """A nursery whose services are told to stop (the event) once the block
    inside it has ended, and which then waits for them to hand over: layers
    nested in one another stop from the inside out."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        try:
            yield nursery, stop
        finally:
            stop.set()


async def _grace_deadline(
    shutdown: trio.Event, config: Config, everything: trio.CancelScope
) -> None:
    """Once ``shutdown`` is set, give the graceful stop its deadline
    (Z4J_SHUTDOWN_GRACE_SECONDS), then cancel whatever is left."""
    await shutdown.wait()
    log.info("graceful shutdown: %g s to finish", config.shutdown_grace_seconds)
    await trio.sleep(config.shutdown_grace_seconds)
    log.warning("graceful shutdown ran past its deadline; cancelling the rest")
    everything.cancel()


def _instance_info(config: Config, instance_id: uuid.UUID, buffer: Buffer) -> InstanceInfo:
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


def _sign_in_url(config: Config, http_address: tuple[str, int]) -> str:
    scheme = "http" if config.tls_cert_file is None else "https"
    return f"{scheme}://{_url_host(config.http_bind, http_address)}/login"


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
    private_dir(config.data_dir)
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
