"""Commands: minted by operators, delivered to an agent's worker, tracked to an end.

States: ``pending → dispatched → completed | failed | timeout | cancelled``.
Every transition is a compare-and-set in the store, with its audit row, so
a late result cannot revive a timed-out command and two deliveries cannot
both dispatch one.

Delivery is by the frame id = the command id; agents ignore a repeated id,
so delivering again (after a reconnect, or from the sweep) is safe. A
command for an agent with no live worker waits as pending until one
connects, or until its timeout. The sweep (every second) times out overdue
commands and delivers pending ones that now have a worker here, which also
picks up commands minted by another process (``z4j command send``); it also
closes the sessions of agents revoked meanwhile (``z4j agent revoke``).

Across replicas, a command minted where no worker of its agent is connected
is announced through the registry (`Registry.command_minted`); the replica
holding one delivers it.

Only the worker a command was delivered to may acknowledge or answer it. The
delivery's ``delivery_claim_token`` is an HMAC, under a key derived from the
brain secret, of (command, agent, worker): every replica can check it with
no state of its own, it survives a reconnect of that worker (z4j agents keep
an answer in their buffer and send it on the next connection), and no other
agent or worker can make it. An ack or result from anyone else is refused
and changes nothing; the holder's own answer still lands.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

import trio

from ..logs import log_context
from ..protocol.agent import frames as f
from ..protocol.agent.untrusted import loggable
from ..protocol.close import CloseCode
from ..stats import BrainStats, ThrottledLog
from ..store.base import FINAL_COMMAND_STATES, Agent, CommandRecord, Store
from .lifetime import until
from .links import (
    AlonePeers,
    CommandError,
    CommandSignals,
    LiveSession,
    LiveSessions,
    Replicas,
    SessionTable,
)

__all__ = ["SWEEP_SECONDS", "CommandError", "Commands", "claim_token"]

log = logging.getLogger("z4j.commands")

SWEEP_SECONDS = 1.0
REFUSED = "foreign_command"  # the rejection reason of an ack or result not ours to give


def claim_key(master: bytes) -> bytes:
    """The key of delivery claim tokens, derived from the brain's master secret."""
    return hmac.new(master, b"z4j-delivery-claim-v1", hashlib.sha256).digest()


def claim_token(key: bytes, command_id: uuid.UUID, agent_id: uuid.UUID, worker_id: str) -> str:
    """The ``delivery_claim_token`` of ``command_id`` delivered to that worker (32 hex)."""
    message = b"\0".join((command_id.bytes, agent_id.bytes, worker_id.encode()))
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:32]


