"""``POST /v1/opamp``: OpAMP's plain HTTP transport over the sans-IO core.

A thin adapter: the rules are `z4j.protocol.opamp` (`decode_http_body`,
`receive`, `encode_server_to_agent`); this module checks the request,
loads and stores the agent's state (store/opamp.py, through the store's
threads) and answers. In order:

1. ``Authorization: Bearer`` must name an OpAMP token (``z4j opamp token
   create``): else 401 before the body is read. The token's project scopes
   everything after it: an agent is (project, instance_uid), so a token never
   reads or writes another project's agents, whatever instance_uid it sends.
2. ``Content-Type`` must be ``application/x-protobuf`` (415): OpAMP's HTTP
   transport is exactly that; anything else would be a WebSocket start.
3. The body, and what gzip inflates it to, is bounded by
   Z4J_OPAMP_MAX_MESSAGE_BYTES: 413 past it (read no further).
4. A malformed message is answered 200 with a ServerToAgent whose
   error_response is BAD_REQUEST: the specification's "Bad Request" asks for
   that message, and clients read a ServerToAgent only from a 200 (opamp-go
   and the Python client drop any other status's body).
5. Otherwise: the stored state → `receive` → the new state is written, the
   reply sent (gzipped when ``Accept-Encoding`` allows it).

Writes scale with changes. When `receive` reports a change (or the agent
is new) the whole row is written. When nothing changed but the sequence
number, ``last_seen`` is written at most once per a third of
Z4J_OPAMP_HEARTBEAT_WINDOW_SECONDS (so ``online`` is never late by more
than that), and the sequence number with it. In between, this replica
remembers the number it skipped (`_Skipped`), so that the agent's next
poll is in sequence; another replica, or this one after a restart, reads
the stored number, sees a gap, and asks for the full state once (the
cost the core's docstring names). A store that is down or not migrated yet
gets 503 with ``Retry-After``, as the transport allows.
"""

from __future__ import annotations

import gzip
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

import attrs
import trio

from ... import keys
from ...protocol.errors import LocalProtocolError
from ...protocol.opamp import (
    STATUS_PARTS,
    AgentState,
    MessageTooLarge,
    OpampDecodeError,
    Transport,
    bad_request,
    decode_http_body,
    encode_server_to_agent,
    receive,
    retry_after_seconds,
)
from ...protocol.opamp import opamp_pb2 as pb
from ...stats import BrainStats, ThrottledLog
from ...store import opamp as stored
from ...store.base import OpampAgent, Store, StoreUnavailable
from ._request import Receive, Scope, Send
from .auth import credentials, header

__all__ = ["OPAMP_PATH", "OpampEndpoint", "message_type"]

log = logging.getLogger("z4j.opamp")

OPAMP_PATH: Final = "/v1/opamp"
PROTOBUF: Final = "application/x-protobuf"
RETRY_AFTER_SECONDS: Final = 5.0
SKIPPED_MAX: Final = 100_000  # agents whose skipped sequence number one replica remembers

Headers = list[tuple[bytes, bytes]]


def message_type(message: pb.AgentToServer) -> str:
    """The metric label of a message: disconnect, status (carries a part) or heartbeat."""
    if message.HasField("agent_disconnect"):
        return "disconnect"
    if any(message.HasField(part.value) for part in STATUS_PARTS):
        return "status"
    return "heartbeat"


class _Skipped:
    """The sequence numbers this replica answered but did not write, per agent.

    Each is kept with the row it was applied to: it is used only while the
    stored row is still exactly that one (another replica's write makes it
    stale, and the stored row wins). Bounded: the oldest entry goes first,
    which costs that agent one full report.
    """

    def __init__(self, limit: int = SKIPPED_MAX) -> None:
        self._limit = limit
        self._entries: OrderedDict[tuple[uuid.UUID, bytes], tuple[OpampAgent, int]] = OrderedDict()

    def state(self, row: OpampAgent) -> AgentState:
        state = stored.state_of(row)
        entry = self._entries.get((row.project_id, state.instance_uid))
        if entry is not None and entry[0] == row:
            return attrs.evolve(state, sequence_num=entry[1])
        return state

    def remember(self, row: OpampAgent, sequence_num: int) -> None:
        key = (row.project_id, bytes.fromhex(row.instance_uid))
        self._entries.pop(key, None)
        self._entries[key] = (row, sequence_num)
        while len(self._entries) > self._limit:
            self._entries.popitem(last=False)

    def forget(self, project_id: uuid.UUID, instance_uid: bytes) -> None:
        self._entries.pop((project_id, instance_uid), None)


