"""The TCP ingest server: a thin Trio adapter around `protocol.ingest`.

Per connection: read what the socket has, let the sans-IO core cut it into
frames, admit every payload into the buffer, wait once for the group commit
that makes them durable, and answer every frame of that read in one write,
in order. A pipelining client therefore costs one commit wait per read, not
per frame, and a closed-loop client still gets its answer after one commit.

Keeping the loop free (one client must not stall the others):

- Frames the core calls heavy (over 64 KiB, or gzip) are checked on a
  worker thread behind one limiter for the whole server; small frames, the
  common case, stay on the loop (a thread hop costs ~130 µs). A thread
  alone is not enough: orjson holds the GIL for a whole parse, so the core
  refuses, by a cheap count before parsing, payloads whose parse could take
  long (see `protocol.ingest`, "Cost bound"), and that same bound keeps the
  drain's second parse short.
- Partly received frames are held against one byte budget for all
  connections (`FrameBudget`): a frame's announced size is reserved as soon
  as its length prefix arrives, and the connection reads no further than
  that. Past the budget a connection waits briefly for room, then gets
  ``5:ERROR`` and is closed (``over_budget``); a part of the budget is kept
  for small frames, so a flood of large partial frames does not keep a
  well-behaved client out.
- A wrong token ends the connection (the core says so), and a source that
  guesses wrong `TokenThrottle.STRIKES` times within a window has its new
  connections refused for a while (``throttled``).

Graceful stop (``serve``'s ``shutdown`` set): the listener closes, connections waiting
for data are woken and closed, connections with payloads in flight finish
them and answer first.
"""

from __future__ import annotations

import ipaddress
import logging
import socket as stdlib_socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import attrs
import trio

from .._net import REFUSAL_SLOTS, serve_listener
from .._net import open_tcp_socket as open_tcp_socket
from .._tls import server_tls_context
from ..buffer import Buffer, NewRow
from ..config import Config
from ..logs import log_context
from ..protocol import ingest as proto
from ..protocol.errors import RemoteProtocolError
from ..stats import BrainStats, ThrottledLog
from .ratelimit import FailureThrottle

__all__ = [
    "FrameBudget",
    "IngestServer",
    "IngestStatistics",
    "TokenThrottle",
    "open_tcp_socket",
]

log = logging.getLogger("z4j.ingest")
RECEIVE_SIZE = 256 * 1024
# Worker threads checking heavy frames at once, over all connections.
HEAVY_WORKERS: Final = 2
# How long a frame waits for room in the budget before it is refused.
BUDGET_PATIENCE_SECONDS: Final = 1.0
# How long closing a connection may take (a TLS close_notify), then it is cut.
CLOSE_SECONDS: Final = 1.0


class FrameBudget:
    """Bytes of partly received frames all connections together may hold.

    Connections reserve and release with `resize`; frames of at most
    `small` bytes may fill the whole budget, larger ones all but `reserve`.
    """

    def __init__(self, limit: int, *, small: int = proto.HEAVY_FRAME_BYTES) -> None:
        self.limit = limit
        self.small = small
        self.reserve = limit // 8
        self.held = 0
        self.peak = 0
        self._room = trio.Event()  # set (and replaced) whenever some is freed

    def _fits(self, extra: int, size: int) -> bool:
        cap = self.limit if size <= self.small else self.limit - self.reserve
        return self.held + extra <= cap

    def release(self, size: int) -> None:
        if size:
            self.held -= size
            self._room.set()
            self._room = trio.Event()

    async def resize(self, old: int, new: int, *, patience: float) -> bool:
        """Turn a reservation of ``old`` bytes into ``new``; False if no room came in time."""
        if new <= old:
            self.release(old - new)
            return True
        extra = new - old
        with trio.move_on_after(patience):
            while not self._fits(extra, new):
                await self._room.wait()
            self.held += extra
            self.peak = max(self.peak, self.held)
            return True
        return False


class TokenThrottle(FailureThrottle):
    """Wrong tokens per source: past `STRIKES` within `WINDOW_SECONDS`, the
    source's new connections are refused for `BLOCK_SECONDS`.

    Sources are addresses, IPv6 ones by /64 (one host holds a whole one);
    at most `MAX_SOURCES` are tracked (see `FailureThrottle`).
    """

    STRIKES: Final = 5
    WINDOW_SECONDS: Final = 60.0
    BLOCK_SECONDS: Final = 60.0
    MAX_SOURCES: Final = 4096

    def __init__(self) -> None:
        super().__init__(
            max_failures=self.STRIKES,
            window=self.WINDOW_SECONDS,
            block=self.BLOCK_SECONDS,
            max_sources=self.MAX_SOURCES,
        )

    def blocked(self, source: str, now: float) -> bool:
        return self.refused_for(source, now) > 0

    def strike(self, source: str, now: float) -> None:
        self.failed(source, now)


