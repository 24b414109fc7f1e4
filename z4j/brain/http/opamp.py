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
5. Otherwise: the stored state and desired configuration (one store call)
   → `receive` → the new state is written, the reply sent (gzipped when
   ``Accept-Encoding`` allows it). The core offers the configuration until
   the agent reports its hash APPLIED; the configuration's status follows
   what the agent reports about that hash, written only when it moves.

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

Heavy work does not hold up other clients (tests/test_abuse_opamp.py): a
body over `HEAVY_BYTES` (or gzipped) is inflated on a worker thread, its
fields counted a slice at a time on the loop (a crowded message is refused
before protobuf's parser, which holds the GIL, ever sees it), and a
message or stored state over it is folded on a worker thread. Heavy
requests take turns, one at a time over all agents: what protobuf does
with megabytes holds the GIL in C for milliseconds at a time, and two or
three of those at once add up to a stall.
"""

from __future__ import annotations

import functools
import gzip
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

import attrs
import trio
import trio.lowlevel

from ... import keys
from ...protocol.errors import LocalProtocolError
from ...protocol.opamp import (
    STATUS_PARTS,
    FieldCount,
    MessageTooLarge,
    OpampDecodeError,
    Outcome,
    Transport,
    bad_request,
    decode_agent_to_server,
    decode_http_body,
    encode_server_to_agent,
    payload,
    receive,
    retry_after_seconds,
)
from ...protocol.opamp import opamp_pb2 as pb
from ...protocol.opamp.remote_config import ConfigFile, ConfigProgress, RemoteConfig, progress
from ...protocol.opamp.state import AgentState
from ...stats import BrainStats, ThrottledLog
from ...store import opamp as stored
from ...store.base import OpampAgent, OpampConfig, Store, StoreUnavailable
from ._request import Receive, Scope, Send
from .auth import credentials, header

__all__ = ["OPAMP_PATH", "OpampEndpoint", "message_type"]

log = logging.getLogger("z4j.opamp")

OPAMP_PATH: Final = "/v1/opamp"
PROTOBUF: Final = "application/x-protobuf"
RETRY_AFTER_SECONDS: Final = 5.0
SKIPPED_MAX: Final = 100_000  # agents whose skipped sequence number one replica remembers
HEAVY_BYTES: Final = 64 * 1024  # past this, decoding and folding run on a worker thread
HEAVY_WORKERS: Final = 1  # worker threads doing heavy OpAMP work at once, in all
COUNT_SLICE: Final = 1_000  # fields counted between two looks at the event loop
CONFIG_CACHE_BYTES: Final = 16 * 1024 * 1024  # desired configurations kept built, by hash

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

    Each is kept with the version of the row it was applied to (its
    ``last_seen``, sequence number and full-state requests, which every
    write changes): it is used only while the stored row is still that one
    (another replica's write makes it stale, and the stored row wins).
    Bounded: the oldest entry goes first, which costs that agent one full
    report.
    """

    def __init__(self, limit: int = SKIPPED_MAX) -> None:
        self._limit = limit
        self._entries: OrderedDict[tuple[uuid.UUID, str], tuple[_Version, int]] = OrderedDict()

    def sequence(self, row: OpampAgent) -> int | None:
        """The number skipped since ``row`` was written, if any."""
        entry = self._entries.get((row.project_id, row.instance_uid))
        return entry[1] if entry is not None and entry[0] == _version(row) else None

    def remember(self, row: OpampAgent, sequence_num: int) -> None:
        key = (row.project_id, row.instance_uid)
        self._entries.pop(key, None)
        self._entries[key] = (_version(row), sequence_num)
        while len(self._entries) > self._limit:
            self._entries.popitem(last=False)

    def forget(self, project_id: uuid.UUID, instance_uid: bytes) -> None:
        self._entries.pop((project_id, instance_uid.hex()), None)


_Version = tuple[float, int, int]


def _version(row: OpampAgent) -> _Version:
    return row.last_seen, row.sequence_num, row.full_state_requests


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
        on_change: Callable[[uuid.UUID, str, str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``on_change(project_id, instance_uid_hex, what)``: told after each
        write that changes what the API shows of an agent (``state``: its
        row; ``config``: its configuration's status), not per poll; the
        dashboard's live feed (None: no one to tell)."""
        self._store = store
        self._master = master_secret
        self._stats = stats
        self._limit = max_message_bytes
        self._touch_seconds = heartbeat_window_seconds / 3
        self._store_ready = store_ready
        self._clock = clock
        self._on_change = on_change
        self._skipped = _Skipped()
        self._heavy = trio.CapacityLimiter(HEAVY_WORKERS)
        self._heavy_turn = trio.Lock()
        self._log = ThrottledLog(log)
        self._configs: OrderedDict[str, RemoteConfig] = OrderedDict()
        self._config_bytes = 0

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
        encoding = header(request_headers, b"content-encoding")
        if len(body) > HEAVY_BYTES or encoding is not None:
            async with self._heavy_turn:  # one at a time: see the module docstring
                reply = await self._answer(project_id, body, encoding, heavy=True)
        else:
            reply = await self._answer(project_id, body, encoding, heavy=False)
        if reply is None:
            self._reject("too_large")
            return 413, [], b""
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

    async def _answer(
        self, project_id: uuid.UUID, body: bytes, encoding: str | None, *, heavy: bool
    ) -> pb.ServerToAgent | None:
        """The reply to a body (None: it inflates past the limit)."""
        try:
            if heavy:
                message = await self._decode_heavy(body, encoding)
            else:
                message = decode_http_body(body, content_encoding=encoding, limit=self._limit)
        except MessageTooLarge:
            return None
        except OpampDecodeError as error:
            self._reject(error.reason)
            return bad_request(error)
        self._stats.opamp_messages[message_type(message)] += 1
        return await self._apply(project_id, message, heavy=heavy)

    async def _decode_heavy(self, body: bytes, encoding: str | None) -> pb.AgentToServer:
        """Inflate on a worker thread (zlib lets go of the GIL); count the
        fields a slice at a time on the loop (Python in a thread would hold
        the GIL against it); parse what is left, which the count bounds."""
        data = await trio.to_thread.run_sync(
            functools.partial(payload, body, content_encoding=encoding, limit=self._limit),
            limiter=self._heavy,
        )
        count = FieldCount(data)
        while not count.advance(COUNT_SLICE):
            await trio.lowlevel.checkpoint()
        return decode_agent_to_server(data, limit=self._limit, counted=True)

    @staticmethod
    def _fold(
        project_id: uuid.UUID,
        row: OpampAgent | None,
        skipped: int | None,
        message: pb.AgentToServer,
        now: float,
        desired: RemoteConfig | None,
    ) -> tuple[Outcome, OpampAgent | None]:
        """`receive`, and the row to write when the agent is new or changed
        (None: only ``last_seen`` may be due). Pure: it may run on a thread."""
        prior = None
        if row is not None:
            prior = stored.state_of(row)
            if skipped is not None:
                prior = attrs.evolve(prior, sequence_num=skipped)
        outcome = receive(
            prior,
            message,
            transport=Transport.HTTP,
            new_instance_uid=lambda: uuid.uuid4().bytes,
            desired_config=desired,
        )
        if row is not None and not outcome.changed:
            return outcome, None
        state = outcome.state
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
        return outcome, record

    async def _apply(
        self, project_id: uuid.UUID, message: pb.AgentToServer, *, heavy: bool
    ) -> pb.ServerToAgent:
        """Load, `receive`, write what the writing rule asks for; the reply.
        ``heavy``: the message came in a large or compressed body."""
        now = self._clock()
        uid = message.instance_uid
        row, config = await self._store.load_opamp_agent(project_id, uid)
        skipped = None if row is None else self._skipped.sequence(row)
        desired = await self._desired(project_id, uid, config, message)
        fold = functools.partial(self._fold, project_id, row, skipped, message, now, desired)
        if heavy or (row is not None and len(row.state) > HEAVY_BYTES):
            outcome, record = await trio.to_thread.run_sync(fold, limiter=self._heavy)
        else:
            outcome, record = fold()
        state = outcome.state
        if row is None or record is not None:
            assert record is not None
            moved = row is not None and state.instance_uid != uid
            await self._store.save_opamp_agent(record, replaces=uid if moved else None)
            self._skipped.forget(project_id, uid)
            self._stats.opamp_writes["full"] += 1
            if self._on_change is not None:
                self._on_change(project_id, record.instance_uid, "state")
        elif now - row.last_seen >= self._touch_seconds:
            await self._store.touch_opamp_agent(
                project_id, uid, sequence_num=state.sequence_num, now=now
            )
            self._skipped.forget(project_id, uid)
            self._stats.opamp_writes["last_seen"] += 1
        else:
            self._skipped.remember(row, state.sequence_num)
            self._stats.opamp_writes["coalesced"] += 1
        if config is not None:
            await self._follow(project_id, config, state, now)
        return outcome.reply

    async def _desired(
        self,
        project_id: uuid.UUID,
        uid: bytes,
        config: OpampConfig | None,
        message: pb.AgentToServer,
    ) -> RemoteConfig | None:
        """The configuration for the core to offer, if it may have to.

        The store leaves the files out of an applied configuration: the core
        would not offer it, unless this very message reports otherwise (a
        restarted or rolled-back agent), and only then are they read.
        """
        if config is None:
            return None
        if not config.files:
            if not message.HasField("remote_config_status"):
                return None
            digest = bytes.fromhex(config.config_hash)
            if progress(message.remote_config_status, digest) is ConfigProgress.APPLIED:
                return None
            config = await self._store.get_opamp_config(project_id, uid)
            if config is None or not config.files:
                return None
        return self._remote_config(config)

    def _remote_config(self, config: OpampConfig) -> RemoteConfig:
        """The configuration as the core offers it, built once per hash (hashing
        the files again on every poll would cost as much as they weigh); the
        cache is bounded by the bytes it holds."""
        built = self._configs.get(config.config_hash)
        if built is not None:
            self._configs.move_to_end(config.config_hash)
            return built
        built = RemoteConfig(
            {
                name: ConfigFile(body=file["body"].encode(), content_type=file["content_type"])
                for name, file in config.files.items()
            }
        )
        size = sum(len(file.body) for _, file in built.files)
        if size <= CONFIG_CACHE_BYTES:
            self._configs[config.config_hash] = built
            self._config_bytes += size
            while self._config_bytes > CONFIG_CACHE_BYTES:
                _, dropped = self._configs.popitem(last=False)
                self._config_bytes -= sum(len(file.body) for _, file in dropped.files)
        return built

    async def _follow(
        self, project_id: uuid.UUID, config: OpampConfig, state: AgentState, now: float
    ) -> None:
        """Write the configuration's status when the agent's report about its
        hash moves it (a change the agent reported, so no write per poll)."""
        reported = None
        if state.remote_config_status is not None:
            reported = pb.RemoteConfigStatus.FromString(state.remote_config_status)
        digest = bytes.fromhex(config.config_hash)
        status = progress(reported, digest)
        error = ""
        if status is ConfigProgress.FAILED and reported is not None:
            error = reported.error_message
        if (status.value, error) == (config.status, config.error_message):
            return
        await self._store.set_opamp_config_status(
            project_id,
            state.instance_uid,  # the new one, if the agent was just given one
            digest,
            status=status.value,
            error_message=error,
            now=now,
        )
        self._stats.opamp_writes["config_status"] += 1
        if self._on_change is not None:
            self._on_change(project_id, state.instance_uid.hex(), "config")


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
