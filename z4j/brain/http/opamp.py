"""``POST /v1/opamp``: OpAMP's plain HTTP transport.

A thin adapter: what a message does to an agent is `OpampFleet`
(z4j/brain/opamp_fleet.py, shared with the WebSocket transport); this
module checks the request and answers. In order:

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
5. Otherwise the fleet applies it and the reply goes back (gzipped when
   ``Accept-Encoding`` allows it). A store that is down or not migrated yet
   gets 503 with ``Retry-After``, as the transport allows.

A body over `HEAVY_BYTES`, or gzipped, takes the fleet's heavy path, one
such request at a time (`OpampFleet.heavy_turn`).
"""

from __future__ import annotations

import gzip
import logging
import uuid
from typing import Final

import trio

from ..._decimal import parse_decimal
from ...protocol.errors import LocalProtocolError
from ...protocol.opamp import (
    MessageTooLarge,
    OpampDecodeError,
    Transport,
    decode_http_body,
    encode_server_to_agent,
    retry_after_seconds,
)
from ...protocol.opamp import opamp_pb2 as pb
from ...stats import BrainStats, ThrottledLog
from ...store.base import StoreUnavailable
from ..opamp_fleet import HEAVY_BYTES, OpampFleet
from ._request import Receive, Scope, Send
from .auth import credentials, header

__all__ = ["OPAMP_PATH", "PROTOBUF", "RETRY_AFTER_SECONDS", "OpampEndpoint"]

log = logging.getLogger("z4j.opamp")

OPAMP_PATH: Final = "/v1/opamp"
PROTOBUF: Final = "application/x-protobuf"
RETRY_AFTER_SECONDS: Final = 5.0

Headers = list[tuple[bytes, bytes]]


class OpampEndpoint:
    """The ASGI app for ``POST /v1/opamp`` (see the module docstring)."""

    def __init__(
        self,
        fleet: OpampFleet,
        stats: BrainStats,
        *,
        store_ready: trio.Event | None = None,
    ) -> None:
        self._fleet = fleet
        self._stats = stats
        self._limit = fleet.limit
        self._store_ready = store_ready
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
        project_id = await self._fleet.project_of(token)
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
            async with self._fleet.heavy_turn:  # one at a time: see OpampFleet
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
                message = await self._fleet.decode_heavy(body, encoding)
            else:
                message = decode_http_body(body, content_encoding=encoding, limit=self._limit)
        except MessageTooLarge:
            return None
        except OpampDecodeError as error:
            return self._fleet.rejected(error)
        applied = await self._fleet.apply(
            project_id, message, transport=Transport.HTTP, heavy=heavy
        )
        return applied.reply


async def _read_body(receive: Receive, headers: Headers, limit: int) -> bytes | None:
    """The request body; None as soon as it is known to exceed ``limit``."""
    length = header(headers, b"content-length")
    declared = parse_decimal(length.strip()) if length is not None else None
    if declared is not None and declared > limit:
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
