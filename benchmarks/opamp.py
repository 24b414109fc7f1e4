"""OpAMP benchmark: idle WebSocket sessions, writes at rest, HTTP polls, a rollout.

Run ``python benchmarks/opamp.py`` (``--help`` for the knobs; ``--agents
1000`` for a quick look). Each figure is printed with its target and the
ceiling it is measured against in the same run:

(a) memory per idle OpAMP WebSocket session: the brain's RSS with N agents
    connected (each sent its full report and got its reply) minus its RSS
    before, over N. Ceiling: the same lean WebSocket stack
    (`serve_http`, in its own process) holding N connections that each
    exchanged one message with an app that does no OpAMP work.
(b) store writes per second with the N agents heartbeating every
    ``--heartbeat`` seconds and nothing changing, over ``--watch`` seconds:
    write statements (``z4j_opamp_state_writes_total``: full rows,
    last_seen flushes, configuration statuses), and the rows they wrote
    (``z4j_opamp_last_seen_rows_total`` for the flushes).
(c) HTTP polls per second: ``--http-agents`` agents polling `/v1/opamp`
    over keep-alive connections (each a heartbeat in sequence) against a
    fresh brain, and against hypercorn answering a fixed protobuf (the
    ceiling), with the same client, in ``--poll-rounds`` turns. The client
    shares the 2 cores, so the rate it reaches may be its own limit: each
    server's capacity is taken as 1 / its CPU seconds per poll while the
    client counts, and the figure is the lower median of their ratios.
(d) a rollout of one configuration to the N WebSocket agents until the
    brain has every one APPLIED: ``POST /api/v1/opamp/rollouts`` with
    every agent in one batch after the canary (a single PUT per agent
    when the rollout API is not there); the agents apply at once.

The brain is ``python -m z4j brain`` on its embedded SQLite store (or
``--database-url``). Clients run in processes of their own (spawned), so
what is measured is the server's process.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import os
import random
import re
import shutil
import sys
import tempfile
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import orjson
import trio
from _agents_common import rss_bytes
from _common import process_cpu_seconds
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    RejectConnection,
    Request,
)

from z4j.protocol.opamp import AgentCapability
from z4j.protocol.opamp import opamp_pb2 as pb
from z4j.protocol.opamp.attributes import key_values

TARGET_IDLE_BYTES = 16 * 1024
TARGET_WRITES_PER_SECOND = 10.0
TARGET_POLL_RATIO = 0.7
TARGET_ROLLOUT_SECONDS = 10.0
CAPS = int(
    AgentCapability.REPORTS_STATUS
    | AgentCapability.ACCEPTS_REMOTE_CONFIG
    | AgentCapability.REPORTS_REMOTE_CONFIG
    | AgentCapability.REPORTS_HEARTBEAT
)
FILES = {"otel.yaml": {"body": "exporters:\n  otlp: {}\n", "content_type": "text/yaml"}}


def uid_of(i: int, salt: int) -> bytes:
    return (salt << 64 | i).to_bytes(16, "big")


def full_report(uid: bytes, seq: int) -> bytes:
    message = pb.AgentToServer(instance_uid=uid, sequence_num=seq, capabilities=CAPS)
    message.agent_description.identifying_attributes.extend(
        key_values({"service.name": "bench", "service.instance.id": uid.hex()})
    )
    message.agent_description.non_identifying_attributes.extend(
        key_values({"deployment.environment": "bench", "host.name": "bench-host"})
    )
    message.remote_config_status.status = pb.RemoteConfigStatus.STATUS_UNSET
    return message.SerializeToString()


def heartbeat(uid: bytes, seq: int) -> bytes:
    return pb.AgentToServer(instance_uid=uid, sequence_num=seq).SerializeToString()


def applied(uid: bytes, seq: int, digest: bytes) -> bytes:
    message = pb.AgentToServer(instance_uid=uid, sequence_num=seq)
    message.remote_config_status.last_remote_config_hash = digest
    message.remote_config_status.status = pb.RemoteConfigStatus.STATUS_APPLIED
    return message.SerializeToString()


# -- the WebSocket agents (a spawned process) ---------------------------------------------


def ws_agents(pipe: Connection, spec: dict[str, Any]) -> None:
    trio.run(_ws_agents, pipe, spec)


class _Agent:
    """One raw OpAMP WebSocket agent over a Trio socket: wsproto does the
    handshake (`_open`); the frames after it are made and read here, as
    the brain's own fast path does, because wsproto's per-message cost in
    one process of 10,000 agents was as much CPU as the brain spent
    serving them, on the same two cores."""

    __slots__ = ("buffer", "mask", "sending", "seq", "stream", "uid")

    def __init__(self, stream: trio.SocketStream, uid: bytes) -> None:
        self.stream, self.uid, self.seq = stream, uid, 0
        self.mask = os.urandom(4)  # a client masks every frame (RFC 6455 5.3)
        self.buffer = bytearray()
        self.sending = trio.StrictFIFOLock()  # heartbeats and answers to pushes

    def _frame(self, opcode: int, payload: bytes) -> bytes:
        n = len(payload)
        if n < 126:
            head = bytes((0x80 | opcode, 0x80 | n))
        elif n < 1 << 16:
            head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
        key = int.from_bytes(self.mask * (n // 4 + 1), "big") >> (8 * (4 - n % 4))
        masked = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big") if n else b""
        return head + self.mask + masked

    async def send(self, data: bytes) -> None:
        async with self.sending:
            await self.stream.send_all(self._frame(0x2, b"\x00" + data))

    async def receive(self) -> bytes | None:
        """The next whole binary message (None: the server closed)."""
        parts: list[bytes] = []
        while True:
            frame = self._next_frame()
            if frame is None:
                data = await self.stream.receive_some(65536)
                if not data:
                    return None
                self.buffer += data
                continue
            fin, opcode, payload = frame
            if opcode == 0x8:  # close
                return None
            if opcode == 0x9:  # ping
                async with self.sending:
                    await self.stream.send_all(self._frame(0xA, payload))
                continue
            if opcode in (0x0, 0x2):
                parts.append(payload)
                if fin:
                    return b"".join(parts)

    def _next_frame(self) -> tuple[bool, int, bytes] | None:
        """A whole server frame (unmasked) off the buffer, if one is there."""
        buffer = self.buffer
        if len(buffer) < 2:
            return None
        n, at = buffer[1] & 0x7F, 2
        if n == 126:
            if len(buffer) < 4:
                return None
            n, at = int.from_bytes(buffer[2:4], "big"), 4
        elif n == 127:
            if len(buffer) < 10:
                return None
            n, at = int.from_bytes(buffer[2:10], "big"), 10
        if len(buffer) < at + n:
            return None
        frame = (bool(buffer[0] & 0x80), buffer[0] & 0x0F, bytes(buffer[at : at + n]))
        del buffer[: at + n]
        return frame


async def _open(address: tuple[str, int], path: str, token: str, uid: bytes) -> _Agent:
    stream = await trio.open_tcp_stream(*address)
    ws = WSConnection(ConnectionType.CLIENT)
    headers = [(b"authorization", f"Bearer {token}".encode())]
    await stream.send_all(ws.send(Request(host="bench", target=path, extra_headers=headers)))
    while True:
        data = await stream.receive_some(65536)
        if not data:
            raise ConnectionError("closed during the handshake")
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, AcceptConnection):
                return _Agent(stream, uid)
            if isinstance(event, RejectConnection):
                raise ConnectionError(f"upgrade refused: {event.status_code}")


async def _ws_agents(pipe: Connection, spec: dict[str, Any]) -> None:
    """Connect ``agents`` agents (each sends its full report, reads the reply),
    then heartbeat and apply what is pushed until told to stop."""
    n, salt = spec["agents"], spec["salt"]
    limit = trio.CapacityLimiter(200)
    connected = trio.Event()
    counts = {"connected": 0, "failed": 0, "applied": 0}
    all_applied = trio.Event()
    errors: list[str] = []

    async def one(i: int) -> None:
        uid = uid_of(i, salt)
        agent: _Agent | None = None
        try:
            async with limit:
                agent = await _open(tuple(spec["address"]), spec["path"], spec["token"], uid)
                await agent.send(full_report(uid, 0))
                if await agent.receive() is None:
                    raise ConnectionError("closed after the first message")
        except Exception as exc:
            counts["failed"] += 1
            if len(errors) < 5:
                errors.append(repr(exc))
            agent = None
        else:
            counts["connected"] += 1
        if counts["connected"] + counts["failed"] == n:
            connected.set()
        if agent is None:
            return
        if spec["echo"]:
            await trio.sleep_forever()  # the floor: hold the connection, nothing else

        async def beat() -> None:
            period = spec["heartbeat"]
            await trio.sleep(random.random() * period)
            while True:
                agent.seq += 1
                await agent.send(heartbeat(uid, agent.seq))
                await trio.sleep(period)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(beat)
            while (data := await agent.receive()) is not None:
                reply = pb.ServerToAgent.FromString(data[1:])
                if reply.HasField("remote_config"):
                    agent.seq += 1
                    await agent.send(applied(uid, agent.seq, reply.remote_config.config_hash))
                    counts["applied"] += 1
                    if counts["applied"] == n:
                        all_applied.set()
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)
        await connected.wait()
        pipe.send(("connected", dict(counts), errors))
        while True:
            command = await trio.to_thread.run_sync(pipe.recv)
            if command == "stop":
                break
            if command == "applied":
                with trio.move_on_after(120):
                    await all_applied.wait()
                pipe.send(("applied", time.time(), dict(counts)))
        nursery.cancel_scope.cancel()


class AgentsProcess:
    def __init__(self, spec: dict[str, Any]) -> None:
        ctx = mp.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=ws_agents, args=(child, spec), daemon=True)
        self.proc.start()

    def expect(self, what: str, timeout: float) -> tuple[Any, ...]:
        if not self.pipe.poll(timeout):
            raise TimeoutError(f"the agents did not report {what!r} within {timeout:g} s")
        message: tuple[Any, ...] = self.pipe.recv()
        assert message[0] == what, message
        return message

    def stop(self) -> None:
        if self.proc.is_alive():
            self.pipe.send("stop")
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


# -- the floor: the lean WebSocket stack with no OpAMP work (a spawned process) -----------


def echo_server(pipe: Connection) -> None:
    trio.run(_echo_server, pipe)


async def _echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "websocket" or (await receive())["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    reply = b"\x00" + pb.ServerToAgent(instance_uid=b"\x00" * 16).SerializeToString()
    while (await receive())["type"] == "websocket.receive":
        await send({"type": "websocket.send", "bytes": reply})


async def _echo_server(pipe: Connection) -> None:
    from z4j.brain.http.server import HealthChecks, build_app, serve_http
    from z4j.config import load_config

    config = load_config(
        env={}, overrides={"http_bind": "127.0.0.1:0", "http_max_connections": 20_000}
    )
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(
            functools.partial(
                serve_http,
                config,
                build_app(HealthChecks()),
                shutdown=trio.Event(),
                websockets={"/v1/opamp": _echo_app},
            )
        )
        pipe.send(port)
        await trio.to_thread.run_sync(pipe.recv)
        nursery.cancel_scope.cancel()


# -- HTTP polls (client: a spawned process; ceiling: hypercorn in another) ------------------


def hypercorn_server(pipe: Connection) -> None:
    trio.run(_hypercorn_server, pipe)


async def _hypercorn_server(pipe: Connection) -> None:
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.config import Sockets
    from hypercorn.trio.run import worker_serve
    from hypercorn.utils import wrap_app

    from z4j._net import open_tcp_socket

    body = pb.ServerToAgent(instance_uid=b"\x01" * 16, capabilities=0x7).SerializeToString()
    headers = [
        (b"content-type", b"application/x-protobuf"),
        (b"content-length", str(len(body)).encode()),
    ]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    sock = open_tcp_socket("127.0.0.1:0", reuse_port=False)
    hc = HypercornConfig()
    hc.accesslog = None
    sockets = Sockets(secure_sockets=[], insecure_sockets=[sock], quic_sockets=[])
    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(
                worker_serve,
                wrap_app(app, hc.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]
                hc,
                sockets=sockets,
                shutdown_trigger=trio.sleep_forever,
            )
        )
        pipe.send(sock.getsockname()[1])
        await trio.to_thread.run_sync(pipe.recv)
        nursery.cancel_scope.cancel()


def poll_client(pipe: Connection, spec: dict[str, Any]) -> None:
    trio.run(_poll_client, pipe, spec)


async def _poll_client(pipe: Connection, spec: dict[str, Any]) -> None:
    """``agents`` agents over ``connections`` keep-alive connections: each
    connection polls for its agents in turn, one request at a time."""
    address, token, seconds, warmup = (
        tuple(spec["address"]),
        spec["token"],
        spec["seconds"],
        spec["warmup"],
    )
    n, salt = spec["agents"], spec["salt"]
    conns = min(n, spec["connections"])
    head = (
        f"POST /v1/opamp HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
        "Content-Type: application/x-protobuf\r\nContent-Length: "
    ).encode()
    done = {"polls": 0, "errors": 0}
    counting = False
    length_re = re.compile(rb"content-length: *(\d+)", re.I)

    async def connection(c: int) -> None:
        mine = [uid_of(i, salt) for i in range(c, n, conns)]
        seqs = [0] * len(mine)
        stream = await trio.open_tcp_stream(*address)
        buffer = b""
        k = 0
        while True:
            j = k % len(mine)
            k += 1
            body = full_report(mine[j], 0) if seqs[j] == 0 else heartbeat(mine[j], seqs[j])
            seqs[j] += 1
            await stream.send_all(head + str(len(body)).encode() + b"\r\n\r\n" + body)
            while b"\r\n\r\n" not in buffer:
                buffer += await stream.receive_some(65536)
            header, _, buffer = buffer.partition(b"\r\n\r\n")
            match = length_re.search(header)
            size = int(match.group(1)) if match else 0
            while len(buffer) < size:
                buffer += await stream.receive_some(65536)
            reply, buffer = buffer[:size], buffer[size:]
            if not header.startswith(b"HTTP/1.1 200"):
                done["errors"] += 1
            elif counting:
                done["polls"] += 1
                flags = pb.ServerToAgent.FromString(reply).flags
                if flags & 1:  # asked for the full state: send it next
                    seqs[j] = 0

    async with trio.open_nursery() as nursery:
        for c in range(conns):
            nursery.start_soon(connection, c)
        await trio.sleep(warmup)
        pipe.send("counting")
        counting = True
        start = time.perf_counter()
        await trio.sleep(seconds)
        counting = False
        elapsed = time.perf_counter() - start
        pipe.send((done["polls"] / elapsed, done["errors"]))
        nursery.cancel_scope.cancel()


def run_polls(
    address: tuple[str, int], token: str, args: argparse.Namespace, salt: int, pid: int
) -> tuple[float, int, float]:
    """(polls/s, errors, the server's CPU seconds per poll while counting)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    spec = {
        "address": address,
        "token": token,
        "agents": args.http_agents,
        "connections": args.http_connections,
        "seconds": args.poll_seconds,
        "warmup": 3.0,
        "salt": salt,
    }
    proc = ctx.Process(target=poll_client, args=(child, spec), daemon=True)
    proc.start()
    try:
        if not parent.poll(120):
            raise TimeoutError("the poll client did not start counting")
        assert parent.recv() == "counting"
        before = process_cpu_seconds(pid)
        if not parent.poll(args.poll_seconds + 60):
            raise TimeoutError("the poll client did not report")
        cpu = process_cpu_seconds(pid) - before
        rate, errors = parent.recv()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    return rate, errors, cpu / max(1.0, rate * args.poll_seconds)


