"""Agent benchmark: events/s, memory per idle connection and command round trips.

Run ``python benchmarks/agents.py`` (``--help`` for the knobs). Every figure
of the brain is printed next to a ceiling measured in the same run: the
brain's own WebSocket stack (`z4j.brain.http.server.serve_http`, started as the brain
starts it) serving ``/ws/agent`` with an app that answers without z4j's
work (see `_agents_common`); ``--ceiling hypercorn`` puts hypercorn's ASGI
WebSocket there instead, for comparison.

(a) events/s through 1 and 100 connections, with one event per frame (what
    z4j-bare sends) and with 100 events per batch. Each connection keeps a
    window of unacknowledged frames in flight, as a real agent does (256 by
    default: z4j-bare 1.13's cap, ``_MAX_IN_FLIGHT_BATCHES`` in
    z4j_bare/runtime.py; ``--window 64`` shows a shallower agent), and
    counts the events of the ``event_batch_ack`` frames it receives; the
    brain sends one only after the batch is committed to its SQLite buffer.
    Counting starts ``--warmup`` seconds after every connection has had its
    first ack: a server that reads far ahead of its acks takes that long to
    start flowing.
    The brain is ``python -m z4j brain`` (a fresh one per run) on its
    embedded SQLite store with drains on; afterwards the script checks that
    every acknowledged event is in the buffer file or the store.
(b) resident memory per idle agent connection: (RSS with N idle agents -
    RSS before they connected) / N, read from /proc after a settle period.
    Idle agents send a heartbeat every interval the server advertises
    (10 s, the default), as real agents do.
(c) command round trip: an embedded brain (this script in a subprocess,
    running `z4j.serve_brain`) mints commands with ``brain.commands.send``
    at a steady rate and times each until ``brain.commands.wait`` returns
    it completed; the agent, in another process, answers each command
    at once with command_ack and command_result.

Clients always run in processes of their own (spawned), so what is measured
is the server's process. Temporary directories and every process started
here are removed at the end.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing as mp
import os
import queue
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import orjson
import trio
from _agents_common import (
    PLACEHOLDER,
    STACKS,
    Closed,
    RawAgent,
    busy_cpu_seconds,
    event_template,
    rss_bytes,
    serve_echo,
)
from _common import CpuMeter

from z4j.protocol.agent import frames as f
from z4j.protocol.agent.signing import encode_secret

TARGET_ONE_CONNECTION = 10_000  # events/s, one connection, one event per frame
TARGET_BATCHES = 50_000  # events/s with 100-event batches
TARGET_IDLE_BYTES = 16 * 1024  # per idle agent connection
TARGET_COMMAND_P99 = 0.020  # seconds

# -- helpers -------------------------------------------------------------------------


class LineReader:
    """Lines of a child's stdout, read on a thread so waits can time out."""

    def __init__(self, stream: IO[str]) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put("")

    def expect(self, prefix: str, timeout: float) -> str:
        """The rest of the next line starting with ``prefix``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no {prefix!r} line within {timeout:g}s") from None
            if not line:
                raise RuntimeError(f"the process ended before printing {prefix!r}")
            if line.startswith(prefix):
                return line[len(prefix) :].strip()


def _stop_process(proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


class CpuShares:
    """CPU shares over an interval (1.0 = one core): the server, its clients, the rest.

    "The rest" is every other process on the machine: other work running
    alongside makes the figures of that interval less trustworthy.
    """

    def __init__(self, server_pid: int, client_pids: list[int]) -> None:
        self._server = CpuMeter(server_pid)
        self._clients = [CpuMeter(pid) for pid in client_pids]
        self._busy, self._wall = busy_cpu_seconds(), time.monotonic()

    def read(self) -> dict[str, float]:
        server = self._server.read()
        clients = sum(m.read() for m in self._clients)
        machine = (busy_cpu_seconds() - self._busy) / (time.monotonic() - self._wall)
        return {"server": server, "clients": clients, "other": max(0.0, machine - server - clients)}

    @staticmethod
    def describe(shares: dict[str, float]) -> str:
        return (
            f"server CPU {shares['server']:.2f} cores, clients {shares['clients']:.2f}, "
            f"anything else {shares['other']:.2f}"
        )


def _sleep_until(when: float) -> None:
    time.sleep(max(0.0, when - time.monotonic()))


# -- servers -------------------------------------------------------------------------


class EchoServer:
    """The ceiling in its own process (this script with ``--echo-server``)."""

    kind = "ceiling"

    def __init__(self, stack: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--echo-server", stack], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        self.lines = LineReader(self.proc.stdout)
        try:
            port = int(self.lines.expect("port ", 30))
        except BaseException:
            self.stop()
            raise
        self.address = ("127.0.0.1", port)
        self.pid = self.proc.pid
        # Any credentials do: the ceiling checks none.
        self.token, self.secret = "z4j_bench", encode_secret(os.urandom(32))

    def stop(self) -> None:
        _stop_process(self.proc, 10)


class BrainServer:
    """``python -m z4j brain`` in a temporary data directory, with one agent provisioned."""

    kind = "z4j"

    def __init__(self, args: argparse.Namespace, *, cap: int = 64) -> None:
        from z4j.config import load_config
        from z4j.testing.agents import provision
        from z4j.testing.brain import BrainProcess

        self.root = Path(tempfile.mkdtemp(prefix="z4j-bench-agents-"))
        self.data_dir = self.root / "data"
        self.database_url = args.database_url
        config = load_config(
            env={}, overrides={"data_dir": self.data_dir, "database_url": args.database_url}
        )
        suffix = uuid.uuid4().hex[:8]
        self.token, self.secret, self.agent_id = trio.run(
            functools.partial(provision, config, project=f"bench-{suffix}", agent="bench")
        )
        env = {
            "Z4J_DATA_DIR": str(self.data_dir),
            "Z4J_HTTP_BIND": "127.0.0.1:0",
            "Z4J_INGEST_BIND": "127.0.0.1:0",
            "Z4J_BUFFER_MAX_ROWS": str(args.buffer_max_rows),
            "Z4J_WS_PER_AGENT_CONCURRENCY_CAP": str(max(64, cap)),
            "Z4J_LOG_LEVEL": "INFO",  # BrainProcess waits for the INFO ready line
        }
        if args.database_url:
            env["Z4J_DATABASE_URL"] = args.database_url
        try:
            self.process = BrainProcess(env, log_path=self.root / "brain.log")
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise
        self.address = self.process.http
        self.pid = self.process.proc.pid

    def stop(self) -> None:
        self.process.stop()

    def durable_events(self) -> int | None:
        """Distinct agent event ids in the buffer file or the SQLite store (after stop)."""
        if self.database_url:
            return None  # the buffer and a shared Postgres cannot be joined here
        db = sqlite3.connect(self.data_dir / "buffer.sqlite3")
        try:
            sql = (
                "SELECT json_extract(j.value, '$.id') FROM payloads AS p,"
                " json_each(CAST(p.body AS TEXT)) AS j WHERE p.source = 'agent'"
            )
            store = self.data_dir / "store.sqlite3"
            if store.exists():
                db.execute("ATTACH DATABASE ? AS store", (str(store),))
                sql += (
                    " UNION SELECT json_extract(body, '$.id') FROM store.events"
                    " WHERE source = 'agent'"
                )
            return int(db.execute(f"SELECT count(*) FROM ({sql})").fetchone()[0])
        finally:
            db.close()

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


Server = EchoServer | BrainServer


# -- client processes (spawned) --------------------------------------------------------


def events_client(pipe: Connection, spec: dict[str, Any]) -> None:
    trio.run(_events_client, pipe, spec)


async def _events_client(pipe: Connection, spec: dict[str, Any]) -> None:
    agents: list[RawAgent] = []
    limit = trio.CapacityLimiter(32)

    async def connect(i: int) -> None:
        async with limit:
            agents.append(
                await RawAgent.open(
                    tuple(spec["address"]),
                    spec["token"],
                    spec["secret"],
                    worker_id=f"{spec['tag']}-{i}",
                    query={"events": spec["per_frame"]},
                )
            )

    async with trio.open_nursery() as nursery:
        for i in range(spec["connections"]):
            nursery.start_soon(connect, i)
    pool = None
    if spec["presigned"]:
        # The ceiling verifies nothing, so its clients replay frames signed
        # and WebSocket-encoded in advance (any connection may send them): a
        # cheaper client leaves the ceiling server more of the machine.
        maker = FrameMaker(agents[0], f"{spec['tag']}-pool", spec["per_frame"])
        pool = [agents[0].ws.encode(maker.frame()) for _ in range(spec["window"])]
    pipe.send(("ready", len(agents)))
    await trio.to_thread.run_sync(pipe.recv)  # go
    phase = Phase(len(agents))
    async with trio.open_nursery() as nursery:
        for k, agent in enumerate(agents):
            maker = FrameMaker(agent, f"{spec['tag']}-{k}", spec["per_frame"])
            nursery.start_soon(_drive_events, agent, maker, pool, spec["window"], phase)
        with trio.move_on_after(spec["prime_timeout"]):
            await phase.primed.wait()
        pipe.send(("primed", phase.unprimed))
        phase.t1, phase.t2 = await trio.to_thread.run_sync(pipe.recv)
        nursery.cancel_scope.deadline = trio.current_time() + (phase.t2 - time.monotonic())
    for agent in agents:  # dropped, not closed: what is in flight is abandoned
        await trio.aclose_forcefully(agent.ws.stream)
    pipe.send(("done", dict(phase.totals)))


class Phase:
    """One client process's run: primed once every connection has had an ack."""

    def __init__(self, connections: int) -> None:
        self.unprimed = connections
        self.primed = trio.Event()
        self.t1 = self.t2 = math.inf  # acks in [t1, t2) are counted; set once primed
        self.totals: Counter[str] = Counter()

    def acked(self, frames: int) -> None:
        if frames == 1:
            self.unprimed -= 1
            if not self.unprimed:
                self.primed.set()


