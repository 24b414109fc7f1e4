"""Ingest protocol v1 (NightOwl framing), sans-IO.

Theory of operation
-------------------
A client sends frames ``<len>:v1:<tokenhash>:<payload>`` where ``<len>`` counts
the bytes after the first colon. The server answers each frame, in order,
with ``2:OK`` or ``5:ERROR``. Clients may pipeline: send several frames before
reading replies; replies keep the order of frames.

`IngestConnection` is the server side. Feed it bytes with `receive_data`
(``b""`` for end of stream) and pull events with `next_event` until it returns
`NEED_DATA`. Events:

- `Payload`: a well-formed frame with a JSON array of records; the server
  answers it after the payload is durable.
- `Ping`: answer OK at once.
- `Rejected`: the frame was whole but its content is bad (version, token,
  JSON, records, inflated size). The stream is still in sync, so the
  connection goes on after the ``5:ERROR``.
- `ConnectionClosed`: the peer ended the stream at a frame boundary.

When the framing itself is broken (a length that is not a number, a frame
over the size cap, end of stream inside a frame) the stream cannot be
re-synchronised: `next_event` raises `RemoteProtocolError`, the server replies
``5:ERROR`` and closes. After that the connection is dead and every call
raises again.

`encode_frame` and `ReplyParser` are the client side of the same wire.
"""

from __future__ import annotations

import hmac
import re
import zlib
from typing import Final

import attrs
import orjson
import xxhash

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "ERROR",
    "NEED_DATA",
    "OK",
    "REJECT_REASONS",
    "ConnectionClosed",
    "IngestConnection",
    "Payload",
    "Ping",
    "Rejected",
    "ReplyParser",
    "encode_frame",
    "token_hash",
]

OK: Final = b"2:OK"
ERROR: Final = b"5:ERROR"
VERSION: Final = b"v1"
PING: Final = b"PING"
GZIP_MAGIC: Final = b"\x1f\x8b"
MAX_KIND_LENGTH: Final = 128
# Records per payload: the idempotency key keeps 24 bits for a record's index.
MAX_RECORDS_PER_PAYLOAD: Final = 1 << 24
# Longest token-hash field we look through before calling the frame bad.
_MAX_TOKENHASH_FIELD: Final = 64
# An escape for NUL: ``\\u0000`` preceded by an even number of backslashes
# (``\\\\u0000`` is an escaped backslash followed by the text ``u0000``).
_NUL_ESCAPE: Final = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")

# Every label a rejection can carry; metrics pre-create one counter per label.
REJECT_REASONS: Final = (
    "bad_framing",
    "too_large",
    "truncated",
    "bad_version",
    "bad_token",
    "bad_gzip",
    "inflate_too_large",
    "bad_json",
    "not_array",
    "bad_record",
    "buffer_full",
    "storage_error",
    # Decided by the server around the protocol, not by this module:
    "too_slow",
    "too_many_connections",
)


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


@attrs.frozen(kw_only=True)
class Payload:
    """A valid frame: ``body`` is the (inflated) JSON array, as received."""

    body: bytes
    records: int = attrs.field(validator=attrs.validators.ge(0))


@attrs.frozen(kw_only=True)
class Ping:
    """A ``PING`` payload: a liveness probe, answered OK without storing."""


@attrs.frozen(kw_only=True)
class Rejected:
    """A whole frame with bad content; ``reason`` is one of REJECT_REASONS."""

    reason: str = attrs.field(validator=attrs.validators.in_(REJECT_REASONS))
    detail: str = ""


@attrs.frozen(kw_only=True)
class ConnectionClosed:
    """The peer closed its side between frames."""


Event = Payload | Ping | Rejected | ConnectionClosed


def token_hash(token: str) -> bytes:
    """The 7 hex characters of xxh128(token) that frames carry."""
    return xxhash.xxh128_hexdigest(token.encode()).encode()[:7]


def encode_frame(payload: bytes, *, token: str | None = None) -> bytes:
    """Frame ``payload`` (JSON array bytes, gzip bytes, or ``PING``)."""
    th = token_hash(token) if token else b"0000000"
    body_len = len(VERSION) + 1 + len(th) + 1 + len(payload)
    return b"%d:%s:%s:%s" % (body_len, VERSION, th, payload)