# -- the brain -----------------------------------------------------------------------------


class Brain:
    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        from z4j.config import load_config
        from z4j.testing import admin_token, opamp_token
        from z4j.testing.brain import BrainProcess

        root.mkdir(parents=True, exist_ok=True)
        self.data_dir = root / "data"
        config = load_config(
            env={}, overrides={"data_dir": self.data_dir, "database_url": args.database_url}
        )
        self.project = f"bench-{uuid.uuid4().hex[:8]}"
        self.token = trio.run(opamp_token, config, self.project)
        self.admin = trio.run(admin_token, config)
        env = {
            "Z4J_DATA_DIR": str(self.data_dir),
            "Z4J_HTTP_BIND": "127.0.0.1:0",
            "Z4J_INGEST_BIND": "127.0.0.1:0",
            "Z4J_HTTP_MAX_CONNECTIONS": str(args.agents + 1000),
            "Z4J_INGEST_MAX_CONNECTIONS": "100",  # the descriptors go to the HTTP port
            "Z4J_LOG_LEVEL": "INFO",
        }
        if args.database_url:
            env["Z4J_DATABASE_URL"] = args.database_url
        self.process = BrainProcess(env, log_path=root / "brain.log")
        self.address = self.process.http
        self.pid = self.process.proc.pid

    async def get(self, path: str) -> Any:
        from z4j.testing import http_request

        reply = await http_request(
            self.address, "GET", path, headers={"Authorization": f"Bearer {self.admin}"}
        )
        return reply

    def progress(self) -> dict[str, float]:
        """(d)'s progress from /metrics: pushes sent, statuses written; CPU so far."""
        reply = trio.run(self.get, "/metrics")
        found = {"pushes": 0.0, "statuses written": 0.0}
        for line in reply.body.decode().splitlines():
            if line.startswith("z4j_opamp_pushes_total "):
                found["pushes"] = float(line.split()[-1])
            elif line.startswith('z4j_opamp_state_writes_total{kind="config_status"}'):
                found["statuses written"] = float(line.split()[-1])
        found["loop CPU s"] = thread_cpu_seconds(self.pid, self.pid)
        found["brain CPU s"] = process_cpu_seconds(self.pid)
        return found

    def metrics(self) -> dict[str, float]:
        reply = trio.run(self.get, "/metrics")
        values: dict[str, float] = {}
        for line in reply.body.decode().splitlines():
            if line.startswith(("z4j_opamp_state_writes_total", "z4j_opamp_last_seen_rows_total")):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    async def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        from z4j.testing import http_request

        reply = await http_request(
            self.address,
            method,
            "/api/v1" + path,
            body=b"" if body is None else orjson.dumps(body),
            headers={"Authorization": f"Bearer {self.admin}"},
        )
        is_json = reply.headers.get("content-type", "").startswith("application/json")
        return reply.status, reply.json() if reply.body and is_json else reply.body

    def stop(self) -> None:
        self.process.stop()


