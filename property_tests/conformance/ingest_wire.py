"""Ingest protocol v1 from the client's side, written from the protocol page alone.

Frames are ``<len>:v1:<tokenhash>:<payload>``; replies ``2:OK`` and
``5:ERROR``. Like `agent_wire`, this does not use z4j's own codec, so the
suite's reading of the page is independent of the brain's.

`content_errors` and `framing_errors` list the malformed frames, by the
reason label docs/ingest-protocol.md gives them: a content error leaves the
connection open, a framing error closes it after the reply.
"""

from __future__ import annotations

import gzip
from typing import Final

import attrs
import xxhash

from .target import IngestTarget

__all__ = [
    "ERROR",
    "OK",
    "Malformed",
    "ReplyReader",
    "content_errors",
    "encode",
    "framing_errors",
    "token_field",
]

OK: Final = b"OK"
ERROR: Final = b"ERROR"
PING: Final = b"PING"


def token_field(token: str | None) -> bytes:
    """The first 7 hex characters of xxh128(token); ``0000000`` without a token."""
    if token is None:
        return b"0000000"
    return xxhash.xxh128_hexdigest(token.encode())[:7].encode()


def encode(payload: bytes, field: bytes, version: bytes = b"v1") -> bytes:
    """One frame: the length counts every byte after the first colon."""
    body = version + b":" + field + b":" + payload
    return b"%d:%s" % (len(body), body)


class ReplyReader:
    """Cuts the reply stream into reply bodies (``OK``, ``ERROR``, or whatever came)."""

    def __init__(self) -> None:
        self._data = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._data += data
        replies = []
        while True:
            digits, colon, rest = self._data.partition(b":")
            if not colon:
                if len(self._data) > 20:  # no reply has a length this long
                    replies.append(self._data)
                    self._data = b""
                return replies
            if not digits.isdigit():
                replies.append(self._data)  # not a reply: hand it over as is
                self._data = b""
                return replies
            size = int(digits)
            if len(rest) < size:
                return replies
            replies.append(rest[:size])
            self._data = rest[size:]

    @property
    def leftover(self) -> bytes:
        return self._data


@attrs.frozen
class Malformed:
    reason: str  # the label on the ingest page
    how: str
    data: bytes


def content_errors(target: IngestTarget) -> list[Malformed]:
    """Whole frames with bad content: each gets 5:ERROR and the connection reads on."""
    field = token_field(target.token)
    cases = [
        Malformed("bad_version", "version v2", encode(b"[]", field, b"v2")),
        Malformed("bad_version", "an empty frame", b"0:"),
        Malformed("bad_json", "not JSON", encode(b"[{", field)),
        Malformed("bad_json", "a trailing comma", encode(b'[{"t":"x"},]', field)),
        Malformed("bad_json", "NaN", encode(b'[{"t":"x","v":NaN}]', field)),
        Malformed("bad_json", "a \\u0000 escape", encode(b'[{"t":"x","m":"a\\u0000"}]', field)),
        Malformed("bad_json", "invalid UTF-8", encode(b'[{"t":"x","m":"\xff"}]', field)),
        Malformed(
            "bad_json",
            "nesting 300 deep",
            encode(b'[{"t":"x","d":' + b"[" * 300 + b"]" * 300 + b"}]", field),
        ),
        Malformed("not_array", "an object", encode(b'{"t":"x"}', field)),
        Malformed("not_array", "a string", encode(b'"x"', field)),
        Malformed("bad_record", "a number for a record", encode(b"[1]", field)),
        Malformed("bad_record", "a record without t", encode(b'[{"m":"x"}]', field)),
        Malformed("bad_record", "t a number", encode(b'[{"t":1}]', field)),
        Malformed("bad_record", "t empty", encode(b'[{"t":""}]', field)),
        Malformed(
            "bad_record", "t of 129 characters", encode(b'[{"t":"%s"}]' % (b"k" * 129), field)
        ),
        Malformed("bad_record", "one bad record of two", encode(b'[{"t":"x"},{"m":1}]', field)),
        Malformed("bad_gzip", "gzip magic then garbage", encode(b"\x1f\x8bnot gzip", field)),
        Malformed("bad_gzip", "truncated gzip", encode(gzip.compress(b'[{"t":"x"}]')[:-4], field)),
        Malformed(
            "bad_gzip", "bytes after the gzip", encode(gzip.compress(b'[{"t":"x"}]') + b"x", field)
        ),
        Malformed(
            "bad_framing",
            "a token-hash field over 64 bytes",
            encode(b"[]", b"f" * 70),
        ),
    ]
    if target.token is not None:
        cases.append(Malformed("bad_token", "a wrong token hash", encode(b"[]", b"0000000")))
        cases.append(Malformed("bad_token", "PING with a wrong token", encode(PING, b"ffffff0")))
    if target.max_inflated_bytes is not None and target.max_inflated_bytes <= 16 * 1024 * 1024:
        inflated = b'[{"t":"x","p":"' + b"a" * target.max_inflated_bytes + b'"}]'
        cases.append(
            Malformed(
                "inflate_too_large",
                "gzip past the inflate limit",
                encode(gzip.compress(inflated, 1), field),
            )
        )
    return cases


def framing_errors(target: IngestTarget) -> list[Malformed]:
    """Frames that lose the stream's framing: 5:ERROR, then the connection closes.

    ``truncated`` is special: its bytes are followed by end of stream.
    """
    field = token_field(target.token)
    limit = target.max_frame_bytes
    return [
        Malformed("bad_framing", "a length that is not a number", b"abc:" + encode(b"[]", field)),
        Malformed("bad_framing", "a length with a leading zero", b"0" + encode(b"[]", field)),
        Malformed("too_large", "a length over the frame limit", b"%d:v1:" % (limit + 1)),
        Malformed("too_large", "more digits than the limit has", b"9" * (len(str(limit)) + 1)),
        Malformed("truncated", "end of stream inside a frame", encode(b"[]", field)[:-1]),
    ]
