"""Lean WebSocket connections: wsproto driven by the connection's own task.

Thousands of agents hold idle connections to one brain, so what each costs
matters. hypercorn runs several tasks, channels and locks per WebSocket;
here a connection is one Trio task, its socket, the sans-IO fast-path
frame parser (`z4j.protocol.websocket`) and wsproto's frame-level state
machine for every frame the fast path passes on. This module keeps the I/O:
it pumps bytes, and serialises writes by a flag so that writers that meet go
out together in one write. Measured as brain RSS over 1,000 idle agents: 31.6 KiB per
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

from ...protocol.close import CloseCode
from ...protocol.errors import RemoteProtocolError
from ...protocol.websocket import (
    NEED_DATA,
    OPCODE_BINARY,
    OPCODE_TEXT,
    BytesReceived,
    FrameParser,
    OtherFrame,
    TextReceived,
    encode_frame,
)

__all__ = ["SEND_BATCH", "Handler", "serve_websocket"]

log = logging.getLogger("z4j.http.ws")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[Scope, Receive, Send], Awaitable[None]]

# An ASGI extension (named in the scope's "extensions"): a message of this
# type carries "messages", a list of bytes, sent as that many WebSocket
# messages in one write.
SEND_BATCH = "z4j.websocket.send_batch"

RECEIVE_BYTES = 65536
CLOSE_WAIT_SECONDS = 2.0


class _Waiting:
    """Writes waiting for the stream (see `_WebSocket._write`)."""

    __slots__ = ("data", "error", "lot")

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.lot = trio.lowlevel.ParkingLot()
        self.error: BaseException | None = None


class _WebSocket:
    """One server-side connection: the ASGI receive/send pair over wsproto.

    Until accepted it holds wsproto's handshake (an h11 connection and the
    request); after, only the frame-level `Connection`, which is all an
    idle connection needs.
    """

    __slots__ = (
        "_closed",
        "_conn",
        "_handshake",
        "_max",
        "_parser",
        "_stream",
        "_waiting",
        "_writing",
    )

    def __init__(self, stream: trio.abc.Stream, handshake: H11Handshake, max_message: int) -> None:
        self._stream = stream
        self._handshake: H11Handshake | None = handshake
        self._conn: Connection | None = None
        self._max = max_message
        self._closed = False
        # A write lock made of a flag; bytes and a queue of waiting writers
        # only once two writers meet (see `_write`), so an idle connection
        # carries none of it.
        self._writing = False
        self._waiting: _Waiting | None = None
        # The fast path: plain data frames are taken apart here, every
        # other frame goes to wsproto (see `receive`).
        self._parser = FrameParser(max_message)

    def take_initial(self, data: bytes) -> None:
        """Bytes that came in with the handshake's request, after its head."""
        self._parser.receive_data(data)

    @property
    def accepted(self) -> bool:
        return self._conn is not None

    async def _write(self, data: bytes) -> None:
        """Send ``data``; writers that meet are sent together, in order.

        The first writer owns the stream; writers arriving while it sends
        add their bytes to a waiting group. When the owner's send returns it
        sends the whole group in one ``send_all`` and wakes its writers:
        acks of one group commit cost one system call per connection, not
        one each. Returns once ``data`` is with the kernel; raises
        BrokenResourceError if the write that carried it failed.
        """
        if not data:
            return
        if self._writing:
            group = self._waiting
            if group is None:
                group = self._waiting = _Waiting()
            group.data.append(data)
            await group.lot.park()  # woken when the group went out, or failed
            if group.error is not None:
                raise group.error
            return
        self._writing = True
        group = None
        try:
            await self._stream.send_all(data)
            while (group := self._waiting) is not None:
                self._waiting = None
                await self._stream.send_all(b"".join(group.data))
                group.lot.unpark_all()
                group = None
        except BaseException as exc:
            for failed in (group, self._waiting):  # their bytes will not go out
                if failed is not None:
                    failed.error = trio.BrokenResourceError("the connection failed")
                    failed.error.__cause__ = exc
                    failed.lot.unpark_all()
            self._waiting = None
            raise
        finally:
            self._writing = False

    async def _accept(self) -> None:
        assert self._handshake is not None
        data = self._handshake.send(AcceptConnection())
        self._conn = self._handshake.connection
        self._handshake = None
        await self._write(data)

    async def receive(self) -> dict[str, Any]:
        """The next ASGI event: connect first, then whole messages, then disconnect.

        Whole, unfragmented data frames (nearly all an agent sends) are
        taken apart by the sans-IO `FrameParser` (z4j.protocol.websocket);
        every other frame (control frames, fragments, and anything
        malformed) it hands on whole to wsproto, which answers pings,
        assembles fragments and closes with the right code.
        """
        conn = self._conn
        if conn is None:
            return {"type": "websocket.connect"}
        parser = self._parser
        parts: list[Any] = []
        size = 0
        while not self._closed:
            for event in conn.events():
                if isinstance(event, BytesMessage | TextMessage):
                    parts.append(event.data)
                    size += len(event.data)
                    if size > self._max:
                        await self.close(CloseCode.TOO_LARGE, "message too big")
                        return {"type": "websocket.disconnect", "code": CloseCode.TOO_LARGE}
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
                got = parser.next_event()
            except RemoteProtocolError as exc:  # a message over the size limit
                code = exc.close_code or CloseCode.PROTOCOL_ERROR
                await self.close(code, "message too big")
                return {"type": "websocket.disconnect", "code": code}
            if got is NEED_DATA:
                try:
                    data = await self._stream.receive_some(RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    self._closed = True
                    break
                parser.receive_data(data)
            elif type(got) is BytesReceived:
                return {"type": "websocket.receive", "bytes": got.data}
            elif type(got) is TextReceived:
                return {"type": "websocket.receive", "text": got.data}
            else:
                assert type(got) is OtherFrame
                conn.receive_data(got.data)  # wsproto's to handle; its events come next
        return {"type": "websocket.disconnect", "code": CloseCode.ABNORMAL}

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "websocket.http.response.start":
            # ASGI's denial response: an HTTP status instead of the upgrade.
            if self._handshake is not None:
                self._closed = True
                reject = RejectConnection(
                    status_code=message["status"],
                    headers=[*message.get("headers", []), (b"content-length", b"0")],
                    has_body=False,
                )
                await self._write(self._handshake.send(reject))
            return
        if kind == "websocket.http.response.body":
            return  # denials here carry no body
        if kind == "websocket.accept":
            if self._conn is None:
                await self._accept()
        elif kind == "websocket.send":
            if self._closed or self._conn is None:
                raise trio.ClosedResourceError("websocket not open")
            data = message.get("bytes")
            if data is not None:
                await self._write(encode_frame(OPCODE_BINARY, data))
            else:
                await self._write(encode_frame(OPCODE_TEXT, message.get("text", "").encode()))
        elif kind == SEND_BATCH:
            if self._closed or self._conn is None:
                raise trio.ClosedResourceError("websocket not open")
            await self._write(
                b"".join([encode_frame(OPCODE_BINARY, m) for m in message["messages"]])
            )
        elif kind == "websocket.close":
            if self._conn is None:
                await self._accept()
            await self.close(message.get("code", CloseCode.NORMAL), message.get("reason") or "")

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
                    conn.receive_data(bytes(data))
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
    stream: trio.abc.Stream,
    head: bytes,
    handler: Handler,
    *,
    max_message: int,
    client: tuple[str, int] | None = None,
    secure: bool = False,
) -> None:
    """Complete the handshake begun in ``head`` and run ``handler`` on the connection.

    ``client`` is the peer's address and ``secure`` whether ``stream`` is
    TLS, for the scope (``"scheme": "wss"``).
    """
    handshake = H11Handshake(ConnectionType.SERVER)
    request_head, sep, early = head.partition(b"\r\n\r\n")
    try:
        handshake.receive_data(request_head + sep)
        request = next((e for e in handshake.events() if isinstance(e, Request)), None)
    except WsRemoteProtocolError as exc:
        if isinstance(exc.event_hint, RejectConnection):
            await stream.send_all(handshake.send(exc.event_hint))
        return
    if request is None:
        return
    connection = _WebSocket(stream, handshake, max_message)
    connection.take_initial(early)  # frames sent before our answer (pipelined)
    target = request.target
    running = handler(_scope(request, client, secure), connection.receive, connection.send)
    del handshake, head, request  # an idle connection keeps only what it needs
    code: int = CloseCode.NORMAL
    try:
        await running
    except trio.Cancelled:
        code = CloseCode.GOING_AWAY
        raise
    except Exception:
        code = CloseCode.INTERNAL_ERROR
        log.exception("websocket handler for %s failed", target)
    finally:
        if connection.accepted:
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_WAIT_SECONDS):
                await connection.close(code)


def _scope(request: Request, client: tuple[str, int] | None, secure: bool) -> Scope:
    path, _, query = request.target.partition("?")
    return {
        "type": "websocket",
        "scheme": "wss" if secure else "ws",
        "path": path,
        "query_string": query.encode(),
        # wsproto keeps Host out of extra_headers; ASGI apps (the dashboard
        # socket's Origin check) expect it among the headers.
        "headers": [
            (b"host", request.host.encode()),
            *((name.lower(), value) for name, value in request.extra_headers),
        ],
        "client": client,
        "extensions": {SEND_BATCH: {}},
    }
