"""The brain's HTTP port: hypercorn for HTTP, z4j.brain.http.websocket for WebSockets.

`serve_http` accepts connections itself and reads each one's request head:
WebSocket upgrades to a known path (``/ws/agent``) are served by the lean
wsproto connection of `z4j.brain.http.websocket`, one task each, because thousands of
idle agents sit on them; everything else is handed, bytes replayed, to
hypercorn's Trio connection class and the ASGI app of `build_app`
(``/health/live``, ``/health/ready``, ``/metrics``, the dashboard, the
REST API under ``/api/v1/`` and OpAMP's ``/v1/opamp``).

Every connection holds a descriptor and a slot under
Z4J_HTTP_MAX_CONNECTIONS (agents' WebSockets too); past it a connection is
answered 503 at once. Heads (and a TLS handshake) must arrive whole within
Z4J_HTTP_READ_TIMEOUT_SECONDS, and each read of a body within it again, so
a client that stops sending gives its slot back. With Z4J_TLS_CERT_FILE and
Z4J_TLS_KEY_FILE the port speaks only TLS, and scopes say ``https``/``wss``.
"""

from __future__ import annotations

import hmac
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import attrs
import orjson
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app

from ..._net import REFUSAL_SLOTS, open_tcp_socket, serve_listener
from ..._tls import server_tls_context
from ...config import Config, is_loopback_bind, parse_networks
from ...logs import bind_log_context
from ...protocol.close import CloseCode
from ...stats import HttpStats, ThrottledLog
from .access_log import with_request_context
from .auth import credentials
from .proxies import TrustedProxies, behind_proxies
from .request_metrics import measured
from .websocket import Handler, serve_websocket

__all__ = ["HealthChecks", "build_app", "serve_http"]

log = logging.getLogger("z4j.http")

METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
MAX_HEAD_BYTES = 16384
# A refusal (503) gets this long, TLS handshake included, to go out and
# let the peer hang up.
REFUSE_SECONDS = 1.0
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n"
    b"content-length: 32\r\nretry-after: 5\r\nconnection: close\r\n\r\n"
    b"too many connections, try later\n"
)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class HealthChecks:
    """What readiness means: each check returns None when fine, else why not.

    /health/ready is open to anyone who reaches the port, so a check
    returns a reason of its own wording; an exception it raises (a store
    error with file paths, or libpq's host and user) is logged, throttled,
    and the caller reads only ``"unavailable"``. For the same reason the
    checks run once at a time: callers that ask while a run is under way
    share its verdicts, so a flood of anonymous probes holds one store
    connection, not the pool the drains and the API need.
    """

    def __init__(
        self,
        checks: Mapping[str, Callable[[], Awaitable[str | None]]] | None = None,
        *,
        notes: Mapping[str, Callable[[], str | None]] | None = None,
    ) -> None:
        """``checks``: by name, each from the module that owns what it checks.
        ``notes``: by name, conditions that degrade the brain without making
        it unready (a read replica behind: the primary serves its reads);
        each returns why, or None. They read state in memory: no I/O."""
        self._checks: dict[str, Callable[[], Awaitable[str | None]]] = dict(checks or {})
        self._notes: dict[str, Callable[[], str | None]] = dict(notes or {})
        self._log = ThrottledLog(log)
        # The verdicts of the last run, for /metrics (which runs them first).
        self.last: dict[str, str] = {}
        self._running: _Run | None = None

    def add(self, name: str, check: Callable[[], Awaitable[str | None]]) -> None:
        self._checks[name] = check

    async def run(self, per_check_seconds: float = 2.0) -> dict[str, str]:
        """Every check's verdict: ``"ok"`` or the reason it failed. A call made
        while a run is under way gets that run's verdicts."""
        while self._running is not None:
            running = self._running
            await running.done.wait()
            if running.verdicts is not None:
                return running.verdicts
            # Its caller was cancelled before the checks ended: run them here.
        running = self._running = _Run()
        try:
            running.verdicts = await self._run(per_check_seconds)
            return running.verdicts
        finally:
            self._running = None
            running.done.set()

    async def _run(self, per_check_seconds: float) -> dict[str, str]:
        results: dict[str, str] = {}

        async def one(name: str, check: Callable[[], Awaitable[str | None]]) -> None:
            with trio.move_on_after(per_check_seconds) as scope:
                try:
                    problem = await check()
                except Exception as exc:
                    self._log.warning(
                        name, "readiness check %s failed: %s: %s", name, type(exc).__name__, exc
                    )
                    problem = "unavailable"
            if scope.cancelled_caught:
                problem = f"no answer within {per_check_seconds:g} s"
            results[name] = problem or "ok"

        async with trio.open_nursery() as nursery:
            for name, check in self._checks.items():
                nursery.start_soon(one, name, check)
        self.last = dict(sorted(results.items()))
        return self.last

    def degraded(self) -> dict[str, str]:
        """The notes that apply now, by name (empty when none does)."""
        found = {name: note() for name, note in sorted(self._notes.items())}
        return {name: why for name, why in found.items() if why is not None}


