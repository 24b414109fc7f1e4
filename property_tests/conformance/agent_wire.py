"""The agent side of protocol v2, written from the protocol page alone.

The suite signs its frames and checks the brain's with this module, not
with z4j's own protocol core: a conformance suite that shared the brain's
code would share its mistakes. Everything here follows
docs/agent-protocol.md ("Signed frames", "Replay guard").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs

from .rules import RULES

__all__ = [
    "AGENT_TO_BRAIN",
    "BRAIN_TO_AGENT",
    "Binding",
    "BrainFrameCheck",
    "Signer",
    "canonical_json",
    "decode_key",
    "iso_now",
    "sign",
]

AGENT_TO_BRAIN = frozenset(
    {
        "event_batch",
        "heartbeat",
        "command_ack",
        "command_result",
        "registry_delta",
        "agent_status",
        "error",
    }
)
BRAIN_TO_AGENT = frozenset({"event_batch_ack", "command", "error"})
TS_WINDOW_SECONDS = 60.0
SIGNED = RULES["brain-frames-signed"].name
SEQ = RULES["seq-monotonicity"].name


@attrs.frozen(kw_only=True)
class Binding:
    """The session a signature is bound to: the three strings of hello_ack."""

    agent_id: str
    project_id: str
    session_id: str


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, compact separators, UTF-8 without escapes, no NaN."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def sign(frame: Mapping[str, Any], key: bytes, binding: Binding) -> str:
    """Lowercase hex HMAC-SHA256 of the frame without ``hmac``, plus the binding."""
    body = {k: v for k, v in frame.items() if k != "hmac"}
    body.update(
        agent_id=binding.agent_id, project_id=binding.project_id, session_id=binding.session_id
    )
    return hmac.new(key, canonical_json(body), hashlib.sha256).hexdigest()


def decode_key(text: str) -> bytes:
    """A project secret as agents are given it: URL-safe base64, padding optional."""
    text = text.strip()
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def iso_now(offset_seconds: float = 0.0) -> str:
    """Now (plus an offset) as ISO-8601 UTC with a ``Z``."""
    moment = datetime.now(UTC) + timedelta(seconds=offset_seconds)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


@attrs.define
class Signer:
    """Our half of one session: the next ``seq``, fresh nonces, the signature."""

    key: bytes
    binding: Binding
    seq: int = 0
    last_nonce: str | None = None

    def frame(
        self,
        frame_type: str,
        payload: dict[str, Any],
        *,
        frame_id: str | None = None,
        seq_step: int = 1,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A signed frame with the next seq (``seq_step`` ahead: gaps are allowed)."""
        self.seq += seq_step
        self.last_nonce = secrets.token_hex(12)
        frame: dict[str, Any] = {
            "v": 2,
            "id": frame_id or f"{frame_type[:3]}-{secrets.token_hex(6)}",
            "ts": iso_now(),
            "nonce": self.last_nonce,
            "seq": self.seq,
            "type": frame_type,
            "payload": payload,
            **(extra or {}),
        }
        frame["hmac"] = sign(frame, self.key, self.binding)
        return frame

    def resign(self, frame: dict[str, Any]) -> dict[str, Any]:
        """The same frame with a signature over its current fields."""
        frame = {k: v for k, v in frame.items() if k != "hmac"}
        frame["hmac"] = sign(frame, self.key, self.binding)
        return frame


@attrs.define
class BrainFrameCheck:
    """The checks an agent makes on the brain's signed frames, one session.

    The brain signs with the project key over the same binding
    (brain-frames-signed), never reuses a nonce, keeps ``ts`` within the
    ±60 s window, sends only brain-to-agent types, and numbers its frames
    with strictly increasing seq (seq-monotonicity).
    """

    key: bytes
    binding: Binding
    last_seq: int = 0
    nonces: set[str] = attrs.field(factory=set)

    def problems(self, frame: Any) -> list[tuple[str, str]]:
        """(rule, what is wrong) for each rule ``frame`` breaks; empty if none."""
        if not isinstance(frame, dict):
            return [(SIGNED, "a brain frame is not a JSON object")]
        found: list[tuple[str, str]] = []
        frame_type = frame.get("type")
        if frame_type not in BRAIN_TO_AGENT:
            found.append((SIGNED, f"the brain sent a {frame_type!r} frame"))
        if frame.get("v") != 2:
            found.append((SIGNED, f"brain frame v={frame.get('v')!r}, not 2"))
        provided = frame.get("hmac")
        try:
            expected = sign(frame, self.key, self.binding)
        except (TypeError, ValueError):
            expected = ""
        if not isinstance(provided, str) or not hmac.compare_digest(provided, expected):
            found.append((SIGNED, "brain frame signature does not verify"))
        seq = frame.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq <= self.last_seq:
            found.append((SEQ, f"brain seq {seq!r} after {self.last_seq}: not increasing"))
        else:
            self.last_seq = seq
        nonce = frame.get("nonce")
        if not isinstance(nonce, str) or not 0 < len(nonce) <= 32:
            found.append((SIGNED, f"brain nonce {nonce!r} is not 1-32 characters"))
        elif nonce in self.nonces:
            found.append((SIGNED, f"brain reused nonce {nonce!r}"))
        else:
            self.nonces.add(nonce)
        ts = frame.get("ts")
        try:
            sent = datetime.fromisoformat(str(ts).replace("Z", "+00:00"))
            if sent.tzinfo is None:
                raise ValueError("no timezone")
            skew = abs((datetime.now(UTC) - sent).total_seconds())
            if skew > TS_WINDOW_SECONDS:
                found.append((SIGNED, f"brain ts {ts!r} is {skew:.0f}s off"))
        except ValueError:
            found.append((SIGNED, f"brain ts {ts!r} is not ISO-8601 with a zone"))
        return found
