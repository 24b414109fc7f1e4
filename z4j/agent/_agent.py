"""A Trio agent for z4j brains: stream events, answer commands.

The protocol work (handshake, signing, replay checks, frame shapes) is done
by the sans-IO core in `z4j.protocol.agent`; this module only moves its
bytes over one trio-websocket connection at a time and keeps what must
outlive a connection: the spool of events and the results of commands::

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
  (10 s .. 10 min) and are logged as errors; 4426/4427 (protocol version)
  and fatal ``error`` frames with an incompatibility code use
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
import copy
import json
import logging
import os
import random as _random
import ssl
import time
import urllib.parse
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import attrs
import trio
import trio_websocket

from .._version import __version__
from ..protocol.agent import frames as f
from ..protocol.agent.connection import AgentProtocol, Role
from ..protocol.agent.signing import decode_secret
from ..protocol.close import CloseCode
from ..protocol.errors import RemoteProtocolError
from ._backoff import (
    AUTH_BACKOFF,
    INCOMPATIBLE_BACKOFF,
    INCOMPATIBLE_ERRORS,
    TRANSIENT_BACKOFF,
    Backoff,
    End,
    Kind,
    Reconnects,
    classify_close,
)
from ._spool import Batch, Spool, SpoolFull

__all__ = ["Agent", "AgentStatistics", "Backoff", "CommandHandler", "SpoolFull"]

logger = logging.getLogger("z4j.agent")

CommandHandler = Callable[[dict[str, Any], dict[str, Any]], Awaitable[dict[str, Any] | None]]
_H = TypeVar("_H", bound=CommandHandler)

#: The largest event `emit` accepts (bytes of its JSON): half the default frame.
MAX_EVENT_BYTES: Final = 512 * 1024
#: Room left in a frame for the envelope around the events.
_FRAME_OVERHEAD: Final = 1024
_INBOUND_MAX: Final = 1024 * 1024  # what z4j-bare accepts from a brain, too
_REMEMBERED_COMMANDS: Final = 1024
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


@attrs.define
class _CommandRecord:
    claim_token: str | None
    result: f.CommandResult | None = None  # None while the handler runs


@attrs.define
class _Stop:
    requested: bool = False
    graceful: bool = True
    event: trio.Event = attrs.field(factory=trio.Event)


class _Session:
    """One connection's state; `finish` ends it (first caller wins)."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, nursery: trio.Nursery) -> None:
        self.ws = ws
        self.nursery = nursery
        self.proto: AgentProtocol | None = None
        self.ack: f.HelloAck | None = None
        self.opened_at: float | None = None
        self.control: deque[tuple[f.Payload, str | None]] = deque()
        self.send_lock = trio.Lock()
        self.end: End | None = None

    @property
    def max_frame(self) -> int:
        return self.ack.max_frame_size_bytes if self.ack else _INBOUND_MAX

    def finish(self, end: End) -> None:
        if self.end is None:
            self.end = end
        self.nursery.cancel_scope.cancel()


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


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


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return _truncate(text)


def _truncate(text: str, limit: int = f.MAX_ERROR_LENGTH) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _close_reason(text: str) -> str:
    # A close frame's reason is at most 123 bytes of UTF-8.
    return text.encode()[:120].decode(errors="ignore")


