"""Ingest benchmark: durable payloads/s of a brain, against a bare Trio server.

Run ``python benchmarks/ingest.py`` (``--help`` for the knobs). Two loads, each
run first against the ceiling and then against a real brain, in this run:

(a) the NightOwl load: 4 closed-loop client processes, each opening a new
    connection per ~3 KB payload of 5 records, reading the reply, closing;
(b) persistent connections: client processes each keep one connection and
    pipeline a window of frames (send the window, read its replies).

The ceiling is a bare Trio accept-read-reply server in its own process: it
cuts frames by their length prefix and answers ``2:OK``, without parsing or
storing anything. The brain is ``python -m z4j brain`` in its own process on
its embedded SQLite store, answering ``2:OK`` only after the buffer commit
(fsync). Clients are separate processes, so what is measured is the server's
own process. Everything runs on loopback; temporary directories and every
process started here are removed at the end.

For (a) it also runs a reference that is not the target's yardstick: the
same bare server, replying only after the frames are appended to a file and
fdatasync'd (group commit on one thread). It shows what a durable reply
costs by itself under this load, so the brain's figure can be read against
both.

After each brain phase the script checks that every payload acknowledged is
in the buffer file or already drained to the store (nothing acknowledged was
lost).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RECORDS_PER_PAYLOAD, CpuMeter, make_payloads

from z4j.protocol.ingest import encode_frame

OK = b"2:OK"
ERROR = b"5:ERROR"

# -- the ceiling: a bare Trio accept-read-reply server ---------------------------


class _GroupCommitFile:
    """The least a durable reply needs: frames appended to a file, one
    fdatasync per group, on one thread that lives as long as the server.

    Connections queue their bytes and wait; the thread takes everything
    queued, writes it, syncs, and wakes that group's waiters on the loop.
    The file is reused from the start past 64 MiB (as SQLite reuses its WAL).
    """

    WRAP = 64 * 1024 * 1024

    def __init__(self, path: str) -> None:
        import collections
        import threading

        import trio

        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._offset = 0
        self._queue: collections.deque[tuple[bytes, Any]] = collections.deque()
        self._more = threading.Event()
        self._token = trio.lowlevel.current_trio_token()
        threading.Thread(target=self._run, daemon=True).start()

    async def append(self, data: bytes) -> None:
        import trio

        done = trio.Event()
        self._queue.append((data, done))
        self._more.set()
        await done.wait()

    def _run(self) -> None:
        while True:
            self._more.wait()
            self._more.clear()
            group = []
            while self._queue:
                group.append(self._queue.popleft())
            if not group:
                continue
            data = b"".join(d for d, _ in group)
            if self._offset + len(data) > self.WRAP:
                self._offset = 0
            os.pwrite(self._fd, data, self._offset)
            self._offset += len(data)
            os.fdatasync(self._fd)
            self._token.run_sync_soon(_set_all, [done for _, done in group])


def _set_all(events: list[Any]) -> None:
    for event in events:
        event.set()


def bare_server_main(durable: bool = False) -> None:
    """Run the ceiling server; print its port, serve until SIGTERM.

    ``durable``: the same server, replying only once the frames are synced
    to a file (`_GroupCommitFile`): the floor of any durable reply here.
    """
    import trio

    journal: _GroupCommitFile | None = None

    async def handle(stream: trio.SocketStream) -> None:
        buf = bytearray()
        try:
            async with stream:
                while True:
                    data = await stream.receive_some(256 * 1024)
                    if not data:
                        return
                    buf += data
                    pos = frames = 0
                    while True:  # cut frames by their length prefix, nothing more
                        colon = buf.find(b":", pos, pos + 12)
                        if colon < 0:
                            break
                        end = colon + 1 + int(buf[pos:colon])
                        if end > len(buf):
                            break
                        pos = end
                        frames += 1
                    if frames and journal is not None:
                        await journal.append(bytes(buf[:pos]))
                    del buf[:pos]
                    if frames:
                        await stream.send_all(OK * frames)
        except trio.BrokenResourceError:
            pass

    async def main() -> None:
        nonlocal journal
        if durable:
            directory = tempfile.mkdtemp(prefix="z4j-bench-journal-")
            journal = _GroupCommitFile(os.path.join(directory, "journal"))
        # Same listening socket as the brain's: SO_REUSEADDR, backlog 1024.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        sock.setblocking(False)
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.serve_listeners, handle, [listener])
                print(f"port {sock.getsockname()[1]}", flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
        if durable:
            shutil.rmtree(directory, ignore_errors=True)

    trio.run(main)


class BareServer:
    def __init__(self, *, durable: bool = False) -> None:
        mode = "--bare-durable-server" if durable else "--bare-server"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, mode], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("port "):
            self.stop()
            raise RuntimeError(f"bare server did not start: {line!r}")
        self.port = int(line.split()[1])
        self.pid = self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# -- the brain ---------------------------------------------------------------------


class Brain:
    """``python -m z4j brain`` in a temporary data directory."""

    def __init__(self, args: argparse.Namespace) -> None:
        from z4j.testing.brain import BrainProcess

        self.root = Path(tempfile.mkdtemp(prefix="z4j-bench-ingest-"))
        self.data_dir = self.root / "data"
        env = {
            "Z4J_DATA_DIR": str(self.data_dir),
            "Z4J_INGEST_BIND": "127.0.0.1:0",
            "Z4J_HTTP_BIND": "127.0.0.1:0",
            "Z4J_BUFFER_MAX_ROWS": str(args.buffer_max_rows),
            "Z4J_DRAIN_WORKERS": str(args.drain_workers),
            "Z4J_LOG_LEVEL": "INFO",
        }
        if args.drain == "off":
            # The store is held unreachable (a closed loopback port), as in an
            # outage: migrations retry in the background, drains and the
            # heartbeat wait, ingest goes on into the buffer. That is the
            # reference's "drain disabled".
            env["Z4J_DATABASE_URL"] = f"postgresql://z4j@127.0.0.1:{_closed_port()}/z4j"
        try:
            self.process = BrainProcess(env, log_path=self.root / "brain.log")
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise
        self.port = self.process.ingest[1]
        self.pid = self.process.proc.pid

    def stop(self) -> None:
        self.process.stop()

    def durable_payloads(self) -> int:
        """Payloads in the buffer file plus payloads already in the store."""
        db = sqlite3.connect(self.data_dir / "buffer.sqlite3")
        try:
            buffered = int(db.execute("SELECT count(*) FROM payloads").fetchone()[0])
        finally:
            db.close()
        stored_records = 0
        store = self.data_dir / "store.sqlite3"
        if store.exists():
            db = sqlite3.connect(store)
            try:
                stored_records = int(db.execute("SELECT count(*) FROM events").fetchone()[0])
            except sqlite3.OperationalError:
                pass
            finally:
                db.close()
        return buffered + stored_records // RECORDS_PER_PAYLOAD

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- clients (separate processes) --------------------------------------------------


def _count_replies(buf: bytearray) -> tuple[int, int]:
    """Consume whole replies from ``buf``: (ok, error)."""
    ok = err = pos = 0
    n = len(buf)
    while pos + 4 <= n:
        if buf.startswith(OK, pos):
            ok += 1
            pos += 4
        elif buf.startswith(ERROR, pos):
            err += 1
            pos += 7
        elif pos + 7 <= n:
            raise RuntimeError(f"bad reply {bytes(buf[pos : pos + 16])!r}")
        else:
            break
    del buf[:pos]
    return ok, err


def new_connection_client(
    port: int, frames: list[bytes], t0: float, t1: float, t2: float, out: Any
) -> None:
    """NightOwl-style: connect, send one frame, read the reply, close; repeat."""
    addr = ("127.0.0.1", port)
    counted_ok = counted_err = total_ok = 0
    i = 0
    nframes = len(frames)
    while time.monotonic() < t0:
        time.sleep(0.001)
    while True:
        now = time.monotonic()
        if now >= t2:
            break
        sock = socket.create_connection(addr)
        try:
            sock.sendall(frames[i % nframes])
            i += 1
            buf = bytearray()
            ok = err = 0
            while not (ok or err):
                data = sock.recv(64)
                if not data:
                    raise RuntimeError("server closed before replying")
                buf += data
                ok, err = _count_replies(buf)
        finally:
            sock.close()
        done = time.monotonic()
        total_ok += ok
        if t1 <= done < t2:
            counted_ok += ok
            counted_err += err
    out.put((counted_ok, counted_err, total_ok))


def persistent_client(
    port: int,
    frames: list[bytes],
    window: int,
    connections: int,
    t0: float,
    t1: float,
    t2: float,
    out: Any,
) -> None:
    """Persistent connections, each pipelining ``window`` frames then reading replies.

    A process with several connections keeps them all busy: it sends each its
    window, then collects the replies of each in turn.
    """
    socks = []
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(sock)
    nframes = len(frames)
    windows = [
        b"".join(frames[(k * window + j) % nframes] for j in range(window))
        for k in range(max(1, nframes // window))
    ]
    counted_ok = counted_err = total_ok = 0
    k = 0
    while time.monotonic() < t0:
        time.sleep(0.001)
    try:
        while time.monotonic() < t2:
            for sock in socks:
                sock.sendall(windows[k % len(windows)])
                k += 1
            for sock in socks:
                buf = bytearray()
                ok = err = 0
                while ok + err < window:
                    data = sock.recv(65536)
                    if not data:
                        raise RuntimeError("server closed the connection")
                    buf += data
                    o, e = _count_replies(buf)
                    ok += o
                    err += e
                done = time.monotonic()
                total_ok += ok
                if t1 <= done < t2:
                    counted_ok += ok
                    counted_err += err
    finally:
        for sock in socks:
            sock.close()
    out.put((counted_ok, counted_err, total_ok))


def run_load(
    server_pid: int,
    start_client: Callable[[float, float, float, Any], mp.Process],
    clients: int,
    warmup: float,
    duration: float,
) -> dict[str, float]:
    out: Any = mp.get_context("fork").Queue()
    t0 = time.monotonic() + 0.5  # every client starts together
    t1, t2 = t0 + warmup, t0 + warmup + duration
    procs = [start_client(t0, t1, t2, out) for _ in range(clients)]
    try:
        while time.monotonic() < t1:
            time.sleep(0.005)
        cpu = CpuMeter(server_pid)
        while time.monotonic() < t2:
            time.sleep(0.005)
        server_cpu = cpu.read()
        results = [out.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    ok = sum(r[0] for r in results)
    err = sum(r[1] for r in results)
    return {
        "rate": ok / duration,
        "errors": err,
        "acked_total": sum(r[2] for r in results),
        "server_cpu": server_cpu,
    }


# -- the run -------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Ingest payloads/s of a z4j brain vs a bare Trio server, same run.",
    )
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--clients", type=int, default=4, help="client processes for load (a)")
    parser.add_argument(
        "--persistent-clients", type=int, default=2, help="client processes for load (b)"
    )
    parser.add_argument(
        "--connections", type=int, default=2, help="connections per client process in (b)"
    )
    parser.add_argument("--window", type=int, default=64, help="frames pipelined per connection")
    parser.add_argument(
        "--drain",
        choices=["off", "on"],
        default="off",
        help="off (default): the store is held unreachable so drains wait, as in the "
        "reference's 'drain disabled'; on: the embedded SQLite store and live drains",
    )
    parser.add_argument(
        "--drain-workers", type=int, default=1, help="Z4J_DRAIN_WORKERS of the brain"
    )
    parser.add_argument(
        "--buffer-max-rows",
        type=int,
        default=5_000_000,
        help="Z4J_BUFFER_MAX_ROWS, raised so a phase is not cut short by backpressure",
    )
    parser.add_argument("--only", choices=["a", "b"], help="run one load only")
    parser.add_argument("--bare-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bare-durable-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server or args.bare_durable_server:
        bare_server_main(durable=args.bare_durable_server)
        return 0

    payloads = make_payloads(256)
    frames = [encode_frame(p) for p in payloads]
    ctx = mp.get_context("fork")
    print(
        f"z4j ingest benchmark: {os.cpu_count()} cores, payload {len(payloads[0])} B of "
        f"{RECORDS_PER_PAYLOAD} records, frame {len(frames[0])} B; each phase "
        f"{args.warmup:g} s warm-up + {args.duration:g} s measured; loopback only"
    )
    print(
        f"brain: python -m z4j brain, buffer SQLite WAL synchronous=FULL (ack after commit), "
        f"Z4J_BUFFER_MAX_ROWS={args.buffer_max_rows} (raised from 100000 so no phase "
        f"hits backpressure), "
        + (
            "drains off (store held unreachable: drains wait, as in the reference)"
            if args.drain == "off"
            else f"drains on: Z4J_DRAIN_WORKERS={args.drain_workers} into the SQLite store"
        )
    )
    failures = []

    def phase(
        name: str, make_server: Callable[[], Any], start_client: Any, clients: int
    ) -> dict[str, float]:
        server = make_server()
        try:
            result = run_load(
                server.pid,
                lambda t0, t1, t2, out: _start(ctx, start_client(server.port, t0, t1, t2, out)),
                clients,
                args.warmup,
                args.duration,
            )
        finally:
            server.stop()
        if isinstance(server, Brain):
            try:
                durable = server.durable_payloads()
                result["durable"] = durable
                if durable < result["acked_total"]:
                    failures.append(
                        f"{name}: {result['acked_total']} acknowledged, only {durable} durable"
                    )
            finally:
                server.cleanup()
        err = f", {result['errors']:.0f} errors" if result["errors"] else ""
        print(
            f"    {name:<44} {result['rate']:>9,.0f} payloads/s"
            f"  (server CPU {result['server_cpu']:.2f} cores{err})",
            flush=True,
        )
        return result

    def brain() -> Brain:
        return Brain(args)

    if args.only in (None, "a"):
        print(
            f"(a) NightOwl load: {args.clients} client processes, closed loop, "
            f"a new connection per payload"
        )

        def nc(port: int, t0: float, t1: float, t2: float, out: Any) -> tuple[Any, ...]:
            return (new_connection_client, (port, frames, t0, t1, t2, out))

        bare = phase("bare Trio accept-read-reply server", BareServer, nc, args.clients)
        floor = phase(
            "same, replying after an fdatasync'd append",
            lambda: BareServer(durable=True),
            nc,
            args.clients,
        )
        z4j = phase("z4j brain, durable 2:OK", brain, nc, args.clients)
        ratio = z4j["rate"] / bare["rate"]
        verdict = "PASS" if ratio >= 0.8 else "FAIL"
        print(f"    ratio brain / bare: {ratio:.2f}   (target >= 0.80: {verdict})")
        print(
            f"    for reference: durable bare / bare {floor['rate'] / bare['rate']:.2f}, "
            f"brain / durable bare {z4j['rate'] / floor['rate']:.2f}"
        )
        if ratio < 0.8:
            failures.append(f"(a) ratio {ratio:.2f} < 0.80")

    if args.only in (None, "b"):
        print(
            f"(b) persistent connections: {args.persistent_clients} client processes x "
            f"{args.connections} connections, pipelined window {args.window} frames"
        )

        def pc(port: int, t0: float, t1: float, t2: float, out: Any) -> tuple[Any, ...]:
            return (
                persistent_client,
                (port, frames, args.window, args.connections, t0, t1, t2, out),
            )

        bare = phase("bare Trio accept-read-reply server", BareServer, pc, args.persistent_clients)
        z4j = phase("z4j brain, durable 2:OK", brain, pc, args.persistent_clients)
        ratio = z4j["rate"] / bare["rate"]
        verdict = "PASS" if z4j["rate"] >= 30_000 else "FAIL"
        print(
            f"    ratio brain / bare: {ratio:.2f};  brain {z4j['rate']:,.0f} durable payloads/s "
            f"(target >= 30,000 per process: {verdict})"
        )
        if z4j["rate"] < 30_000:
            failures.append(f"(b) {z4j['rate']:,.0f} < 30,000 payloads/s")

    for failure in failures:
        print(f"MISSED: {failure}")
    return 1 if failures else 0


def _start(ctx: Any, spec: tuple[Any, ...]) -> mp.Process:
    target, target_args = spec
    proc: mp.Process = ctx.Process(target=target, args=target_args, daemon=True)
    proc.start()
    return proc


if __name__ == "__main__":
    raise SystemExit(main())