class IngestConnection:
    """Server side of one ingest connection; see the module docstring."""

    def __init__(
        self,
        *,
        token: str | None = None,
        max_frame_bytes: int = 10 * 1024 * 1024,
        max_inflated_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._expected_hash = token_hash(token) if token else None
        self._max_frame = max_frame_bytes
        self._max_inflated = max_inflated_bytes
        self._max_len_digits = len(str(max_frame_bytes))
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._dead: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed as frames."""
        return len(self._buf) - self._pos

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side."""
        if self._eof:
            raise LocalProtocolError("data received after end of stream", reason="internal")
        if data:
            if self._pos and self._pos * 2 >= len(self._buf):
                del self._buf[: self._pos]
                self._pos = 0
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Event | _NeedData:
        """The next event, `NEED_DATA`, or raise `RemoteProtocolError`."""
        if self._dead is not None:
            raise self._dead
        try:
            frame = self._next_frame()
        except RemoteProtocolError as exc:
            self._dead = exc
            raise
        if frame is None:
            if self._eof:
                if self.buffered:
                    self._dead = RemoteProtocolError(
                        "stream ended inside a frame", reason="truncated"
                    )
                    raise self._dead
                return ConnectionClosed()
            return NEED_DATA
        return self._parse_frame(frame)

    # -- framing -------------------------------------------------------------

    def _next_frame(self) -> bytes | None:
        buf, pos = self._buf, self._pos
        colon = buf.find(b":", pos, pos + self._max_len_digits + 1)
        if colon < 0:
            if len(buf) - pos > self._max_len_digits:
                head = bytes(buf[pos : pos + self._max_len_digits + 1])
                if head.isdigit():
                    raise RemoteProtocolError(
                        f"frame length {head.decode()}... is over the {self._max_frame}-byte limit",
                        reason="too_large",
                    )
                raise self._bad_prefix(head)
            return None
        prefix = bytes(buf[pos:colon])
        if not prefix.isdigit() or (len(prefix) > 1 and prefix[0] == 0x30):
            raise self._bad_prefix(prefix)
        length = int(prefix)
        if length > self._max_frame:
            raise RemoteProtocolError(
                f"frame of {length} bytes is over the {self._max_frame}-byte limit",
                reason="too_large",
            )
        end = colon + 1 + length
        if end > len(buf):
            return None
        self._pos = end
        return bytes(buf[colon + 1 : end])

    def _bad_prefix(self, prefix: bytes) -> RemoteProtocolError:
        return RemoteProtocolError(
            f"frame must start with a decimal length and ':', got {prefix[:20]!r}",
            reason="bad_framing",
        )

    # -- content -------------------------------------------------------------

    def _parse_frame(self, frame: bytes) -> Event:
        if not frame.startswith(b"v1:"):
            version = frame.split(b":", 1)[0][:16]
            return Rejected(reason="bad_version", detail=f"version {version!r} is not v1")
        sep = frame.find(b":", 3, 3 + _MAX_TOKENHASH_FIELD + 1)
        if sep < 0:
            return Rejected(reason="bad_framing", detail="no ':' after the token hash")
        if self._expected_hash is not None and not hmac.compare_digest(
            frame[3:sep], self._expected_hash
        ):
            return Rejected(reason="bad_token", detail="token hash does not match")
        payload = frame[sep + 1 :]
        if payload == PING:
            return Ping()
        if payload.startswith(GZIP_MAGIC):
            inflated = self._inflate(payload)
            if isinstance(inflated, Rejected):
                return inflated
            payload = inflated
        return _validate_records(payload)

    def _inflate(self, data: bytes) -> bytes | Rejected:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            out = inflater.decompress(data, self._max_inflated + 1)
        except zlib.error as exc:
            return Rejected(reason="bad_gzip", detail=str(exc))
        if len(out) > self._max_inflated:
            return Rejected(
                reason="inflate_too_large",
                detail=f"inflates past the {self._max_inflated}-byte limit",
            )
        if not inflater.eof:
            return Rejected(reason="bad_gzip", detail="gzip stream is truncated")
        if inflater.unused_data:
            # A second gzip member or trailing bytes: refuse rather than
            # answer OK for records we would silently drop.
            return Rejected(reason="bad_gzip", detail="data after the end of the gzip stream")
        return out


def _validate_records(payload: bytes) -> Payload | Rejected:
    try:
        records = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        return Rejected(reason="bad_json", detail=str(exc))
    # A lone backslash is one memchr; most payloads have none and stop there.
    if b"\\" in payload and b"\\u0000" in payload and _NUL_ESCAPE.search(payload):
        # Postgres jsonb cannot hold NUL in text; refuse it here rather than
        # accept a payload that can never be drained.
        return Rejected(reason="bad_json", detail="\\u0000 in a string cannot be stored")
    if not isinstance(records, list):
        return Rejected(reason="not_array", detail="payload must be a JSON array of records")
    if len(records) > MAX_RECORDS_PER_PAYLOAD:
        # Each record's idempotency key has room for this many per payload.
        return Rejected(
            reason="too_large",
            detail=f"{len(records)} records; at most {MAX_RECORDS_PER_PAYLOAD} per payload",
        )
    for index, record in enumerate(records):
        kind = record.get("t") if isinstance(record, dict) else None
        if not isinstance(kind, str) or not 0 < len(kind) <= MAX_KIND_LENGTH:
            return Rejected(
                reason="bad_record",
                detail=f"record {index} must be an object with a string field 't' "
                f"of 1 to {MAX_KIND_LENGTH} characters",
            )
    try:
        # The drain serialises records again, and orjson refuses to nest past
        # 254 levels where its parser allowed 1,024: find out now, while we
        # can still say no. (Cheaper than counting the brackets first.)
        orjson.dumps(records)
    except orjson.JSONEncodeError as exc:
        return Rejected(reason="bad_json", detail=f"cannot be stored: {exc}")
    return Payload(body=payload, records=len(records))


class ReplyParser:
    """Client side: turns the server's reply bytes into True (OK) / False (ERROR)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def replies(self) -> list[bool]:
        """Every complete reply received so far, in order."""
        out: list[bool] = []
        while True:
            colon = self._buf.find(b":", 0, 12)
            if colon < 0:
                if len(self._buf) > 11:
                    raise RemoteProtocolError("malformed reply from server", reason="bad_reply")
                return out
            prefix = bytes(self._buf[:colon])
            if not prefix.isdigit():
                raise RemoteProtocolError(f"malformed reply {prefix!r}", reason="bad_reply")
            end = colon + 1 + int(prefix)
            if end > len(self._buf):
                return out
            text = bytes(self._buf[colon + 1 : end])
            del self._buf[:end]
            if text == b"OK":
                out.append(True)
            elif text == b"ERROR":
                out.append(False)
            else:
                raise RemoteProtocolError(f"unknown reply {text[:40]!r}", reason="bad_reply")
