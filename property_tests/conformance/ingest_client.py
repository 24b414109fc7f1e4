"""One ingest TCP connection as the suite drives it, writing the transcript as it goes."""

from __future__ import annotations

import contextlib
import itertools
import time

import trio

from .ingest_wire import ReplyReader
from .target import IngestTarget
from .transcript import Transcript, clip

__all__ = ["IngestConnection"]

_READ = 65536


def show(data: bytes) -> str:
    """Frame bytes for the transcript: printable as text, the rest escaped, long ones cut."""
    text = data.decode("utf-8", "backslashreplace")
    return clip(repr(text)[1:-1], 160) + (f" ({len(data)} bytes)" if len(data) > 160 else "")


class IngestConnection:
    def __init__(self, target: IngestTarget, transcript: Transcript, label: str) -> None:
        self.target = target
        self.transcript = transcript
        self.label = label
        self.stream: trio.SocketStream | None = None
        self.reader = ReplyReader()
        self.eof = False  # the server closed its side
        self.last_used = time.monotonic()

    async def open(self) -> None:
        self.stream = await trio.open_tcp_stream(self.target.host, self.target.port)
        self.transcript.add(self.label, "⇄", "connected")

    async def send(self, data: bytes, *, cuts: list[int] | None = None, note: str = "") -> None:
        """Write ``data``; with ``cuts``, in pieces split there, a moment apart."""
        assert self.stream is not None
        self.last_used = time.monotonic()
        bounds = [0, *sorted(set(cuts or [])), len(data)]
        pieces = [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]
        for index, piece in enumerate(pieces):
            suffix = f"   ({note})" if note and index == 0 else ""
            if len(pieces) > 1:
                suffix += f"   [piece {index + 1} of {len(pieces)}]"
            self.transcript.add(self.label, "→", show(piece) + suffix)
            try:
                await self.stream.send_all(piece)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.transcript.add(self.label, "!", "the write failed: the server closed")
                return
            if index < len(pieces) - 1:
                await trio.sleep(0.002)

    async def end_writes(self) -> None:
        """Half-close: end of stream from our side, replies still readable."""
        assert self.stream is not None
        self.transcript.add(self.label, "→", "end of stream")
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.stream.send_eof()

    async def replies(self, count: int, timeout: float) -> list[bytes]:
        """Read until ``count`` replies came, the server closed, or ``timeout`` passed."""
        assert self.stream is not None
        got: list[bytes] = []
        with trio.move_on_after(timeout):
            while len(got) < count and not self.eof:
                try:
                    data = await self.stream.receive_some(_READ)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    self.eof = True
                    self.transcript.add(self.label, "✕", "closed by the server")
                    break
                for reply in self.reader.feed(data):
                    self.transcript.add(self.label, "←", show(b"%d:%s" % (len(reply), reply)))
                    got.append(reply)
        self.last_used = time.monotonic()
        return got

    async def closed_within(self, timeout: float) -> bool:
        """True once the server has closed (anything it sends meanwhile is kept)."""
        if not self.eof:
            await self.replies(1_000_000, timeout)
        return self.eof

    async def aclose(self) -> None:
        if self.stream is not None:
            await trio.aclose_forcefully(self.stream)