class FrameMaker:
    """Signed event_batch frames of ``per_frame`` fresh events each."""

    def __init__(self, agent: RawAgent, prefix: str, per_frame: int) -> None:
        self.protocol = agent.protocol
        self.prefix = prefix
        self.per_frame = per_frame
        self.template = event_template()
        self.events = self.batches = 0

    def frame(self) -> bytes:
        events = []
        for _ in range(self.per_frame):
            self.events += 1
            event_id = f"{self.prefix}-{self.events}"
            raw = dict(self.template, id=event_id)
            events.append(f.AgentEvent(id=event_id, kind="task.succeeded", raw=raw))
        self.batches += 1
        return self.protocol.send(
            f.EventBatch(events=tuple(events)), frame_id=f"b{self.prefix}-{self.batches}"
        )


async def _drive_events(
    agent: RawAgent, maker: FrameMaker, pool: list[bytes] | None, window: int, phase: Phase
) -> None:
    """Keep ``window`` frames in flight until cancelled; count acked events.

    A sender and a receiver task, so a write blocked on a slow server never
    holds back the counting of acks.
    """
    per_frame = maker.per_frame
    totals = phase.totals
    in_flight = acked_frames = 0
    credit = trio.Event()

    async def sender() -> None:
        nonlocal in_flight, credit
        turn = 0
        while True:
            if in_flight >= window:
                credit = trio.Event()
                await credit.wait()
                continue
            chunk: list[bytes] = []
            size = 0
            while in_flight < window and size < 256 * 1024:  # one write, a bounded one
                if pool is not None:
                    data = pool[turn % len(pool)]
                    turn += 1
                else:
                    data = agent.ws.encode(maker.frame())
                chunk.append(data)
                size += len(data)
                in_flight += 1
            totals["sent_frames"] += len(chunk)
            await agent.ws.send_encoded(b"".join(chunk))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        while True:
            messages = await agent.ws.receive()
            now = time.monotonic()
            for message in messages:
                obj = orjson.loads(message)
                if obj.get("type") != "event_batch_ack":
                    totals["other_frames"] += 1
                    continue
                in_flight -= 1
                acked_frames += 1
                phase.acked(acked_frames)
                accepted = obj["payload"]["accepted"]
                if accepted != per_frame:
                    totals["short_acks"] += 1
                totals["acked"] += accepted
                if phase.t1 <= now < phase.t2:
                    totals["measured"] += accepted
            credit.set()