@attrs.define
class _Run:
    """A run of the readiness checks that others may wait for."""

    done: trio.Event = attrs.Factory(trio.Event)
    verdicts: dict[str, str] | None = None


async def _json(
    send: Send, status: int, body: object, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    payload = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"cache-control", b"no-store"),
                *(headers or ()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def _bearer_is(scope: Scope, key: bytes) -> bool:
    """Does the request carry ``Authorization: Bearer <key>``? Compared in
    constant time, so a guess learns nothing from how long it took."""
    token, _ = credentials(scope["headers"])
    return token is not None and hmac.compare_digest(token.encode("latin-1"), key)


Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]
# Serves a dashboard file for ``path``; False if there is none.
Pages = Callable[[Scope, Receive, Send, str], Awaitable[bool]]


def build_app(
    health: HealthChecks,
    *,
    metrics: Callable[[], bytes] | None = None,
    api: Asgi | None = None,
    pages: Pages | None = None,
    opamp: Asgi | None = None,
    stats: HttpStats | None = None,
    metrics_token: str | None = None,
) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The brain's ASGI app for plain HTTP (WebSockets are `serve_http`'s).

    ``metrics`` renders the Prometheus text served at ``/metrics``; ``api``
    serves ``/api/v1/``; ``opamp`` serves ``/v1/opamp`` (OpAMP over plain
    HTTP, bearer-authenticated by its own tokens); ``pages`` serves the dashboard's files (the page
    itself only to a signed-in session: `dashboard_page` checks the file it
    resolved, whatever path named it). Health is open, for probes; so are
    metrics, for scrapers, unless ``metrics_token`` (Z4J_METRICS_TOKEN) asks
    for it as a bearer token. A scrape runs the readiness checks first, so
    ``z4j_ready`` is as fresh as the scrape. ``stats`` counts requests by
    route template (request_metrics.py).
    """

    scrape_key = None if metrics_token is None else metrics_token.encode()

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
            # Only a WebSocket upgrade on a reused keep-alive connection gets
            # here; agents open a fresh connection, served by z4j.brain.http.websocket.
            await send({"type": "websocket.close", "code": CloseCode.POLICY_VIOLATION})
            return
        if scope["type"] == "http" and api is not None and scope["path"].startswith("/api/v1/"):
            await api(scope, receive, send)
            return
        if scope["type"] == "http" and opamp is not None and scope["path"] == "/v1/opamp":
            await opamp(scope, receive, send)
            return
        if (
            scope["type"] == "http"
            and pages is not None
            and scope["method"] in ("GET", "HEAD")
            and scope["path"] not in ("/metrics", "/health/live", "/health/ready")
            and await pages(scope, receive, send, scope["path"])
        ):
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if scope["method"] not in ("GET", "HEAD"):
            await _json(send, 405, {"error": "method_not_allowed", "message": "use GET"})
        elif path == "/metrics" and metrics is not None:
            if scrape_key is not None and not _bearer_is(scope, scrape_key):
                await _json(
                    send,
                    401,
                    {"error": "unauthorized", "message": "/metrics needs its bearer token"},
                    headers=[(b"www-authenticate", b'Bearer realm="metrics"')],
                )
                return
            await health.run()
            body = metrics()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", METRICS_CONTENT_TYPE),
                        (b"content-length", str(len(body)).encode()),
                        (b"cache-control", b"no-store"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
        elif path == "/health/live":
            await _json(send, 200, {"status": "live"})
        elif path == "/health/ready":
            checks = await health.run()
            ready = all(v == "ok" for v in checks.values())
            verdict: dict[str, object] = {
                "status": "ready" if ready else "not_ready",
                "checks": checks,
            }
            degraded = health.degraded()
            if degraded:
                verdict["degraded"] = degraded
            await _json(send, 200 if ready else 503, verdict)
        else:
            await _json(send, 404, {"error": "not_found", "message": f"no route for {path}"})

    return app if stats is None else measured(app, stats)


def tls_context(config: Config) -> ssl.SSLContext | None:
    """The HTTP port's TLS context from Z4J_TLS_CERT_FILE/Z4J_TLS_KEY_FILE; None without them."""
    return server_tls_context(config, alpn=["http/1.1"])  # hypercorn's h2 is not routed here


