"""Lean WebSocket connections: wsproto driven by the connection's own task.

Thousands of agents hold idle connections to one brain, so what each costs
matters. hypercorn runs several tasks, channels and locks per WebSocket;
here a connection is one Trio task, its socket and wsproto's frame-level
state machine; writes are serialised by a flag, with a queue only while two
writers meet. Measured as brain RSS over 1,000 idle agents: 31.6 KiB per
connection through hypercorn, 13 to 15 KiB with this and the lean agent session.

Handlers keep the ASGI WebSocket interface (``scope``, ``receive``,
``send``), so the same handler also runs under hypercorn. Two differences,
both in the agent's favour: a close sent before accept is delivered as a
close frame with its code (ASGI would answer HTTP 403 and lose the code),
and a message over the size limit is closed with 1009 and reported to the
handler as a disconnect with ``code`` 1009.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.handshake import H11Handshake
from wsproto.utilities import LocalProtocolError
from wsproto.utilities import RemoteProtocolError as WsRemoteProtocolError

__all__ = ["Handler", "serve_websocket"]

log = logging.getLogger("z4j.http.ws")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[Scope, Receive, Send], Awaitable[None]]

RECEIVE_BYTES = 65536
CLOSE_WAIT_SECONDS = 2.0
CLOSE_TOO_BIG = 1009


class _WebSocket:
    """One server-side connection: the ASGI receive/send pair over wsproto.

    Until accepted it holds wsproto's handshake (an h11 connection and the
    request); after, only the frame-level `Connection`, which is all an
    idle connection needs.
    """

    __slots__ = ("_closed", "_conn", "_handshake", "_max", "_queue", "_stream", "_writing")

    def __init__(
        self, stream: trio.SocketStream, handshake: H11Handshake, max_message: int
    ) -> None:
        self._stream = stream
        self._handshake: H11Handshake | None = handshake
        self._conn: Connection | None = None
        self._max = max_message
        self._closed = False
        # A write lock made of a flag, and a queue only once two writers
        # meet: FIFO with hand-over, like trio.Lock, without its cost on
        # every idle connection.
        self._writing = False
        self._queue: trio.lowlevel.ParkingLot | None = None

    @property
    def accepted(self) -> bool:
        return self._conn is not None

    async def _write(self, data: bytes) -> None:
        if not data:
            return
        if self._writing:
            if self._queue is None:
                self._queue = trio.lowlevel.ParkingLot()
            await self._queue.park()  # woken as the new owner
        else:
            self._writing = True
        try:
            await self._stream.send_all(data)
        finally:
            if self._queue:
                self._queue.unpark()  # ownership passes on
            else:
                self._writing = False

    async def _accept(self) -> None:
        assert self._handshake is not None
        data = self._handshake.send(AcceptConnection())
        self._conn = self._handshake.connection
        self._handshake = None
        await self._write(data)

    async def receive(self) -> dict[str, Any]:
        """The next ASGI event: connect first, then whole messages, then disconnect."""
        conn = self._conn
        if conn is None:
            return {"type": "websocket.connect"}
        parts: list[Any] = []
        size = 0
        while not self._closed:
            for event in conn.events():
                if isinstance(event, BytesMessage | TextMessage):
                    parts.append(event.data)
                    size += len(event.data)
                    if size > self._max:
                        await self.close(CLOSE_TOO_BIG, "message too big")
                        return {"type": "websocket.disconnect", "code": CLOSE_TOO_BIG}
                    if event.message_finished:
                        if isinstance(event, TextMessage):
                            return {"type": "websocket.receive", "text": "".join(parts)}
                        return {"type": "websocket.receive", "bytes": b"".join(parts)}
                elif isinstance(event, Ping):
                    await self._write(conn.send(event.response()))
                elif isinstance(event, CloseConnection):
                    # The peer's close, or wsproto's for a malformed frame.
                    self._closed = True
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await self._write(conn.send(event.response()))
                    return {"type": "websocket.disconnect", "code": event.code}
            try:
                data = await self._stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self._closed = True
                break
            conn.receive_data(data)
        return {"type": "websocket.disconnect", "code": 1006}

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "websocket.accept":
            if self._conn is None:
                await self._accept()
        elif kind == "websocket.send":
            if self._closed or self._conn is None:
                raise trio.ClosedResourceError("websocket not open")
            data = message.get("bytes")
            event = BytesMessage(data) if data is not None else TextMessage(message.get("text", ""))
            await self._write(self._conn.send(event))
        elif kind == "websocket.close":
            if self._conn is None:
                await self._accept()
            await self.close(message.get("code", 1000), message.get("reason") or "")

    async def close(self, code: int, reason: str = "") -> None:
        """Send our close frame, give the peer a moment to answer, then hang up."""
        conn = self._conn
        if self._closed or conn is None:
            return
        self._closed = True
        try:
            await self._write(conn.send(CloseConnection(code=code, reason=reason)))
            with trio.move_on_after(CLOSE_WAIT_SECONDS):
                while data := await self._stream.receive_some(RECEIVE_BYTES):
                    conn.receive_data(data)
                    if any(isinstance(e, CloseConnection) for e in conn.events()):
                        break
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.BusyResourceError,  # a reader is still on the stream: don't wait
            LocalProtocolError,
        ):
            pass


async def serve_websocket(
    stream: trio.SocketStream, head: bytes, handler: Handler, *, max_message: int
) -> None:
    """Complete the handshake begun in ``head`` and run ``handler`` on the connection."""
    handshake = H11Handshake(ConnectionType.SERVER)
    try:
        handshake.receive_data(head)
        request = next((e for e in handshake.events() if isinstance(e, Request)), None)
    except WsRemoteProtocolError as exc:
        if isinstance(exc.event_hint, RejectConnection):
            await stream.send_all(handshake.send(exc.event_hint))
        return
    if request is None:
        return
    connection = _WebSocket(stream, handshake, max_message)
    target = request.target
    running = handler(_scope(request, stream), connection.receive, connection.send)
    del handshake, head, request  # an idle connection keeps only what it needs
    code = 1000
    try:
        await running
    except trio.Cancelled:
        code = 1001  # the brain is going away
        raise
    except Exception:
        code = 1011
        log.exception("websocket handler for %s failed", target)
    finally:
        if connection.accepted:
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_WAIT_SECONDS):
                await connection.close(code)


def _scope(request: Request, stream: trio.SocketStream) -> Scope:
    path, _, query = request.target.partition("?")
    return {
        "type": "websocket",
        "path": path,
        "query_string": query.encode(),
        "headers": [(name.lower(), value) for name, value in request.extra_headers],
        "client": stream.socket.getpeername()[:2],
    }