def idle_client(pipe: Connection, spec: dict[str, Any]) -> None:
    trio.run(_idle_client, pipe, spec)


async def _idle_client(pipe: Connection, spec: dict[str, Any]) -> None:
    """Open ``connections`` agents, heartbeat each every advertised interval, report."""
    state: Counter[str] = Counter()
    limit = trio.CapacityLimiter(spec["connect_concurrency"])
    attempts_done = trio.Event()

    async def one(i: int) -> None:
        async with limit:
            try:
                agent = await RawAgent.open(
                    tuple(spec["address"]),
                    spec["token"],
                    spec["secret"],
                    worker_id=f"idle-{i}",
                )
            except Exception as exc:
                state[f"failed: {type(exc).__name__}: {exc}"[:120]] += 1
                return
            finally:
                state["attempts"] += 1
                if state["attempts"] == spec["connections"]:
                    attempts_done.set()
        state["open"] += 1
        interval = agent.hello_ack.heartbeat_interval_seconds

        async def heartbeats() -> None:
            await trio.sleep(random.random() * interval)
            while True:
                await agent.ws.send([agent.protocol.send(f.Heartbeat())])
                await trio.sleep(interval)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(heartbeats)
                while True:
                    await agent.ws.receive()
        except Closed as exc:
            state[f"closed {exc.code}"] += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            state["reset"] += 1
        finally:
            state["open"] -= 1
            await trio.aclose_forcefully(agent.ws.stream)

    async with trio.open_nursery() as nursery:
        for i in range(spec["connections"]):
            nursery.start_soon(one, i)
        await attempts_done.wait()
        pipe.send(("ready", dict(state)))
        await trio.to_thread.run_sync(pipe.recv)  # "report"
        pipe.send(("state", dict(state)))
        await trio.to_thread.run_sync(pipe.recv)  # "stop"
        nursery.cancel_scope.cancel()


