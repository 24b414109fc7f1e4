"""One agent connection as the suite drives it, writing the transcript as it goes.

A reader task takes every message the brain sends: the first must be
hello_ack (it gives the session binding), later ones are checked with
`BrainFrameCheck` and kept in order in ``received``. Rules wait on
``received`` or on the close with `wait`. Sending is serialised by one
lock, so frames leave in seq order even while the keepalive task sends
heartbeats (as a real agent does, so no connection idles out by accident).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from typing import Any

import trio

from .agent_wire import Binding, BrainFrameCheck, Signer, decode_key
from .target import AgentTarget
from .transcript import Transcript, clip
from .ws_client import Closed, Rejected, WsClient

__all__ = ["AgentConnection", "describe"]

_ENVELOPE = {"v", "id", "ts", "nonce", "seq", "type", "payload", "hmac"}


def describe(message: Any) -> str:
    """A frame in one line: type, id, seq, payload; unknown envelope fields after ``+``."""
    if isinstance(message, bytes | str):
        raw = message.encode() if isinstance(message, str) else message
        try:
            message = json.loads(raw)
        except ValueError:
            return f"<{len(raw)} bytes, not JSON> {clip(repr(raw[:80]), 100)}"
        if len(raw) > 4096:
            return f"<{len(raw)} bytes> {describe(message)}"
    if not isinstance(message, dict):
        return clip(json.dumps(message), 120)
    parts = [str(message.get("type", "?"))]
    if "id" in message:
        parts.append(f"id={message['id']}")
    if "seq" in message:
        parts.append(f"seq={message['seq']}")
    nonce = message.get("nonce")
    if isinstance(nonce, str):
        parts.append(f"nonce={nonce[:8]}…" if len(nonce) > 8 else f"nonce={nonce}")
    if isinstance(message.get("ts"), str):  # the time of day is enough to compare
        parts.append(f"ts={message['ts'][11:23]}")
    parts.append(clip(json.dumps(message.get("payload"), ensure_ascii=False), 140))
    extra = {k: v for k, v in message.items() if k not in _ENVELOPE}
    if extra:
        parts.append("+" + clip(json.dumps(extra, ensure_ascii=False), 80))
    return " ".join(parts)


class AgentConnection:
    def __init__(
        self, target: AgentTarget, transcript: Transcript, label: str, *, keepalive: bool = True
    ) -> None:
        self.target = target
        self.transcript = transcript
        self.label = label
        self.keepalive = keepalive
        self.ws: WsClient | None = None
        self.http_status: int | None = None  # the upgrade was refused
        self.close_code: int | None = None
        self.closed_by_us = False
        self.hello_ack: dict[str, Any] | None = None
        self.signer: Signer | None = None
        self.received: list[dict[str, Any]] = []  # brain frames after hello_ack
        self.problems: list[tuple[str, str]] = []  # (rule, what) the reader noticed
        self.closed = trio.Event()
        self._changed = trio.Event()
        self._lock = trio.Lock()
        self._check: BrainFrameCheck | None = None
        self._last_sent = 0.0

    # -- opening -------------------------------------------------------------------------

    async def open(
        self, nursery: trio.Nursery, first_message: bytes, *, token: str | None = None
    ) -> None:
        """Connect, send ``first_message`` (a hello, usually), and start reading.

        Returns once sent; `wait_hello_ack` then waits for the brain's answer
        (hello_ack, a close, or the refusal already seen here).
        """
        token = self.target.token if token is None else token
        headers = [(b"authorization", f"Bearer {token}".encode())]
        try:
            self.ws = await WsClient.connect(
                self.target.host, self.target.port, self.target.path, headers
            )
        except Rejected as exc:
            self.http_status = exc.status
            self.transcript.add(self.label, "✕", f"upgrade refused: HTTP {exc.status}")
            self.closed.set()
            return
        except Closed as exc:
            self._ended(exc.code)
            return
        self.transcript.add(self.label, "→", describe(first_message))
        self._last_sent = trio.current_time()
        nursery.start_soon(self._read)
        with contextlib.suppress(Closed):  # the reader reports the close code
            await self.ws.send(first_message)

    def opened(self) -> bool:
        return self.hello_ack is not None and not self.closed.is_set()

    # -- reading -------------------------------------------------------------------------

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            while True:
                self._on_message(await self.ws.receive())
        except Closed as exc:
            self._ended(exc.code)

    def _ended(self, code: int) -> None:
        if self.closed.is_set():
            return
        self.close_code = code
        who = "we closed; the brain answered" if self.closed_by_us else "closed by the brain:"
        self.transcript.add(self.label, "✕", f"{who} {code}")
        self.closed.set()
        self._notify()

    def _on_message(self, data: bytes | str) -> None:
        self.transcript.add(self.label, "←", describe(data))
        try:
            frame = json.loads(data)
        except ValueError:
            self.problems.append(
                ("brain-frames-signed", "the brain sent a message that is not JSON")
            )
            self._notify()
            return
        if self.hello_ack is None:
            self._on_hello_ack(frame)
        else:
            problems = self._check.problems(frame) if self._check is not None else []
            self.problems.extend(problems)
            for _, what in problems:
                self.transcript.add(self.label, "!", what)
            if isinstance(frame, dict):
                self.received.append(frame)
        self._notify()

    def _on_hello_ack(self, frame: Any) -> None:
        payload = frame.get("payload") if isinstance(frame, dict) else None
        if not isinstance(frame, dict) or frame.get("type") != "hello_ack":
            self.problems.append(
                ("handshake", f"the first frame from the brain is {describe(frame)}")
            )
            self.hello_ack = {}
            return
        self.hello_ack = payload if isinstance(payload, dict) else {}
        try:
            binding = Binding(
                agent_id=str(self.hello_ack["agent_id"]),
                project_id=str(self.hello_ack["project_id"]),
                session_id=str(self.hello_ack["session_id"]),
            )
        except KeyError as exc:
            self.problems.append(("handshake", f"hello_ack has no {exc.args[0]}"))
            return
        key = decode_key(self.target.secret)
        self.signer = Signer(key=key, binding=binding)
        self._check = BrainFrameCheck(key=key, binding=binding)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Until ``predicate()`` holds (True) or ``timeout`` passed (False)."""
        with trio.move_on_after(timeout):
            while not predicate():
                await self._changed.wait()
            return True
        return predicate()

    async def wait_hello_ack(self, timeout: float) -> bool:
        return await self.wait(lambda: self.hello_ack is not None or self.closed.is_set(), timeout)

    async def wait_closed(self, timeout: float) -> int | None:
        """The close code once closed; None if still open after ``timeout``."""
        await self.wait(self.closed.is_set, timeout)
        return self.close_code if self.closed.is_set() else None

    # -- sending -------------------------------------------------------------------------

    async def send_signed(
        self,
        frame_type: str,
        payload: dict[str, Any],
        *,
        frame_id: str | None = None,
        seq_step: int = 1,
        extra: dict[str, Any] | None = None,
        note: str = "",
    ) -> dict[str, Any] | None:
        """Sign and send one frame; the frame, or None if the connection was closed."""

        def build(signer: Signer) -> dict[str, Any]:
            return signer.frame(
                frame_type, payload, frame_id=frame_id, seq_step=seq_step, extra=extra
            )

        sent = await self.send_built(build, note=note)
        return sent[0] if sent else None

    async def send_built(self, build: Callable[[Signer], Any], *, note: str = "") -> list[Any]:
        """Send what ``build`` makes with the signer: a frame dict, raw bytes, or a list.

        Returns what was sent (empty if the connection was not open).
        """
        async with self._lock:
            if self.signer is None or self.closed.is_set():
                return []
            built = build(self.signer)
            messages = built if isinstance(built, list) else [built]
            data = [m if isinstance(m, bytes) else _dumps(m) for m in messages]
            if len(data) > 3:
                self.transcript.add(
                    self.label,
                    "→",
                    f"{len(data)} frames back to back, from {describe(data[0])} "
                    f"to {describe(data[-1])}   ({note})",
                )
            for index, one in enumerate(data):  # the note goes with the last one
                last = index == len(data) - 1
                await self._send(one, (note if last else "") if len(data) <= 3 else None)
            return messages

    async def send_raw(self, data: bytes, *, note: str = "") -> None:
        async with self._lock:
            await self._send(data, note)

    async def _send(self, data: bytes, note: str | None) -> None:
        """Send one message; ``note`` None leaves it out of the transcript."""
        assert self.ws is not None
        if note is not None:
            self.transcript.add(self.label, "→", describe(data) + (f"   ({note})" if note else ""))
        self._last_sent = trio.current_time()
        with contextlib.suppress(Closed):  # the reader reports the close code
            await self.ws.send(data)

    async def prove(self) -> None:
        """Send the first signed frame, a heartbeat: it proves the signing key,
        and only then does the brain give the connection its worker's slot."""
        await self.send_signed(
            "heartbeat", {"buffer_size": 0, "dropped_events": 0}, note="proves the key"
        )

    async def keep_alive(self) -> None:
        """Send a heartbeat whenever half an interval passed with nothing sent."""
        if not self.keepalive or not self.hello_ack:
            return
        interval = self.hello_ack.get("heartbeat_interval_seconds")
        if not isinstance(interval, int | float) or not math.isfinite(interval) or interval <= 0:
            return
        half = interval / 2
        while not self.closed.is_set():
            await trio.sleep(max(0.05, self._last_sent + half - trio.current_time()))
            if trio.current_time() - self._last_sent >= half:
                await self.send_signed(
                    "heartbeat", {"buffer_size": 0, "dropped_events": 0}, note="keepalive"
                )

    async def close(self, timeout: float = 2.0) -> None:
        """Close cleanly (1000); drop the socket if the brain does not answer."""
        if self.ws is None or self.closed.is_set():
            return
        self.closed_by_us = True
        self.transcript.add(self.label, "→", "close 1000")
        await self.ws.close(1000)
        if await self.wait_closed(timeout) is None:
            await self.abort()

    async def abort(self) -> None:
        if self.ws is not None:
            await self.ws.abort()
        if not self.closed.is_set():
            self.closed_by_us = True
            self._ended(1006)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
