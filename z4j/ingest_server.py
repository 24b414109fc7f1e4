"""The TCP ingest server: a thin Trio adapter around `protocol.ingest`.

Per connection: read what the socket has, let the sans-IO core cut it into
frames, admit every payload into the buffer, wait once for the group commit
that makes them durable, and answer every frame of that read in one write,
in order. A pipelining client therefore costs one commit wait per read, not
per frame, and a closed-loop client still gets its answer after one commit.

Graceful stop (`stop_accepting`): the listener closes, connections waiting
for data are woken and closed, connections with payloads in flight finish
them and answer first.
"""

from __future__ import annotations

import errno
import logging
import socket as stdlib_socket
import time
from typing import Any

import trio

from .buffer import Buffer, NewRow
from .config import Config, parse_bind
from .protocol import ingest as proto
from .protocol.errors import RemoteProtocolError
from .stats import BrainStats, ThrottledLog

__all__ = ["IngestServer", "open_tcp_socket"]

log = logging.getLogger("z4j.ingest")
RECEIVE_SIZE = 256 * 1024


def open_tcp_socket(bind: str, *, reuse_port: bool, backlog: int = 1024) -> stdlib_socket.socket:
    """A listening socket; with ``reuse_port`` several processes may share the port."""
    host, port = parse_bind(bind)
    family = stdlib_socket.AF_INET6 if ":" in host else stdlib_socket.AF_INET
    sock = stdlib_socket.socket(family, stdlib_socket.SOCK_STREAM)
    try:
        sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(
                    exc.errno,
                    f"cannot bind {bind}: address in use (another brain? set "
                    "Z4J_SO_REUSEPORT=true on every instance to share a port)",
                ) from None
            raise
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class IngestServer:
    def __init__(self, config: Config, buffer: Buffer, stats: BrainStats) -> None:
        self._config = config
        self._buffer = buffer
        self._stats = stats
        self._accept_scope = trio.CancelScope()
        self._waiting_for_data: set[trio.CancelScope] = set()
        self._stopping = False
        self._log = ThrottledLog(log)

    async def serve(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        from ._net import REFUSAL_SLOTS, serve_listener

        sock = open_tcp_socket(self._config.ingest_bind, reuse_port=self._config.so_reuseport)
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        address: tuple[str, int] = sock.getsockname()[:2]
        async with trio.open_nursery() as connections, listener:
            with self._accept_scope:
                log.info("ingest listening on %s:%d", *address)
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

    def stop_accepting(self) -> None:
        """Close the listener and let open connections finish their frames."""
        self._stopping = True
        self._accept_scope.cancel()
        for scope in self._waiting_for_data:
            scope.cancel()

    async def _handle(self, stream: trio.SocketStream) -> None:
        stats = self._stats
        stats.ingest_connections_total += 1
        stats.ingest_connections_open += 1
        conn = proto.IngestConnection(
            token=self._config.ingest_token,
            max_frame_bytes=self._config.ingest_max_frame_bytes,
            max_inflated_bytes=self._config.ingest_max_inflated_bytes,
        )
        peer = _peer(stream)
        config = self._config
        try:
            async with stream:
                if stats.ingest_connections_open > config.ingest_max_connections:
                    self._reject("too_many_connections", "connection limit reached", peer)
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
                    with trio.move_on_after(wait) as scope:
                        self._waiting_for_data.add(scope)
                        try:
                            data = await stream.receive_some(RECEIVE_SIZE)
                        finally:
                            self._waiting_for_data.discard(scope)
                    if scope.cancelled_caught:
                        if frame_deadline is not None and trio.current_time() >= frame_deadline:
                            # A frame trickling in forever holds memory and a
                            # connection: refuse it rather than wait.
                            self._reject("too_slow", "frame not complete in time", peer)
                            await stream.send_all(proto.ERROR)
                        break  # idle, too slow, or the server is stopping
                    conn.receive_data(data)
                    replies, close = await self._answer(conn, peer)
                    if replies:
                        await stream.send_all(b"".join(replies))
                    if close:
                        break
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away; nothing it sent was acknowledged unanswered
        finally:
            stats.ingest_connections_open -= 1

    async def _answer(self, conn: proto.IngestConnection, peer: str) -> tuple[list[bytes], bool]:
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
                event = conn.next_event()
            except RemoteProtocolError as exc:
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


def _peer(stream: Any) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except (OSError, AttributeError):
        return "?"
    return f"{host}:{port}"
