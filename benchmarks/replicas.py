"""Replica benchmark: cross-replica command round trip and dashboard fan-out.

Run ``python benchmarks/replicas.py`` (``--help`` for the knobs). It starts a
throwaway Postgres cluster (fsync on) and three brain replicas on it:

- A and B are ``python -m z4j brain`` processes; C runs embedded in this
  process (``z4j.serve_brain``), so commands can be minted on it with
  ``brain.commands.send`` and awaited with ``brain.commands.wait``;
- an agent (a raw protocol client in this process) holds its socket on A
  and answers every command at once.

(1) Command round trip: commands are minted on C at a fixed rate
    (``--rate``, default 100/s) for the agent on A; the clock runs from the
    mint until C's ``wait`` returns the command completed. The path: C
    stores it and announces it (NOTIFY), A's listener hears it and sends the
    command frame, the agent acks and answers, A records the result and
    announces the final state, C's listener wakes the waiter.
(2) Dashboard fan-out: the agent sends one event per batch to A
    (``--events-rate`` per second) stamped with its send time; a dashboard
    viewer on B records when each arrives (A buffers, drains, relays the
    feed message over NOTIFY, B fans it out).

The ceiling, in the same run, is the bare Postgres path those messages ride:
(1) a NOTIFY ping-pong between two connections (the two hops a cross-replica
round trip needs at least), (2) one NOTIFY hop. Targets: round trip p99 ≤ 50
ms, fan-out p99 ≤ 100 ms. The ingest throughput of two SO_REUSEPORT
processes is ``benchmarks/instances.py``'s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import psycopg
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import Request, TextMessage

from z4j.brain import serve_brain
from z4j.protocol.agent import frames as f
from z4j.testing.agents import RawAgent, admin_token, provision, raw_agent
from z4j.testing.brain import BrainProcess, make_config
from z4j.testing.postgres import PostgresCluster

SECRET = "benchmark-replicas-master-secret-0123456789"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: list[float]) -> tuple[float, float]:
    return percentile(values, 0.5) * 1000, percentile(values, 0.99) * 1000


# -- the ceiling: NOTIFY over the same server ---------------------------------------------


def notify_ceiling(url: str, rounds: int) -> tuple[list[float], list[float]]:
    """(one-hop latencies, ping-pong latencies) of NOTIFY between two connections."""
    ready = threading.Event()
    stop = threading.Event()

    def echo() -> None:  # hears on "ping", answers on "pong"
        with (
            psycopg.connect(url, autocommit=True) as conn,
            psycopg.connect(url, autocommit=True) as answer,
        ):
            conn.execute("LISTEN ping")
            ready.set()
            for note in conn.notifies():
                if stop.is_set():
                    break
                answer.execute("SELECT pg_notify('pong', %s)", (note.payload,))

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    ready.wait(10)
    one_hop: list[float] = []
    round_trip: list[float] = []
    with (
        psycopg.connect(url, autocommit=True) as sender,
        psycopg.connect(url, autocommit=True) as listener,
    ):
        listener.execute("LISTEN pong")
        listener.execute("LISTEN hop")
        for n in range(rounds):
            started = time.perf_counter()
            sender.execute("SELECT pg_notify('hop', %s)", (str(n),))
            next(listener.notifies(timeout=5))
            one_hop.append(time.perf_counter() - started)
            started = time.perf_counter()
            sender.execute("SELECT pg_notify('ping', %s)", (str(n),))
            next(listener.notifies(timeout=5))
            round_trip.append(time.perf_counter() - started)
        stop.set()
        sender.execute("SELECT pg_notify('ping', 'stop')")
    thread.join(5)
    return one_hop, round_trip


# -- z4j -------------------------------------------------------------------------------------


async def answer_commands(agent: RawAgent) -> None:
    while True:
        frame = await agent.receive()
        if isinstance(frame.payload, f.Command):
            token = frame.payload.delivery_claim_token
            await agent.send(f.CommandAck(delivery_claim_token=token), frame_id=frame.id)
            await agent.send(
                f.CommandResult(status="success", result={}, delivery_claim_token=token),
                frame_id=frame.id,
            )


async def view_dashboard(
    http: tuple[str, int], token: str, arrivals: dict[str, float], ready: trio.Event
) -> None:
    """A viewer on a replica: when each probe event's feed message arrives."""
    stream = await trio.open_tcp_stream(*http)
    ws = WSConnection(ConnectionType.CLIENT)
    auth = [(b"Authorization", f"Bearer {token}".encode())]
    async with stream:
        await stream.send_all(
            ws.send(Request(host="x", target="/ws/dashboard", extra_headers=auth))
        )
        while data := await stream.receive_some(65536):
            ws.receive_data(data)
            for event in ws.events():
                if not isinstance(event, TextMessage):
                    continue
                message = orjson.loads(event.data)
                if message["type"] == "hello":
                    ready.set()
                if message["type"] == "events":
                    now = time.time()
                    for sample in message["sample"]:
                        probe = sample["body"].get("probe")
                        if probe is not None and probe not in arrivals:
                            arrivals[probe] = now - sample["body"]["sent_at"]


