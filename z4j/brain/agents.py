"""``/ws/agent``: the brain's side of agent protocol v2.

One task per connection (z4j.brain.http.websocket's), driving the sans-IO `AgentProtocol`:

1. the bearer token is looked up by its keyed hash; unknown or revoked:
   accept, then close 4401 (what z4j agents treat as "bad credentials");
2. the first frame must be ``hello``; more than
   Z4J_WS_PER_AGENT_CONCURRENCY_CAP workers of one agent: 4429;
3. ``hello_ack`` carries the session's identity and the project's binding;
4. the hello is unsigned, so it proves only the bearer token: the connection
   takes its worker's slot (replacing an older connection of the same
   (agent, worker), closed 4002), is recorded and gets the worker's commands
   only with its first signed frame that verifies (z4j agents send a
   heartbeat at once). Until then the older connection keeps the slot and
   its commands, and a connection that never proves the key goes idle (4408);
5. then every frame is verified and handled in order. An ``event_batch`` is
   acknowledged only once it is durable in the buffer (it goes through the
   same buffer and drain as TCP payloads; its events' keys come from their
   own ids, so a re-sent batch lands once); a full buffer gets no ack, and
   the agent re-sends later.

Protocol violations close with the code the core names; no frame for three
heartbeat intervals closes 4408.

Rotation (store/provisioning.py) never cuts a live agent off mid-stream: a
token rotated away keeps opening sessions until its grace ends, and while a
project's signing secret is in rotation a session takes whichever of the
current and previous keys its first signed frame verifies under. A sweep
(every CREDENTIAL_SWEEP_SECONDS, by the endpoint's clock) closes a session
whose token's grace has ended with 4401, and one still on a previous key
past its grace with 4403: a session never outlives its credentials by more
than one sweep.

One concern justifies the length (past 700 lines): the life of an agent
connection, from token to close, whose steps share the session state above;
the wire rules themselves live in `protocol/agent`.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, Protocol

import attrs
import orjson
import trio

from .. import keys
from .._version import __version__
from ..buffer import Buffer, NewRow
from ..config import Config
from ..logs import bind_log_context, log_context
from ..protocol.agent import frames as f
from ..protocol.agent.connection import AgentProtocol, Role, State
from ..protocol.agent.untrusted import loggable
from ..protocol.close import CloseCode
from ..protocol.errors import RemoteProtocolError
from ..stats import BrainStats, ThrottledLog
from ..store.base import Agent, CredentialDeadlines, Store, StoreUnavailable
from .http.websocket import SEND_BATCH
from .links import AlonePeers, Ownership, SessionTable
from .ratelimit import TokenBucket

__all__ = ["AgentEndpoint"]

log = logging.getLogger("z4j.agents")

HELLO_TIMEOUT_SECONDS = 10.0
CREDENTIAL_SWEEP_SECONDS = 1.0  # how often live sessions are held against their credentials
SESSIONS_GONE_POLL_SECONDS = 0.05  # at shutdown, how often to look for sessions still open
# How long a new connection waits for the store before 1013: well inside
# the 10 s agents give the upgrade, so they see the code, not a timeout.
STORE_WAIT_SECONDS = 3.0
# Batches one connection may have waiting for durability; beyond it we stop
# reading, and TCP pushes back on the agent.
MAX_BATCHES_IN_FLIGHT = 256
# ... and the bytes they may hold, per connection and over all of them, so
# that memory stays bounded however many agents push at once.
MAX_SESSION_BYTES_IN_FLIGHT = 4 * 1024 * 1024
MAX_BYTES_IN_FLIGHT = 64 * 1024 * 1024
# Batches read back to back go to the buffer as one group (one append, one
# write of acks), closed at this many batches or about this many events so
# that the buffer commits one group while the next is read.
GROUP_BATCHES = 16
# The error frame's code for an ack or result of a command not delivered to
# the worker sending it (refused, not applied).
COMMAND_REFUSED = "command_not_delivered_to_you"
GROUP_EVENTS = 400


class CommandAnswers(Protocol):
    """What the endpoint needs of the command service: a worker is ready for
    its commands; a worker acknowledged or answered one (False: refused)."""

    async def session_opened(self, agent_id: uuid.UUID) -> None: ...
    async def acknowledged(
        self, command_id: str, agent_id: uuid.UUID, worker_id: str, payload: f.CommandAck
    ) -> bool: ...
    async def answered(
        self, command_id: str, agent_id: uuid.UUID, worker_id: str, payload: f.CommandResult
    ) -> bool: ...


Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@attrs.frozen
class _Batch:
    """An event batch as read: its frame id, payload and size on the wire."""

    id: str
    payload: f.EventBatch
    size: int


class _Closed(Exception):
    """The peer went away, or the server closed it (websocket.disconnect)."""

    def __init__(self, code: int | None = None) -> None:
        super().__init__(code)
        self.code = code


@attrs.define(eq=False)
class Session:
    """One live agent connection (one worker).

    Kept small: thousands sit idle in one brain. No timer and no nursery of
    its own (the endpoint's idle sweep and task nursery serve them all),
    and no send lock: `send` signs and queues without a checkpoint between,
    and the connection writes in FIFO order, so seq reaches the agent in
    order.
    """

    agent: Agent
    worker_id: str
    role: str | None
    protocol: AgentProtocol
    send_message: Send
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    close_code: int | None = None
    close_reason: str | None = None  # the close frame's text; None: the code's default
    last_frame: float = attrs.field(factory=trio.current_time)
    in_flight: int = 0  # event batches waiting to be durable
    in_flight_bytes: int = 0  # their size as received
    drained: trio.Event | None = None  # set when in_flight drops, if awaited
    fencing_token: int | None = None  # this replica's claim on the session (registry)
    # Event batches read but not yet taken by a task to buffer (see _serve).
    pending: list[_Batch] | None = None
    send_batch: bool = False  # the connection takes z4j.websocket.send_batch
    # The hello, kept until the first signed frame proves the key; None after.
    hello: f.Hello | None = None
    token_hash: bytes = b""  # the keyed hash of the token it connected with
    # The project's key generations offered at accept, the current one first;
    # the one it signs with is ``generations[protocol.key_index]``.
    generations: tuple[int, ...] = (0,)

    @property
    def key_generation(self) -> int:
        return self.generations[self.protocol.key_index]

    @property
    def agent_id(self) -> uuid.UUID:
        return self.agent.id

    async def send(self, payload: f.Payload, *, frame_id: str | None = None) -> None:
        message = self.protocol.send(payload, frame_id=frame_id)
        await self.send_message({"type": "websocket.send", "bytes": message})

    async def send_all(self, payloads: Sequence[f.Payload]) -> None:
        """Send several frames, in one write where the connection allows."""
        messages = [self.protocol.send(payload) for payload in payloads]
        if self.send_batch:
            await self.send_message({"type": SEND_BATCH, "messages": messages})
        else:
            for message in messages:
                await self.send_message({"type": "websocket.send", "bytes": message})

    def kick(self, code: int, reason: str | None = None) -> None:
        """Close this session from outside (replaced, revoked, idle, shutdown)."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        self.scope.cancel()

    async def wait_in_flight(self, at_most: int) -> None:
        while self.in_flight > at_most:
            await self.wait_batch_done()

    async def wait_room(self, size: int) -> None:
        """Until one more batch of ``size`` bytes fits this session's window."""
        while self.in_flight and (
            self.in_flight >= MAX_BATCHES_IN_FLIGHT
            or self.in_flight_bytes + size > MAX_SESSION_BYTES_IN_FLIGHT
        ):
            await self.wait_batch_done()

    async def wait_batch_done(self) -> None:
        self.drained = trio.Event()
        await self.drained.wait()

    def batch_done(self, size: int) -> None:
        self.in_flight -= 1
        self.in_flight_bytes -= size
        if self.drained is not None:
            self.drained.set()
            self.drained = None


class AgentEndpoint:
    def __init__(
        self,
        config: Config,
        store: Store,
        buffer: Buffer,
        stats: BrainStats,
        *,
        instance_id: uuid.UUID,
        store_ready: trio.Event,
        sessions: SessionTable[Session] | None = None,
        commands: CommandAnswers | None = None,
        ownership: Ownership | None = None,
        on_worker: Callable[[Agent, str, str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``sessions``: filled here, read by commands and the registry.
        ``commands``: told of workers and their answers (None: answers are
        ignored). ``ownership``: claims sessions across replicas.
        ``on_worker``: called with (the agent, worker id, "connected" |
        "disconnected") (the dashboard's feed, which needs its project). ``clock``: the wall clock that
        tokens' and signing keys' ends are held against (tests move it)."""
        self._config = config
        self._store = store
        self._buffer = buffer
        self._stats = stats
        self._instance_id = instance_id
        self._store_ready = store_ready
        self._master = keys.master_secret(config)
        self._table: SessionTable[Session] = sessions if sessions is not None else SessionTable()
        self._commands = commands
        self._ownership: Ownership = ownership if ownership is not None else AlonePeers()
        self._on_worker = on_worker
        self._clock = clock
        self._log = ThrottledLog(log)
        self._tasks: trio.Nursery | None = None
        self._in_flight_bytes = 0  # over all sessions
        self._room = trio.Event()  # set (and replaced) whenever some is freed

    async def serve(
        self,
        *,
        shutdown: trio.Event | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The endpoint's own tasks: buffering event batches, and the idle and
        credential sweeps.

        Once ``shutdown`` is set, every session is closed 1001 (agents
        reconnect to another brain) and this returns when they are gone and
        the batches they sent are in the buffer or refused.
        """
        async with trio.open_nursery() as nursery:
            self._tasks = nursery
            sweep, credentials = trio.CancelScope(), trio.CancelScope()
            nursery.start_soon(self._sweep_idle, sweep)
            nursery.start_soon(self._sweep_credentials, credentials)
            task_status.started()
            if shutdown is None:
                return
            await shutdown.wait()
            # Their connections end on HTTP's tasks; one still in its
            # handshake joins the table later, and is closed on the next look.
            while self._table.every_session():
                self._table.close_all(CloseCode.GOING_AWAY)
                await trio.sleep(SESSIONS_GONE_POLL_SECONDS)
            sweep.cancel()
            credentials.cancel()

    async def _sweep_idle(self, scope: trio.CancelScope) -> None:
        """Close sessions with no frame for three heartbeat intervals (4408).

        One task for all sessions instead of a timer per connection; checked
        every half interval, so a silent agent goes after 3 to 3.5 intervals.
        """
        interval = self._config.ws_heartbeat_interval_seconds
        with scope:
            while True:
                await trio.sleep(interval / 2)
                cutoff = trio.current_time() - 3 * interval
                for session in self.every_session():
                    if session.last_frame < cutoff:
                        session.kick(CloseCode.IDLE, "idle: no frame for 3 heartbeat intervals")

    async def _sweep_credentials(self, scope: trio.CancelScope) -> None:
        """Close sessions whose token's grace has ended (4401), or that sign
        with a previous key past its grace (4403); see the module's header.
        (Revoked agents' sessions are the command sweep's: 4003.)"""
        with scope:
            while True:
                await trio.sleep(CREDENTIAL_SWEEP_SECONDS)
                if self.every_session():
                    try:
                        await self.check_credentials()
                    except Exception as exc:
                        self._log.warning("credentials", "checking credentials failed: %s", exc)

    async def check_credentials(self) -> int:
        """One sweep (see `_sweep_credentials`); how many sessions it closed."""
        deadlines = await self._store.credential_deadlines()
        now = self._clock()
        closed = 0
        for session in self.every_session():
            ended = _credentials_ended(session, deadlines, now)
            if ended is not None and session.close_code is None:
                reason, code = ended
                self._reject(reason)
                session.kick(code, reason.replace("_", " "))
                closed += 1
        if closed:
            log.info("closed %d agent sessions whose credentials ended", closed)
        return closed

    @property
    def sessions(self) -> dict[tuple[uuid.UUID, str], Session]:
        """Sessions that proved the signing key, by (agent, worker): the only
        ones commands go to. Those that have not yet wait in ``unproven``."""
        return self._table.sessions

    @property
    def unproven(self) -> set[Session]:
        return self._table.unproven

    def every_session(self) -> list[Session]:
        """The open sessions, proven or not."""
        return self._table.every_session()

    def sessions_of(self, agent_id: uuid.UUID) -> list[Session]:
        return self._table.sessions_of(agent_id)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """The ASGI-style handler for ``/ws/agent``."""
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        token = _bearer(scope)
        send_batch = SEND_BATCH in scope.get("extensions", {})
        del scope, message  # an idle connection keeps only what it needs
        login = None
        token_hash = b""
        if token is not None:
            # Just after start the store may not be migrated yet: a moment's
            # wait, then "try again later" (1013), never "bad token".
            with trio.move_on_after(STORE_WAIT_SECONDS):
                await self._store_ready.wait()
            try:
                if not self._store_ready.is_set():
                    raise StoreUnavailable("store not ready")
                token_hash = keys.token_hash(self._master, token)
                login = await self._store.agent_login(token_hash)
            except Exception as exc:
                self._reject("store_unavailable")
                self._log.warning("lookup", "agent lookup failed: %s", exc)
                await send(close_message(CloseCode.TRY_AGAIN_LATER))
                return
        await send({"type": "websocket.accept"})
        now = self._clock()
        if login is None:
            self._reject("bad_token")
            reason = "no token" if token is None else "bad token (unknown, revoked or archived)"
            await send(close_message(CloseCode.UNAUTHORIZED, reason))
            return
        if login.token_expires_at is not None and login.token_expires_at <= now:
            self._reject("bad_token")
            await send(close_message(CloseCode.UNAUTHORIZED, "token expired"))
            return
        agent = login.agent
        # This task serves this agent only: its lines, and those of the tasks
        # it starts, carry who it is.
        bind_log_context(agent=agent.id, project=agent.project_id)
        try:
            session = await self._open_session(
                agent, receive, send, token_hash, login.project.secret_generations(now)
            )
        except _Closed:
            return
        if session is None:
            return
        session.send_batch = send_batch
        key = (agent.id, session.worker_id)
        bind_log_context(worker=session.worker_id)  # JSON escapes what it must
        code: int | None = None
        try:
            code = await self._serve(session, receive)
        finally:
            log.info(
                "agent %s worker %s disconnected (%s)",
                agent.id,
                loggable(session.worker_id),
                "peer went away" if code is None else f"close {code}",
            )
            self._stats.agent_sessions_open -= 1
            self.unproven.discard(session)
            # A replaced session must not mark its successor's worker gone.
            if self.sessions.get(key) is session:
                del self.sessions[key]
                if self._on_worker is not None:
                    self._on_worker(agent, session.worker_id, "disconnected")
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    try:
                        if session.fencing_token is not None:
                            await self._ownership.release(
                                agent.id, session.worker_id, session.fencing_token
                            )
                        await self._store.worker_disconnected(
                            agent.id, session.worker_id, at=time.time()
                        )
                    except Exception as exc:
                        self._log.warning("disconnect", "recording a disconnect failed: %s", exc)
        if code is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await send(close_message(code, session.close_reason))

    def _reject(self, reason: str) -> None:
        self._stats.agent_rejected[reason] += 1
        if reason not in _LOGGED_WHERE_RAISED:
            self._log.warning(reason, "agent connection refused or closed: %s", reason)

    async def _open_session(
        self,
        agent: Agent,
        receive: Receive,
        send: Send,
        token_hash: bytes,
        generations: tuple[int, ...],
    ) -> Session | None:
        """hello → checks → unproven session → hello_ack; None if refused (and closed)."""
        config = self._config
        protocol = AgentProtocol(Role.BRAIN, max_frame_size=config.ws_max_frame_bytes)
        try:
            with trio.fail_after(HELLO_TIMEOUT_SECONDS):
                hello_frame = protocol.receive_message(await _next_message(receive))
        except trio.TooSlowError:
            self._reject("no_hello")
            await send(close_message(CloseCode.IDLE, "no hello in time"))
            return None
        except RemoteProtocolError as exc:
            self._reject(exc.reason)
            await send(close_message(exc.close_code or CloseCode.PROTOCOL_ERROR, str(exc)))
            return None
        hello = hello_frame.payload
        assert isinstance(hello, f.Hello)
        self._stats.agent_frames["hello"] += 1
        protocol.hello = None  # stored below; not kept per connection
        worker_id = hello.worker_id or f"conn-{uuid.uuid4().hex[:12]}"
        waiting = [s for s in self.unproven if s.agent.id == agent.id]
        slots = {s.worker_id for s in self.sessions_of(agent.id)} | {s.worker_id for s in waiting}
        # Unproven connections count against the cap as well, so that the
        # token alone cannot open unbounded ones; one that replaces a worker
        # already holding a slot is still allowed.
        cap = config.ws_per_agent_concurrency_cap
        if (worker_id not in slots and len(slots) >= cap) or len(waiting) >= cap:
            self._reject("worker_cap")
            await send(close_message(CloseCode.RATE_LIMITED, "worker cap full"))
            return None
        session = Session(
            agent=agent,
            worker_id=worker_id,
            role=hello.worker_role,
            protocol=protocol,
            send_message=send,
            hello=hello,
            token_hash=token_hash,
            generations=generations,
        )
        self.unproven.add(session)
        self._stats.agent_sessions_open += 1
        try:
            await send(
                {
                    "type": "websocket.send",
                    "bytes": protocol.accept(
                        key=keys.project_key(self._master, agent.project_id, generations[0]),
                        other_keys=tuple(
                            keys.project_key(self._master, agent.project_id, g)
                            for g in generations[1:]
                        ),
                        agent_id=str(agent.id),
                        project_id=str(agent.project_id),
                        brain_version=__version__,
                        heartbeat_interval_seconds=config.ws_heartbeat_interval_seconds,
                        max_frame_size_bytes=config.ws_max_frame_bytes,
                    ),
                }
            )
        except BaseException:
            self._stats.agent_sessions_open -= 1
            self.unproven.discard(session)
            raise
        return session

    async def _take_slot(self, session: Session) -> bool:
        """The session proved the signing key: it becomes its worker's (replacing
        an older connection, closed 4002), is recorded and gets what waits.
        False if the agent's cap is full meanwhile (close 4429)."""
        agent, worker_id, hello = session.agent, session.worker_id, session.hello
        assert hello is not None and session.protocol.peer_proven
        self.unproven.discard(session)
        key = (agent.id, worker_id)
        old = self.sessions.get(key)
        cap = self._config.ws_per_agent_concurrency_cap
        if old is None and len(self.sessions_of(agent.id)) >= cap:
            self._reject("worker_cap")
            return False
        if old is not None:
            old.kick(CloseCode.REPLACED, "replaced by a newer connection of this worker")
        session.hello = None
        self.sessions[key] = session
        if self._on_worker is not None:
            self._on_worker(agent, worker_id, "connected")
        log.info("agent %s worker %s connected", agent.id, loggable(worker_id))
        try:
            session.fencing_token = await self._ownership.acquire(agent.id, worker_id)
            await self._store.worker_connected(
                agent.id,
                worker_id,
                role=hello.worker_role,
                hello=f.unstructure_payload(hello),
                instance_id=self._instance_id,
                at=time.time(),
            )
            if self._commands is not None:
                await self._commands.session_opened(agent.id)
        except Exception as exc:
            # The store failed under us: the worker row and waiting
            # commands catch up later (the sweep); events flow now.
            self._reject("store_error")
            self._log.warning("store", "recording a new worker failed: %s", loggable(exc, 500))
        return True

    async def _serve(self, session: Session, receive: Receive) -> int | None:
        """Handle frames until the session ends: the close code to send, None if gone.

        Event batches are buffered on the endpoint's task nursery and
        acknowledged once durable, so one connection is not held to one
        batch per fsync. Batches read back to back form a group (closed at
        GROUP_BATCHES batches or about GROUP_EVENTS events, or when this
        loop waits for the socket) that one task buffers: one append, and
        its acks in one write; the loop reads on meanwhile. Past
        MAX_BATCHES_IN_FLIGHT batches or MAX_SESSION_BYTES_IN_FLIGHT bytes on
        this connection, or MAX_BYTES_IN_FLIGHT on all, we stop reading and
        TCP pushes back.
        """
        assert self._tasks is not None, "AgentEndpoint.run is not running"
        tasks = self._tasks
        frames = TokenBucket(self._config.ws_rate_limit_frames_per_second)
        events = TokenBucket(self._config.ws_rate_limit_events_per_second)
        code: int | None = CloseCode.NORMAL
        with session.scope:
            try:
                while True:
                    message = await receive()
                    kind = message["type"]
                    if kind == "websocket.disconnect":
                        if message.get("code") == CloseCode.TOO_LARGE:  # closed under us
                            self._reject("too_large")
                        code = None
                        break
                    if kind != "websocket.receive":
                        continue
                    data = message.get("bytes")
                    if data is None:
                        data = message.get("text") or ""
                    size = len(data)
                    frame = session.protocol.receive_message(data)
                    del message, data
                    if session.hello is not None and not await self._take_slot(session):
                        code = CloseCode.RATE_LIMITED
                        session.close_reason = "worker cap full"
                        break
                    now = session.last_frame = trio.current_time()
                    payload = frame.payload
                    self._stats.agent_frames[frame.type] += 1
                    count = len(payload.events) if isinstance(payload, f.EventBatch) else 0
                    if not (frames.take(1, now) and events.take(count, now)):
                        code = await self._over_rate_limit(session)
                        break
                    if isinstance(payload, f.EventBatch):
                        await self._wait_room(session, size)
                        session.in_flight += 1
                        session.in_flight_bytes += size
                        self._in_flight_bytes += size
                        group = session.pending
                        if group is None:
                            group = session.pending = []
                            tasks.start_soon(self._event_batches, session, group)
                        group.append(_Batch(frame.id, payload, size))
                        if len(group) >= GROUP_BATCHES or count * len(group) >= GROUP_EVENTS:
                            # Enough for one append: let it go to the buffer
                            # now, and read on while that commits.
                            session.pending = None
                            await trio.lowlevel.checkpoint()
                    else:
                        await self._handle_safely(session, frame)
                    del frame, payload
            except RemoteProtocolError as exc:
                self._reject(exc.reason)
                code = exc.close_code or CloseCode.PROTOCOL_ERROR
                if session.close_code is None:  # a kick's code keeps its own reason
                    session.close_reason = str(exc)
            if code is not None:
                # Let the batches read so far finish first: acked before the
                # close, unless the protocol itself closed (an error from the
                # agent); then they are durable and come again unacked.
                with trio.move_on_after(5):
                    await session.wait_in_flight(0)
        if session.close_code is not None:
            code = session.close_code
        elif code == CloseCode.RATE_LIMITED and session.close_reason is None:
            session.close_reason = "rate limit exceeded"
        return code

    async def _over_rate_limit(self, session: Session) -> int:
        self._reject("rate_limit")
        self._log.warning(
            "rate",
            "agent %s worker %s over its rate limit: closing (4429)",
            session.agent.id,
            loggable(session.worker_id),
        )
        with contextlib.suppress(Exception):
            await session.send(
                f.Error(code="rate_limited", message="rate limit exceeded", fatal=True)
            )
        return CloseCode.RATE_LIMITED

    async def _handle_safely(self, session: Session, frame: f.Frame) -> None:
        try:
            await self._handle(session, frame)
        except Exception as exc:
            # The store is down, say: the frame's effect is lost (state
            # frames come again; a command times out), but the connection
            # and its events carry on.
            self._reject("store_error")
            self._log.warning(
                "store", "handling a %s frame failed: %s", frame.type, loggable(exc, 500)
            )

    async def _handle(self, session: Session, frame: f.Frame) -> None:
        payload = frame.payload
        agent = session.agent
        if isinstance(payload, f.Heartbeat):
            await self._store.worker_seen(
                agent.id,
                session.worker_id,
                at=time.time(),
                health=dict(payload.adapter_health) if payload.adapter_health else None,
            )
        elif isinstance(payload, f.AgentStatus):
            await self._store.worker_seen(
                agent.id, session.worker_id, at=time.time(), status=payload.raw
            )
        elif isinstance(payload, f.RegistryDelta):
            await self._store.worker_registry(
                agent.id,
                session.worker_id,
                engine=payload.engine,
                added=list(payload.added),
                removed=list(payload.removed),
                updated=list(payload.updated),
            )
        elif isinstance(payload, f.CommandAck | f.CommandResult):
            if self._commands is None:
                return
            with log_context(command_id=frame.id[:200]):  # JSON escapes what it must
                if isinstance(payload, f.CommandAck):
                    taken = await self._commands.acknowledged(
                        frame.id, agent.id, session.worker_id, payload
                    )
                else:
                    taken = await self._commands.answered(
                        frame.id, agent.id, session.worker_id, payload
                    )
            if not taken:
                # Not fatal: the agent's own commands on this connection go on.
                await session.send(
                    f.Error(
                        code=COMMAND_REFUSED,
                        message=f"command {frame.id} was not delivered to this worker",
                        fatal=False,
                    )
                )
        elif isinstance(payload, f.Error):
            log.info(
                "agent %s worker %s reports %s: %s",
                agent.id,
                loggable(session.worker_id),
                loggable(payload.code),
                loggable(payload.message),
            )

    async def _wait_room(self, session: Session, size: int) -> None:
        """Backpressure: wait until this batch fits the session's and the brain's window."""
        await session.wait_room(size)
        while self._in_flight_bytes and self._in_flight_bytes + size > MAX_BYTES_IN_FLIGHT:
            await self._room.wait()

    async def _event_batches(self, session: Session, batches: list[_Batch]) -> None:
        """Buffer one group of a session's batches together, then ack each."""
        if session.pending is batches:  # the serve loop starts a new group
            session.pending = None
        try:
            await self._buffer_batches(session, batches)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("the connection went away under %d acks: %s", len(batches), exc)
        except Exception:
            # Our bug, not the agent's: close (1011) so that it reconnects and
            # sends its unacknowledged batches again, rather than wait on acks
            # that will not come.
            log.exception("acknowledging %d batches failed", len(batches))
            self._reject("internal_error")
            session.kick(CloseCode.INTERNAL_ERROR)
        finally:
            for batch in batches:
                session.batch_done(batch.size)
                self._in_flight_bytes -= batch.size
            self._room.set()
            self._room = trio.Event()

    async def _buffer_batches(self, session: Session, batches: list[_Batch]) -> None:
        """One buffer row per batch, all in one append; acks once they are durable.

        A batch gets no ack if the buffer is full (the agent keeps it and
        sends it again later) or the append failed.
        """
        acks: list[f.EventBatchAck] = []
        rows: list[NewRow] = []
        now = time.time()
        origin: bytes | None = None
        for batch in batches:
            count = len(batch.payload.events)
            body, accepted = _storable_body(batch.payload.events)
            rejected = count - accepted
            if rejected:
                self._stats.agent_rejected["bad_event"] += rejected
            ack = f.EventBatchAck(
                acked_id=batch.id, received=count, accepted=accepted, rejected=rejected
            )
            if not accepted:
                acks.append(ack)
                continue
            if not self._buffer.admit(1):
                self._reject("buffer_full")
                continue
            if origin is None:
                origin = origin_json(session)
            rows.append(NewRow(received_at=now, source="agent", body=body, origin=origin))
            acks.append(ack)
        if rows:
            try:
                await self._buffer.append(rows)
            except Exception as exc:
                self._reject("storage_error")
                self._log.warning("buffer", "buffering agent batches failed: %s", exc)
                acks = [ack for ack in acks if not ack.accepted]
            else:
                self._stats.agent_events_ok += sum(ack.accepted for ack in acks)
        if acks and session.protocol.state is State.CLOSED:
            # The session ended while we waited (a protocol error on a later
            # frame, or the agent's close): no acks can follow its close.
            # The rows are durable; the agent sends them again, and they land once.
            log.debug("session closed under %d acks", len(acks))
        elif acks:
            await session.send_all(acks)


# Refusal reasons whose own log line (with the cause) is written where they arise.
_LOGGED_WHERE_RAISED = frozenset(
    {"store_unavailable", "store_error", "rate_limit", "internal_error", "storage_error"}
)


def origin_json(session: Session) -> bytes:
    """Who sent a buffered agent batch: the buffer row's ``origin`` (see z4j.events)."""
    return orjson.dumps(
        {
            "project_id": str(session.agent.project_id),
            "agent_id": str(session.agent.id),
            "worker_id": session.worker_id,
        }
    )


async def _next_message(receive: Receive) -> bytes | str:
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            raise _Closed(message.get("code"))
        if message["type"] == "websocket.receive":
            data: bytes | str | None = message.get("bytes")
            if data is None:
                data = message.get("text") or ""
            return data


def _storable_body(events: tuple[f.AgentEvent, ...]) -> tuple[bytes, int]:
    """The events a store can keep, as one JSON array, and how many they are.

    Events no store can keep (integers beyond 64 bits, NUL in text) are
    left out: the ack's ``rejected`` counts them, so they are never acked and
    then lost. The whole batch is encoded in one go when it is clean (nearly
    always), event by event otherwise.
    """
    try:
        body = orjson.dumps([event.raw for event in events])
    except (orjson.JSONEncodeError, TypeError):
        pass
    else:
        if b"\\u0000" not in body:
            return body, len(events)
    bodies = [body for body in map(_storable, events) if body is not None]
    return b"[" + b",".join(bodies) + b"]", len(bodies)


def _storable(event: f.AgentEvent) -> bytes | None:
    """The event as JSON, or None if a store would refuse it."""
    try:
        data = orjson.dumps(event.raw)
    except (orjson.JSONEncodeError, TypeError):
        return None  # e.g. an integer beyond 64 bits
    if b"\\u0000" in data and _has_nul(event.raw):
        return None  # Postgres text and jsonb cannot hold NUL
    return data


def _has_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _credentials_ended(
    session: Session, deadlines: CredentialDeadlines, now: float
) -> tuple[str, CloseCode] | None:
    """Why and how a live session must close now (None: its credentials hold)."""
    ends = deadlines.tokens.get(session.token_hash)
    if ends is not None and ends <= now:
        return "token_expired", CloseCode.UNAUTHORIZED
    project = deadlines.projects.get(session.agent.project_id)
    if (
        project is not None
        and session.protocol.peer_proven
        and session.key_generation not in project.secret_generations(now)
    ):
        return "secret_expired", CloseCode.FORBIDDEN
    return None


#: The close frame's text when the code says it all.
CLOSE_REASONS: Final[Mapping[int, str]] = {
    CloseCode.NORMAL: "normal close",
    CloseCode.GOING_AWAY: "brain shutting down",
    CloseCode.PROTOCOL_ERROR: "protocol error",
    CloseCode.INVALID_DATA: "invalid frame",
    CloseCode.TOO_LARGE: "message too large",
    CloseCode.INTERNAL_ERROR: "internal error",
    CloseCode.TRY_AGAIN_LATER: "store unavailable: try again later",
    CloseCode.REPLACED: "replaced by a newer connection",
    CloseCode.REVOKED: "agent revoked",
    CloseCode.UNAUTHORIZED: "bad token",
    CloseCode.FORBIDDEN: "bad signature",
    CloseCode.IDLE: "idle",
    CloseCode.VERSION: "unsupported protocol version",
    CloseCode.RATE_LIMITED: "rate limited",
}


def close_message(code: int, reason: str | None = None) -> dict[str, Any]:
    """An ASGI close with a short reason: the agent's operator reads why.

    A close frame carries at most 123 bytes of reason (RFC 6455, 5.5)."""
    text = reason or CLOSE_REASONS.get(code, "")
    data = text.encode()[:123]
    return {"type": "websocket.close", "code": code, "reason": data.decode(errors="ignore")}


def _bearer(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers", []):
        if name.lower() == b"authorization":
            text = value.decode("latin-1")
            if text[:7].lower() == "bearer ":
                return text[7:].strip() or None
    return None
