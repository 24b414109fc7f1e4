"""The server side's WebSocket fast path, sans-IO: client frames in, events out.

Theory of operation
-------------------
Nearly everything an agent sends is a whole, unfragmented, masked text or
binary frame, one message each. wsproto handles those too, but through
several layers per frame; `FrameParser` takes them apart itself (a header,
an XOR, a decode) and passes every other frame on whole and raw, for a full
implementation (wsproto, driven by `z4j.brain.http.websocket`) to answer pings,
assemble fragments and refuse what is malformed with the right close code.

Feed it bytes with `FrameParser.receive_data` in any chunking; each
`FrameParser.next_event` returns one event, or `NEED_DATA` until a whole
frame is in:

- `BytesReceived` / `TextReceived`: one whole message from a plain frame;
- `OtherFrame`: the raw bytes of any other frame (control frames,
  fragments, reserved bits or opcodes, unmasked frames, text that is not
  UTF-8). While a fragmented message is open, its data frames go this way
  too, so the full implementation sees each message whole. A control frame
  announcing over 125 bytes is passed on as its header alone: that is
  enough to refuse it, and its payload is never waited for.

A data frame announcing more than ``max_message`` bytes raises
`RemoteProtocolError` (close code 1009) as soon as its header is in, so an
oversize message is never buffered. The parser is then finished: later
`next_event` calls raise the same error again, as in protocol.ingest. It
does no I/O and holds only the bytes not yet parsed, so an idle
connection's parser is a few words.

`encode_frame` is the other direction: the unmasked frame a server sends
for one whole message.
"""

from __future__ import annotations

import struct
from typing import Final

import attrs

from .close import CloseCode
from .errors import RemoteProtocolError

__all__ = [
    "NEED_DATA",
    "BytesReceived",
    "Event",
    "FrameParser",
    "OtherFrame",
    "TextReceived",
    "encode_frame",
    "unmask",
]

OPCODE_TEXT: Final = 1
OPCODE_BINARY: Final = 2
MAX_CONTROL_PAYLOAD: Final = 125


class _NeedData:
    """`next_event`'s answer until a whole frame is in (as in protocol.ingest)."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


@attrs.frozen(kw_only=True)
class BytesReceived:
    """A whole binary message from one plain frame."""

    data: bytes


@attrs.frozen(kw_only=True)
class TextReceived:
    """A whole text message from one plain frame."""

    data: str


@attrs.frozen(kw_only=True)
class OtherFrame:
    """A frame the fast path does not take apart: its raw bytes, whole."""

    data: bytes


Event = BytesReceived | TextReceived | OtherFrame

_XOR: Final = [bytes(a ^ b for a in range(256)) for b in range(256)]


def unmask(mask: bytes, data: bytes) -> bytes:
    """A client frame's payload, unmasked (XOR with the repeated 4-byte key).

    Short payloads as one big-integer XOR; long ones a quarter at a time
    through a translation table (faster past a few KiB).
    """
    n = len(data)
    if n < 2048:
        if not n:
            return b""
        key = (mask * (n // 4 + 1))[:n]
        return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(
            n, "little"
        )
    buf = bytearray(data)
    for i in range(4):
        buf[i::4] = buf[i::4].translate(_XOR[mask[i]])
    return bytes(buf)


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One whole, unmasked server frame (what wsproto writes for a message)."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


class FrameParser:
    """Client frames to events, for one server-side connection; see the module docstring."""

    __slots__ = ("_buf", "_dead", "_fragmented", "_max")

    def __init__(self, max_message: int) -> None:
        self._max = max_message
        # Bytes not yet parsed; None when empty, as on an idle connection.
        self._buf: bytearray | None = None
        self._fragmented = False  # a fragmented message is open
        self._dead: RemoteProtocolError | None = None

    def receive_data(self, data: bytes | bytearray) -> None:
        """Add received bytes, cut anyhow (ignored once the parser failed)."""
        if self._dead is not None or not data:
            return
        if self._buf is None:
            self._buf = bytearray(data)
        else:
            self._buf += data

    def next_event(self) -> Event | _NeedData:
        """The next whole frame's event, or `NEED_DATA`.

        Raises `RemoteProtocolError` (1009) for a data frame announcing more
        than ``max_message`` bytes.
        """
        if self._dead is not None:
            raise self._dead
        buf = self._buf
        if buf is None or len(buf) < 2:
            return NEED_DATA
        b0, b1 = buf[0], buf[1]
        length = b1 & 0x7F
        at = 2
        if length == 126:
            if len(buf) < 4:
                return NEED_DATA
            length, at = int.from_bytes(buf[2:4], "big"), 4
        elif length == 127:
            if len(buf) < 10:
                return NEED_DATA
            length, at = int.from_bytes(buf[2:10], "big"), 10
        opcode = b0 & 0x0F
        if length > self._max and opcode < 8:
            self._buf = None
            self._dead = RemoteProtocolError(
                f"a message of {length} bytes, over the limit of {self._max}",
                reason="too_large",
                close_code=CloseCode.TOO_LARGE,
            )
            raise self._dead
        masked = b1 & 0x80
        if opcode >= 8 and length > MAX_CONTROL_PAYLOAD:
            end = at  # its header is enough to refuse it
        else:
            end = at + (4 if masked else 0) + length
        if len(buf) < end:
            return NEED_DATA
        raw = bytes(buf[:end])
        if end == len(buf):
            self._buf = None
        else:
            del buf[:end]
        if b0 & 0xF0 == 0x80 and masked and not self._fragmented:
            if opcode == OPCODE_BINARY:
                return BytesReceived(data=unmask(raw[at : at + 4], raw[at + 4 :]))
            if opcode == OPCODE_TEXT:
                try:
                    text = unmask(raw[at : at + 4], raw[at + 4 :]).decode("utf-8")
                except UnicodeDecodeError:
                    pass  # the full implementation refuses it (1007)
                else:
                    return TextReceived(data=text)
        elif opcode < 3:
            # A fragment (or the end of one): the full implementation
            # assembles them, so it gets every frame until the message ends.
            self._fragmented = not b0 & 0x80
        return OtherFrame(data=raw)
