"""A Trio agent for z4j brains: stream events, answer commands.

The protocol work (handshake, signing, replay checks, frame shapes) is done
by the sans-IO core in `z4j.protocol.agent`; this package moves its bytes
over one trio-websocket connection at a time and keeps what must outlive a
connection. This module is the public face (arguments, `emit`, handler
registration, `run`'s supervision and stop); `_spool` holds events until
acked (sans-IO), `_commands` the handlers and results, `_session` one
connection's tasks, `_backoff` the reconnect policy::

    agent = z4j.agent.Agent("https://brain.example", token=TOKEN, secret=SECRET)

    @agent.command("ping")
    async def ping(target: dict, parameters: dict) -> dict:
        return {"pong": True}

    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        agent.emit({"kind": "task.succeeded", "task_id": "t-1"})
        ...
        await agent.aclose()  # flush (briefly), close with 1000

Delivery is at-least-once. `emit` puts an event (with a stable ``id``) into a
bounded in-memory spool; the sender groups spooled events into
``event_batch`` frames, and a batch leaves the spool only when the brain
answers ``event_batch_ack`` with its frame id. Un-acked batches are re-sent
on every new session, and after `ack_timeout` within one, with the *same*
frame id and event ids, so the brain can drop repeats by event id. The spool
lives in memory: what is in it when the process ends is lost.

Decisions a user may want to know:

- ``run`` reports ``task_status.started(hello_ack)`` once the first session
  is open (the brain answered hello). ``await nursery.start(agent.run)``
  therefore waits for the brain, as long as it takes; use ``start_soon``
  when the program must not wait (``emit`` works before any connection). If
  the agent is stopped before a session ever opens, ``nursery.start`` raises
  trio's RuntimeError (the task ended without reporting started).
- A full spool refuses the event: ``emit`` raises `SpoolFull` (counted in
  ``refused_events`` and reported in heartbeats as ``dropped_events``). The
  caller decides whether to drop it, wait or slow down.
- Reconnects use capped exponential backoff with full jitter: the n-th
  consecutive failure waits ``random() * min(cap, base * 2**n)``. The counter
  goes back to 0 only after a session that stayed open (after hello_ack)
  for at least one heartbeat interval: a brain that accepts the hello and
  then drops us at once (a wrong project secret gets the first signed frame
  refused with 4403) must not be hammered at the base delay. Closes that
  mean "your credentials are wrong" (HTTP 401/403, close 4401, close 4403
  during the handshake, close 4003 at any time) use `auth_backoff`
  (10 s .. 10 min) and are logged as errors; HTTP 404 on the upgrade (a
  brain_url whose path the brain does not serve), 4426/4427 (protocol
  version) and fatal ``error`` frames with an incompatibility code use
  `incompatible_backoff` (2 min .. 1 h); everything else is transient
  (0.5 s .. 30 s).
- A repeated command id is not executed again (the last 1024 ids are
  remembered; a run cut short by a shutdown is forgotten): the agent answers
  ``command_ack`` again and, if the first run has finished, re-sends its
  ``command_result``. (z4j-bare 1.13 differs: it sends only the ack, and
  re-runs a command whose first run failed.)
- ``run`` converts its own cancellation into a fast, clean stop: the
  websocket is closed with 1000 (no flushing), within `close_timeout`.
  ``aclose()``/``stop()`` first give the session `shutdown_grace` seconds to
  get the spool acked and running commands answered.

Threads: `emit`, `stop` and the handler registry are meant for the Trio
thread that runs the agent; from another thread use
``trio.from_thread.run_sync(agent.emit, event)``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random as _random
import ssl
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import attrs
import trio
import trio_websocket

from .._version import __version__
from ..protocol.agent import frames as f
from ..protocol.agent.signing import decode_secret
from ._backoff import (
    AUTH_BACKOFF,
    INCOMPATIBLE_BACKOFF,
    TRANSIENT_BACKOFF,
    Backoff,
    End,
    Kind,
    Reconnects,
)
from ._commands import CommandHandler, Commands, error_text
from ._session import INBOUND_MAX, Shared, Status, Stop, Wakeup, converse
from ._spool import Spool, SpoolFull

__all__ = ["Agent", "AgentStatistics", "Backoff", "CommandHandler", "SpoolFull"]

logger = logging.getLogger("z4j.agent")

_H = TypeVar("_H", bound=CommandHandler)

#: The largest event `emit` accepts (bytes of its JSON): half the default frame.
MAX_EVENT_BYTES: Final = 512 * 1024
_LOOPBACK: Final = frozenset({"localhost", "127.0.0.1", "::1"})


@attrs.frozen(kw_only=True)
class AgentStatistics:
    """A snapshot of an agent's state (`Agent.statistics`)."""

    connected: bool
    sessions_opened: int
    spooled_events: int  #: events not yet acked: pending plus in batches
    pending_events: int  #: events not yet in any batch
    unacked_batches: int
    acked_events: int
    refused_events: int  #: `emit` raised SpoolFull
    dropped_events: int  #: too large for the brain's frame limit
    running_commands: int
    last_disconnect: str | None