def command_client(pipe: Connection, spec: dict[str, Any]) -> None:
    trio.run(_command_client, pipe, spec)


async def _command_client(pipe: Connection, spec: dict[str, Any]) -> None:
    """One agent that answers each command at once: command_ack, then command_result."""
    agent = await RawAgent.open(
        tuple(spec["address"]),
        spec["token"],
        spec["secret"],
        worker_id="commands-0",
        query=spec.get("query"),
        prove=True,
    )
    canned = None
    if spec["ceiling"]:
        # Real frames of the real sizes, signed once; the id is swapped per use.
        token = "0" * 32
        canned = (
            agent.protocol.send(
                f.CommandAck(delivery_claim_token=token), frame_id=PLACEHOLDER.decode()
            ),
            agent.protocol.send(
                f.CommandResult(
                    status="success", result={"pong": True}, delivery_claim_token=token
                ),
                frame_id=PLACEHOLDER.decode(),
            ),
        )
    pipe.send(("ready",))
    try:
        while True:
            for message in await agent.ws.receive():
                if canned is not None:
                    obj = orjson.loads(message)
                    if obj.get("type") == "command":
                        command_id = obj["id"].encode()
                        await agent.ws.send([c.replace(PLACEHOLDER, command_id) for c in canned])
                    continue
                frame = agent.protocol.receive_message(message)
                command = frame.payload
                if isinstance(command, f.Command):
                    claim = command.delivery_claim_token
                    await agent.ws.send(
                        [
                            agent.protocol.send(
                                f.CommandAck(delivery_claim_token=claim), frame_id=frame.id
                            ),
                            agent.protocol.send(
                                f.CommandResult(
                                    status="success",
                                    result={"pong": True},
                                    delivery_claim_token=claim,
                                ),
                                frame_id=frame.id,
                            ),
                        ]
                    )
    except (Closed, trio.BrokenResourceError, OSError):
        pass


class Clients:
    """Client processes, each with a pipe to this one."""

    def __init__(self, target: Any, specs: list[dict[str, Any]]) -> None:
        ctx = mp.get_context("spawn")  # no state of this process's Trio runs leaks in
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for spec in specs:
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=target, args=(theirs, spec), daemon=True)
            proc.start()
            theirs.close()
            self.pipes.append(ours)
            self.procs.append(proc)

    def receive(self, timeout: float) -> list[Any]:
        replies = []
        for pipe, proc in zip(self.pipes, self.procs, strict=True):
            if not pipe.poll(timeout):
                raise TimeoutError(f"client {proc.pid} did not answer within {timeout:g}s")
            try:
                replies.append(pipe.recv())
            except EOFError:
                raise RuntimeError(f"client {proc.pid} died (exit code {proc.exitcode})") from None
        return replies

    def send(self, message: Any) -> None:
        for pipe in self.pipes:
            pipe.send(message)

    def stop(self) -> None:
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        for pipe in self.pipes:
            pipe.close()


# -- the embedded brain for command round trips ------------------------------------------


def command_brain_main(spec: dict[str, Any]) -> None:
    trio.run(_command_brain, spec)


