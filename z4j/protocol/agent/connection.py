"""One agent protocol v2 connection, either side, sans-IO.

Theory of operation
-------------------
The WebSocket layer hands us whole messages; each message is one frame (UTF-8
JSON). `AgentProtocol` turns received messages into `Frame` values and the
frames we send into message bytes, enforcing everything the protocol says
about order, signatures and replay. It does no I/O and reads no clock but
the one it is given, so tests drive it with plain bytes and a fake clock.

The handshake, as a table (see `TRANSITIONS`):

    brain:  AWAIT_HELLO --recv hello--> HELLO_RECEIVED --accept()--> OPEN
    agent:  START --hello()--> AWAIT_HELLO_ACK --recv hello_ack--> OPEN

``hello`` and ``hello_ack`` are unsigned. In OPEN every frame, both ways,
carries ``v, type, id, ts, nonce, seq, hmac, payload``; received frames are
verified over the decoded JSON object as received, then pass the replay
guard, then are structured into typed payloads (unknown fields ignored).

The hello carries no signature, so it proves nothing but the bearer token:
`peer_proven` turns true with the first signed frame that verifies, the
earliest point at which the peer has shown it holds the signing key. The
brain gives a connection its worker's slot (and its commands) only then.

While a project's signing secret is being rotated the brain accepts with
more than one key (the current one first): the first signed frame picks
the key it verifies under (`key_index`), and the connection then signs and
verifies with that key only, so an agent holding the previous secret keeps
understanding the brain's frames.

Every violation raises `RemoteProtocolError` carrying the WebSocket close
code to send, and moves the connection to CLOSED; later calls raise
`LocalProtocolError`. Calling a method in the wrong state is our bug and
raises `LocalProtocolError` at once.
"""

from __future__ import annotations

import base64
import enum
import json
import os
import secrets
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

import cattrs
import orjson

from ..close import CloseCode
from ..errors import LocalProtocolError, RemoteProtocolError
from . import frames as f
from .replay import ReplayGuard
from .signing import SessionBinding, sign, verify

__all__ = [
    "TRANSITIONS",
    "AgentProtocol",
    "Role",
    "State",
]

DEFAULT_MAX_FRAME: Final = 1024 * 1024


class Role(enum.Enum):
    BRAIN = "brain"
    AGENT = "agent"


class State(enum.Enum):
    START = "start"
    AWAIT_HELLO = "await_hello"
    HELLO_RECEIVED = "hello_received"
    AWAIT_HELLO_ACK = "await_hello_ack"
    OPEN = "open"
    CLOSED = "closed"


# (role, state, what happens) -> next state. Anything not listed is an error:
# a RemoteProtocolError for something received, a LocalProtocolError for
# something we tried.
TRANSITIONS: Final[dict[tuple[Role, State, str], State]] = {
    (Role.BRAIN, State.AWAIT_HELLO, "recv hello"): State.HELLO_RECEIVED,
    (Role.BRAIN, State.HELLO_RECEIVED, "send hello_ack"): State.OPEN,
    (Role.BRAIN, State.OPEN, "recv signed"): State.OPEN,
    (Role.BRAIN, State.OPEN, "send signed"): State.OPEN,
    (Role.AGENT, State.START, "send hello"): State.AWAIT_HELLO_ACK,
    (Role.AGENT, State.AWAIT_HELLO_ACK, "recv hello_ack"): State.OPEN,
    (Role.AGENT, State.OPEN, "recv signed"): State.OPEN,
    (Role.AGENT, State.OPEN, "send signed"): State.OPEN,
}

_INITIAL: Final = {Role.BRAIN: State.AWAIT_HELLO, Role.AGENT: State.START}


# Payloads made only of strings, integers and booleans (the envelope is too):
# signing them needs no look for floats.
_FLOAT_FREE: Final = frozenset({f.EventBatchAck, f.CommandAck, f.Error})

_second_text: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text


def _now_iso(now: float) -> str:
    """``now`` as ISO 8601 UTC with microseconds and a Z (every sent frame's ts)."""
    second = int(now)
    micro = round((now - second) * 1_000_000)
    if micro == 1_000_000:  # rounded up into the next second
        second, micro = second + 1, 0
    global _second_text  # replaced whole, so threads never see half of it
    cached = _second_text
    if cached[0] != second:
        cached = _second_text = (
            second,
            datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        )
    return f"{cached[1]}.{micro:06d}Z"


class _RandomPool:
    """Random bytes from os.urandom, drawn 64 KiB at a time.

    Every frame we send takes 28 fresh bytes (its id and nonce); a system
    call per frame would also let go of the GIL each time, and getting it
    back while other threads run costs more than the call.
    """

    def __init__(self, size: int = 65536) -> None:
        self._size = size
        self._pool = b""
        self._at = 0

    def reset(self) -> None:
        self._pool, self._at = b"", 0

    def take(self, n: int) -> bytes:
        if self._at + n > len(self._pool):
            self._pool, self._at = os.urandom(self._size), 0
        chunk = self._pool[self._at : self._at + n]
        self._at += n
        return chunk