async def run(args: argparse.Namespace, url: str, tmp: Path) -> dict[str, Any]:
    config_c = make_config(tmp / "C", url, secret=SECRET, heartbeat_seconds=1.0, instance_name="C")
    token = await admin_token(config_c)
    agent_token, project_secret, agent_id = await provision(config_c)
    env = {
        "Z4J_DATABASE_URL": url,
        "Z4J_SECRET": SECRET,
        "Z4J_INGEST_BIND": "127.0.0.1:0",
        "Z4J_HTTP_BIND": "127.0.0.1:0",
    }
    brains = [
        BrainProcess(
            {**env, "Z4J_DATA_DIR": str(tmp / n), "Z4J_INSTANCE_NAME": n}, log_path=tmp / f"{n}.log"
        )
        for n in "AB"
    ]
    a, b = brains
    results: dict[str, Any] = {}
    try:
        async with trio.open_nursery() as nursery:
            brain_c = await nursery.start(
                lambda task_status: serve_brain(config_c, task_status=task_status)
            )
            async with raw_agent(
                a.http, agent_token, project_secret, worker_id="bench", prove=True
            ) as agent:
                nursery.start_soon(answer_commands, agent)
                await trio.sleep(1.0)  # the listeners LISTEN; ownership is recorded

                # (1) command round trips, minted on C at a fixed rate.
                trips: list[float] = []
                failures = 0

                async def one_command() -> None:
                    nonlocal failures
                    started = time.perf_counter()
                    record = await brain_c.commands.send(agent_id, "ping", timeout_seconds=30)
                    done = await brain_c.commands.wait(record.id, within=10)
                    if done is None or done.state != "completed":
                        failures += 1
                        return
                    trips.append(time.perf_counter() - started)

                async with trio.open_nursery() as senders:
                    for _ in range(int(args.rate)):  # warm-up second, not counted
                        senders.start_soon(one_command)
                        await trio.sleep(1 / args.rate)
                trips.clear()
                failures = 0
                count = int(args.rate * args.seconds)
                started = trio.current_time()
                async with trio.open_nursery() as senders:
                    for n in range(count):
                        await trio.sleep_until(started + n / args.rate)
                        senders.start_soon(one_command)
                results["trips"] = trips
                results["trip_failures"] = failures
                results["trip_rate"] = count / (trio.current_time() - started)

                # (2) dashboard fan-out: events sent to A, seen by a viewer on B.
                arrivals: dict[str, float] = {}
                viewer_ready = trio.Event()
                nursery.start_soon(view_dashboard, b.http, token, arrivals, viewer_ready)
                await viewer_ready.wait()
                await trio.sleep(0.5)
                probes = int(args.events_rate * args.seconds)
                for n in range(probes):
                    probe = f"p{n}"
                    event = f.AgentEvent(
                        id=probe,
                        kind="bench.probe",
                        raw={
                            "id": probe,
                            "kind": "bench.probe",
                            "probe": probe,
                            "sent_at": time.time(),
                        },
                    )
                    await agent.send(f.EventBatch(events=(event,)), frame_id=probe)
                    await trio.sleep(1 / args.events_rate)
                await trio.sleep(3)  # the last probes' way through the drain and relay
                results["fanout"] = list(arrivals.values())
                results["fanout_missing"] = probes - len(arrivals)
                nursery.cancel_scope.cancel()
    finally:
        for brain in brains:
            brain.kill()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement (default 10)")
    parser.add_argument(
        "--rate", type=float, default=100.0, help="commands per second (default 100)"
    )
    parser.add_argument("--events-rate", type=float, default=20.0, help="probe events per second")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="z4j-bench-replicas-"))
    try:
        with PostgresCluster(fsync=True) as cluster:
            url = cluster.create_database("bench")
            hop, pingpong = notify_ceiling(url, 300)
            results = trio.run(run, args, url, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    trip50, trip99 = summary(results["trips"])
    ceil50, ceil99 = summary(pingpong)
    fan50, fan99 = summary(results["fanout"])
    hop50, hop99 = summary(hop)
    print(
        f"machine: {os.cpu_count()} cores; Postgres fsync on; 3 replicas (2 processes + this one)"
    )
    print()
    print(
        f"(1) command round trip, minted on C for an agent on A, {results['trip_rate']:.0f}/s "
        f"for {args.seconds:g} s: {len(results['trips'])} completed, {results['trip_failures']} failed"
    )
    print(
        f"    z4j:      p50 {trip50:6.1f} ms   p99 {trip99:6.1f} ms   (target p99 <= 50 ms: "
        f"{'PASS' if trip99 <= 50 else 'FAIL'})"
    )
    print(f"    ceiling:  p50 {ceil50:6.1f} ms   p99 {ceil99:6.1f} ms   (NOTIFY ping-pong)")
    print(f"    ratio (ceiling p99 / z4j p99): {ceil99 / trip99:.2f}")
    print()
    print(
        f"(2) dashboard fan-out, event sent to A, seen on B: {len(results['fanout'])} probes, "
        f"{results['fanout_missing']} missing"
    )
    print(
        f"    z4j:      p50 {fan50:6.1f} ms   p99 {fan99:6.1f} ms   (target p99 <= 100 ms: "
        f"{'PASS' if fan99 <= 100 else 'FAIL'})"
    )
    print(f"    ceiling:  p50 {hop50:6.1f} ms   p99 {hop99:6.1f} ms   (one NOTIFY hop)")
    print(f"    ratio (ceiling p99 / z4j p99): {hop99 / fan99:.2f}")
    print(f"    mean z4j fan-out {statistics.fmean(results['fanout']) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
