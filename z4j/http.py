"""The brain's HTTP port, served by hypercorn's Trio worker.

For now: ``/health/live`` and ``/health/ready``. The dashboard, REST API,
``/metrics`` and the WebSocket endpoints mount on the same ASGI app as
they land.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

import orjson
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from .config import Config
from .ingest_server import open_tcp_socket

__all__ = ["HealthChecks", "build_app", "serve_http"]

log = logging.getLogger("z4j.http")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class HealthChecks:
    """What readiness means: each check returns None when fine, else why not."""

    def __init__(self) -> None:
        self._checks: dict[str, Callable[[], Awaitable[str | None]]] = {}

    def add(self, name: str, check: Callable[[], Awaitable[str | None]]) -> None:
        self._checks[name] = check

    async def run(self, per_check_seconds: float = 2.0) -> dict[str, str]:
        """Every check's verdict: ``"ok"`` or the reason it failed."""
        results: dict[str, str] = {}

        async def one(name: str, check: Callable[[], Awaitable[str | None]]) -> None:
            with trio.move_on_after(per_check_seconds) as scope:
                try:
                    problem = await check()
                except Exception as exc:
                    problem = f"{type(exc).__name__}: {exc}"
            if scope.cancelled_caught:
                problem = f"no answer within {per_check_seconds:g} s"
            results[name] = problem or "ok"

        async with trio.open_nursery() as nursery:
            for name, check in self._checks.items():
                nursery.start_soon(one, name, check)
        return dict(sorted(results.items()))


async def _json(send: Send, status: int, body: object) -> None:
    payload = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]


def build_app(
    health: HealthChecks, *, websockets: dict[str, Asgi] | None = None
) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The brain's ASGI app; ``websockets`` maps a path to its WebSocket handler."""
    websockets = websockets or {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "websocket":
            handler = websockets.get(scope["path"])
            if handler is None:
                await send({"type": "websocket.close", "code": 1008})
                return
            await handler(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if scope["method"] not in ("GET", "HEAD"):
            await _json(send, 405, {"error": "method_not_allowed", "message": "use GET"})
        elif path == "/health/live":
            await _json(send, 200, {"status": "live"})
        elif path == "/health/ready":
            checks = await health.run()
            ready = all(v == "ok" for v in checks.values())
            await _json(
                send,
                200 if ready else 503,
                {"status": "ready" if ready else "not_ready", "checks": checks},
            )
        else:
            await _json(send, 404, {"error": "not_found", "message": f"no route for {path}"})

    return app


async def serve_http(
    config: Config,
    app: Callable[[Scope, Receive, Send], Awaitable[None]],
    *,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on Z4J_HTTP_BIND until ``shutdown`` is set."""
    sock = open_tcp_socket(config.http_bind, reuse_port=config.so_reuseport)
    address: tuple[str, int] = sock.getsockname()[:2]
    hc = HypercornConfig()
    hc.graceful_timeout = max(0.1, config.shutdown_grace_seconds / 2)
    hc.accesslog = None
    hc.websocket_max_message_size = config.ws_max_frame_bytes
    hc.errorlog = logging.getLogger("z4j.http.server")
    sockets = Sockets(secure_sockets=[], insecure_sockets=[sock], quic_sockets=[])

    log.info("http listening on %s:%d", *address)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: worker_serve(
                    wrap_app(cast(Any, app), hc.wsgi_max_body_size, "asgi"),
                    hc,
                    sockets=sockets,
                    shutdown_trigger=shutdown.wait,
                    task_status=task_status,
                )
            )
            task_status.started(address)
    finally:
        sock.close()
