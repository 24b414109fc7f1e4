"""One session of the agent: the nursery and tasks of one open websocket.

Kept apart from `Agent` because a session is short-lived and has one job:
pump frames between the websocket and the state that outlives it (`Shared`:
the spool, the commands, the status). `converse` runs four tasks in one
nursery: receiving (hello first), sending (the only task that signs, so
frames leave in seq order), heartbeats, and watching for a stop. The first
way the session ends wins and becomes its `End`; the caller sends the close
frame and decides when to reconnect.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Final

import attrs
import trio
import trio_websocket

from ..protocol.agent import frames as f
from ..protocol.agent.connection import AgentProtocol, Role
from ..protocol.close import CloseCode
from ..protocol.errors import RemoteProtocolError
from ._backoff import INCOMPATIBLE_ERRORS, End, Kind, classify_close
from ._commands import Commands, failed
from ._spool import Batch, Spool

__all__ = ["INBOUND_MAX", "Shared", "Status", "Stop", "Wakeup", "converse"]

logger = logging.getLogger("z4j.agent")

INBOUND_MAX: Final = 1024 * 1024  # what z4j-bare accepts from a brain, too
#: Room left in a frame for the envelope around the events.
_FRAME_OVERHEAD: Final = 1024


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@attrs.define
class Stop:
    """A stop request for one `Agent.run`: graceful (flush first) unless any caller said not."""

    requested: bool = False
    graceful: bool = True
    event: trio.Event = attrs.field(factory=trio.Event)


class Wakeup:
    """News for the waiting tasks (an emit, an ack, a result): set, then replaced."""

    def __init__(self) -> None:
        self.changed = trio.Event()

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


@attrs.define(kw_only=True)
class Status:
    """What `Agent.statistics` and heartbeats report about sessions."""

    connected: bool = False
    sessions_opened: int = 0
    last_flush_at: str | None = None


@attrs.frozen(kw_only=True)
class Shared:
    """What outlives a session, and what each session needs from its agent."""

    key: bytes
    hello: Callable[[], f.Hello]
    on_open: Callable[[f.HelloAck], None]  # after the session's own bookkeeping
    spool: Spool
    commands: Commands
    wakeup: Wakeup
    status: Status
    hello_timeout: float
    close_timeout: float
    shutdown_grace: float


async def converse(ws: trio_websocket.WebSocketConnection, shared: Shared, stop: Stop) -> End:
    """Run one session on an open websocket until it ends; say why and whether it was healthy."""
    async with trio.open_nursery() as nursery:
        s = _Session(ws, nursery, shared, stop)
        nursery.start_soon(s.guarded, s.watch_stop)
        nursery.start_soon(s.guarded, s.receive)
    end = s.end or End(kind=Kind.TRANSIENT, detail="session ended")
    if s.opened_at is not None and s.ack is not None:
        up = trio.current_time() - s.opened_at
        end = attrs.evolve(end, healthy=up >= s.ack.heartbeat_interval_seconds)
    return end


class _Session:
    """One connection's state and tasks; `finish` ends it (first caller wins)."""

    def __init__(
        self,
        ws: trio_websocket.WebSocketConnection,
        nursery: trio.Nursery,
        shared: Shared,
        stop: Stop,
    ) -> None:
        self.ws = ws
        self.nursery = nursery
        self.shared = shared
        self.spool = shared.spool
        self.commands = shared.commands
        self.stop = stop
        self.proto: AgentProtocol | None = None
        self.ack: f.HelloAck | None = None
        self.opened_at: float | None = None
        self.control: deque[tuple[f.Payload, str | None]] = deque()
        self.send_lock = trio.Lock()
        self.end: End | None = None

    @property
    def max_frame(self) -> int:
        return self.ack.max_frame_size_bytes if self.ack else INBOUND_MAX

    def finish(self, end: End) -> None:
        if self.end is None:
            self.end = end
        self.nursery.cancel_scope.cancel()

    def notify(self) -> None:
        self.shared.wakeup.notify()

    async def guarded(self, task: Callable[[], Awaitable[None]]) -> None:
        """Run one session task; turn the ways a session ends into `End`s."""
        try:
            await task()
        except trio_websocket.ConnectionClosed:
            reason = self.ws.closed
            code = reason.code if reason is not None else CloseCode.ABNORMAL
            kind = classify_close(code, handshake=self.ack is None)
            detail = f"brain closed {code}" + (
                f" {reason.reason}" if reason and reason.reason else ""
            )
            if code == CloseCode.FORBIDDEN and self.ack is not None:
                logger.error(
                    "the brain refused a signed frame (4403): is the project secret right?"
                )
            self.finish(End(kind=kind, detail=detail))
        except RemoteProtocolError as exc:
            code = exc.close_code or CloseCode.PROTOCOL_ERROR
            logger.error("protocol error from the brain: %s (closing with %d)", exc, code)
            kind = classify_close(code, handshake=False)
            await self.finish_cleanly(
                End(kind=kind, detail=f"{exc.reason}: {exc}", close_code=code)
            )

    async def finish_cleanly(self, end: End) -> None:
        # Wait for a send in progress: cancelling it mid-frame would corrupt the stream.
        with trio.move_on_after(self.shared.close_timeout):
            await self.send_lock.acquire()
        self.finish(end)

    async def watch_stop(self) -> None:
        stop = self.stop
        await stop.event.wait()
        if stop.graceful and self.ack is not None:
            with trio.move_on_after(self.shared.shutdown_grace):
                while stop.graceful and not self._drained():
                    await self.shared.wakeup.changed.wait()
        await self.finish_cleanly(
            End(kind=Kind.STOPPED, detail="agent stopped", close_code=CloseCode.NORMAL)
        )

    def _drained(self) -> bool:
        return self.spool.empty and not (self.commands.busy or self.control)

    # -- receiving ----------------------------------------------------------------------

    async def receive(self) -> None:
        self.proto = proto = AgentProtocol(Role.AGENT, key=self.shared.key)
        async with self.send_lock:
            await self.ws.send_message(proto.hello_message(self.shared.hello()))
        message: bytes | str | None = None
        with trio.move_on_after(self.shared.hello_timeout):
            message = await self.ws.get_message()
        if message is None:
            detail = f"no hello_ack within {self.shared.hello_timeout:g}s"
            await self.finish_cleanly(
                End(kind=Kind.TRANSIENT, detail=detail, close_code=CloseCode.NORMAL)
            )
            return
        frame = proto.receive_message(message)
        assert isinstance(frame.payload, f.HelloAck)  # the core accepts nothing else here
        self._opened(frame.payload)
        self.nursery.start_soon(self.guarded, self._send_loop)
        self.nursery.start_soon(self.guarded, self._heartbeats)
        while True:
            frame = proto.receive_message(await self.ws.get_message())
            payload = frame.payload
            if isinstance(payload, f.EventBatchAck):
                self._on_batch_ack(payload)
            elif isinstance(payload, f.Command):
                token = payload.delivery_claim_token
                self.control.append((f.CommandAck(delivery_claim_token=token), frame.id))
                self.commands.receive(frame.id, payload)
            elif isinstance(payload, f.Error):
                if not payload.fatal:
                    logger.warning("brain error %s: %s", payload.code, payload.message)
                    continue
                kind = Kind.INCOMPATIBLE if payload.code in INCOMPATIBLE_ERRORS else Kind.TRANSIENT
                detail = f"fatal error from the brain: {payload.code}: {payload.message}"
                await self.finish_cleanly(
                    End(kind=kind, detail=detail, close_code=CloseCode.NORMAL)
                )
                return

    def _opened(self, ack: f.HelloAck) -> None:
        self.ack = ack
        self.opened_at = trio.current_time()
        resend = self.spool.open_session()
        status = self.shared.status
        status.connected = True
        status.sessions_opened += 1
        logger.info(
            "agent session open: agent %s, session %s (%d batches to re-send)",
            ack.agent_id,
            ack.session_id,
            resend,
        )
        self.shared.on_open(ack)

    def _on_batch_ack(self, ack: f.EventBatchAck) -> None:
        batch = self.spool.ack(ack.acked_id)
        if batch is None:
            return  # an ack for a batch acked before (it was sent twice)
        if ack.rejected:
            logger.warning("the brain rejected %d of %d events", ack.rejected, len(batch.items))
        self.shared.status.last_flush_at = _now_iso()
        self.notify()

    # -- sending --------------------------------------------------------------------------

    async def _heartbeats(self) -> None:
        assert self.ack is not None
        while True:
            heartbeat = f.Heartbeat(
                buffer_size=self.spool.spooled,
                last_flush_at=self.shared.status.last_flush_at,
                dropped_events=self.spool.refused + self.spool.dropped,
            )
            self.control.append((heartbeat, None))
            self.notify()
            await trio.sleep(self.ack.heartbeat_interval_seconds)

    async def _send_loop(self) -> None:
        """The only task that signs and sends, so frames leave in seq order."""
        while True:
            changed = self.shared.wakeup.changed
            if self.control:
                payload, frame_id = self.control.popleft()
                await self._send(payload, frame_id)
            elif (pending := self.commands.next_result()) is not None:
                command_id, result = pending
                if not await self._send(result, command_id):
                    too_large = failed(
                        f"the result is over the brain's {self.max_frame}-byte limit"
                    )
                    token = result.delivery_claim_token
                    await self._send(
                        attrs.evolve(too_large, delivery_claim_token=token), command_id
                    )
                self.commands.sent(command_id, result)
            elif (batch := self._next_batch()) is not None:
                await self._send_batch(batch)
            else:
                # Idle until there is news, or the oldest batch in flight is overdue.
                with trio.move_on_at(self.spool.deadline()):
                    await changed.wait()

    async def _send(self, payload: f.Payload, frame_id: str | None) -> bool:
        """Sign and send one frame; False (nothing sent) if it is over the frame limit."""
        assert self.proto is not None
        data = self.proto.send(payload, frame_id=frame_id)
        if len(data) > self.max_frame:
            return False
        async with self.send_lock:
            await self.ws.send_message(data)
        return True

    def _next_batch(self) -> Batch | None:
        batch = self.spool.overdue(trio.current_time())
        if batch is not None:
            logger.info(
                "batch %s not acked in %gs; sending it again", batch.id, self.spool.ack_timeout
            )
            return batch
        return self.spool.next_batch(self.max_frame - _FRAME_OVERHEAD)

    async def _send_batch(self, batch: Batch) -> None:
        self.spool.sending(batch, trio.current_time())
        if await self._send(batch.payload, batch.id):
            return
        # Over the brain's frame limit (it advertised a smaller one than the
        # batch was formed for): re-batch its events, or drop a lone event.
        dropped = self.spool.too_large(batch)
        if dropped is None:
            return
        logger.error(
            "dropped event %s: over the brain's %d-byte frame limit", dropped["id"], self.max_frame
        )
        self.notify()