def _failed(error: str) -> f.CommandResult:
    return f.CommandResult(status="failed", error=_truncate(error))


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
        self._key = decode_secret(secret)
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
        self._ack_timeout = ack_timeout
        self._connect_timeout = connect_timeout
        self._hello_timeout = hello_timeout
        self._close_timeout = close_timeout
        self._shutdown_grace = shutdown_grace
        self._backoffs = {
            Kind.TRANSIENT: backoff,
            Kind.AUTH: auth_backoff,
            Kind.INCOMPATIBLE: incompatible_backoff,
        }
        self._random = random
        self._sleep = sleep
        self._handlers: dict[str, CommandHandler] = {}

        self._spool = Spool(
            max_spool=max_spool,
            batch_max_events=batch_max_events,
            max_in_flight=max_in_flight_batches,
            ack_timeout=ack_timeout,
        )
        # Commands: recent ids (dedupe) and results not yet sent.
        self._commands: OrderedDict[str, _CommandRecord] = OrderedDict()
        self._results: OrderedDict[str, f.CommandResult] = OrderedDict()
        self._running_commands = 0

        self._changed = trio.Event()  # set (and replaced) whenever there is news
        self._stop = _Stop()
        self._running = False
        self._done = trio.Event()
        self._opened = trio.Event()
        self._first_ack: f.HelloAck | None = None
        self._interrupt: trio.CancelScope | None = None
        self._command_nursery: trio.Nursery | None = None
        self._connected = False
        self._sessions_opened = 0
        self._last_flush_at: str | None = None
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
        if not isinstance(action, str) or not 1 <= len(action) <= 80:
            raise ValueError("an action is a string of 1 to 80 characters")
        if action in self._handlers:
            raise ValueError(f"a handler for {action!r} is already registered")
        self._handlers[action] = handler

    def statistics(self) -> AgentStatistics:
        return AgentStatistics(
            connected=self._connected,
            sessions_opened=self._sessions_opened,
            spooled_events=self._spool.spooled,
            pending_events=len(self._spool.pending),
            unacked_batches=len(self._spool.batches),
            acked_events=self._spool.acked_events,
            refused_events=self._spool.refused,
            dropped_events=self._spool.dropped,
            running_commands=self._running_commands,
            last_disconnect=self._last_disconnect,
        )

    @property
    def connected(self) -> bool:
        return self._connected

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
            self._stop = _Stop()  # the next run() starts afresh

    # -- supervision ------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

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
                async with trio.open_nursery() as commands:
                    self._command_nursery = commands
                    try:
                        await self._supervise()
                    finally:
                        self._command_nursery = None
                        commands.cancel_scope.cancel()
        finally:
            self._connected = False
            self._opened.set()
            self._done.set()

    async def _supervise(self) -> None:
        reconnects = Reconnects(self._backoffs, self._random)
        while not self._stop.requested:
            end = await self._session()
            self._connected = False
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
                    "the brain does not speak this agent's protocol (%s); retrying in %.1fs",
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
            kind = Kind.AUTH if status in (401, 403) else Kind.TRANSIENT
            end = End(kind=kind, detail=f"HTTP {status} on the upgrade")
        except* trio.TooSlowError:
            end = End(kind=Kind.TRANSIENT, detail="timed out connecting")
        except* (OSError, trio.BrokenResourceError) as group:
            end = End(kind=Kind.TRANSIENT, detail=f"cannot connect: {_error_text(_first(group))}")
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
                        max_message_size=_INBOUND_MAX,
                    )
                self._interrupt = None  # open: from here a stop closes cleanly
                end = await self._converse(ws)
                if end.close_code is not None and ws.closed is None:
                    with trio.move_on_after(self._close_timeout):
                        await ws.aclose(end.close_code, _close_reason(end.detail))
                nursery.cancel_scope.cancel()
            return end
        finally:
            await trio.aclose_forcefully(stream)

    async def _converse(self, ws: trio_websocket.WebSocketConnection) -> End:
        async with trio.open_nursery() as nursery:
            s = _Session(ws, nursery)
            nursery.start_soon(self._guarded, s, self._watch_stop)
            nursery.start_soon(self._guarded, s, self._receive)
        end = s.end or End(kind=Kind.TRANSIENT, detail="session ended")
        if s.opened_at is not None and s.ack is not None:
            up = trio.current_time() - s.opened_at
            end = attrs.evolve(end, healthy=up >= s.ack.heartbeat_interval_seconds)
        return end

    async def _guarded(self, s: _Session, task: Callable[[_Session], Awaitable[None]]) -> None:
        """Run one session task; turn the ways a session ends into `End`s."""
        try:
            await task(s)
        except trio_websocket.ConnectionClosed:
            reason = s.ws.closed
            code = reason.code if reason is not None else CloseCode.ABNORMAL
            kind = classify_close(code, handshake=s.ack is None)
            detail = f"brain closed {code}" + (
                f" {reason.reason}" if reason and reason.reason else ""
            )
            if code == CloseCode.FORBIDDEN and s.ack is not None:
                logger.error(
                    "the brain refused a signed frame (4403): is the project secret right?"
                )
            s.finish(End(kind=kind, detail=detail))
        except RemoteProtocolError as exc:
            code = exc.close_code or CloseCode.PROTOCOL_ERROR
            logger.error("protocol error from the brain: %s (closing with %d)", exc, code)
            kind = classify_close(code, handshake=False)
            await self._finish_cleanly(
                s, End(kind=kind, detail=f"{exc.reason}: {exc}", close_code=code)
            )

    async def _finish_cleanly(self, s: _Session, end: End) -> None:
        # Wait for a send in progress: cancelling it mid-frame would corrupt the stream.
        with trio.move_on_after(self._close_timeout):
            await s.send_lock.acquire()
        s.finish(end)

    async def _watch_stop(self, s: _Session) -> None:
        stop = self._stop
        await stop.event.wait()
        if stop.graceful and s.ack is not None:
            with trio.move_on_after(self._shutdown_grace):
                while stop.graceful and not self._drained(s):
                    await self._changed.wait()
        await self._finish_cleanly(
            s, End(kind=Kind.STOPPED, detail="agent stopped", close_code=CloseCode.NORMAL)
        )

    def _drained(self, s: _Session) -> bool:
        return self._spool.empty and not (self._results or self._running_commands or s.control)

    # -- receiving ----------------------------------------------------------------------

    def _hello(self) -> f.Hello:
        return f.Hello(
            protocol_version=f.PROTOCOL_VERSION,
            agent_version=__version__,
            framework="trio",
            capabilities={"trio": sorted(self._handlers)},
            host=self._host,
            worker_id=self.worker_id,
            worker_role=self._worker_role,
            worker_pid=os.getpid(),
            worker_started_at=self._worker_started_at,
        )

    async def _receive(self, s: _Session) -> None:
        s.proto = proto = AgentProtocol(Role.AGENT, key=self._key)
        async with s.send_lock:
            await s.ws.send_message(proto.hello_message(self._hello()))
        message: bytes | str | None = None
        with trio.move_on_after(self._hello_timeout):
            message = await s.ws.get_message()
        if message is None:
            detail = f"no hello_ack within {self._hello_timeout:g}s"
            await self._finish_cleanly(
                s, End(kind=Kind.TRANSIENT, detail=detail, close_code=CloseCode.NORMAL)
            )
            return
        frame = proto.receive_message(message)
        assert isinstance(frame.payload, f.HelloAck)  # the core accepts nothing else here
        self._opened_session(s, frame.payload)
        s.nursery.start_soon(self._guarded, s, self._send_loop)
        s.nursery.start_soon(self._guarded, s, self._heartbeats)
        while True:
            frame = proto.receive_message(await s.ws.get_message())
            payload = frame.payload
            if isinstance(payload, f.EventBatchAck):
                self._on_batch_ack(s, payload)
            elif isinstance(payload, f.Command):
                self._on_command(s, frame.id, payload)
            elif isinstance(payload, f.Error):
                if not payload.fatal:
                    logger.warning("brain error %s: %s", payload.code, payload.message)
                    continue
                kind = Kind.INCOMPATIBLE if payload.code in INCOMPATIBLE_ERRORS else Kind.TRANSIENT
                detail = f"fatal error from the brain: {payload.code}: {payload.message}"
                await self._finish_cleanly(
                    s, End(kind=kind, detail=detail, close_code=CloseCode.NORMAL)
                )
                return

    def _opened_session(self, s: _Session, ack: f.HelloAck) -> None:
        s.ack = ack
        s.opened_at = trio.current_time()
        resend = self._spool.open_session()
        self._connected = True
        self._sessions_opened += 1
        logger.info(
            "agent session open: agent %s, session %s (%d batches to re-send)",
            ack.agent_id,
            ack.session_id,
            resend,
        )
        if self._first_ack is None:
            self._first_ack = ack
            self._opened.set()

    def _on_batch_ack(self, s: _Session, ack: f.EventBatchAck) -> None:
        batch = self._spool.ack(ack.acked_id)
        if batch is None:
            return  # an ack for a batch acked before (it was sent twice)
        if ack.rejected:
            logger.warning("the brain rejected %d of %d events", ack.rejected, len(batch.items))
        self._last_flush_at = _now_iso()
        self._notify()

    # -- commands -----------------------------------------------------------------------

    def _on_command(self, s: _Session, command_id: str, command: f.Command) -> None:
        token = command.delivery_claim_token
        s.control.append((f.CommandAck(delivery_claim_token=token), command_id))
        record = self._commands.get(command_id)
        if record is not None:  # a repeat: never run twice
            record.claim_token = token
            if record.result is not None:
                self._results[command_id] = attrs.evolve(record.result, delivery_claim_token=token)
            self._notify()
            return
        record = self._commands[command_id] = _CommandRecord(claim_token=token)
        while len(self._commands) > _REMEMBERED_COMMANDS:
            self._commands.popitem(last=False)
        assert self._command_nursery is not None
        self._command_nursery.start_soon(self._run_command, command_id, command, record)
        self._notify()

    async def _run_command(
        self, command_id: str, command: f.Command, record: _CommandRecord
    ) -> None:
        self._running_commands += 1
        try:
            result = await self._execute(command)
        except BaseException:  # cancelled: forget the id, so a redelivery runs it
            if self._commands.get(command_id) is record:
                del self._commands[command_id]
            raise
        else:
            record.result = result
            token = record.claim_token
            self._results[command_id] = attrs.evolve(result, delivery_claim_token=token)
        finally:
            self._running_commands -= 1
            self._notify()

    async def _execute(self, command: f.Command) -> f.CommandResult:
        handler = self._handlers.get(command.action)
        if handler is None:
            return _failed(f"unknown action {command.action!r}")
        try:
            value = await handler(copy.deepcopy(command.target), copy.deepcopy(command.parameters))
        except Exception as exc:
            logger.warning("command %r failed", command.action, exc_info=True)
            return _failed(_error_text(exc))
        if value is None:
            return f.CommandResult(status="success")
        if not isinstance(value, dict):
            return _failed(
                f"the {command.action!r} handler returned {type(value).__name__}, not a dict or None"
            )
        try:
            value = json.loads(json.dumps(value, allow_nan=False))
        except (TypeError, ValueError) as exc:
            return _failed(f"the {command.action!r} handler's result is not JSON: {exc}")
        return f.CommandResult(status="success", result=value)

    # -- sending --------------------------------------------------------------------------

    async def _heartbeats(self, s: _Session) -> None:
        assert s.ack is not None
        while True:
            heartbeat = f.Heartbeat(
                buffer_size=self._spool.spooled,
                last_flush_at=self._last_flush_at,
                dropped_events=self._spool.refused + self._spool.dropped,
            )
            s.control.append((heartbeat, None))
            self._notify()
            await trio.sleep(s.ack.heartbeat_interval_seconds)

    async def _send_loop(self, s: _Session) -> None:
        """The only task that signs and sends, so frames leave in seq order."""
        while True:
            changed = self._changed
            if s.control:
                payload, frame_id = s.control.popleft()
                await self._send(s, payload, frame_id)
            elif self._results:
                command_id, result = next(iter(self._results.items()))
                if not await self._send(s, result, command_id):
                    too_large = _failed(f"the result is over the brain's {s.max_frame}-byte limit")
                    token = result.delivery_claim_token
                    await self._send(
                        s, attrs.evolve(too_large, delivery_claim_token=token), command_id
                    )
                if self._results.get(command_id) is result:  # not replaced by a repeat meanwhile
                    del self._results[command_id]
            elif (batch := self._next_batch(s)) is not None:
                await self._send_batch(s, batch)
            else:
                # Idle until there is news, or the oldest batch in flight is overdue.
                with trio.move_on_at(self._spool.deadline()):
                    await changed.wait()

    async def _send(self, s: _Session, payload: f.Payload, frame_id: str | None) -> bool:
        """Sign and send one frame; False (nothing sent) if it is over the frame limit."""
        assert s.proto is not None
        data = s.proto.send(payload, frame_id=frame_id)
        if len(data) > s.max_frame:
            return False
        async with s.send_lock:
            await s.ws.send_message(data)
        return True

    def _next_batch(self, s: _Session) -> Batch | None:
        batch = self._spool.overdue(trio.current_time())
        if batch is not None:
            logger.info("batch %s not acked in %gs; sending it again", batch.id, self._ack_timeout)
            return batch
        return self._spool.next_batch(s.max_frame - _FRAME_OVERHEAD)

    async def _send_batch(self, s: _Session, batch: Batch) -> None:
        self._spool.sending(batch, trio.current_time())
        if await self._send(s, batch.payload, batch.id):
            return
        # Over the brain's frame limit (it advertised a smaller one than the
        # batch was formed for): re-batch its events, or drop a lone event.
        dropped = self._spool.too_large(batch)
        if dropped is None:
            return
        logger.error(
            "dropped event %s: over the brain's %d-byte frame limit", dropped["id"], s.max_frame
        )
        self._notify()
