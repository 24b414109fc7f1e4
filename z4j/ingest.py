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

Delivery is at-least-once. The brain's guarantees start at its reply:
``2:OK`` means the payload is durable in its buffer. If the connection
breaks before a payload's reply arrives, the client reconnects (capped
exponential backoff with full jitter, `RETRY_BASE_SECONDS` to
`RETRY_CAP_SECONDS`) and sends again every payload not yet answered, in
order; one the brain had stored before the break is then stored twice.
Consumers that must not see a record twice de-duplicate on a field of
their own (an id in the record).

``retry_seconds`` (default `RETRY_SECONDS`) bounds how long one `send`,
`send_many` or `ping` keeps trying after a break, counted from the last
reply; past it, `IngestConnectionError` says how long the brain was
unreachable, how many payloads were left unanswered and the last error.
``retry_seconds=0`` raises at the first break, as before. The first
connection (`connect`, `open_trio`) is not retried: a wrong address or port
fails at once.
"""

from __future__ import annotations

import gzip
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import orjson

from .protocol.ingest import PING, ReplyParser, encode_frame

if TYPE_CHECKING:  # imported where used: `z4j send` and the blocking client never load Trio
    import trio

__all__ = [
    "RETRY_SECONDS",
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
    """The brain stayed unreachable past the retry budget: some payloads are
    unanswered (they may or may not be stored)."""


def encode_payload(records: Records, *, compress: bool = False) -> bytes:
    """JSON-encode ``records`` (bytes pass through), gzipped if asked."""
    body = records if isinstance(records, bytes) else orjson.dumps(list(records))
    return gzip.compress(body, compresslevel=1) if compress else body


#: How long a call keeps reconnecting after a break, from the last reply.
RETRY_SECONDS = 30.0
#: The first wait after a break, and the longest (full jitter below it).
RETRY_BASE_SECONDS = 0.05
RETRY_CAP_SECONDS = 2.0

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


class _Retry:
    """The retry budget of one call: backoff delays, and the error past it."""

    def __init__(self, seconds: float, where: str) -> None:
        self.seconds = seconds
        self.where = where
        self.attempts = 0
        self.deadline: float | None = None

    def progressed(self) -> None:
        """A reply arrived: the budget starts again at the next break."""
        self.attempts = 0
        self.deadline = None

    def delay(self, exc: BaseException, unanswered: int, now: float) -> float:
        """The wait before reconnecting; raises once the budget is spent."""
        if self.deadline is None:
            self.deadline = now + self.seconds
        delay = random.random() * min(RETRY_CAP_SECONDS, RETRY_BASE_SECONDS * 2.0**self.attempts)
        self.attempts += 1
        if self.seconds <= 0 or now + delay > self.deadline:
            raise IngestConnectionError(
                f"{self.where} was unreachable for {self.seconds:g}s "
                f"({self.attempts} attempts); {unanswered} payloads unanswered "
                f"(they may or may not be stored); last error: {exc!r}"
            ) from exc
        return delay


_BROKEN = (OSError, EOFError)  # ConnectionError, socket timeouts and SSL errors are OSErrors


class IngestClient:
    """Blocking client over one persistent TCP connection, reconnected after a
    break (see the module's header)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 2407,
        *,
        token: str | None = None,
        timeout: float | None = 30.0,
        compress: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        self._framing = _Framing(token, compress)
        self._address = (host, port)
        self._timeout = timeout
        self._ssl_context = ssl_context
        self._retry_seconds = retry_seconds
        self._closed = False
        self._sock: socket.socket | None = self._connect()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self._address, timeout=self._timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._ssl_context is not None:
            try:
                sock = self._ssl_context.wrap_socket(sock, server_hostname=self._address[0])
            except BaseException:
                sock.close()
                raise
        self._framing.replies = ReplyParser()
        return sock

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _read_replies(self, sock: socket.socket, count: int, got: list[bool]) -> None:
        while len(got) < count:
            data = sock.recv(65536)
            if not data:
                raise IngestConnectionError(
                    f"connection closed with {count - len(got)} replies outstanding"
                )
            self._framing.replies.receive_data(data)
            got += self._framing.replies.replies()

    def _exchange(self, frames: list[bytes]) -> list[bool]:
        """Send ``frames``; their replies, in order, re-sending the unanswered
        ones on a new connection after a break."""
        if self._closed:
            raise IngestConnectionError("the client is closed")
        got: list[bool] = []
        where = f"the brain at {self._address[0]}:{self._address[1]}"
        retry = _Retry(self._retry_seconds, where)
        while True:
            try:
                if self._sock is None:
                    self._sock = self._connect()
                self._sock.sendall(b"".join(frames[len(got) :]))
                self._read_replies(self._sock, len(frames), got)
                return got
            except _BROKEN as exc:
                answered = len(got)
                self._drop()
                if answered:
                    retry.progressed()
                time.sleep(retry.delay(exc, len(frames) - answered, time.monotonic()))

    def send(self, records: Records) -> None:
        """Send one payload; return once it is durable in the brain."""
        if not self._exchange([self._framing.frame(records)])[0]:
            raise IngestRejected("the brain answered 5:ERROR")

    def send_many(self, payloads: Iterable[Records]) -> list[bool]:
        """Pipeline ``payloads``; one True (stored) or False (5:ERROR) each."""
        results: list[bool] = []
        for window in _windows(self._framing.frame(p) for p in payloads):
            results += self._exchange(window)
        return results

    def ping(self) -> None:
        if not self._exchange([encode_frame(PING, token=self._framing.token)])[0]:
            raise IngestRejected("the brain answered 5:ERROR to PING")


Connector = Callable[[], Awaitable["trio.abc.Stream"]]


class TrioIngestClient:
    """Trio client over one persistent TCP connection, reconnected after a
    break through ``reconnect`` (see the module's header; without it, a break
    raises at once).

    One task at a time may use it (replies are matched to frames by order).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        token: str | None,
        compress: bool,
        reconnect: Connector | None = None,
        where: str = "the brain",
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        import trio

        self._stream: trio.abc.Stream | None = stream
        self._framing = _Framing(token, compress)
        self._lock = trio.Lock()
        self._reconnect = reconnect
        self._where = where
        self._retry_seconds = retry_seconds if reconnect is not None else 0.0
        self._closed = False

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
        self._closed = True
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.aclose()

    async def _read_replies(self, stream: trio.abc.Stream, count: int, got: list[bool]) -> None:
        while len(got) < count:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise IngestConnectionError(
                    f"connection closed with {count - len(got)} replies outstanding"
                )
            self._framing.replies.receive_data(bytes(chunk))
            got += self._framing.replies.replies()

    async def _exchange(self, frames: list[bytes]) -> list[bool]:
        import trio

        async with self._lock:
            if self._closed:
                raise IngestConnectionError("the client is closed")
            got: list[bool] = []
            retry = _Retry(self._retry_seconds, self._where)
            while True:
                try:
                    if self._stream is None:
                        assert self._reconnect is not None  # else no retry budget
                        self._stream = await self._reconnect()
                        self._framing.replies = ReplyParser()
                    await self._stream.send_all(b"".join(frames[len(got) :]))
                    await self._read_replies(self._stream, len(frames), got)
                    return got
                except (*_BROKEN, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    answered = len(got)
                    if self._stream is not None:
                        await trio.aclose_forcefully(self._stream)
                        self._stream = None
                    if answered:
                        retry.progressed()
                    delay = retry.delay(exc, len(frames) - answered, trio.current_time())
                    await trio.sleep(delay)

    async def send(self, records: Records) -> None:
        if not (await self._exchange([self._framing.frame(records)]))[0]:
            raise IngestRejected("the brain answered 5:ERROR")

    async def send_many(self, payloads: Iterable[Records]) -> list[bool]:
        results: list[bool] = []
        for window in _windows(self._framing.frame(p) for p in payloads):
            results += await self._exchange(window)
        return results

    async def ping(self) -> None:
        if not (await self._exchange([encode_frame(PING, token=self._framing.token)]))[0]:
            raise IngestRejected("the brain answered 5:ERROR to PING")


def connect(
    host: str = "127.0.0.1",
    port: int = 2407,
    *,
    token: str | None = None,
    timeout: float | None = 30.0,
    compress: bool = False,
    ssl_context: ssl.SSLContext | None = None,
    retry_seconds: float = RETRY_SECONDS,
) -> IngestClient:
    """Open a blocking client (over TLS with ``ssl_context``)."""
    return IngestClient(
        host,
        port,
        token=token,
        timeout=timeout,
        compress=compress,
        ssl_context=ssl_context,
        retry_seconds=retry_seconds,
    )


async def _open_stream(host: str, port: int, ssl_context: ssl.SSLContext | None) -> trio.abc.Stream:
    import trio

    tcp = await trio.open_tcp_stream(host, port)
    tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ssl_context is None:
        return tcp
    secure = trio.SSLStream(tcp, ssl_context, server_hostname=host)
    try:
        await secure.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return secure


async def open_trio(
    host: str = "127.0.0.1",
    port: int = 2407,
    *,
    token: str | None = None,
    compress: bool = False,
    ssl_context: ssl.SSLContext | None = None,
    retry_seconds: float = RETRY_SECONDS,
) -> TrioIngestClient:
    """Open a Trio client (over TLS with ``ssl_context``; the handshake is done here)."""

    async def reconnect() -> trio.abc.Stream:
        return await _open_stream(host, port, ssl_context)

    return TrioIngestClient(
        await reconnect(),
        token=token,
        compress=compress,
        reconnect=reconnect,
        where=f"the brain at {host}:{port}",
        retry_seconds=retry_seconds,
    )