async def _command_brain(spec: dict[str, Any]) -> None:
    """Provision, serve, then mint and time commands once told "go" on stdin."""
    import z4j
    from z4j.testing.agents import provision

    config = z4j.load_config(
        env={},
        overrides={
            "data_dir": Path(spec["data_dir"]),
            "database_url": spec["database_url"],
            "http_bind": "127.0.0.1:0",
            "ingest_bind": "127.0.0.1:0",
        },
    )
    suffix = uuid.uuid4().hex[:8]
    token, secret, agent_id = await provision(config, project=f"bench-{suffix}", agent="bench")
    async with trio.open_nursery() as nursery:
        brain = await nursery.start(z4j.serve_brain, config)
        ready = {"port": brain.http[1], "token": token, "secret": secret}
        print("ready " + json.dumps(ready), flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)
        count, rate = spec["count"], spec["rate"]
        latencies: list[float] = [math.nan] * count
        states: Counter[str] = Counter()

        async def one(i: int) -> None:
            started = time.perf_counter()
            record = await brain.commands.send(
                agent_id, "ping", parameters={"n": i}, timeout_seconds=30
            )
            done = await brain.commands.wait(record.id, within=30)
            latencies[i] = time.perf_counter() - started
            states[done.state if done is not None else "missing"] += 1

        async with trio.open_nursery() as commands:
            start = trio.current_time()
            for i in range(count):
                await trio.sleep_until(start + i / rate)
                commands.start_soon(one, i)
        result = {"latencies": latencies[spec["warmup"] :], "states": dict(states)}
        print("commands " + json.dumps(result), flush=True)
        nursery.cancel_scope.cancel()


# -- the measurements -----------------------------------------------------------------------


