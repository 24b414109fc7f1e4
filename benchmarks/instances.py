"""Ingest with ``z4j brain --instances 2`` (SO_REUSEPORT) against one brain process.

Run ``python benchmarks/instances.py`` (``--help`` for the knobs). The load
is benchmarks/ingest.py's load (a), the NightOwl one: 4 closed-loop client
processes, each opening a new connection per ~3 KB payload of 5 records,
reading the reply, closing. It runs, in alternation (``--rounds`` times
each), against:

1. one ``python -m z4j brain`` process;
2. ``python -m z4j brain --instances 2``: a supervisor and two brain
   processes sharing the ingest port through SO_REUSEPORT, each with its
   own buffer file.

Each round also runs ingest.py's durable bare server under the same load
(frames appended to a file, one fdatasync per group, no parsing, no
SQLite): with a fixed number of closed-loop clients every reply waits for
a sync on top of the round trip, so its rate is about the most any number
of brains can reach (a sync's wait does not shrink with more processes);
it is printed beside the CPU ceiling.

Both on the same settings: fixed loopback ports, the buffer with
``synchronous=FULL`` (``2:OK`` only after the commit), and by default the
store held unreachable so drains wait, as in ingest.py (``--database-url``
drains into a real Postgres instead). The script prints payloads/s of
each phase, the CPU of the brain processes, of the clients and of the
whole machine (clients and brains share its cores: on a small machine the
clients' own CPU caps what a second brain can add), how the kernel spread
the load over the two instances, and the ratio (target >= 1.6). After
each phase it checks that every acknowledged payload is in a buffer file
or in the store.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RECORDS_PER_PAYLOAD, make_payloads, process_cpu_seconds
from ingest import BareServer, new_connection_client

from z4j.protocol.ingest import encode_frame
from z4j.testing.brain import BrainProcess

TARGET = 1.6
_READY = re.compile(r"z4j\.supervisor: instance (\d+) ready \(pid (\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, over every core."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields)
    ticks = os.sysconf("SC_CLK_TCK")
    return (total - idle) / ticks, total / ticks


class Meter:
    """CPU (in cores) of a set of processes and of the machine, over an interval."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self._cpu = self._pids_cpu()
        self._busy, self._total = machine_busy_seconds()
        self._wall = time.monotonic()

    def _pids_cpu(self) -> float:
        total = 0.0
        for pid in self.pids:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                total += process_cpu_seconds(pid)
        return total

    def read(self) -> tuple[float, float]:
        wall = time.monotonic() - self._wall
        busy, total = machine_busy_seconds()
        cores = os.cpu_count() or 1
        machine = (busy - self._busy) / (total - self._total) * cores if total > self._total else 0
        return (self._pids_cpu() - self._cpu) / wall, machine


