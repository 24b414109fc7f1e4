"""Where agent sessions live, and how work crosses replicas (Z4J_REGISTRY_BACKEND).

``local`` (forced on SQLite): one process; every session is ours, this
process is always the leader, nothing crosses.

``postgres_notify`` (default on Postgres), for replicas sharing one
database:

- **Ownership.** A connecting worker's row in ``agent_sessions`` names the
  replica holding its socket and a fencing token from a sequence; the
  newest connection wins. The owner renews its rows every third of
  Z4J_OWNERSHIP_TTL_SECONDS; a row it can no longer renew under its own
  token was taken over (or cleaned up), and its local session is closed
  (4002): a replica never acts on ownership it has lost.
- **Routing.** A command minted with no local worker is announced on
  ``z4j_commands`` (the agent id only: rows are read from tables, payloads
  stay far below NOTIFY's 8000 bytes); the owner delivers it. A final
  state is announced too, so waiters on other replicas wake at once. The
  command sweep (every second, on every replica) delivers whatever a lost
  notification missed.
- **OpAMP.** An OpAMP WebSocket session is owned like a worker's (worker
  id ``opamp:<instance_uid>`` under its project's id); a takeover closes
  the older session the same way. A configuration change is announced on
  ``z4j_opamp`` (project and instance uids), so the replica holding the
  agent's WebSocket pushes it at once.
- **Dashboard.** Hub messages are relayed on ``z4j_dashboard`` (gathered
  for 20 ms, bursts of event messages coalesced), so a subscriber on
  any replica sees every replica's changes.
- **Listener.** One dedicated connection LISTENs, waited on with Trio
  (``wait_readable`` on its socket, never a blocking call on the loop). A
  self-notify every 2 s is its watchdog: no echo within 6 s, or any error,
  and it reconnects (capped backoff) and LISTENs again.
- **Leader lease.** One row in ``leader_lease``; the holder renews it every
  third of Z4J_LEADER_LEASE_SECONDS, and only the holder runs maintenance,
  command timeouts, expired-ownership cleanup and marking dead instances.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import psycopg
import trio

from ..config import Config
from ..protocol.agent.untrusted import loggable
from ..protocol.close import CloseCode
from ..stats import BrainStats, ThrottledLog
from ..store import leases
from ..store.leases import Key
from ..store.pg import PgPool
from .lifetime import until
from .links import (
    OPAMP_WORKER_PREFIX,
    CommandSignals,
    DashboardOutbox,
    LiveSession,
    LiveSessions,
    LostSessions,
    OpampNudges,
    SessionTable,
    merge_events,
)

__all__ = ["LocalRegistry", "PostgresRegistry", "Registry", "registry_for", "replicated"]

log = logging.getLogger("z4j.registry")

COMMANDS_CHANNEL = "z4j_commands"
DASHBOARD_CHANNEL = "z4j_dashboard"
OPAMP_CHANNEL = "z4j_opamp"
PING_CHANNEL = "z4j_ping"
PING_SECONDS = 2.0
WATCHDOG_SECONDS = 6.0
RELAY_SECONDS = 0.02
MAX_NOTIFY_BYTES = 7900  # Postgres refuses payloads of 8000 bytes or more
_CHANNELS = (COMMANDS_CHANNEL, DASHBOARD_CHANNEL, OPAMP_CHANNEL, PING_CHANNEL)


class Registry:
    """The interface, and the ``local`` backend: one process, always the leader."""

    backend = "local"

    def __init__(
        self,
        stats: BrainStats,
        *,
        sessions: LiveSessions | None = None,
        signals: CommandSignals | None = None,
        on_dashboard: Callable[[dict[str, Any]], None] | None = None,
        opamp_sessions: LostSessions | None = None,
        nudges: OpampNudges | None = None,
    ) -> None:
        """What other replicas tell us lands in ``sessions`` (close one we no
        longer own), ``signals`` (deliver an agent's waiting commands here;
        wake waiters of a command), ``on_dashboard`` (show their message),
        ``opamp_sessions`` (close an OpAMP session we no longer own) and
        ``nudges`` (push an agent's new configuration here)."""
        self._stats = stats
        self._opamp_sessions = opamp_sessions
        self._nudges = nudges
        stats.leader = self.is_leader
        self._tokens = 0
        self._sessions: LiveSessions = (
            sessions if sessions is not None else SessionTable[LiveSession]()
        )
        self._signals = signals if signals is not None else CommandSignals()
        self._on_dashboard = on_dashboard if on_dashboard is not None else _ignore

    @property
    def is_leader(self) -> bool:
        return True

    @property
    def listening(self) -> bool:
        return True

    async def serve(
        self, *, shutdown: trio.Event, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """One process has nobody to listen to: ready at once, nothing to run."""
        task_status.started()

    def health_checks(self) -> dict[str, Callable[[], Awaitable[str | None]]]:
        """For /health/ready: on replicas, whether notifications reach us."""
        if self.backend == "local":
            return {}

        async def listener_check() -> str | None:
            return None if self.listening else "not listening for notifications (reconnecting)"

        return {"listener": listener_check}

    async def acquire(self, agent_id: uuid.UUID, worker_id: str) -> int:
        """Claim this worker's session for this replica; its fencing token."""
        self._tokens += 1
        self._stats.ownership["new"] += 1
        return self._tokens

    async def release(self, agent_id: uuid.UUID, worker_id: str, token: int) -> None:
        pass

    async def command_minted(self, agent_id: uuid.UUID) -> bool:
        """Announce a command no worker here could take: does another replica
        hold a live session of its agent (so that it was forwarded)?"""
        return False

    async def command_finished(self, command_id: uuid.UUID) -> None:
        pass


LocalRegistry = Registry


def replicated(config: Config, pool: PgPool | None) -> bool:
    """Whether this brain shares sessions, commands and the dashboard with replicas."""
    return config.resolved_registry_backend != "local" and pool is not None


def registry_for(
    config: Config,
    pool: PgPool | None,
    stats: BrainStats,
    *,
    instance_id: uuid.UUID,
    store_ready: trio.Event,
    sessions: LiveSessions,
    signals: CommandSignals,
    on_dashboard: Callable[[dict[str, Any]], None],
    outbox: DashboardOutbox | None,
    opamp_sessions: LostSessions | None = None,
    nudges: OpampNudges | None = None,
) -> Registry:
    """The registry the configuration asks for; ``outbox`` is given exactly
    when `replicated` (what the hub relays, this registry sends)."""
    if config.registry_backend == "postgres_notify" and config.resolved_registry_backend == "local":
        log.warning("Z4J_REGISTRY_BACKEND=postgres_notify needs Postgres; using local on SQLite")
    if pool is None or outbox is None or not replicated(config, pool):
        return Registry(
            stats,
            sessions=sessions,
            signals=signals,
            on_dashboard=on_dashboard,
            opamp_sessions=opamp_sessions,
            nudges=nudges,
        )
    return PostgresRegistry(
        config,
        pool,
        stats,
        instance_id=instance_id,
        store_ready=store_ready,
        sessions=sessions,
        signals=signals,
        on_dashboard=on_dashboard,
        outbox=outbox,
        opamp_sessions=opamp_sessions,
        nudges=nudges,
    )


def _ignore(message: dict[str, Any]) -> None:
    pass


class PostgresRegistry(Registry):
    backend = "postgres_notify"

    def __init__(
        self,
        config: Config,
        pool: PgPool,
        stats: BrainStats,
        *,
        instance_id: uuid.UUID,
        store_ready: trio.Event,
        sessions: LiveSessions,
        signals: CommandSignals,
        on_dashboard: Callable[[dict[str, Any]], None],
        outbox: DashboardOutbox,
        opamp_sessions: LostSessions | None = None,
        nudges: OpampNudges | None = None,
    ) -> None:
        self._leader = False
        super().__init__(
            stats,
            sessions=sessions,
            signals=signals,
            on_dashboard=on_dashboard,
            opamp_sessions=opamp_sessions,
            nudges=nudges,
        )
        self._pool = pool
        self._me = instance_id
        self._me_text = str(instance_id)
        self._ttl = config.ownership_ttl_seconds
        self._lease = config.leader_lease_seconds
        self._heartbeat = config.heartbeat_seconds
        self._store_ready = store_ready
        self._owned: dict[Key, int] = {}
        self._listening = False
        self._last_echo = 0.0
        self._outbox = outbox
        self._renew_now = trio.Event()
        self._log = ThrottledLog(log)

    @property
    def is_leader(self) -> bool:
        return self._leader

    @property
    def listening(self) -> bool:
        return self._listening

    async def serve(
        self, *, shutdown: trio.Event, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen, ping, renew leases, lead and relay until ``shutdown``
        (leases of sessions still open lapse by their TTL, or are released
        as their sessions end)."""
        async with until(shutdown) as nursery:
            task_status.started()
            await self._store_ready.wait()
            nursery.start_soon(self._listen_forever)
            nursery.start_soon(self._ping_forever)
            nursery.start_soon(self._renew_forever)
            nursery.start_soon(self._lead_forever)
            nursery.start_soon(self._relay_forever)
            if self._nudges is not None:
                nursery.start_soon(self._relay_nudges_forever, self._nudges)

    # -- ownership ---------------------------------------------------------------------

    async def acquire(self, agent_id: uuid.UUID, worker_id: str) -> int:
        token, previous = await self._pool.run(
            leases.acquire, agent_id, worker_id, self._me, self._ttl
        )
        self._owned[agent_id, worker_id] = token
        outcome = "new" if previous is None else "renewed" if previous == self._me else "takeover"
        self._stats.ownership[outcome] += 1
        if outcome == "takeover":
            # The old owner learns at its next renewal at the latest; tell it now.
            await self._notify(COMMANDS_CHANNEL, f"lost:{agent_id}:{worker_id}")
        return token

    async def release(self, agent_id: uuid.UUID, worker_id: str, token: int) -> None:
        if self._owned.get((agent_id, worker_id)) == token:
            del self._owned[agent_id, worker_id]
        await self._pool.run(leases.release, agent_id, worker_id, token)

    async def _renew_forever(self) -> None:
        while True:
            with trio.move_on_after(self._ttl / 3):
                await self._renew_now.wait()
            self._renew_now = trio.Event()
            if not self._owned:
                continue
            claims = list(self._owned.items())
            try:
                kept: set[Key] = await self._pool.run(leases.renew, self._me, claims, self._ttl)
            except Exception as exc:
                self._log.warning("renew", "renewing session ownership failed: %s", exc)
                continue
            for key, token in claims:
                if key not in kept and self._owned.get(key) == token:
                    del self._owned[key]
                    self._stats.ownership["lost"] += 1
                    log.info(
                        "lost the session of agent %s worker %s: closing it",
                        key[0],
                        loggable(key[1]),
                    )
                    self._lost(key)

    def _lost(self, key: Key) -> None:
        agent_id, worker_id = key
        if worker_id.startswith(OPAMP_WORKER_PREFIX):
            if self._opamp_sessions is not None:
                self._opamp_sessions.lost(agent_id, worker_id, CloseCode.REPLACED)
        else:
            self._sessions.lost(agent_id, worker_id, CloseCode.REPLACED)

    # -- routing -------------------------------------------------------------------------

    async def command_minted(self, agent_id: uuid.UUID) -> bool:
        try:
            elsewhere: bool = await self._pool.run(
                leases.announce_command, COMMANDS_CHANNEL, agent_id, self._me, autocommit=True
            )
        except Exception as exc:  # the sweep still delivers it
            self._log.warning("notify", "announcing a command failed: %s", exc)
            return False
        return elsewhere

    async def command_finished(self, command_id: uuid.UUID) -> None:
        await self._notify(COMMANDS_CHANNEL, f"finished:{command_id}")

    async def _relay_forever(self) -> None:
        while True:
            await self._outbox.ready.wait()
            await trio.sleep(RELAY_SECONDS)  # gather a burst
            messages = _coalesce(self._outbox.take_all())
            for message in messages:
                payload = _dashboard_payload(self._me_text, message)
                if payload is None:
                    self._log.warning("relay", "a dashboard message too large to relay was dropped")
                    continue
                await self._notify(DASHBOARD_CHANNEL, payload)

    async def _relay_nudges_forever(self, nudges: OpampNudges) -> None:
        """Announce configuration changes made here, a few agents per NOTIFY."""
        while True:
            await nudges.relay_ready.wait()
            await trio.sleep(RELAY_SECONDS)  # gather a burst (a rollout's stage)
            for project_id, uids in nudges.take_relay().items():
                for payload in _opamp_payloads(self._me_text, project_id, sorted(uids)):
                    await self._notify(OPAMP_CHANNEL, payload)

    async def _notify(self, channel: str, payload: str) -> None:
        try:
            await self._pool.run(leases.notify, channel, payload, autocommit=True)
        except Exception as exc:  # the sweep still delivers; the feed may miss one
            self._log.warning("notify", "NOTIFY %s failed: %s", channel, exc)

    # -- the listener --------------------------------------------------------------------

    async def _ping_forever(self) -> None:
        while True:
            await self._notify(PING_CHANNEL, self._me_text)
            await trio.sleep(PING_SECONDS)

    async def _listen_forever(self) -> None:
        backoff = 0.5
        while True:
            try:
                await self._listen_once()
            except (psycopg.Error, OSError, _DeadListener) as exc:
                self._log.warning("listen", "listener connection lost, reconnecting: %s", exc)
            self._listening = False
            self._stats.listener_reconnects += 1
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def _listen_once(self) -> None:
        conn = await trio.to_thread.run_sync(lambda: self._pool.connect_sync(autocommit=True))
        try:
            await trio.to_thread.run_sync(leases.listen_on, conn, _CHANNELS)
            self._listening = True
            self._last_echo = trio.current_time()
            log.info("listening on %s, %s", COMMANDS_CHANNEL, DASHBOARD_CHANNEL)
            # Catch up on what was announced while we were not listening.
            self._signals.deliver_soon(uuid.UUID(int=0))
            pgconn = conn.pgconn
            while True:
                with trio.move_on_after(1.0):
                    await trio.lowlevel.wait_readable(pgconn.socket)
                pgconn.consume_input()  # non-blocking: reads what the socket has
                if pgconn.status != psycopg.pq.ConnStatus.OK:
                    raise _DeadListener("connection closed")
                while (note := pgconn.notifies()) is not None:
                    self._received(note.relname.decode(), note.extra.decode())
                if trio.current_time() - self._last_echo > WATCHDOG_SECONDS:
                    raise _DeadListener(f"no echo of our own ping in {WATCHDOG_SECONDS:g} s")
        finally:
            self._listening = False
            conn.close()  # no round trip: sends Terminate and closes the socket

    def _received(self, channel: str, payload: str) -> None:
        self._stats.notifications[channel] += 1
        if channel == PING_CHANNEL:
            if payload == self._me_text:
                self._last_echo = trio.current_time()
            return
        if channel == DASHBOARD_CHANNEL:
            origin, _, message = payload.partition(":")
            if origin != self._me_text:
                self._on_dashboard(orjson.loads(message))
            return
        if channel == OPAMP_CHANNEL:
            origin, _, rest = payload.partition(":")
            if origin != self._me_text and self._nudges is not None:
                project, _, uids = rest.partition(":")
                try:
                    self._nudges.changed_elsewhere(
                        uuid.UUID(project), [bytes.fromhex(u) for u in uids.split(",") if u]
                    )
                except ValueError:
                    log.warning("ignored a malformed %s notification: %.80s", channel, payload)
            return
        what, _, rest = payload.partition(":")
        try:
            if what == "minted":
                self._signals.deliver_soon(uuid.UUID(rest))
            elif what == "finished":
                self._signals.finished_elsewhere(uuid.UUID(rest))
            elif what == "lost":
                agent, _, worker = rest.partition(":")
                if (uuid.UUID(agent), worker) in self._owned:
                    # Another replica took it over: renew now, and the
                    # renewal (under our token) tells us what we lost.
                    self._renew_now.set()
        except ValueError:
            log.warning("ignored a malformed %s notification: %.80s", channel, payload)

    # -- the leader ----------------------------------------------------------------------

    async def _lead_forever(self) -> None:
        while True:
            try:
                leader = await self._pool.run(leases.take_lease, self._me, self._lease)
            except Exception as exc:
                self._log.warning("lease", "leader lease check failed: %s", exc)
                leader = False
            if leader and not self._leader:
                self._stats.lease_acquisitions += 1
                log.info("this replica now holds the leader lease")
            elif self._leader and not leader:
                log.info("this replica lost the leader lease")
            self._leader = self._stats.leader = leader
            if leader:
                try:
                    await self._pool.run(leases.leader_upkeep, 3 * self._heartbeat)
                except Exception as exc:
                    self._log.warning("upkeep", "leader upkeep failed: %s", exc)
            await trio.sleep(self._lease / 3)


class _DeadListener(Exception):
    pass


def _coalesce(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge runs of ``events`` messages, as a subscriber's queue does."""
    out: list[dict[str, Any]] = []
    for message in messages:
        if message["type"] == "events" and out and out[-1]["type"] == "events":
            out[-1] = merge_events(out[-1], message)
        else:
            out.append(message)
    return out


def _opamp_payloads(origin: str, project_id: uuid.UUID, uids: list[bytes]) -> list[str]:
    """``origin:project:uid,uid,...`` payloads, each within NOTIFY's limit."""
    head = f"{origin}:{project_id}:"
    per = (MAX_NOTIFY_BYTES - len(head)) // 33  # 32 hex digits and a comma
    return [
        head + ",".join(uid.hex() for uid in uids[i : i + per]) for i in range(0, len(uids), per)
    ]


def _dashboard_payload(origin: str, message: dict[str, Any]) -> str | None:
    """``origin:json``, shrunk (sample trimmed) to fit NOTIFY; None if it cannot."""
    while True:
        payload = f"{origin}:{orjson.dumps(message).decode()}"
        if len(payload.encode()) <= MAX_NOTIFY_BYTES:
            return payload
        sample = message.get("sample")
        if not sample:
            return None
        message = {**message, "sample": sample[: len(sample) // 2]}
