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
- `Rejected`: the frame was whole but its content is bad (version, JSON,
  records, inflated size, too many records). The stream is still in sync,
  so the connection goes on after the ``5:ERROR``.
- `ConnectionClosed`: the peer ended the stream at a frame boundary.

When the framing itself is broken (a length that is not a number, a frame
over the size cap, end of stream inside a frame) the stream cannot be
re-synchronised: `next_event` raises `RemoteProtocolError`, the server replies
``5:ERROR`` and closes. After that the connection is dead and every call
raises again. A wrong token does the same (reason ``bad_token``): a guesser
gets one try per connection, not one per frame.

Token hash: the field may carry the 7 hex characters NightOwl sends (28
bits: guessable) or all 32 of xxh128(token); ``strict_token`` accepts only
the full form. Both are compared in constant time.

Cost bound
----------
A payload is checked by parsing it whole (orjson), and that one C call
holds the GIL throughout: on a worker thread it still stalls the event
loop, and so does the drain's parse of every stored payload later. Parse
time grows with the number of JSON values (and containers cost most: a
million empty lists take ~170 ms, a garbage collection pass included), not
with bytes (16 MiB of long strings parse in ~16 ms). So before parsing, a
cheap count bounds the values: every value or key but the outermost array
follows a ``{``, ``[``, ``,`` or ``:``. A payload may hold at most
``max_records`` objects and arrays inside its outer array (``{`` and ``[``
bytes) and at most ``SEPARATORS_PER_RECORD`` times that many ``,`` and
``:`` bytes; else it is rejected ``too_many_records`` unparsed. The counts
include those bytes inside strings, so they over-estimate: a payload near
the cap with many braces or commas in its text may be refused although it
holds fewer records (documented; split the batch). The record count itself
is checked exactly after the parse. With the default cap (100,000) the
worst payload that passes parses in tens of milliseconds. The counting runs
over windows of `_COUNT_WINDOW` bytes, so on a worker thread it lets the
event loop in between.

`next_is_heavy` tells the adapter which frames may take long to check
(large or gzip) so it can run those `next_event` calls on a worker thread
and the rest, the common small frame, on its loop.

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
    "HEAVY_FRAME_BYTES",
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
    "token_hash_full",
]

OK: Final = b"2:OK"
ERROR: Final = b"5:ERROR"
VERSION: Final = b"v1"
PING: Final = b"PING"
GZIP_MAGIC: Final = b"\x1f\x8b"
MAX_KIND_LENGTH: Final = 128
# Records per payload: the idempotency key keeps 24 bits for a record's index.
MAX_RECORDS_PER_PAYLOAD: Final = 1 << 24
# Commas and colons a payload may hold, per record it may hold (see Cost bound).
SEPARATORS_PER_RECORD: Final = 8
# Frames larger than this (or gzip) are worth a worker thread to check.
HEAVY_FRAME_BYTES: Final = 64 * 1024
# Bytes counted per bytes.count call: each holds the GIL ~0.5 ms.
_COUNT_WINDOW: Final = 1 << 20
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
    "too_many_records",
    "buffer_full",
    "storage_error",
    # Decided by the server around the protocol, not by this module:
    "too_slow",
    "too_many_connections",
    "over_budget",
    "throttled",
    "tls_handshake",
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
    """The 7 hex characters of xxh128(token) that NightOwl's frames carry."""
    return token_hash_full(token)[:7]


def token_hash_full(token: str) -> bytes:
    """All 32 hex characters of xxh128(token): the form z4j's clients send."""
    return xxhash.xxh128_hexdigest(token.encode()).encode()


def encode_frame(payload: bytes, *, token: str | None = None, short_hash: bool = False) -> bytes:
    """Frame ``payload`` (JSON array bytes, gzip bytes, or ``PING``).

    The token goes as its full hash unless ``short_hash`` (NightOwl's form).
    """
    th = b"0000000" if not token else token_hash(token) if short_hash else token_hash_full(token)
    body_len = len(VERSION) + 1 + len(th) + 1 + len(payload)
    return b"%d:%s:%s:%s" % (body_len, VERSION, th, payload)


class IngestConnection:
    """Server side of one ingest connection; see the module docstring."""

    def __init__(
        self,
        *,
        token: str | None = None,
        max_frame_bytes: int = 10 * 1024 * 1024,
        max_inflated_bytes: int = 16 * 1024 * 1024,
        max_records: int = 100_000,
        strict_token: bool = False,
    ) -> None:
        self._full_hash = token_hash_full(token) if token else None
        self._short_hash = None if strict_token or not token else token_hash(token)
        self._max_frame = max_frame_bytes
        self._max_inflated = max_inflated_bytes
        self._max_records = min(max_records, MAX_RECORDS_PER_PAYLOAD)
        self._max_len_digits = len(str(max_frame_bytes))
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._dead: RemoteProtocolError | None = None
        # The head frame's (body start, end), once its prefix is read, for `_pos`.
        self._head_pos = -1
        self._head: tuple[int, int] | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed as frames."""
        return len(self._buf) - self._pos

    @property
    def head_frame_bytes(self) -> int:
        """Bytes the frame at the head will occupy once whole (length prefix
        included), as soon as its prefix has arrived; until then, `buffered`.

        Lets the server reserve room for a frame before its bytes arrive.
        """
        bounds = self._peek_bounds()
        return self.buffered if bounds is None else bounds[1] - self._pos

    def next_is_heavy(self) -> bool:
        """Whether the next `next_event` may take long: a whole frame over
        `HEAVY_FRAME_BYTES`, or a gzip one (it may inflate a thousandfold).
        """
        bounds = self._peek_bounds()
        if bounds is None or bounds[1] > len(self._buf):
            return False
        start, end = bounds
        if end - start > HEAVY_FRAME_BYTES:
            return True
        # The payload starts after "v1:<tokenhash>:"; gzip shows in its first bytes.
        sep = self._buf.find(b":", start + 3, min(end, start + 4 + _MAX_TOKENHASH_FIELD))
        return sep >= 0 and self._buf.startswith(GZIP_MAGIC, sep + 1)

    def _peek_bounds(self) -> tuple[int, int] | None:
        """(body start, end) of the head frame when its prefix is valid and known."""
        if self._head_pos == self._pos:
            return self._head
        if self._dead is not None:
            return None
        buf, pos = self._buf, self._pos
        colon = buf.find(b":", pos, pos + self._max_len_digits + 1)
        if colon <= pos:
            return None
        prefix = bytes(buf[pos:colon])
        if not prefix.isdigit() or (len(prefix) > 1 and prefix[0] == 0x30):
            return None  # next_event says why
        length = int(prefix)
        if length > self._max_frame:
            return None
        self._head_pos, self._head = pos, (colon + 1, colon + 1 + length)
        return self._head

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side."""
        if self._eof:
            raise LocalProtocolError("data received after end of stream", reason="internal")
        if data:
            if self._pos and self._pos * 2 >= len(self._buf):
                del self._buf[: self._pos]
                self._pos = 0
                self._head_pos = -1
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Event | _NeedData:
        """The next event, `NEED_DATA`, or raise `RemoteProtocolError`."""
        if self._dead is not None:
            raise self._dead
        try:
            frame = self._next_frame()
            if frame is not None:
                self._check_token(frame)
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
        if self._head_pos == pos and self._head is not None:
            start, end = self._head
            if end > len(buf):
                return None
            self._pos = end
            return bytes(buf[start:end])
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

    def _check_token(self, frame: bytes) -> None:
        """Raise (the connection dies) when a token is configured and the frame's is wrong."""
        if self._full_hash is None or not frame.startswith(b"v1:"):
            return  # a bad version is answered as such, token or not
        sep = frame.find(b":", 3, 3 + _MAX_TOKENHASH_FIELD + 1)
        if sep < 0:
            return
        field = frame[3:sep]
        # Both comparisons always run: the time does not say which form matched.
        full = hmac.compare_digest(field, self._full_hash)
        short = self._short_hash is not None and hmac.compare_digest(field, self._short_hash)
        if not (full or short):
            raise RemoteProtocolError("token hash does not match", reason="bad_token")

    def _parse_frame(self, frame: bytes) -> Event:
        if not frame.startswith(b"v1:"):
            version = frame.split(b":", 1)[0][:16]
            return Rejected(reason="bad_version", detail=f"version {version!r} is not v1")
        sep = frame.find(b":", 3, 3 + _MAX_TOKENHASH_FIELD + 1)
        if sep < 0:
            return Rejected(reason="bad_framing", detail="no ':' after the token hash")
        payload = frame[sep + 1 :]
        if payload == PING:
            return Ping()
        if payload.startswith(GZIP_MAGIC):
            inflated = self._inflate(payload)
            if isinstance(inflated, Rejected):
                return inflated
            payload = inflated
        too_many = _over_count(payload, self._max_records)
        if too_many:
            return Rejected(reason="too_many_records", detail=too_many)
        return _validate_records(payload, self._max_records)

    def _inflate(self, data: bytes) -> bytes | Rejected:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        chunks: list[bytes] = []
        size = 0
        try:
            # In steps of one window, so that on a worker thread the event
            # loop gets the GIL in between.
            chunk = inflater.decompress(data, _COUNT_WINDOW)
            while True:
                chunks.append(chunk)
                size += len(chunk)
                if size > self._max_inflated or inflater.eof or not inflater.unconsumed_tail:
                    break
                chunk = inflater.decompress(inflater.unconsumed_tail, _COUNT_WINDOW)
        except zlib.error as exc:
            return Rejected(reason="bad_gzip", detail=str(exc))
        out = b"".join(chunks)
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


def _count(data: bytes, chars: bytes, limit: int) -> int:
    """Occurrences of the bytes in ``chars``, stopping once past ``limit``."""
    total = 0
    for start in range(0, len(data), _COUNT_WINDOW):
        end = start + _COUNT_WINDOW
        for char in chars:
            total += data.count(char, start, end)
        if total > limit:
            break
    return total


def _over_count(payload: bytes, max_records: int) -> str:
    """Why ``payload`` cannot be within the cost bound (module docstring), or ""."""
    # Every '{' or '[' is one byte: a payload this short cannot be over.
    if len(payload) <= max_records + 1:
        return ""
    containers = _count(payload, b"{[", max_records + 1) - 1  # not the outer array
    if containers > max_records:
        return (
            f"over {max_records} objects and arrays ('{{' and '[' bytes, in strings too); "
            f"at most {max_records} records per payload"
        )
    max_separators = SEPARATORS_PER_RECORD * max_records
    if len(payload) > max_separators and _count(payload, b",:", max_separators) > max_separators:
        return (
            f"over {max_separators} values (',' and ':' bytes, in strings too) for "
            f"a payload of at most {max_records} records"
        )
    return ""


def _validate_records(
    payload: bytes, max_records: int = MAX_RECORDS_PER_PAYLOAD
) -> Payload | Rejected:
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
    # Each record's idempotency key has room for MAX_RECORDS_PER_PAYLOAD.
    max_records = min(max_records, MAX_RECORDS_PER_PAYLOAD)
    if len(records) > max_records:
        return Rejected(
            reason="too_many_records",
            detail=f"{len(records)} records; at most {max_records} per payload",
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
