"""Untrusted bytes to an `AgentToServer`, and a `ServerToAgent` back to bytes.

Everything an OpAMP endpoint does to a body or a WebSocket message before the
per-agent rules (`state`) see it: the size limit, gzip, the WebSocket header,
protobuf, and the one check protobuf cannot make (``instance_uid`` is 16
bytes). Both transports carry the same protobuf; they differ only in the
wrapping:

- plain HTTP: the body, gzip-compressed when ``Content-Encoding: gzip``;
- WebSocket: each binary message is a varint header, 0 in this version of
  OpAMP, followed by the protobuf (possibly empty: all fields unset).

The limit applies to what we would hold in memory: the decompressed body, or
the whole WebSocket message. `inflate_gzip` stops one byte past the limit, so
a gzip bomb costs at most ``limit + 1`` bytes of output, never its full size.

Every fault of the peer raises `OpampDecodeError` (a `RemoteProtocolError`)
and nothing else: answer it with `replies.bad_request`. Its subclass
`MessageTooLarge` is the one the transports answer differently (HTTP 413,
WebSocket close 1009). ``reason`` labels the rejection for
``z4j_opamp_frames_rejected_total{reason}``: ``too_large``, ``encoding``,
``gzip``, ``header``, ``protobuf``, ``instance_uid``, ``too_many_elements``.

Bytes are not the only cost: 10 MiB of tiny attributes is a million
objects. protobuf's C parser builds them holding the GIL (200 ms of an
event loop stalled, even from a worker thread), and whoever reads them
after pays again. So before the parser runs, `FieldCount` walks the wire
format: past `MAX_FIELDS` field occurrences, at any depth, the message is
refused unparsed. It counts in steps, so a server can count a large body
a slice at a time between other work (`payload` then `FieldCount` then
``decode_agent_to_server(..., counted=True)``); the one-call decoders count
in one go. After the parse, at most `MAX_ELEMENTS` repeated or mapped
elements (attributes, nested values, health components, config files,
packages, ...) in all. Both counts stop at their bound, so refusing a
crowded message costs at most that many steps.
"""

from __future__ import annotations

import zlib
from typing import Final

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from ..close import CloseCode
from ..errors import LocalProtocolError, RemoteProtocolError
from . import opamp_pb2 as pb
from .flags import AgentFlag

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "INSTANCE_UID_BYTES",
    "MAX_ELEMENTS",
    "MAX_FIELDS",
    "FieldCount",
    "MessageTooLarge",
    "OpampDecodeError",
    "check_size",
    "decode_agent_to_server",
    "decode_http_body",
    "decode_server_to_agent_ws",
    "decode_ws_message",
    "encode_server_to_agent",
    "encode_ws_message",
    "inflate_gzip",
    "payload",
    "ws_payload",
]

DEFAULT_MAX_MESSAGE_BYTES: Final = 10 * 1024 * 1024
"""``Z4J_OPAMP_MAX_MESSAGE_BYTES``'s default: both ways, after decompression."""

INSTANCE_UID_BYTES: Final = 16

MAX_ELEMENTS: Final = 2_000
"""Repeated or mapped elements one AgentToServer may carry, at every depth
together: a real agent sends tens to a few hundred (attributes, a
collector's components, its configuration files)."""

MAX_FIELDS: Final = 20_000
"""Field occurrences, at every depth, counted before the parse: room for
`MAX_ELEMENTS` elements of several fields each."""

_WS_HEADER: Final = b"\x00"  # the varint 0: the only header this OpAMP version defines
_MAX_VARINT_BYTES: Final = 10
_GZIP_ONLY: Final = 16 + zlib.MAX_WBITS  # zlib's wbits for a gzip wrapper, no zlib/raw


