"""An OpAMP WebSocket client for tests and benchmarks, and an OpAMP token.

`OpampSocket` speaks the transport and nothing more: it sends what it is
given (an `AgentToServer`, or raw bytes for the tests of malformed input)
and hands back each `ServerToAgent`, or the close code the server ended
with. The rules are the server's to keep and the test's to check.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError

from .. import keys
from ..config import Config
from ..protocol.close import CloseCode
from ..protocol.opamp import opamp_pb2 as pb
from ..protocol.opamp.codec import decode_server_to_agent_ws
from ..store import store_for

__all__ = ["OpampClosed", "OpampRejected", "OpampSocket", "opamp_socket", "opamp_token"]


async def opamp_token(config: Config, project: str) -> str:
    """A project (made if missing) and a new OpAMP token for it, in the store directly."""
    store = store_for(config)
    try:
        await store.migrate()
        found = await store.find_project(project) or await store.create_project(project)
        token = keys.new_opamp_token()
        await store.add_opamp_token(
            found.id, keys.opamp_token_hash(keys.master_secret(config), token), "test"
        )
        return token
    finally:
        await store.aclose()


class OpampClosed(Exception):
    """The server closed the connection (``code``: its close code)."""

    def __init__(self, code: int | None) -> None:
        super().__init__(f"closed with {code}")
        self.code = code


class OpampRejected(Exception):
    """The server refused the upgrade with an HTTP status."""

    def __init__(self, status_code: int) -> None:
        super().__init__(f"upgrade refused with HTTP {status_code}")
        self.status_code = status_code


class OpampSocket:
    """One OpAMP WebSocket connection, as an agent would hold it (wsproto over Trio)."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self._stream = stream
        self._ws = ws
        self._parts: list[bytes | str] = []
        self._closed: int | None = None
        self._done = False

    async def send(self, message: pb.AgentToServer | bytes | str) -> None:
        """A message (header 0 added); raw bytes, or text, sent as they are."""
        if isinstance(message, pb.AgentToServer):
            message = b"\x00" + message.SerializeToString()
        event: Message[Any] = (
            TextMessage(data=message) if isinstance(message, str) else BytesMessage(data=message)
        )
        await self._stream.send_all(self._ws.send(event))

    async def receive(self) -> pb.ServerToAgent:
        """The next message from the server; `OpampClosed` when it closed."""
        while True:
            for event in self._ws.events():
                if isinstance(event, BytesMessage | TextMessage):
                    self._parts.append(
                        bytes(event.data) if isinstance(event, BytesMessage) else event.data
                    )
                    if event.message_finished:
                        parts, self._parts = self._parts, []
                        if isinstance(parts[0], str):
                            raise AssertionError(f"a text message from the server: {parts!r}")
                        return decode_server_to_agent_ws(b"".join(parts))  # type: ignore[arg-type]
                elif isinstance(event, Ping):
                    await self._stream.send_all(self._ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    self._closed = event.code
                    with contextlib.suppress(trio.BrokenResourceError, LocalProtocolError):
                        await self._stream.send_all(self._ws.send(event.response()))
                    raise OpampClosed(event.code)
            if self._done:
                raise OpampClosed(self._closed)
            data = await self._stream.receive_some(65536)
            if not data:
                self._done = True
                self._ws.receive_data(None)
            else:
                self._ws.receive_data(data)

    async def exchange(self, message: pb.AgentToServer) -> pb.ServerToAgent:
        await self.send(message)
        return await self.receive()

    async def closed(self) -> int | None:
        """Wait for the server to close; its close code (messages before are dropped)."""
        while True:
            try:
                await self.receive()
            except OpampClosed as exc:
                return exc.code

    async def aclose(self, code: int = CloseCode.NORMAL) -> None:
        if self._ws.state is ConnectionState.OPEN:
            with contextlib.suppress(trio.BrokenResourceError, LocalProtocolError):
                await self._stream.send_all(self._ws.send(CloseConnection(code=code)))
        await self._stream.aclose()


@asynccontextmanager
async def opamp_socket(
    address: tuple[str, int], token: str | None, *, path: str = "/v1/opamp"
) -> AsyncIterator[OpampSocket]:
    """Connect; `OpampRejected` (with ``status_code``) if the upgrade is refused."""
    headers = [] if token is None else [(b"authorization", f"Bearer {token}".encode())]
    host, port = address
    stream = await trio.open_tcp_stream(host, port)
    try:
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(
            ws.send(Request(host=f"{host}:{port}", target=path, extra_headers=headers))
        )
        while True:
            data = await stream.receive_some(65536)
            if not data:
                raise OpampClosed(None)
            ws.receive_data(data)
            event = next(ws.events(), None)
            if isinstance(event, AcceptConnection):
                break
            if isinstance(event, RejectConnection):
                raise OpampRejected(event.status_code)
        socket = OpampSocket(stream, ws)
        yield socket
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()
