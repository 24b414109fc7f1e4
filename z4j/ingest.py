"""A small client for the ingest port, in blocking and Trio flavours.

Both keep one persistent connection, frame payloads with
`protocol.ingest.encode_frame`, and read the ``2:OK`` / ``5:ERROR`` replies
with its `ReplyParser`::

    with z4j.ingest.connect("127.0.0.1", 2407) as client:
        client.send([{"t": "log", "message": "hello"}])

    async with await z4j.ingest.open_trio("127.0.0.1", 2407) as client:
        await client.send([{"t": "log", "message": "hello"}])

Against a brain with TLS on its ingest port (Z4J_TLS_CERT_FILE), pass an
`ssl.SSLContext` that trusts its certificate as ``ssl_context``
(``ssl.create_default_context(cafile=...)``); the host name given is the
name the certificate is checked against.

`send` returns once the brain has the payload durable, and raises
`IngestRejected` on ``5:ERROR``. `send_many` pipelines: it writes every
frame, then reads every reply, which is how one connection reaches high
rates. It writes at most `PIPELINE_WINDOW` frames before reading their
replies, so any number of payloads is safe.

Delivery is at-least-once from the client's view: if the connection breaks
before a reply arrives, the payload may or may not be stored, and sending
it again may store it twice.
"""

from __future__ import annotations

import gzip
import socket
import ssl
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, Self

import orjson
import trio

from .protocol.ingest import PING, ReplyParser, encode_frame

__all__ = [
    "IngestClient",
    "IngestConnectionError",
    "IngestRejected",
    "TrioIngestClient",
    "connect",
    "encode_payload",
    "open_trio",
]

Records = Sequence[dict[str, Any]] | bytes


class IngestRejected(Exception):
    """The brain answered ``5:ERROR``: the payload is not stored."""


class IngestConnectionError(ConnectionError):
    """The connection closed before every reply arrived."""


def encode_payload(records: Records, *, compress: bool = False) -> bytes:
    """JSON-encode ``records`` (bytes pass through), gzipped if asked."""
    body = records if isinstance(records, bytes) else orjson.dumps(list(records))
    return gzip.compress(body, compresslevel=1) if compress else body


# Frames written before their replies are read. Unbounded pipelining can
# deadlock: the server blocks writing replies nobody reads, and stops reading.
PIPELINE_WINDOW = 256


def _windows(frames: Iterable[bytes]) -> Iterable[list[bytes]]:
    window: list[bytes] = []
    for frame in frames:
        window.append(frame)
        if len(window) == PIPELINE_WINDOW:
            yield window
            window = []
    if window:
        yield window


class _Framing:
    def __init__(self, token: str | None, compress: bool) -> None:
        self.token = token
        self.compress = compress
        self.replies = ReplyParser()

    def frame(self, records: Records) -> bytes:
        return encode_frame(encode_payload(records, compress=self.compress), token=self.token)


class IngestClient:
    """Blocking client over one persistent TCP connection."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 2407,
        *,
        token: str | None = None,
        timeout: float | None = 30.0,
        compress: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._framing = _Framing(token, compress)
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ssl_context is not None:
            try:
                sock = ssl_context.wrap_socket(sock, server_hostname=host)
            except BaseException:
                sock.close()
                raise
        self._sock = sock

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def _read_replies(self, count: int) -> list[bool]:
        got: list[bool] = []
        while len(got) < count:
            data = self._sock.recv(65536)
            if not data:
                raise IngestConnectionError(
                    f"connection closed with {count - len(got)} replies outstanding"
                )
            self._framing.replies.receive_data(data)
            got += self._framing.replies.replies()
        return got

    def send(self, records: Records) -> None:
        """Send one payload; return once it is durable in the brain."""
        self._sock.sendall(self._framing.frame(records))
        if not self._read_replies(1)[0]:
            raise IngestRejected("the brain answered 5:ERROR")

    def send_many(self, payloads: Iterable[Records]) -> list[bool]:
        """Pipeline ``payloads``; one True (stored) or False (5:ERROR) each."""
        results: list[bool] = []
        for window in _windows(self._framing.frame(p) for p in payloads):
            self._sock.sendall(b"".join(window))
            results += self._read_replies(len(window))
        return results

    def ping(self) -> None:
        self._sock.sendall(encode_frame(PING, token=self._framing.token))
        if not self._read_replies(1)[0]:
            raise IngestRejected("the brain answered 5:ERROR to PING")


class TrioIngestClient:
    """Trio client over one persistent TCP connection.

    One task at a time may use it (replies are matched to frames by order).
    """

    def __init__(self, stream: trio.abc.Stream, *, token: str | None, compress: bool) -> None:
        self._stream = stream
        self._framing = _Framing(token, compress)
        self._lock = trio.Lock()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def _exchange(self, data: bytes, count: int) -> list[bool]:
        async with self._lock:
            await self._stream.send_all(data)
            got: list[bool] = []
            while len(got) < count:
                chunk = await self._stream.receive_some(65536)
                if not chunk:
                    raise IngestConnectionError(
                        f"connection closed with {count - len(got)} replies outstanding"
                    )
                self._framing.replies.receive_data(bytes(chunk))
                got += self._framing.replies.replies()
            return got

    async def send(self, records: Records) -> None:
        if not (await self._exchange(self._framing.frame(records), 1))[0]:
            raise IngestRejected("the brain answered 5:ERROR")

    async def send_many(self, payloads: Iterable[Records]) -> list[bool]:
        results: list[bool] = []
        for window in _windows(self._framing.frame(p) for p in payloads):
            results += await self._exchange(b"".join(window), len(window))
        return results

    async def ping(self) -> None:
        if not (await self._exchange(encode_frame(PING, token=self._framing.token), 1))[0]:
            raise IngestRejected("the brain answered 5:ERROR to PING")


def connect(
    host: str = "127.0.0.1",
    port: int = 2407,
    *,
    token: str | None = None,
    timeout: float | None = 30.0,
    compress: bool = False,
    ssl_context: ssl.SSLContext | None = None,
) -> IngestClient:
    """Open a blocking client (over TLS with ``ssl_context``)."""
    return IngestClient(
        host, port, token=token, timeout=timeout, compress=compress, ssl_context=ssl_context
    )


async def open_trio(
    host: str = "127.0.0.1",
    port: int = 2407,
    *,
    token: str | None = None,
    compress: bool = False,
    ssl_context: ssl.SSLContext | None = None,
) -> TrioIngestClient:
    """Open a Trio client (over TLS with ``ssl_context``; the handshake is done here)."""
    tcp = await trio.open_tcp_stream(host, port)
    tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ssl_context is None:
        return TrioIngestClient(tcp, token=token, compress=compress)
    secure = trio.SSLStream(tcp, ssl_context, server_hostname=host)
    try:
        await secure.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return TrioIngestClient(secure, token=token, compress=compress)
