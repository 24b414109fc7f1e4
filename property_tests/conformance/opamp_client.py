"""How the OpAMP machine reaches a server: one message out, the answer back.

The machine speaks to an `OpampTransport`: ``exchange`` sends one
``AgentToServer`` (its protobuf bytes) and returns an `OpampReply` (the
``ServerToAgent``, or the HTTP status and why there was none). The plain
HTTP transport is `HttpTransport`; a WebSocket transport (each binary
message a varint header 0, then the protobuf) would implement the same two
methods, and the rules that only make sense over HTTP (401, 415, 413) ask
for ``kind == "http"``.

`HttpTransport` is h11 over a Trio socket, one kept-alive connection per
agent as real clients do. It reports exactly what the server did: the
status line, the headers, the body; a connection the server drops. A body
the server answers before reading it all (413 by ``Content-Length``) is
written while the answer is read, so an early answer is seen, not lost to
a failed write.
"""

from __future__ import annotations

import gzip
import ssl
import zlib
from typing import Protocol

import attrs
import h11
import trio

from z4j.protocol.opamp import opamp_pb2 as pb

from .opamp_wire import show_reply
from .target import OpampTarget
from .transcript import Transcript

__all__ = ["PROTOBUF", "HttpTransport", "OpampReply", "OpampTransport", "open_transport"]

PROTOBUF = "application/x-protobuf"
_READ = 65536
_DEFAULT = object()


@attrs.frozen(kw_only=True)
class OpampReply:
    """What came back for one message."""

    status: int | None  # the HTTP status; None when no answer came (or not HTTP)
    headers: dict[str, str] = attrs.field(factory=dict)  # lower-cased names
    message: pb.ServerToAgent | None = None
    problem: str = ""  # why there is no message, when one was due

    def describe(self) -> str:
        what = f"HTTP {self.status}" if self.status is not None else "no answer"
        if self.problem:
            what += f" ({self.problem})"
        return what


class OpampTransport(Protocol):
    """One agent's way to the server."""

    kind: str  # "http" (or "websocket")

    async def exchange(self, data: bytes, *, what: str, gzip_body: bool = False) -> OpampReply:
        """Send one AgentToServer's bytes (``what`` for the transcript); its answer."""
        ...

    async def aclose(self) -> None: ...


def open_transport(
    target: OpampTarget, transcript: Transcript, label: str, timeout: float
) -> HttpTransport:
    """The transport the target's URL names (plain HTTP for now)."""
    return HttpTransport(target, transcript, label, timeout)


class _Retry(Exception):
    """A kept-alive connection was closed by the server before it read anything."""