@attrs.frozen(kw_only=True)
class _Target:
    url: str
    host: str
    port: int
    host_header: str
    resource: str
    ssl_context: ssl.SSLContext | None


def _target(brain_url: str, *, allow_insecure: bool, ssl_context: ssl.SSLContext | None) -> _Target:
    parts = urllib.parse.urlsplit(brain_url.strip())
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        raise ValueError(f"brain_url must be an http(s) URL, got {brain_url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"brain_url must not have a query or fragment: {brain_url!r}")
    if scheme == "ws" and parts.hostname not in _LOOPBACK and not allow_insecure:
        raise ValueError(
            f"{brain_url!r} would send the token in clear text: use https, a loopback "
            "address, or allow_insecure=True"
        )
    if scheme == "ws" and ssl_context is not None:
        raise ValueError("an ssl_context needs an https brain_url")
    host_header = parts.netloc.rpartition("@")[2]
    resource = parts.path.rstrip("/") + "/ws/agent"
    return _Target(
        url=urllib.parse.urlunsplit((scheme, host_header, resource, "", "")),
        host=parts.hostname,
        port=parts.port or (443 if scheme == "wss" else 80),
        host_header=host_header,
        resource=resource,
        ssl_context=(ssl_context or ssl.create_default_context()) if scheme == "wss" else None,
    )


_E = TypeVar("_E", bound=BaseException)


def _first(group: BaseExceptionGroup[_E]) -> _E:
    leaf = group.exceptions[0]
    return _first(leaf) if isinstance(leaf, BaseExceptionGroup) else leaf


def _close_reason(text: str) -> str:
    # A close frame's reason is at most 123 bytes of UTF-8.
    return text.encode()[:120].decode(errors="ignore")


class Agent:
    """An agent connection to a z4j brain; see the module docstring.

    ``secret`` is the project secret as handed out by the brain (URL-safe
    base64). ``worker_id`` defaults to ``trio-<pid>-<unix ms>`` and stays the
    same across reconnects. Plain ``http://`` is refused unless the host is
    loopback or ``allow_insecure`` is set (the token would travel in clear);
    ``ssl_context`` verifies an ``https://`` brain (default: system CAs).
    ``random`` and ``sleep`` are the backoff's randomness and wait; tests
    replace them.
    """

    def __init__(
        self,
        brain_url: str,
        *,
        token: str,
        secret: str,
        worker_id: str | None = None,
        worker_role: str | None = None,
        agent_name: str | None = None,
        max_spool: int = 10_000,
        batch_max_events: int = 100,
        max_in_flight_batches: int = 256,
        ack_timeout: float = 90.0,
        connect_timeout: float = 10.0,
        hello_timeout: float = 10.0,
        close_timeout: float = 5.0,
        shutdown_grace: float = 2.0,
        backoff: Backoff = TRANSIENT_BACKOFF,
        auth_backoff: Backoff = AUTH_BACKOFF,
        incompatible_backoff: Backoff = INCOMPATIBLE_BACKOFF,
        allow_insecure: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        random: Callable[[], float] = _random.random,
        sleep: Callable[[float], Awaitable[object]] = trio.sleep,
    ) -> None:
        if not isinstance(token, str) or not token.strip():
            raise ValueError("token must be a non-empty string")
        if not (token.strip().isascii() and token.strip().isprintable()):
            raise ValueError("token must be printable ASCII (it goes in an HTTP header)")
        if not 1 <= batch_max_events <= f.MAX_EVENTS_PER_BATCH:
            raise ValueError(f"batch_max_events must be 1 to {f.MAX_EVENTS_PER_BATCH}")
        if max_spool < 1 or max_in_flight_batches < 1:
            raise ValueError("max_spool and max_in_flight_batches must be at least 1")
        self._target = _target(brain_url, allow_insecure=allow_insecure, ssl_context=ssl_context)
        self.ws_url = self._target.url
        self._token = token.strip()
        started = time.time()
        self.worker_id = worker_id or f"trio-{os.getpid()}-{int(started * 1000)}"
        if len(self.worker_id) > 128 or (worker_role is not None and len(worker_role) > 32):
            raise ValueError("worker_id is at most 128 characters, worker_role at most 32")
        self._worker_role = worker_role
        self._worker_started_at = (
            datetime.fromtimestamp(started, UTC)
            .isoformat(timespec="microseconds")
            .replace("+00:00", "Z")
        )
        self._host = {"name": agent_name} if agent_name else {}
        self._connect_timeout = connect_timeout
        self._close_timeout = close_timeout
        self._backoffs = {
            Kind.TRANSIENT: backoff,
            Kind.AUTH: auth_backoff,
            Kind.INCOMPATIBLE: incompatible_backoff,
        }
        self._random = random
        self._sleep = sleep

        self._spool = Spool(
            max_spool=max_spool,
            batch_max_events=batch_max_events,
            max_in_flight=max_in_flight_batches,
            ack_timeout=ack_timeout,
        )
        self._wakeup = Wakeup()
        self._commands = Commands(self._wakeup.notify)
        self._status = Status()
        self._shared = Shared(
            key=decode_secret(secret),
            hello=self._hello,
            on_open=self._opened_session,
            spool=self._spool,
            commands=self._commands,
            wakeup=self._wakeup,
            status=self._status,
            hello_timeout=hello_timeout,
            close_timeout=close_timeout,
            shutdown_grace=shutdown_grace,
        )
        self._stop = Stop()
        self._running = False
        self._done = trio.Event()
        self._opened = trio.Event()
        self._first_ack: f.HelloAck | None = None
        self._interrupt: trio.CancelScope | None = None
        self._last_disconnect: str | None = None

    # -- the public surface ---------------------------------------------------------

    def emit(self, event: Mapping[str, Any]) -> str:
        """Spool ``event`` for delivery; return its id.

        ``event`` needs a string ``kind``; ``id`` (a uuid4) and
        ``occurred_at`` (now, ISO-8601 UTC) are added when missing. The event
        is copied as JSON, so later changes to the caller's dict do not
        show. Raises `SpoolFull` when `max_spool` events are waiting,
        ``ValueError`` for an event that is not a JSON object of at most
        `MAX_EVENT_BYTES`.
        """
        if not isinstance(event, Mapping):
            raise TypeError(f"an event is a dict, got {type(event).__name__}")
        kind = event.get("kind")
        if not isinstance(kind, str) or not 1 <= len(kind) <= 128:
            raise ValueError("an event needs a 'kind': a string of 1 to 128 characters")
        body = dict(event)
        body.setdefault("id", str(uuid.uuid4()))
        event_id = body["id"]
        if not isinstance(event_id, str) or not 1 <= len(event_id) <= 128:
            raise ValueError("an event's 'id' must be a string of 1 to 128 characters")
        occurred = body.setdefault("occurred_at", datetime.now(UTC).isoformat())
        if isinstance(occurred, datetime):
            body["occurred_at"] = occurred.isoformat()
        try:
            encoded = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"event is not JSON: {exc}") from None
        size = len(encoded.encode())
        if size > MAX_EVENT_BYTES:
            raise ValueError(f"event of {size} bytes is over the {MAX_EVENT_BYTES}-byte limit")
        self._spool.add(json.loads(encoded), size)
        self._notify()
        return event_id

    def command(self, action: str) -> Callable[[_H], _H]:
        """Decorator: register ``handler`` for ``action`` (see `on_command`)."""

        def register(handler: _H) -> _H:
            self.on_command(action, handler)
            return handler

        return register

    def on_command(self, action: str, handler: CommandHandler) -> None:
        """Answer commands named ``action`` with ``await handler(target, parameters)``.

        The handler returns a JSON object (or None) for a ``success`` result;
        an exception becomes a ``failed`` result carrying its text.
        """
        self._commands.register(action, handler)

    def statistics(self) -> AgentStatistics:
        return AgentStatistics(
            connected=self._status.connected,
            sessions_opened=self._status.sessions_opened,
            spooled_events=self._spool.spooled,
            pending_events=len(self._spool.pending),
            unacked_batches=len(self._spool.batches),
            acked_events=self._spool.acked_events,
            refused_events=self._spool.refused,
            dropped_events=self._spool.dropped,
            running_commands=self._commands.running,
            last_disconnect=self._last_disconnect,
        )

    @property
    def connected(self) -> bool:
        return self._status.connected

    def stop(self) -> None:
        """Ask `run` to finish: flush within `shutdown_grace`, close with 1000.

        Called before `run` has started, it makes that `run` return at once.
        """
        self._request_stop(graceful=True)

    async def aclose(self) -> None:
        """`stop`, then wait until `run` has returned (see `stop` if it has not started)."""
        self.stop()
        if self._running:
            await self._done.wait()

    async def run(
        self, *, task_status: trio.TaskStatus[f.HelloAck] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect, and keep connecting, until `stop`/`aclose` or cancellation.

        Reports the first session's hello_ack through ``task_status``.
        """
        if self._running:
            raise RuntimeError("this Agent is already running")
        self._running = True
        self._first_ack = None
        self._opened = trio.Event()
        self._done = trio.Event()
        # The agent's tasks run in a shielded scope, so that cancelling run()
        # becomes a clean stop (the websocket's own reader must live on to
        # finish the close handshake), with a hard deadline as the backstop.
        tree = trio.CancelScope(shield=True)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._tree, tree)
                try:
                    await self._opened.wait()
                    if self._first_ack is not None:
                        task_status.started(self._first_ack)
                    await self._done.wait()
                finally:
                    if not self._done.is_set():
                        self._request_stop(graceful=False)
                        tree.deadline = min(
                            tree.deadline, trio.current_time() + 2 * self._close_timeout
                        )
        finally:
            self._running = False
            self._stop = Stop()  # the next run() starts afresh

    # -- supervision ------------------------------------------------------------------

    def _notify(self) -> None:
        self._wakeup.notify()

    def _request_stop(self, *, graceful: bool) -> None:
        stop = self._stop
        stop.graceful = stop.graceful and graceful
        if not stop.requested:
            stop.requested = True
            stop.event.set()
        if self._interrupt is not None:
            self._interrupt.cancel()  # connecting or backing off: stop at once
        self._notify()

    @contextlib.contextmanager
    def _interruptible(self) -> Iterator[trio.CancelScope]:
        with trio.CancelScope() as scope:
            self._interrupt = scope
            if self._stop.requested:
                scope.cancel()
            try:
                yield scope
            finally:
                self._interrupt = None

    async def _tree(self, tree: trio.CancelScope) -> None:
        try:
            with tree:
                async with self._commands.serving():
                    await self._supervise()
        finally:
            self._status.connected = False
            self._opened.set()
            self._done.set()

    async def _supervise(self) -> None:
        reconnects = Reconnects(self._backoffs, self._random)
        while not self._stop.requested:
            end = await self._session()
            self._status.connected = False
            if self._stop.requested or end.kind is Kind.STOPPED:
                return
            delay = reconnects.delay(end)
            self._last_disconnect = f"{end.kind.value}: {end.detail}"
            if end.kind is Kind.AUTH:
                logger.error(
                    "the brain refused this agent's credentials (%s); retrying in %.1fs",
                    end.detail,
                    delay,
                )
            elif end.kind is Kind.INCOMPATIBLE:
                logger.error(
                    "the brain cannot serve this agent (%s); retrying in %.1fs",
                    end.detail,
                    delay,
                )
            else:
                logger.warning("agent disconnected (%s); reconnecting in %.2fs", end.detail, delay)
            with self._interruptible():
                await self._sleep(delay)

    async def _session(self) -> End:
        end: End | None = None
        try:
            with self._interruptible():
                end = await self._connect_and_converse()
        except* trio_websocket.ConnectionRejected as group:
            status = _first(group).status_code
            if status == 404:
                # A wrong brain_url (a path the brain does not serve) is not
                # bad credentials: say which URL, and what the path should be.
                end = End(
                    kind=Kind.INCOMPATIBLE,
                    detail=f"no agent endpoint at {self._target.url}: HTTP 404 — the path "
                    "should be /ws/agent (brain_url is the brain's base URL; the agent adds "
                    "/ws/agent)",
                )
            else:
                kind = Kind.AUTH if status in (401, 403) else Kind.TRANSIENT
                end = End(kind=kind, detail=f"HTTP {status} on the upgrade")
        except* trio.TooSlowError:
            end = End(kind=Kind.TRANSIENT, detail="timed out connecting")
        except* (OSError, trio.BrokenResourceError) as group:
            end = End(kind=Kind.TRANSIENT, detail=f"cannot connect: {error_text(_first(group))}")
        return end or End(kind=Kind.STOPPED, detail="stopped while connecting")

    async def _connect_and_converse(self) -> End:
        # We own the stream (rather than open_websocket_url): trio-websocket
        # 0.12 leaves a client's socket open when the server starts the close.
        target = self._target
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
        with trio.fail_after(self._connect_timeout):
            if target.ssl_context is None:
                stream = await trio.open_tcp_stream(target.host, target.port)
            else:
                stream = await trio.open_ssl_over_tcp_stream(
                    target.host, target.port, ssl_context=target.ssl_context, https_compatible=True
                )
        try:
            async with trio.open_nursery() as nursery:  # the websocket's reader task
                with trio.fail_after(self._connect_timeout):
                    ws = await trio_websocket.wrap_client_stream(
                        nursery,
                        stream,
                        target.host_header,
                        target.resource,
                        extra_headers=[(b"Authorization", f"Bearer {self._token}".encode())],
                        max_message_size=INBOUND_MAX,
                    )
                self._interrupt = None  # open: from here a stop closes cleanly
                end = await converse(ws, self._shared, self._stop)
                if end.close_code is not None and ws.closed is None:
                    with trio.move_on_after(self._close_timeout):
                        await ws.aclose(end.close_code, _close_reason(end.detail))
                nursery.cancel_scope.cancel()
            return end
        finally:
            await trio.aclose_forcefully(stream)

    def _hello(self) -> f.Hello:
        return f.Hello(
            protocol_version=f.PROTOCOL_VERSION,
            agent_version=__version__,
            framework="trio",
            capabilities={"trio": self._commands.actions},
            host=self._host,
            worker_id=self.worker_id,
            worker_role=self._worker_role,
            worker_pid=os.getpid(),
            worker_started_at=self._worker_started_at,
        )

    def _opened_session(self, ack: f.HelloAck) -> None:
        if self._first_ack is None:
            self._first_ack = ack
            self._opened.set()