class OpampEndpoint:
    """The ASGI app for ``POST /v1/opamp`` (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        master_secret: bytes,
        stats: BrainStats,
        *,
        max_message_bytes: int,
        heartbeat_window_seconds: float,
        store_ready: trio.Event | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._master = master_secret
        self._stats = stats
        self._limit = max_message_bytes
        self._touch_seconds = heartbeat_window_seconds / 3
        self._store_ready = store_ready
        self._clock = clock
        self._skipped = _Skipped()
        self._log = ThrottledLog(log)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            status, headers, body = await self._handle(scope, receive)
        except StoreUnavailable as exc:
            self._log.warning("store", "OpAMP request answered 503, store unavailable: %s", exc)
            status, body = 503, b""
            headers = [(b"retry-after", retry_after_seconds(RETRY_AFTER_SECONDS).encode())]
        headers = [
            *headers,
            (b"cache-control", b"no-store"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _reject(self, reason: str) -> None:
        self._stats.opamp_rejected[reason] += 1

    async def _handle(self, scope: Scope, receive: Receive) -> tuple[int, Headers, bytes]:
        request_headers = scope["headers"]
        if scope["method"] != "POST":
            return 405, [(b"allow", b"POST")], b""
        if self._store_ready is not None and not self._store_ready.is_set():
            raise StoreUnavailable("the store is not migrated yet")
        token, _ = credentials(request_headers)
        project_id = None
        if token is not None:
            project_id = await self._store.opamp_token_project(
                keys.opamp_token_hash(self._master, token)
            )
        if project_id is None:
            self._reject("unauthorized")
            return 401, [(b"www-authenticate", b'Bearer realm="z4j opamp"')], b""
        media_type = (header(request_headers, b"content-type") or "").partition(";")[0]
        if media_type.strip().lower() != PROTOBUF:
            self._reject("content_type")
            return 415, [(b"accept", PROTOBUF.encode())], b""
        body = await _read_body(receive, request_headers, self._limit)
        if body is None:
            self._reject("too_large")
            return 413, [], b""
        try:
            message = decode_http_body(
                body,
                content_encoding=header(request_headers, b"content-encoding"),
                limit=self._limit,
            )
        except MessageTooLarge:
            self._reject("too_large")
            return 413, [], b""
        except OpampDecodeError as error:
            self._reject(error.reason)
            reply = bad_request(error)
        else:
            self._stats.opamp_messages[message_type(message)] += 1
            reply = await self._apply(project_id, message)
        try:
            data = encode_server_to_agent(reply, limit=self._limit)
        except LocalProtocolError as exc:  # not sent at all, as the specification says
            self._reject(exc.reason)
            return 500, [], b""
        headers: Headers = [(b"content-type", PROTOBUF.encode())]
        if _accepts_gzip(header(request_headers, b"accept-encoding")):
            data = gzip.compress(data, compresslevel=6)
            headers.append((b"content-encoding", b"gzip"))
        return 200, headers, data

    async def _apply(self, project_id: uuid.UUID, message: pb.AgentToServer) -> pb.ServerToAgent:
        """Load, `receive`, write what the writing rule asks for; the reply."""
        now = self._clock()
        uid = message.instance_uid
        row = await self._store.get_opamp_agent(project_id, uid)
        outcome = receive(
            None if row is None else self._skipped.state(row),
            message,
            transport=Transport.HTTP,
            new_instance_uid=lambda: uuid.uuid4().bytes,
        )
        state = outcome.state
        if row is None or outcome.changed:
            disconnected_at = None
            if not state.connected:
                kept = None if row is None else row.disconnected_at
                disconnected_at = now if kept is None else kept
            record = stored.record_of(
                project_id,
                state,
                transport=Transport.HTTP.value,
                first_seen=now if row is None else row.first_seen,
                last_seen=now,
                disconnected_at=disconnected_at,
            )
            moved = row is not None and state.instance_uid != uid
            await self._store.save_opamp_agent(record, replaces=uid if moved else None)
            self._skipped.forget(project_id, uid)
            self._stats.opamp_writes["full"] += 1
        elif now - row.last_seen >= self._touch_seconds:
            await self._store.touch_opamp_agent(
                project_id, uid, sequence_num=state.sequence_num, now=now
            )
            self._skipped.forget(project_id, uid)
            self._stats.opamp_writes["last_seen"] += 1
        else:
            self._skipped.remember(row, state.sequence_num)
            self._stats.opamp_writes["coalesced"] += 1
        return outcome.reply


async def _read_body(receive: Receive, headers: Headers, limit: int) -> bytes | None:
    """The request body; None as soon as it is known to exceed ``limit``."""
    length = header(headers, b"content-length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            break
        chunk = event.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not event.get("more_body"):
            break
    return b"".join(chunks)


def _accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether ``Accept-Encoding`` allows gzip (named, or ``*``, with q above 0)."""
    for item in (accept_encoding or "").split(","):
        coding, *params = (part.strip().lower() for part in item.split(";"))
        if coding not in ("gzip", "x-gzip", "*"):
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q > 0:
            return True
    return False