class Commands:
    """Mint, deliver and follow commands; ``await brain.commands.send(...)``."""

    def __init__(
        self,
        store: Store,
        *,
        stats: BrainStats | None = None,
        clock: Callable[[], float] = time.time,
        master_secret: bytes | None = None,
        sessions: LiveSessions | None = None,
        signals: CommandSignals | None = None,
        replicas: Replicas | None = None,
        on_change: Callable[[CommandRecord], None] | None = None,
        store_ready: trio.Event | None = None,
    ) -> None:
        """``master_secret``: the brain's (replicas share it, so any of them can
        check a claim token); a random one when not given (one process only).
        ``sessions``: the live agent sessions commands go to (none: a tool
        that only mints). ``signals``: wake-ups from other replicas.
        ``on_change``: called with the record after it is created and after
        every transition (the dashboard's feed). ``store_ready``: `serve`
        sweeps only once it is set (none: the store answers already)."""
        self._store = store
        self._claim_key = claim_key(master_secret or secrets.token_bytes(32))
        self._stats = stats if stats is not None else BrainStats()
        self._clock = clock
        self.sessions: LiveSessions = (
            sessions if sessions is not None else SessionTable[LiveSession]()
        )
        self._signals = signals if signals is not None else CommandSignals()
        self._replicas: Replicas = replicas if replicas is not None else AlonePeers()
        self._on_change = on_change
        self._sent: dict[uuid.UUID, LiveSession] = {}  # command id -> session it went to
        self._finished = self._signals.finished
        self._log = ThrottledLog(log)
        self._store_ready = store_ready

    # -- minting -------------------------------------------------------------------

    async def send(
        self,
        agent: uuid.UUID | str,
        action: str,
        *,
        project: str | None = None,
        target: dict[str, Any] | None = None,
        parameters: dict[str, Any] | None = None,
        timeout_seconds: int = 60,
        issued_by: str | None = None,
    ) -> CommandRecord:
        """Mint a command for ``agent`` (id, or name with ``project``); deliver it if we can."""
        found = await self._find_agent(agent, project)
        try:
            f.Command(
                action=action,
                target=target or {},
                parameters=parameters or {},
                timeout_seconds=timeout_seconds,
                issued_by=issued_by,
            )
        except (TypeError, ValueError) as exc:
            raise CommandError(f"bad command: {exc}") from None
        record = CommandRecord(
            id=uuid.uuid4(),
            project_id=found.project_id,
            agent_id=found.id,
            action=action,
            target=target or {},
            parameters=parameters or {},
            timeout_seconds=timeout_seconds,
            issued_by=issued_by,
            state="pending",
            worker_id=None,
            delivery_claim_token=None,
            created_at=self._clock(),
            dispatched_at=None,
            finished_at=None,
            result=None,
            error=None,
        )
        await self._store.create_command(record)
        self._changed(record)
        if not await self.deliver(record):
            # Another replica may hold a worker of this agent: tell them all.
            forwarded = await self._replicas.command_minted(record.agent_id)
            self._stats.command_dispatch["forwarded" if forwarded else "no_session"] += 1
        return record

    async def _find_agent(self, agent: uuid.UUID | str, project: str | None) -> Agent:
        project_id = None
        if project is not None:
            found_project = await self._store.find_project(project)
            if found_project is None:
                raise CommandError(f"no project {project!r}")
            project_id = found_project.id
        found = await self._store.find_agent(str(agent), project_id)
        if found is None:
            raise CommandError(
                f"no agent {str(agent)!r}" + (f" in project {project!r}" if project else "")
            )
        if found.revoked:
            raise CommandError(f"agent {str(agent)!r} is revoked")
        return found

    async def cancel(
        self, command_id: uuid.UUID, *, actor: str | None = None
    ) -> CommandRecord | None:
        record = await self._transition(
            command_id,
            from_states=("pending", "dispatched"),
            to_state="cancelled",
            at=self._clock(),
            actor=actor,
        )
        if record is not None:
            self._finish(command_id)
        return record

    async def wait(self, command_id: uuid.UUID, *, within: float) -> CommandRecord | None:
        """The command once it reached a final state, or as it is after ``within`` s."""
        event = self._finished.setdefault(command_id, trio.Event())
        with trio.move_on_after(within):
            while True:
                record = await self._store.get_command(command_id)
                if record is None or record.state in FINAL_COMMAND_STATES:
                    break
                with trio.move_on_after(SWEEP_SECONDS):  # a result may land in another process
                    await event.wait()
        self._finished.pop(command_id, None)
        return await self._store.get_command(command_id)

    def _finish(self, command_id: uuid.UUID) -> None:
        self._sent.pop(command_id, None)
        event = self._finished.get(command_id)
        if event is not None:
            event.set()

    # -- delivery --------------------------------------------------------------------

    def _pick_session(self, record: CommandRecord) -> LiveSession | None:
        live = self.sessions.sessions_of(record.agent_id)
        worker = record.target.get("worker_id")
        role = record.target.get("role") or record.target.get("worker_role")
        for session in live:
            if worker is not None and session.worker_id != worker:
                continue
            if role is not None and session.role != role:
                continue
            return session
        return None

    def _with_live_worker(self, record: CommandRecord) -> bool:
        """Whether we sent (or are sending) ``record`` to a worker still connected here.

        Such a command waits for that worker's answer (or its timeout); a
        worker that reconnected is a new session and gets it again.
        """
        previous = self._sent.get(record.id)
        if previous is None:
            return False
        return self.sessions.sessions.get((record.agent_id, previous.worker_id)) is previous

    async def deliver(self, record: CommandRecord) -> bool:
        """Send a pending command to a live worker of its agent, if there is one.

        ``record`` may be stale: the sweep, a notification and a worker's
        connect each read pending commands and then deliver, and the command
        may have been delivered and answered in between (its ``_sent`` entry
        is gone once it is final). So the delivery is claimed here before any
        await, and the state is read again from the store before sending. A
        command already with a live worker here goes to no other one.
        """
        if record.state != "pending" or self._with_live_worker(record):
            return False
        session = self._pick_session(record)
        if session is None:
            return False
        self._sent[record.id] = session  # before any await: a second deliver stops above
        sent = False
        try:
            fresh = await self._store.get_command(record.id)
            if fresh is None or fresh.state != "pending":
                return False
            command = f.Command(
                action=fresh.action,
                target=fresh.target,
                parameters=fresh.parameters,
                timeout_seconds=fresh.timeout_seconds,
                issued_by=fresh.issued_by,
                delivery_claim_token=claim_token(
                    self._claim_key, fresh.id, fresh.agent_id, session.worker_id
                ),
            )
            await session.send(command, frame_id=str(record.id))
            sent = True
        except Exception as exc:  # the socket is going away; the sweep retries
            with log_context(command_id=record.id, agent=record.agent_id, worker=session.worker_id):
                self._log.warning("deliver", "delivering command %s failed: %s", record.id, exc)
            return False
        finally:
            if not sent and self._sent.get(record.id) is session:
                del self._sent[record.id]  # not sent (or cancelled): free for the next try
        self._stats.command_dispatch["local"] += 1
        return True

    async def session_opened(self, agent_id: uuid.UUID) -> None:
        """A worker of ``agent_id`` connected: send it what waits."""
        for record in await self._store.open_commands(agent_id):
            await self.deliver(record)

    async def acknowledged(
        self, command_id: str, agent_id: uuid.UUID, worker_id: str, payload: f.CommandAck
    ) -> bool:
        """A worker's ack: pending to dispatched. False if refused (not its command)."""
        claimed = await self._claimed(command_id, agent_id, worker_id, payload.delivery_claim_token)
        if claimed is None or claimed is False:
            return claimed is None  # unknown ids are ignored, not refused
        await self._transition(
            claimed,
            from_states=("pending",),
            to_state="dispatched",
            at=self._clock(),
            worker_id=worker_id,
            delivery_claim_token=payload.delivery_claim_token,
        )
        return True

    async def answered(
        self, command_id: str, agent_id: uuid.UUID, worker_id: str, payload: f.CommandResult
    ) -> bool:
        """A worker's result ends its command. False if refused (not its command)."""
        claimed = await self._claimed(command_id, agent_id, worker_id, payload.delivery_claim_token)
        if claimed is None or claimed is False:
            return claimed is None  # unknown ids are ignored, not refused
        done = await self._transition(
            claimed,
            from_states=("pending", "dispatched"),
            to_state="completed" if payload.status == "success" else "failed",
            at=self._clock(),
            worker_id=worker_id,
            result=payload.result,
            error=payload.error,
        )
        if done is None:
            log.info("late result for command %s ignored", claimed)
        self._finish(claimed)
        return True

    async def _claimed(
        self, command_id: str, agent_id: uuid.UUID, worker_id: str, token: str | None
    ) -> uuid.UUID | Literal[False] | None:
        """The command's id, if this worker may act on it; None if there is no
        such command (ignored), False if it is another's (refused, counted, logged).

        A token that matches proves it on its own: the brain makes one only
        in `deliver`, for the command's own agent and the worker it sent it
        to, so the store is read only to tell an unknown id from a foreign one.
        """
        parsed = _uuid(command_id)
        if parsed is not None and token is not None:
            expected = claim_token(self._claim_key, parsed, agent_id, worker_id)
            if hmac.compare_digest(token.encode(), expected.encode()):
                return parsed
        record = None if parsed is None else await self._store.get_command(parsed)
        if record is None:
            log.debug("ack or result for unknown command %s ignored", loggable(command_id))
            return None
        self._stats.agent_rejected[REFUSED] += 1
        self._log.warning(
            "foreign",
            "refused an ack or result for command %s from agent %s worker %s:"
            " it was not delivered to that worker",
            record.id,
            agent_id,
            loggable(worker_id),
        )
        return False

    async def _transition(self, command_id: uuid.UUID, **change: Any) -> CommandRecord | None:
        """The store's compare-and-set transition; the new record if it moved."""
        record = await self._store.transition_command(command_id, **change)
        if record is not None:
            self._changed(record)
            if record.state in FINAL_COMMAND_STATES:
                # Counted by the replica that moved it: summed over replicas, once each.
                finished_at = (
                    record.finished_at if record.finished_at is not None else self._clock()
                )
                self._stats.observe_command(record.state, finished_at - record.created_at)
                await self._replicas.command_finished(record.id)
        return record

    def _changed(self, record: CommandRecord) -> None:
        if self._on_change is not None:
            self._on_change(record)

    # -- the sweep ----------------------------------------------------------------------

    async def sweep_once(self) -> None:
        now = self._clock()
        # Timeouts are the leader's (every replica would race for them).
        overdue = await self._store.overdue_commands(now=now) if self._replicas.is_leader else []
        for record in overdue:
            done = await self._transition(
                record.id,
                from_states=("pending", "dispatched"),
                to_state="timeout",
                at=now,
                actor="sweeper",
                error=f"no result within {record.timeout_seconds} s",
            )
            if done is not None:
                self._finish(record.id)
        if self.sessions.every_session():
            closed = await self.sessions.close_revoked(self._is_revoked, CloseCode.REVOKED)
            if closed:
                log.info("closed %d sessions of revoked agents", closed)
            for record in await self._store.open_commands(None):
                if await self.deliver(record):
                    self._stats.sweep_deliveries += 1

    async def _is_revoked(self, agent_id: uuid.UUID) -> bool:
        """Revocation may happen in another process (``z4j agent revoke``),
        so the sweep asks the store every second."""
        agent = await self._store.find_agent(str(agent_id))
        return agent is None or agent.revoked

    async def serve(
        self, *, shutdown: trio.Event, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Deliver what waits (woken by `CommandSignals`) and sweep timeouts
        every SWEEP_SECONDS, until ``shutdown``: nothing to hand over, since
        every state lives in the store."""
        async with until(shutdown):
            task_status.started()
            if self._store_ready is not None:
                await self._store_ready.wait()
            await self._sweep_forever()

    async def _sweep_forever(self) -> None:
        next_sweep = trio.current_time()
        while True:
            signals = self._signals
            with trio.move_on_at(next_sweep):
                await signals.wake.wait()
            try:
                if signals.wake.is_set():  # a notification: just those agents
                    signals.wake = trio.Event()
                    await self._deliver_wanted()
                if trio.current_time() >= next_sweep:
                    next_sweep = trio.current_time() + SWEEP_SECONDS
                    await self.sweep_once()
            except Exception as exc:
                self._log.warning("sweep", "command sweep failed, will retry: %s", exc)

    async def _deliver_wanted(self) -> None:
        wanted, self._signals.wanted = self._signals.wanted, set()
        everyone = uuid.UUID(int=0) in wanted
        for agent_id in {a for a, _ in self.sessions.sessions}:
            if everyone or agent_id in wanted:
                for record in await self._store.open_commands(agent_id):
                    await self.deliver(record)


def _uuid(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None