async def serve_http(
    config: Config,
    app: Callable[[Scope, Receive, Send], Awaitable[None]],
    *,
    shutdown: trio.Event,
    websockets: Mapping[str, Handler] | None = None,
    stats: HttpStats | None = None,
    sock: socket.socket | None = None,
    bind_setting: str = "Z4J_HTTP_BIND",
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve Z4J_HTTP_BIND (or ``sock``, a listening socket this closes) until ``shutdown`` is set.
    ``bind_setting`` names the setting the listener comes from
    (``Z4J_OPAMP_BIND`` for OpAMP's own port).

    Each new connection's request head is read here first: a WebSocket
    upgrade to a path in ``websockets`` is served by the lean wsproto
    connection of `z4j.brain.http.websocket`; everything else goes to hypercorn
    (replaying the bytes read) and ``app``. At shutdown, WebSocket peers
    get 1001 at once (agents reconnect elsewhere) and HTTP requests in
    flight get half the grace period to finish.
    """
    websockets = dict(websockets or {})
    stats = stats if stats is not None else HttpStats()
    tls = tls_context(config)
    bind = config.opamp_bind if bind_setting == "Z4J_OPAMP_BIND" else config.http_bind
    assert bind is not None
    if tls is None and not is_loopback_bind(bind):
        log.warning(
            "%s=%s is reachable beyond this machine WITHOUT TLS: tokens, session cookies "
            "and agent traffic cross the network in clear text. Set Z4J_TLS_CERT_FILE and "
            "Z4J_TLS_KEY_FILE, or serve behind a TLS-terminating proxy",
            bind_setting,
            bind,
        )
    timeout = config.http_read_timeout_seconds
    cap = config.http_max_connections
    refusals = ThrottledLog(log)
    if sock is None:
        sock = open_tcp_socket(bind, reuse_port=config.so_reuseport)
    address: tuple[str, int] = sock.getsockname()[:2]
    hc = HypercornConfig()
    hc.graceful_timeout = max(0.1, config.shutdown_grace_seconds / 2)
    # Per read: a body that stops coming frees its connection. (Typed int
    # in hypercorn; any number works, it goes to trio.fail_after.)
    hc.read_timeout = timeout  # type: ignore[assignment]
    hc.accesslog = None
    hc.websocket_max_message_size = config.ws_max_frame_bytes
    hc.errorlog = logging.getLogger("z4j.http.server")
    hc.set_statsd_logger_class(StatsdLogger)
    # Outermost, so that the access log and every route see the client a
    # trusted proxy forwarded (proxies.py).
    proxies = TrustedProxies(parse_networks(config.trusted_proxies or ""))
    app = behind_proxies(with_request_context(app, access_log=config.http_access_log), proxies)
    websockets = {path: behind_proxies(handler, proxies) for path, handler in websockets.items()}
    asgi = wrap_app(cast(Any, app), hc.wsgi_max_body_size, "asgi")
    context = WorkerContext(None)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    ws_scopes: set[trio.CancelScope] = set()  # cancelled at once at shutdown

    async def connection(stream: trio.SocketStream) -> None:
        # serve_listener closes the stream when this returns. What goes
        # wrong on one connection (a peer resetting it, say) ends that
        # connection, never the server.
        bind_log_context(peer=_peer_of(stream))  # this task and those it starts serve this peer
        stats.connections_total += 1
        try:
            if stats.connections_open >= cap:
                stats.connections_refused += 1
                refusals.warning(
                    "refused",
                    "http: refused a connection with 503: %d open (Z4J_HTTP_MAX_CONNECTIONS)",
                    stats.connections_open,
                )
                await _refuse(stream, tls)
                return
            stats.connections_open += 1
            try:
                await route(stream)
            finally:
                stats.connections_open -= 1
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("http connection ended: %s", exc)
        except Exception:
            log.exception("http connection failed")

    async def route(raw: trio.SocketStream) -> None:
        secure = None if tls is None else trio.SSLStream(raw, tls, server_side=True)
        stream: trio.abc.Stream = raw if secure is None else secure
        head = b""
        # The handshake and the whole head within one read timeout: a
        # client that trickles them cannot keep its slot any longer.
        with trio.move_on_after(timeout):
            if secure is not None:
                await secure.do_handshake()
            head = await _read_head(stream)
        if not head:
            return
        path = _websocket_path(head)
        handler = websockets.get(path) if path else None
        if handler is not None:
            with trio.CancelScope() as scope:
                ws_scopes.add(scope)
                try:
                    await serve_websocket(
                        stream,
                        head,
                        handler,
                        # A handler may set its own limit (OpAMP's is larger).
                        max_message=getattr(
                            handler, "max_message_bytes", config.ws_max_frame_bytes
                        ),
                        client=raw.socket.getpeername()[:2],
                        secure=secure is not None,
                    )
                finally:
                    ws_scopes.discard(scope)
        elif path is not None:
            with trio.move_on_after(timeout):
                await _no_websocket_here(stream, sorted(websockets))
        else:
            replay = _Replay(raw, head) if secure is None else _TlsReplay(raw, secure, head)
            await TCPServer(asgi, hc, context, ConnectionState({}), cast(Any, replay)).run()

    async with trio.open_nursery() as handlers:
        log.info("http listening on %s:%d", *address)
        async with trio.open_nursery() as accepting:
            accepting.start_soon(
                lambda: serve_listener(
                    listener,
                    connection,
                    handler_nursery=handlers,
                    name="http",
                    max_active=cap + REFUSAL_SLOTS,
                )
            )
            task_status.started(address)
            await shutdown.wait()
            accepting.cancel_scope.cancel()
        for scope in list(ws_scopes):
            scope.cancel()
        await context.terminated.set()  # idle keep-alive connections close
        handlers.cancel_scope.deadline = trio.current_time() + hc.graceful_timeout


def _peer_of(stream: trio.SocketStream) -> str:
    """``host:port`` of the peer, for log lines."""
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"


async def _refuse(stream: trio.SocketStream, tls: ssl.SSLContext | None) -> None:
    """Answer 503 and hang up, within `REFUSE_SECONDS` whatever the peer does."""
    with trio.move_on_after(REFUSE_SECONDS):
        if tls is None:
            await stream.send_all(REFUSAL)
            # Half-close, then read what the peer sent until it hangs up:
            # closing on unread bytes would reset the connection, and a
            # reset can destroy the answer before the peer reads it.
            await stream.send_eof()
            while await stream.receive_some(MAX_HEAD_BYTES):
                pass
        else:
            secure = trio.SSLStream(stream, tls, server_side=True)
            await secure.do_handshake()
            await secure.send_all(REFUSAL)
            while await secure.receive_some(MAX_HEAD_BYTES):
                pass


async def _read_head(stream: trio.abc.ReceiveStream) -> bytes:
    """The bytes up to the end of the first request head (b"" if the peer hung up)."""
    data = b""
    while b"\r\n\r\n" not in data and len(data) <= MAX_HEAD_BYTES:
        try:
            chunk = await stream.receive_some(MAX_HEAD_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""
        if not chunk:
            return data  # hypercorn answers what it can of a truncated request
        data += chunk
    return data


async def _no_websocket_here(stream: trio.abc.Stream, paths: list[str]) -> None:
    """Answer an upgrade to a path no WebSocket endpoint serves: 404, naming
    the paths that are served. (Passed on, it would become the 403 of an ASGI
    close before accept, which agents read as refused credentials.)"""
    body = orjson.dumps(
        {
            "error": "not_found",
            "message": f"no WebSocket endpoint at this path: {', '.join(paths) or 'none here'}",
        }
    )
    head = (
        b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n"
        b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body)
    )
    await stream.send_all(head + body)


def _websocket_path(head: bytes) -> str | None:
    """The path of a ``GET`` that asks to upgrade to WebSocket, else None."""
    lines = head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET":
        return None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"upgrade" and value.strip().lower() == b"websocket":
            return parts[1].split(b"?", 1)[0].decode("latin-1")
    return None


class _Replay(trio.abc.HalfCloseableStream):
    """A socket stream that first gives back bytes already read from it."""

    def __init__(self, stream: trio.SocketStream, prefix: bytes) -> None:
        self._stream: trio.abc.HalfCloseableStream = stream
        self._prefix = prefix
        self.socket = stream.socket  # hypercorn reads the addresses from it

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            return data
        return bytes(await self._stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


class _TlsReplay(_Replay):
    """`_Replay` over a TLS stream whose handshake is done.

    hypercorn recognises TLS by ``do_handshake``, ``selected_alpn_protocol``
    and ``transport_stream`` and then gives its scopes ``https``/``wss``.
    """

    def __init__(
        self, raw: trio.SocketStream, secure: trio.SSLStream[trio.SocketStream], prefix: bytes
    ) -> None:
        super().__init__(raw, prefix)
        self._stream = cast(Any, secure)
        self.transport_stream = raw

    async def do_handshake(self) -> None:
        """Done before the head was read."""

    def selected_alpn_protocol(self) -> str:
        return "http/1.1"

    async def send_eof(self) -> None:
        """TLS has no half-close; hypercorn closes the stream next."""