def source_of(host: str) -> str:
    """The throttle's key for a peer address."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@attrs.frozen(kw_only=True)
class IngestStatistics:
    """Partly received frames held (reserved bytes), the peak, the budget, and
    how many sources the token throttle tracks."""

    buffered_bytes: int
    buffered_peak: int
    buffered_limit: int
    throttle_sources: int


class IngestServer:
    def __init__(self, config: Config, buffer: Buffer, stats: BrainStats) -> None:
        self._config = config
        self._buffer = buffer
        self._stats = stats
        self._accept_scope = trio.CancelScope()
        self._waiting_for_data: set[trio.CancelScope] = set()
        self._stopping = False
        self._log = ThrottledLog(log)
        self._budget = FrameBudget(config.ingest_max_buffered_bytes)
        self._throttle = TokenThrottle()
        self._heavy = trio.CapacityLimiter(HEAVY_WORKERS)
        self._tls = server_tls_context(config) if config.ingest_tls else None

    @property
    def tls(self) -> bool:
        """Whether the port speaks TLS (Z4J_TLS_CERT_FILE set, Z4J_INGEST_TLS not false)."""
        return self._tls is not None

    def statistics(self) -> IngestStatistics:
        return IngestStatistics(
            buffered_bytes=self._budget.held,
            buffered_peak=self._budget.peak,
            buffered_limit=self._budget.limit,
            throttle_sources=len(self._throttle),
        )

    async def serve(
        self,
        sock: stdlib_socket.socket | None = None,
        *,
        shutdown: trio.Event | None = None,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on ``sock`` (a listening socket, which this closes), or bind
        Z4J_INGEST_BIND. Once ``shutdown`` is set: stop accepting, let open
        connections answer the frames they hold, and return."""
        if sock is None:
            sock = open_tcp_socket(self._config.ingest_bind, reuse_port=self._config.so_reuseport)
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        address: tuple[str, int] = sock.getsockname()[:2]
        async with trio.open_nursery() as connections, listener:
            if shutdown is not None:
                connections.start_soon(self._stop_on, shutdown)
            with self._accept_scope:
                log.info("ingest listening on %s:%d%s", *address, " (TLS)" if self._tls else "")
                task_status.started(address)
                # Past the cap `_handle` answers 5:ERROR and closes; beyond
                # that, clients wait in the backlog (no descriptor spent).
                await serve_listener(
                    listener,
                    self._handle,
                    handler_nursery=connections,
                    name="ingest",
                    max_active=self._config.ingest_max_connections + REFUSAL_SLOTS,
                )
            # Listener closed; the nursery waits for connections to wind down.

    async def _stop_on(self, shutdown: trio.Event) -> None:
        """Close the listener and let open connections finish their frames."""
        await shutdown.wait()
        self._stopping = True
        self._accept_scope.cancel()
        for scope in self._waiting_for_data:
            scope.cancel()

    async def _handle(self, raw: trio.SocketStream) -> None:
        stats = self._stats
        stats.ingest_connections_total += 1
        stats.ingest_connections_open += 1
        host, peer = _peer(raw)
        try:
            with log_context(peer=peer):
                if self._tls is None:
                    await self._serve_connection(raw, host, peer)
                    return
                stream = trio.SSLStream(raw, self._tls, server_side=True)
                if await self._handshake(stream, peer):
                    await self._serve_connection(stream, host, peer)
        finally:
            stats.ingest_connections_open -= 1

    async def _handshake(self, stream: trio.SSLStream[trio.SocketStream], peer: str) -> bool:
        """TLS before the first frame, within the idle timeout; False (counted, logged) if not.

        A peer that speaks plain TCP, or trickles its handshake, costs only
        its own task and slot: nothing here waits on another connection.
        """
        with trio.move_on_after(self._config.ingest_idle_timeout_seconds) as scope:
            self._waiting_for_data.add(scope)
            try:
                await stream.do_handshake()
                return True
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                cause = exc.__cause__ or exc
                detail = getattr(cause, "reason", None) or str(cause) or type(cause).__name__
            finally:
                self._waiting_for_data.discard(scope)
        if scope.cancelled_caught:
            if self._stopping:
                return False
            detail = "no handshake within Z4J_INGEST_IDLE_TIMEOUT_SECONDS"
        self._stats.ingest_rejected["tls_handshake"] += 1
        self._log.warning("tls_handshake", "ingest: TLS handshake with %s failed: %s", peer, detail)
        return False

    async def _serve_connection(self, stream: trio.abc.Stream, host: str, peer: str) -> None:
        stats = self._stats
        config = self._config
        conn = proto.IngestConnection(
            token=config.ingest_token,
            max_frame_bytes=config.ingest_max_frame_bytes,
            max_inflated_bytes=config.ingest_max_inflated_bytes,
            max_records=config.ingest_max_records_per_payload,
            strict_token=config.ingest_strict_token,
        )
        source = source_of(host)
        reserved = 0  # bytes of the budget this connection holds
        try:
            async with _closing(stream):
                if stats.ingest_connections_open > config.ingest_max_connections:
                    self._reject("too_many_connections", "connection limit reached", peer)
                    await stream.send_all(proto.ERROR)
                    return
                if self._throttle.blocked(source, trio.current_time()):
                    self._reject("throttled", "too many wrong tokens from this source", peer)
                    await stream.send_all(proto.ERROR)
                    return
                frame_deadline: float | None = None  # for the frame partly received
                while not self._stopping:
                    wait = config.ingest_idle_timeout_seconds
                    if conn.buffered:
                        if frame_deadline is None:
                            frame_deadline = (
                                trio.current_time() + config.ingest_frame_timeout_seconds
                            )
                        wait = min(wait, frame_deadline - trio.current_time())
                    else:
                        frame_deadline = None
                    # A large frame reads no further than the room reserved for it.
                    size = RECEIVE_SIZE
                    if reserved > self._budget.small:
                        size = max(1, min(size, reserved - conn.buffered))
                    with trio.move_on_after(wait) as scope:
                        self._waiting_for_data.add(scope)
                        try:
                            data = await stream.receive_some(size)
                        finally:
                            self._waiting_for_data.discard(scope)
                    if scope.cancelled_caught:
                        if frame_deadline is not None and trio.current_time() >= frame_deadline:
                            # A frame trickling in forever holds memory and a
                            # connection: refuse it rather than wait.
                            self._reject("too_slow", "frame not complete in time", peer)
                            await stream.send_all(proto.ERROR)
                        break  # idle, too slow, or the server is stopping
                    conn.receive_data(data if isinstance(data, bytes) else bytes(data))
                    replies, close = await self._answer(conn, peer, source)
                    if replies:
                        await stream.send_all(b"".join(replies))
                    if close:
                        break
                    want = conn.head_frame_bytes
                    if want != reserved:
                        if not await self._budget.resize(
                            reserved, want, patience=BUDGET_PATIENCE_SECONDS
                        ):
                            self._reject(
                                "over_budget",
                                f"no room for a {want}-byte frame: partly received frames "
                                f"hold {self._budget.held} of {self._budget.limit} bytes",
                                peer,
                            )
                            await stream.send_all(proto.ERROR)
                            break
                        reserved = want
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away; nothing it sent was acknowledged unanswered
        finally:
            self._budget.release(reserved)

    async def _answer(
        self, conn: proto.IngestConnection, peer: str, source: str
    ) -> tuple[list[bytes], bool]:
        """Every reply owed for what ``conn`` holds now, and whether to close."""
        stats = self._stats
        replies: list[bytes] = []
        pending: list[int] = []  # indexes in `replies` waiting for the commit
        rows: list[NewRow] = []
        records = 0
        close = False
        now = time.time()
        while True:
            try:
                if conn.next_is_heavy():
                    # Only this task touches `conn`, and it waits here.
                    event = await trio.to_thread.run_sync(conn.next_event, limiter=self._heavy)
                else:
                    event = conn.next_event()
            except RemoteProtocolError as exc:
                if exc.reason == "bad_token":
                    self._throttle.strike(source, trio.current_time())
                self._reject(exc.reason, str(exc), peer)
                replies.append(proto.ERROR)
                close = True
                break
            if event is proto.NEED_DATA:
                break
            if isinstance(event, proto.Payload):
                if event.records == 0:
                    replies.append(proto.OK)
                elif self._buffer.admit(1):
                    pending.append(len(replies))
                    replies.append(proto.OK)
                    rows.append(NewRow(received_at=now, source="tcp", body=event.body))
                    records += event.records
                else:
                    self._reject("buffer_full", "buffer is full", peer)
                    replies.append(proto.ERROR)
            elif isinstance(event, proto.Ping):
                stats.ingest_pings += 1
                replies.append(proto.OK)
            elif isinstance(event, proto.Rejected):
                self._reject(event.reason, event.detail, peer)
                replies.append(proto.ERROR)
            else:  # ConnectionClosed
                close = True
                break
        if rows:
            try:
                await self._buffer.append(rows)
            except Exception as exc:
                for index in pending:
                    replies[index] = proto.ERROR
                stats.ingest_rejected["storage_error"] += len(rows)
                self._log.warning("storage_error", "buffer write failed: %s", exc)
            else:
                stats.ingest_payloads_ok += len(rows)
                stats.ingest_records_ok += records
        return replies, close

    def _reject(self, reason: str, detail: str, peer: str) -> None:
        self._stats.ingest_rejected[reason] += 1
        self._log.warning(reason, "ingest: rejected a frame from %s: %s (%s)", peer, reason, detail)


@asynccontextmanager
async def _closing(stream: trio.abc.Stream) -> AsyncIterator[None]:
    """Close ``stream`` on the way out, within `CLOSE_SECONDS`: TLS sends a
    close_notify, which a peer that reads nothing could hold up forever."""
    try:
        yield
    finally:
        with trio.move_on_after(CLOSE_SECONDS):
            await stream.aclose()  # cancelled, it closes forcefully


def _peer(stream: Any) -> tuple[str, str]:
    """The peer's host, and host:port for log lines."""
    try:
        host, port = stream.socket.getpeername()[:2]
    except (OSError, AttributeError):
        return "?", "?"
    return str(host), f"{host}:{port}"
