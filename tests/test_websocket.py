"""The HTTP port's own WebSocket layer (z4j.brain.http.websocket) and its routing, over real sockets.

A wsproto client sends exactly the bytes each case needs: fragmented
messages, pings, oversize and malformed frames. Plain HTTP on the same port
still goes to hypercorn.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)

from z4j.brain.http import websocket
from z4j.brain.http.server import HealthChecks, build_app, serve_http
from z4j.brain.http.websocket import SEND_BATCH
from z4j.testing.brain import make_config, wait_until
from z4j.testing.http import read_until_closed

Scope = dict[str, Any]


class Recorder:
    """Handlers for the test server; records what each connection's handler saw."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def echo(self, scope: Scope, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            self.seen.append(message)
            if message["type"] == "websocket.disconnect":
                return
            await send({**message, "type": "websocket.send"})

    async def fail(self, scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "websocket.accept"})
        raise RuntimeError("boom")

    async def refuse(self, scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "websocket.close", "code": 1013})

    async def burst(self, scope: Scope, receive: Any, send: Any) -> None:
        """Many writers at once, then one batch; record how each write ended."""
        assert SEND_BATCH in scope["extensions"]
        await send({"type": "websocket.accept"})
        await receive()  # the client's go

        async def one(i: int) -> None:
            try:
                await send({"type": "websocket.send", "bytes": b"m%d" % i})
                self.seen.append({"sent": i})
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.seen.append({"failed": i, "error": type(exc).__name__})

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(one, i)
        try:
            await send({"type": SEND_BATCH, "messages": [b"b0", b"b1", b"b2"]})
            self.seen.append({"batch": "sent"})
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.seen.append({"batch": "failed"})
        await receive()

    async def headers(self, scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "websocket.accept"})
        auth = dict(scope["headers"]).get(b"authorization", b"")
        await send({"type": "websocket.send", "bytes": auth})


@asynccontextmanager
async def server(
    tmp_path: Path, **overrides: Any
) -> AsyncIterator[tuple[int, Recorder, trio.Event]]:
    config = make_config(tmp_path / "data", **overrides)
    recorder = Recorder()
    shutdown = trio.Event()
    handlers = {
        "/echo": recorder.echo,
        "/fail": recorder.fail,
        "/refuse": recorder.refuse,
        "/headers": recorder.headers,
        "/burst": recorder.burst,
    }
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(
            lambda task_status: serve_http(
                config,
                build_app(HealthChecks()),
                shutdown=shutdown,
                websockets=handlers,
                task_status=task_status,
            )
        )
        yield port, recorder, shutdown
        shutdown.set()


class Client:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)

    async def send(self, event: Any) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def next_event(self) -> Any:
        while True:
            for event in self.ws.events():
                return event
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(data or None)


@asynccontextmanager
async def client(
    port: int, path: str, headers: list[tuple[bytes, bytes]] | None = None
) -> AsyncIterator[Client]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        c = Client(stream)
        await c.send(Request(host="localhost", target=path, extra_headers=headers or []))
        yield c


async def accepted(c: Client) -> None:
    assert isinstance(await c.next_event(), AcceptConnection)


