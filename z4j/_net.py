"""Accepting connections: within a budget, and quietly when descriptors run out.

`trio.serve_listeners` logs every failed accept with its traceback and
retries after 0.1 s: when the process is out of descriptors (EMFILE) that is
ten tracebacks a second, burying the log just when an operator reads it.
`serve_listener` backs off instead (doubling up to a second) and logs one
line at most every `LOG_INTERVAL_SECONDS`, with how many failures it folded
in. It also stops accepting while ``max_active`` connections are being
handled: later clients wait in the kernel's backlog, holding no descriptor
of ours, until one ends.
"""

from __future__ import annotations

import errno
import logging
import os
import socket as stdlib_socket
from collections.abc import Awaitable, Callable
from typing import NoReturn

import trio

from .config import Config, parse_bind

__all__ = [
    "ACCEPT_CAPACITY_ERRNOS",
    "REFUSAL_SLOTS",
    "bind_ports",
    "open_tcp_socket",
    "serve_listener",
]

log = logging.getLogger("z4j.net")

# accept(2) failures that mean "overloaded now", not "broken": retry later.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
BACKOFF_FIRST_SECONDS = 0.05
BACKOFF_MAX_SECONDS = 1.0
LOG_INTERVAL_SECONDS = 5.0
# Connections a server may hold past its cap while it refuses them (a short
# answer, then close): the caller's ``max_active`` is its cap plus these.
REFUSAL_SLOTS = 16


async def serve_listener(
    listener: trio.abc.Listener[trio.SocketStream],
    handler: Callable[[trio.SocketStream], Awaitable[object]],
    *,
    handler_nursery: trio.Nursery,
    name: str,
    max_active: int,
) -> NoReturn:
    """Accept on ``listener`` forever, one ``handler`` task per connection.

    At most ``max_active`` handlers run at once; each stream is closed when
    its handler returns. Closes ``listener`` when cancelled.
    """
    slots = trio.Semaphore(max_active)
    failures = 0
    next_log = -float("inf")
    backoff = BACKOFF_FIRST_SECONDS

    async def run(stream: trio.SocketStream) -> None:
        try:
            await handler(stream)
        finally:
            await trio.aclose_forcefully(stream)  # the descriptor first, then the slot
            slots.release()

    async with listener:
        while True:
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                slots.release()
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                failures += 1
                now = trio.current_time()
                if now >= next_log:
                    next_log = now + LOG_INTERVAL_SECONDS
                    log.error(
                        "%s: accept failed %d time(s) with %s (%s); backing off, "
                        "at most one such line every %g s",
                        name,
                        failures,
                        errno.errorcode.get(exc.errno, exc.errno),
                        os.strerror(exc.errno),
                        LOG_INTERVAL_SECONDS,
                    )
                    failures = 0
                await trio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_SECONDS)
            except BaseException:
                slots.release()
                raise
            else:
                backoff = BACKOFF_FIRST_SECONDS
                handler_nursery.start_soon(run, stream)


def open_tcp_socket(
    bind: str, *, reuse_port: bool, backlog: int = 1024, in_use_hint: str = ""
) -> stdlib_socket.socket:
    """A listening socket; with ``reuse_port`` several processes may share the port.

    ``in_use_hint`` ends the message when the address is taken: what to do
    depends on the store (on SQLite, sharing a port would split clients
    over two stores).
    """
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
                    exc.errno, f"cannot bind {bind}: address in use{in_use_hint}"
                ) from None
            raise
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_ports(config: Config) -> tuple[stdlib_socket.socket, stdlib_socket.socket]:
    """The ingest and HTTP listening sockets, bound before anything is created."""
    if config.uses_postgres:
        hint = (
            " (another brain? to share a port, set Z4J_SO_REUSEPORT=true on every instance, "
            "or run `z4j brain --instances N`)"
        )
    else:
        hint = (
            " (another brain or program holds it: stop it, or choose another port; several "
            "brains can share a port only on a shared Postgres store)"
        )
    ingest = open_tcp_socket(config.ingest_bind, reuse_port=config.so_reuseport, in_use_hint=hint)
    try:
        http = open_tcp_socket(config.http_bind, reuse_port=config.so_reuseport, in_use_hint=hint)
    except BaseException:
        ingest.close()
        raise
    return ingest, http
