"""The hub's calls to its peer regions: HTTPS through httpx, bounded in time and bytes.

httpx runs on Trio (through httpcore's Trio backend), so a peer call is an
ordinary task of the request that needs it: the hub's routes
(brain/http/federation_api.py) open one nursery per request and ask every
region in it at once, each call under its own ``trio.move_on_after``
(Z4J_FEDERATION_TIMEOUT_MS) here. A slow or dead region costs a request at
most that deadline and shows as unreachable; the others are served. An
answer is read up to
Z4J_FEDERATION_MAX_RESPONSE_BYTES (decompressed) and no further, so a
hostile or broken peer can hold neither a request nor memory. Good answers
are kept briefly (Z4J_FEDERATION_CACHE_MS, cache.py).

TLS is verified against the system's CAs, or a peer's own ``ca`` file; the
environment's proxies and .netrc are not read (``trust_env=False``), so
where the token goes is what the configuration says. The token is sent in
the Authorization header and appears in no log line nor error message.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
from collections.abc import AsyncGenerator, Callable, Collection, Mapping
from typing import Any, Final, cast

import attrs
import httpx
import orjson
import trio

from ..._decimal import parse_decimal
from ..._federation_peers import Peer
from ..._version import __version__
from ...stats import FederationStats, ThrottledLog
from .cache import TtlCache

__all__ = ["Answer", "FederationClient"]

log = logging.getLogger("z4j.federation")

# Answers larger than this are parsed on a worker thread, not the Trio one.
PARSE_IN_THREAD_BYTES: Final = 256 * 1024
CACHE_ENTRIES: Final = 256
CACHE_BYTES: Final = 64 * 1024 * 1024
# Connections a hub keeps to one peer; more calls wait for one (within their deadline).
PEER_CONNECTIONS: Final = 16


@attrs.frozen(kw_only=True)
class Answer:
    """What one region said, or why it said nothing.

    ``answered``: an HTTP answer came within the deadline (``status``,
    ``body`` parsed JSON); ``ok``: a 2xx one. ``error`` says why not ok.
    ``seconds``: the round trip (None for a cached answer)."""

    region: str
    answered: bool
    status: int | None = None
    body: Any = None
    error: str | None = None
    seconds: float | None = None
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.answered and self.status is not None and 200 <= self.status < 300


class _TooLarge(Exception):
    pass


class FederationClient:
    """Calls to the configured peers; a service (`serve`) holds their connections."""

    def __init__(
        self,
        peers: Collection[Peer],
        stats: FederationStats,
        *,
        region: str,
        timeout_seconds: float,
        cache_seconds: float,
        max_response_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._peers = {p.name: p for p in peers}
        self._stats = stats
        self.region = region
        self.timeout_seconds = timeout_seconds
        self.max_response_bytes = max_response_bytes
        self._cache: TtlCache[Answer] = TtlCache(
            ttl=cache_seconds,
            max_entries=CACHE_ENTRIES,
            max_bytes=min(CACHE_BYTES, max(max_response_bytes * 4, 1)),
            clock=clock,
        )
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._log = ThrottledLog(log, interval=30.0)
        for name in self._peers:
            stats.peer_up.setdefault(name, 0)

    @property
    def peers(self) -> Mapping[str, Peer]:
        return self._peers

    def url(self, name: str) -> str:
        return self._peers[name].url

    async def serve(
        self,
        *,
        shutdown: trio.Event,
        task_status: trio.TaskStatus[FederationClient] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Hold a client (a connection pool) per peer until ``shutdown``, then close them."""
        async with contextlib.AsyncExitStack() as stack:
            for peer in self._peers.values():
                client = httpx.AsyncClient(
                    base_url=peer.url,
                    verify=_tls_context(peer),
                    trust_env=False,
                    follow_redirects=False,
                    timeout=httpx.Timeout(self.timeout_seconds),
                    limits=httpx.Limits(
                        max_connections=PEER_CONNECTIONS, max_keepalive_connections=4
                    ),
                    headers={
                        "authorization": f"Bearer {peer.token}",
                        "user-agent": f"z4j-federation/{__version__} (region {self.region})",
                        "accept": "application/json",
                    },
                )
                self._clients[peer.name] = await stack.enter_async_context(client)
            if self._peers:
                log.info(
                    "federation: %d peer region(s): %s",
                    len(self._peers),
                    ", ".join(f"{p.name}={p.url}" for p in self._peers.values()),
                )
            task_status.started(self)
            try:
                await shutdown.wait()
            finally:
                self._clients = {}

    async def get(self, name: str, path: str, query: Mapping[str, str]) -> Answer:
        key = (name, path, tuple(sorted(query.items())))
        cached = self._cache.get(key)
        if cached is not None:
            return attrs.evolve(cached, cached=True, seconds=None)
        answer, size = await self._call(name, "GET", path, query=query)
        self._stats.peer_up[name] = int(answer.ok)
        if answer.ok:
            self._cache.put(key, answer, size)
        return answer

    async def post(self, name: str, path: str, body: Mapping[str, Any]) -> Answer:
        """``POST path`` with a JSON body; never cached, never retried."""
        answer, _ = await self._call(name, "POST", path, body=body)
        if not answer.answered:
            self._stats.peer_up[name] = 0
        return answer

    async def _call(
        self,
        name: str,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> tuple[Answer, int]:
        client = self._clients.get(name)
        if client is None:
            return Answer(region=name, answered=False, error="not connected (stopping)"), 0
        started = trio.current_time()
        answer: Answer | None = None
        size = 0
        with trio.move_on_after(self.timeout_seconds):
            try:
                status, raw = await self._fetch(client, method, path, query, body)
                size = len(raw)
                parsed = await _parse(raw)
                answer = Answer(
                    region=name,
                    answered=True,
                    status=status,
                    body=parsed,
                    error=None if 200 <= status < 300 else _refusal(status, parsed),
                )
            except _TooLarge:
                error = f"answer larger than {self.max_response_bytes} bytes"
                answer = Answer(region=name, answered=False, error=error)
            except orjson.JSONDecodeError:
                answer = Answer(region=name, answered=False, error="answer is not JSON")
            except httpx.HTTPError as exc:
                answer = Answer(region=name, answered=False, error=_describe(exc))
        seconds = trio.current_time() - started
        self._stats.observe_call(name, seconds)
        if answer is None:
            ms = round(self.timeout_seconds * 1000)
            answer = Answer(region=name, answered=False, error=f"no answer within {ms} ms")
        if not answer.ok:
            self._log.warning(
                f"peer {name}", "federation: peer %s %s %s: %s", name, method, path, answer.error
            )
        return attrs.evolve(answer, seconds=seconds), size

    async def _fetch(
        self,
        client: httpx.AsyncClient,
        method: str,
        path: str,
        query: Mapping[str, str] | None,
        body: Mapping[str, Any] | None,
    ) -> tuple[int, bytes]:
        cap = self.max_response_bytes
        content = None if body is None else orjson.dumps(body)
        headers = {} if body is None else {"content-type": "application/json"}
        request = client.build_request(
            method, path, params=dict(query or {}), content=content, headers=headers
        )
        response = await client.send(request, stream=True)
        try:
            declared = parse_decimal(response.headers.get("content-length", "").strip())
            if declared is not None and declared > cap:
                raise _TooLarge
            raw = bytearray()
            # An async generator, though typed as an iterator: closed here, not by the GC.
            stream = cast(AsyncGenerator[bytes, None], response.aiter_bytes())
            async with contextlib.aclosing(stream) as chunks:
                async for chunk in chunks:
                    raw += chunk
                    if len(raw) > cap:
                        raise _TooLarge
            return response.status_code, bytes(raw)
        finally:
            await response.aclose()


async def _parse(raw: bytes) -> Any:
    if len(raw) > PARSE_IN_THREAD_BYTES:
        return await trio.to_thread.run_sync(orjson.loads, raw)
    return orjson.loads(raw)


def _refusal(status: int, body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return f"HTTP {status}: {body['message'][:300]}"
    return f"HTTP {status}"


def _describe(exc: httpx.HTTPError) -> str:
    """What went wrong, without the request (its headers carry the token)."""
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"


def _tls_context(peer: Peer) -> ssl.SSLContext:
    """Verified TLS: the system's CAs, or the peer's ``ca`` file."""
    context = ssl.create_default_context(cafile=None if peer.ca is None else str(peer.ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