class Brains:
    """``python -m z4j brain`` with Z4J_INSTANCES=n, on fixed ports in a temp dir."""

    def __init__(self, instances: int, args: argparse.Namespace) -> None:
        self.instances = instances
        self.root = Path(tempfile.mkdtemp(prefix="z4j-bench-instances-"))
        self.data_dir = self.root / "data"
        self.database_url = args.database_url
        self.port = free_port()
        env = {
            "Z4J_INSTANCES": str(instances),
            "Z4J_DATA_DIR": str(self.data_dir),
            "Z4J_INGEST_BIND": f"127.0.0.1:{self.port}",
            "Z4J_HTTP_BIND": f"127.0.0.1:{free_port()}",
            "Z4J_BUFFER_MAX_ROWS": str(args.buffer_max_rows),
            "Z4J_DRAIN_WORKERS": str(args.drain_workers),
            "Z4J_SO_REUSEPORT": "true",  # the same socket options in both phases
            "Z4J_DATABASE_URL": args.database_url
            or f"postgresql://z4j@127.0.0.1:{free_port()}/z4j",  # unreachable: drains wait
        }
        self.events_before = self._stored_payloads()
        try:
            self.process = BrainProcess(env, log_path=self.root / "brain.log")
            self.pids = self._wait_children()
        except BaseException:
            if hasattr(self, "process"):
                self.process.kill()
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _wait_children(self) -> list[int]:
        """The brain processes' pids (the supervisor's too: its CPU counts)."""
        if self.instances == 1:
            return [self.process.proc.pid]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready = dict(_READY.findall(self.process.log_text()))
            if len(ready) == self.instances:
                return [self.process.proc.pid, *(int(pid) for pid in ready.values())]
            if self.process.proc.poll() is not None:
                raise RuntimeError(f"supervisor exited:\n{self.process.log_text()[-3000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"instances not ready:\n{self.process.log_text()[-3000:]}")

    def stop(self) -> None:
        self.process.signal(signal.SIGTERM)
        try:
            code = self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise RuntimeError("brain did not stop within 60 s") from None
        if code != 0:
            raise RuntimeError(f"brain exited {code}:\n{self.process.log_text()[-3000:]}")

    def buffered(self) -> list[int]:
        """Payloads in each instance's buffer file."""
        counts = []
        for i in range(1, self.instances + 1):
            name = "buffer.sqlite3" if i == 1 else f"buffer-{i}.sqlite3"
            db = sqlite3.connect(self.data_dir / name)
            try:
                counts.append(int(db.execute("SELECT count(*) FROM payloads").fetchone()[0]))
            finally:
                db.close()
        return counts

    def _stored_payloads(self) -> int:
        if self.database_url is None:
            return 0
        import psycopg

        with psycopg.connect(self.database_url) as conn:
            try:
                (n,) = conn.execute("SELECT count(*) FROM events").fetchone() or (0,)
            except psycopg.errors.UndefinedTable:
                return 0
        return int(n) // RECORDS_PER_PAYLOAD

    def durable_payloads(self) -> int:
        return sum(self.buffered()) + self._stored_payloads() - self.events_before

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _drive(
    port: int, pids: list[int], args: argparse.Namespace, frames: list[bytes], ctx: Any
) -> dict[str, Any]:
    """Run the client processes against ``port``; measure ``pids`` and the clients."""
    out: Any = ctx.Queue()
    t0 = time.monotonic() + 0.5  # every client starts together
    t1, t2 = t0 + args.warmup, t0 + args.warmup + args.duration
    clients = [
        ctx.Process(target=new_connection_client, args=(port, frames, t0, t1, t2, out), daemon=True)
        for _ in range(args.clients)
    ]
    for c in clients:
        c.start()
    try:
        while time.monotonic() < t1:
            time.sleep(0.005)
        server_meter = Meter(pids)
        client_meter = Meter([c.pid for c in clients if c.pid is not None])
        while time.monotonic() < t2:
            time.sleep(0.005)
        server_cpu, machine = server_meter.read()
        client_cpu, _ = client_meter.read()
        results = [out.get(timeout=60) for _ in clients]
    finally:
        for c in clients:
            c.join(10)
            if c.is_alive():
                c.kill()
                c.join()
    return {
        "rate": sum(r[0] for r in results) / args.duration,
        "errors": sum(r[1] for r in results),
        "acked": sum(r[2] for r in results),
        "brain_cpu": server_cpu,
        "client_cpu": client_cpu,
        "machine": machine,
    }


def run_phase(
    instances: int, args: argparse.Namespace, frames: list[bytes], ctx: Any
) -> dict[str, Any]:
    brains = Brains(instances, args)
    try:
        result = _drive(brains.port, brains.pids, args, frames, ctx)
        brains.stop()
        result["durable"] = brains.durable_payloads()
        result["shares"] = brains.buffered() if args.database_url is None else []
    finally:
        brains.cleanup()
    return result


def durable_floor(args: argparse.Namespace, frames: list[bytes], ctx: Any) -> float:
    """payloads/s of ingest.py's durable bare server under the same load.

    One process that only appends the frames to a file and fdatasyncs each
    group before replying: with a fixed number of closed-loop clients every
    reply waits for a sync, so more brains can shorten only the CPU part of
    a round, not the sync's wait.
    """
    server = BareServer(durable=True)
    try:
        return float(_drive(server.port, [server.pid], args, frames, ctx)["rate"])
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="NightOwl ingest load: z4j brain --instances 2 vs one process.",
    )
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--instances", type=int, default=2, help="instances in the second phase")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two phases")
    parser.add_argument(
        "--database-url",
        default=None,
        help="drain into this Postgres (default: the store held unreachable, drains wait)",
    )
    parser.add_argument("--drain-workers", type=int, default=1, help="Z4J_DRAIN_WORKERS")
    parser.add_argument(
        "--buffer-max-rows", type=int, default=5_000_000, help="Z4J_BUFFER_MAX_ROWS (raised)"
    )
    args = parser.parse_args()

    frames = [encode_frame(p) for p in make_payloads(256)]
    ctx = mp.get_context("fork")
    cores = os.cpu_count() or 1
    busy0, total0 = machine_busy_seconds()
    time.sleep(1.0)
    busy1, total1 = machine_busy_seconds()
    before = (busy1 - busy0) / (total1 - total0) * cores if total1 > total0 else 0.0
    print(
        f"z4j instances benchmark: {cores} cores, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}, other processes using "
        f"{before:.2f} cores just before the run"
    )
    print(
        f"NightOwl load: {args.clients} client processes, closed loop, a new connection per "
        f"payload of {RECORDS_PER_PAYLOAD} records ({len(frames[0])} B frame); each phase "
        f"{args.warmup:g} s warm-up + {args.duration:g} s measured; loopback, fixed ports, "
        f"SO_REUSEPORT; buffer synchronous=FULL; "
        + (
            "drains into the given Postgres"
            if args.database_url
            else "drains off (store held unreachable)"
        )
    )
    rates: dict[int, list[float]] = {1: [], args.instances: []}
    costs: list[float] = []  # CPU seconds per payload (brain + clients), one process
    floors: list[float] = []
    failures = []
    for round_ in range(1, args.rounds + 1):
        floors.append(durable_floor(args, frames, ctx))
        print(
            f"  round {round_}  durable bare    {floors[-1]:>8,.0f} payloads/s  "
            "(reference: frames appended and fdatasync'd per group, nothing else)",
            flush=True,
        )
        for n in (1, args.instances):
            r = run_phase(n, args, frames, ctx)
            rates[n].append(r["rate"])
            if n == 1 and r["rate"]:
                costs.append((r["brain_cpu"] + r["client_cpu"]) / r["rate"])
            name = "1 process" if n == 1 else f"--instances {n}"
            shares = ""
            if n > 1 and r["shares"] and sum(r["shares"]):
                shares = ", spread " + "/".join(
                    f"{100 * s / sum(r['shares']):.0f}%" for s in r["shares"]
                )
            err = f", {r['errors']:.0f} errors" if r["errors"] else ""
            print(
                f"  round {round_}  {name:<15} {r['rate']:>8,.0f} payloads/s  "
                f"(brain CPU {r['brain_cpu']:.2f} cores, clients {r['client_cpu']:.2f}, "
                f"machine {r['machine']:.2f} of {cores}{shares}{err})",
                flush=True,
            )
            if r["durable"] < r["acked"]:
                failures.append(f"{name}: {r['acked']} acknowledged, only {r['durable']} durable")
    one = statistics.median(rates[1])
    many = statistics.median(rates[args.instances])
    ratio = many / one
    verdict = "PASS" if ratio >= TARGET else "MISS"
    print(
        f"median: 1 process {one:,.0f} payloads/s, --instances {args.instances} "
        f"{many:,.0f} payloads/s"
    )
    print(f"ratio: {ratio:.2f}   (target >= {TARGET:.2f}: {verdict})")
    if costs:
        # Brains and clients share the machine: at one process's CPU cost per
        # payload, its cores cannot carry more than this, however many brains.
        cost = statistics.median(costs)
        print(
            f"ceiling of this machine: {cores} cores / {cost * 1e6:.0f} us CPU per payload "
            f"(brain + clients, 1 process) = {cores / cost:,.0f} payloads/s, "
            f"{cores / cost / one:.2f}x one process"
        )
    floor = statistics.median(floors)
    print(
        f"latency ceiling under this load: the durable bare server's {floor:,.0f} payloads/s, "
        f"{floor / one:.2f}x one process ({args.clients} closed-loop clients: each reply "
        "waits for a sync, however many brains; approximate)"
    )
    if ratio < TARGET:
        failures.append(f"ratio {ratio:.2f} < {TARGET:.2f}")
    for failure in failures:
        print(f"MISSED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