class HttpTransport:
    kind = "http"

    def __init__(
        self, target: OpampTarget, transcript: Transcript, label: str, timeout: float
    ) -> None:
        self.target = target
        self.transcript = transcript
        self.label = label
        self.timeout = timeout
        self._stream: trio.abc.Stream | None = None
        self._conn: h11.Connection | None = None

    async def exchange(self, data: bytes, *, what: str, gzip_body: bool = False) -> OpampReply:
        if gzip_body:
            return await self.post(gzip.compress(data), what=what, content_encoding="gzip")
        return await self.post(data, what=what)

    async def post(
        self,
        body: bytes,
        *,
        what: str,
        token: object = _DEFAULT,
        content_type: str | None = PROTOBUF,
        content_encoding: str | None = None,
    ) -> OpampReply:
        """POST ``body`` to the OpAMP path; ``token`` None sends no Authorization."""
        bearer = self.target.token if token is _DEFAULT else token
        headers = [("Host", f"{self.target.host}:{self.target.port}")]
        headers.append(("Content-Length", str(len(body))))
        headers.append(("Accept-Encoding", "gzip"))
        if bearer is not None:
            headers.append(("Authorization", f"Bearer {bearer}"))
        if content_type is not None:
            headers.append(("Content-Type", content_type))
        if content_encoding is not None:
            headers.append(("Content-Encoding", content_encoding))
        sent = [f"{k}: {v}" for k, v in headers[3:] if k != "Authorization"]
        if bearer is not None and bearer != self.target.token:
            sent.append("Authorization: (another token)")
        elif bearer is None:
            sent.append("(no Authorization)")
        self.transcript.add(
            self.label, "→", f"POST {len(body)} bytes [{'; '.join(sent)}] {what}".rstrip()
        )
        reused = self._stream is not None
        try:
            reply = await self._round_trip(headers, body, reused=reused)
        except _Retry:
            self.transcript.add(self.label, "!", "kept-alive connection was closed: reconnecting")
            await self._drop()
            reply = await self._round_trip(headers, body, reused=False)
        line = reply.describe()
        if reply.message is not None:
            line = f"{reply.status} {show_reply(reply.message)}"
        self.transcript.add(self.label, "←", line)
        return reply

    async def _connect(self) -> None:
        target = self.target
        if target.scheme == "https":
            context = ssl.create_default_context()
            self._stream = await trio.open_ssl_over_tcp_stream(
                target.host, target.port, ssl_context=context
            )
        else:
            self._stream = await trio.open_tcp_stream(target.host, target.port)
        self._conn = h11.Connection(h11.CLIENT)

    async def _drop(self) -> None:
        if self._stream is not None:
            await trio.aclose_forcefully(self._stream)
        self._stream = self._conn = None

    async def _round_trip(
        self, headers: list[tuple[str, str]], body: bytes, *, reused: bool
    ) -> OpampReply:
        if self._stream is None:
            try:
                await self._connect()
            except OSError as exc:
                return OpampReply(status=None, problem=f"cannot connect: {exc}")
        stream, conn = self._stream, self._conn
        assert stream is not None and conn is not None
        request = conn.send(h11.Request(method="POST", target=self.target.path, headers=headers))
        request = (request or b"") + (conn.send(h11.Data(data=body)) or b"")
        request += conn.send(h11.EndOfMessage()) or b""
        written = False
        response: h11.Response | None = None
        chunks: list[bytes] = []
        received = False
        problem = ""

        async def write() -> None:
            nonlocal written
            try:
                await stream.send_all(request)
                written = True
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # an early answer, or a drop: the reader says which

        complete = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            with trio.move_on_after(self.timeout):
                try:
                    while True:
                        event = conn.next_event()
                        if event is h11.NEED_DATA:
                            try:
                                data = bytes(await stream.receive_some(_READ))
                            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                                data, problem = b"", f"connection reset ({exc})"
                            received = received or bool(data)
                            conn.receive_data(data)
                        elif isinstance(event, h11.Response):
                            response = event
                        elif isinstance(event, h11.Data):
                            chunks.append(bytes(event.data))
                        elif isinstance(event, h11.EndOfMessage):
                            complete = True
                            break
                        elif isinstance(event, h11.ConnectionClosed):
                            break
                except h11.RemoteProtocolError as exc:
                    problem = problem or f"bad HTTP from the server: {exc}"
            nursery.cancel_scope.cancel()
        if response is None:
            await self._drop()
            if reused and not received:
                raise _Retry
            return OpampReply(status=None, problem=problem or f"none within {self.timeout}s")
        reusable = complete and written and conn.our_state is h11.DONE
        if reusable and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            await self._drop()
        found = {k.decode().lower(): v.decode("latin-1") for k, v in response.headers}
        if not complete:
            return OpampReply(
                status=response.status_code,
                headers=found,
                problem=problem or "the body was cut short",
            )
        return _decoded(response.status_code, found, b"".join(chunks), self.target)

    async def aclose(self) -> None:
        await self._drop()


def _decoded(status: int, headers: dict[str, str], body: bytes, target: OpampTarget) -> OpampReply:
    """The ServerToAgent in a body, if it holds one."""
    if not body:
        return OpampReply(status=status, headers=headers, problem="empty body")
    if headers.get("content-encoding", "").lower() in ("gzip", "x-gzip"):
        try:
            inflater = zlib.decompressobj(wbits=31)
            body = inflater.decompress(body, target.max_message_bytes + 1)
        except zlib.error as exc:
            return OpampReply(status=status, headers=headers, problem=f"bad gzip: {exc}")
    try:
        message = pb.ServerToAgent.FromString(body)
    except Exception as exc:  # protobuf's DecodeError, or its C layer's
        return OpampReply(status=status, headers=headers, problem=f"not a ServerToAgent: {exc}")
    return OpampReply(status=status, headers=headers, message=message)