class OpampDecodeError(RemoteProtocolError):
    """The agent sent something we cannot read.

    ``instance_uid`` is the agent's, when the message parsed far enough to
    have one (so the error reply can echo it), else empty.
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        instance_uid: bytes = b"",
        close_code: CloseCode | None = None,
    ) -> None:
        super().__init__(message, reason=reason, close_code=close_code)
        self.instance_uid = instance_uid


class MessageTooLarge(OpampDecodeError):
    """Over the limit: HTTP 413, or close 1009 on a WebSocket."""

    def __init__(self, size: str, limit: int) -> None:
        super().__init__(
            f"message is {size} bytes, over the limit of {limit}",
            reason="too_large",
            close_code=CloseCode.TOO_LARGE,
        )
        self.limit = limit


def check_size(size: int, limit: int) -> None:
    """Refuse ``size`` bytes when they pass ``limit`` (a body, a message)."""
    if size > limit:
        raise MessageTooLarge(str(size), limit)


def inflate_gzip(data: bytes, *, limit: int = DEFAULT_MAX_MESSAGE_BYTES) -> bytes:
    """Decompress a gzip body, refusing it as soon as it inflates past ``limit``.

    Concatenated gzip members are one body (as in `gzip.decompress`);
    anything else after the last member, a truncated member or a bad
    checksum is malformed.
    """
    out = bytearray()
    data_left = data
    while True:
        inflater = zlib.decompressobj(wbits=_GZIP_ONLY)
        pending = data_left
        while not inflater.eof:
            try:
                # max_length is never 0 here (0 would mean "no limit").
                chunk = inflater.decompress(pending, limit - len(out) + 1)
            except zlib.error as exc:
                raise OpampDecodeError(f"bad gzip body: {exc}", reason="gzip") from None
            out += chunk
            if len(out) > limit:
                raise MessageTooLarge(f"more than {limit}", limit)
            pending = inflater.unconsumed_tail
            if not chunk and not pending and not inflater.eof:
                raise OpampDecodeError("truncated gzip body", reason="gzip")
        data_left = inflater.unused_data
        if not data_left:
            return bytes(out)


def payload(
    body: bytes,
    *,
    content_encoding: str | None = None,
    limit: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> bytes:
    """An HTTP POST body's protobuf bytes: inflated if gzipped, within ``limit``."""
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("gzip", "x-gzip"):
        return inflate_gzip(body, limit=limit)
    if encoding not in ("", "identity"):
        raise OpampDecodeError(
            f"unsupported Content-Encoding {content_encoding!r}", reason="encoding"
        )
    return body


