"""TLS on the HTTP port, and the warning when it is public without it.

Certificates come from trustme (a throwaway CA per test); the clients are
real ones (httpx, websockets, both in a thread) that verify them.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trustme
from websockets.sync.client import connect

from z4j.brain.http.server import serve_http, tls_context
from z4j.config import ConfigError
from z4j.stats import HttpStats
from z4j.testing.brain import make_config, running_brain, wait_until

Scope = dict[str, Any]


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> dict[str, Any]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return {"tls_cert_file": cert_file, "tls_key_file": key_file}


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def echo_scheme(scope: Scope, receive: Any, send: Any) -> None:
    """HTTP and WebSocket alike: answer with the scope's scheme."""
    if scope["type"] == "http":
        body = scope["scheme"].encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
        return
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": scope["scheme"]})
    await receive()


@asynccontextmanager
async def server(
    tmp_path: Path, stats: HttpStats | None = None, **overrides: Any
) -> AsyncIterator[int]:
    config = make_config(tmp_path / "data", **overrides)
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(
            lambda task_status: serve_http(
                config,
                echo_scheme,
                shutdown=shutdown,
                websockets={"/ws/echo": echo_scheme},
                stats=stats,
                task_status=task_status,
            )
        )
        yield port
        shutdown.set()


async def test_https_and_wss_are_served_and_scopes_say_so(
    tmp_path: Path, ca: trustme.CA, tls_files: dict[str, Any]
) -> None:
    context = client_context(ca)

    def https(port: int) -> tuple[int, str]:
        with httpx.Client(verify=context) as client:
            response = client.get(f"https://127.0.0.1:{port}/anything")
            return response.status_code, response.text

    def wss(port: int) -> str:
        with connect(f"wss://127.0.0.1:{port}/ws/echo", ssl=context) as ws:
            return str(ws.recv(timeout=60))

    with trio.fail_after(20):
        async with server(tmp_path, **tls_files) as port:
            assert await trio.to_thread.run_sync(https, port) == (200, "https")
            assert await trio.to_thread.run_sync(wss, port) == "wss"
        async with server(tmp_path) as port:  # and without TLS, plain schemes
            with httpx.Client() as client:
                response = await trio.to_thread.run_sync(
                    client.get, f"http://127.0.0.1:{port}/anything"
                )
            assert response.text == "http"


async def test_a_brain_serves_health_over_tls(
    tmp_path: Path, ca: trustme.CA, tls_files: dict[str, Any]
) -> None:
    config = make_config(tmp_path / "data", **tls_files)
    context = client_context(ca)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            host, port = brain.addresses.http

            def get() -> httpx.Response:
                with httpx.Client(verify=context) as client:
                    return client.get(f"https://{host}:{port}/health/live")

            response = await trio.to_thread.run_sync(get)
    assert response.status_code == 200
    assert response.json() == {"status": "live"}


async def test_a_client_that_never_handshakes_is_closed_at_the_read_timeout(
    tmp_path: Path, tls_files: dict[str, Any]
) -> None:
    with trio.fail_after(60):
        async with server(tmp_path, http_read_timeout_seconds=0.3, **tls_files) as port:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                assert await stream.receive_some(100) == b""


@pytest.mark.parametrize("only", ["tls_cert_file", "tls_key_file"])
def test_one_tls_file_without_the_other_is_refused_naming_both(
    tmp_path: Path, tls_files: dict[str, Any], only: str
) -> None:
    config = make_config(tmp_path / "data", **{only: tls_files[only]})
    with pytest.raises(ConfigError, match="Z4J_TLS_CERT_FILE and Z4J_TLS_KEY_FILE"):
        tls_context(config)


def test_unreadable_tls_files_are_a_config_error_naming_them(tmp_path: Path) -> None:
    config = make_config(
        tmp_path / "data", tls_cert_file=tmp_path / "nope.pem", tls_key_file=tmp_path / "nope.key"
    )
    with pytest.raises(ConfigError, match=r"Z4J_TLS_CERT_FILE=.*nope\.pem"):
        tls_context(config)


@pytest.mark.parametrize(
    ("bind", "tls", "warned"),
    [("0.0.0.0:0", False, True), ("0.0.0.0:0", True, False), ("127.0.0.1:0", False, False)],
)
async def test_a_public_bind_without_tls_warns_loudly(
    tmp_path: Path,
    tls_files: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
    bind: str,
    tls: bool,
    warned: bool,
) -> None:
    caplog.set_level(logging.WARNING, logger="z4j.http")
    with trio.fail_after(60):
        async with server(tmp_path, http_bind=bind, **(tls_files if tls else {})):
            pass
    warnings = [r for r in caplog.records if "WITHOUT TLS" in r.getMessage()]
    assert len(warnings) == warned
    assert all(r.levelno == logging.WARNING for r in warnings)


async def test_past_the_cap_a_tls_client_reads_the_503(
    tmp_path: Path, ca: trustme.CA, tls_files: dict[str, Any]
) -> None:
    context = client_context(ca)

    def get(port: int) -> httpx.Response:
        with httpx.Client(verify=context) as client:
            return client.get(f"https://127.0.0.1:{port}/anything")

    with trio.fail_after(20):
        stats = HttpStats()
        async with server(tmp_path, stats, http_max_connections=1, **tls_files) as port:
            held = await trio.open_tcp_stream("127.0.0.1", port)  # the one slot
            async with held:
                await wait_until(lambda: stats.connections_open == 1)
                response = await trio.to_thread.run_sync(get, port)
    assert response.status_code == 503
    assert response.headers["connection"] == "close"