def writes(before: dict[str, float], after: dict[str, float]) -> tuple[float, float]:
    """(write statements, rows) between two readings."""

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    def statements_of(kind: str) -> float:
        return delta(f'z4j_opamp_state_writes_total{{kind="{kind}"}}')

    statements = statements_of("full") + statements_of("last_seen") + statements_of("config_status")
    rows = (
        statements_of("full")
        + delta("z4j_opamp_last_seen_rows_total")
        + statements_of("config_status")
    )
    return statements, rows


async def rollout(brain: Brain, salt: int, n: int) -> tuple[str, str | None]:
    """Start one configuration for every agent; how (rollout or PUTs), and the rollout's id."""
    status, body = await brain.api(
        "POST",
        "/opamp/rollouts",
        {
            "project": brain.project,
            "selector": {"deployment.environment": "bench"},
            "files": FILES,
            "canary_percent": 1,
            "batch_size": n,
            "failure_threshold_percent": 10,
        },
    )
    if status == 201:
        return "a staged rollout (canary 1%, then one batch)", str(body["id"])
    limit = trio.CapacityLimiter(16)

    async def put(i: int) -> None:
        async with limit:
            uid = uid_of(i, salt).hex()
            code, _ = await brain.api(
                "PUT", f"/opamp/agents/{uid}/config?project={brain.project}", {"files": FILES}
            )
            assert code == 200, code

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(put, i)
    return f"{n} PUTs (the rollout API answered {status})", None


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """User + system CPU time of one thread of a process so far."""
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_floor(ctx: Any, args: argparse.Namespace, salt: int) -> float:
    """(a)'s ceiling: RSS per idle connection of the lean stack with no OpAMP work."""
    parent, child = ctx.Pipe()
    echo = ctx.Process(target=echo_server, args=(child,), daemon=True)
    echo.start()
    port = parent.recv()
    time.sleep(args.settle)
    base = rss_bytes(echo.pid)
    floor_agents = AgentsProcess(
        {
            "address": ("127.0.0.1", port),
            "path": "/v1/opamp",
            "token": "x",
            "agents": args.agents,
            "salt": salt,
            "heartbeat": args.heartbeat,
            "echo": True,
        }
    )
    _, counts, _ = floor_agents.expect("connected", 600)
    time.sleep(args.settle)
    floor = (rss_bytes(echo.pid) - base) / max(1, counts["connected"])
    floor_agents.stop()
    parent.send("stop")
    echo.join(10)
    return floor


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--agents", type=int, default=10_000, help="WebSocket agents for (a), (b), (d)"
    )
    parser.add_argument(
        "--heartbeat", type=float, default=30.0, help="their heartbeat interval, seconds"
    )
    parser.add_argument(
        "--watch", type=float, default=60.0, help="seconds of heartbeats counted in (b)"
    )
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before reading RSS")
    parser.add_argument("--http-agents", type=int, default=1000)
    parser.add_argument("--http-connections", type=int, default=32)
    parser.add_argument("--poll-seconds", type=float, default=10.0)
    parser.add_argument("--poll-rounds", type=int, default=3, help="turns of brain and ceiling")
    parser.add_argument("--database-url", default=None)
    parser.add_argument(
        "--parts",
        default="abcd",
        help="which figures to measure (default abcd; (d) needs the agents (a) connects, so"
        " 'd' alone connects them without measuring the ceiling)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the brain's data and log (the path is printed)"
    )
    parser.add_argument(
        "--timeline",
        action="store_true",
        help="print (d)'s progress every half second: pushes sent, statuses written, CPU",
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="z4j-bench-opamp-"))
    salt = random.getrandbits(48)
    n = args.agents
    print(
        f"OpAMP benchmark: {n} WebSocket agents, {os.cpu_count()} cores, store "
        f"{'postgres' if args.database_url else 'sqlite'}"
    )
    try:
        ctx = mp.get_context("spawn")
        floor = idle_floor(ctx, args, salt) if "a" in args.parts else 0.0

        brain = Brain(root, args)
        try:
            time.sleep(args.settle)
            base = rss_bytes(brain.pid)
            agents = AgentsProcess(
                {
                    "address": brain.address,
                    "path": "/v1/opamp",
                    "token": brain.token,
                    "agents": n,
                    "salt": salt,
                    "heartbeat": args.heartbeat,
                    "echo": False,
                }
            )
            started = time.perf_counter()
            _, counts, errors = agents.expect("connected", 900)
            connect_seconds = time.perf_counter() - started
            time.sleep(args.settle)
            per_session = (rss_bytes(brain.pid) - base) / max(1, counts["connected"])
            print(f"\nbrain pid {brain.pid}")
            print(
                f"\n(a) idle WebSocket sessions: {counts['connected']} connected in "
                f"{connect_seconds:.1f} s ({counts['failed']} failed{': ' + errors[0] if errors else ''})"
            )
            print(
                f"    brain RSS per session: {per_session / 1024:.1f} KiB (target <= "
                f"{TARGET_IDLE_BYTES // 1024} KiB: {'PASS' if per_session <= TARGET_IDLE_BYTES else 'FAIL'})"
            )
            if floor:
                print(
                    f"    ceiling (the lean WebSocket stack, no OpAMP work): {floor / 1024:.1f} KiB;"
                    f" z4j / ceiling = {per_session / max(1.0, floor):.2f}x"
                )

            # (b) writes at rest
            if "b" in args.parts:
                before = brain.metrics()
                time.sleep(args.watch)
                statements, rows = writes(before, brain.metrics())
                per_second = statements / args.watch
                print(
                    f"\n(b) {n} agents heartbeating every {args.heartbeat:g} s, nothing changing, "
                    f"{args.watch:g} s:"
                )
                print(
                    f"    write statements/s: {per_second:.2f} (target <= {TARGET_WRITES_PER_SECOND:g}: "
                    f"{'PASS' if per_second <= TARGET_WRITES_PER_SECOND else 'FAIL'}); rows/s "
                    f"{rows / args.watch:.1f}; heartbeats/s {n / args.heartbeat:.0f} (the ceiling: a "
                    f"write per heartbeat)"
                )

            # (d) rollout
            if "d" not in args.parts:
                agents.stop()
                return
            cpu_before = (
                process_cpu_seconds(brain.pid),
                thread_cpu_seconds(brain.pid, brain.pid),
                process_cpu_seconds(agents.proc.pid or 0),
            )
            started = time.perf_counter()
            how, rollout_id = trio.run(rollout, brain, salt, n)
            agents.pipe.send("applied")

            async def all_applied() -> int:
                if rollout_id is not None:  # the rollout's own counts: one small read
                    _, body = await brain.api("GET", f"/opamp/rollouts/{rollout_id}")
                    return int(body["counts"]["applied"])
                _, page = await brain.api("GET", f"/opamp/agents?project={brain.project}")
                return sum(
                    1
                    for a in page["items"]
                    if (a.get("desired_config") or {}).get("status") == "applied"
                )

            while (done := trio.run(all_applied)) < n and time.perf_counter() - started < 300:
                time.sleep(0.5)
                if args.timeline:
                    print(
                        f"    {time.perf_counter() - started:5.1f} s: {done} applied, "
                        + ", ".join(f"{k} {v:.0f}" for k, v in brain.progress().items())
                    )
            seconds = time.perf_counter() - started
            _, _, counts = agents.expect("applied", 180)
            print(
                f"\n(d) one configuration to {n} WebSocket agents by {how}: all APPLIED in the "
                f"brain after {seconds:.1f} s ({done} applied; target <= {TARGET_ROLLOUT_SECONDS:g} s: "
                f"{'PASS' if done == n and seconds <= TARGET_ROLLOUT_SECONDS else 'FAIL'})"
            )
            brain_cpu = process_cpu_seconds(brain.pid) - cpu_before[0]
            loop_cpu = thread_cpu_seconds(brain.pid, brain.pid) - cpu_before[1]
            agents_cpu = process_cpu_seconds(agents.proc.pid or 0) - cpu_before[2]
            print(
                f"    CPU meanwhile: brain {brain_cpu:.1f} s ({loop_cpu:.1f} s of it its event"
                f" loop thread, {loop_cpu / seconds:.0%} of the wall time), the agents' process"
                f" {agents_cpu:.1f} s; {brain_cpu * 1e6 / n:.0f} us of brain CPU per agent"
            )
            agents.stop()
        finally:
            brain.stop()

        # (c) HTTP polls: a fresh brain and hypercorn, measured in turns.
        if "c" not in args.parts:
            return
        poller = Brain(root / "polls", args)
        parent, child = ctx.Pipe()
        ceiling_proc = ctx.Process(target=hypercorn_server, args=(child,), daemon=True)
        ceiling_proc.start()
        port = parent.recv()
        ratios = []
        print(
            f"\n(c) HTTP polls, {args.http_agents} agents over {args.http_connections} keep-alive"
            " connections, the brain and hypercorn answering a fixed protobuf, in turns. A"
            " process's capacity is 1 / its CPU per poll (the client shares the machine, so"
            " the rates it reaches may be the client's):"
        )
        try:
            for turn in range(args.poll_rounds):
                rate, poll_errors, cpu = run_polls(
                    poller.address, poller.token, args, salt ^ 1, poller.pid
                )
                ceiling, _, ceiling_cpu = run_polls(
                    ("127.0.0.1", port), "x", args, salt ^ 2, ceiling_proc.pid or 0
                )
                ratios.append(ceiling_cpu / cpu)
                print(
                    f"    turn {turn + 1}: brain {rate:.0f}/s at {cpu * 1e6:.0f} us CPU per poll"
                    f" ({poll_errors} errors) = {1 / cpu:.0f}/s capacity; hypercorn {ceiling:.0f}/s"
                    f" at {ceiling_cpu * 1e6:.0f} us = {1 / ceiling_cpu:.0f}/s; ratio"
                    f" {ceiling_cpu / cpu:.2f}"
                )
        finally:
            poller.stop()
            parent.send("stop")
            ceiling_proc.join(10)
        ratio = sorted(ratios)[(len(ratios) - 1) // 2]  # the lower median
        print(
            f"    median ratio of capacities {ratio:.2f} (target >= {TARGET_POLL_RATIO}: "
            f"{'PASS' if ratio >= TARGET_POLL_RATIO else 'FAIL'})"
        )
    finally:
        if args.keep:
            print(f"\nkept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