_random = _RandomPool()
os.register_at_fork(after_in_child=_random.reset)  # a child draws its own


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class AgentProtocol:
    """State, signing and replay checks of one connection, for one role."""

    def __init__(
        self,
        role: Role,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME,
        key: bytes | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.role = role
        self.state = _INITIAL[role]
        self.max_frame_size = max_frame_size
        self._key = key  # the agent knows it up front; the brain after hello
        # The brain's other keys, until the first signed frame picks one.
        self._other_keys: tuple[bytes, ...] = ()
        self.key_index = 0  # which of the keys given to `accept` the peer holds
        self._clock = clock
        self.binding: SessionBinding | None = None
        self.hello: f.Hello | None = None
        self.peer_proven = False  # a signed frame from the peer verified
        self._send_seq = 0
        self._guard = ReplayGuard()
        self._may_receive = f.BRAIN_TO_AGENT if role is Role.AGENT else f.AGENT_TO_BRAIN
        self._may_send = f.AGENT_TO_BRAIN if role is Role.AGENT else f.BRAIN_TO_AGENT

    # -- state table -------------------------------------------------------------

    def _move(self, what: str, *, remote: bool) -> None:
        nxt = TRANSITIONS.get((self.role, self.state, what))
        if nxt is None:
            if self.state is State.CLOSED or not remote:
                raise LocalProtocolError(
                    f"{self.role.value} cannot {what} in state {self.state.value}",
                    reason="internal",
                )
            raise self._fail(
                f"unexpected {what.removeprefix('recv ')} in state {self.state.value}",
                "unexpected_frame",
                CloseCode.PROTOCOL_ERROR,
            )
        self.state = nxt

    def _fail(self, message: str, reason: str, close_code: CloseCode) -> RemoteProtocolError:
        self.state = State.CLOSED
        return RemoteProtocolError(message, reason=reason, close_code=close_code)

    def close(self) -> None:
        self.state = State.CLOSED

    # -- receiving -----------------------------------------------------------------

    def receive_message(self, data: bytes | str) -> f.Frame:
        """Parse and check one whole WebSocket message."""
        if self.state is State.CLOSED:
            raise LocalProtocolError("connection is closed", reason="internal")
        size = len(data.encode() if isinstance(data, str) else data)
        if size > self.max_frame_size:
            raise self._fail(
                f"frame of {size} bytes is over the {self.max_frame_size}-byte limit",
                "too_large",
                CloseCode.TOO_LARGE,
            )
        # orjson first (several times faster); the standard library for
        # what orjson refuses (its messages, and inputs it reads otherwise).
        exact = False
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            obj = self._loads_exact(data)
            exact = True
        if not isinstance(obj, dict):
            raise self._fail("frame must be a JSON object", "bad_frame", CloseCode.INVALID_DATA)
        frame_type = obj.get("type")
        if not isinstance(frame_type, str):
            raise self._fail("frame has no type", "bad_frame", CloseCode.INVALID_DATA)
        if self.state in (State.AWAIT_HELLO, State.AWAIT_HELLO_ACK):
            if not exact:  # unsigned, so nothing checks the fast parse: re-read
                obj = self._loads_exact(data)
            return self._receive_handshake(frame_type, obj)
        if frame_type not in self._may_receive:
            self._move(f"recv {frame_type}", remote=True)  # raises: not in the table
        return self._receive_signed(frame_type, obj, data if not exact else None)

    def _loads_exact(self, data: bytes | str) -> Any:
        """The reference parse (the standard library, as z4j-core's)."""
        try:
            return json.loads(data, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise self._fail(
                f"frame is not JSON: {exc}", "bad_json", CloseCode.INVALID_DATA
            ) from None

    def _receive_handshake(self, frame_type: str, obj: dict[str, Any]) -> f.Frame:
        expected = "hello" if self.role is Role.BRAIN else "hello_ack"
        if frame_type != expected:
            raise self._fail(
                f"first frame must be {expected}, got {frame_type[:40]!r}",
                "unexpected_frame",
                CloseCode.PROTOCOL_ERROR,
            )
        payload = obj.get("payload")
        version = payload.get("protocol_version") if isinstance(payload, dict) else None
        if version != f.PROTOCOL_VERSION:
            raise self._fail(
                f"protocol version {version!r} is not {f.PROTOCOL_VERSION!r}",
                "bad_version",
                CloseCode.VERSION,
            )
        frame = self._structure(frame_type, obj)
        self._move(f"recv {frame_type}", remote=True)
        if isinstance(frame.payload, f.Hello):
            self.hello = frame.payload
        elif isinstance(frame.payload, f.HelloAck):
            ack = frame.payload
            self.binding = SessionBinding(
                agent_id=ack.agent_id, project_id=ack.project_id, session_id=ack.session_id
            )
        return frame

    def _receive_signed(
        self, frame_type: str, obj: dict[str, Any], fast_parsed: bytes | str | None
    ) -> f.Frame:
        """Verify, guard, structure. ``fast_parsed``: the message, if orjson read it."""
        assert self._key is not None and self.binding is not None
        if obj.get("v") != 2:
            raise self._fail(
                f"frame version {obj.get('v')!r} is not 2", "bad_version", CloseCode.VERSION
            )
        try:
            try:
                self._verify(obj)
            except RemoteProtocolError as exc:
                # orjson reads integers beyond 64 bits as floats: the agent
                # signed what the standard library reads, so check that too.
                if fast_parsed is None or exc.reason != "bad_signature":
                    raise
                exact = self._loads_exact(fast_parsed)
                self._verify(exact)
                obj = exact
            self._guard.check(
                seq=obj.get("seq"), nonce=obj.get("nonce"), ts=obj.get("ts"), now=self._clock()
            )
        except RemoteProtocolError:
            self.state = State.CLOSED
            raise
        frame = self._structure(frame_type, obj)
        self._move("recv signed", remote=True)
        self.peer_proven = True
        return frame

    def _verify(self, obj: dict[str, Any]) -> None:
        """Check the signature; the first time, under each key offered (see above)."""
        assert self._key is not None and self.binding is not None
        if not self._other_keys:
            verify(obj, self._key, self.binding)
            return
        keys = (self._key, *self._other_keys)
        for index, key in enumerate(keys):
            try:
                verify(obj, key, self.binding)
            except RemoteProtocolError as exc:
                if exc.reason != "bad_signature" or index == len(keys) - 1:
                    raise
                continue
            self._key, self._other_keys, self.key_index = key, (), index
            return

    def _structure(self, frame_type: str, obj: dict[str, Any]) -> f.Frame:
        try:
            payload = f.structure_payload(frame_type, obj.get("payload", {}))
            return f.Frame(
                id=obj.get("id"),  # type: ignore[arg-type]
                payload=payload,
                seq=obj.get("seq"),
                ts=obj.get("ts"),
                nonce=obj.get("nonce"),
            )
        except (TypeError, ValueError, KeyError, cattrs.BaseValidationError) as exc:
            raise self._fail(
                f"bad {frame_type} frame: {_describe(exc)}", "bad_payload", CloseCode.INVALID_DATA
            ) from None

    # -- sending -----------------------------------------------------------------------

    def hello_message(self, hello: f.Hello, *, frame_id: str | None = None) -> bytes:
        """Agent: the unsigned hello that opens a connection."""
        self._move("send hello", remote=False)
        self.hello = hello
        frame = {
            "v": 2,
            "id": frame_id or f"hello_{secrets.token_hex(8)}",
            "ts": None,
            "type": "hello",
            "payload": f.unstructure_payload(hello),
        }
        return json.dumps(
            frame, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode()

    def accept(
        self,
        *,
        key: bytes,
        other_keys: tuple[bytes, ...] = (),
        agent_id: str,
        project_id: str,
        session_id: str | None = None,
        brain_version: str,
        heartbeat_interval_seconds: int = 10,
        max_frame_size_bytes: int | None = None,
    ) -> bytes:
        """Brain: accept the hello; returns the unsigned hello_ack to send.

        ``other_keys``: keys the peer may hold instead of ``key`` (a signing
        secret in rotation); its first signed frame settles which."""
        ack = f.HelloAck(
            protocol_version=f.PROTOCOL_VERSION,
            brain_version=brain_version,
            agent_id=agent_id,
            project_id=project_id,
            session_id=session_id or str(uuid.uuid4()),
            heartbeat_interval_seconds=heartbeat_interval_seconds,
            max_frame_size_bytes=max_frame_size_bytes or self.max_frame_size,
        )
        self._move("send hello_ack", remote=False)
        self._key = key
        self._other_keys = other_keys
        self.binding = SessionBinding(
            agent_id=ack.agent_id, project_id=ack.project_id, session_id=ack.session_id
        )
        frame = {
            "v": 2,
            "id": f"ack_{secrets.token_hex(8)}",
            "ts": _now_iso(self._clock()),
            "type": "hello_ack",
            "payload": f.unstructure_payload(ack),
        }
        return json.dumps(
            frame, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode()

    def send(self, payload: f.Payload, *, frame_id: str | None = None) -> bytes:
        """A signed frame carrying ``payload``, ready to send as one message."""
        frame_type = f.TYPE_OF[type(payload)]
        if frame_type not in self._may_send:
            raise LocalProtocolError(
                f"a {self.role.value} does not send {frame_type}", reason="internal"
            )
        self._move("send signed", remote=False)
        assert self._key is not None and self.binding is not None
        self._send_seq += 1
        frame: dict[str, Any] = {
            "v": 2,
            "id": frame_id or f"{frame_type[:3]}_{_random.take(12).hex()}",
            "ts": _now_iso(self._clock()),
            "nonce": base64.urlsafe_b64encode(_random.take(16)).rstrip(b"=").decode(),
            "seq": self._send_seq,
            "type": frame_type,
            "payload": f.unstructure_payload(payload),
        }
        frame["hmac"] = sign(  # refuses NaN
            frame, self._key, self.binding, float_free=type(payload) in _FLOAT_FREE
        )
        try:
            return orjson.dumps(frame)
        except TypeError:  # an integer beyond 64 bits
            return json.dumps(frame, separators=(",", ":"), ensure_ascii=False).encode()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return str(exc) or type(exc).__name__
