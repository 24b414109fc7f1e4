"""A small WebSocket client (wsproto over a Trio socket) that hides nothing.

The suite must see exactly what a server did: the HTTP status when it
refused the upgrade, the close code it sent, or that it dropped the socket
without one (1006). Full clients smooth these over, so this one is just
wsproto and a socket: one task reads (`receive`), any task may send.
"""

from __future__ import annotations

import collections
import contextlib

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError

__all__ = ["ABNORMAL", "Closed", "Rejected", "WsClient"]

ABNORMAL = 1006  # the socket ended without a close frame
_READ = 65536


class Rejected(Exception):
    """The server answered the upgrade with an HTTP status instead."""

    def __init__(self, status: int) -> None:
        super().__init__(f"upgrade refused with HTTP {status}")
        self.status = status


class Closed(Exception):
    """The connection is closed; ``code`` is the server's close code (1006: none)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"closed with {code}")
        self.code = code


class WsClient:
    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self._stream = stream
        self._ws = ws
        self._events: collections.deque[Event] = collections.deque()
        self._parts: list[bytes | str] = []
        self._send_lock = trio.Lock()
        self.close_code: int | None = None

    @classmethod
    async def connect(
        cls, host: str, port: int, path: str, headers: list[tuple[bytes, bytes]]
    ) -> WsClient:
        """Open the socket and do the upgrade; raises `Rejected` or `Closed`."""
        stream = await trio.open_tcp_stream(host, port)
        try:
            ws = WSConnection(ConnectionType.CLIENT)
            await stream.send_all(
                ws.send(Request(host=f"{host}:{port}", target=path, extra_headers=headers))
            )
            client = cls(stream, ws)
            while True:
                events = client._next_events()
                for index, event in enumerate(events):
                    if isinstance(event, AcceptConnection):
                        client._events.extend(events[index + 1 :])  # frames right behind it
                        return client
                    if isinstance(event, RejectConnection):
                        raise Rejected(event.status_code)
                    if isinstance(event, RejectData):
                        continue
                if not await client._read():
                    raise Closed(ABNORMAL)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise

    def _next_events(self) -> list[Event]:
        events = list(self._events)
        self._events.clear()
        try:
            events += list(self._ws.events())
        except LocalProtocolError:  # garbage from the server: treat as a drop
            events.append(CloseConnection(code=ABNORMAL))
        return events

    async def _read(self) -> bool:
        try:
            data = await self._stream.receive_some(_READ)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            return False
        self._ws.receive_data(data)
        return True

    async def send(self, data: bytes | str) -> None:
        """Send one message; raises `Closed` if the connection is gone."""
        if self.close_code is not None:
            raise Closed(self.close_code)
        message: BytesMessage | TextMessage = (
            BytesMessage(data=data) if isinstance(data, bytes) else TextMessage(data=data)
        )
        try:
            async with self._send_lock:
                await self._stream.send_all(self._ws.send(message))
        except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError):
            raise Closed(self.close_code or ABNORMAL) from None

    async def receive(self) -> bytes | str:
        """The next whole message; raises `Closed` once the server has closed."""
        while True:
            if self.close_code is not None:
                raise Closed(self.close_code)
            for index, event in enumerate(events := self._next_events()):
                if isinstance(event, BytesMessage | TextMessage):
                    self._parts.append(
                        bytes(event.data) if isinstance(event.data, bytearray) else event.data
                    )
                    if event.message_finished:
                        self._events.extend(events[index + 1 :])
                        parts, self._parts = self._parts, []
                        if isinstance(parts[0], str):
                            return "".join(str(p) for p in parts)
                        return b"".join(p for p in parts if isinstance(p, bytes))
                elif isinstance(event, Ping):
                    await self._reply(event.response())
                elif isinstance(event, CloseConnection):
                    self.close_code = event.code
                    await self._reply(event.response())
                    await trio.aclose_forcefully(self._stream)
                    raise Closed(event.code)
            if not await self._read():
                self.close_code = ABNORMAL
                await trio.aclose_forcefully(self._stream)
                raise Closed(ABNORMAL)

    async def _reply(self, event: Event) -> None:
        with contextlib.suppress(
            trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError
        ):
            if self._ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
                async with self._send_lock:
                    await self._stream.send_all(self._ws.send(event))

    async def close(self, code: int = 1000) -> None:
        """Start a clean close; the reader sees the server's answer."""
        with contextlib.suppress(
            trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError
        ):
            if self._ws.state is ConnectionState.OPEN:
                async with self._send_lock:
                    await self._stream.send_all(self._ws.send(CloseConnection(code=code)))

    async def abort(self) -> None:
        """Drop the socket without a close frame."""
        if self.close_code is None:
            self.close_code = ABNORMAL
        await trio.aclose_forcefully(self._stream)