def measure_events(
    server: Server, *, connections: int, per_frame: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Acked events/s over ``args.seconds`` after ``args.warmup``, and CPU shares."""
    procs = 1 if connections == 1 else max(1, min(args.client_procs, connections))
    tag = uuid.uuid4().hex[:6]
    specs = [
        {
            "address": server.address,
            "token": server.token,
            "secret": server.secret,
            "connections": connections // procs + (1 if j < connections % procs else 0),
            "per_frame": per_frame,
            "window": args.window,
            "presigned": server.kind == "ceiling",
            "prime_timeout": args.prime_timeout,
            "tag": f"{tag}{j}",
        }
        for j in range(procs)
    ]
    clients = Clients(events_client, specs)
    try:
        opened = sum(r[1] for r in clients.receive(120))
        if opened != connections:
            raise RuntimeError(f"only {opened} of {connections} connections opened")
        started = time.monotonic()
        clients.send("go")
        unprimed = sum(r[1] for r in clients.receive(args.prime_timeout + 30))
        primed = time.monotonic() - started
        t1 = time.monotonic() + args.warmup
        t2 = t1 + args.seconds
        clients.send((t1, t2))
        _sleep_until(t1)
        cpu = CpuShares(server.pid, [p.pid for p in clients.procs])
        _sleep_until(t2)
        result: dict[str, Any] = {"cpu": cpu.read(), "primed": primed, "unprimed": unprimed}
        totals: Counter[str] = Counter()
        for _, counts in clients.receive(60):
            totals.update(counts)
    finally:
        clients.stop()
    result["rate"] = totals["measured"] / args.seconds
    result["totals"] = totals
    return result


def measure_idle(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    """RSS per idle connection: (RSS with N idle agents - RSS before) / N."""
    time.sleep(2.0)  # the server has finished starting
    before = rss_bytes(server.pid)
    clients = Clients(
        idle_client,
        [
            {
                "address": server.address,
                "token": server.token,
                "secret": server.secret,
                "connections": args.idle,
                "connect_concurrency": 32,
            }
        ],
    )
    try:
        started = time.monotonic()
        (_, ready), *_ = clients.receive(300)
        connect_seconds = time.monotonic() - started
        time.sleep(args.settle)
        after = rss_bytes(server.pid)
        clients.send("report")
        (_, state), *_ = clients.receive(30)
        clients.send("stop")
    finally:
        clients.stop()
    opened = ready.get("open", 0)
    return {
        "before": before,
        "after": after,
        "opened": opened,
        "still_open": state.get("open", 0),
        "state": state,
        "connect_seconds": connect_seconds,
        "per_connection": (after - before) / opened if opened else math.nan,
    }


def measure_commands_ceiling(args: argparse.Namespace) -> dict[str, Any]:
    server = EchoServer(args.ceiling)
    try:
        query = {
            "commands": args.commands + args.command_warmup,
            "rate": args.command_rate,
            "warmup": args.command_warmup,
        }
        spec = {
            "address": server.address,
            "token": server.token,
            "secret": server.secret,
            "ceiling": True,
            "query": query,
        }
        clients = Clients(command_client, [spec])
        try:
            clients.receive(60)
            cpu = CpuShares(server.pid, [p.pid for p in clients.procs])
            timeout = 60 + (args.commands + args.command_warmup) / args.command_rate
            result: dict[str, Any] = json.loads(server.lines.expect("commands ", timeout))
            result["cpu"] = cpu.read()
        finally:
            for proc in clients.procs:
                proc.terminate()
            clients.stop()
    finally:
        server.stop()
    return result


def measure_commands_brain(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="z4j-bench-commands-"))
    spec = {
        "data_dir": str(root / "data"),
        "database_url": args.database_url,
        "count": args.commands + args.command_warmup,
        "rate": args.command_rate,
        "warmup": args.command_warmup,
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("Z4J_")}
    with open(root / "brain.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--command-brain", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        lines = LineReader(proc.stdout)
        ready = json.loads(lines.expect("ready ", 60))
        client_spec = {
            "address": ("127.0.0.1", ready["port"]),
            "token": ready["token"],
            "secret": ready["secret"],
            "ceiling": False,
        }
        clients = Clients(command_client, [client_spec])
        try:
            clients.receive(60)
            cpu = CpuShares(proc.pid, [p.pid for p in clients.procs])
            proc.stdin.write("go\n")
            proc.stdin.flush()
            timeout = 90 + (args.commands + args.command_warmup) / args.command_rate
            result: dict[str, Any] = json.loads(lines.expect("commands ", timeout))
            result["cpu"] = cpu.read()
        finally:
            clients.stop()
        proc.wait(30)
    except BaseException:
        sys.stderr.write((root / "brain.log").read_text(errors="replace")[-3000:])
        raise
    finally:
        _stop_process(proc)
        shutil.rmtree(root, ignore_errors=True)
    return result


# -- the run ----------------------------------------------------------------------------------


class Report:
    """The summary table and the targets missed."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str, str]] = []
        self.failures: list[str] = []

    def row(self, label: str, ceiling: str, z4j: str, ratio: str, target: str = "-") -> None:
        self.rows.append((label, ceiling, z4j, ratio, target))

    def target(self, text: str, ok: bool, failure: str) -> str:
        if not ok:
            self.failures.append(failure)
        return f"{text} {'PASS' if ok else 'FAIL'}"

    def print(self) -> int:
        print(f"\n{'':<44} {'ceiling':>10} {'z4j':>10} {'z4j/ceiling':>12}  target")
        for label, c, z, ratio, target in self.rows:
            print(f"{label:<44} {c:>10} {z:>10} {ratio:>12}  {target}")
        print(f"load average at the end: {os.getloadavg()[0]:.2f}")
        for failure in self.failures:
            print(f"MISSED: {failure}")
        return 1 if self.failures else 0


def run_events(args: argparse.Namespace, report: Report) -> None:
    event_bytes = len(orjson.dumps(dict(event_template(), id="x" * 20)))
    print(
        f"\n(a) events/s acked after durability, counted for {args.seconds:g} s, starting "
        f"{args.warmup:g} s after every connection had its first ack; a window of "
        f"{args.window} unacked frames per connection; task events of ~{event_bytes} B; "
        f"{args.client_procs} client processes for {args.connections} connections; a fresh "
        "brain per run; ceiling clients replay pre-signed frames, z4j clients sign each"
    )
    echo = EchoServer(args.ceiling)
    try:
        for connections, per_frame, target in (
            (1, 1, TARGET_ONE_CONNECTION),
            (1, args.batch, TARGET_BATCHES),
            (args.connections, 1, None),
            (args.connections, args.batch, TARGET_BATCHES),
        ):
            name = f"{connections} connection{'s' if connections > 1 else ''}, " + (
                "1 event/frame" if per_frame == 1 else f"{per_frame} events/batch"
            )
            print(f"  {name}")
            ceiling = measure_events(echo, connections=connections, per_frame=per_frame, args=args)
            _print_events("ceiling", ceiling)
            brain = BrainServer(args, cap=connections)
            try:
                try:
                    z4j = measure_events(
                        brain, connections=connections, per_frame=per_frame, args=args
                    )
                finally:
                    brain.stop()
                durable = brain.durable_events()
            finally:
                brain.cleanup()
            _print_events("z4j", z4j)
            acked = z4j["totals"]["acked"]
            if durable is None:
                print("      durability: not checked on a Postgres store")
            else:
                print(f"      durability: {acked:,} events acked, {durable:,} durable")
                if durable < acked:
                    report.failures.append(f"{name}: {acked:,} events acked, {durable:,} durable")
            if z4j["totals"]["short_acks"]:
                report.failures.append(f"{name}: {z4j['totals']['short_acks']} short acks")
            rate = z4j["rate"]
            verdict = "-"
            if target is not None:
                verdict = report.target(
                    f">= {target:,}", rate >= target, f"{name}: {rate:,.0f} < {target:,} events/s"
                )
            ratio = f"{rate / ceiling['rate']:.2f}" if ceiling["rate"] else "-"
            report.row(
                f"events/s, {name}", f"{ceiling['rate']:,.0f}", f"{rate:,.0f}", ratio, verdict
            )
    finally:
        echo.stop()


def run_rss(args: argparse.Namespace, report: Report) -> None:
    print(
        f"\n(b) RSS per idle agent connection: {args.idle:,} agents connect (32 at a time) and "
        f"send a heartbeat every interval the server advertises (10 s); RSS read "
        f"{args.settle:g} s after the last connect; the brain's per-agent worker cap is "
        f"raised to {args.idle:,} (Z4J_WS_PER_AGENT_CONCURRENCY_CAP): one agent, "
        f"{args.idle:,} workers"
    )
    per = {}
    for kind in ("ceiling", "z4j"):
        server: Server = (
            EchoServer(args.ceiling) if kind == "ceiling" else BrainServer(args, cap=args.idle)
        )
        try:
            idle = measure_idle(server, args)
        finally:
            server.stop()
            if isinstance(server, BrainServer):
                server.cleanup()
        per[kind] = idle["per_connection"]
        problems = {k: v for k, v in idle["state"].items() if k not in ("attempts", "open")}
        print(
            f"    {kind:<8} RSS {idle['before'] / 2**20:6.1f} MiB -> "
            f"{idle['after'] / 2**20:6.1f} MiB with {idle['opened']:,} open "
            f"(connected in {idle['connect_seconds']:.1f} s; {idle['still_open']:,} still "
            f"open at the read{'; ' + str(problems) if problems else ''}): "
            f"{per[kind] / 1024:.1f} KiB per connection",
            flush=True,
        )
        if idle["still_open"] != args.idle:
            report.failures.append(f"{kind}: {idle['still_open']} of {args.idle} idle agents open")
    verdict = report.target(
        "<= 16",
        per["z4j"] <= TARGET_IDLE_BYTES,
        f"{per['z4j'] / 1024:.1f} KiB > 16 KiB per idle connection",
    )
    ratio = f"{per['z4j'] / per['ceiling']:.2f}" if per["ceiling"] > 0 else "-"
    report.row(
        "RSS per idle connection, KiB",
        f"{per['ceiling'] / 1024:.1f}",
        f"{per['z4j'] / 1024:.1f}",
        ratio,
        verdict,
    )


def run_commands(args: argparse.Namespace, report: Report) -> None:
    total = args.commands + args.command_warmup
    print(
        f"\n(c) command round trips: {total} commands at {args.command_rate:g}/s to one agent "
        f"that answers each at once (command_ack and command_result in one write); the "
        f"first {args.command_warmup} are not counted\n"
        "    ceiling: the echo app sends a canned command and times it until the "
        "command_result arrives (the client answers with pre-signed frames)\n"
        "    z4j:     an embedded brain (z4j.serve_brain in a subprocess) times "
        "brain.commands.send until brain.commands.wait returns the command completed"
    )
    results = {"ceiling": measure_commands_ceiling(args), "z4j": measure_commands_brain(args)}
    for kind, result in results.items():
        lat = result["latencies"]
        states = f"; final states {result['states']}" if "states" in result else ""
        print(
            f"    {kind:<8} p50 {percentile(lat, 50) * 1e3:6.2f} ms  p99 "
            f"{percentile(lat, 99) * 1e3:6.2f} ms  max {max(lat) * 1e3:6.2f} ms  "
            f"({len(lat)} timed{states}; {CpuShares.describe(result['cpu'])})",
            flush=True,
        )
    states = results["z4j"]["states"]
    if states.get("completed", 0) != total:
        report.failures.append(f"commands not all completed: {states}")
    for p in (50, 99):
        c = percentile(results["ceiling"]["latencies"], p)
        z = percentile(results["z4j"]["latencies"], p)
        verdict = "-"
        if p == 99:
            verdict = report.target(
                "<= 20", z <= TARGET_COMMAND_P99, f"command round trip p99 {z * 1e3:.1f} ms > 20 ms"
            )
        report.row(
            f"command round trip p{p}, ms",
            f"{c * 1e3:.2f}",
            f"{z * 1e3:.2f}",
            f"{z / c:.1f}",
            verdict,
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="z4j agent endpoint: events/s, RSS per idle agent, command round "
        "trips, each against a WebSocket ceiling measured in the same run.",
    )
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="measured seconds per events run"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        help="seconds from every connection's first ack to the start of counting",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=256,
        help="unacked frames per connection (z4j-bare's _MAX_IN_FLIGHT_BATCHES)",
    )
    parser.add_argument(
        "--prime-timeout",
        type=float,
        default=60.0,
        help="most seconds to wait for every connection's first ack",
    )
    parser.add_argument(
        "--connections", type=int, default=100, help="connections of the many-connections runs"
    )
    parser.add_argument(
        "--client-procs", type=int, default=2, help="client processes for the many-connections runs"
    )
    parser.add_argument("--batch", type=int, default=100, help="events per batch in batch runs")
    parser.add_argument("--idle", type=int, default=2000, help="idle agent connections")
    parser.add_argument(
        "--settle",
        type=float,
        default=5.0,
        help="seconds between the last connect and the RSS read",
    )
    parser.add_argument("--commands", type=int, default=500, help="commands timed per server")
    parser.add_argument("--command-rate", type=float, default=100.0, help="commands per second")
    parser.add_argument(
        "--command-warmup", type=int, default=50, help="commands sent first and not counted"
    )
    parser.add_argument(
        "--buffer-max-rows",
        type=int,
        default=5_000_000,
        help="Z4J_BUFFER_MAX_ROWS, raised so no run is cut short by backpressure",
    )
    parser.add_argument(
        "--database-url", help="a Postgres URL for the brains' store (unset: embedded SQLite)"
    )
    parser.add_argument(
        "--ceiling",
        choices=sorted(STACKS),
        default="z4j",
        help="the ceiling's WebSocket server: z4j (the brain's own) or hypercorn (for comparison)",
    )
    parser.add_argument(
        "--only", default="events,rss,commands", help="comma-separated: events, rss, commands"
    )
    parser.add_argument("--echo-server", choices=sorted(STACKS), help=argparse.SUPPRESS)
    parser.add_argument("--command-brain", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        trio.run(_echo_server_main, args.echo_server)
        return 0
    if args.command_brain:
        command_brain_main(json.loads(args.command_brain))
        return 0
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    if unknown := parts - {"events", "rss", "commands"}:
        parser.error(f"--only takes events, rss, commands; not {', '.join(sorted(unknown))}")

    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    store = "a Postgres store" if args.database_url else "its embedded SQLite store"
    print(
        f"z4j agent benchmark: {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.2f} at start; clients in processes of their own; loopback\n"
        f"  brain:   python -m z4j brain on {store}, drains on; event_batch_ack only after "
        f"the buffer commit (SQLite WAL, synchronous=FULL); "
        f"Z4J_BUFFER_MAX_ROWS={args.buffer_max_rows}\n"
        f"  ceiling: {STACKS[args.ceiling]}, with a /ws/agent that answers each frame with a "
        "canned ack: no token lookup, signing, buffer or store\n"
        "  clients: raw agents (wsproto + z4j's sans-IO AgentProtocol; binary frames, no "
        "compression); acks are counted, not verified"
    )
    report = Report()
    if "events" in parts:
        run_events(args, report)
    if "rss" in parts:
        run_rss(args, report)
    if "commands" in parts:
        run_commands(args, report)
    return report.print()


def _print_events(kind: str, result: dict[str, Any]) -> None:
    primed = f"every connection acked within {result['primed']:.1f} s"
    if result["unprimed"]:
        primed = f"{result['unprimed']} connections had no ack in {result['primed']:.0f} s"
    print(
        f"    {kind:<8} {result['rate']:>10,.0f} events/s  ({primed}; "
        f"{CpuShares.describe(result['cpu'])})",
        flush=True,
    )


async def _echo_server_main(stack: str) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_echo, stack)
            print(f"port {port}", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


if __name__ == "__main__":
    raise SystemExit(main())