async def test_messages_whole_and_fragmented_are_echoed_and_pings_answered(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with server(tmp_path) as (port, recorder, _):
            async with client(port, "/echo") as c:
                await accepted(c)
                await c.send(BytesMessage(b"one"))
                assert (await c.next_event()).data == b"one"
                await c.send(TextMessage("two"))
                assert (await c.next_event()).data == "two"
                await c.send(BytesMessage(b"thr", message_finished=False))
                await c.send(BytesMessage(b"ee", message_finished=True))
                assert (await c.next_event()).data == b"three"
                await c.send(Ping(b"p"))
                pong = await c.next_event()
                assert isinstance(pong, Pong) and pong.payload == b"p"
                await c.send(CloseConnection(code=1000))
                closed = await c.next_event()
                assert isinstance(closed, CloseConnection) and closed.code == 1000
            assert [m.get("bytes", m.get("text")) for m in recorder.seen[:3]] == [
                b"one",
                "two",
                b"three",
            ]
            assert recorder.seen[-1] == {"type": "websocket.disconnect", "code": 1000}


async def test_an_oversize_message_is_closed_1009_even_in_fragments(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with server(tmp_path, ws_max_frame_bytes=1024) as (port, recorder, _):
            async with client(port, "/echo") as c:
                await accepted(c)
                await c.send(BytesMessage(b"x" * 600, message_finished=False))
                await c.send(BytesMessage(b"x" * 600, message_finished=True))
                closed = await c.next_event()
                assert isinstance(closed, CloseConnection) and closed.code == 1009
            await wait_until(lambda: recorder.seen)
            assert recorder.seen == [{"type": "websocket.disconnect", "code": 1009}]


async def test_a_malformed_frame_is_closed_1002(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with server(tmp_path) as (port, recorder, _):
            async with client(port, "/echo") as c:
                await accepted(c)
                await c.stream.send_all(b"\x82\x03abc")  # unmasked: clients must mask
                closed = await c.next_event()
                assert isinstance(closed, CloseConnection) and closed.code == 1002
            await wait_until(lambda: recorder.seen)
            assert recorder.seen[-1]["code"] == 1002


@pytest.mark.parametrize(("path", "code"), [("/fail", 1011), ("/refuse", 1013)])
async def test_handler_failure_and_refusal_reach_the_peer_as_close_codes(
    tmp_path: Path, path: str, code: int
) -> None:
    with trio.fail_after(60):
        async with server(tmp_path) as (port, _, _):
            async with client(port, path) as c:
                await accepted(c)
                closed = await c.next_event()
                assert isinstance(closed, CloseConnection) and closed.code == code


async def test_shutdown_closes_websockets_1001(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with server(tmp_path) as (port, _, shutdown):
            async with client(port, "/echo") as c:
                await accepted(c)
                shutdown.set()
                closed = await c.next_event()
                assert isinstance(closed, CloseConnection) and closed.code == 1001


async def test_handlers_see_the_request_headers(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with server(tmp_path) as (port, _, _):
            async with client(port, "/headers", [(b"Authorization", b"Bearer t")]) as c:
                await accepted(c)
                assert (await c.next_event()).data == b"Bearer t"


async def test_a_bad_handshake_gets_an_http_error(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with server(tmp_path) as (port, _, _):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(
                    b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\n\r\n"  # no key, no version
                )
                reply = await read_until_closed(stream)
            assert reply.startswith(b"HTTP/1.1 400") or reply.startswith(b"HTTP/1.1 426")


async def test_plain_http_and_unknown_websocket_paths_go_to_the_asgi_app(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with server(tmp_path) as (port, _, _):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                # Two requests on one keep-alive connection: hypercorn serves both.
                request = b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"
                await stream.send_all(request + request)
                replies = b""
                while replies.count(b'{"status":"live"}') < 2:
                    replies += await stream.receive_some(65536)
                assert replies.startswith(b"HTTP/1.1 200")
            async with client(port, "/nowhere") as c:
                assert isinstance(await c.next_event(), RejectConnection)


async def test_a_silent_connection_is_dropped_after_the_read_timeout(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with server(tmp_path, http_read_timeout_seconds=0.3) as (port, _, _):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                assert await read_until_closed(stream) == b""


async def test_a_peer_resetting_mid_handshake_ends_only_its_connection(tmp_path: Path) -> None:
    import socket
    import struct

    with trio.fail_after(60):
        async with server(tmp_path) as (port, _, _):
            for _ in range(30):
                sock = socket.create_connection(("127.0.0.1", port))
                sock.sendall(
                    b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"Sec-WebSocket-Version: 13\r\n\r\n"
                )
                # SO_LINGER 0: close sends a reset, not a goodbye.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            await trio.sleep(0.2)
            async with client(port, "/echo") as c:  # the server still serves
                await accepted(c)
                await c.send(BytesMessage(b"still here"))
                assert (await c.next_event()).data == b"still here"


async def test_writers_that_meet_go_out_together_whole_and_once(tmp_path: Path) -> None:
    """Concurrent sends share writes (z4j.brain.http.websocket._write) without losing,
    repeating or splitting a message; a batch arrives whole and in order."""
    with trio.fail_after(60):
        async with server(tmp_path) as (port, recorder, _):
            async with client(port, "/burst") as c:
                await accepted(c)
                await c.send(BytesMessage(b"go"))
                got = [(await c.next_event()).data for _ in range(53)]
                await c.send(BytesMessage(b"done"))
            assert sorted(got[:50]) == sorted(b"m%d" % i for i in range(50))
            assert got[50:] == [b"b0", b"b1", b"b2"]
            assert sorted(r["sent"] for r in recorder.seen if "sent" in r) == list(range(50))
            assert recorder.seen[-1] == {"batch": "sent"}


async def test_writers_waiting_on_a_broken_connection_get_an_error(tmp_path: Path) -> None:
    """The peer is gone: every waiting writer raises, none hangs or claims success
    for bytes that could not go out."""
    with trio.fail_after(60):
        async with server(tmp_path) as (port, recorder, _):
            async with client(port, "/burst") as c:
                await accepted(c)
                c.stream.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                await c.send(BytesMessage(b"go"))
            # Closed with a reset: the server's writes fail. Every writer
            # returns (waiting ones included), each with success or an error.
            await wait_until(lambda: len(recorder.seen) == 51, timeout=60)
            writers = recorder.seen[:50]
            assert sorted(r.get("sent", r.get("failed")) for r in writers) == list(range(50))
            failed = [r for r in writers if "failed" in r]
            assert failed, "no write noticed the reset"
            assert {r["error"] for r in failed} <= {"BrokenResourceError", "ClosedResourceError"}
            assert recorder.seen[50] == {"batch": "failed"}


class _SlowStream:
    """Stands in for the socket: each write waits for ``release``, then ends as told."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.release = trio.Event()
        self.writes: list[bytes] = []

    async def send_all(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        await self.release.wait()
        if self.fail:
            raise trio.BrokenResourceError("connection reset")


@pytest.mark.parametrize("fail", [False, True])
async def test_writers_that_wait_share_one_write_and_its_outcome(fail: bool) -> None:
    stream = _SlowStream(fail)
    ws = websocket._WebSocket(stream, None, 1024)  # type: ignore[arg-type]
    outcomes: list[tuple[str, int]] = []

    async def write(i: int) -> None:
        try:
            await ws._write(b"%d" % i)
            outcomes.append(("sent", i))
        except trio.BrokenResourceError:
            outcomes.append(("failed", i))

    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(write, i)
            await trio.testing.wait_all_tasks_blocked()
        stream.release.set()
    if fail:  # the owner's write failed: the others' bytes never went out
        assert stream.writes == [b"0"]
        assert sorted(outcomes) == [("failed", i) for i in range(5)]
    else:  # the four that waited went out together, in order
        assert stream.writes == [b"0", b"1234"]
        assert sorted(outcomes) == [("sent", i) for i in range(5)]


def _masked(first_byte: int, payload: bytes, mask: bytes = b"\x01\x02\x03\x04") -> bytes:
    """A client frame built by hand (length < 126), for cases wsproto will not write."""
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((first_byte, 0x80 | len(payload))) + mask + body


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (_masked(0x81, b"\xff\xfe"), 1007),  # text that is not UTF-8
        (bytes((0x89, 0x80 | 126)) + (200).to_bytes(2, "big"), 1002),  # ping over 125 bytes
        (_masked(0xC2, b"x"), 1002),  # a reserved bit, no extension agreed
        (_masked(0x83, b"x"), 1002),  # an unknown opcode
        (_masked(0x01, b"a") + _masked(0x82, b"b"), 1002),  # a new message inside a fragmented one
    ],
)
async def test_frames_the_fast_path_passes_on_are_refused_by_wsproto(
    tmp_path: Path, frame: bytes, code: int
) -> None:
    with trio.fail_after(60):
        async with server(tmp_path) as (port, _recorder, _):
            async with client(port, "/echo") as c:
                await accepted(c)
                await c.stream.send_all(frame)
                closed = await c.next_event()
                assert isinstance(closed, CloseConnection) and closed.code == code


async def test_frames_in_any_chunking_and_pipelined_with_the_request_arrive_in_order(
    tmp_path: Path,
) -> None:
    """Data, text, ping and a fragmented message, sent one byte at a time after
    the request (whose packet already carries the first frame)."""
    ws = WSConnection(ConnectionType.CLIENT)
    head = ws.send(Request(host="localhost", target="/echo"))
    # The handshake answer is not read yet, so frames are built by a second
    # client connection object that we move to OPEN by hand.
    builder = WSConnection(ConnectionType.CLIENT)
    builder_head = builder.send(Request(host="localhost", target="/echo"))
    builder.receive_data(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + _accept_key(builder_head) + b"\r\n\r\n"
    )
    assert isinstance(next(builder.events()), AcceptConnection)
    frames = [
        builder.send(BytesMessage(b"first")),
        builder.send(TextMessage("zwei \u00fc")),
        builder.send(Ping(b"p")),
        builder.send(BytesMessage(b"fra", message_finished=False)),
        builder.send(Ping(b"q")),
        builder.send(BytesMessage(b"gment", message_finished=True)),
        builder.send(BytesMessage(b"x" * 70_000)),  # a 64-bit length field
    ]
    with trio.fail_after(60):
        async with server(tmp_path) as (port, _recorder, _):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(head + frames[0])
                for byte in b"".join(frames[1:]):
                    await stream.send_all(bytes([byte]))
                c = Client(stream)
                c.ws = ws
                assert isinstance(await c.next_event(), AcceptConnection)
                got = [await c.next_event() for _ in range(5)]
                big = await c.next_event()
                data = big.data
                while not big.message_finished:  # wsproto hands a long one over in parts
                    big = await c.next_event()
                    data += big.data
            assert [type(e).__name__ for e in got] == [
                "BytesMessage",
                "TextMessage",
                "Pong",
                "Pong",
                "BytesMessage",
            ]
            assert got[0].data == b"first" and got[1].data == "zwei \u00fc"
            assert got[4].data == b"fragment" and data == b"x" * 70_000


def _accept_key(request: bytes) -> bytes:
    key = next(
        line.split(b":", 1)[1].strip()
        for line in request.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key")
    )
    digest = hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    return base64.b64encode(digest)
