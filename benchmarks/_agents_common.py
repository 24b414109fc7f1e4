"""Shared by the agent benchmark: a lean agent client and the echo ceiling.

Not a benchmark itself. The client speaks WebSocket through wsproto over a
Trio socket and agent protocol v2 through our sans-IO `AgentProtocol`,
rather than through trio-websocket (`z4j.testing.agents`) or `z4j.agent`:
it writes many frames with one ``send_all`` and hands received messages
over without a channel, so that the client process is as seldom as
possible what limits a run.

The ceiling serves ``/ws/agent`` on the brain's WebSocket stack with an
app that does none of z4j's work (no token lookup, signature, replay
check, buffer or store): it answers the hello with a hello_ack, every later
frame with a canned ack the size of a real one, and, when asked, sends
canned commands and times their answers.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

import orjson
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from z4j.protocol.agent import frames as f
from z4j.protocol.agent.connection import AgentProtocol, Role
from z4j.protocol.agent.signing import decode_secret

# The id of a canned frame, replaced per use: as long as a command id (a UUID).
PLACEHOLDER = b"X" * 36


def iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def busy_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy (all cores, every process)."""
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(
            int, stat.readline().split()[1:9]
        )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def event_template() -> dict[str, Any]:
    """A task event shaped as z4j-bare sends one (~400 bytes of JSON with its id)."""
    return {
        "id": "",
        "kind": "task.succeeded",
        "engine": "celery",
        "task_id": str(uuid.uuid4()),
        "occurred_at": datetime.now(UTC).isoformat(),
        "data": {
            "task_name": "app.tasks.send_welcome_email",
            "queue": "default",
            "worker": "celery@web-03.prod.internal",
            "runtime_ms": 12.345,
            "retries": 0,
            "args_repr": "(42, 'welcome')",
            "kwargs_repr": "{'locale': 'en'}",
            "result_repr": "{'sent': True}",
        },
    }


# -- the client --------------------------------------------------------------------


