"""Raw HTTP/1.1 exchanges with a brain, one fresh connection each.

Tests check the brain's bytes, so they speak HTTP by hand rather than
through a client library that would add headers, retry or pool: a request
is written exactly as given (plus ``Host: x`` and ``Connection: close``) and
the reply is read to the close.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import orjson
import trio

__all__ = ["HttpReply", "http_get", "http_request", "read_until_closed"]


@attrs.frozen(kw_only=True)
class HttpReply:
    status: int
    headers: Mapping[str, str]
    """Lower-cased names; a repeated header's values joined with a newline."""
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON, or None when it is empty."""
        return orjson.loads(self.body) if self.body else None


async def read_until_closed(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything the peer sends until it closes."""
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


async def http_request(
    address: tuple[str, int],
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: Mapping[str, str] | Sequence[tuple[str, str]] = (),
) -> HttpReply:
    """``method path`` on a fresh connection, read to the close.

    ``Content-Length`` is sent when ``body`` is given (even empty); a
    ``Host`` in ``headers`` replaces the default ``x``.
    """
    extra = list(headers.items() if isinstance(headers, Mapping) else headers)
    host = next((v for k, v in extra if k.lower() == "host"), "x")
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    if body is not None:
        head.append(f"Content-Length: {len(body)}")
    head += [f"{k}: {v}" for k, v in extra if k.lower() != "host"]
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(("\r\n".join(head) + "\r\n\r\n").encode() + (body or b""))
        data = await read_until_closed(stream)
    raw_head, _, raw_body = data.partition(b"\r\n\r\n")
    lines = raw_head.decode().split("\r\n")
    got: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        key = name.strip().lower()
        got[key] = f"{got[key]}\n{value.strip()}" if key in got else value.strip()
    if got.get("transfer-encoding") == "chunked":
        raw_body = _dechunk(raw_body)
    return HttpReply(status=int(lines[0].split()[1]), headers=got, body=raw_body)


def _dechunk(data: bytes) -> bytes:
    """A chunked body's content; ValueError if it was cut before its last chunk."""
    out = bytearray()
    while True:
        size_line, sep, rest = data.partition(b"\r\n")
        if not sep:
            raise ValueError("the chunked body was cut short")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        if len(rest) < size + 2:
            raise ValueError("the chunked body was cut short")
        out += rest[:size]
        data = rest[size + 2 :]


async def http_get(address: tuple[str, int], path: str) -> tuple[int, str]:
    """GET ``path`` on a fresh connection: (status, body)."""
    reply = await http_request(address, "GET", path)
    return reply.status, reply.body.decode()