def decode_http_body(
    body: bytes,
    *,
    content_encoding: str | None = None,
    limit: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> pb.AgentToServer:
    """An HTTP POST body to its `AgentToServer`, inflating it if gzipped."""
    data = payload(body, content_encoding=content_encoding, limit=limit)
    return decode_agent_to_server(data, limit=limit)


def ws_payload(message: bytes, *, limit: int = DEFAULT_MAX_MESSAGE_BYTES) -> bytes:
    """One binary WebSocket message's protobuf bytes: within ``limit``, header 0 removed."""
    check_size(len(message), limit)
    header, offset = _read_varint(message)
    if header != 0:
        raise OpampDecodeError(f"WebSocket header {header}, not 0", reason="header")
    return message[offset:]


def decode_ws_message(
    message: bytes, *, limit: int = DEFAULT_MAX_MESSAGE_BYTES
) -> pb.AgentToServer:
    """One binary WebSocket message (header and protobuf) to its `AgentToServer`."""
    return decode_agent_to_server(ws_payload(message, limit=limit), limit=limit)


def decode_server_to_agent_ws(
    message: bytes, *, limit: int = DEFAULT_MAX_MESSAGE_BYTES
) -> pb.ServerToAgent:
    """The client's side: one binary WebSocket message from a server to its
    `ServerToAgent` (for z4j's tests, benchmarks and conformance suite)."""
    data = ws_payload(message, limit=limit)
    try:
        return pb.ServerToAgent.FromString(data)
    except DecodeError as exc:
        raise OpampDecodeError(f"not a ServerToAgent: {exc}", reason="protobuf") from None


def decode_agent_to_server(
    data: bytes, *, limit: int = DEFAULT_MAX_MESSAGE_BYTES, counted: bool = False
) -> pb.AgentToServer:
    """Protobuf bytes (no header, not compressed) to an `AgentToServer`.

    ``counted``: the caller ran a `FieldCount` over ``data`` to its end.
    Unknown fields are kept and ignored, as protobuf intends: a newer agent
    may send fields this version of OpAMP does not define.
    """
    check_size(len(data), limit)
    if not counted:
        FieldCount(data).advance(MAX_FIELDS + 1)
    message = pb.AgentToServer()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise OpampDecodeError(f"not an AgentToServer: {exc}", reason="protobuf") from None
    uid = message.instance_uid
    _check_elements(message, MAX_ELEMENTS)
    # A client asking us for an id may send a placeholder of any length.
    if len(uid) != INSTANCE_UID_BYTES and not message.flags & AgentFlag.REQUEST_INSTANCE_UID:
        raise OpampDecodeError(
            f"instance_uid is {len(uid)} bytes, not {INSTANCE_UID_BYTES}",
            reason="instance_uid",
            instance_uid=uid,
        )
    return message


class FieldCount:
    """A count of ``data``'s fields through the AgentToServer schema (a
    sub-message's fields count too; bytes and strings are skipped by their
    length), resumable: `advance` counts some, and says whether it is done.
    Where the wire format goes wrong the count stops: the parser will refuse
    what follows, and what came before was counted."""

    def __init__(self, data: bytes, limit: int = MAX_FIELDS) -> None:
        self._data = data
        self._left = limit
        self._limit = limit
        self._pending = [(0, len(data), pb.AgentToServer.DESCRIPTOR)]

    def advance(self, steps: int) -> bool:
        """Count up to ``steps`` more fields; True once every field is counted.
        Raises `OpampDecodeError` (``too_many_elements``) past the limit."""
        data, pending = self._data, self._pending
        while pending and steps > 0:
            pos, end, descriptor = pending.pop()
            fields = descriptor.fields_by_number
            while pos < end and steps > 0:
                key, pos = _varint_at(data, pos, end)
                steps -= 1
                self._left -= 1
                if self._left < 0:
                    raise OpampDecodeError(
                        f"more than {self._limit} fields", reason="too_many_elements"
                    )
                wire = key & 7
                if key < 0 or wire in (3, 4) or wire > 5:
                    pending.clear()  # groups, or not protobuf: the parser says which
                    return True
                if wire == 0:
                    value, pos = _varint_at(data, pos, end)
                    if value < 0:
                        pending.clear()
                        return True
                elif wire == 1:
                    pos += 8
                elif wire == 5:
                    pos += 4
                else:
                    length, pos = _varint_at(data, pos, end)
                    if length < 0:
                        pending.clear()
                        return True
                    field = fields.get(key >> 3)
                    if field is not None and field.type == FieldDescriptor.TYPE_MESSAGE:
                        assert field.message_type is not None
                        pending.append((pos, min(pos + length, end), field.message_type))
                    pos += length
            if pos < end:  # out of steps: resume here
                pending.append((pos, end, descriptor))
        return not pending


def _varint_at(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """(the varint at ``pos``, the position after it); (-1, end) where there is none."""
    value = shift = 0
    while pos < end and shift < 70:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    return -1, end


def _check_elements(message: pb.AgentToServer, limit: int) -> None:
    """Refuse a message with more than ``limit`` repeated or mapped elements
    (counted at every depth, stopping at the limit)."""
    left = limit
    pending: list[Message] = [message]
    while pending:
        for field, value in pending.pop().ListFields():
            if field.type != FieldDescriptor.TYPE_MESSAGE:
                continue
            if not field.is_repeated:
                pending.append(value)
                continue
            left -= len(value)
            if left < 0:
                raise OpampDecodeError(
                    f"more than {limit} repeated elements",
                    reason="too_many_elements",
                    instance_uid=message.instance_uid,
                )
            entry = field.message_type
            assert entry is not None  # a message field has its type
            if not entry.GetOptions().map_entry:
                pending.extend(value)
            elif entry.fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE:
                pending.extend(value.values())


def encode_server_to_agent(
    message: pb.ServerToAgent, *, limit: int = DEFAULT_MAX_MESSAGE_BYTES
) -> bytes:
    """A `ServerToAgent` to protobuf bytes (the HTTP response body, uncompressed).

    Over the limit is our fault, not the agent's: the specification says such
    a message is not sent at all, so this raises `LocalProtocolError`
    (``reason="too_large"``) for the caller to count and drop.
    """
    data = message.SerializeToString()
    if len(data) > limit:
        raise LocalProtocolError(
            f"ServerToAgent is {len(data)} bytes, over the limit of {limit}", reason="too_large"
        )
    return data


def encode_ws_message(
    message: pb.ServerToAgent, *, limit: int = DEFAULT_MAX_MESSAGE_BYTES
) -> bytes:
    """A `ServerToAgent` as one binary WebSocket message: header 0, then the protobuf."""
    return _WS_HEADER + encode_server_to_agent(message, limit=limit - len(_WS_HEADER))


def _read_varint(data: bytes) -> tuple[int, int]:
    """(value, bytes used) of the base-128 varint at the start of ``data``."""
    value = 0
    for i, byte in enumerate(data[:_MAX_VARINT_BYTES]):
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, i + 1
    raise OpampDecodeError("WebSocket header is not a varint", reason="header")