class Closed(Exception):
    """The server closed the WebSocket (or the TCP connection went away)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"closed {code}")
        self.code = code


class WsClient:
    """One client WebSocket: binary messages out, whole messages in."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self._parts: list[bytes | bytearray] = []
        self._inbox: list[bytes] = []
        self._send_lock = trio.Lock()

    @classmethod
    async def connect(cls, host: str, port: int, target: str, token: str) -> WsClient:
        stream = await trio.open_tcp_stream(host, port)  # TCP_NODELAY is trio's default
        client = cls(stream)
        try:
            request = Request(
                host=f"{host}:{port}",
                target=target,
                extra_headers=[(b"authorization", f"Bearer {token}".encode())],
            )
            await stream.send_all(client.ws.send(request))
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    raise Closed(1006)
                client.ws.receive_data(data)
                for event in client.ws.events():
                    if isinstance(event, AcceptConnection):
                        return client
                    if isinstance(event, RejectConnection | RejectData):
                        raise ConnectionError(f"upgrade refused: {event!r}")
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise

    def encode(self, message: bytes) -> bytes:
        """``message`` as a (masked) binary WebSocket frame, ready to write."""
        return self.ws.send(Message(data=message))

    async def send(self, messages: Sequence[bytes]) -> None:
        """Send ``messages`` as binary WebSocket messages, in one write."""
        await self.send_encoded(b"".join(self.encode(m) for m in messages))

    async def send_encoded(self, data: bytes) -> None:
        async with self._send_lock:
            await self.stream.send_all(data)

    async def receive(self) -> list[bytes]:
        """The next whole messages (at least one); raises `Closed`."""
        while not self._inbox:
            data = await self.stream.receive_some(262144)
            if not data:
                raise Closed(1006)
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, BytesMessage):
                    self._parts.append(event.data)
                    if event.message_finished:
                        self._inbox.append(b"".join(self._parts))
                        self._parts = []
                elif isinstance(event, TextMessage):  # the brain sends bytes; just in case
                    self._parts.append(event.data.encode())
                    if event.message_finished:
                        self._inbox.append(b"".join(self._parts))
                        self._parts = []
                elif isinstance(event, Ping):
                    async with self._send_lock:
                        await self.stream.send_all(self.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    raise Closed(event.code)
        inbox, self._inbox = self._inbox, []
        return inbox

    async def aclose(self, code: int = 1000) -> None:
        with trio.move_on_after(2):
            try:
                async with self._send_lock:
                    await self.stream.send_all(self.ws.send(CloseConnection(code=code)))
            except Exception:
                pass
        await trio.aclose_forcefully(self.stream)


class RawAgent:
    """A client WebSocket past the agent handshake, with its protocol state."""

    def __init__(self, ws: WsClient, protocol: AgentProtocol, ack: f.HelloAck) -> None:
        self.ws = ws
        self.protocol = protocol
        self.hello_ack = ack

    @classmethod
    async def open(
        cls,
        address: tuple[str, int],
        token: str,
        secret: str,
        *,
        worker_id: str,
        query: dict[str, Any] | None = None,
        prove: bool = False,
    ) -> RawAgent:
        """Connect and say hello; with ``prove``, send a heartbeat at once, as z4j
        agents do: the brain sends commands only to a connection whose signed
        frame proved the project key."""
        target = "/ws/agent" + ("?" + urllib.parse.urlencode(query) if query else "")
        ws = await WsClient.connect(*address, target, token)
        try:
            protocol = AgentProtocol(Role.AGENT, key=decode_secret(secret))
            hello = f.Hello(
                protocol_version=f.PROTOCOL_VERSION,
                agent_version="bench",
                framework="bench",
                worker_id=worker_id,
                worker_pid=os.getpid(),
            )
            await ws.send([protocol.hello_message(hello)])
            (message, *_) = await ws.receive()
            frame = protocol.receive_message(message)
            assert isinstance(frame.payload, f.HelloAck)
            if prove:
                await ws.send([protocol.send(f.Heartbeat())])
            return cls(ws, protocol, frame.payload)
        except BaseException:
            await trio.aclose_forcefully(ws.stream)
            raise


# -- the ceiling -------------------------------------------------------------------


def _canned(frame_type: str, payload: dict[str, Any], frame_id: str) -> bytes:
    """A frame shaped and sized like a signed one (its hmac is not real)."""
    return orjson.dumps(
        {
            "v": 2,
            "id": frame_id,
            "ts": iso_now(),
            "nonce": secrets.token_urlsafe(16),
            "seq": 1,
            "type": frame_type,
            "payload": payload,
            "hmac": secrets.token_hex(32),
        }
    )


def canned_command() -> bytes:
    """A command frame the size of one the brain sends (id: `PLACEHOLDER`)."""
    payload = {
        "action": "ping",
        "target": {},
        "parameters": {"n": 1},
        "timeout_seconds": 30,
        "issued_by": None,
        "delivery_claim_token": secrets.token_hex(16),
    }
    return _canned("command", payload, PLACEHOLDER.decode())


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """``/ws/agent`` of the ceiling: the same ASGI conversation, none of z4j's work."""
    if scope["type"] == "lifespan":  # under hypercorn
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] != "websocket" or (await receive())["type"] != "websocket.connect":
        return
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await _echo(scope, receive, send)


async def _echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    # Keeps as little per connection as it can (RSS is measured): one shared
    # reply, no locals but the loop's.
    await send({"type": "websocket.accept"})
    if (await receive())["type"] != "websocket.receive":  # the hello
        return
    await send({"type": "websocket.send", "bytes": _hello_ack()})
    query = urllib.parse.parse_qs(scope.get("query_string", b"").decode())
    if "commands" in query:
        await _drive_commands(
            receive,
            send,
            count=int(query["commands"][0]),
            rate=float(query["rate"][0]),
            warmup=int(query["warmup"][0]),
        )
        return
    await _answer_each(receive, send, _event_ack(int(query.get("events", ["1"])[0])))


async def _answer_each(receive: Any, send: Any, reply: dict[str, Any]) -> None:
    while (await receive())["type"] == "websocket.receive":
        await send(reply)


