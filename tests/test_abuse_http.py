"""The HTTP port under abuse, at small scale: one client must not stop the brain.

Slow bodies and trickling heads are closed by the read timeout; past
Z4J_HTTP_MAX_CONNECTIONS a connection gets 503; a flood of connections in a
brain with few descriptors leaves ingest and health working; running out of
descriptors logs a line now and then, not a traceback storm; readiness
failures name the check, never the raw error. Throughout, the watcher of
`z4j.testing.abuse` times a well-behaved client against a 100 ms budget.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from z4j import _net
from z4j._fds import fit_connection_caps
from z4j.brain.http.server import HealthChecks, build_app, serve_http
from z4j.stats import HttpStats
from z4j.testing.abuse import assert_served, health_live, ingest_ping, watch, watching
from z4j.testing.brain import http_get, make_config, running_brain, wait_until

# -- helpers --------------------------------------------------------------------


class KeepAlive:
    """One HTTP/1.1 connection kept open: GET /health/live on it, again and again."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.data = b""

    async def probe(self) -> None:
        await self.stream.send_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        while b'{"status":"live"}' not in self.data:
            chunk = await self.stream.receive_some(65536)
            assert chunk, "the brain closed the kept-alive connection"
            self.data += chunk
        assert self.data.startswith(b"HTTP/1.1 200")
        self.data = self.data.split(b'{"status":"live"}', 1)[1]


async def started(http: tuple[str, int]) -> None:
    """Wait until the brain is ready: what it does while starting is not measured here."""

    async def ready() -> bool:
        return (await http_get(http, "/health/ready"))[0] == 200

    await wait_until(ready)


