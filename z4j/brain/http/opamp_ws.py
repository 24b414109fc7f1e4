"""OpAMP over WebSocket: ``/v1/opamp`` upgraded, one session per agent connection.

Each binary message is a varint header (0) and an ``AgentToServer``; each
of ours the same with a ``ServerToAgent`` (`z4j.protocol.opamp.codec`).
What a message does to the agent is `OpampFleet`'s, as over HTTP; this
module adds what a connection has and a poll has not:

1. The bearer token is checked before the upgrade: HTTP 401, nothing read.
2. Text messages close with 1003; a message over
   Z4J_OPAMP_MAX_MESSAGE_BYTES closes with 1009 (the lean WebSocket server
   stops reading there); a malformed one is answered with BAD_REQUEST and
   the connection stays open, as over HTTP. A message the store cannot
   serve now is answered UNAVAILABLE with a retry hint.
3. The first good message names the agent: the session claims it
   (`Ownership`, worker id ``opamp:<instance_uid>`` under the project) with
   a fencing token. The newest connection of an instance_uid wins, here or
   on another replica; the older one is closed with 4002. A message naming
   another instance_uid is BAD_REQUEST, unless it is the id we just gave
   the agent (``agent_identification``): the claim moves to it.
4. Server capabilities go in the first reply only, and a configuration is
   offered once per connection (rule 7 of the core): the session remembers
   both. When an agent's desired configuration changes (`OpampNudges`, from
   the API or a rollout, here or relayed from another replica), its
   session pushes it at once, unasked.
5. While open, a session is a sign of life: `serve` queues every session's
   ``last_seen`` each third of the heartbeat window (`OpampFleet.keep_alive`),
   and closes with 4003 the sessions whose token was revoked since.
6. A session ends by close, shutdown (1001) or replacement; its claim is
   released. ``agent_disconnect`` marks the agent offline at once; a dropped
   connection leaves it online until the heartbeat window passes.

A session's replies and pushes take turns (`OpampSession.turn`), so a push
racing a reply cannot offer the same configuration twice.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import trio

from ...protocol.close import CloseCode
from ...protocol.errors import LocalProtocolError
from ...protocol.opamp import (
    MessageTooLarge,
    OpampDecodeError,
    RemoteConfig,
    Transport,
    bad_request,
    decode_ws_message,
    encode_ws_message,
    push,
    unavailable,
    ws_payload,
)
from ...protocol.opamp import opamp_pb2 as pb
from ...protocol.opamp.state import AgentState
from ...stats import BrainStats, ThrottledLog
from ...store.base import StoreUnavailable
from ..lifetime import until
from ..links import OPAMP_WORKER_PREFIX, OpampNudges, OpampSessionTable, Ownership
from ..opamp_fleet import HEAVY_BYTES, OpampFleet
from ._request import Receive, Scope, Send
from .auth import credentials
from .opamp import RETRY_AFTER_SECONDS

__all__ = ["OpampSession", "OpampSockets"]

log = logging.getLogger("z4j.opamp.ws")


class OpampSession:
    """One agent connection: who it is, what it was sent, and its turn lock."""

    __slots__ = (
        "capabilities_sent",
        "config_sent",
        "digest",
        "kicked",
        "project_id",
        "scope",
        "send",
        "state",
        "token",
        "turn",
        "uid",
    )

    def __init__(self, project_id: uuid.UUID, digest: bytes, send: Send) -> None:
        self.project_id = project_id
        self.digest = digest  # of the token it was admitted with
        self.send = send
        self.uid: bytes | None = None  # from the first good message on
        self.state: AgentState | None = None  # after the first reply
        self.token = 0
        self.capabilities_sent = False
        self.config_sent: bytes | None = None
        self.turn = trio.Lock()
        self.scope = trio.CancelScope()
        self.kicked: int | None = None

    def kick(self, code: int) -> None:
        self.kicked = code
        self.scope.cancel()


class OpampSockets:
    """The WebSocket handler for ``/v1/opamp`` and its push and keep-alive task."""

    max_message_bytes: int  # read by serve_http: this path's message limit

    def __init__(
        self,
        fleet: OpampFleet,
        stats: BrainStats,
        *,
        table: OpampSessionTable[OpampSession],
        ownership: Ownership,
        nudges: OpampNudges,
        heartbeat_window_seconds: float,
        store_ready: trio.Event | None = None,
    ) -> None:
        self._fleet = fleet
        self._stats = stats
        self._ownership = ownership
        self._nudges = nudges
        self._keep_alive_seconds = heartbeat_window_seconds / 3
        self._store_ready = store_ready
        self.max_message_bytes = fleet.limit
        self.sessions = table.sessions
        self._log = ThrottledLog(log)

    # -- the task: pushes and keep-alive ----------------------------------------------

    async def serve(
        self, *, shutdown: trio.Event, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Push changed configurations and keep sessions alive until ``shutdown``."""
        async with until(shutdown) as nursery:
            task_status.started()
            nursery.start_soon(self._push_forever, nursery)
            nursery.start_soon(self._keep_alive_forever)

    async def _push_forever(self, nursery: trio.Nursery) -> None:
        while True:
            await self._nudges.wake.wait()
            here: dict[uuid.UUID, list[OpampSession]] = {}
            for (project_id, uid), made_here in self._nudges.take_wanted().items():
                session = self.sessions.get((project_id, uid))
                if session is None:
                    if made_here:
                        self._stats.opamp_dispatch[
                            "forwarded" if self._nudges.replicated else "no_session"
                        ] += 1
                    continue
                self._stats.opamp_dispatch["local"] += 1
                here.setdefault(project_id, []).append(session)
            for project_id, sessions in here.items():
                # One store read for a whole stage's agents, not one each.
                try:
                    desired = await self._fleet.desired(
                        project_id, [s.uid for s in sessions if s.uid is not None]
                    )
                except StoreUnavailable as exc:
                    self._log.warning("push", "OpAMP pushes skipped, store unavailable: %s", exc)
                    continue
                for session in sessions:
                    config = desired.get(session.uid or b"")
                    if config is not None:
                        nursery.start_soon(self._push, session, config)

    async def _push(self, session: OpampSession, config: RemoteConfig) -> None:
        async with session.turn:
            state = session.state
            if (
                state is None
                or self.sessions.get((session.project_id, state.instance_uid)) is not session
            ):
                return  # not answered yet (the reply will offer it), or replaced
            message = push(
                state,
                config,
                capabilities_sent=session.capabilities_sent,
                config_sent=session.config_sent,
            )
            if message is None:
                return
            if await self._send(session, message):
                session.capabilities_sent = True
                session.config_sent = message.remote_config.config_hash
                self._stats.opamp_pushes += 1

    async def _keep_alive_forever(self) -> None:
        while True:
            await trio.sleep(self._keep_alive_seconds)
            sessions = list(self.sessions.values())
            for session in sessions:
                if session.state is not None and session.state.connected:
                    self._fleet.keep_alive(session.project_id, session.state)
            await self._close_revoked(sessions)

    async def _close_revoked(self, sessions: list[OpampSession]) -> None:
        """Close the sessions whose token was revoked since they connected (4003)."""
        for digest in {session.digest for session in sessions}:
            try:
                if await self._fleet.project_of_digest(digest) is not None:
                    continue
            except StoreUnavailable:
                return
            for session in sessions:
                if session.digest == digest:
                    session.kick(CloseCode.REVOKED)

    # -- one connection ------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":  # ASGI: connect comes first
            return
        if self._store_ready is not None and not self._store_ready.is_set():
            await _deny(send, 503, [(b"retry-after", b"5")])
            return
        token, _ = credentials(scope["headers"])
        digest = b"" if token is None else self._fleet.token_digest(token)
        try:
            project_id = None if token is None else await self._fleet.project_of_digest(digest)
        except StoreUnavailable:
            await _deny(send, 503, [(b"retry-after", b"5")])
            return
        if project_id is None:
            self._stats.opamp_rejected["unauthorized"] += 1
            await _deny(send, 401, [(b"www-authenticate", b'Bearer realm="z4j opamp"')])
            return
        await send({"type": "websocket.accept"})
        session = OpampSession(project_id, digest, send)
        try:
            with session.scope:
                await self._serve(session, receive)
        finally:
            await self._end(session)
        if session.kicked is not None:
            await send({"type": "websocket.close", "code": session.kicked})

    async def _serve(self, session: OpampSession, receive: Receive) -> None:
        while True:
            event = await receive()
            if event["type"] == "websocket.disconnect":
                if event.get("code") == CloseCode.TOO_LARGE:
                    self._stats.opamp_rejected["too_large"] += 1
                return
            data = event.get("bytes")
            if data is None:
                self._stats.opamp_rejected["text"] += 1
                session.kick(CloseCode.UNSUPPORTED_DATA)
                return
            heavy = len(data) > HEAVY_BYTES
            if heavy:
                async with self._fleet.heavy_turn:
                    await self._message(session, data, heavy=True)
            else:
                await self._message(session, data, heavy=False)
            if session.state is not None and not session.state.connected:
                return  # agent_disconnect: the agent closes next; nothing more is due

    async def _message(self, session: OpampSession, data: bytes, *, heavy: bool) -> None:
        try:
            if heavy:
                message = await self._fleet.decode_heavy(
                    ws_payload(data, limit=self._fleet.limit), None
                )
            else:
                message = decode_ws_message(data, limit=self._fleet.limit)
        except MessageTooLarge:  # the server's own limit stops it first; kept for safety
            self._stats.opamp_rejected["too_large"] += 1
            session.kick(CloseCode.TOO_LARGE)
            return
        except OpampDecodeError as error:
            await self._send(session, self._fleet.rejected(error))
            return
        uid = message.instance_uid
        if session.uid is not None and uid != session.uid:
            self._stats.opamp_rejected["instance_uid"] += 1
            await self._send(
                session,
                bad_request(
                    f"this connection is agent {session.uid.hex()}, not {uid.hex()}",
                    instance_uid=uid,
                ),
            )
            return
        if session.uid is None:
            await self._claim(session, uid)
        async with session.turn:
            previous = session.state
            try:
                applied = await self._fleet.apply(
                    session.project_id,
                    message,
                    transport=Transport.WEBSOCKET,
                    heavy=heavy,
                    capabilities_sent=session.capabilities_sent,
                    config_sent=session.config_sent,
                    sequence_num=None if previous is None else previous.sequence_num,
                )
            except StoreUnavailable as exc:
                # Nothing was kept of it: the agent sends it again after the hint.
                self._log.warning("store", "OpAMP message answered UNAVAILABLE: %s", exc)
                await self._send(
                    session, unavailable(retry_after=RETRY_AFTER_SECONDS, instance_uid=uid)
                )
                return
            session.state = applied.state
            if await self._send(session, applied.reply):
                session.capabilities_sent = True
                if applied.config_offered is not None:
                    session.config_sent = applied.config_offered
        if applied.state.instance_uid != uid:
            await self._move(session, uid, applied.state.instance_uid)

    async def _claim(self, session: OpampSession, uid: bytes) -> None:
        """Own this agent's session: here, the older connection goes; on other
        replicas, the registry's takeover closes theirs."""
        key = (session.project_id, uid)
        older = self.sessions.get(key)
        if older is not None:
            older.kick(CloseCode.REPLACED)
        self.sessions[key] = session
        self._stats.opamp_sessions["websocket"] = len(self.sessions)
        session.uid = uid
        session.token = await self._ownership.acquire(
            session.project_id, OPAMP_WORKER_PREFIX + uid.hex()
        )

    async def _move(self, session: OpampSession, old: bytes, new: bytes) -> None:
        """We gave the agent a new instance_uid: the claim follows it."""
        if self.sessions.get((session.project_id, old)) is session:
            del self.sessions[session.project_id, old]
            self._stats.opamp_sessions["websocket"] = len(self.sessions)
        await self._ownership.release(
            session.project_id, OPAMP_WORKER_PREFIX + old.hex(), session.token
        )
        await self._claim(session, new)

    async def _end(self, session: OpampSession) -> None:
        uid = session.uid
        if uid is None:
            return
        key = (session.project_id, uid)
        if self.sessions.get(key) is session:
            del self.sessions[key]
            self._stats.opamp_sessions["websocket"] = len(self.sessions)
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                await self._ownership.release(
                    session.project_id, OPAMP_WORKER_PREFIX + uid.hex(), session.token
                )
            except Exception as exc:  # the claim lapses by its TTL
                self._log.warning("release", "releasing an OpAMP session failed: %s", exc)

    async def _send(self, session: OpampSession, message: pb.ServerToAgent) -> bool:
        """Send one message; False when it did not go (too large, or the socket is gone)."""
        try:
            data = encode_ws_message(message, limit=self._fleet.limit)
        except LocalProtocolError as exc:
            self._stats.opamp_rejected[exc.reason] += 1
            return False
        try:
            await session.send({"type": "websocket.send", "bytes": data})
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True


async def _deny(send: Send, status: int, headers: list[tuple[bytes, bytes]]) -> None:
    """Refuse the upgrade with an HTTP status (ASGI's WebSocket denial response)."""
    message: dict[str, Any] = {"type": "websocket.http.response.start", "status": status}
    message["headers"] = headers
    await send(message)
    await send({"type": "websocket.http.response.body", "body": b""})