def _hello_ack() -> bytes:
    hello_ack = {
        "v": 2,
        "id": f"ack_{secrets.token_hex(8)}",
        "ts": iso_now(),
        "type": "hello_ack",
        "payload": {
            "protocol_version": f.PROTOCOL_VERSION,
            "brain_version": "echo",
            "agent_id": str(uuid.uuid4()),
            "project_id": str(uuid.uuid4()),
            "session_id": str(uuid.uuid4()),
            "heartbeat_interval_seconds": 10,
            "max_frame_size_bytes": 1024 * 1024,
        },
    }
    return orjson.dumps(hello_ack)


@functools.cache
def _event_ack(events: int) -> dict[str, Any]:
    """The ASGI message answering every frame: an event_batch_ack of a real one's size."""
    payload = {
        "acked_id": f"b{secrets.token_hex(6)}-0",
        "received": events,
        "accepted": events,
        "rejected": 0,
    }
    ack = _canned("event_batch_ack", payload, f"eve_{secrets.token_hex(12)}")
    return {"type": "websocket.send", "bytes": ack}


async def _drive_commands(receive: Any, send: Any, *, count: int, rate: float, warmup: int) -> None:
    """Send ``count`` canned commands at ``rate``/s; print the round trips of all but ``warmup``.

    A round trip ends when the command_result for the command's id arrives,
    as in the brain, where it ends when the result is recorded.
    """
    template = canned_command()
    sent_at: dict[str, float] = {}
    latencies: list[float] = []

    async def sender() -> None:
        await trio.sleep(0.3)  # the client is ready once it has the hello_ack
        start = trio.current_time()
        for i in range(count):
            await trio.sleep_until(start + i / rate)
            command_id = f"00000000-0000-4000-8000-{i:012d}"
            message = template.replace(PLACEHOLDER, command_id.encode())
            sent_at[command_id] = time.perf_counter()
            await send({"type": "websocket.send", "bytes": message})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        while len(latencies) < count:
            message = await receive()
            if message["type"] != "websocket.receive":
                break
            obj = orjson.loads(message.get("bytes") or message.get("text") or b"{}")
            if obj.get("type") == "command_result":
                started = sent_at.pop(obj["id"], None)
                if started is not None:
                    latencies.append(time.perf_counter() - started)
        nursery.cancel_scope.cancel()
    print("commands " + orjson.dumps({"latencies": latencies[warmup:]}).decode(), flush=True)


STACKS = {
    "z4j": "z4j.brain.http.server.serve_http with z4j.brain.http.websocket (wsproto on the connection's own task)",
    "hypercorn": "hypercorn's Trio worker and ASGI WebSocket (the brain's stack before 436eb84)",
}


async def serve_echo(
    stack: str = "z4j", *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve the ceiling on a free loopback port until cancelled; report the port.

    ``z4j``: started as the brain starts its HTTP port, so the ceiling runs
    the brain's WebSocket server. ``hypercorn``: hypercorn's own WebSocket
    handling, for comparison.
    """
    from z4j.brain.http.server import HealthChecks, build_app, serve_http
    from z4j.brain.ingest import open_tcp_socket
    from z4j.config import load_config

    config = load_config(env={}, overrides={"http_bind": "127.0.0.1:0"})
    async with trio.open_nursery() as nursery:
        if stack == "z4j":
            _, port = await nursery.start(
                functools.partial(
                    serve_http,
                    config,
                    build_app(HealthChecks()),
                    shutdown=trio.Event(),
                    websockets={"/ws/agent": echo_app},
                )
            )
        else:
            from hypercorn.config import Config as HypercornConfig
            from hypercorn.config import Sockets
            from hypercorn.trio.run import worker_serve
            from hypercorn.utils import wrap_app

            sock = open_tcp_socket(config.http_bind, reuse_port=False)
            port = sock.getsockname()[1]
            hc = HypercornConfig()
            hc.accesslog = None
            hc.websocket_max_message_size = config.ws_max_frame_bytes
            sockets = Sockets(secure_sockets=[], insecure_sockets=[sock], quic_sockets=[])
            app = wrap_app(cast(Any, echo_app), hc.wsgi_max_body_size, "asgi")
            await nursery.start(
                functools.partial(
                    worker_serve, app, hc, sockets=sockets, shutdown_trigger=trio.sleep_forever
                )
            )
        task_status.started(port)