async def read_until_closed(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    try:
        while chunk := await stream.receive_some(65536):
            data += chunk
    except trio.BrokenResourceError:  # a reset is a close too
        pass
    return data


# -- read timeout ----------------------------------------------------------------


async def test_bodies_that_never_come_are_closed_and_others_served(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", http_read_timeout_seconds=0.5)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            await started(http)
            closed = 0

            async def slow_body() -> None:
                nonlocal closed
                stream = await trio.open_tcp_stream(*http)
                async with stream:
                    await stream.send_all(
                        b"POST /api/v1/session HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
                    )
                    await read_until_closed(stream)  # never sending the rest
                closed += 1

            probes = {"live": health_live(http), "ping": ingest_ping(brain.ingest)}
            async with watching(probes) as latencies, trio.open_nursery() as slow:
                for _ in range(50):
                    slow.start_soon(slow_body)
    assert closed == 50
    assert_served(latencies)


async def test_a_trickling_head_is_closed_at_the_read_timeout(tmp_path: Path) -> None:
    # One byte every 20 ms: never idle for long, and the whole head would
    # take longer than the 0.5 s the brain allows it.
    head = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 60 + b"\r\n\r\n"
    config = make_config(tmp_path / "data", http_read_timeout_seconds=0.5)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            stream = await trio.open_tcp_stream(*brain.addresses.http)
            sent = 0
            async with stream:
                reply = b""
                try:
                    for byte in head:
                        await stream.send_all(bytes([byte]))
                        sent += 1
                        with trio.move_on_after(0.02):
                            reply = await stream.receive_some(100)
                            break  # closed (b"") or answered
                    else:
                        reply = await stream.receive_some(100)
                except trio.BrokenResourceError:
                    pass  # closed with our bytes unread: a reset
            assert reply == b"", "a trickled head was answered"
            assert sent < len(head)


# -- connection cap -------------------------------------------------------------


@asynccontextmanager
async def http_server(tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[int, HttpStats]]:
    config = make_config(tmp_path / "data", **overrides)
    stats, shutdown = HttpStats(), trio.Event()
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(
            lambda task_status: serve_http(
                config,
                build_app(HealthChecks()),
                shutdown=shutdown,
                stats=stats,
                task_status=task_status,
            )
        )
        yield port, stats
        shutdown.set()


async def test_past_the_cap_a_connection_gets_503_and_close(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with http_server(tmp_path, http_max_connections=3) as (port, stats):
            held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
            await wait_until(lambda: stats.connections_open == 3)
            extra = await trio.open_tcp_stream("127.0.0.1", port)
            async with extra:
                await extra.send_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
                reply = await read_until_closed(extra)
            assert reply.startswith(b"HTTP/1.1 503 ")
            assert b"\r\nconnection: close\r\n" in reply.lower()
            assert reply.endswith(b"too many connections, try later\n")
            assert stats.connections_refused == 1
            await held.pop().aclose()
            await wait_until(lambda: stats.connections_open == 2)
            status, _ = await http_get(("127.0.0.1", port), "/health/live")
            assert status == 200
            for stream in held:
                await stream.aclose()


# -- accepting when out of descriptors ------------------------------------------


class _OutOfDescriptors(trio.abc.Listener[trio.SocketStream]):
    """A listener whose every accept fails with EMFILE."""

    def __init__(self) -> None:
        self.attempts = 0

    async def accept(self) -> trio.SocketStream:
        self.attempts += 1
        await trio.lowlevel.checkpoint()
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    async def aclose(self) -> None:
        pass


async def test_emfile_on_accept_logs_a_line_now_and_then_not_tracebacks(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    listener = _OutOfDescriptors()

    async def never(stream: trio.SocketStream) -> None:
        raise AssertionError("nothing was accepted")

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(60):  # a minute out of descriptors
                await _net.serve_listener(
                    listener, never, handler_nursery=nursery, name="test", max_active=10
                )
    lines = [r for r in caplog.records if "EMFILE" in r.getMessage()]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert 2 <= len(lines) <= 60 / _net.LOG_INTERVAL_SECONDS + 1
    assert listener.attempts >= 60 / _net.BACKOFF_MAX_SECONDS  # still trying
    counts = [re.search(r"failed (\d+) time", r.getMessage()) for r in lines]
    assert all(counts)
    assert sum(int(m[1]) for m in counts if m) <= listener.attempts


# -- descriptors shared between the ports ----------------------------------------


def test_caps_fit_the_descriptor_limit_with_a_reserve(tmp_path: Path) -> None:
    config = make_config(tmp_path, http_max_connections=10_000, ingest_max_connections=10_000)
    assert fit_connection_caps(config, 1_000_000) == config
    fitted = fit_connection_caps(config, 1024)
    used = fitted.http_max_connections + fitted.ingest_max_connections + 2 * _net.REFUSAL_SLOTS
    assert used <= 1024 - max(102, 64 + config.db_pool_size)
    assert fitted.http_max_connections == fitted.ingest_max_connections
    # A port that asks for little leaves the rest to the other.
    small = fit_connection_caps(
        make_config(tmp_path, http_max_connections=50, ingest_max_connections=10_000), 1024
    )
    assert small.http_max_connections == 50
    assert small.ingest_max_connections > fitted.ingest_max_connections


_READY = re.compile(rb"ready: ingest ([\d.]+):(\d+), http ([\d.]+):(\d+)")
NOFILE = 256


def _low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


def _start_brain(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Any, Any]:
    """`z4j brain` with `NOFILE` descriptors; the process and its ingest and HTTP addresses."""
    log_path = tmp_path / "brain.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("Z4J_")}
    env.update(
        Z4J_DATA_DIR=str(tmp_path / "data"),
        Z4J_HTTP_BIND="127.0.0.1:0",
        Z4J_INGEST_BIND="127.0.0.1:0",
        Z4J_SHUTDOWN_GRACE_SECONDS="2",
    )
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "z4j", "brain"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=_low_nofile,
        )
    deadline = time.monotonic() + 30
    while not (ready := _READY.search(log_path.read_bytes())):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise AssertionError(log_path.read_text())
        time.sleep(0.05)
    return proc, (ready[1].decode(), int(ready[2])), (ready[3].decode(), int(ready[4]))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


async def test_a_connection_flood_on_http_leaves_ingest_and_health_working(
    tmp_path: Path,
) -> None:
    """A `z4j brain` process with 256 descriptors and the default caps of 10,000."""
    proc, ingest, http = await trio.to_thread.run_sync(_start_brain, tmp_path)
    try:
        with trio.fail_after(60):
            latencies, refused, flood = await _flood(http, ingest)
    finally:
        await trio.to_thread.run_sync(_stop, proc)
    text = (tmp_path / "brain.log").read_text()
    assert refused >= flood - NOFILE, (refused, text[-3000:])
    assert_served(latencies)
    assert "Traceback" not in text, text[-3000:]
    assert len(text.splitlines()) < 40, text[-3000:]  # no storm of any kind
    assert "connection caps lowered" in text


async def _flood(
    http: tuple[str, int], ingest: tuple[str, int]
) -> tuple[dict[str, list[float]], int, int]:
    """Open more idle HTTP connections than the brain has descriptors, probing throughout.

    Returns the probes' latencies, how many flood connections were answered
    503, and how many were opened.
    """
    await started(http)
    flood = NOFILE + 100
    refused = 0
    stop = trio.Event()
    keep = KeepAlive(await trio.open_tcp_stream(*http))  # opened before the flood
    latencies: dict[str, list[float]] = {}

    async def idle_connection(opened: trio.Event) -> None:
        nonlocal refused
        with trio.move_on_after(30):  # past that it is still waiting, neither served nor refused
            stream = await trio.open_tcp_stream(*http)
            opened.set()
            async with stream:
                if (await read_until_closed(stream)).startswith(b"HTTP/1.1 503"):
                    refused += 1
        opened.set()

    async def watcher(task_status: trio.TaskStatus[None]) -> None:
        probes = {"live": keep.probe, "ping": ingest_ping(ingest)}
        await keep.probe()
        task_status.started()
        latencies.update(await watch(probes, stop=stop))

    async with keep.stream, trio.open_nursery() as nursery:
        await nursery.start(watcher)
        async with trio.open_nursery() as connections:
            for _ in range(flood):
                opened = trio.Event()
                connections.start_soon(idle_connection, opened)
                await opened.wait()
            await wait_until(lambda: refused >= flood - NOFILE, timeout=20)
            # New ingest connections and health still work with HTTP full.
            await trio.sleep(1.0)
            connections.cancel_scope.cancel()
        stop.set()
    return latencies, refused, flood


# -- readiness bodies -----------------------------------------------------------


async def test_readiness_names_the_check_never_the_raw_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "/var/lib/z4j/store.sqlite3 host=db.internal user=z4j_admin"

    async def failing() -> str | None:
        raise RuntimeError(f"could not open {secret}")

    async def fine() -> str | None:
        return None

    health = HealthChecks()
    health.add("store", failing)
    health.add("buffer", fine)
    config = make_config(tmp_path / "data")
    shutdown = trio.Event()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            _, port = await nursery.start(
                lambda task_status: serve_http(
                    config, build_app(health), shutdown=shutdown, task_status=task_status
                )
            )
            status, body = await http_get(("127.0.0.1", port), "/health/ready")
            shutdown.set()
    assert status == 503
    assert orjson.loads(body) == {
        "status": "not_ready",
        "checks": {"buffer": "ok", "store": "unavailable"},
    }
    assert secret in caplog.text  # the operator still learns why


async def test_concurrent_readiness_probes_share_one_run_of_the_checks() -> None:
    """A flood of probes while the store check is slow runs it once, not once
    per probe: each run holds a store connection the drains need."""
    entered = 0
    release = trio.Event()

    async def slow_store() -> str | None:
        nonlocal entered
        entered += 1
        await release.wait()
        return None

    health = HealthChecks({"store": slow_store})
    verdicts: list[dict[str, str]] = []

    async def probe() -> None:
        verdicts.append(await health.run())

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(probe)
            await wait_all_tasks_blocked()
            assert entered == 1
            release.set()
    assert verdicts == [{"store": "ok"}] * 50
    # A probe after that run has ended gets a run of its own.
    assert await health.run() == {"store": "ok"}
    assert entered == 2


async def test_a_probe_whose_caller_went_away_does_not_leave_the_others_without_verdicts() -> None:
    """The caller that started a run is cancelled mid-run (its client hung up):
    those waiting for that run start another, and all get its verdicts."""
    entered = 0
    release = trio.Event()

    async def slow_store() -> str | None:
        nonlocal entered
        entered += 1
        if entered == 1:
            await trio.sleep_forever()
        await release.wait()
        return "down"

    health = HealthChecks({"store": slow_store})
    got: list[dict[str, str]] = []
    first = trio.CancelScope()

    async def first_probe() -> None:
        with first:
            await health.run()

    async def probe() -> None:
        got.append(await health.run())

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first_probe)
            await wait_all_tasks_blocked()
            nursery.start_soon(probe)
            nursery.start_soon(probe)
            await wait_all_tasks_blocked()
            assert entered == 1
            first.cancel()
            await wait_all_tasks_blocked()
            assert entered == 2
            release.set()
    assert got == [{"store": "down"}] * 2
